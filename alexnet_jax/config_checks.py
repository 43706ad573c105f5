"""What a training config's counts may be, and which changes a resumed run accepts.

``validate`` checks every setting a run reads before any slow work (building the sources can mean
preparing a TFDS dataset): the model, presets, dtype, parallel mode, optimizer and counts.
``check_resume`` compares a checkpoint's config
with the current one: a change that alters the run's trajectory stops it unless
``allow_config_change`` is set.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping

from alexnet_jax import optim
from alexnet_jax.data import host
from alexnet_jax.models import DTYPES, VARIANTS
from alexnet_jax.optim import is_int, is_real

PARALLEL_MODES = ("pmap", "jit", "hybrid")
EVAL_CHECKPOINTS = ("latest", "best")

# Fields a resume may change: how often the run logs, evaluates and saves, where it finds its
# files, how it is spread over devices (the same step body; a checkpoint restores on any
# device count, though dropout masks follow the count), and what seeds a fresh run.
RESUME_SAFE = frozenset({
    "log_every_steps", "eval_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "async_checkpointing", "tensorboard", "eval_checkpoint", "halt_at_step",
    "prefetch", "data_threads", "data_workers", "eval_batch_size", "parallel", "model_parallel",
    "data_dir", "manual_dir", "init_from", "init_replace_head", "allow_config_change"})
# The plateau schedule is driven by the evaluations, so for it these change the run.
PLATEAU_INPUTS = frozenset({"eval_every_steps", "eval_every_epochs", "eval_batch_size"})
# A longer run may resume a shorter one (extending it); a shorter one is a change.
LENGTH_FIELDS = ("num_train_steps", "num_epochs")
# Schedules whose learning rate at a step depends on the run's length.
LENGTH_SCHEDULES = ("cosine",)

# field: the smallest valid value; None means "-1 (unset) or at least 1".
_INTS = {"batch_size": 1, "eval_batch_size": 0, "log_every_steps": 1, "eval_every_steps": 0,
         "checkpoint_every_steps": 0, "keep_checkpoints": 1, "prefetch": 1, "image_size": 1,
         "resize_size": 1, "pad": 0, "model_parallel": 1, "data_threads": 0, "data_workers": 0,
         "seed": 0, "num_train_steps": None, "halt_at_step": None}
_REALS = {"eval_every_epochs": 0.0}
_BOOLS = ("async_checkpointing", "tensorboard", "init_replace_head",
          "allow_config_change")


class ConfigChanged(ValueError):
  """The current config would change the run that a workdir's checkpoint belongs to."""


def validate(config: Any) -> None:
  """Raises ValueError naming the first field with a value out of range, and what is valid."""
  if config.model not in VARIANTS:
    raise ValueError(f"config.model must be one of {VARIANTS}; got {config.model!r}")
  for name, low in _INTS.items():
    value = config[name]
    if low is None:
      if not is_int(value) or (value < 1 and value != -1):
        raise ValueError(f"config.{name} must be a positive integer, or -1 for none; "
                         f"got {value!r}")
    elif not is_int(value) or value < low:
      what = "a positive integer" if low == 1 else f"an integer >= {low}"
      raise ValueError(f"config.{name} must be {what}; got {value!r}")
  for name, low in _REALS.items():
    value = config[name]
    if not is_real(value) or value < low:
      raise ValueError(f"config.{name} must be a number >= {low}; got {value!r}")
  for name in _BOOLS:
    if not isinstance(config[name], bool):
      raise ValueError(f"config.{name} must be True or False; got {config[name]!r}")
  epochs = config.num_epochs
  if config.num_train_steps == -1 and (not is_real(epochs) or epochs <= 0):
    raise ValueError(f"config.num_epochs must be a positive number when num_train_steps is -1; "
                     f"got {epochs!r}")
  for name, valid in (("parallel", PARALLEL_MODES), ("dtype", DTYPES),
                      ("eval_checkpoint", EVAL_CHECKPOINTS)):
    if config[name] not in valid:
      raise ValueError(f"config.{name} must be one of {valid}; got {config[name]!r}")
  if config.model_parallel != 1 and config.parallel != "hybrid":
    raise ValueError(f"config.model_parallel={config.model_parallel} needs "
                     f"config.parallel='hybrid'; got {config.parallel!r}")
  try:
    host.check_presets(config.train_preset, config.eval_preset)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  optim.check_settings(config)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _shortened(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Whether the run got shorter, or switched between counting steps and epochs."""
  old_steps, new_steps = old.get("num_train_steps", -1), new["num_train_steps"]
  if (old_steps > 0) != (new_steps > 0):
    return True
  if new_steps > 0:
    return new_steps < old_steps
  return new["num_epochs"] < old.get("num_epochs", new["num_epochs"])


def changes(stored: Mapping[str, Any], config: Any) -> list[str]:
  """``field: old -> new`` for each field whose change alters the run's trajectory.

  Fields the stored config lacks (written by an older version) are not compared.
  """
  old = _flat(stored)
  new = _flat(json.loads(json.dumps(config.to_dict())))  # tuples as lists, as stored
  safe = RESUME_SAFE - (PLATEAU_INPUTS if new.get("schedule") == "plateau" else frozenset())
  listed = [k for k in new if k in old and old[k] != new[k] and k not in safe
            and k not in LENGTH_FIELDS]
  if _shortened(old, new):
    listed += [k for k in LENGTH_FIELDS if k in old and old[k] != new[k]]
  return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(listed)]


def check_resume(stored: Mapping[str, Any], config: Any, step: int, verbose: bool = True
                 ) -> None:
  """Raises ConfigChanged listing what changed, unless ``config.allow_config_change``; prints
  the list (and a note on a stretched schedule) when ``verbose``."""
  listed = changes(stored, config)
  longer = [k for k in LENGTH_FIELDS if k in stored and stored[k] != config[k]]
  if verbose and longer and not listed and config.schedule in LENGTH_SCHEDULES:
    what = ", ".join(f"{k} {stored[k]} -> {config[k]}" for k in longer)
    print(f"note: the run is extended ({what}): the {config.schedule} schedule is stretched to "
          f"the new length from step {step} on", file=sys.stderr, flush=True)
  if not listed:
    return
  lines = "\n  ".join(listed)
  if config.allow_config_change:
    if verbose:
      print(f"warning: resuming step {step} with a changed config (allow_config_change=True):"
            f"\n  {lines}", file=sys.stderr, flush=True)
    return
  raise ConfigChanged(
      f"the checkpoint of step {step} was trained with another config; these changes would "
      f"alter the run:\n  {lines}\nRerun with the checkpoint's values, use another --workdir, "
      "or set --config.allow_config_change=True to go on with the new ones.")
