"""Benchmarks: ``python -m alexnet_jax.bench {train,data}``.

``train`` times the library's own train step (``training.make_steps``, with the library's
defaults: ``ops.compiler_options``, no XLA_FLAGS) and the jitted forward (eval mode, which on CPU
runs the conv stack a few images at a time: ``ops.Implementation.eval_chunk``) against the
same model and optimizer in PyTorch eager (NCHW and channels_last; the ratios are against the
faster) and ``torch.compile``, in one process, on the same batch, fp32. They are timed in
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
from alexnet_jax.models import VARIANTS


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


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """The machine's fp32 matmul rate under XLA, GFLOP/s: the ceiling for conv and dense layers."""
  import jax
  import jax.numpy as jnp

  from alexnet_jax import ops

  a = jnp.ones((size, size), jnp.float32)
  mm = jax.jit(lambda a: a @ a, compiler_options=ops.compiler_options())
  mm(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    mm(a).block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _peak_rss_mb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_train(variant: str, batch: int, rounds: int = 5, iters: int = 3, warmup: int = 2,
                seed: int = 0, torch_compile: bool = True, winograd: bool = True
                ) -> dict[str, Any]:
  """Train-step and forward images/s of the library's step vs the same model in PyTorch.

  JAX runs ``training.train_step`` through ``training.make_steps("jit")`` on one device, with
  torchvision's recipe's optimizer (SGD, momentum 0.9, weight decay 1e-4);
  PyTorch runs ``torch.optim.SGD`` with the same settings, eager and (where it works)
  ``torch.compile``d. Same batch, fp32, alternating rounds. ``winograd=False`` times XLA's
  direct convolutions instead of the CPU default (``ops.Implementation.winograd``).
  """
  import jax
  import torch

  from alexnet_jax import ops, optim, training
  from alexnet_jax.models import create_model
  from alexnet_jax.torch_interop import params_from_torch
  from alexnet_jax.torch_reference import torch_model

  # The optimizer of configs/imagenet_torchvision.py, whose other fields a step does not read.
  recipe = types.SimpleNamespace(learning_rate=0.01, momentum=0.9, weight_decay=1e-4,
                                 schedule="step", lr_step_epochs=30, seed=seed)
  model = create_model(variant, impl=dataclasses.replace(ops.FAST, winograd=winograd))
  tx = optim.create_optimizer(recipe, 1000, 10**6)
  steps = training.make_steps("jit", model, tx, devices=jax.devices()[:1])
  torch.manual_seed(seed)
  net = torch_model(variant)
  params = params_from_torch(net.state_dict(), variant)
  state = training.place_state(training.create_train_state(recipe, model, tx, params), steps)
  rng = np.random.default_rng(seed)
  side = model.input_size
  x = rng.standard_normal((batch, side, side, model.in_channels), np.float32)
  y = rng.integers(0, model.num_classes, batch).astype(np.int32)
  device_batch = jax.tree_util.tree_map(steps.put, {"image": x, "label": y})

  start = time.perf_counter()
  compiled = steps.train.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  executed_flops = compiled.cost_analysis()["flops"]
  memory = compiled.memory_analysis()
  forward_of = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x),
                                 compiler_options=ops.compiler_options())
  forward = forward_of(model)
  # Model FLOPs are those of direct convolutions on the whole batch: Winograd's (on CPU) execute
  # fewer, and XLA counts a loop's body (the CPU eval forward's chunks) once.
  direct = model.clone(impl=dataclasses.replace(model.impl, winograd=False, eval_chunk=0))
  train_flops = training.make_steps("jit", direct, tx, devices=jax.devices()[:1]).train.lower(
      state, device_batch).cost_analysis()["flops"]
  fwd_flops = forward_of(direct).lower(state.params, device_batch["image"]).cost_analysis()["flops"]
  holder = {"state": state}

  def run_jax_step():
    holder["state"], metrics = compiled(holder["state"], device_batch)
    metrics["train_loss"].block_until_ready()

  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  # PyTorch's two eager layouts: NCHW, and channels_last (NHWC in memory), often faster on CPU.
  layouts = {"torch": (net, xt), "torch_channels_last": (
      copy.deepcopy(net).to(memory_format=torch.channels_last),
      xt.contiguous(memory_format=torch.channels_last))}

  def torch_step(module, inputs):
    opt = torch.optim.SGD(module.parameters(), lr=recipe.learning_rate,
                          momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    def step():
      module.train()
      opt.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(module(inputs), yt).backward()
      opt.step()
    return step

  def torch_forward(module, inputs):
    def forward_only():
      module.eval()
      with torch.inference_mode():
        module(inputs)
    return forward_only

  train_fns = {"jax": run_jax_step} | {k: torch_step(*v) for k, v in layouts.items()}
  fwd_fns = {"jax": lambda: forward(holder["state"].params, device_batch["image"]
                                    ).block_until_ready()}
  fwd_fns |= {k: torch_forward(*v) for k, v in layouts.items()}
  result: dict[str, Any] = {"compile_s_jax": compile_s}
  if torch_compile:
    try:
      compiled_net = torch.compile(net)
      start = time.perf_counter()
      torch_step(compiled_net, xt)()
      result["compile_s_torch_compile"] = time.perf_counter() - start
      train_fns["torch_compile"] = torch_step(compiled_net, xt)
    except Exception as e:  # noqa: BLE001  (no C++ toolchain, unsupported platform, ...)
      result["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  fwd_rounds = _rounds_ips(fwd_fns, batch, rounds, iters, warmup)
  train_rounds = _rounds_ips(train_fns, batch, rounds, iters, warmup)
  median = lambda per_round: {name: statistics.median(v) for name, v in per_round.items()}
  fwd, train = median(fwd_rounds), median(train_rounds)
  matmul = matmul_gflops()
  # The anchor is PyTorch's fastest eager layout, for each of train and forward.
  anchor = lambda ips: max(layouts, key=lambda k: ips[k])
  train_anchor, fwd_anchor = anchor(train), anchor(fwd)
  result.update({
      "jax_train_ips": train["jax"], "torch_train_ips": train["torch"],
      "torch_channels_last_train_ips": train["torch_channels_last"],
      "torch_train_anchor": train_anchor, "ratio_train": train["jax"] / train[train_anchor],
      "jax_fwd_ips": fwd["jax"], "torch_fwd_ips": fwd["torch"],
      "torch_channels_last_fwd_ips": fwd["torch_channels_last"],
      "torch_fwd_anchor": fwd_anchor, "ratio_fwd": fwd["jax"] / fwd[fwd_anchor],
      "train_gflop_per_image": train_flops / batch / 1e9,
      "executed_train_gflop_per_image": executed_flops / batch / 1e9,
      "jax_train_gflops": train_flops / batch * train["jax"] / 1e9,
      "jax_fwd_gflops": fwd_flops / batch * fwd["jax"] / 1e9,
      "fwd_gflop_per_image": fwd_flops / batch / 1e9,
      "matmul_gflops": matmul,
      "xla_train_step_memory_mb": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   + memory.temp_size_in_bytes
                                   - memory.alias_size_in_bytes) / 2**20,
      "peak_rss_mb": _peak_rss_mb(), "torch_threads": torch.get_num_threads(),
      "jax_backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      # A shared VM's noise shows as spread between rounds (docs/performance.md).
      "rounds_train_ips": train_rounds, "rounds_fwd_ips": fwd_rounds,
      "compiler_options": ops.compiler_options(), "winograd": winograd,
      "eval_chunk": model.impl.chunk(model, x.shape),
  })
  if "torch_compile" in train:
    result["torch_compile_train_ips"] = train["torch_compile"]
    result["ratio_train_vs_compile"] = train["jax"] / train["torch_compile"]
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


def _print_train(variant: str, batch: int, r: dict[str, Any]) -> None:
  print(f"{variant}, batch {batch}, fp32, jax backend {r['jax_backend']}, torch threads "
        f"{r['torch_threads']}, XLA_FLAGS={r['xla_flags'] or '(none)'}, compiler options "
        f"{r['compiler_options'] or '(none)'}, CPU convolutions "
        f"{'Winograd where faster' if r['winograd'] else 'direct'}, CPU eval forward "
        f"{'whole' if r['eval_chunk'] == batch else 'by %d images' % r['eval_chunk']}")
  compiled = r.get("torch_compile_train_ips")
  print(f"{'':<22}{'alexnet-jax':>12}{'torch NCHW':>12}{'torch NHWC':>12}{'ratio':>7}"
        + (f"{'torch.compile':>15}{'ratio':>7}" if compiled else ""))
  print(f"{'train step, img/s':<22}{r['jax_train_ips']:>12.1f}{r['torch_train_ips']:>12.1f}"
        f"{r['torch_channels_last_train_ips']:>12.1f}{r['ratio_train']:>7.2f}"
        + (f"{compiled:>15.1f}{r['ratio_train_vs_compile']:>7.2f}" if compiled else ""))
  print(f"{'forward, img/s':<22}{r['jax_fwd_ips']:>12.1f}{r['torch_fwd_ips']:>12.1f}"
        f"{r['torch_channels_last_fwd_ips']:>12.1f}{r['ratio_fwd']:>7.2f}")
  layout = lambda k: "channels_last (NHWC)" if k == "torch_channels_last" else "NCHW"
  print(f"ratios are against PyTorch eager's faster layout: train {layout(r['torch_train_anchor'])}"
        f", forward {layout(r['torch_fwd_anchor'])}")
  spread = lambda rounds: ", ".join(f"{name} {min(v):.1f}-{max(v):.1f}"
                                    for name, v in rounds.items())
  print(f"img/s over the rounds: train {spread(r['rounds_train_ips'])}; "
        f"forward {spread(r['rounds_fwd_ips'])}")
  if "torch_compile_error" in r:
    print(f"torch.compile: not used ({r['torch_compile_error']})")
  print(f"compile: jax {r['compile_s_jax']:.1f} s"
        + (f", torch.compile {r['compile_s_torch_compile']:.1f} s" if compiled else ""))
  print(f"model FLOP/s (XLA cost analysis with direct convolutions, "
        f"{r['train_gflop_per_image']:.2f} GFLOP/image/step): train {r['jax_train_gflops']:.0f} "
        f"GFLOP/s, forward {r['jax_fwd_gflops']:.0f} GFLOP/s, vs {r['matmul_gflops']:.0f} GFLOP/s "
        f"measured fp32 matmul; the compiled step executes "
        f"{r['executed_train_gflop_per_image']:.2f} GFLOP/image")
  print(f"memory: XLA train step {r['xla_train_step_memory_mb']:.0f} MiB (arguments + outputs + "
        f"temporaries), process peak RSS {r['peak_rss_mb']:.0f} MiB (both frameworks)")


@extras.needed_by("python -m alexnet_jax.bench")
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  p = sub.add_parser("train", help="the library's train step and forward vs PyTorch")
  p.add_argument("--variant", default="alexnet", choices=VARIANTS)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (median kept)")
  p.add_argument("--iters", type=int, default=3, help="calls per round")
  p.add_argument("--no_torch_compile", action="store_true", help="skip torch.compile")
  p.add_argument("--no_winograd", action="store_true",
                 help="time XLA's direct convolutions instead of the CPU default (Winograd)")
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
  args = parser.parse_args(argv)
  counts = ([args.batch, args.rounds, args.iters] if args.what == "train"
            else [args.batch, args.steps, args.rounds, args.images])
  if min(counts) < 1 or (args.what == "data" and min(args.threads, args.workers) < 0):
    parser.error("sizes and counts must be positive (threads and workers: 0 or more)")
  # Up front, all at once: the first missing module would otherwise stop a run minutes in.
  extras.require(parser.prog, *(("torch", "grain") if args.what == "train"
                                else ("PIL", "simplejpeg", "cv2", "grain")))

  if args.what == "train":
    result = bench_train(args.variant, args.batch, args.rounds, args.iters,
                         torch_compile=not args.no_torch_compile, winograd=not args.no_winograd)
    _print_train(args.variant, args.batch, result)
  else:
    if args.images < args.batch:
      parser.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    kinds = tuple(FILE_KINDS) if args.files == "both" else (args.files,)
    result = bench_data(args.batch, args.steps, args.rounds, args.images, kinds,
                        threads=args.threads, workers=args.workers, stores=not args.no_stores)
    _print_data(result)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
