"""Drop-in convolution and max pool whose gradients XLA:CPU computes at memory or GEMM speed.

XLA:CPU differentiates a convolution's weights as another convolution, whose "kernel" is the
whole output map (27x27 for AlexNet's conv2) and whose contraction runs over the batch; its Eigen
kernels run that at a few GFLOP/s: 4 of the 8 seconds of an AlexNet train step at batch 64 on 2
cores went to conv2's weight gradient alone. Written as one matrix product of the transposed
im2col patches, (K*K*Cin, N*Ho*Wo) @ (N*Ho*Wo, Cout), it runs at the machine's matmul rate.
Likewise a max pool's gradient (``select_and_scatter``) took 0.57 s per step; routing the
gradient tap by tap (first maximum of each window, as XLA and PyTorch do) is a few strided adds.

Only the CPU lowering of these gradients changes (``lax.platform_dependent``): GPUs and TPUs keep
their native kernels, and the forward passes and the convolution's input gradient are XLA's own
everywhere. Grouped, dilated or non-NHWC convolutions fall through to ``lax.conv_general_dilated``
unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` with the same arguments (flax's ``nn.Conv`` takes it)."""
  dilated = any(d != 1 for d in (lhs_dilation or ()) + tuple(rhs_dilation or ()))
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1 and not dilated
           and precision is None and preferred_element_type is None
           and not isinstance(padding, str)
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  # XLA's own forward, also under differentiation: a GEMM forward could share the weight
  # gradient's patches, but it would round differently from inference, and a max pool's winner
  # between near-equal values could then differ between the two.
  return _xla_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, g):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding), x)
  dx, = input_vjp(g)  # dropped by XLA where nothing needs it (the images)

  def native(x, g):
    return jax.vjp(lambda w: _xla_conv(x, w, strides, padding), w)[1](g)[0]

  def gemm(x, g):
    cols = im2col(x, w.shape, strides, padding).reshape(-1, g.shape[0] * g.shape[1] * g.shape[2])
    dw = jnp.dot(cols, g.reshape(cols.shape[1], -1), preferred_element_type=jnp.float32)
    return dw.reshape(w.shape).astype(w.dtype)

  return dx, lax.platform_dependent(x, g, cpu=gemm, default=native)


_conv.defvjp(_conv_fwd, _conv_bwd)


def im2col(x: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
           padding: Sequence[Sequence[int]]) -> jax.Array:
  """The patches of an NHWC convolution's input, channels first: (K*K*Cin, N, Ho, Wo).

  Rows are (tap, Cin) as in the kernel reshaped to (K*K*Cin, Cout), so ``reshape(K*K*Cin, -1)``
  is the im2col matrix. Each tap is written in place into one buffer, which XLA:CPU does about
  twice as fast as a ``stack`` of the strided slices.
  """
  kh, kw, cin, _ = kernel_shape
  (sh, sw), (ph, pw) = strides, padding
  n, h, w, _ = x.shape
  ho, wo = (h + sum(ph) - kh) // sh + 1, (w + sum(pw) - kw) // sw + 1
  xt = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), ph, pw))
  patches = jnp.zeros((kh * kw, cin, n, ho, wo), x.dtype)
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    tap = xt[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    patches = lax.dynamic_update_slice_in_dim(patches, tap[None], t, 0)
  return patches.reshape(kh * kw * cin, n, ho, wo)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """``nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")``, NHWC."""
  return _max_pool(x, window, stride)


def _xla_max_pool(x, window, stride):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
  return _xla_max_pool(x, window, stride)


def _max_pool_fwd(x, window, stride):
  y = _xla_max_pool(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, residuals, g):
  x, y = residuals

  def native(x, y, g):
    return jax.vjp(lambda x: _xla_max_pool(x, window, stride), x)[1](g)[0]

  return (lax.platform_dependent(
      x, y, g, cpu=functools.partial(tap_max_pool_grad, window=window, stride=stride),
      default=native),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def tap_max_pool_grad(x: jax.Array, y: jax.Array, g: jax.Array, *, window: int, stride: int
                      ) -> jax.Array:
  """Each window's gradient ``g`` goes to its first (row-major) maximum of ``x``."""
  _, h, w, _ = x.shape
  _, ho, wo, _ = y.shape
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros(x.shape, g.dtype)
  for i in range(window):
    for j in range(window):
      hit = (x[:, i:i + span_h:stride, j:j + span_w:stride, :] == y) & ~taken
      taken = taken | hit
      dx = dx + lax.pad(jnp.where(hit, g, jnp.zeros((), g.dtype)), jnp.zeros((), g.dtype),
                        [(0, 0, 0), (i, h - i - span_h, stride - 1),
                         (j, w - j - span_w, stride - 1), (0, 0, 0)])
  return dx
