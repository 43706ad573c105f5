"""The one global order: which example fills each row of each global batch, and its randomness.

Epoch ``e`` is a permutation of the split drawn from (seed, e); global batch ``k`` is positions
``[(k % S) * B, (k % S + 1) * B)`` of epoch ``k // S`` (``S`` steps of ``B`` per epoch, the
remainder left out). Every example's augmentation comes from its own generator, keyed by (seed,
epoch, position). Nothing depends on the number of processes or devices: a process only picks
which rows of each global batch it reads, and a resume at step ``k`` starts there in O(1).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

_PERMUTATION, _EXAMPLE = 1, 2  # key domains: the two uses never share a stream


def _generator(*words: int) -> np.random.Generator:
  """A Philox generator keyed by up to four 32-bit words: cheap to make, one per example."""
  key = 0
  for word in words:
    key = (key << 32) | (int(word) & 0xFFFFFFFF)
  return np.random.Generator(np.random.Philox(key=key))


@functools.lru_cache(maxsize=4)
def permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Epoch ``epoch``'s order of the split's indices."""
  return _generator(_PERMUTATION, seed, epoch).permutation(num_examples)


def steps_per_epoch(num_examples: int, global_batch: int, name: str = "the split") -> int:
  """Whole global batches in an epoch; ValueError when there is not one."""
  if num_examples < global_batch:
    raise ValueError(f"{name} has {num_examples} examples, fewer than one global batch of "
                     f"{global_batch}")
  return num_examples // global_batch


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """The example and generator of every (step, row) of a run's global batches."""
  num_examples: int
  global_batch: int
  seed: int = 0

  @functools.cached_property
  def steps_per_epoch(self) -> int:
    return steps_per_epoch(self.num_examples, self.global_batch)

  def locate(self, step: int, row: int) -> tuple[int, np.random.Generator]:
    """The index of the example in row ``row`` of global batch ``step``, and its generator."""
    epoch, position = divmod(step, self.steps_per_epoch)
    position = position * self.global_batch + row
    index = int(permutation(self.seed, epoch, self.num_examples)[position])
    return index, _generator(_EXAMPLE, self.seed, epoch, position)
