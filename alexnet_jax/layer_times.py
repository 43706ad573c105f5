"""Where a train step's time goes: each block of the model alone, forward and backward, in JAX
and beside it, on the same activations, in PyTorch (``python -m alexnet_jax.bench train
--layers``).

A block is a conv with its ReLU, LRN and max pool; or the classifier (adaptive pool, flatten,
fc1-fc3 with their ReLUs and dropout) with the loss; or the optimizer's update. JAX runs each
block as the model computes it: an ``AlexNet`` of that one layer (or of the classifier alone), so
the same ``ops.Implementation`` choices for the same shapes, jitted with ``ops.compiler_options``.
"Step" is the block's forward and its backward (the parameter gradients, and the input gradient
but for the first conv), as a train step runs them. The blocks' sum against the whole step shows
what the step's fusion gains or loses.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from alexnet_jax import ops
from alexnet_jax.models import AlexNet
from alexnet_jax.torch_reference import TorchAlexNet, nchw

# Times each no-argument callable (which blocks until done) in alternating rounds: images/s per
# round, by name.
Timer = Callable[[dict[str, Callable[[], Any]]], dict[str, list[float]]]
TORCH = "torch_channels_last"  # PyTorch eager's faster layout on the CPUs measured


@dataclasses.dataclass
class BlockTime:
  """Median milliseconds of one block, by runner ("jax", ``TORCH``)."""
  name: str
  output_shape: tuple[int, ...]  # NHWC
  forward_ms: dict[str, float]
  step_ms: dict[str, float]  # forward and backward; for the update, the update (no forward)


def _one_conv(model: AlexNet, i: int, side: int) -> AlexNet:
  pick = lambda field: (getattr(model, field)[i],)
  return model.clone(
      in_channels=((model.in_channels,) + tuple(model.conv_features))[i],
      conv_features=pick("conv_features"), conv_kernels=pick("conv_kernels"),
      conv_strides=pick("conv_strides"), conv_paddings=pick("conv_paddings"),
      groups=pick("groups"), lrn_after=pick("lrn_after"), pool_after=pick("pool_after"),
      avgpool_size=None, input_size=side, num_classes=0)


def _classifier(model: AlexNet, side: int) -> AlexNet:
  return model.clone(in_channels=model.conv_features[-1], conv_features=(), conv_kernels=(),
                     conv_strides=(), conv_paddings=(), groups=(), lrn_after=(), pool_after=(),
                     input_size=side)


def _jax_block(block: AlexNet, last: bool, first: bool, labels: jax.Array
               ) -> tuple[Callable, Callable]:
  """The block's train-mode forward and its forward-and-backward, jitted as the step is."""
  jit = lambda f: jax.jit(f, compiler_options=ops.compiler_options())
  key = jax.random.key(0)

  def forward(p, x):
    y = block.apply({"params": p}, x, train=True, rngs={"dropout": key},
                    method=None if last else "flat_features")
    return optax.softmax_cross_entropy_with_integer_labels(y, labels).mean() if last else y

  def step(p, x, cotangent):
    # No gradient for the images; the cotangent in the block's compute dtype (bf16 runs).
    y, pullback = jax.vjp(lambda p: forward(p, x), p) if first else jax.vjp(forward, p, x)
    return pullback(cotangent.astype(y.dtype))

  return jit(forward), jit(step)


def _torch_block(modules: Sequence[torch.nn.Module], x: torch.Tensor, cotangent: torch.Tensor,
                 labels: torch.Tensor, last: bool, autocast: Callable, sync: Callable
                 ) -> tuple[Callable, Callable]:
  net = torch.nn.Sequential(*copy.deepcopy(list(modules))).to(
      x.device, memory_format=torch.channels_last).train()

  def forward():
    with autocast():
      y = net(x)
      out = torch.nn.functional.cross_entropy(y, labels) if last else y
    sync()
    return out

  def step():
    net.zero_grad(set_to_none=True)
    x.grad = None
    forward().backward(cotangent)
    sync()

  return forward, step


def block_times(model: AlexNet, params: Any, net: TorchAlexNet | None,
                tx: optax.GradientTransformation, torch_sgd: Callable[[Any], Any] | None,
                batch: int, timer: Timer, dtype: str = "float32", device: str = "cpu",
                seed: int = 0) -> list[BlockTime]:
  """Each block's median forward and step time at ``batch``, JAX beside PyTorch channels_last
  (on ``device``; none where ``net`` is None), then the optimizer's update over all parameters
  (``tx`` against ``torch_sgd(parameters)``)."""
  rng = np.random.default_rng(seed)
  side = model.input_size
  x = rng.standard_normal((batch, side, side, model.in_channels), np.float32)
  labels = rng.integers(0, model.num_classes, batch).astype(np.int32)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=dtype == "bfloat16")
  torch_blocks = net.blocks() if net is not None else None
  channels_last = lambda a: nchw(a).to(device).contiguous(memory_format=torch.channels_last)
  labels_t = torch.from_numpy(labels.astype(np.int64)).to(device)
  params = jax.device_put(params)
  ms = lambda ips: {name: 1e3 * batch / statistics.median(v) for name, v in ips.items()}
  times = []
  for i in range(len(model.conv_features) + 1):
    last = i == len(model.conv_features)
    if last:
      block, name = _classifier(model, x.shape[1]), "classifier+loss"
      block_params = {k: v for k, v in params.items() if k.startswith("fc")}
    else:
      block, name = _one_conv(model, i, x.shape[1]), f"conv{i + 1}"
      block_params = {"conv1": params[f"conv{i + 1}"]}
    forward, step = _jax_block(block, last, i == 0, jnp.asarray(labels))
    y = forward(block_params, x)
    if not last:
      side = block.feature_map_size(x.shape[1])
      y = np.asarray(y).reshape(batch, side, side, model.conv_features[i])
    cotangent = np.float32(1.0) if last else rng.standard_normal(y.shape, np.float32)
    on_device = jax.device_put((x, cotangent if last else cotangent.reshape(batch, -1)))
    fns = {"jax": lambda f=forward, p=block_params, a=on_device: jax.block_until_ready(
        f(p, a[0]))}
    steps = {"jax": lambda f=step, p=block_params, a=on_device: jax.block_until_ready(
        f(p, *a))}
    if torch_blocks is not None:
      xt = channels_last(x).requires_grad_(i > 0)
      fns[TORCH], steps[TORCH] = _torch_block(
          torch_blocks[i], xt,
          torch.tensor(cotangent, device=device) if last else channels_last(cotangent),
          labels_t, last, autocast, sync)
    times.append(BlockTime(name, tuple(np.shape(y)) if not last else (),
                           ms(timer(fns)), ms(timer(steps))))
    x = y if not last else x
  times.append(_update_time(params, net, tx, torch_sgd, timer, ms, device, sync))
  return times


def _update_time(params: Any, net: TorchAlexNet | None, tx: optax.GradientTransformation,
                 torch_sgd: Callable[[Any], Any] | None, timer: Timer, ms: Callable,
                 device: str, sync: Callable) -> BlockTime:
  """The optimizer's update over every parameter, in place where the step updates in place."""
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), params)
  update = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)), donate_argnums=(0, 1), compiler_options=ops.compiler_options())
  holder = {"state": (jax.tree_util.tree_map(jnp.array, params), tx.init(params))}

  def jax_update():
    holder["state"] = update(*holder["state"], grads)
    jax.block_until_ready(holder["state"])

  runners = {"jax": jax_update}
  if net is not None:
    module = copy.deepcopy(net).to(device)
    for p in module.parameters():
      p.grad = torch.full_like(p, 1e-3)
    opt = torch_sgd(module.parameters())

    def torch_update():
      opt.step()
      sync()
    runners[TORCH] = torch_update
  return BlockTime("SGD update", (), {}, ms(timer(runners)))
