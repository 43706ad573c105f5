"""CPU speed: the XLA options the project compiles with, and a max pool with a faster CPU gradient.

XLA:CPU in recent jaxlibs hands convolutions and dots to YNNPACK fusions by default. For AlexNet on
x86 its older kernels are much faster: at batch 64 on 2 AVX-512 cores the forward ran 73 -> 103
images/s and the train step 20 -> 30; YNNPACK's convolution weight gradient alone took 4 of the 8
seconds of a step. ``compiler_options`` turns those fusions off for the library's jitted steps.

A max pool's gradient (``select_and_scatter``) is slow on XLA:CPU too; routing the gradient tap by
tap to each window's first maximum (XLA's and PyTorch's tie rule) is a few strided adds, about 8%
of the train step; its forward as a maximum of strided slices gains 3-4% over ``reduce_window``.
Only the CPU lowering changes (``lax.platform_dependent``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# An empty list of fusion types forms no YNNPACK fusion.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options(platform: str | None = None) -> dict[str, str]:
  """Options for ``jax.jit(..., compiler_options=...)`` of AlexNet code on ``platform``.

  The library's jitted train and eval steps use them; pass them to your own ``jax.jit`` for the
  same speed (``jax.pmap`` takes none). Empty off CPU, and where this jaxlib no longer knows the
  (experimental) option.
  """
  if (platform or jax.default_backend()) != "cpu":
    return {}
  try:
    probe = jax.device_put(jnp.float32(0), jax.devices("cpu")[0])
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(probe).compile()
  except (RuntimeError, TypeError):  # INVALID_ARGUMENT "No such compile option"; an old jax.jit
    return {}
  return dict(_CPU_OPTIONS)


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """``nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")``, NHWC."""
  return _max_pool(x, window, stride)


def _xla_max_pool(x, window, stride):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           "VALID")


def _taps(x: jax.Array, window: int, stride: int):
  """(i, j, the value at tap (i, j) of every window), taps in row-major order."""
  _, h, w, _ = x.shape
  span_h, span_w = stride * ((h - window) // stride) + 1, stride * ((w - window) // stride) + 1
  for i in range(window):
    for j in range(window):
      yield i, j, x[:, i:i + span_h:stride, j:j + span_w:stride, :]


def tap_max_pool(x: jax.Array, *, window: int, stride: int) -> jax.Array:
  """The max pool as a maximum of strided slices, which XLA:CPU runs as one fused loop."""
  return functools.reduce(jnp.maximum, (tap for _, _, tap in _taps(x, window, stride)))


def _pool(x, window, stride):
  return lax.platform_dependent(
      x, cpu=functools.partial(tap_max_pool, window=window, stride=stride),
      default=functools.partial(_xla_max_pool, window=window, stride=stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
  return _pool(x, window, stride)


def _max_pool_fwd(x, window, stride):
  y = _pool(x, window, stride)
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
  for i, j, tap in _taps(x, window, stride):
    hit = (tap == y) & ~taken
    taken = taken | hit
    dx = dx + lax.pad(jnp.where(hit, g, jnp.zeros((), g.dtype)), jnp.zeros((), g.dtype),
                      [(0, 0, 0), (i, h - i - span_h, stride - 1),
                       (j, w - j - span_w, stride - 1), (0, 0, 0)])
  return dx
