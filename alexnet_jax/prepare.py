"""``python -m alexnet_jax.prepare SOURCE OUT_DIR --mode paper|shorter``: see
``alexnet_jax.data.prepare``."""

import sys

from alexnet_jax.data.prepare import main

if __name__ == "__main__":
  sys.exit(main())
