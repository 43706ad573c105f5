"""The loader: Grain datasets that yield this process's rows of every global batch.

Batches are numpy dicts: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,), and from the train
presets ``flip`` (N,) and ``colour`` (N, 3) for the device to apply; eval batches add ``mask``.
Process ``p`` of ``P`` reads rows ``[p * B / P, (p + 1) * B / P)`` of each global batch of the one
global order (``order``), so the batches do not depend on the topology. Placing them on devices
(and any per-device layout) is the steps' ``put``.

Each batch is built whole (read, decode, crop into its row) by one of ``threads`` threads of this
process, which the decoders and OpenCV let run in parallel (they release the GIL), and
optionally in ``workers`` Grain worker processes, each with its threads.
"""

from __future__ import annotations

import collections
import math
import os
import queue
import sys
import threading
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np

from alexnet_jax.data import host, order

_ENDLESS = 2**62


def default_threads() -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, cores or 1)


def local_batch_size(global_batch: int) -> int:
  """This process's share of ``global_batch``; it must split evenly over all devices."""
  devices = jax.device_count()
  if global_batch < 1 or global_batch % devices:
    raise ValueError(f"global batch size {global_batch} must be a positive multiple of the "
                     f"{devices} devices (over {jax.process_count()} processes); try "
                     f"{max(devices, global_batch // devices * devices)}")
  return global_batch // jax.process_count()


def even_bounds(total: int, n: int) -> list[tuple[int, int]]:
  """``n`` contiguous (start, end) ranges over ``total`` whose sizes differ by at most one."""
  base, extra = divmod(total, n)
  starts = [i * base + min(i, extra) for i in range(n + 1)]
  return list(zip(starts[:-1], starts[1:]))


def _undecodable(source: Any, index: int, error: Exception) -> ValueError:
  where = source.describe(index) if hasattr(source, "describe") else f"example {index}"
  return ValueError(f"{source.name} {source.split!r}: {where} cannot be decoded ({error}). Fix "
                    "or remove it, or prepare a store (python -m alexnet_jax.prepare), which "
                    "lists and leaves out such files.")


def _read(source: Any, index: int, view: Callable[[Any], Any]) -> tuple[Any, int]:
  """``view`` of example ``index``'s image, and its label; a bad image is named."""
  image, label = source[index]
  try:
    return view(image), label
  except host.DecodeError as e:
    raise _undecodable(source, index, e) from e


class _TrainBatch:
  """Step ``k`` -> this process's rows ``[first_row, first_row + rows)`` of global batch ``k``.

  The batch is built here, each view written into its row: no per-example arrays to allocate
  (whose fresh pages cost the kernel's zeroing) and stack afterwards.
  """

  def __init__(self, source: Any, preprocess: host.Preprocess, global_order: order.GlobalOrder,
               rows: int, first_row: int):
    self.source, self.preprocess, self.order = source, preprocess, global_order
    self.rows, self.first_row = rows, first_row

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    images = np.empty((self.rows,) + self.preprocess.train_shape(), np.uint8)
    labels, extras = np.empty(self.rows, np.int32), collections.defaultdict(list)
    for row in range(self.rows):
      index, rng = self.order.locate(step, self.first_row + row)
      view, labels[row] = _read(self.source, index,
                                lambda image: self.preprocess.train(image, rng, images[row]))
      for key in view.keys() - {"image"}:
        extras[key].append(view[key])
    return {"image": images, "label": labels} | {k: np.stack(v) for k, v in extras.items()}


class _EvalBatch:
  """Batch ``k`` -> examples ``start + k * rows ...`` of this process's part, padded past its
  end (``mask`` False)."""

  def __init__(self, source: Any, preprocess: host.Preprocess, rows: int, start: int, end: int):
    self.source, self.preprocess, self.rows = source, preprocess, rows
    self.start, self.end = start, end

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    images = np.zeros((self.rows,) + self.preprocess.eval_shape(), np.uint8)
    labels = np.zeros(self.rows, np.int32)
    first = self.start + k * self.rows
    mask = np.arange(first, first + self.rows) < self.end
    for row in np.flatnonzero(mask):
      _, labels[row] = _read(self.source, first + row,
                             lambda image: self.preprocess.eval(image, images[row]))
    return {"image": images, "label": labels, "mask": mask}


def _iterate(dataset: grain.MapDataset, threads: int | None, workers: int
             ) -> Iterator[dict[str, np.ndarray]]:
  """Batches computed ahead on ``threads`` threads (each builds whole batches) and in
  ``workers`` Grain worker processes."""
  threads = threads or default_threads()
  batches = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  if workers:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags
      flags.FLAGS(sys.argv[:1], known_only=True)
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(batches)


class TrainLoader:
  """Endless, deterministic train batches of this process's rows, from global step
  ``start_step`` on; ``step`` is the next batch's step."""

  def __init__(self, source: Any, preprocess: host.Preprocess, global_batch: int, *,
               seed: int = 0, start_step: int = 0, threads: int | None = None,
               workers: int = 0):
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0; got {start_step}")
    self.rows = local_batch_size(global_batch)
    self.order = order.GlobalOrder(len(source), global_batch, seed)
    self.steps_per_epoch = order.steps_per_epoch(len(source), global_batch,
                                                 f"{source.name} {source.split!r}")
    self.step, self.seed = start_step, seed
    batch = _TrainBatch(source, preprocess, self.order, self.rows,
                        jax.process_index() * self.rows)
    self._batches = _iterate(grain.MapDataset.range(start_step, _ENDLESS).map(batch), threads,
                             workers)

  def __iter__(self) -> "TrainLoader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self.step += 1
    return batch

  def state(self) -> dict[str, int]:
    """What recreates this loader at its position (with the same source and settings)."""
    return {"step": self.step, "seed": self.seed}


def eval_batches(source: Any, preprocess: host.Preprocess, global_batch: int, *,
                 threads: int | None = None, workers: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order; the tail is padded and ``mask`` marks real rows.

  Each process reads a contiguous part, and every process yields the same number of batches
  (its part padded up to the largest part), so that collective eval steps line up.
  """
  rows = local_batch_size(global_batch)
  parts = even_bounds(len(source), jax.process_count())
  start, end = parts[jax.process_index()]
  steps = max(1, math.ceil(max(e - s for s, e in parts) / rows))
  batch = _EvalBatch(source, preprocess, rows, start, end)
  yield from _iterate(grain.MapDataset.range(steps).map(batch), threads, workers)


class _Failed:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def prefetch_to_device(iterator: Iterator[dict[str, np.ndarray]], size: int,
                       put: Callable[[np.ndarray], Any]) -> Iterator[dict[str, Any]]:
  """Batches of ``iterator`` put on the devices by a background thread, up to ``size`` ahead.

  ``put`` maps a host array to a device array (the steps' ``put``). Off the main thread, the
  host-to-device copy overlaps the step's dispatch instead of delaying it. The batches come in
  order, unchanged; an error raised in the thread (by the loader or ``put``) is raised here.
  Closing the generator stops the thread after the batch it is on, and waits for it: close it
  (``contextlib.closing``) rather than leave it to the garbage collector, since a thread still
  inside the loader or a transfer when the interpreter exits aborts the process.
  """
  if size < 1:
    raise ValueError(f"prefetch must be at least 1 batch; got {size}")
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item: Any) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def fill() -> None:
    try:
      for batch in iterator:
        if not offer(jax.tree_util.tree_map(put, batch)):
          return
      offer(_END)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
      offer(_Failed(e))

  thread = threading.Thread(target=fill, name="prefetch_to_device", daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is _END:
        return
      if isinstance(item, _Failed):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
