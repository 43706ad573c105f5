"""Trains or evaluates an AlexNet: ``python train.py --config configs/NAME.py --workdir DIR``.

Override any config field with ``--config.FIELD=VALUE``; ``--mode eval`` evaluates the latest (or
``--config.eval_checkpoint=best``) checkpoint of the workdir.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Config file (a get_config() module).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resuming from the workdir's latest checkpoint) or eval.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from alexnet_jax import training  # after flag parsing: --help stays fast

  if _MODE.value == "train":
    training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    training.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
