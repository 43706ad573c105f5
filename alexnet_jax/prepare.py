"""``python -m alexnet_jax.prepare SOURCE OUT_DIR --mode paper|shorter``: see
``alexnet_jax.data.prepare``."""

import sys

from alexnet_jax import extras

COMMAND = "python -m alexnet_jax.prepare"

if __name__ == "__main__":
  # Before alexnet_jax.data.prepare, which imports Grain; TFDS, sklearn and TensorFlow are named
  # when a source needs them.
  extras.require(COMMAND, "grain", "array_record", "simplejpeg", "PIL", "cv2")
  with extras.needed_by(COMMAND):
    from alexnet_jax.data.prepare import main
    sys.exit(main())
