"""Benchmarks: ``python -m alexnet_jax.bench {model,data}``.

``model`` times the jitted Flax forward (eval mode) and a forward+backward+SGD step against the same
model in PyTorch eager, in one process, on the same batch, fp32. The two are timed in alternating
rounds after a warm-up, so that a background load or thermal drift hits both alike; the figure is
the median round.

``data`` writes JPEGs of ImageNet's typical size (500x375) to a temporary folder and measures the
ImageNet-style train pipeline (decode, augmentation preset, batching) in images/s, in total and per
CPU core available to the process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from alexnet_jax.models import VARIANTS


def _median_ips(fns: dict[str, Callable[[], Any]], batch: int, rounds: int, iters: int,
                warmup: int) -> dict[str, float]:
  """Images/s of each no-argument callable (which must block until done), alternating rounds."""
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
  return {name: statistics.median(v) for name, v in per_round.items()}


def bench_model(variant: str, batch: int, rounds: int = 5, iters: int = 3, warmup: int = 2,
                seed: int = 0) -> dict[str, float]:
  """Forward and train-step images/s of ``variant`` in Flax (jit) and PyTorch (eager)."""
  import jax
  import optax
  import torch

  from alexnet_jax.models import create_model
  from alexnet_jax.torch_interop import params_from_torch
  from alexnet_jax.torch_reference import torch_model

  model = create_model(variant)
  torch.manual_seed(seed)
  net = torch_model(variant)
  params = jax.device_put(params_from_torch(net.state_dict(), variant))
  rng = np.random.default_rng(seed)
  side = model.input_size
  x = rng.standard_normal((batch, side, side, model.in_channels), np.float32)
  y = rng.integers(0, model.num_classes, batch)
  xj, yj = jax.device_put(x), jax.device_put(y)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y)

  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, 0.9))
  dropout_rng = jax.random.key(seed)

  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def jax_step(p, opt_state, x, y, key):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss
  # Donating params/opt_state mirrors torch's in-place optimizer step.
  jax_step = jax.jit(jax_step, donate_argnums=(0, 1))

  state = {"params": params, "opt_state": tx.init(params)}

  def run_jax_step():
    state["params"], state["opt_state"], loss = jax_step(state["params"], state["opt_state"],
                                                         xj, yj, dropout_rng)
    loss.block_until_ready()

  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

  def run_torch_step():
    net.train()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(xt), yt).backward()
    opt.step()

  def run_torch_forward():
    net.eval()
    with torch.inference_mode():
      net(xt)

  fwd = _median_ips({"jax": lambda: forward(params, xj).block_until_ready(),
                     "torch": run_torch_forward}, batch, rounds, iters, warmup)
  train = _median_ips({"jax": run_jax_step, "torch": run_torch_step}, batch, rounds, iters,
                      warmup)
  return {"jax_fwd_ips": fwd["jax"], "torch_fwd_ips": fwd["torch"],
          "ratio_fwd": fwd["jax"] / fwd["torch"], "jax_train_ips": train["jax"],
          "torch_train_ips": train["torch"], "ratio_train": train["jax"] / train["torch"],
          "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend()}


def write_jpegs(folder: str, count: int, size: tuple[int, int] = (500, 375),
                classes: int = 10, seed: int = 0) -> None:
  """``count`` JPEGs in ``folder/train/<class>/``, smooth like photos (so they compress alike)."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  width, height = size
  for i in range(count):
    d = os.path.join(folder, "train", f"class{i % classes:03d}")
    os.makedirs(d, exist_ok=True)
    coarse = rng.integers(0, 256, (height // 25, width // 25, 3), np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    fine = np.asarray(image, np.int16) + rng.integers(-12, 12, (height, width, 3))
    Image.fromarray(np.clip(fine, 0, 255).astype(np.uint8)).save(
        os.path.join(d, f"{i:05d}.jpg"), quality=90)


def bench_data(preset: str, batch: int, steps: int, images: int, warmup: int = 3
               ) -> dict[str, float]:
  """Images/s of the train pipeline on JPEGs of ImageNet size written to a temporary folder."""
  from alexnet_jax import input_pipeline as ip

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder, images)
    source = ip.folder_source(folder, "train")
    it = ip.TrainIterator(source, ip.Preprocess(train_preset=preset), batch, seed=0)
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    ips = batch * steps / (time.perf_counter() - start)
    del it  # stops tf.data's background reads before the folder goes
    mean_kb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder)
                  for f in fs) / images / 1024
  return {"images_per_sec": ips, "cores": cores, "images_per_sec_per_core": ips / cores,
          "mean_jpeg_kb": mean_kb}


def _print_table(variant: str, batch: int, r: dict[str, float]) -> None:
  print(f"{variant}, batch {batch}, fp32, jax backend {r['jax_backend']}, "
        f"torch threads {r['torch_threads']}")
  print(f"{'':<26}{'jax (jit)':>12}{'torch eager':>14}{'ratio':>8}")
  for label, key in (("forward (eval), img/s", "fwd"), ("train step, img/s", "train")):
    print(f"{label:<26}{r[f'jax_{key}_ips']:>12.1f}{r[f'torch_{key}_ips']:>14.1f}"
          f"{r[f'ratio_{key}']:>8.2f}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  p = sub.add_parser("model", help="the model alone: Flax jit vs PyTorch eager")
  p.add_argument("--variant", default="alexnet", choices=VARIANTS)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (median kept)")
  p.add_argument("--iters", type=int, default=3, help="calls per round")
  p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
  d = sub.add_parser("data", help="the ImageNet-style train input pipeline on CPU")
  d.add_argument("--preset", default="torchvision", choices=("torchvision", "paper"))
  d.add_argument("--batch", type=int, default=64)
  d.add_argument("--steps", type=int, default=20, help="timed batches, after 3 warm-up batches")
  d.add_argument("--images", type=int, default=512, help="JPEGs to write (cycled over epochs)")
  d.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
  args = parser.parse_args(argv)
  counts = ([args.batch, args.rounds, args.iters] if args.what == "model"
            else [args.batch, args.steps, args.images])
  if min(counts) < 1:
    parser.error("sizes and counts must be positive")

  if args.what == "model":
    result = bench_model(args.variant, args.batch, args.rounds, args.iters)
    _print_table(args.variant, args.batch, result)
  else:
    if args.images < args.batch:
      parser.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    result = bench_data(args.preset, args.batch, args.steps, args.images)
    print(f"train pipeline, preset {args.preset}, batch {args.batch}, 500x375 JPEGs "
          f"(mean {result['mean_jpeg_kb']:.0f} KiB): {result['images_per_sec']:.0f} images/s on "
          f"{result['cores']} cores = {result['images_per_sec_per_core']:.0f} images/s per core")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
