"""Trains or evaluates an AlexNet: ``python train.py --config configs/NAME.py --workdir DIR``.

Override any config field with ``--config.FIELD=VALUE``; ``--mode eval`` evaluates the latest (or
``--config.eval_checkpoint=best``) checkpoint of the workdir.

Multi-process (multi-host): start the same command in every process with ``--distributed`` (Cloud
TPU pod slices, SLURM, Open MPI: JAX finds the rest) or with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES``,
``$JAX_PROCESS_ID``).

Bad settings, damaged checkpoints and failed saves end with one ``error:`` line and exit status 1
(``--verbosity=0`` or higher also prints the traceback). SIGTERM or SIGINT saves the current step
and exits 0; rerunning the command resumes.
"""

import os
import sys

from alexnet_jax import extras
from alexnet_jax.files import USER_ERRORS

COMMAND = "python train.py"
with extras.needed_by(COMMAND):  # without the train extra: one line naming it, no traceback
  from absl import app, flags, logging
  from ml_collections import config_flags

try:  # ml_collections applies the --config.FIELD overrides here, when the flag is defined
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
      "Config file (a get_config() module).", lock_config=True)
except (AttributeError, KeyError) as e:  # its words for a field the config does not have
  _text = e
  while isinstance(_text, BaseException) and _text.args:  # KeyError in AttributeError
    _text = _text.args[0]
  _field, _, _hint = str(_text).partition("\n")  # ml_collections: "'name'\nDid you mean ...?"
  sys.exit(f"error: the config has no field {_field.strip(chr(39))!r} (set by a "
           f"--config.FIELD=... override). {_hint + ' ' if _hint else ''}configs/default.py "
           "lists every field with its default")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resuming from the workdir's latest checkpoint) or eval.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax.distributed, detecting the processes from the cluster "
    "(Cloud TPU pod slice, SLURM, Open MPI). Implied by the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, reachable from every process "
    "(default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0 .. num_processes - 1 "
                                   "(default: $JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as dead "
    "and the others stop.")


def _without_traceback(record) -> bool:
  """A log filter: keeps the record, drops its traceback."""
  record.exc_info, record.exc_text = None, None
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    # Orbax logs the traceback of a failed background save; the error line says what failed.
    logging.get_absl_handler().addFilter(_without_traceback)
  from alexnet_jax import distributed  # after flag parsing: --help stays fast

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto_detect=_DISTRIBUTED.value,
                         heartbeat_timeout_seconds=_HEARTBEAT.value)
  with extras.needed_by(COMMAND):
    from alexnet_jax import training

  run = training.train_and_evaluate if _MODE.value == "train" else training.evaluate_checkpoint

  def job():
    try:
      with extras.needed_by(COMMAND):  # inside: USER_ERRORS has ImportError, unnamed extras
        run(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as e:
      if flags.FLAGS["verbosity"].present:  # asked for details: the traceback too
        raise
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)

  distributed.run_or_abort(job)


if __name__ == "__main__":
  app.run(main)
