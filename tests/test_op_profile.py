"""alexnet_jax.op_profile: XLA's profile of a compiled function, summed by op and by layer."""

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import op_profile


def test_op_times_ranks_ops_and_names_their_layers():
  def f(big, small):
    with jax.named_scope("conv9"):
      heavy = jnp.sin(big) * jnp.cos(big) + jnp.tanh(big)  # one loop over 4M values
    with jax.named_scope("fc9"):
      light = jnp.exp(small) * 3.0  # a loop over 16
    return heavy, light

  big, small = jnp.asarray(np.linspace(0, 1, 2**22, dtype=np.float32)), jnp.ones((16,))
  compiled = jax.jit(f).lower(big, small).compile()
  run = lambda: jax.block_until_ready(compiled(big, small))
  run()
  times = op_profile.op_times(run, compiled.as_text(), layers=("conv9", "fc9"), calls=2)
  assert [t.ms for t in times] == sorted((t.ms for t in times), reverse=True)
  slowest = times[0]
  assert slowest.layer == "conv9" and slowest.shape.startswith("f32[4194304]")
  assert slowest.events == 1 and slowest.ms > 0
  # Every op found is an instruction of the compiled module, and the small loop is there too.
  assert all(f"%{t.name} = " in compiled.as_text() for t in times)
  assert any(t.layer == "fc9" and t.shape.startswith("f32[16]") for t in times)
  totals = op_profile.layer_totals(times)
  assert list(totals)[0] == "conv9" and totals["conv9"] > totals["fc9"] > 0
  assert sum(totals.values()) == sum(t.ms for t in times)
