"""How AlexNet is computed fast, apart from what it computes: the XLA options the project compiles
with, Winograd convolutions, a max pool with a faster CPU gradient, dense layers whose CPU input
gradient reads the weight in its stored order, a chunked CPU eval forward, and
``Implementation``, which picks among them for a model.

XLA:CPU in recent jaxlibs hands convolutions and dots to YNNPACK fusions by default; for AlexNet
on x86 its older kernels are much faster, so ``compiler_options`` keeps YNNPACK to reductions
(where it beats XLA's own by far) for the library's jitted steps, and switches XLA's copy
insertion to its region-based analysis, which drops copies of parameters that the step updates
in place.

With YNNPACK's dot and convolution fusions off, XLA's convolutions run near the machine's
matmul rate, so the remaining way to a faster convolution is fewer multiplications: on CPU,
``conv_general_dilated`` computes the stride-1 convolutions (AlexNet's conv2-conv5) by
Winograd's algorithm (``winograd_conv``).

A max pool's gradient (``select_and_scatter``) is slow on XLA:CPU too; routing the gradient tap by
tap to each window's first maximum (XLA's and PyTorch's tie rule) is a few strided adds. It is
the transpose of the pool's tangent rule (a ``custom_jvp``, linear in the tangent), so forward
mode (``jvp``, ``jacfwd``, ``hessian``) works too. Only the CPU lowering changes
(``lax.platform_dependent``). docs/performance.md has the measurements behind each choice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_CPU_OPTIONS = {
    # Each option's values in order of preference; the first this jaxlib knows is used.
    # YNNPACK fusions for reductions only: XLA's own rewrites a long sum (a convolution's bias
    # gradient) into a slow reduce-window tree. Its dot and convolution fusions are slower for
    # AlexNet on x86 than XLA's older kernels; an empty list forms no fusion at all.
    "xla_cpu_experimental_ynn_fusion_type": ("LIBRARY_FUSION_TYPE_REDUCE", ""),
    # Without it, copy insertion copies parameters that the step updates in place (fc1's weight
    # among them): more temporaries and a slower step, for bit-equal results.
    "xla_cpu_copy_insertion_use_region_analysis": (True,),
}


def _known(option: str, value: Any) -> bool:
  try:
    probe = jax.device_put(jnp.float32(0), jax.devices("cpu")[0])
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(probe).compile()
  except (RuntimeError, TypeError):  # INVALID_ARGUMENT "No such compile option"; an old jax.jit
    return False
  return True


@functools.cache
def compiler_options(platform: str | None = None) -> dict[str, Any]:
  """Options for ``jax.jit(..., compiler_options=...)`` of AlexNet code on ``platform``.

  The library's jitted train and eval steps use them; pass them to your own ``jax.jit`` for the
  same speed (``jax.pmap`` takes none). Empty off CPU; an option this jaxlib does not know, with
  none of its values, is left out.
  """
  if (platform or jax.default_backend()) != "cpu":
    return {}
  chosen = {k: next((v for v in values if _known(k, v)), None)
            for k, values in _CPU_OPTIONS.items()}
  return {k: v for k, v in chosen.items() if v is not None}


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """``nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")``, NHWC, with
  the faster CPU forward and gradient."""
  return _max_pool(x, window, stride)


def xla_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """The same max pool by XLA's own ``reduce_window`` (gradient: ``select_and_scatter``)."""
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
      default=functools.partial(xla_max_pool, window=window, stride=stride))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
  return _pool(x, window, stride)


@_max_pool.defjvp
def _max_pool_jvp(window, stride, primals, tangents):
  # Linear in the tangent, so every transform works: forward mode uses it as it is, and reverse
  # mode transposes it (strided slices become pads) into the few strided adds of the gradient.
  (x,), (t,) = primals, tangents
  y = _max_pool(x, window, stride)  # itself, so that a derivative of this rule uses it again

  def native(x, y, t):
    return jax.jvp(lambda x: xla_max_pool(x, window, stride), (x,), (t,))[1]

  return y, lax.platform_dependent(
      x, y, t, cpu=functools.partial(tap_max_pool_jvp, window=window, stride=stride),
      default=native)


def _first_maximum(x: jax.Array, y: jax.Array, window: int, stride: int) -> jax.Array:
  """Which tap (row-major) of each window of ``x`` holds its first maximum ``y``: XLA's and
  PyTorch's tie rule."""
  # Found once, by a reduction that XLA leaves unfused. As a chain of selects (or a "taken"
  # mask) it was fused into every tap's branch of the gradient and re-derived there, together
  # with the pool output and whatever produced x, at a cost to every step. The reduction's input is
  # built by selects on an iota, not by jnp.stack: XLA:CPU copies each operand of a concatenate
  # out, twice over, while the selects fuse into the reduction.
  taps = list(_taps(x, window, stride))
  shape = (len(taps),) + y.shape
  tap_index = lax.broadcasted_iota(jnp.int32, shape, 0)
  stacked = functools.reduce(
      lambda rest, k: jnp.where(tap_index == k, jnp.broadcast_to(taps[k][2], shape), rest),
      reversed(range(len(taps) - 1)), jnp.broadcast_to(taps[-1][2], shape))
  return jnp.min(jnp.where(stacked == y, tap_index, len(taps)), axis=0)


def tap_max_pool_jvp(x: jax.Array, y: jax.Array, t: jax.Array, *, window: int, stride: int
                     ) -> jax.Array:
  """Each window's tangent is ``t`` at its first (row-major) maximum of ``x``."""
  first = _first_maximum(lax.stop_gradient(x), lax.stop_gradient(y), window, stride)
  zero = jnp.zeros((), t.dtype)
  return functools.reduce(jnp.add, (jnp.where(first == k, tap, zero)
                                    for k, (_, _, tap) in enumerate(_taps(t, window, stride))))


# ----------------------------------------------------------------------------------------------
# Dense layers on CPU.
#
# The input gradient of ``x @ W`` is ``g @ W.T``: W as the right operand, contracted along its
# last axis, which XLA:CPU's kernel runs several times slower than the same contraction as
# ``W @ g.T`` (W as the left operand) followed by a transpose of the batch-sized result
# (docs/performance.md). The barrier keeps XLA's simplifier from folding the transposes
# back into the first form.


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                      precision: Any = None, preferred_element_type: Any = None,
                      **kwargs: Any) -> jax.Array:
  """``lax.dot_general`` for ``nn.Dense(..., dot_general=ops.dense_dot_general)``: for a 2-D
  ``x @ W``, the input gradient on CPU reads W in its stored order. Same results to rounding;
  every other case, and every other platform, runs ``lax.dot_general`` unchanged."""
  if (lhs.ndim, rhs.ndim) != (2, 2) or kwargs or (
      tuple(map(tuple, dimension_numbers[0])), tuple(map(tuple, dimension_numbers[1]))) != (
          ((1,), (0,)), ((), ())):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  return _dense(lhs, rhs, precision, preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _dense(x, w, precision, preferred):
  return lax.dot(x, w, precision=precision, preferred_element_type=preferred)


@functools.partial(_dense.defjvp, symbolic_zeros=True)
def _dense_jvp(precision, preferred, primals, tangents):
  # Linear in the tangents; reverse mode transposes the x part into W @ g.T, kept whole by the
  # barrier, then transposed.
  (x, w), (dx, dw) = primals, tangents
  dot = functools.partial(lax.dot, precision=precision, preferred_element_type=preferred)
  zero = lambda t: isinstance(t, jax.custom_derivatives.SymbolicZero)
  y = _dense(x, w, precision, preferred)
  parts = []
  if not zero(dx):
    stored_order = lambda w, dx: dot(w.T, lax.optimization_barrier(dx.T)).T
    parts.append(lax.platform_dependent(w, dx, cpu=stored_order, default=lambda w, dx: dot(dx, w)))
  if not zero(dw):
    parts.append(dot(x, dw))
  if not parts:
    return y, jnp.zeros_like(y)
  return y, functools.reduce(jnp.add, parts)


# ----------------------------------------------------------------------------------------------
# Winograd convolutions on CPU.
#
# F(m x m, r x r) computes an m x m output tile from an (m + r - 1)^2 input tile with
# (m + r - 1)^2 products per channel pair instead of m^2 r^2 (Lavin & Gray, 2016). Those products
# are (m + r - 1)^2 independent matrix products over the channels, which XLA runs at GEMM speed;
# the tile transforms are additions of strided slices that XLA fuses into a few memory-bound
# loops. The gradients follow by autodiff: matrix products of the same shapes plus transposed
# transforms.


@functools.cache
def winograd_transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(AT, G, BT)`` of F(m, r) with ``y = AT @ ((G @ g) * (BT @ d))`` the correlation of ``d``
  (length m + r - 1) with ``g`` (length r), from the points 0, +-1, +-2, +-1/2, ... and infinity."""
  n = m + r - 1
  points = [0.0] + [s * k for k in (1, 2, 0.5, 4, 0.25) for s in (1, -1)][:n - 2]
  at = np.zeros((m, n))
  g = np.zeros((n, r))
  for i, p in enumerate(points):
    at[:, i] = [p**k for k in range(m)]
    # Dividing G's rows by prod_{j != i} (p_i - p_j) leaves BT with small integers.
    g[i] = [p**k for k in range(r)] / np.prod([p - q for q in points if q != p])
  at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0  # the point at infinity
  # BT is then fixed: sum_t AT[k, t] G[t, j] BT[t, l] = [l == k + j] for every k, j, l.
  system = np.einsum("kt,tj->kjt", at, g).reshape(m * r, n)
  target = np.zeros((m, r, n))
  for k in range(m):
    for j in range(r):
      target[k, j, k + j] = 1.0
  bt = np.linalg.lstsq(system, target.reshape(m * r, n), rcond=None)[0]
  assert np.allclose(system @ bt, target.reshape(m * r, n), atol=1e-9)
  sign = np.sign(g[np.arange(n), np.argmax(g != 0, axis=1)])[:, None]  # G's rows lead positive
  return at, g * sign, np.round(bt * sign, 9) + 0.0


def _combine(matrix: np.ndarray, xs: Sequence[jax.Array]) -> list[jax.Array]:
  """``matrix @ xs`` for a list of arrays, as sums that skip zeros and multiplications by +-1."""
  out = []
  for row in matrix:
    terms = [x if c == 1 else -x if c == -1 else x * float(c) for c, x in zip(row, xs) if c]
    out.append(functools.reduce(jnp.add, terms))
  return out


def _tiling(h: int, w: int, r: int, padding: Sequence[tuple[int, int]], m: int
            ) -> tuple[int, int, int, int]:
  """Output height and width, and m x m tiles down and across (the last may reach past)."""
  (top, bottom), (left, right) = padding
  oh, ow = h + top + bottom - r + 1, w + left + right - r + 1
  return oh, ow, -(-oh // m), -(-ow // m)


def winograd_conv(x: jax.Array, w: jax.Array, padding: Sequence[tuple[int, int]], m: int
                  ) -> jax.Array:
  """A stride-1 NHWC x HWIO convolution (cross-correlation, as ``lax.conv``) by F(m x m, r x r)."""
  n, h, wd, c = x.shape
  r, _, _, features = w.shape
  (top, _), (left, _) = padding
  oh, ow, th, tw = _tiling(h, wd, r, padding, m)
  a = m + r - 1
  at, g, bt = winograd_transforms(m, r)
  x = jnp.pad(x, ((0, 0), (top, m * th + r - 1 - h - top), (left, m * tw + r - 1 - wd - left),
                  (0, 0)))
  # The (i, j) tap of every tile is a strided slice; transforming rows then columns gives the a^2
  # inputs of the products, one (tiles, c) matrix each.
  rows = _combine(bt, [x[:, i:i + m * th:m] for i in range(a)])
  u = [t.reshape(n * th * tw, c) for row in rows
       for t in _combine(bt, [row[:, :, j:j + m * tw:m] for j in range(a)])]
  v = [t for row in _combine(g, list(w)) for t in _combine(g, list(row))]
  prods = [(ui @ vi).reshape(n, th, tw, features) for ui, vi in zip(u, v)]
  cols = [_combine(at, prods[j::a]) for j in range(a)]  # cols[j][k]: row k of output, tap col j
  tiles = [_combine(at, [col[k] for col in cols]) for k in range(m)]  # tiles[k][l]: output (k, l)
  y = jnp.stack([jnp.stack(row, axis=3) for row in tiles], axis=2)  # (n, th, m, tw, m, features)
  return y.reshape(n, m * th, m * tw, features)[:, :oh, :ow]


# Kernel side -> output tile side m of F(m x m, r x r) on CPU, chosen by timing AlexNet's train
# step and forward at batch 64: a 3x3 output tile takes 25 products instead of 81 for conv3-conv5
# and 49 instead of 225 for conv2.
WINOGRAD_TILES = {3: 3, 5: 3}
# Thinner or smaller products than these do not win back the transforms and their compile time
# (docs/performance.md).
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_TILES = 1024  # per device: batch x output tiles of one image


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, *, winograd_batch: int | None = None,
                         **kwargs: Any) -> jax.Array:
  """``lax.conv_general_dilated``, by Winograd on CPU where that is faster (``WINOGRAD_TILES``).

  Pass it as ``nn.Conv(..., conv_general_dilated=ops.conv_general_dilated)``. Winograd is used
  for fp32 NHWC/HWIO convolutions with a square kernel listed in ``WINOGRAD_TILES``, stride 1, no
  dilation, one group, explicit padding, at least ``WINOGRAD_MIN_CHANNELS`` input and output
  channels and ``WINOGRAD_MIN_TILES`` output tiles (over ``winograd_batch`` images, when ``lhs``
  is a chunk of a larger batch); the rest, and every other platform, run
  ``lax.conv_general_dilated`` unchanged.
  """
  xla = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                          padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                          dimension_numbers=dimension_numbers,
                          feature_group_count=feature_group_count, precision=precision, **kwargs)
  m = WINOGRAD_TILES.get(rhs.shape[0]) if rhs.ndim == 4 else None
  if m is None or lhs.ndim != 4 or isinstance(padding, str):
    return xla(lhs, rhs)
  r = rhs.shape[0]
  _, _, th, tw = _tiling(lhs.shape[1], lhs.shape[2], r, padding, m)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  batch = lhs.shape[0] if winograd_batch is None else winograd_batch
  # A symbolic batch (jax.export) is taken to be large: the choice changes speed, not results.
  enough = not isinstance(batch, int) or batch * th * tw >= WINOGRAD_MIN_TILES
  if (rhs.shape[1] == r and not kwargs and enough
      and min(rhs.shape[2:]) >= WINOGRAD_MIN_CHANNELS
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
      and all(s == 1 for s in window_strides) and feature_group_count == 1
      and all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
      and lhs.dtype == rhs.dtype == jnp.float32):
    cpu = functools.partial(winograd_conv, padding=tuple(map(tuple, padding)), m=m)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=xla)
  return xla(lhs, rhs)


# ----------------------------------------------------------------------------------------------
# The choice, per model.

# The default CPU eval chunk, in bytes of conv1's output: with each layer's activations and
# Winograd temporaries in the cache, a chunked eval forward beat the whole batch (measured in
# docs/performance.md).
EVAL_CHUNK_BYTES = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class Implementation:
  """How a model's convolutions, max pools and eval forward are computed: a choice of speed, not
  of results (they agree to rounding). Pass one as ``create_model(..., impl=...)``; it is not a
  model setting, so configs and checkpoints never hold it.

  ``FAST`` (the default) is the fastest measured; ``XLA`` is XLA's own ops everywhere. Off CPU,
  both run XLA's ops.
  """

  # On CPU, stride-1 convolutions by Winograd's algorithm where it is faster (WINOGRAD_TILES).
  winograd: bool = True
  # On CPU, the max pool as a maximum of strided slices, its gradient by the custom_jvp rule;
  # False: reduce_window and select_and_scatter.
  tap_max_pool: bool = True
  # On CPU, dense layers' input gradients read the weight in its stored order
  # (dense_dot_general); False: lax.dot_general.
  dense_input_grad: bool = True
  # On CPU, a forward with train=False runs the conv stack this many images at a time (the largest
  # divisor of the batch up to it). None: as many as keep conv1's output within EVAL_CHUNK_BYTES;
  # 0: the whole batch. Training always runs the whole batch: chunked gradients were slower.
  eval_chunk: Optional[int] = None

  def __post_init__(self):
    if self.eval_chunk is not None and (not isinstance(self.eval_chunk, int)
                                        or self.eval_chunk < 0):
      raise ValueError(f"eval_chunk={self.eval_chunk!r} must be None or an int >= 0 (images per "
                       "chunk of the CPU eval forward; 0 runs the whole batch at once)")

  def conv(self, batch: Any) -> Callable[..., jax.Array]:
    """The ``conv_general_dilated`` for ``nn.Conv`` in a forward of ``batch`` images."""
    if not self.winograd:
      return lax.conv_general_dilated
    return functools.partial(conv_general_dilated, winograd_batch=batch)

  def dot_general(self) -> Callable[..., jax.Array]:
    """The ``dot_general`` for ``nn.Dense``."""
    return dense_dot_general if self.dense_input_grad else lax.dot_general

  def max_pool(self, x: jax.Array, window: int, stride: int) -> jax.Array:
    return (max_pool if self.tap_max_pool else xla_max_pool)(x, window, stride)

  def chunk(self, batch: Any, first_output_bytes: int) -> Any:
    """Images per chunk of the CPU eval conv stack for ``batch`` images whose first layer's
    output takes ``first_output_bytes`` each; the batch when it runs whole."""
    if not isinstance(batch, int):  # a symbolic batch (jax.export): no divisor to choose
      return batch
    chunk = self.eval_chunk
    if chunk is None:
      chunk = max(1, EVAL_CHUNK_BYTES // first_output_bytes)
    return max((b for b in range(1, min(batch, chunk) + 1) if batch % b == 0), default=batch)

  def eval_conv_stack(self, stack: Callable[[Any, jax.Array], jax.Array], params: Any,
                      x: jax.Array, chunk: int) -> jax.Array:
    """``stack(params, x)``, on CPU by ``chunk`` images at a time.

    Its derivatives, of any order and mode, are those of the whole batch at once: differentiated,
    the chunk loop ran several times slower (docs/performance.md).
    """
    n = x.shape[0]
    if chunk == n:
      return stack(params, x)

    def by_chunks(params, x):
      y = lax.map(lambda xs: stack(params, xs), x.reshape((n // chunk, chunk) + x.shape[1:]))
      return y.reshape((n,) + y.shape[2:])

    @jax.custom_jvp
    def run(params, x):
      return lax.platform_dependent(params, x, cpu=by_chunks, default=stack)

    run.defjvp(lambda primals, tangents: jax.jvp(stack, primals, tangents))
    return run(params, x)


FAST = Implementation()
XLA = Implementation(winograd=False, tap_max_pool=False, dense_input_grad=False, eval_chunk=0)
