"""Prepare: any source, read once, written as JPEGs at training resolution in ArrayRecord shards.

``python -m alexnet_jax.prepare SOURCE OUT_DIR --mode paper|shorter --size 256``. ``paper``
stores the centre ``size`` x ``size`` square of the image with its shorter side resized to
``size`` (how the 2012 paper stored ImageNet); ``shorter`` stores the image with its shorter side
resized to ``size``, aspect kept, never upscaled (for RandomResizedCrop). Training then reads
``prepared:OUT_DIR`` at a fraction of the decode cost of the original files.

Each shard is written under a temporary name and renamed when complete, and its record of
completion (``OUT_DIR/.progress/<shard>.json``) is written after that, so an interrupted run
keeps the shards it finished and a rerun redoes only the rest; ``metadata.json``, which readers
need, is written last. Inputs that do not decode are left out and listed in ``skipped.txt``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

from alexnet_jax.data import host, loader, sources
from alexnet_jax.files import write_atomically

MODES = ("paper", "shorter")
PROGRESS_DIR = ".progress"
SKIPPED_FILE = "skipped.txt"


def store_view(data: bytes | np.ndarray, mode: str, size: int, channels: int) -> np.ndarray:
  """The uint8 image a store of ``mode`` and ``size`` keeps for ``data``."""
  height, width = host.image_shape(data)
  if mode == "paper":
    resized = host.shorter_side_to(height, width, size)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    box = host.resized_box(height, width, resized, top, left, (size, size))
    return host.resample(data, box, (size, size), channels, (height, width))
  out = (host.shorter_side_to(height, width, size) if min(height, width) > size
         else (height, width))
  return host.resample(data, (0, 0, height, width), out, channels, (height, width))


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
  import simplejpeg  # pylint: disable=import-outside-toplevel
  if pixels.shape[-1] == 1:
    return simplejpeg.encode_jpeg(pixels, quality, colorspace="GRAY")
  # 4:2:0 chroma, as most photo JPEGs (ImageNet's among them): smaller and faster to decode.
  return simplejpeg.encode_jpeg(pixels, quality, colorspace="RGB", colorsubsampling="420")


def splits_of(dataset: str, data_dir: str | None = None) -> list[str]:
  """The splits a source has, for ``--splits`` left out."""
  if dataset in ("digits", "synthetic"):
    return ["train", "test"]
  if dataset.startswith("folder:"):
    return sources.folder_splits(dataset[len("folder:"):])
  if dataset.startswith("prepared:"):
    return sorted(sources.read_store_metadata(dataset[len("prepared:"):])["splits"])
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return sorted(tfds.builder(dataset, data_dir=data_dir).info.splits)


def shard_bounds(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
  return loader.even_bounds(num_examples, max(1, math.ceil(num_examples / shard_size)))


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def _write_shard(source: Any, out_dir: str, split: str, shard: int, num_shards: int, start: int,
                 end: int, mode: str, size: int, quality: int) -> dict[str, Any]:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  name = shard_name(split, shard, num_shards)
  path = os.path.join(out_dir, name)
  partial = path + ".partial"
  skipped = []
  # group_size:1 makes each record its own chunk: random access reads only that record.
  # Uncompressed: JPEG bytes do not compress, and each read would pay for trying.
  writer = array_record_module.ArrayRecordWriter(partial, "group_size:1,uncompressed")
  try:
    for i in range(start, end):
      try:
        image, label = source[i]
        pixels = store_view(image, mode, size, source.channels)
      except (OSError, host.DecodeError) as e:
        where = source.describe(i) if hasattr(source, "describe") else f"{split} example {i}"
        skipped.append(f"{where}\t{e}")
        continue
      writer.write(sources.store_record(encode_jpeg(pixels, quality), label))
  finally:
    writer.close()
  with open(partial, "rb+") as f:  # on disk before the rename says it is complete
    os.fsync(f.fileno())
  os.replace(partial, path)
  done = {"file": name, "num_examples": end - start - len(skipped), "bytes": os.path.getsize(path),
          "skipped": skipped}
  _write_json(os.path.join(out_dir, PROGRESS_DIR, name + ".json"), done)
  return done


def _write_json(path: str, value: Any) -> None:
  write_atomically(path, json.dumps(value, indent=1))


def _finished(out_dir: str, name: str) -> dict[str, Any] | None:
  """The shard's record of completion, if it has one and the shard file matches it."""
  try:
    with open(os.path.join(out_dir, PROGRESS_DIR, name + ".json")) as f:
      done = json.load(f)
  except (OSError, ValueError):
    return None
  path = os.path.join(out_dir, name)
  return done if os.path.isfile(path) and os.path.getsize(path) == done["bytes"] else None


class _Progress:
  """One line every ``every`` seconds: images done, rate, skipped, ETA."""

  def __init__(self, total: int, done: int, every: float = 10.0):
    self.total, self.done, self.every = total, done, every
    self.start_done, self.start, self.last = done, time.perf_counter(), 0.0
    self.skipped = 0

  def add(self, examples: int, skipped: int) -> None:
    self.done += examples + skipped
    self.skipped += skipped
    now = time.perf_counter()
    if now - self.last < self.every and self.done < self.total:
      return
    self.last = now
    rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    print(f"prepare: {self.done:,}/{self.total:,} images ({100 * self.done / self.total:.1f}%), "
          f"{rate:,.0f} img/s, {self.skipped} skipped, ETA {eta / 60:.1f} min", flush=True)


def prepare(dataset: str, out_dir: str, *, mode: str, size: int = 256, quality: int = 90,
            splits: Sequence[str] | None = None, workers: int | None = None,
            shard_size: int = 1024, data_dir: str | None = None,
            manual_dir: str | None = None) -> dict[str, Any]:
  """Writes (or finishes writing) the store of ``dataset`` in ``out_dir``; its metadata."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if size < 1 or not 1 <= quality <= 100 or shard_size < 1 or (workers or 0) < 0:
    raise ValueError(f"size and shard_size must be positive, quality in 1..100 and workers 0 or "
                     f"more; got size {size}, shard_size {shard_size}, quality {quality}, "
                     f"workers {workers}")
  splits = list(splits or splits_of(dataset, data_dir))
  split_sources = {split: sources.create_source(dataset, split, data_dir=data_dir,
                                                manual_dir=manual_dir) for split in splits}
  first = split_sources[splits[0]]
  settings = {"source": dataset, "mode": mode, "size": size, "quality": quality,
              "shard_size": shard_size, "channels": first.channels, "split_names": splits,
              "fingerprint": {s: src.fingerprint() for s, src in split_sources.items()}}
  metadata_path = os.path.join(out_dir, sources.STORE_METADATA)
  if os.path.exists(metadata_path):
    metadata = sources.read_store_metadata(out_dir)
    _check_same_settings(out_dir, metadata, settings)
    print(f"prepare: {out_dir} is complete already ({metadata_path})", flush=True)
    return metadata
  _start_or_resume(out_dir, settings)
  tasks, finished = [], {}
  for split, source in split_sources.items():
    bounds = shard_bounds(len(source), shard_size)
    for shard, (start, end) in enumerate(bounds):
      name = shard_name(split, shard, len(bounds))
      done = _finished(out_dir, name)
      if done is None:
        tasks.append((source, out_dir, split, shard, len(bounds), start, end, mode, size,
                      quality))
      finished[name] = done
  total = sum(len(s) for s in split_sources.values())
  progress = _Progress(total, total - sum(t[6] - t[5] for t in tasks))
  kept = len(finished) - len(tasks)
  print(f"prepare: {dataset} -> {out_dir} ({mode}, size {size}, quality {quality}): "
        f"{total:,} images in {len(finished)} shards"
        + (f", {kept} already written" if kept else ""), flush=True)
  # Threads, not processes: reading, decoding, resizing and encoding all release the GIL, and
  # the Python left per image is a few percent of a full-size image's work.
  with concurrent.futures.ThreadPoolExecutor(workers or loader.default_threads()) as pool:
    futures = [pool.submit(_write_shard, *task) for task in tasks]
    try:
      for future in concurrent.futures.as_completed(futures):
        done = future.result()
        finished[done["file"]] = done
        progress.add(done["num_examples"], len(done["skipped"]))
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)  # lets the shards in progress finish
      raise
  return _finish(out_dir, settings, split_sources, finished)


def _start_or_resume(out_dir: str, settings: dict[str, Any]) -> None:
  """Records the settings of a new run; a resumed one must have the same."""
  path = os.path.join(out_dir, PROGRESS_DIR, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      _check_same_settings(out_dir, json.load(f), settings)
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, settings)


def _check_same_settings(out_dir: str, before: dict[str, Any], settings: dict[str, Any]
                         ) -> None:
  """A rerun finishes the same store; other settings or a changed source would mix two."""
  for key, value in settings.items():
    if before.get(key) != value:
      what = ("the source changed since" if key == "fingerprint"
              else f"{key} {value!r} differs from")
      raise ValueError(f"{out_dir}: {what} the run that started this store ({key} "
                       f"{before.get(key)!r}); use another OUT_DIR or delete this one")


def _finish(out_dir: str, settings: dict[str, Any], split_sources: dict[str, Any],
            finished: dict[str, Any]) -> dict[str, Any]:
  splits, skipped = {}, []
  for split in split_sources:
    shards = [finished[n] for n in sorted(finished) if n.startswith(f"{split}-")]
    skipped += [line for s in shards for line in s["skipped"]]
    splits[split] = {"num_examples": sum(s["num_examples"] for s in shards),
                     "skipped": sum(len(s["skipped"]) for s in shards),
                     "shards": [{k: s[k] for k in ("file", "num_examples", "bytes")}
                                for s in shards]}
  first = next(iter(split_sources.values()))
  metadata = {"format": sources.STORE_FORMAT, "version": sources.STORE_VERSION, **settings,
              "num_classes": first.num_classes, "class_names": first.class_names,
              "splits": splits}
  with open(os.path.join(out_dir, SKIPPED_FILE), "w") as f:
    f.write("".join(f"{line}\n" for line in skipped))
  _write_json(os.path.join(out_dir, sources.STORE_METADATA), metadata)
  shutil.rmtree(os.path.join(out_dir, PROGRESS_DIR))
  counts = ", ".join(f"{s} {v['num_examples']:,}" for s, v in splits.items())
  print(f"prepare: done: {counts} images; {len(skipped)} undecodable left out"
        + (f" (listed in {os.path.join(out_dir, SKIPPED_FILE)})" if skipped else ""), flush=True)
  return metadata


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m alexnet_jax.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", help="digits, synthetic, folder:/path, or a TFDS name")
  parser.add_argument("out_dir")
  parser.add_argument("--mode", choices=MODES, required=True)
  parser.add_argument("--size", type=int, default=256, help="shorter side (paper: square side)")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality, 1..100")
  parser.add_argument("--splits", help="comma-separated (default: every split of the source)")
  parser.add_argument("--workers", type=int, default=0, help="threads (0 = one per core)")
  parser.add_argument("--shard_size", type=int, default=1024, help="images per shard")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
  parser.add_argument("--manual_dir", default=None, help="TFDS manual_dir (imagenet2012)")
  args = parser.parse_args(argv)
  try:
    prepare(args.source, args.out_dir, mode=args.mode, size=args.size, quality=args.quality,
            splits=args.splits.split(",") if args.splits else None, workers=args.workers,
            shard_size=args.shard_size, data_dir=args.data_dir, manual_dir=args.manual_dir)
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"prepare: interrupted; the finished shards are kept in {args.out_dir}: run the same "
          "command again to finish", file=sys.stderr)
    return 130
  return 0
