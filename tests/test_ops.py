"""alexnet_jax.ops: XLA's convolution and max pool with faster CPU gradients, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alexnet_jax import ops

NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(conv_fn, x, w, **kwargs):
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  loss = lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, dimension_numbers=dn, **kwargs)))
  return jax.jit(jax.grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize("side, cin, cout, k, stride, pad", [
    (35, 3, 8, 11, 4, 2),  # conv1's shape: stride 4, the last window cut short
    (9, 4, 6, 5, 1, 2), (7, 5, 3, 3, 2, 0), (6, 2, 4, 3, 1, (1, 0))])
def test_gradients_equal_xla_native(side, cin, cout, k, stride, pad):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, side, side, cin), np.float32))
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32))
  padding = [pad if isinstance(pad, tuple) else (pad, pad)] * 2
  ours = _grads(ops.conv_general_dilated, x, w, window_strides=(stride, stride), padding=padding)
  native = _grads(lax.conv_general_dilated, x, w, window_strides=(stride, stride),
                  padding=padding)
  for a, b in zip(ours, native):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_the_cpu_weight_gradient_is_a_matrix_product():
  x = jnp.ones((2, 9, 9, 4))
  w = jnp.ones((5, 5, 4, 6))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  grad_w = jax.grad(lambda x, w: ops.conv_general_dilated(x, w, (1, 1), [(2, 2)] * 2,
                                                           dimension_numbers=dn).sum(), 1)
  hlo = jax.jit(grad_w).lower(x, w).compile().as_text()  # the sum needs no forward values
  assert "convolution(" not in hlo and " dot(" in hlo


@pytest.mark.parametrize("kwargs", [dict(feature_group_count=2), dict(rhs_dilation=(2, 2)),
                                    dict(padding="SAME")])
def test_other_convolutions_fall_through_unchanged(kwargs):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 4 // kwargs.get("feature_group_count", 1), 6),
                                      np.float32))
  kwargs = {"window_strides": (1, 1), "padding": [(1, 1)] * 2} | kwargs
  for a, b in zip(_grads(ops.conv_general_dilated, x, w, **kwargs),
                  _grads(lax.conv_general_dilated, x, w, **kwargs)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape, window, stride", [((2, 13, 13, 3), 3, 2), ((1, 8, 9, 2), 2, 2),
                                                    ((2, 7, 7, 1), 3, 1)])
def test_max_pool_gradient_goes_to_the_first_maximum_as_in_xla(shape, window, stride):
  rng = np.random.default_rng(2)
  # Few distinct values: many windows hold tied maxima, and overlapping windows share them.
  x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))
  native = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                                       (1, stride, stride, 1), "VALID")
  np.testing.assert_array_equal(ops.max_pool(x, window, stride), native(x))
  g = jnp.asarray(rng.standard_normal(native(x).shape, np.float32))
  ours = jax.jit(lambda x, g: jax.vjp(lambda x: ops.max_pool(x, window, stride), x)[1](g)[0])
  theirs = jax.jit(lambda x, g: jax.vjp(native, x)[1](g)[0])
  np.testing.assert_allclose(ours(x, g), theirs(x, g), rtol=1e-6, atol=1e-6)
