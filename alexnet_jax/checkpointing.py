"""Orbax checkpoints of a training run.

``WORKDIR/checkpoints`` holds the last ``config.keep_checkpoints`` checkpoints plus the best one by
eval top-1. Each holds the train state (params, optimizer state, step, RNG, plateau state), the
config and a checksum of every array of the state; the data iterator's position follows from the
step and the config. The state is saved unreplicated, so a checkpoint restores on any number of
devices.

Orbax checksums only its shard indexes, not the array data, so a flipped bit in a chunk restores
silently. Two checks fill that gap: ``record_files`` lists each file's size and CRC32 once a save
is complete (found before TensorStore reads a damaged file), and ``fingerprint`` checksums every
array on the devices (an integer sum, so the same on any device count; it also tells whether the
state is finite, which a save requires). ``restore_latest`` verifies before the state is used,
and moves a damaged checkpoint aside to ``checkpoints/corrupt/STEP-REASON`` (never deletes it) so
that the run, and every rerun, goes on from the newest intact one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from alexnet_jax import config_checks
from alexnet_jax.files import CheckpointError, write_atomically

WHICH = config_checks.EVAL_CHECKPOINTS
CORRUPT_DIR = "corrupt"
ITEMS = ("state", "config")  # what a checkpoint must hold to resume from it
FILE_LIST = "files.json"  # beside the items: see record_files


class DamagedCheckpoint(CheckpointError):
  """A checkpoint whose files are missing, unreadable or fail their checksum."""

  def __init__(self, directory: str, step: int, reason: str, detail: str):
    self.step, self.reason = step, reason
    super().__init__(f"checkpoint {step} in {directory} is damaged ({reason}): {detail}")


def create_manager(workdir: str, config: Any, training: bool = True) -> ocp.CheckpointManager:
  """The workdir's manager; only a training run's removes half-written saves (an evaluator
  beside a running trainer must not remove the save it is writing)."""
  policies = ocp.checkpoint_managers
  keep_best = policies.BestN(get_metric_fn=lambda m: m["eval_top1"], n=1,
                             keep_checkpoints_without_metrics=False)
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=config.async_checkpointing,
      cleanup_tmp_directories=training,  # the half-written saves of a killed run
      best_fn=lambda m: m["eval_top1"], best_mode="max",
      preservation_policy=policies.AnyPreservationPolicy(
          [policies.LatestN(n=config.keep_checkpoints), keep_best]))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


# ----------------------------------------------------------------------------------------------
# Checksums.

# Knuth's multiplicative constant: odd, so every element's weight is odd and a change of any
# single bit changes the sum (mod 2**32).
_MIX = np.uint32(2654435761)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize >= 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  else:
    words = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.arange(words.size, dtype=jnp.uint32)
  return jnp.sum(words * ((index * np.uint32(2) + np.uint32(1)) * _MIX), dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnums=1)
def _fingerprint(leaves: list[jax.Array], checked: tuple[bool, ...]
                 ) -> tuple[jax.Array, jax.Array]:
  sums = jnp.stack([_leaf_checksum(x) for x in leaves])
  finite = [jnp.all(jnp.isfinite(x)) for x, c in zip(leaves, checked)
            if c and jnp.issubdtype(x.dtype, jnp.inexact)]
  return sums, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def _path_name(path: tuple) -> str:
  """``params/fc1/kernel``: the same for a TrainState and for the nested dicts Orbax reports."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# The plateau state starts at +inf (no best value yet): only these must be finite.
_MUST_BE_FINITE = ("params", "opt_state")


def fingerprint(state: Any) -> tuple[dict[str, int], bool]:
  """A checksum of every array of ``state`` by its path, and whether its params and optimizer
  state are all finite."""
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state))
  names = [_path_name(p) for p in paths]
  checked = tuple(n.split("/")[0] in _MUST_BE_FINITE for n in names)
  sums, finite = jax.device_get(_fingerprint(list(leaves), checked))
  return {n: int(s) for n, s in zip(names, sums)}, bool(finite)


# ----------------------------------------------------------------------------------------------
# Saving.


def diverged(what: str, manager: ocp.CheckpointManager) -> FloatingPointError:
  """The error that stops a run whose loss or state stopped being finite: ``what`` happened."""
  return FloatingPointError(
      f"{what}. The last good checkpoint is {last_good(manager)}. Lower the learning rate (or "
      "raise warmup_epochs), or check the data, then rerun to resume from it.")


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: Any,
         eval_metrics: Mapping[str, float] | None = None) -> None:
  """Saves in the background; the device-to-host copy is done before this returns.

  Raises FloatingPointError, and writes nothing, if the state holds a NaN or an infinity.
  """
  if step in manager.all_steps():
    return
  checksums, finite = fingerprint(state)
  if not finite:
    raise diverged(f"the parameters or optimizer state hold NaN or inf at step {step}; not "
                   "saving it", manager)
  metrics = {"eval_top1": float(eval_metrics["eval_top1"])} if eval_metrics else None
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
      integrity=ocp.args.JsonSave({"checksums": checksums})), metrics=metrics, force=True)


class Saver:
  """The training loop's saves: at most one in the background; its failure, or a synchronous
  one, raised as a CheckpointError that names the newest complete checkpoint.

  ``poll()`` after each step finishes a save that is done; ``close()`` waits for the last.
  """

  def __init__(self, manager: ocp.CheckpointManager, config: Any):
    self.manager, self.config = manager, config
    self._saving: int | None = None  # the step of a save still being written

  def save(self, step: int, state: Any, eval_metrics: Mapping[str, float] | None = None) -> None:
    self.close()  # the previous save's failure, before this one is started
    try:
      save(self.manager, step, state, self.config, eval_metrics)
    except (FloatingPointError, CheckpointError):
      raise
    except Exception as e:  # noqa: BLE001  (a synchronous save fails here)
      raise self._failed(step, e) from e
    self._saving = step

  def poll(self) -> None:
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.close()

  def close(self) -> None:
    """Waits for the save in flight, if any, and records its files."""
    step, self._saving = self._saving, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      record_files(self.manager, step)
    except Exception as e:  # noqa: BLE001  (whatever the file system raised)
      raise self._failed(step, e) from e

  def _failed(self, step: int, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"saving checkpoint {step} failed: {describe_error(error)}. The run stopped; the newest "
        f"complete checkpoint is {last_good(self.manager)}. Free space or fix the file system, "
        "then rerun to resume from it.")


def last_good(manager: ocp.CheckpointManager) -> str:
  """The newest checkpoint on disk, described for a stop message."""
  manager.reload()  # after a failed save, Orbax's own list may have dropped steps still on disk
  step = manager.latest_step()
  return "none (no checkpoint was written)" if step is None else (
      f"step {step} ({_step_dir(manager, step)})")


# ----------------------------------------------------------------------------------------------
# Restoring, verified.


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _chain_text(error: BaseException) -> str:
  """The messages of ``error`` and of every exception it was raised from."""
  chain, cause = str(error), error.__cause__ or error.__context__
  while cause is not None:
    chain, cause = chain + str(cause), cause.__cause__ or cause.__context__
  return chain


def describe_error(error: BaseException) -> str:
  """The exception's first line (its middle cut when long), led by the OS error that
  TensorStore names only by number, deep in the message or in a cause."""
  text = (str(error).strip().splitlines() or [""])[0]
  if len(text) > 300:
    text = f"{text[:150]} ... {text[-150:]}"
  text = f"{type(error).__name__}: {text}"
  code = re.search(r"os_error_code='?(\d+)", _chain_text(error))
  return f"{os.strerror(int(code[1]))} ({text})" if code else text


# TensorStore's codes for data that is not there or does not decode, and Orbax's for an item
# that is not there: only these count as damage. Anything else (out of memory, a file system
# that is away, no permission) leaves the checkpoint where it is.
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                 "INVALID_ARGUMENT", "was not found in the checkpoint")
_TRANSIENT_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                    "ABORTED")


def _is_damage(error: BaseException) -> bool:
  if isinstance(error, (MemoryError, jax.errors.JaxRuntimeError)):
    return False
  chain = _chain_text(error)
  return (any(c in chain for c in _DAMAGE_CODES)
          and not any(c in chain for c in _TRANSIENT_CODES))


def _restore_item(manager: ocp.CheckpointManager, step: int, name: str, args: Any) -> Any:
  try:
    return manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
  except Exception as e:  # noqa: BLE001  (TensorStore and Orbax raise many kinds)
    if _is_damage(e):
      raise DamagedCheckpoint(manager.directory, step, f"{name}-unreadable",
                              describe_error(e)) from e
    raise CheckpointError(f"checkpoint {step} in {manager.directory} could not be read, and "
                          f"was left in place: {describe_error(e)}") from e


def _check_shapes(manager: ocp.CheckpointManager, step: int, template: Any) -> None:
  """A checkpoint of another model is a config problem, not damage: say so before restoring."""
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = checkpointer.metadata(os.path.join(_step_dir(manager, step), "state")).item_metadata
    stored = stored.tree if hasattr(stored, "tree") else stored
    stored = {_path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
  except Exception as e:  # noqa: BLE001
    raise DamagedCheckpoint(manager.directory, step, "state-metadata-unreadable",
                            describe_error(e)) from e
  if not stored:
    raise DamagedCheckpoint(manager.directory, step, "state-metadata-empty",
                            "the state item lists no arrays")
  wanted = {_path_name(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_leaves_with_path(template)}
  wrong = [f"{k} {stored.get(k)} vs {v}" for k, v in wanted.items() if stored.get(k) != v]
  if wrong:
    raise CheckpointError(
        f"checkpoint {step} in {manager.directory} holds another model than the config's: "
        f"{'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} (checkpoint vs config). "
        "Use the config it was trained with, or another workdir.")


def _agreed(manager: ocp.CheckpointManager, step: int, stage: Callable[[], Any],
            only_process_0: bool = False) -> Any:
  """Runs one stage of a restore; if it finds damage on any process, every process raises.

  Every process must take the same path: Orbax's restore and the checksums are collectives.
  """
  damage, result = None, None
  if not only_process_0 or jax.process_index() == 0:
    try:
      result = stage()
    except DamagedCheckpoint as e:
      damage = e
  if not _all_agree(damage is None):
    raise damage or DamagedCheckpoint(manager.directory, step, "unreadable-elsewhere",
                                      "another process found it damaged")
  return result


def restore_step(manager: ocp.CheckpointManager, step: int, template: Any,
                 config: Any | None = None) -> Any:
  """The verified state of checkpoint ``step``, shaped like ``template``.

  Raises DamagedCheckpoint if a file or item is missing or unreadable or a checksum differs,
  CheckpointError if it holds another model or cannot be read for another reason, and
  config_checks.ConfigChanged if ``config`` (when given) would change the run.
  """
  folder = _step_dir(manager, step)
  _agreed(manager, step, lambda: check_files(manager, step), only_process_0=True)
  if config is not None:
    stored = _agreed(manager, step, lambda: stored_config(manager, step))
    config_checks.check_resume(stored, config, step, verbose=jax.process_index() == 0)
  _agreed(manager, step, lambda: _check_shapes(manager, step, template))
  expected = None
  if os.path.isdir(os.path.join(folder, "integrity")):
    expected = _agreed(manager, step, lambda: _restore_item(
        manager, step, "integrity", ocp.args.JsonRestore())["checksums"])
  elif jax.process_index() == 0:
    print(f"warning: checkpoint {step} in {manager.directory} has no checksums (written by an "
          "older version); its data is not verified", file=sys.stderr, flush=True)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  state = _agreed(manager, step, lambda: _restore_item(
      manager, step, "state", ocp.args.StandardRestore(abstract)))
  if expected is None:
    return state
  checksums, _ = fingerprint(state)  # the same on every process: no agreement needed
  wrong = sorted(k for k in set(checksums) | set(expected) if checksums.get(k) != expected.get(k))
  if wrong:
    raise DamagedCheckpoint(manager.directory, step, "checksum-mismatch",
                            f"the data of {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}"
                            " differs from what was saved")
  return state


def _files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, f), folder)
                for root, _, names in os.walk(folder) for f in names if f != FILE_LIST)


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def record_files(manager: ocp.CheckpointManager, step: int) -> None:
  """Writes the size and CRC32 of every file of the completed checkpoint ``step`` beside them.

  Lets a restore find a deleted, truncated or rewritten file before TensorStore reads it (whose
  errors come with tracebacks from its threads); the array checksums remain the final check.
  """
  folder = _step_dir(manager, step)
  if jax.process_index() != 0 or os.path.exists(os.path.join(folder, FILE_LIST)):
    return
  listing = {f: [os.path.getsize(os.path.join(folder, f)), _crc32(os.path.join(folder, f))]
             for f in _files(folder)}
  write_atomically(os.path.join(folder, FILE_LIST), json.dumps(listing))


def check_files(manager: ocp.CheckpointManager, step: int) -> None:
  """Raises DamagedCheckpoint if an item is missing or a file differs from ``record_files``'."""
  folder = _step_dir(manager, step)
  missing = [item for item in ITEMS if not os.path.isdir(os.path.join(folder, item))]
  if missing:
    raise DamagedCheckpoint(manager.directory, step, f"{missing[0]}-missing",
                            f"no {', '.join(missing)} item in {folder}")
  try:
    with open(os.path.join(folder, FILE_LIST)) as f:
      listing = json.load(f)
  except FileNotFoundError:  # killed between the save and the listing, or an older version
    return
  except (OSError, ValueError) as e:
    raise DamagedCheckpoint(manager.directory, step, "file-list-unreadable", str(e)) from e
  for name, (size, crc) in listing.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise DamagedCheckpoint(manager.directory, step, "file-missing", f"{name} is missing")
    found = os.path.getsize(path)
    if found != size:
      raise DamagedCheckpoint(manager.directory, step, "file-size",
                              f"{name} has {found} bytes, {size} were written")
    if _crc32(path) != crc:
      raise DamagedCheckpoint(manager.directory, step, "file-changed",
                              f"{name} differs from what was written (CRC32)")


def stored_config(manager: ocp.CheckpointManager, step: int) -> dict:
  return _restore_item(manager, step, "config", ocp.args.JsonRestore())


def _all_agree(flag: bool) -> bool:
  """Whether ``flag`` holds on every process (each may have read different files)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def move_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> str:
  """Moves checkpoint ``step`` to ``checkpoints/corrupt/STEP-REASON`` (process 0 moves it)."""
  target = os.path.join(str(manager.directory), CORRUPT_DIR, f"{step}-{reason}")
  if os.path.exists(target):
    target += f"-{int(time.time())}"
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(_step_dir(manager, step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"alexnet_jax moved checkpoint {step} aside")
  manager.reload()
  return target


def restore_latest(manager: ocp.CheckpointManager, template: Any, config: Any) -> Any | None:
  """The state of the newest intact checkpoint, or None if there is none.

  Newer damaged checkpoints are moved aside with a warning; if all are damaged, this raises
  (after moving them) rather than let the run start afresh unnoticed. The config is compared
  with each checkpoint's first (``config_checks.check_resume``).
  """
  moved = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_step(manager, step, template, config)
    except DamagedCheckpoint as damage:
      target = move_aside(manager, step, damage.reason)
      moved.append(target)
      if jax.process_index() == 0:
        print(f"warning: {damage}; moved it to {target} and trying the checkpoint before it",
              file=sys.stderr, flush=True)
  if moved:
    raise CheckpointError(
        f"no intact checkpoint in {manager.directory}: all were damaged and moved to "
        f"{os.path.dirname(moved[0])}. Rerun to start afresh in this workdir.")
  return None


def restore(manager: ocp.CheckpointManager, template: Any, which: str = "latest") -> Any | None:
  """The verified state of the latest or best checkpoint, or None if none; nothing is moved."""
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}; got {which!r}")
  step = manager.latest_step() if which == "latest" else manager.best_step()
  return None if step is None else restore_step(manager, step, template)


def restore_params(path: str) -> Any:
  """``params`` of the latest checkpoint in a workdir, its ``checkpoints`` folder or a step."""
  path = os.path.abspath(path)
  for folder in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
      with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
          read_only=True)) as manager:
        step = manager.latest_step()
        return _restore_item(manager, step, "state", ocp.args.StandardRestore())["params"]
  if os.path.isdir(os.path.join(path, "state")):
    try:
      return ocp.StandardCheckpointer().restore(os.path.join(path, "state"))["params"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path!r}: the checkpoint cannot be read "
                            f"({describe_error(e)})") from e
  raise FileNotFoundError(f"{path!r} is not an Orbax checkpoint (a workdir, its checkpoints "
                          "folder or one step folder)")
