"""alexnet_jax.ops: the CPU compiler options, the max pool's faster CPU gradient, the dense layers'
input gradient and Winograd's convolutions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alexnet_jax import create_model, ops
from alexnet_jax.optim import create_optimizer
from alexnet_jax.training import create_train_state, make_steps, place_state
from configs import default


def _hlo(options):
  x, w, b = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones((16,))
  conv = lambda x, w, b: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b))
  return jax.jit(jax.grad(conv, (0, 1, 2)), compiler_options=options).lower(x, w, b).compile(
      ).as_text()


def _ynn_fusions(hlo):
  """The op each YNNPACK fusion in ``hlo`` computes, by its metadata."""
  lines = [line for line in hlo.splitlines() if re.match(r"\s*(ROOT )?%ynn_fusion", line)]
  return [re.search(r'op_name="([^"]*)"', line).group(1) for line in lines]


def test_cpu_compiler_options_keep_ynnpack_to_reductions():
  options = ops.compiler_options("cpu")
  assert options["xla_cpu_experimental_ynn_fusion_type"] == "LIBRARY_FUSION_TYPE_REDUCE"
  hlo = _hlo(options)
  # The bias gradient, a sum over batch and space, is YNNPACK's; the convolutions stay XLA's own.
  assert _ynn_fusions(hlo) == ["jit(<lambda>)/transpose(jvp())/reduce_sum"]
  assert hlo.count("convolution(") == 3
  assert "reduce-window" not in hlo
  assert ops.compiler_options("gpu") == {} and ops.compiler_options("tpu") == {}


def test_ynnpack_reductions_are_deterministic_and_accurate():
  # The same sum twice is bit-equal (the fault tests' resumed runs rely on it), and closer to
  # the float64 sum than XLA's own reduce-window tree.
  g = np.random.default_rng(0).standard_normal((64, 27, 27, 64)).astype(np.float32)
  exact = g.astype(np.float64).sum((0, 1, 2))
  options = ops.compiler_options("cpu")
  xla_own = dict(options, xla_cpu_experimental_ynn_fusion_type="")
  total = lambda o: jax.jit(lambda g: g.sum((0, 1, 2)), compiler_options=o).lower(g).compile()
  ynn, tree = total(options), total(xla_own)
  assert "ynn_fusion" in ynn.as_text() and "reduce-window" in tree.as_text()
  ours, theirs = np.asarray(ynn(g)), np.asarray(tree(g))
  np.testing.assert_array_equal(ours, np.asarray(ynn(g)))
  np.testing.assert_allclose(ours, exact, atol=1e-3)
  assert np.abs(ours - exact).max() <= np.abs(theirs - exact).max()


def test_region_based_copy_insertion_leaves_the_train_step_bit_equal():
  # The option only changes which buffers XLA copies; its speed is measured by the bench.
  model = create_model("alexnet_small")
  config = default.get_config()
  tx = create_optimizer(config, 10, 10)
  state = create_train_state(config, model, tx)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((4, 28, 28, 1), np.float32)),
           "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32), "mask": jnp.ones((4,), bool)}
  lowered = make_steps("jit", model, tx, devices=jax.devices()[:1]).train.lower(state, batch)
  options = ops.compiler_options("cpu")
  assert options["xla_cpu_copy_insertion_use_region_analysis"] is True
  without = {k: v for k, v in options.items() if k != "xla_cpu_copy_insertion_use_region_analysis"}
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # the step donates its state
  new_states = [c(copy(state), batch)[0] for c in (lowered.compile(compiler_options=without),
                                                  lowered.compile(compiler_options=options))]
  for a, b in zip(*map(jax.tree_util.tree_leaves, new_states)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_option_this_jaxlib_does_not_know_is_dropped_or_takes_its_next_value(monkeypatch):
  monkeypatch.setattr(ops, "_CPU_OPTIONS", {
      "xla_cpu_no_such_option": ("",),
      "xla_cpu_experimental_ynn_fusion_type": ("LIBRARY_FUSION_TYPE_NO_SUCH_TYPE", "")})
  ops.compiler_options.cache_clear()
  try:
    assert ops.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
  finally:
    ops.compiler_options.cache_clear()


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_the_library_steps_compile_with_the_options(mode):
  model = create_model("alexnet_small")
  config = default.get_config()
  tx = create_optimizer(config, 10, 10)
  steps = make_steps(mode, model, tx, devices=jax.devices()[:1])
  state = place_state(create_train_state(config, model, tx), steps)
  batch = {"image": np.zeros((2, model.input_size, model.input_size, model.in_channels),
                             np.float32),
           "label": np.zeros(2, np.int32), "mask": np.ones(2, bool)}
  batch = jax.tree_util.tree_map(steps.put, batch)
  if mode == "jit":
    hlos = [steps.train.lower(state, batch).compile().as_text(),
            steps.eval.lower(state.params, batch).compile().as_text()]
  else:  # pmap compiles on the first call
    steps.eval(state.params, batch)
    steps.train(state, batch)
    hlos = [e.as_text() for step in (steps.train, steps.eval) for e in step.executables.values()]
    assert len(hlos) == 2
  assert all("convolution" in hlo for hlo in hlos)
  assert all(re.search(r"/reduce_(sum|max)$", op) for hlo in hlos for op in _ynn_fusions(hlo))


@pytest.mark.parametrize("shape, window, stride", [((2, 13, 13, 3), 3, 2), ((1, 8, 9, 2), 2, 2),
                                                    ((2, 7, 7, 1), 3, 1)])
def test_max_pool_gradient_goes_to_the_first_maximum_as_in_xla(shape, window, stride):
  rng = np.random.default_rng(2)
  # Few distinct values: many windows hold tied maxima, and overlapping windows share them.
  x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))
  native = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                                       (1, stride, stride, 1), "VALID")
  np.testing.assert_array_equal(ops.max_pool(x, window, stride), native(x))
  pool = jax.jit(lambda x: ops.max_pool(x, window, stride))
  assert "reduce-window" not in pool.lower(x).compile().as_text()  # CPU: strided slices instead
  g = jnp.asarray(rng.standard_normal(native(x).shape, np.float32))
  ours = jax.jit(lambda x, g: jax.vjp(lambda x: ops.max_pool(x, window, stride), x)[1](g)[0])
  theirs = jax.jit(lambda x, g: jax.vjp(native, x)[1](g)[0])
  np.testing.assert_allclose(ours(x, g), theirs(x, g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m, r", [(2, 3), (3, 3), (4, 3), (2, 5), (3, 5)])
def test_winograd_transforms_compute_a_correlation(m, r):
  at, g, bt = ops.winograd_transforms(m, r)
  rng = np.random.default_rng(m * 10 + r)
  d, k = rng.standard_normal(m + r - 1), rng.standard_normal(r)
  np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, "valid"),
                             rtol=1e-12, atol=1e-12)


def _xla_conv(x, w, padding):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("shape, kernel, padding, m", [
    ((2, 13, 13, 8), 3, ((1, 1), (1, 1)), 3),  # conv3-conv5
    ((2, 27, 27, 4), 5, ((2, 2), (2, 2)), 3),  # conv2
    ((1, 10, 7, 3), 3, ((0, 2), (1, 0)), 2),  # uneven padding; tiles reach past the output
    ((1, 9, 8, 2), 5, ((0, 0), (0, 0)), 4),
])
def test_winograd_conv_and_its_gradients_match_xla(shape, kernel, padding, m):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 6), np.float32))
  ours, ours_vjp = jax.vjp(lambda x, w: ops.winograd_conv(x, w, padding, m), x, w)
  theirs, theirs_vjp = jax.vjp(lambda x, w: _xla_conv(x, w, padding), x, w)
  assert ours.shape == theirs.shape
  g = jnp.asarray(rng.standard_normal(theirs.shape, np.float32))
  for a, b in zip((ours,) + ours_vjp(g), (theirs,) + theirs_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_conv_runs_winograd_on_cpu_only_where_it_applies(monkeypatch):
  monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 50)  # these 2 images have 2 x 5 x 5 tiles
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 13, 13, 32), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 32), np.float32))
  nhwc = ("NHWC", "HWIO", "NHWC")

  def compiled(x, w, strides=(1, 1), padding=((1, 1), (1, 1)), groups=1):
    conv = lambda x, w: ops.conv_general_dilated(x, w, strides, padding, dimension_numbers=nhwc,
                                                 feature_group_count=groups)
    reference = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=nhwc,
                                         feature_group_count=groups,
                                         precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(conv(x, w), reference, rtol=0,
                               atol=1e-5 * float(jnp.abs(reference).max()))
    return jax.jit(conv).lower(x, w).compile().as_text()

  assert "convolution(" not in compiled(x, w)  # Winograd: matrix products and additions
  assert "convolution(" in compiled(x, w, strides=(2, 2))
  assert "convolution(" in compiled(x, w, padding="SAME")
  assert "convolution(" in compiled(x, w[:, :, :16], groups=2)
  assert "convolution(" in compiled(x[..., :8], w[:, :, :8])  # too few channels to pay off
  assert "convolution(" in compiled(x[:1], w)  # too few tiles
  bf16 = lambda a: a.astype(jnp.bfloat16)
  assert "convolution(" in jax.jit(
      lambda x, w: ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=nhwc)).lower(bf16(x), bf16(w)
                                                                           ).compile().as_text()


DENSE = (((1,), (0,)), ((), ()))


def test_dense_input_gradient_reads_the_weight_in_stored_order():
  rng = np.random.default_rng(0)
  x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((8, 256), (256, 128), (8, 128)))
  ours = lambda x, w: ops.dense_dot_general(x, w, DENSE)
  ref = lambda x, w: lax.dot_general(x, w, DENSE)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
  np.testing.assert_array_equal(ours(x, w), ref(x, w))
  for a, b in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g)):
    close(a, b)
  close(jax.jvp(ours, (x, w), (x, w))[1], jax.jvp(ref, (x, w), (x, w))[1])

  def dot_of_input_gradient(f):
    hlo = jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g),
                  compiler_options=ops.compiler_options()).lower(x, w, g).compile().as_text()
    (dot,) = [line for line in hlo.splitlines() if " dot(" in line]
    return dot
  # Ours: W @ g.T, W the left operand contracted along its stored rows; XLA's: g @ W.T.
  assert re.search(r"dot\(%w[.\d]*, %g[.\d]*\), lhs_contracting_dims=\{1\}",
                   dot_of_input_gradient(ours))
  assert re.search(r"dot\(%g[.\d]*, %w[.\d]*\)", dot_of_input_gradient(ref))


def test_dense_dot_general_leaves_other_products_to_xla():
  x3 = jnp.ones((2, 8, 256))
  w = jnp.ones((256, 128))
  batched = (((2,), (0,)), ((), ()))
  jaxpr = str(jax.make_jaxpr(lambda x: ops.dense_dot_general(x, w, batched))(x3))
  assert "custom_jvp" not in jaxpr and "dot_general" in jaxpr
  np.testing.assert_array_equal(ops.dense_dot_general(x3, w, batched),
                                lax.dot_general(x3, w, batched))
