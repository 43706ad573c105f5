"""The device half of preprocessing: uint8 batches become the model's float input.

The host (``host``) decodes and crops in uint8 and ships bytes, plus each example's ``flip`` and
paper ``colour`` draw; this runs inside the jitted train and eval steps, where the arithmetic is
nearly free, so that every pixel crosses to the device as one byte instead of four. Only jax.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Normalize:
  """Flip where ``flip``, then ``(image / 255 + colour - mean) / std`` per channel.

  ``flip`` (bool per example) mirrors the image left to right; ``colour`` is the per-example RGB
  shift of the paper's PCA colour noise (pixels in [0, 1]); batches without them get neither.
  Float images pass through unchanged: they are taken to be model input already.
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    image = batch["image"]
    if jnp.issubdtype(image.dtype, jnp.floating):
      return image
    if "flip" in batch:
      flip = batch["flip"].reshape(batch["flip"].shape[:1] + (1,) * (image.ndim - 1))
      image = jnp.where(flip, jnp.flip(image, axis=-2), image)
    x = image.astype(jnp.float32) * (1.0 / 255.0)
    if "colour" in batch:
      colour = batch["colour"].astype(jnp.float32)
      x = x + colour.reshape(colour.shape[:1] + (1,) * (x.ndim - 2) + colour.shape[-1:])
    mean = jnp.asarray(self.mean, jnp.float32)
    return (x - mean) * jnp.asarray([1.0 / s for s in self.std], jnp.float32)
