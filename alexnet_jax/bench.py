"""Benchmarks: ``python -m alexnet_jax.bench {train,data,feed}``.

``train`` times the library's own train step (``training.make_steps``, with the library's
defaults: ``ops.compiler_options``, no XLA_FLAGS) and the jitted forward (eval mode, which on CPU
runs the conv stack a few images at a time: ``ops.Implementation.eval_chunk``) against the
same model and optimizer in PyTorch eager on the same device (NCHW and channels_last; the ratios
are against the faster) and ``torch.compile``, in one process, on the same batch, fp32 or bf16,
for one or more batch sizes; with model FLOP/s and MFU. They are timed in
alternating rounds after a warm-up, so that a background load or thermal
drift hits all alike; the figure is the median round. Not all noise does hit alike
(docs/performance.md), so each round's figure is reported too. It also reports compile times, XLA's
memory and FLOP counts (model FLOPs: those of direct convolutions, whatever algorithm runs), and the
machine's measured matmul rate.

``data`` writes JPEGs of ImageNet's typical size (500x375) to a temporary folder, cut from real
photos (or synthetic), prepares stores from them at 256 (``python -m alexnet_jax.prepare``:
``paper`` and ``shorter``) and measures, in alternating rounds, the loader end to end on every
core (``paper`` from the paper store, ``torchvision`` and ``center_crop`` from the shorter one)
against the bare decode of the same store's files by the same decoder on the same threads; then
every preset on the original files, per core. ``--threads`` and ``--workers`` set the loader's
threads and Grain worker processes.

``feed`` runs the training loop (``train_and_evaluate``) of a config file fed by the loader from a
store of photo-cut JPEGs it prepares, and the same loop on one batch kept on the devices; it
prints both, their ratio, and each stage alone (loader, host-to-device copy, step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from alexnet_jax import extras
from alexnet_jax.models import DTYPES, VARIANTS


def _rounds_ips(fns: dict[str, Callable[[], Any]], batch: int, rounds: int, iters: int,
                warmup: int) -> dict[str, list[float]]:
  """Images/s of each no-argument callable (which must block until done) in each of the
  alternating rounds."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  per_round = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(iters):
        fn()
      per_round[name].append(batch * iters / (time.perf_counter() - start))
  return per_round


# Dense peaks from the vendors' datasheets, TFLOP/s, by a substring of JAX's ``device_kind``
# (first match wins). fp32 on NVIDIA GPUs is TF32's peak: JAX's default precision runs fp32
# matmuls and convolutions as TF32 there.
DATASHEET_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v6", {"bfloat16": 918.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),
    ("TPU v4", {"bfloat16": 275.0}),
)


def datasheet_tflops(device_kind: str, dtype: str) -> float | None:
  """The datasheet's dense peak for ``device_kind`` in ``dtype``, if this table knows it."""
  for name, peaks in DATASHEET_TFLOPS:
    if name in device_kind:
      return peaks.get(dtype)
  return None


def matmul_tflops(dtype: str = "float32", size: int | None = None, repeats: int = 5) -> float:
  """The default device's square matmul rate under XLA, TFLOP/s: the measured ceiling for conv
  and dense layers (size 2048 on CPU, 8192 on accelerators)."""
  import jax
  import jax.numpy as jnp

  from alexnet_jax import ops

  size = size or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((size, size), dtype)
  mm = jax.jit(lambda a: a @ a, compiler_options=ops.compiler_options())
  mm(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    mm(a).block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def _peak_rss_mb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_model() -> str:
  """The CPU's model name as the OS reports it (``/proc/cpuinfo`` on Linux)."""
  import platform
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """What the figures were measured on."""
  import jax
  device = jax.devices()[0]
  return {"jax_backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu_model": cpu_model(), "cores": _cores(),
          "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def torch_device() -> str | None:
  """Where PyTorch runs beside JAX: the same kind of device, or None where PyTorch has none
  (a TPU)."""
  import jax
  import torch
  backend = jax.default_backend()
  if backend == "cpu":
    return "cpu"
  return "cuda" if backend == "gpu" and torch.cuda.is_available() else None


def _recipe(seed: int) -> Any:
  """torchvision's optimizer (``optim.TORCHVISION_RECIPE``, as configs/imagenet_torchvision.py);
  a step reads no other field."""
  from alexnet_jax import optim
  return types.SimpleNamespace(**optim.TORCHVISION_RECIPE, seed=seed)


def model_flops(model: Any, tx: Any, state: Any, batch: int) -> tuple[float, float]:
  """Model FLOPs per image of a train step and of a forward: XLA's count for ``model`` with
  direct convolutions on the whole batch, lowered for the CPU whatever the device. Winograd's (on
  CPU) execute fewer, XLA counts a loop's body (the CPU eval forward's chunks) once, and XLA:GPU's
  count of a compiled step leaves out the convolutions it hands to cuDNN."""
  import jax
  from jax.sharding import SingleDeviceSharding

  from alexnet_jax import training

  cpu = jax.devices("cpu")[:1]
  direct = model.clone(impl=dataclasses.replace(model.impl, winograd=False, eval_chunk=0))
  shapes = lambda tree: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
  side = model.input_size
  data = {"image": jax.ShapeDtypeStruct((batch, side, side, model.in_channels), np.float32),
          "label": jax.ShapeDtypeStruct((batch,), np.int32)}
  train = training.make_steps("jit", direct, tx, devices=cpu).train.lower(shapes(state), data)
  on_cpu = SingleDeviceSharding(cpu[0])
  forward = jax.jit(lambda p, x: direct.apply({"params": p}, x), in_shardings=on_cpu,
                    out_shardings=on_cpu).lower(shapes(state.params), data["image"])
  return (train.cost_analysis()["flops"] / batch, forward.cost_analysis()["flops"] / batch)


@dataclasses.dataclass
class _Timed:
  """The callables one framework is timed with (each blocks until its work is done), by runner
  name: "jax", or PyTorch's "torch" (NCHW), "torch_channels_last" and "torch_compile"."""
  train: dict[str, Callable[[], Any]]
  forward: dict[str, Callable[[], Any]]
  compile_s: dict[str, float]
  compile_error: str | None = None  # why torch.compile is not among them


def _jax_side(model: Any, tx: Any, state: Any, x: np.ndarray, y: np.ndarray
              ) -> tuple[_Timed, Any]:
  """The library's train step (``training.make_steps("jit")`` on one device) and jitted
  forward, compiled for this batch; and the compiled step."""
  import jax

  from alexnet_jax import ops, training

  steps = training.make_steps("jit", model, tx, devices=jax.devices()[:1])
  batch = jax.tree_util.tree_map(steps.put, {"image": x, "label": y})
  holder = {"state": training.place_state(state, steps)}
  start = time.perf_counter()
  compiled = steps.train.lower(holder["state"], batch).compile()
  compile_s = time.perf_counter() - start
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x),
                    compiler_options=ops.compiler_options())

  def train():
    holder["state"], metrics = compiled(holder["state"], batch)
    metrics["train_loss"].block_until_ready()

  return _Timed(
      train={"jax": train},
      forward={"jax": lambda: forward(holder["state"].params, batch["image"]).block_until_ready()},
      compile_s={"jax": compile_s}), compiled


def _step_footprint(compiled: Any, batch: int) -> tuple[float, float | None]:
  """XLA's FLOPs per image of the compiled step, and its memory in MiB where XLA says."""
  executed = (compiled.cost_analysis() or {}).get("flops", 0.0) / batch / 1e9
  memory = compiled.memory_analysis()
  if memory is None:
    return executed, None
  return executed, (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**20


def _torch_sgd(recipe: Any) -> Callable[[Any], Any]:
  """``torch.optim.SGD`` with the recipe's settings, for the given parameters."""
  import torch
  return lambda params: torch.optim.SGD(params, lr=recipe.learning_rate,
                                        momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _torch_side(net: Any, x: np.ndarray, y: np.ndarray, dtype: str, device: str, recipe: Any,
                torch_compile: bool) -> _Timed:
  """The same model and optimizer in PyTorch on ``device``: eager NCHW and channels_last, and
  (where it works) ``torch.compile``; bf16 by autocast, as JAX keeps fp32 params."""
  import torch

  from alexnet_jax.torch_reference import nchw

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=dtype == "bfloat16")
  xt = nchw(x).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  layouts = {"torch": (copy.deepcopy(net).to(device), xt), "torch_channels_last": (
      copy.deepcopy(net).to(device, memory_format=torch.channels_last),
      xt.contiguous(memory_format=torch.channels_last))}

  def step_of(module, inputs):
    opt = _torch_sgd(recipe)(module.parameters())

    def step():
      module.train()
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = torch.nn.functional.cross_entropy(module(inputs), yt)
      loss.backward()
      opt.step()
      sync()
    return step

  def forward_of(module, inputs):
    def forward():
      module.eval()
      with torch.inference_mode(), autocast():
        module(inputs)
      sync()
    return forward

  timed = _Timed(train={k: step_of(*v) for k, v in layouts.items()},
                 forward={k: forward_of(*v) for k, v in layouts.items()}, compile_s={})
  if torch_compile:
    module, inputs = layouts["torch_channels_last" if device == "cuda" else "torch"]
    try:
      step = step_of(torch.compile(copy.deepcopy(module)), inputs)
      start = time.perf_counter()
      step()
      timed.compile_s["torch_compile"] = time.perf_counter() - start
      timed.train["torch_compile"] = step
    except Exception as e:  # noqa: BLE001  (no C++ toolchain, unsupported platform, ...)
      timed.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return timed


@dataclasses.dataclass
class Speed:
  """Images/s of one kind of work, the train step or the eval forward, by runner (``_Timed``)."""
  ips: dict[str, float]  # the median round
  rounds: dict[str, list[float]]  # a shared VM's noise shows as spread (docs/performance.md)
  anchor: str | None  # PyTorch eager's faster layout, which ``ratio`` is against
  ratio: float | None  # jax / anchor

  @classmethod
  def of(cls, rounds: dict[str, list[float]]) -> "Speed":
    ips = {name: statistics.median(v) for name, v in rounds.items()}
    eager = [k for k in ("torch", "torch_channels_last") if k in ips]
    anchor = max(eager, key=ips.get) if eager else None
    return cls(ips, rounds, anchor, ips["jax"] / ips[anchor] if anchor else None)


@dataclasses.dataclass
class Flops:
  """Model FLOPs per image (direct convolutions, ``model_flops``) and the rates they give."""
  train_gflop_per_image: float
  fwd_gflop_per_image: float
  executed_train_gflop_per_image: float  # XLA's count of the compiled step
  train_tflops: float
  fwd_tflops: float
  mfu_measured_peak: float
  mfu_datasheet_peak: float | None

  @classmethod
  def of(cls, model: tuple[float, float], executed: float, train: Speed, forward: Speed,
         peak: float, datasheet: float | None) -> "Flops":
    train_flops, fwd_flops = model
    train_tflops = train_flops * train.ips["jax"] / 1e12
    return cls(train_flops / 1e9, fwd_flops / 1e9, executed, train_tflops,
               fwd_flops * forward.ips["jax"] / 1e12, train_tflops / peak,
               train_tflops / datasheet if datasheet else None)


@dataclasses.dataclass
class BatchFigures:
  """Everything ``bench train`` measured at one batch size."""
  batch: int
  train: Speed
  forward: Speed
  flops: Flops
  compile_s: dict[str, float]  # by runner
  torch_compile_error: str | None
  eval_chunk: int  # images per chunk of the eval forward's conv stack
  xla_train_step_memory_mb: float | None  # arguments + outputs + temporaries
  peak_rss_mb: float
  layers: list[Any] | None = None  # layer_times.BlockTime per block, with --layers
  # With --ops: the slowest ops of the compiled train step (op_profile.OpTime), and every op's
  # time summed by layer.
  ops: list[Any] | None = None
  op_layers: dict[str, float] | None = None


@dataclasses.dataclass
class TrainBench:
  """``bench train``'s result: the setting, the machine, and one ``BatchFigures`` per batch."""
  variant: str
  dtype: str
  winograd: bool
  compiler_options: dict[str, Any]
  machine: dict[str, Any]
  torch: dict[str, Any] | None  # version, device, threads; None when not run
  torch_not_run: str | None
  matmul_tflops: float  # the measured peak, a large matmul in ``dtype``
  datasheet_tflops: float | None
  batches: list[BatchFigures]


def _measure(sides: Sequence[_Timed], batch: int, rounds: int, iters: int, warmup: int
             ) -> tuple[Speed, Speed]:
  """Train step and forward speed of every runner, in alternating rounds."""
  runners = lambda kind: {k: v for side in sides for k, v in getattr(side, kind).items()}
  return (Speed.of(_rounds_ips(runners("train"), batch, rounds, iters, warmup)),
          Speed.of(_rounds_ips(runners("forward"), batch, rounds, iters, warmup)))


def _profile_ops(figures: BatchFigures, jax_side: _Timed, compiled: Any, params: Any,
                 count: int) -> None:
  """The ``count`` slowest ops of the compiled train step, and all ops' time by layer."""
  from alexnet_jax import op_profile
  times = op_profile.op_times(jax_side.train["jax"], compiled.as_text(), layers=tuple(params))
  figures.ops, figures.op_layers = times[:count], op_profile.layer_totals(times)


def _torch_net(variant: str, seed: int) -> tuple[Any, Any, dict[str, Any]]:
  """PyTorch's model with its default init, the same weights as Flax params, and what runs
  it."""
  import torch

  from alexnet_jax.torch_interop import params_from_torch
  from alexnet_jax.torch_reference import torch_model

  torch.manual_seed(seed)
  net = torch_model(variant)
  about = {"version": torch.__version__, "threads": torch.get_num_threads()}
  return net, params_from_torch(net.state_dict(), variant), about


def bench_train(variant: str, batches: Sequence[int] = (64,), dtype: str = "float32",
                rounds: int = 5, iters: int = 3, warmup: int = 2, seed: int = 0,
                torch_compile: bool = True, winograd: bool = True, use_torch: bool = True,
                layers: bool = False, profile_ops: int = 0) -> TrainBench:
  """Train-step and forward images/s of the library's step (``training.make_steps("jit")``, one
  device) against the same model and SGD settings in PyTorch, per batch size, in alternating
  rounds (median kept); model FLOP/s and MFU against the measured and datasheet peaks.
  ``winograd=False`` times XLA's direct convolutions; ``layers`` adds each block's time
  (``layer_times``), ``profile_ops`` that many of the slowest ops of XLA's profile of the step
  (``op_profile``)."""
  import jax

  from alexnet_jax import ops, optim, training
  from alexnet_jax.models import create_model

  info = machine()
  device = torch_device() if use_torch else None
  model = create_model(variant, dtype=training.DTYPES[dtype],
                       impl=dataclasses.replace(ops.FAST, winograd=winograd))
  recipe = _recipe(seed)
  # ImageNet's length at batch 256: 5,005 steps an epoch, 90 epochs.
  tx = optim.create_optimizer(recipe, steps_per_epoch=5005, num_train_steps=90 * 5005)
  net, params, about = _torch_net(variant, seed) if device else (None, None, None)
  # On the host: each batch's step gets its own copy on the device, which it donates.
  state = jax.device_get(training.create_train_state(recipe, model, tx, params))
  peak, datasheet = matmul_tflops(dtype), datasheet_tflops(info["device_kind"], dtype)
  result = TrainBench(
      variant, dtype, winograd, ops.compiler_options(), info,
      torch=about and {**about, "device": device},
      torch_not_run=None if device else ("not asked for" if not use_torch else
                                         f"PyTorch has no {info['jax_backend']} device"),
      matmul_tflops=peak, datasheet_tflops=datasheet, batches=[])
  rng = np.random.default_rng(seed)
  for batch in batches:
    x = rng.standard_normal((batch, *[model.input_size] * 2, model.in_channels), np.float32)
    y = rng.integers(0, model.num_classes, batch).astype(np.int32)
    jax_side, compiled = _jax_side(model, tx, state, x, y)
    sides = [jax_side] + ([_torch_side(net, x, y, dtype, device, recipe, torch_compile)]
                          if device else [])
    train, forward = _measure(sides, batch, rounds, iters, warmup)
    executed, memory = _step_footprint(compiled, batch)
    result.batches.append(BatchFigures(
        batch, train, forward,
        Flops.of(model_flops(model, tx, state, batch), executed, train, forward, peak, datasheet),
        compile_s={k: v for side in sides for k, v in side.compile_s.items()},
        torch_compile_error=next((s.compile_error for s in sides if s.compile_error), None),
        eval_chunk=model.eval_chunk(x.shape),
        xla_train_step_memory_mb=memory, peak_rss_mb=_peak_rss_mb()))
    if profile_ops:
      _profile_ops(result.batches[-1], jax_side, compiled, state.params, profile_ops)
    del sides, compiled
    jax.clear_caches()
    if layers:
      from alexnet_jax import layer_times  # imports PyTorch
      timer = lambda fns: _rounds_ips(fns, batch, rounds, iters, warmup)
      result.batches[-1].layers = layer_times.block_times(
          model, state.params, net, tx, _torch_sgd(recipe) if device else None, batch, timer,
          dtype, device or "cpu", seed)
      jax.clear_caches()
  return result


def write_jpegs(folder: str, count: int, size: tuple[int, int] = (500, 375),
                classes: int = 10, seed: int = 0) -> None:
  """``count`` JPEGs in ``folder/train/<class>/``, smooth like photos (so they compress alike)."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  width, height = size
  for i in range(count):
    coarse = rng.integers(0, 256, (height // 25, width // 25, 3), np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    fine = np.asarray(image, np.int16) + rng.integers(-12, 12, (height, width, 3))
    _save_jpeg(folder, i, classes, Image.fromarray(np.clip(fine, 0, 255).astype(np.uint8)))


def write_photo_jpegs(folder: str, count: int, size: tuple[int, int] = (500, 375),
                      classes: int = 10, seed: int = 0) -> None:
  """``count`` JPEGs cut from scikit-learn's two sample photos at random places and scales,
  resized to ``size`` (every fourth one portrait), as photos in ImageNet are."""
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  width, height = size
  for i in range(count):
    photo = photos[i % len(photos)]
    out = (height, width) if i % 4 == 3 else (width, height)
    # A window of the output's aspect at a random place, from the largest that fits down to the
    # output's own size (or 0.85 of the largest for portraits of these landscape photos): the
    # photo's own detail, not an upsampled blur, which would decode unrealistically fast.
    fit = min(photo.shape[1] / out[0], photo.shape[0] / out[1])
    fit *= rng.uniform(min(1.0, 1.0 / fit) if fit > 1 else 0.85, 1.0)
    w, h = int(out[0] * fit), int(out[1] * fit)
    top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
    cut = Image.fromarray(photo[top:top + h, left:left + w]).resize(out, Image.BICUBIC)
    _save_jpeg(folder, i, classes, cut)


def _save_jpeg(folder: str, i: int, classes: int, image: Any) -> None:
  d = os.path.join(folder, "train", f"class{i % classes:03d}")
  os.makedirs(d, exist_ok=True)
  image.save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


FILE_KINDS = {"photos": write_photo_jpegs, "synthetic": write_jpegs}


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _bare_decode(source: Any, batch: int, threads: int) -> Iterator[Any]:
  """The limit: read and decode each whole image, nothing else, on ``threads`` threads."""
  import concurrent.futures

  from alexnet_jax.data import host

  def read_and_decode(i):
    return host.decode(source[i % len(source)][0], 3).shape

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    start = 0
    while True:
      yield list(pool.map(read_and_decode, range(start, start + batch)))
      start += batch


def _loader(source: Any, batch: int, threads: int, workers: int, train_preset: str = "paper",
            eval_preset: str | None = None) -> Callable[[], Iterator[Any]]:
  """A function that starts the loader of one preset afresh over ``source``."""
  from alexnet_jax.data import host, loader

  if eval_preset is None:
    pre = host.Preprocess(train_preset=train_preset)
    return lambda: loader.TrainLoader(source, pre, batch, threads=threads, workers=workers)
  pre = host.Preprocess(eval_preset=eval_preset)

  def batches():
    while True:  # eval reads the source once: start again at its end
      yield from loader.eval_batches(source, pre, batch, threads=threads, workers=workers)
  return batches


def _alternate(pipelines: dict[str, Callable[[], Iterator[Any]]], batch: int, steps: int,
               rounds: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
  """Images/s of each pipeline in each of the alternating rounds, and the bytes per image of
  its batches. Each runs alone: started afresh for its turn and stopped after, so that no
  other prefetches beside it."""
  per_round = {name: [] for name in pipelines}
  sent = {}
  for _ in range(rounds):
    for name, start in pipelines.items():
      it = start()
      for _ in range(warmup):
        last = next(it)
      begin = time.perf_counter()
      for _ in range(steps):
        next(it)
      per_round[name].append(batch * steps / (time.perf_counter() - begin))
      if isinstance(last, dict):
        sent[name] = sum(v.nbytes for v in last.values()) / batch
      del it  # stops its background reads before the next pipeline's turn
  return per_round, sent


# What the stores section measures: each preset from the store it is meant for.
STORE_PRESETS = {"paper": ("paper", "paper", None), "torchvision": ("shorter", "torchvision", None),
                 "center_crop": ("shorter", "paper", "center_crop")}


def _bench_stores(folder: str, batch: int, steps: int, rounds: int, warmup: int, threads: int,
                  workers: int) -> dict[str, Any]:
  """The loader end to end on every core, from stores prepared from ``folder``, against the
  bare decode of each store's files."""
  from alexnet_jax.data import prepare, sources

  stores = {}
  for mode in ("paper", "shorter"):
    out = os.path.join(folder, f"store-{mode}")
    prepare.prepare(f"folder:{os.path.join(folder, 'files')}", out, mode=mode, size=256,
                    splits=["train"])
    stores[mode] = sources.PreparedSource(out, "train")
  pipelines = {f"decode:{mode}": (lambda s=s: _bare_decode(s, batch, threads))
               for mode, s in stores.items()}
  for name, (mode, train, evaluate) in STORE_PRESETS.items():
    pipelines[name] = _loader(stores[mode], batch, threads, workers, train, evaluate)
  per_round, _ = _alternate(pipelines, batch, steps, rounds, warmup)
  cores = _cores()
  decode = {mode: statistics.median(per_round[f"decode:{mode}"]) for mode in stores}
  loader = {}
  for name, (mode, _, _) in STORE_PRESETS.items():
    total = statistics.median(per_round[name])
    loader[name] = {"store": mode, "ips_total": total, "ips_per_core": total / cores,
                    "ratio_to_decode": total / decode[mode], "rounds_ips_total": per_round[name]}
  return {
      "decode_ips_total": decode["paper"],
      "stores": {mode: {"decode_ips_total": decode[mode],
                        "mean_jpeg_kb": sum(os.path.getsize(p) for p in s.paths) / len(s) / 1024}
                 for mode, s in stores.items()},
      "loader": loader}


def _bench_files(folder: str, batch: int, steps: int, rounds: int, warmup: int, threads: int,
                 workers: int) -> dict[str, Any]:
  """Every preset on the original files, per core, against their bare decode."""
  from alexnet_jax.data import host, sources

  source = sources.FolderSource(os.path.join(folder, "files"), "train")
  pipelines = {"decode": lambda: _bare_decode(source, batch, threads)}
  pipelines.update({p: _loader(source, batch, threads, workers, p) for p in host.TRAIN_PRESETS})
  pipelines.update({p: _loader(source, batch, threads, workers, eval_preset=p)
                    for p in host.EVAL_PRESETS if p != "small"})
  per_round, sent = _alternate(pipelines, batch, steps, rounds, warmup)
  cores = _cores()
  per_core = {name: [x / cores for x in v] for name, v in per_round.items()}
  decode = statistics.median(per_core.pop("decode"))
  return {"mean_jpeg_kb": sum(os.path.getsize(f) for f in source.files) / len(source) / 1024,
          "decode_ips_per_core": decode,
          "presets": {name: {"ips_per_core": statistics.median(v),
                             "ratio_to_decode": statistics.median(v) / decode,
                             "rounds_ips_per_core": v,
                             "host_to_device_bytes_per_image": sent[name]}
                      for name, v in per_core.items()}}


def bench_data(batch: int = 128, steps: int = 8, rounds: int = 3, images: int = 1024,
               kinds: Sequence[str] = ("photos",), warmup: int = 2, threads: int = 0,
               workers: int = 0, stores: bool = True) -> dict[str, Any]:
  """The input pipeline's images/s. ``stores``: the loader end to end from stores prepared at
  256 (``paper`` from a paper store, ``torchvision`` and ``center_crop`` from a shorter one)
  against the bare decode of the same files, all in total over every core; then every preset
  on the original 500x375 files of each kind, per core. Alternating rounds, median kept."""
  threads = threads or _cores()
  result: dict[str, Any] = {"cores": _cores(), "batch": batch, "threads": threads,
                            "workers": workers, "files": {}}
  for i, kind in enumerate(kinds):
    with tempfile.TemporaryDirectory() as folder:
      FILE_KINDS[kind](os.path.join(folder, "files"), images)
      if stores and i == 0:
        result["store_files"] = kind
        result.update(_bench_stores(folder, batch, steps, rounds, warmup, threads, workers))
      result["files"][kind] = _bench_files(folder, batch, steps, rounds, warmup, threads,
                                           workers)
  return result


def load_config(argv: Sequence[str]) -> Any:
  """A ``get_config()`` file and its ``--config.FIELD=VALUE`` overrides, as train.py reads them
  (``argv``: ``--config=FILE`` then the overrides)."""
  from absl import flags
  from ml_collections import config_flags

  values = flags.FlagValues()
  # The overrides' flags are defined from the file named in sys_argv, read here.
  holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                           lock_config=False, sys_argv=["bench", *argv])
  try:
    values(["bench", *argv])
  except (flags.Error, AttributeError, KeyError) as e:
    raise ValueError(f"--config: {str(e).splitlines()[0]}") from e
  if holder.value is None:
    raise ValueError("--config FILE is needed (a get_config() file such as "
                     "configs/imagenet_paper.py)")
  return holder.value


WARMUP_WINDOWS = 2  # compilation; the first log's one-time setup (TensorBoard's writer)


def _windows_ips(workdir: str) -> list[float]:
  """The loop's own images/s of each logged window after the warm-up ones."""
  from alexnet_jax.metric_log import read_metrics

  return [r["images_per_sec"] for r in read_metrics(workdir)
          if "images_per_sec" in r][WARMUP_WINDOWS:]


def _overall(ips: Sequence[float]) -> float:
  """Images/s over windows of equal length: total images over total time."""
  return len(ips) / sum(1 / x for x in ips)


def _resident_feed(host_batches: Callable[[], Iterator[Any]], batch: int, repeats: int,
                   stages: dict[str, float]) -> Callable[..., Iterator[Any]]:
  """A feed (``training.Feed``) of one loader batch kept on the devices; on its start it times
  putting that batch on the devices, alone, into ``stages``."""
  import jax

  def feed(steps: Any, start_step: int) -> Iterator[Any]:
    it = host_batches()
    host_batch = next(it)
    del it  # stops its reads: none may run beside the loop
    begin = time.perf_counter()
    for _ in range(repeats):
      placed = jax.block_until_ready(jax.tree_util.tree_map(steps.put, host_batch))
    stages["host_to_device"] = repeats * batch / (time.perf_counter() - begin)
    while True:
      yield placed
  return feed


def _loader_alone(batches: Iterator[Any], batch: int, warmup: int, steps: int) -> float:
  """Images/s of ``batches`` after ``warmup`` batches."""
  for _ in range(warmup):
    next(batches)
  begin = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch / (time.perf_counter() - begin)


def bench_feed(config: Any, steps: int = 50, window: int = 10, images: int = 0,
               put_repeats: int = 10) -> dict[str, Any]:
  """The training loop (``training.train_and_evaluate``: its prefetch thread, logging and final
  checkpoint) fed by the loader from a prepared store of photo-cut JPEGs, against the same loop
  fed one batch kept on the devices; and each stage alone: the loader, the host-to-device put,
  the step (the device-fed loop). Figures are the loop's own logged images/s, over ``steps``
  steps after ``WARMUP_WINDOWS`` windows of ``window`` steps."""
  from alexnet_jax import training
  from alexnet_jax.data import loader, prepare

  steps = -(-steps // window) * window
  images = images or 2 * config.batch_size
  mode = "paper" if config.train_preset == "paper" else "shorter"
  result: dict[str, Any] = machine() | {
      "model": config.model, "dtype": config.dtype, "batch": config.batch_size,
      "train_preset": config.train_preset, "store_mode": mode, "store_size": config.resize_size,
      "store_images": images, "timed_steps": steps, "window": window,
      "threads": config.data_threads or loader.default_threads(), "workers": config.data_workers,
      "prefetch": config.prefetch}
  with tempfile.TemporaryDirectory() as folder:
    write_photo_jpegs(os.path.join(folder, "files"), images)
    store = os.path.join(folder, "store")
    prepare.prepare(f"folder:{os.path.join(folder, 'files')}", store, mode=mode,
                    size=config.resize_size, splits=["train"])
    config = config.copy_and_resolve_references()  # the caller's is left as it was
    with config.unlocked():
      config.dataset, config.train_split, config.eval_split = f"prepared:{store}", "train", "train"
      warmup = WARMUP_WINDOWS * window
      config.num_train_steps, config.halt_at_step = warmup + steps + 1, warmup + steps
      config.log_every_steps, config.init_from = window, ""
      config.eval_every_steps, config.eval_every_epochs, config.checkpoint_every_steps = 0, 0.0, 0
    train_source = training.create_source(config, train=True)
    preprocess = training.create_preprocess(config)
    host_batches = lambda: loader.TrainLoader(
        train_source, preprocess, config.batch_size, seed=config.seed,
        threads=config.data_threads or None, workers=config.data_workers)
    stages: dict[str, float] = {}
    resident = _resident_feed(host_batches, config.batch_size, put_repeats, stages)
    loops = {}
    for name, feed in (("device_resident", resident), ("loader", None)):
      print(f"bench feed: the loop fed by {name.replace('_', '-')} batches", flush=True)
      workdir = os.path.join(folder, f"run-{name}")
      training.train_and_evaluate(config, workdir, feed=feed)
      rounds = _windows_ips(workdir)
      loops[name] = {"ips": _overall(rounds), "windows_ips": rounds}
    stages["loader"] = _loader_alone(host_batches(), config.batch_size, warmup, steps)
  stages["step"] = loops["device_resident"]["ips"]
  result.update({
      "fed_ips": loops["loader"]["ips"], "device_resident_ips": stages["step"],
      "ratio": loops["loader"]["ips"] / stages["step"], "loops": loops,
      "stages_ips": stages, "binds": min(stages, key=stages.get)})
  return result


def _print_feed(r: dict[str, Any]) -> None:
  print(f"\n{r['model']}, {r['dtype']}, batch {r['batch']}, {r['train_preset']} from a "
        f"{r['store_mode']} store at {r['store_size']} ({r['store_images']} photo-cut JPEGs); "
        f"{r['device_count']} x {r['device_kind']}, host CPU {r['cpu_model']} ({r['cores']} "
        f"cores), {r['threads']} loader threads, {r['workers']} Grain workers, prefetch "
        f"{r['prefetch']}; {r['timed_steps']} steps after {WARMUP_WINDOWS} windows of {r['window']}")
  print(f"  {'loop fed by the loader':<36}{r['fed_ips']:>10.0f} img/s   "
        f"{100 * r['ratio']:.0f}% of device-resident")
  print(f"  {'loop on device-resident batches':<36}{r['device_resident_ips']:>10.0f} img/s")
  for name, label in (("loader", "loader alone"), ("host_to_device", "host-to-device put alone"),
                      ("step", "step alone (device-resident loop)")):
    print(f"  {label:<36}{r['stages_ips'][name]:>10.0f} img/s"
          + ("   <- the slowest stage" if name == r["binds"] else ""))


def _print_data(r: dict[str, Any]) -> None:
  cores = f"{r['cores']} cores, {r['threads']} threads, {r['workers']} Grain workers"
  if "loader" in r:
    print(f"From stores prepared at 256 ({r['store_files']} JPEGs), batch {r['batch']}, {cores}; "
          "images/s in total (median of the rounds):")
    for mode, store in r["stores"].items():
      print(f"  {'bare decode, ' + mode + ' store':<32}{store['decode_ips_total']:>9.0f}   "
            f"(mean {store['mean_jpeg_kb']:.0f} KiB)")
    for name, p in r["loader"].items():
      print(f"  {name + ' loader, ' + p['store'] + ' store':<32}{p['ips_total']:>9.0f}   "
            f"{p['ips_per_core']:>7.0f}/core   {100 * p['ratio_to_decode']:>4.0f}% of decode")
  for kind, f in r["files"].items():
    print(f"{kind} JPEGs, 500x375 (mean {f['mean_jpeg_kb']:.0f} KiB), batch {r['batch']}, "
          f"{cores}; images/s per core (median of the rounds):")
    print(f"  {'bare decode (the limit)':<24}{f['decode_ips_per_core']:>8.0f}")
    for name, p in f["presets"].items():
      stage = "eval" if name in ("center_crop", "ten_crop") else "train"
      print(f"  {stage + ' ' + name:<24}{p['ips_per_core']:>8.0f}   "
            f"{100 * p['ratio_to_decode']:>4.0f}% of decode   "
            f"{p['host_to_device_bytes_per_image']:>9,.0f} bytes/image to the device")


def _print_train(r: TrainBench) -> None:
  m = r.machine
  torch_on = (f"torch {r.torch['version']} on {r.torch['device']} ({r.torch['threads']} threads)"
              if r.torch else f"PyTorch not run ({r.torch_not_run})")
  print(f"{r.variant}, {r.dtype}, jax {m['jax_version']} on {m['device_count']} x "
        f"{m['device_kind']} ({m['jax_backend']}), host CPU {m['cpu_model']} ({m['cores']} "
        f"cores), {torch_on}")
  print(f"XLA_FLAGS={m['xla_flags'] or '(none)'}, compiler options "
        f"{r.compiler_options or '(none)'}, CPU convolutions "
        f"{'Winograd where faster' if r.winograd else 'direct'}")
  datasheet = (f"{r.datasheet_tflops:.0f} TFLOP/s on the datasheet"
               if r.datasheet_tflops else "no datasheet figure known for this device")
  print(f"peak: {r.matmul_tflops:.3g} TFLOP/s measured ({r.dtype} matmul), {datasheet}")
  for e in r.batches:
    print(f"\nbatch {e.batch}:")
    _print_speeds(e.train, e.forward)
    if e.torch_compile_error:
      print(f"torch.compile: not used ({e.torch_compile_error})")
    print("compile: " + ", ".join(f"{name.replace('_', '.')} {s:.1f} s"
                                  for name, s in e.compile_s.items()))
    f = e.flops
    mfu = f"MFU {100 * f.mfu_measured_peak:.1f}% of the measured peak"
    if f.mfu_datasheet_peak is not None:
      mfu += f", {100 * f.mfu_datasheet_peak:.1f}% of the datasheet's"
    print(f"model FLOPs (direct convolutions, {f.train_gflop_per_image:.2f} GFLOP/image/step): "
          f"train {f.train_tflops:.3g} TFLOP/s, forward {f.fwd_tflops:.3g} TFLOP/s; {mfu}; XLA "
          f"counts {f.executed_train_gflop_per_image:.2f} GFLOP/image in the compiled step")
    memory = (f"XLA train step {e.xla_train_step_memory_mb:.0f} MiB (arguments + outputs + "
              "temporaries), " if e.xla_train_step_memory_mb is not None else "")
    print(f"memory: {memory}process peak RSS {e.peak_rss_mb:.0f} MiB")
    if e.layers:
      _print_layers(e)
    if e.ops:
      _print_ops(e)


def _print_layers(e: BatchFigures) -> None:
  from alexnet_jax.layer_times import TORCH
  torch_on = TORCH in e.layers[0].forward_ms
  cols = lambda ms: "" if not ms else (
      f"{ms['jax']:>9.1f}" + (f"{ms[TORCH]:>12.1f}{ms[TORCH] / ms['jax']:>7.2f}" if torch_on
                              else ""))
  head = f"{'jax':>9}" + (f"{'torch NHWC':>12}{'ratio':>7}" if torch_on else "")
  print(f"\nper block, ms at batch {e.batch} (ratio: PyTorch's time over JAX's)")
  print(f"{'':<17}{'output':<16}{'forward':^28}  {'forward + backward':^28}")
  print(f"{'':<33}{head:<28}  {head}")
  total: dict[str, dict[str, float]] = {"forward_ms": {}, "step_ms": {}}
  for b in e.layers:
    shape = "x".join(map(str, b.output_shape[1:]))
    print(f"{b.name:<17}{shape:<16}{cols(b.forward_ms):<28}  {cols(b.step_ms)}")
    for kind in total:
      for name, ms in getattr(b, kind).items():
        total[kind][name] = total[kind].get(name, 0.0) + ms
  print(f"{'sum of blocks':<33}{cols(total['forward_ms']):<28}  {cols(total['step_ms'])}")
  whole = {name: 1e3 * e.batch / ips for name, ips in e.train.ips.items()}
  print(f"{'whole train step':<33}{'':<28}  {cols(whole)}")


def _print_ops(e: BatchFigures) -> None:
  print(f"\nXLA's profile of the train step at batch {e.batch}, ms per step; asynchronous ops "
        "(on CPU, large matrix products and convolutions) show only their launch")
  print("by layer: " + ", ".join(f"{layer or 'no layer'} {ms:.1f}"
                                 for layer, ms in e.op_layers.items()))
  print(f"{'ms':>8}  {'layer':<8}{'op':<36}shape")
  for t in e.ops:
    print(f"{t.ms:>8.2f}  {t.layer:<8}{t.name:<36}{t.shape}")


def _print_speeds(train: Speed, forward: Speed) -> None:
  compiled = train.ips.get("torch_compile")
  print(f"{'':<22}{'alexnet-jax':>12}" + (f"{'torch NCHW':>12}{'torch NHWC':>12}{'ratio':>7}"
                                          if train.anchor else "")
        + (f"{'torch.compile':>15}{'ratio':>7}" if compiled else ""))
  for label, speed in (("train step, img/s", train), ("forward, img/s", forward)):
    row = f"{label:<22}{speed.ips['jax']:>12.1f}"
    if speed.anchor:
      row += (f"{speed.ips['torch']:>12.1f}{speed.ips['torch_channels_last']:>12.1f}"
              f"{speed.ratio:>7.2f}")
    if compiled and speed is train:
      row += f"{compiled:>15.1f}{train.ips['jax'] / compiled:>7.2f}"
    print(row)
  if train.anchor:
    layout = lambda k: "channels_last (NHWC)" if k == "torch_channels_last" else "NCHW"
    print(f"ratios are against PyTorch eager's faster layout: train {layout(train.anchor)}, "
          f"forward {layout(forward.anchor)}")
  spread = lambda rounds: ", ".join(f"{name} {min(v):.1f}-{max(v):.1f}"
                                    for name, v in rounds.items())
  print(f"img/s over the rounds: train {spread(train.rounds)}; forward {spread(forward.rounds)}")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  p = sub.add_parser("train", help="the library's train step and forward vs PyTorch")
  p.add_argument("--variant", default="alexnet", choices=VARIANTS)
  p.add_argument("--batch", type=int, nargs="+", default=[64], help="one or more batch sizes")
  p.add_argument("--dtype", choices=DTYPES, default="float32",
                 help="compute dtype (params stay float32; PyTorch uses bf16 autocast)")
  p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (median kept)")
  p.add_argument("--iters", type=int, default=3, help="calls per round")
  p.add_argument("--no_torch_compile", action="store_true", help="skip torch.compile")
  p.add_argument("--no_torch", action="store_true", help="time alexnet-jax alone")
  p.add_argument("--no_winograd", action="store_true",
                 help="time XLA's direct convolutions instead of the CPU default (Winograd)")
  p.add_argument("--layers", action="store_true",
                 help="also time each block alone, forward and backward, beside PyTorch")
  p.add_argument("--ops", type=int, default=0, metavar="N",
                 help="also print the N slowest ops of XLA's profile of the train step")
  p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
  d = sub.add_parser("data", help="the input pipeline: loader end to end vs bare JPEG decode")
  d.add_argument("--files", choices=(*FILE_KINDS, "both"), default="photos",
                 help="JPEGs cut from real photos, synthetic ones, or both")
  d.add_argument("--batch", type=int, default=128)
  d.add_argument("--steps", type=int, default=8, help="timed batches per pipeline and round")
  d.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (median kept)")
  d.add_argument("--images", type=int, default=1024,
                 help="JPEGs to write of each kind (more than a round reads: no epoch ends in it)")
  d.add_argument("--threads", type=int, default=0, help="loader threads (0 = one per core)")
  d.add_argument("--workers", type=int, default=0, help="Grain worker processes (0 = none)")
  d.add_argument("--no_stores", action="store_true",
                 help="only the presets on the original files, no prepared stores")
  d.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
  f = sub.add_parser(
      "feed", help="the training loop fed by the loader vs fed on the devices",
      usage="%(prog)s --config FILE [--config.FIELD=VALUE ...] [--steps N] [--window N] "
            "[--images N] [--json FILE]",
      description="The config's model, batch, presets, dtype, loader threads and workers, on a "
                  "prepared store of photo-cut JPEGs written for the run (its dataset, steps, "
                  "evaluation and checkpoint fields are the bench's). --config FILE and its "
                  "--config.FIELD=VALUE overrides are as train.py's.")
  f.add_argument("--steps", type=int, default=50, help="timed steps of each loop (rounded up "
                 "to whole windows)")
  f.add_argument("--window", type=int, default=10,
                 help="steps per logged window; the first two (compilation, the first log's "
                 "setup) are not timed")
  f.add_argument("--images", type=int, default=0,
                 help="JPEGs in the store (0 = two batches)")
  f.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
  return parser


@extras.needed_by("python -m alexnet_jax.bench")
def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  if rest and (args.what != "feed" or not all(a.startswith("--config") or not a.startswith("-")
                                              for a in rest)):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  counts = {"train": lambda: [*args.batch, args.rounds, args.iters],
            "data": lambda: [args.batch, args.steps, args.rounds, args.images],
            "feed": lambda: [args.steps, args.window, args.images + 1]}[args.what]()
  zero_or_more = {"train": lambda: [args.ops], "data": lambda: [args.threads, args.workers],
                  "feed": lambda: []}[args.what]()
  if min(counts) < 1 or min(zero_or_more, default=0) < 0:
    parser.error("sizes and counts must be positive (--ops, threads and workers: 0 or more)")
  # Up front, all at once: the first missing module would otherwise stop a run minutes in.
  if args.what == "train":
    needed = ("grain",) if args.no_torch and not args.layers else ("grain", "torch")
  else:
    needed = ("PIL", "simplejpeg", "cv2", "grain") + (
        ("sklearn", "ml_collections", "orbax") if args.what == "feed" else ())
  extras.require(parser.prog, *needed)

  if args.what == "feed":
    try:
      config = load_config(rest)
    except ValueError as e:
      parser.error(str(e))
    if args.images and args.images < config.batch_size:
      parser.error(f"--images ({args.images}) must be at least the batch "
                   f"({config.batch_size})")
    result = bench_feed(config, args.steps, args.window, args.images)
    _print_feed(result)
  elif args.what == "train":
    # JAX takes most of an accelerator's memory at its start; PyTorch shares this process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")
    result = bench_train(args.variant, args.batch, args.dtype, args.rounds, args.iters,
                         torch_compile=not args.no_torch_compile, winograd=not args.no_winograd,
                         use_torch=not args.no_torch, layers=args.layers,
                         profile_ops=args.ops)
    _print_train(result)
  else:
    if args.images < args.batch:
      parser.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    kinds = tuple(FILE_KINDS) if args.files == "both" else (args.files,)
    result = bench_data(args.batch, args.steps, args.rounds, args.images, kinds,
                        threads=args.threads, workers=args.workers, stores=not args.no_stores)
    _print_data(result)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result, f,
                indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
