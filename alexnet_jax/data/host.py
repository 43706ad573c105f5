"""Host ops: an encoded (or uint8) image in, the uint8 model-size view out. numpy, simplejpeg,
OpenCV (Pillow only for formats other than JPEG).

Every view is "the pixels of a box of the source image, resampled to the output size": the box
is drawn from the image's shape (a JPEG's header gives it without decoding), a JPEG is decoded
at the smallest DCT scale that still leaves the box at least the output's size, and only the box
is resampled: OpenCV's area filter where it shrinks (antialiased), bilinear where it enlarges,
several times faster than Pillow's antialiased bilinear (docs/performance.md). A box that is
already the output's size is sliced, not resampled, so a store prepared at training resolution
costs a decode and a copy. Flips, the paper's colour shift and normalisation are the device's
(``device.Normalize``); the host only draws them.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
from typing import Callable

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels in [0, 1] (paper, section 4.1); the columns of EIGVEC are the
# eigenvectors, as in fb.resnet.torch's Lighting transform.
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009),
          (-0.5808, -0.0045, -0.8140),
          (-0.5836, -0.6948, 0.4203))
PCA_NOISE_STD = 0.1

# (top, left, bottom, right) in source pixels, fractional where a resize maps between grids.
Box = tuple[float, float, float, float]


class DecodeError(ValueError):
  """The bytes are not an image this pipeline can decode."""


def _is_jpeg(data: bytes) -> bool:
  return data[:3] == b"\xff\xd8\xff"


def image_shape(data: bytes | np.ndarray) -> tuple[int, int]:
  """(height, width) from the header alone."""
  if isinstance(data, np.ndarray):
    return data.shape[0], data.shape[1]
  try:
    if _is_jpeg(data):
      import simplejpeg  # pylint: disable=import-outside-toplevel
      height, width, _, _ = simplejpeg.decode_jpeg_header(data)
      return height, width
    width, height = Image.open(io.BytesIO(data)).size
    return height, width
  except Exception as e:  # noqa: BLE001  (each decoder has its own errors)
    raise DecodeError(_reason(e)) from e


def _reason(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  have = pixels.shape[-1]
  if have == channels:
    return pixels
  if channels == 3 and have == 1:
    return np.repeat(pixels, 3, axis=-1)
  if channels == 1 and have >= 3:  # ITU-R 601 luma, as PIL's convert("L")
    grey = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f"cannot make {channels} channel(s) from an image with {have}")


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int], channels: int) -> np.ndarray:
  """This thread's decode buffer, at least an image of ``shape``: reused, because a fresh one per
  image costs the kernel's zeroing of every page of it, a third of a small JPEG's decode."""
  size = shape[0] * shape[1] * channels
  buffer = getattr(_SCRATCH, "buffer", None)
  if buffer is None or buffer.size < size:
    buffer = _SCRATCH.buffer = np.empty(max(size, 256 * 256 * 3), np.uint8)
  return buffer


def decode(data: bytes | np.ndarray, channels: int, min_shape: tuple[int, int] = (0, 0),
           scratch: bool = False) -> np.ndarray:
  """uint8 (H, W, channels). A JPEG is decoded at the smallest DCT scale (1/2, 1/4, ...) whose
  result is at least ``min_shape``; other formats whole (grey, RGBA, CMYK, palette converted).
  ``scratch``: a JPEG may be decoded into this thread's reused buffer, which the next such
  decode on the thread overwrites (for callers that copy out what they need at once)."""
  if isinstance(data, np.ndarray):
    return _to_channels(data, channels)
  try:
    if _is_jpeg(data):
      import simplejpeg  # pylint: disable=import-outside-toplevel
      try:
        buffer = _scratch(image_shape(data), channels) if scratch else None
        pixels = simplejpeg.decode_jpeg(data, "GRAY" if channels == 1 else "RGB",
                                        min_height=min_shape[0], min_width=min_shape[1],
                                        buffer=buffer)
        return _to_channels(pixels, channels)
      except ValueError:
        pass  # CMYK and other JPEGs libjpeg-turbo's fast path refuses: PIL converts them
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if channels == 1 else "RGB")
    return _to_channels(np.asarray(image), channels)
  except Exception as e:  # noqa: BLE001
    raise DecodeError(_reason(e)) from e


def _whole_pixels(edges: tuple[float, float], limit: int) -> tuple[int, int]:
  """A box's edges on the pixel grid (rounded half up), at least one pixel apart."""
  start = min(max(math.floor(edges[0] + 0.5), 0), limit - 1)
  return start, min(max(math.floor(edges[1] + 0.5), start + 1), limit)


def resample(data: bytes | np.ndarray, box: Box, out_hw: tuple[int, int], channels: int,
             shape: tuple[int, int] | None = None, out: np.ndarray | None = None
             ) -> np.ndarray:
  """The pixels of ``box`` of the image, resized to ``out_hw``: uint8, written into ``out``
  (C-contiguous, e.g. a row of a batch) if given. ``shape`` is the image's (height, width) where
  the caller has read it already.

  A box that shrinks is cut at whole pixels of the decoded image (rounded: its edges move by at
  most half an output pixel) and area-filtered; one that enlarges is sampled bilinearly at its
  exact fractional place.
  """
  height, width = shape or image_shape(data)
  top, left, bottom, right = box
  out_h, out_w = out_hw
  # DCT scaling where the box is at least twice the output: the decoded image is then still at
  # least the output's resolution over the box.
  min_shape = (0, 0)
  if bottom - top >= 2 * out_h and right - left >= 2 * out_w:
    min_shape = (math.ceil(height * out_h / (bottom - top)),
                 math.ceil(width * out_w / (right - left)))
  import cv2  # pylint: disable=import-outside-toplevel
  if out is None:
    out = np.empty((out_h, out_w, channels), np.uint8)
  pixels = decode(data, channels, min_shape, scratch=True)
  sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
  top, bottom, left, right = top * sy, bottom * sy, left * sx, right * sx
  # OpenCV writes into `out` through dst= only as a 2-D array for one channel.
  dst = out[..., 0] if channels == 1 else out
  if bottom - top >= out_h and right - left >= out_w:
    t, b = _whole_pixels((top, bottom), pixels.shape[0])
    l, r = _whole_pixels((left, right), pixels.shape[1])
    crop = pixels[t:b, l:r]
    if crop.shape[:2] == (out_h, out_w):
      out[...] = crop
    else:
      cv2.resize(crop, (out_w, out_h), dst=dst, interpolation=cv2.INTER_AREA)
  else:
    # Output pixel centres mapped into the source (half-pixel centres, as PIL and torchvision).
    scale_y, scale_x = (bottom - top) / out_h, (right - left) / out_w
    to_source = np.array([[scale_x, 0, left + 0.5 * scale_x - 0.5],
                          [0, scale_y, top + 0.5 * scale_y - 0.5]])
    cv2.warpAffine(pixels, to_source, (out_w, out_h), dst=dst,
                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                   borderMode=cv2.BORDER_REPLICATE)
  return out


def shorter_side_to(height: int, width: int, side: int) -> tuple[int, int]:
  """The (height, width) that resizing the shorter side to ``side`` gives."""
  scale = side / min(height, width)
  return max(round(height * scale), side), max(round(width * scale), side)


def resized_box(height: int, width: int, resized: tuple[int, int], top: int, left: int,
                size: tuple[int, int]) -> Box:
  """The source box of rows [top, top + h) x cols [left, left + w) of the image resized to
  ``resized``."""
  sy, sx = height / resized[0], width / resized[1]
  return top * sy, left * sx, (top + size[0]) * sy, (left + size[1]) * sx


def rrc_window(height: int, width: int, rng: np.random.Generator,
               scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10
               ) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop window (top, left, h, w): area ~ U(scale), log-ratio ~
  U(log ratio), 10 tries, then a centre crop with the ratio clamped."""
  area = height * width * rng.uniform(*scale, attempts)
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), attempts))
  ws, hs = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
  ok = np.flatnonzero((ws > 0) & (hs > 0) & (ws <= width) & (hs <= height))
  offsets = rng.random(2)  # drawn whether used or not: one draw count per example
  if ok.size:
    h, w = int(hs[ok[0]]), int(ws[ok[0]])
    return int(offsets[0] * (height - h + 1)), int(offsets[1] * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def pca_colour(rng: np.random.Generator) -> np.ndarray:
  """The paper's colour noise: an RGB shift (pixels in [0, 1]) along ImageNet's principal
  components, scaled by their eigenvalues times alpha ~ N(0, 0.1)."""
  alpha = rng.normal(0.0, PCA_NOISE_STD, 3)
  return (np.array(EIGVEC) @ (alpha * np.array(EIGVAL))).astype(np.float32)


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The four corner crops, the centre crop and their horizontal flips: (10, size, size, C)."""
  bottom, right = image.shape[0] - size, image.shape[1] - size
  corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]
  crops = np.stack([image[t:t + size, l:l + size] for t, l in corners])
  return np.concatenate([crops, crops[:, :, ::-1]])


# ----------------------------------------------------------------------------------------------
# The presets: tables of view functions, (pre, data, rng, out) -> uint8 view for training and
# (pre, data, out) -> uint8 view for evaluation; each writes into ``out`` (of the preset's
# shape), a row of the batch.
Out = np.ndarray


def _paper_train(pre: Preprocess, data: bytes | np.ndarray, rng: np.random.Generator, out: Out
                 ) -> np.ndarray:
  """Shorter side to resize_size, its centre square, a random image_size crop of that."""
  height, width = image_shape(data)
  side, size = pre.resize_size, pre.image_size
  resized = shorter_side_to(height, width, side)
  top, left = rng.integers(0, side - size + 1, 2)
  top, left = (resized[0] - side) // 2 + int(top), (resized[1] - side) // 2 + int(left)
  return resample(data, resized_box(height, width, resized, top, left, (size, size)),
                  (size, size), pre.channels, (height, width), out)


def _torchvision_train(pre: Preprocess, data: bytes | np.ndarray, rng: np.random.Generator,
                       out: Out) -> np.ndarray:
  shape = image_shape(data)
  top, left, h, w = rrc_window(*shape, rng)
  return resample(data, (top, left, top + h, left + w), (pre.image_size,) * 2, pre.channels,
                  shape, out)


def _whole(pre: Preprocess, data: bytes | np.ndarray, out: Out | None) -> np.ndarray:
  height, width = image_shape(data)
  return resample(data, (0, 0, height, width), (pre.image_size,) * 2, pre.channels,
                  (height, width), out)


def _small_train(pre: Preprocess, data: bytes | np.ndarray, rng: np.random.Generator, out: Out
                 ) -> np.ndarray:
  """Resize to image_size, zero-pad ``pad`` pixels, random crop back (CIFAR's)."""
  padded = np.pad(_whole(pre, data, None), ((pre.pad, pre.pad), (pre.pad, pre.pad), (0, 0)))
  top, left = rng.integers(0, 2 * pre.pad + 1, 2)
  out[...] = padded[top:top + pre.image_size, left:left + pre.image_size]
  return out


def _center_crop(pre: Preprocess, data: bytes | np.ndarray, out: Out) -> np.ndarray:
  height, width = image_shape(data)
  size = pre.image_size
  resized = shorter_side_to(height, width, pre.resize_size)
  top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
  return resample(data, resized_box(height, width, resized, top, left, (size, size)),
                  (size, size), pre.channels, (height, width), out)


def _ten_crop(pre: Preprocess, data: bytes | np.ndarray, out: Out) -> np.ndarray:
  height, width = image_shape(data)
  resized = shorter_side_to(height, width, pre.resize_size)
  out[...] = ten_crop(resample(data, (0, 0, height, width), resized, pre.channels,
                               (height, width)), pre.image_size)
  return out


@dataclasses.dataclass(frozen=True)
class TrainPreset:
  view: Callable[..., np.ndarray]
  flip: bool  # a random horizontal flip, applied on the device
  colour: bool  # the paper's PCA colour noise, added on the device
  divide_std: bool  # False: only the mean is subtracted (the paper)


TRAIN_PRESETS = {
    "paper": TrainPreset(_paper_train, flip=True, colour=True, divide_std=False),
    "torchvision": TrainPreset(_torchvision_train, flip=True, colour=False, divide_std=True),
    "small": TrainPreset(_small_train, flip=True, colour=False, divide_std=True),
    "small_noflip": TrainPreset(_small_train, flip=False, colour=False, divide_std=True),
}
EVAL_PRESETS = {"center_crop": _center_crop, "ten_crop": _ten_crop, "small": _whole}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How to turn an image into the model's input.

  ``train_preset``: ``paper`` (shorter side to ``resize_size``, centre ``resize_size`` square,
  random ``image_size`` crop, flip, PCA colour noise, mean subtraction), ``torchvision``
  (RandomResizedCrop(``image_size``), flip, normalise), ``small`` (resize to ``image_size``, pad
  ``pad`` pixels with zeros, random crop back, flip) or ``small_noflip`` (the same without the
  flip, for digits). ``eval_preset``: ``center_crop`` (shorter side to ``resize_size``, centre
  ``image_size`` crop), ``ten_crop`` (the 4 corners and centre of that resized image and their
  flips, stacked on axis 1 of the batch) or ``small`` (resize to ``image_size``). ``mean`` and
  ``std`` are per channel for pixels in [0, 1]. ``train``/``eval`` run on the host and give
  uint8; ``normalizer()`` is the rest, for the device.
  """
  train_preset: str = "torchvision"
  eval_preset: str = "center_crop"
  image_size: int = 224
  resize_size: int = 256
  channels: int = 3
  pad: int = 4
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def __post_init__(self):
    check_presets(self.train_preset, self.eval_preset)
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3; got {self.channels}")
    if len(self.mean) != self.channels or len(self.std) != self.channels:
      raise ValueError(f"mean and std need {self.channels} values each; got {self.mean}, "
                       f"{self.std}")
    if self.resize_size < self.image_size:
      raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size "
                       f"({self.image_size})")
    if TRAIN_PRESETS[self.train_preset].colour and self.channels != 3:
      raise ValueError(f"the {self.train_preset} preset's PCA colour noise needs channels=3")

  @property
  def preset(self) -> TrainPreset:
    return TRAIN_PRESETS[self.train_preset]

  def normalizer(self):
    from alexnet_jax.data import device  # pylint: disable=import-outside-toplevel
    std = self.std if self.preset.divide_std else (1.0,) * self.channels
    return device.Normalize(tuple(self.mean), tuple(std))

  def train(self, data: bytes | np.ndarray, rng: np.random.Generator,
            out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One example's view (``image``, written into ``out`` if given), and the ``flip`` and
    ``colour`` the device applies."""
    if out is None:
      out = np.empty(self.train_shape(), np.uint8)
    out = {"image": self.preset.view(self, data, rng, out)}
    if self.preset.flip:
      out["flip"] = np.bool_(rng.random() < 0.5)
    if self.preset.colour:
      out["colour"] = pca_colour(rng)
    return out

  def eval(self, data: bytes | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One example's eval view, uint8: (H, W, C), or (10, H, W, C) for ``ten_crop``; written
    into ``out`` if given."""
    if out is None:
      out = np.empty(self.eval_shape(), np.uint8)
    return EVAL_PRESETS[self.eval_preset](self, data, out)

  def train_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, self.channels)

  def eval_shape(self) -> tuple[int, ...]:
    return ((10,) if self.eval_preset == "ten_crop" else ()) + (
        self.image_size, self.image_size, self.channels)


def check_presets(train_preset: str, eval_preset: str) -> None:
  if train_preset not in TRAIN_PRESETS:
    raise ValueError(f"train_preset must be one of {tuple(TRAIN_PRESETS)}; got {train_preset!r}")
  if eval_preset not in EVAL_PRESETS:
    raise ValueError(f"eval_preset must be one of {tuple(EVAL_PRESETS)}; got {eval_preset!r}")
