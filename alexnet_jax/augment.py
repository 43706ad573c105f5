"""The device half of preprocessing: uint8 batches become the model's float input.

The host pipeline (``input_pipeline``) crops, resizes and flips in uint8 and ships bytes; this
runs inside the jitted train and eval steps, where the arithmetic is nearly free, so that every
pixel crosses to the device as one byte instead of four. Only jax here: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Normalize:
  """``(image / 255 + colour - mean) / std`` per channel.

  ``colour`` is the per-example RGB shift of the paper's PCA colour noise (pixels in [0, 1]),
  drawn on the host with the rest of the example's randomness; batches without it get none.
  Float images pass through unchanged: they are taken to be model input already.
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    image = batch["image"]
    if jnp.issubdtype(image.dtype, jnp.floating):
      return image
    x = image.astype(jnp.float32) * (1.0 / 255.0)
    if "colour" in batch:
      colour = batch["colour"].astype(jnp.float32)
      x = x + colour.reshape(colour.shape[:1] + (1,) * (x.ndim - 2) + colour.shape[-1:])
    mean = jnp.asarray(self.mean, jnp.float32)
    return (x - mean) * jnp.asarray([1.0 / s for s in self.std], jnp.float32)
