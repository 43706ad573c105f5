"""The loader: Grain datasets that yield this process's rows of every global batch.

Batches are numpy dicts: ``image`` uint8 (N, H, W, C), ``label`` int32 (N,), and from the train
presets ``flip`` (N,) and ``colour`` (N, 3) for the device to apply; eval batches add ``mask``.
Process ``p`` of ``P`` reads rows ``[p * B / P, (p + 1) * B / P)`` of each global batch of the one
global order (``order``), so the batches do not depend on the topology. Placing them on devices
(and any per-device layout) is the steps' ``put``.

The per-example work (read, decode, crop) runs on ``threads`` threads of this process, which the
decoders let run in parallel (they release the GIL), and optionally in ``workers`` Grain worker
processes.
"""

from __future__ import annotations

import collections
import math
import os
import sys
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


class _TrainExample:
  """Local element ``j`` -> the example of row ``first_row + j % rows`` of global batch
  ``j // rows``."""

  def __init__(self, source: Any, preprocess: host.Preprocess, global_order: order.GlobalOrder,
               rows: int, first_row: int):
    self.source, self.preprocess, self.order = source, preprocess, global_order
    self.rows, self.first_row = rows, first_row

  def __call__(self, j: int) -> dict[str, Any]:
    step, row = divmod(j, self.rows)
    index, rng = self.order.locate(step, self.first_row + row)
    image, label = self.source[index]
    try:
      view = self.preprocess.train(image, rng)
    except host.DecodeError as e:
      raise _undecodable(self.source, index, e) from e
    return view | {"label": np.int32(label)}


class _EvalExample:
  """Element ``j`` -> example ``start + j`` of this process's part, or padding past its end."""

  def __init__(self, source: Any, preprocess: host.Preprocess, start: int, end: int):
    self.source, self.preprocess, self.start, self.end = source, preprocess, start, end

  def __call__(self, j: int) -> dict[str, Any]:
    index = self.start + j
    if index >= self.end:
      return {"image": np.zeros(self.preprocess.eval_shape(), np.uint8),
              "label": np.int32(0), "mask": np.bool_(False)}
    image, label = self.source[index]
    try:
      view = self.preprocess.eval(image)
    except host.DecodeError as e:
      raise _undecodable(self.source, index, e) from e
    return {"image": view, "label": np.int32(label), "mask": np.bool_(True)}


def _iterate(dataset: grain.MapDataset, rows: int, threads: int | None, workers: int
             ) -> Iterator[dict[str, np.ndarray]]:
  threads = threads or default_threads()
  batches = dataset.batch(rows, drop_remainder=True).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(rows, threads)))
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
    example = _TrainExample(source, preprocess, self.order, self.rows,
                            jax.process_index() * self.rows)
    self._batches = _iterate(
        grain.MapDataset.range(start_step * self.rows, _ENDLESS).map(example),
        self.rows, threads, workers)

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
  example = _EvalExample(source, preprocess, start, end)
  yield from _iterate(grain.MapDataset.range(steps * rows).map(example), rows, threads, workers)


def prefetch_to_device(iterator: Iterator[dict[str, np.ndarray]], size: int,
                       put: Callable[[np.ndarray], Any]) -> Iterator[dict[str, Any]]:
  """Keeps ``size`` batches in flight to the devices so the step never waits on the transfer.

  ``put`` maps a host array to a device array (the steps' ``put``).
  """
  queue = collections.deque()

  def enqueue(n):
    for batch in iterator:
      queue.append(jax.tree_util.tree_map(put, batch))
      if len(queue) >= n:
        return

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
