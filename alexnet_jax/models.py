"""One configurable AlexNet (Flax Linen, NHWC) and the named variants as settings.

Every variant in ``VARIANT_SETTINGS`` is just a set of field values for :class:`AlexNet`;
``create_model(name, **overrides)`` builds one. Parameter names are the same for all variants
(``conv1``..``conv5``, ``fc1``..``fc3``) so checkpoints and converters need no per-variant code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from alexnet_jax import ops

Array = jax.Array
Initializer = Callable[..., Array]

INITS = ("torch", "paper", "kaiming")
DROPOUT_PLACEMENTS = ("before_hidden", "after_hidden")

# The paper gives conv2, conv4, conv5 and the two hidden dense layers a bias of 1 so their ReLUs
# start in the active region; everything else starts at 0.
_PAPER_BIAS_ONE = frozenset({"conv2", "conv4", "conv5", "fc1", "fc2"})


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


def _uniform(bound: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def local_response_norm(x: Array, size: int, alpha: float, beta: float, k: float) -> Array:
  """``torch.nn.LocalResponseNorm`` over the last (channel) axis of an NHWC array.

  ``b_c = a_c / (k + alpha / size * sum_{window} a^2) ** beta``; the channel axis is zero-padded
  ``size // 2`` before and ``(size - 1) // 2`` after and the sum is always divided by ``size``.
  """
  squared = jnp.square(x.astype(jnp.float32))  # fp32 so bf16 runs do not lose the power below
  window_sum = jax.lax.reduce_window(
      squared, 0.0, jax.lax.add,
      window_dimensions=(1,) * (x.ndim - 1) + (size,),
      window_strides=(1,) * x.ndim,
      padding=((0, 0),) * (x.ndim - 1) + ((size // 2, (size - 1) // 2),))
  scale = (k + (alpha / size) * window_sum) ** beta
  return (x.astype(jnp.float32) / scale).astype(x.dtype)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging matrix with PyTorch's bins [floor(i*in/out), ceil((i+1)*in/out))."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: Array, output_size: tuple[int, int]) -> Array:
  """``torch.nn.AdaptiveAvgPool2d`` for NHWC input (identity when the size already matches)."""
  _, h, w, _ = x.shape
  out_h, out_w = output_size
  if (h, w) == (out_h, out_w):
    return x
  # Bins overlap and differ in length, so a fixed-window reduce_window cannot express them; two
  # small averaging matrices can, and are differentiable and cheap.
  ph = jnp.asarray(_adaptive_pool_matrix(h, out_h), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(w, out_w), x.dtype)
  return jnp.einsum("nhwc,ih,jw->nijc", x, ph, pw, precision=jax.lax.Precision.HIGHEST)


class AlexNet(nn.Module):
  """AlexNet family, NHWC input. Call with ``train=True`` to enable dropout (rng name 'dropout').

  Fields are the settings that distinguish the variants (``VARIANT_SETTINGS``), and ``impl``, how
  the layers are computed (``ops.Implementation``). ``num_classes=0`` drops fc3: the model returns
  the penultimate features, ``hidden_width`` wide. With ``mutable=["intermediates"]``, ``apply``
  also returns the activations by name (conv1..conv5 after their ReLU and LRN, pool1..pool3,
  fc1, fc2 after their ReLU) in ``intermediates["activations"]``.
  """

  num_classes: int = 1000
  in_channels: int = 3
  conv_features: Sequence[int] = (64, 192, 384, 256, 256)
  conv_kernels: Sequence[int] = (11, 5, 3, 3, 3)
  conv_strides: Sequence[int] = (4, 1, 1, 1, 1)
  conv_paddings: Sequence[int] = (2, 2, 1, 1, 1)
  groups: Sequence[int] = (1, 1, 1, 1, 1)
  # Which convs are followed by LRN (after the ReLU) and by a max pool (after the LRN).
  lrn_after: Sequence[bool] = (False, False, False, False, False)
  pool_after: Sequence[bool] = (True, True, False, False, True)
  pool_window: int = 3
  pool_stride: int = 2
  lrn_size: int = 5
  lrn_alpha: float = 1e-4  # PyTorch/Caffe semantics (divided by size); paper-literal is 5e-4.
  lrn_beta: float = 0.75
  lrn_k: float = 2.0
  # Output size of the adaptive average pool; None means no pool and a fixed input_size.
  avgpool_size: Optional[int] = 6
  # Nominal input side: required exactly when avgpool_size is None, default shape otherwise.
  input_size: int = 224
  hidden_width: int = 4096
  dropout_rate: float = 0.5
  # torchvision puts dropout before fc1 and fc2; alexnet_small's write-up after them.
  dropout_placement: str = "before_hidden"
  weight_init: str = "torch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Not a setting: speed only, so it stays out of configs and checkpoints.
  impl: ops.Implementation = ops.FAST

  def __post_init__(self):
    n = len(self.conv_features)
    for name in ("conv_kernels", "conv_strides", "conv_paddings", "groups", "lrn_after",
                 "pool_after"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"{name} has {len(getattr(self, name))} entries; conv_features has {n}: "
                         "every per-conv setting needs one entry per conv layer")
    if self.num_classes < 0:
      raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 drops the classifier "
                       "head and returns the penultimate features)")
    if not isinstance(self.impl, ops.Implementation):
      raise ValueError(f"impl must be an ops.Implementation (ops.FAST, ops.XLA, ...); got "
                       f"{self.impl!r}")
    if self.weight_init not in INITS:
      raise ValueError(f"weight_init={self.weight_init!r} is not one of {INITS}")
    if self.dropout_placement not in DROPOUT_PLACEMENTS:
      raise ValueError(f"dropout_placement={self.dropout_placement!r} is not one of "
                       f"{DROPOUT_PLACEMENTS}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
    channels = (self.in_channels,) + tuple(self.conv_features)
    for i, g in enumerate(self.groups):
      if channels[i] % g or channels[i + 1] % g:
        raise ValueError(f"conv{i + 1}: groups={g} must divide its input ({channels[i]}) and "
                         f"output ({channels[i + 1]}) channels")
    super().__post_init__()

  # -- shape arithmetic -------------------------------------------------------------------------

  def feature_map_size(self, size: int) -> Optional[int]:
    """Side of the last conv stage's output for an input side ``size``; None if it vanishes."""
    for kernel, stride, padding, pool in zip(self.conv_kernels, self.conv_strides,
                                             self.conv_paddings, self.pool_after):
      size = _conv_out(size, kernel, stride, padding)
      if size < 1:
        return None
      if pool:
        size = _conv_out(size, self.pool_window, self.pool_stride, 0)
        if size < 1:
          return None
    return size

  def eval_chunk(self, shape: tuple) -> Any:
    """Images per chunk of the eval forward's conv stack for NHWC ``shape`` (``impl.chunk``)."""
    k, s, p = self.conv_kernels[0], self.conv_strides[0], self.conv_paddings[0]
    h, w = (_conv_out(side, k, s, p) for side in shape[1:3])
    return self.impl.chunk(shape[0], h * w * self.conv_features[0]
                           * jnp.dtype(self.dtype).itemsize)

  @property
  def min_input_size(self) -> int:
    """Smallest input side this configuration accepts."""
    if self.avgpool_size is None:
      return self.input_size
    size = 1
    while self.feature_map_size(size) is None:
      size += 1
    return size

  @property
  def flatten_hw(self) -> tuple[int, int]:
    """Spatial size of the map that is flattened into fc1."""
    if self.avgpool_size is not None:
      return (self.avgpool_size, self.avgpool_size)
    side = self.feature_map_size(self.input_size)
    if side is None:
      raise ValueError(f"input_size={self.input_size} is too small for this configuration")
    return (side, side)

  def check_input_shape(self, shape: Sequence[int]) -> None:
    """Raises ValueError naming what is expected when ``shape`` cannot go through the model."""
    if len(shape) != 4:
      # A single image is an error rather than a batch of one: an (N, H, W) grey batch without
      # its channel axis has the same rank and would be taken for one image.
      fix = (" For one image, add the batch axis: x[None]." if len(shape) == 3
             and shape[-1] == self.in_channels else "")
      raise ValueError(f"AlexNet expects NHWC input of rank 4 (batch, height, width, channels); "
                       f"got shape {tuple(shape)} of rank {len(shape)}.{fix}")
    _, h, w, c = shape
    if c != self.in_channels:
      raise ValueError(f"AlexNet expects {self.in_channels} input channels (last axis, NHWC); "
                       f"got shape {tuple(shape)} with {c}. Set in_channels, or pass NHWC rather "
                       "than NCHW")
    if self.avgpool_size is None:
      if (h, w) != (self.input_size, self.input_size):
        raise ValueError(f"this configuration has no adaptive pool and needs exactly "
                         f"{self.input_size}x{self.input_size} input; got {h}x{w}")
    elif min(h, w) < self.min_input_size:
      raise ValueError(f"input {h}x{w} is too small: this configuration needs at least "
                       f"{self.min_input_size}x{self.min_input_size}")

  # -- initialisers -----------------------------------------------------------------------------

  def _inits(self, name: str, fan_in: int, is_conv: bool) -> tuple[Initializer, Initializer]:
    if self.weight_init == "torch":
      # PyTorch's reset_parameters: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), same bound
      # for the bias.
      bound = 1.0 / math.sqrt(fan_in)
      return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), _uniform(bound)
    if self.weight_init == "paper":
      bias = nn.initializers.ones if name in _PAPER_BIAS_ONE else nn.initializers.zeros
      return nn.initializers.normal(0.01), bias
    # kaiming (the half-width write-up): convs kaiming_normal(fan_out, relu), dense N(0, 0.01^2),
    # biases 0.
    if is_conv:
      return nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.zeros
    return nn.initializers.normal(0.01), nn.initializers.zeros

  # -- forward ----------------------------------------------------------------------------------

  def __call__(self, x: Array, train: bool = False) -> Array:
    """Logits, or with ``num_classes=0`` the penultimate features (the input of fc3)."""
    return self._forward(x, train, head=True)

  def flat_features(self, x: Array, train: bool = False) -> Array:
    """The flattened conv features, fc1's input: ``model.apply(v, x, method="flat_features")``."""
    return self._forward(x, train, head=False)

  @nn.compact
  def _forward(self, x: Array, train: bool, head: bool) -> Array:
    self.check_input_shape(x.shape)
    x = x.astype(self.dtype)
    # Kept only when asked for, not by init (which makes every collection mutable).
    sown = self.is_mutable_collection("intermediates") and not self.is_initializing()
    activations = {}
    # Activations kept from inside the chunk loop would leak out of its trace.
    whole = train or sown or self.is_initializing()
    x = self._conv_stack(x, whole, activations)
    if self.avgpool_size is not None:
      x = adaptive_avg_pool(x, (self.avgpool_size, self.avgpool_size))
    # Flattened in (H, W, C) order; torch_interop permutes fc1 to and from torch's (C, H, W).
    x = x.reshape((x.shape[0], -1))
    if head:
      x = self._head(x, train, activations)
    if sown:
      self.sow("intermediates", "activations", activations, reduce_fn=lambda _, new: new)
    return x

  def _conv_layers(self, batch: int) -> list[nn.Conv]:
    conv = self.impl.conv(batch)
    channels = (self.in_channels,) + tuple(self.conv_features)
    layers = []
    for i, features in enumerate(self.conv_features):
      name = f"conv{i + 1}"
      k, p, g = self.conv_kernels[i], self.conv_paddings[i], self.groups[i]
      kernel_init, bias_init = self._inits(name, channels[i] // g * k * k, is_conv=True)
      layers.append(nn.Conv(features, (k, k), strides=self.conv_strides[i],
                            padding=((p, p), (p, p)), feature_group_count=g,
                            kernel_init=kernel_init, bias_init=bias_init,
                            conv_general_dilated=conv, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name))
    return layers

  def _conv_stack(self, x: Array, whole: bool, activations: dict) -> Array:
    """Convs, LRN and pools, in eval chunks of the batch unless ``whole``."""
    convs = self._conv_layers(x.shape[0])

    def stack(apply_conv, x):
      pools = 0
      for i, layer in enumerate(convs):
        x = nn.relu(apply_conv(layer, x))
        if self.lrn_after[i]:
          x = local_response_norm(x, self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k)
        activations[layer.name] = x
        if self.pool_after[i]:
          x = self.impl.max_pool(x, self.pool_window, self.pool_stride)
          pools += 1
          activations[f"pool{pools}"] = x
      return x

    chunk = x.shape[0] if whole else self.eval_chunk(x.shape)
    if chunk == x.shape[0]:
      return stack(lambda layer, x: layer(x), x)
    # The stack as a function of its params, which the implementation may transform.
    params = {layer.name: self.variables["params"][layer.name] for layer in convs}
    pure = lambda p, x: stack(lambda layer, x: layer.clone(parent=None).apply(
        {"params": p[layer.name]}, x), x)
    return self.impl.eval_conv_stack(pure, params, x, chunk)

  def _head(self, x: Array, train: bool, activations: dict) -> Array:
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    widths = (self.hidden_width, self.hidden_width) + ((self.num_classes,) if self.num_classes
                                                       else ())
    for i, width in enumerate(widths):
      name = f"fc{i + 1}"
      hidden = i < 2  # fc1 and fc2
      if hidden and self.dropout_placement == "before_hidden":
        x = dropout(x)
      kernel_init, bias_init = self._inits(name, x.shape[-1], is_conv=False)
      x = nn.Dense(width, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, dot_general=self.impl.dot_general(),
                   name=name)(x)
      if hidden:
        x = nn.relu(x)
        activations[name] = x
        if self.dropout_placement == "after_hidden":
          x = dropout(x)
    return x


# The named variants, as data. docs/variants.md says where each comes from.
VARIANT_SETTINGS: Mapping[str, Mapping[str, Any]] = {
    # torchvision / "One weird trick".
    "alexnet": {},
    # The 2012 paper, single tower: 96-256-384-384-256, LRN after conv1 and conv2, fixed 224.
    "alexnet_paper": dict(
        conv_features=(96, 256, 384, 384, 256),
        lrn_after=(True, True, False, False, False),
        avgpool_size=None,
        weight_init="paper",
    ),
    # The paper's two-GPU split expressed as grouped convolutions in conv2, conv4 and conv5.
    "alexnet_paper_grouped": dict(
        conv_features=(96, 256, 384, 384, 256),
        lrn_after=(True, True, False, False, False),
        groups=(1, 2, 1, 2, 2),
        avgpool_size=None,
        weight_init="paper",
    ),
    # The half-width write-up: fixed 224, kaiming init.
    "alexnet_half": dict(
        conv_features=(48, 128, 192, 192, 128),
        avgpool_size=None,
        hidden_width=2048,
        weight_init="kaiming",
    ),
    # The small write-up: 28x28 grey images, 10 classes.
    "alexnet_small": dict(
        num_classes=10,
        in_channels=1,
        conv_features=(96, 256, 384, 384, 256),
        conv_kernels=(5, 5, 3, 3, 3),
        conv_strides=(1, 1, 1, 1, 1),
        conv_paddings=(0, 2, 1, 1, 1),
        pool_window=2,
        avgpool_size=None,
        input_size=28,
        hidden_width=1024,
        dropout_placement="after_hidden",
    ),
}

VARIANTS: tuple[str, ...] = tuple(VARIANT_SETTINGS)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")  # compute dtypes a config may name

SETTINGS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AlexNet) if f.name not in ("parent", "name", "impl"))


def variant_settings(name: str, **overrides: Any) -> dict[str, Any]:
  """The field values of variant ``name`` with ``overrides`` applied (validated)."""
  if name not in VARIANT_SETTINGS:
    raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
  unknown = sorted(set(overrides) - set(SETTINGS))
  if unknown:
    raise ValueError(f"unknown setting(s) {unknown}; valid settings: {', '.join(SETTINGS)}")
  return {**VARIANT_SETTINGS[name], **overrides}


def create_model(name: str, *, impl: ops.Implementation = ops.FAST, **overrides: Any) -> AlexNet:
  """Builds variant ``name``; keyword overrides replace any of its settings.

  Example: the 2048-wide classifier on a 256x4x4 flatten is
  ``create_model('alexnet', avgpool_size=4, hidden_width=2048)``; its feature extractor is
  ``create_model('alexnet', num_classes=0)``; XLA's own ops instead of the faster CPU ones:
  ``create_model('alexnet', impl=ops.XLA)``.
  """
  return AlexNet(**variant_settings(name, **overrides), impl=impl)


def init_params(model: AlexNet, rng: Array, input_shape: Optional[Sequence[int]] = None) -> Any:
  """Initialises ``model``'s parameters; ``input_shape`` defaults to one nominal-size image."""
  if input_shape is None:
    input_shape = (1, model.input_size, model.input_size, model.in_channels)
  model.check_input_shape(input_shape)
  # Under jit, init runs as one compiled program instead of dispatching op by op.
  variables = jax.jit(model.init)(rng, jnp.zeros(input_shape, model.dtype))
  return variables["params"]


def param_shapes(model: AlexNet) -> Any:
  """The model's parameter tree as ShapeDtypeStructs (traced, nothing allocated)."""
  shape = (1, model.input_size, model.input_size, model.in_channels)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, "float32"))
  return variables["params"]


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
