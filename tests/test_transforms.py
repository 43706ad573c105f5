"""Every JAX transform through every variant: the CPU kernels (Winograd convolutions, the max
pool and its gradient, the chunked eval forward) give what XLA's own ops give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alexnet_jax as A
from alexnet_jax import ops

# Narrow, and PyTorch's init for all: the paper's N(0, 0.01) leaves a narrow net's logits near
# 1e-9, where float noise is all there is to compare.
NARROW = dict(conv_features=(8, 16, 16, 16, 8), hidden_width=16, num_classes=5,
              dropout_rate=0.0, weight_init="torch")


def _close(ours, ref):
  """Within 1e-5 of the largest value, leaf by leaf."""
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-6))


def _models(variant):
  """The variant narrowed, with the CPU kernels (eval by chunks of one image), and with XLA's
  own convolutions and max pool."""
  ours = A.create_model(variant, impl=ops.Implementation(eval_chunk=1), **NARROW)
  xla = ours.clone(impl=ops.XLA)
  side = ours.input_size if ours.avgpool_size is None else 67
  x = jax.random.uniform(jax.random.key(1), (2, side, side, ours.in_channels))
  return ours, xla, A.init_params(ours, jax.random.key(0)), x


def _transforms(model, params, x):
  """Each transform of the model, as a function of nothing."""
  logits = lambda p, x: model.apply({"params": p}, x)
  of_scale = lambda s: logits(params, x * s)  # a scalar in, so jacobians stay small
  squared = lambda s: jnp.sum(of_scale(s) ** 2)
  labels = jnp.arange(x.shape[0]) % 5
  loss = lambda p, x: -jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(logits(p, x)), labels[:, None], axis=1))
  tangent = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size)).reshape(p.shape),
                                   params)
  scales = jnp.array([0.5, 1.0, 1.5])
  grad_norm = lambda s: sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(
      jax.grad(loss)(params, x * s)))
  return {
      "jvp": lambda: jax.jvp(lambda x: logits(params, x), (x,), (jnp.sin(x),)),
      "jacfwd": lambda: jax.jacfwd(of_scale)(1.0),
      "jacrev": lambda: jax.jacrev(of_scale)(1.0),
      "hessian": lambda: jax.hessian(squared)(1.0),
      "jvp of grad": lambda: jax.jvp(lambda p: jax.grad(loss)(p, x), (params,), (tangent,)),
      "grad of grad": lambda: jax.grad(grad_norm)(1.0),
      "vmap of jvp": lambda: jax.vmap(lambda s: jax.jvp(of_scale, (s,), (1.0,)))(scales),
      "vmap of jacfwd": lambda: jax.vmap(jax.jacfwd(of_scale))(scales),
      "vmap of jacrev": lambda: jax.vmap(jax.jacrev(of_scale))(scales),
      "vmap of hessian": lambda: jax.vmap(jax.hessian(squared))(scales),
      "vmap of grad": lambda: jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, x[:, None]),
      "checkpoint": lambda: jax.grad(jax.checkpoint(loss))(params, x),
  }


def _compare(variant, names):
  ours, xla, params, x = _models(variant)
  mine, theirs = _transforms(ours, params, x), _transforms(xla, params, x)
  for name in names or mine:
    _close(jax.jit(mine[name])(), jax.jit(theirs[name])())


def test_every_transform_matches_xla_ops():
  # The variant with 28x28 input: its pools and chunked eval forward take every transform
  # (compiling each one for a 224x224 variant would cost minutes).
  _compare("alexnet_small", None)


@pytest.mark.parametrize("variant", A.VARIANTS)
def test_forward_mode_through_every_variant(variant):
  # jacfwd pushes tangents through the pool's rule, as jvp does; Winograd's convolutions are
  # plain array ops, whose gradients test_ops checks.
  _compare(variant, ("jacfwd",))


def test_export_for_cpu_cuda_and_tpu_round_trips():
  model, _, params, x = _models("alexnet")
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  exported = jax.export.export(forward, platforms=("cpu", "cuda", "tpu"))(params, x)
  assert exported.platforms == ("cpu", "cuda", "tpu")
  restored = jax.export.deserialize(exported.serialize())
  _close(restored.call(params, x), forward(params, x))
  # The gradient exports too (the pool's tangent rule, transposed).
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)))
  exported = jax.export.export(grad, platforms=("cpu", "cuda", "tpu"))(params, x)
  _close(jax.export.deserialize(exported.serialize()).call(params, x), grad(params, x))


def test_flax_nnx_through_the_linen_bridge():
  from flax import nnx

  linen = A.create_model("alexnet_small", **NARROW | {"dropout_rate": 0.5})
  model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(params=0, dropout=1))
  x = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
  nnx.bridge.lazy_init(model, x)
  # The same numbers as the Linen module with the same params.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _close(model(x), linen.apply({"params": params}, x))
  np.testing.assert_array_equal(model(x), model(x))  # eval: deterministic
  assert not np.array_equal(model(x, train=True), model(x, train=True))  # dropout from rngs

  labels = jnp.arange(4) % 5

  @nnx.jit
  def step(model):
    loss = lambda m: -jnp.mean(jax.nn.log_softmax(m(x))[jnp.arange(4), labels])
    value, grads = nnx.value_and_grad(loss)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads))
    return value

  first = step(model)
  assert step(model) < first
