"""Input pipelines on tf.data: TFDS datasets, folders of images and the bundled ``digits``.

Batches are numpy dicts ``{"image": uint8 (N, H, W, C), "label": int32 (N,)}``; the ``paper``
train preset adds ``"colour"`` (N, 3), each example's PCA colour shift, and eval adds ``"mask"``.
``augment.Normalize`` (``Preprocess.normalizer()``) turns them into the model's float input on the
device, inside the jitted steps. ``layout``: ``"pmap"`` puts a leading local-device axis, ``"jit"``
keeps host-local rows for ``jax.make_array_from_process_local_data``.

Speed: crop windows are drawn from the image's shape, which a JPEG's header gives, and only the
window is decoded (``tf.io.decode_and_crop_jpeg``); a preset that resizes and then crops resizes
only the part it keeps; everything stays uint8 to the end. Other formats are decoded whole.

Data order: the sequence of global batches is a function of the config alone, whatever the number
of processes and devices. Sources that can be indexed (arrays, folders) are shuffled as a whole
each epoch, and global batch ``k`` is rows ``k*B .. (k+1)*B`` of that order; each process feeds its
contiguous share of it. TFDS datasets are read as ``num_shards`` fixed shards, each shuffled on its
own, and every global batch takes ``B / num_shards`` rows from each shard in shard order; each
process reads the shards of its share. Every example's augmentation is drawn with stateless random
ops from (seed, epoch, [shard,] its position), so it does not depend on the topology either.

Resume: ``start_step=k`` rebuilds epoch ``k // steps_per_epoch`` and starts at step ``k``: indexed
sources jump straight there; TFDS shards skip the records before it, reading but not decoding them.

TensorFlow is imported here only; before its first op it is hidden from every GPU, so that it
leaves accelerator memory to JAX.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import textwrap
import warnings
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels in [0, 1] (paper, section 4.1); the columns of _EIGVEC are the
# eigenvectors, as in fb.resnet.torch's Lighting transform.
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = ((-0.5675, 0.7192, 0.4009),
           (-0.5808, -0.0045, -0.8140),
           (-0.5836, -0.6948, 0.4203))
PCA_NOISE_STD = 0.1

TRAIN_PRESETS = ("paper", "torchvision", "small", "small_noflip")
EVAL_PRESETS = ("center_crop", "ten_crop", "small")
LAYOUTS = ("pmap", "jit")


@functools.cache
def keep_tf_off_gpus() -> None:
  """Hides every GPU from TensorFlow, so that it leaves their memory to JAX. Called before the
  pipeline's first TensorFlow op (and before TFDS is imported); too late, it warns."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # "Visible devices cannot be modified after being initialized"
    if tf.config.list_physical_devices("GPU"):
      warnings.warn(f"TensorFlow already uses the GPUs and may hold their memory: {e}. Build "
                    "the input pipeline before other TensorFlow code runs", stacklevel=2)


def _tfds():
  keep_tf_off_gpus()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DIGITS_SIDE = 28
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_EXAMPLES = {"train": 512, "test": 128}


# ----------------------------------------------------------------------------------------------
# Sources: one split's examples, the same on every process.


@dataclasses.dataclass(frozen=True)
class Part:
  """A contiguous part of a source: ``make(None)`` in a fixed order, ``make(seed)`` shuffled."""
  num_examples: int
  make: Callable[[int | None], tf.data.Dataset]


@dataclasses.dataclass
class Source:
  """One split's examples as ``{"image", "label"}``, the same on every process.

  ``image`` is encoded bytes (``encoded``), a path to such bytes (``read_files``) or a uint8 HWC
  array. ``parts(n, drop_remainder)`` cuts the split into ``n`` contiguous ``Part``s (equal ones
  with ``drop_remainder``). Sources that can be indexed also have ``lookup(index)``, a TensorFlow
  function from an int64 index tensor to that example.
  """
  name: str
  split: str
  num_examples: int
  num_classes: int
  encoded: bool
  parts: Callable[[int, bool], list[Part]]
  lookup: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None
  read_files: bool = False
  files: Sequence[str] | None = None  # folder sources: every file, in index order
  skipped: Sequence[str] = ()  # folder sources: undecodable files left out on request


def even_bounds(total: int, n: int, drop_remainder: bool) -> list[tuple[int, int]]:
  """``n`` contiguous (start, end) ranges over ``total``: equal ones (dropping the remainder), or
  sizes that differ by at most one."""
  if drop_remainder:
    size = total // n
    return [(i * size, (i + 1) * size) for i in range(n)]
  base, extra = divmod(total, n)
  starts = [i * base + min(i, extra) for i in range(n + 1)]
  return list(zip(starts[:-1], starts[1:]))


def _indexed_parts(total: int, lookup: Callable[[tf.Tensor], dict[str, tf.Tensor]]
                   ) -> Callable[[int, bool], list[Part]]:
  def make(start, end, seed):
    def example(i):
      if seed is not None:
        i = tf.random.experimental.index_shuffle(i, tf.constant([seed, 0], tf.int64),
                                                 end - start - 1)
      return lookup(start + i)
    return tf.data.Dataset.range(end - start).map(example)

  def parts(n, drop_remainder):
    return [Part(end - start, lambda seed, s=start, e=end: make(s, e, seed))
            for start, end in even_bounds(total, n, drop_remainder)]
  return parts


def array_source(images: np.ndarray, labels: np.ndarray, *, name: str = "arrays",
                 split: str = "train", num_classes: int | None = None) -> Source:
  """A source over in-memory uint8 images (N, H, W, C) and integer labels (N,)."""
  keep_tf_off_gpus()
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must have shape ({len(images)},); got {labels.shape}")
  labels = labels.astype(np.int32)
  # Eager tensors, which dataset functions capture by reference: one copy, not one per epoch.
  image_t, label_t = tf.constant(images), tf.constant(labels)

  def lookup(i):
    return {"image": tf.gather(image_t, i), "label": tf.gather(label_t, i)}

  classes = num_classes if num_classes is not None else int(labels.max(initial=-1)) + 1
  return Source(name, split, len(images), classes, False, _indexed_parts(len(images), lookup),
                lookup=lookup)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 handwritten digits as uint8 28x28x1 images, split deterministically."""
  from sklearn import datasets, model_selection

  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test'; got {split!r}")
  digits = datasets.load_digits()
  # 8x8 values 0..16 -> 28x28 uint8, the size alexnet_small expects.
  small = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)
  images = tf.image.resize(small, (DIGITS_SIDE, DIGITS_SIDE), "bilinear").numpy()
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, digits.target, test_size=DIGITS_TEST_FRACTION, random_state=0,
      stratify=digits.target)
  return (train_x, train_y) if split == "train" else (test_x, test_y)


def _folder_classes(root: str) -> list[str]:
  """Class names: the sorted union of the class sub-folders of every split folder of ``root``."""
  classes = set()
  for split_dir in os.scandir(root):
    if split_dir.is_dir():
      classes.update(d.name for d in os.scandir(split_dir.path) if d.is_dir())
  return sorted(classes)


def _decodes(path: str) -> str | None:
  """None when TensorFlow decodes ``path`` as the pipeline will, else the reason it does not."""
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return None
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    return e.message.split("}}")[-1].split(" [Op:")[0].strip()


def find_undecodable(paths: Sequence[str], workers: int = 8) -> list[tuple[str, str]]:
  """(path, reason) for every file in ``paths`` that the pipeline cannot decode."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(_decodes, paths))
  return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def folder_source(root: str, split: str, *, skip_bad_images: bool = False) -> Source:
  """Images in ``root/<split>/<class>/*.{jpg,png,...}``; classes are sorted folder names.

  With ``skip_bad_images`` every file is test-decoded first (one pass over the folder, on every
  process, so that all agree on the list) and the undecodable ones are left out and listed in
  ``Source.skipped``; otherwise the first bad file stops the pipeline with an error naming it.
  """
  keep_tf_off_gpus()
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    found = sorted(d.name for d in os.scandir(root) if d.is_dir()) if os.path.isdir(root) else []
    raise ValueError(f"image folder {split_dir!r} does not exist; expected "
                     f"{root}/<split>/<class>/<image files>, splits found: {found or 'none'}")
  classes = _folder_classes(root)
  files, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    for f in sorted(os.listdir(class_dir)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(class_dir, f))
        labels.append(label)
  if not files:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {split_dir}/<class>/")
  skipped = []
  if skip_bad_images:
    bad = {p for p, _ in find_undecodable(files)}
    skipped = [f for f in files if f in bad]
    kept = [i for i, f in enumerate(files) if f not in bad]
    files, labels = [files[i] for i in kept], [labels[i] for i in kept]

  path_t, label_t = tf.constant(files), tf.constant(labels, tf.int32)

  def lookup(i):
    # A path only: files are read when decoded, so nothing is read for what a resume skips.
    return {"image": tf.gather(path_t, i), "label": tf.gather(label_t, i)}

  return Source(f"folder:{root}", split, len(files), len(classes), True,
                _indexed_parts(len(files), lookup), lookup=lookup, read_files=True, files=files,
                skipped=skipped)


def _count_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):  # no metadata (e.g. tfds.testing.mock_data): count the records
    ds = builder.as_dataset(split=split, decoders={"image": _tfds().decode.SkipDecoding()})
    return int(ds.reduce(0, lambda n, _: n + 1))


def _missing_archives_error(builder: tfds.core.DatasetBuilder, manual_dir: str | None
                            ) -> FileNotFoundError | None:
  """A clear error when a manual-download dataset's archives are not where TFDS looks."""
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not instructions:
    return None
  wanted = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}.get(
      builder.name, ())
  folder = manual_dir or os.path.join(builder.data_dir_root, "downloads", "manual")  # TFDS's
  missing = [f for f in wanted if not os.path.exists(os.path.join(folder, f))]
  if not missing and os.path.isdir(folder):
    return None
  return FileNotFoundError(
      f"{builder.name} is not prepared in {builder.data_dir_root} and must be built from files "
      f"you download yourself. Put {', '.join(wanted) or 'the archives'} in {folder} (set "
      f"manual_dir to use another folder); missing: {', '.join(missing) or folder}.\n"
      f"{textwrap.dedent(instructions)}")


def tfds_source(name: str, split: str, *, data_dir: str | None = None,
                manual_dir: str | None = None, shuffle_buffer: int = 16_384,
                prepare: bool = True) -> Source:
  """A TFDS image-classification dataset (``image`` and ``label`` features) by name.

  A part shuffled for training (``make(seed)``) shuffles its files' order and then examples in a
  buffer of ``shuffle_buffer / n`` for ``n`` parts, so that the memory it takes over all parts
  (all processes) is one ``shuffle_buffer`` of encoded images.
  """
  tfds = _tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:  # its message lists every dataset
    raise ValueError(f"unknown dataset {name!r}: config.dataset is 'digits', 'synthetic', "
                     "'folder:/path/to/images' or a TFDS name (tfds.list_builders(), e.g. "
                     "'imagenet2012', 'cifar10')") from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"TFDS dataset {name!r} has features {sorted(features)}; an image "
                     "classification dataset with 'image' and 'label' is needed")
  if prepare and not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:
      error = _missing_archives_error(builder, manual_dir)
      if error is None:
        raise
      raise error from e

  def make(part_split, count, buffer, seed):
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=part_split, shuffle_files=seed is not None,
                            read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
    if seed is None:
      return ds
    return ds.shuffle(min(count, buffer), seed=seed, reshuffle_each_iteration=False)

  @functools.cache  # counting a part without metadata reads it: once per (n, drop_remainder)
  def parts(n, drop_remainder):
    splits = tfds.even_splits(split, n, drop_remainder=drop_remainder)
    buffer = max(1, shuffle_buffer // n)
    counts = [_count_examples(builder, s) for s in splits]
    return [Part(c, lambda seed, s=s, c=c: make(s, c, buffer, seed))
            for s, c in zip(splits, counts)]

  return Source(name, split, _count_examples(builder, split), features["label"].num_classes,
                True, parts)


def synthetic_split(split: str, image_size: int, channels: int = 3, num_classes: int = 1000
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Random uint8 images and labels, for speed measurements without a dataset."""
  count = SYNTHETIC_EXAMPLES[split] if split in SYNTHETIC_EXAMPLES else None
  if count is None:
    raise ValueError(f"synthetic has splits {tuple(SYNTHETIC_EXAMPLES)}; got {split!r}")
  rng = np.random.default_rng(zlib.crc32(split.encode()))
  images = rng.integers(0, 256, (count, image_size, image_size, channels), np.uint8)
  return images, rng.integers(0, num_classes, count)


def create_source(dataset: str, split: str, *, data_dir: str | None = None,
                  manual_dir: str | None = None, skip_bad_images: bool = False,
                  image_size: int = 224, channels: int = 3) -> Source:
  """``digits``, ``synthetic``, ``folder:/path`` or any TFDS name. ``image_size`` and
  ``channels`` only shape ``synthetic``'s images."""
  if dataset == "synthetic":
    images, labels = synthetic_split(split, image_size, channels)
    return array_source(images, labels, name="synthetic", split=split, num_classes=1000)
  if dataset == "digits":
    images, labels = digits_split(split)
    return array_source(images, labels, name="digits", split=split, num_classes=10)
  if dataset.startswith("folder:"):
    return folder_source(dataset[len("folder:"):], split, skip_bad_images=skip_bad_images)
  return tfds_source(dataset, split, data_dir=data_dir, manual_dir=manual_dir)


# ----------------------------------------------------------------------------------------------
# Preprocessing on the host: an encoded or uint8 image in, the uint8 model-size view out.


def _as_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """A uint8 array image with ``channels`` channels (grey replicated, or RGB made grey)."""
  have = image.shape[-1]
  if have == channels:
    return image
  if channels == 1:
    return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))), tf.uint8)
  return tf.tile(image, [1, 1, channels])


_JPEG_MARGIN = 2


def _decode_window(image: tf.Tensor, encoded: bool, channels: int,
                   window_of: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The window ``window_of(height, width)`` = (top, left, h, w) of an image, that window and the
  image's (height, width). A JPEG's shape comes from its header and only the window is decoded."""
  def from_pixels(pixels):
    shape = tf.shape(pixels)[:2]
    window = window_of(shape[0], shape[1])
    return pixels[window[0]:window[0] + window[2], window[1]:window[1] + window[3]], window, shape

  if not encoded:
    return from_pixels(_as_channels(image, channels))

  def jpeg():
    shape = tf.io.extract_jpeg_shape(image)[:2]
    window = window_of(shape[0], shape[1])
    # Upsampled chroma at a window's edge pixels needs the pixels beyond it: decode a margin
    # too, so that the window's pixels are those of a whole-image decode.
    start = tf.maximum(window[:2] - _JPEG_MARGIN, 0)
    end = tf.minimum(window[:2] + window[2:] + _JPEG_MARGIN, shape)
    wider = tf.io.decode_and_crop_jpeg(image, tf.concat([start, end - start], 0),
                                       channels=channels)
    top, left = tf.unstack(window[:2] - start)
    return wider[top:top + window[2], left:left + window[3]], window, shape

  def other():
    return from_pixels(tf.io.decode_image(image, channels=channels, expand_animations=False))

  return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def _shorter_side_to(height: tf.Tensor, width: tf.Tensor, side: int) -> tuple[tf.Tensor, ...]:
  """The (height, width) that resizing the shorter side to ``side`` gives."""
  shape = tf.cast(tf.stack([height, width]), tf.float32)
  new = tf.cast(tf.round(shape * (side / tf.reduce_min(shape))), tf.int32)
  new = tf.maximum(new, side)  # rounding must not leave a side just under ``side``
  return new[0], new[1]


def _input_span(start: tf.Tensor, size: tf.Tensor, scale: tf.Tensor, limit: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """The input rows (start, count) that output rows [start, start + size) of a resize by
  ``scale`` read: their antialiased triangle kernels reach max(1, 1/scale) pixels out."""
  margin = tf.math.ceil(tf.maximum(1.0, 1.0 / scale)) + 1.0
  lo = tf.maximum(tf.math.floor(tf.cast(start, tf.float32) / scale) - margin, 0.0)
  hi = tf.minimum(tf.math.ceil(tf.cast(start + size, tf.float32) / scale) + margin,
                  tf.cast(limit, tf.float32))
  return tf.cast(lo, tf.int32), tf.cast(hi - lo, tf.int32)


def _resized_region(image: tf.Tensor, encoded: bool, channels: int,
                    region_of: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]
                    ) -> tf.Tensor:
  """Rows and columns [top, top + h) x [left, left + w) of the image resized to (rh, rw) (bilinear,
  antialiased), where ``region_of(height, width)`` = (rh, rw, top, left, h, w); float32.

  Only the input pixels the region reads are decoded and resized, and the result is the same as
  resizing the whole image and cropping it (up to float rounding): ``ScaleAndTranslate`` is what
  ``tf.image.resize`` runs, here with the region's offset as a translation.
  """
  def window_of(height, width):
    rh, rw, top, left, h, w = region_of(height, width)
    y, ny = _input_span(top, h, tf.cast(rh, tf.float32) / tf.cast(height, tf.float32), height)
    x, nx = _input_span(left, w, tf.cast(rw, tf.float32) / tf.cast(width, tf.float32), width)
    return tf.stack([y, x, ny, nx])

  pixels, window, shape = _decode_window(image, encoded, channels, window_of)
  rh, rw, top, left, h, w = region_of(shape[0], shape[1])
  scale = tf.cast(tf.stack([rh, rw]), tf.float32) / tf.cast(shape, tf.float32)
  translation = tf.cast(window[:2], tf.float32) * scale - tf.cast(tf.stack([top, left]),
                                                                  tf.float32)
  return tf.raw_ops.ScaleAndTranslate(
      images=pixels[None], size=tf.stack([h, w]), scale=scale, translation=translation,
      kernel_type="triangle", antialias=True)[0]


def _crop_offset(limit_hw: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """(top, left) of ``tf.image.stateless_random_crop`` on an HWC image whose (H - h + 1,
  W - w + 1) is ``limit_hw``: the same draw, so that the same seed gives the same crop."""
  limit = tf.concat([limit_hw, [1]], axis=0)
  return (tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32)
          % limit)[:2]


def _rrc_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
  """torchvision's RandomResizedCrop window (top, left, h, w): area ~ U(scale), log-ratio ~
  U(log ratio), 10 tries, then a centre crop with the ratio clamped."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = fh * fw * tf.random.stateless_uniform((attempts,), seeds[0], *scale)
  log_r = tf.random.stateless_uniform((attempts,), seeds[1], math.log(ratio[0]),
                                      math.log(ratio[1]))
  aspect = tf.exp(log_r)
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w > 0) & (h > 0) & (w <= fw) & (h <= fh)
  first = tf.argmax(tf.cast(ok, tf.int32))
  in_ratio = fw / fh
  fallback_w = tf.where(in_ratio < ratio[0], fw,
                        tf.where(in_ratio > ratio[1], tf.round(fh * ratio[1]), fw))
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(fw / ratio[0]), fh)
  any_ok = tf.reduce_any(ok)
  ch = tf.cast(tf.where(any_ok, h[first], fallback_h), tf.int32)
  cw = tf.cast(tf.where(any_ok, w[first], fallback_w), tf.int32)
  top = tf.where(any_ok, tf.random.stateless_uniform((), seeds[2], 0, height - ch + 1, tf.int32),
                 (height - ch) // 2)
  left = tf.where(any_ok, tf.random.stateless_uniform((), seeds[3], 0, width - cw + 1, tf.int32),
                  (width - cw) // 2)
  return tf.stack([top, left, ch, cw])


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """torchvision's RandomResizedCrop of an HWC image, resized to ``size`` (bilinear,
  antialiased); float32."""
  shape = tf.shape(image)
  top, left, h, w = tf.unstack(_rrc_window(shape[0], shape[1], seed, scale, ratio))
  return tf.image.resize(image[top:top + h, left:left + w], (size, size), "bilinear",
                         antialias=True)


def ten_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The four corner crops, the centre crop and their horizontal flips: (10, size, size, C)."""
  shape = tf.shape(image)
  bottom, right = shape[0] - size, shape[1] - size
  corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]
  crops = tf.stack([image[t:t + size, l:l + size] for t, l in corners])
  return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)


def pca_colour(seed: tf.Tensor) -> tf.Tensor:
  """The paper's colour noise: an RGB shift (pixels in [0, 1]) along ImageNet's principal
  components, scaled by their eigenvalues times alpha ~ N(0, 0.1)."""
  alpha = tf.random.stateless_normal((3,), seed, stddev=PCA_NOISE_STD)
  return tf.linalg.matvec(tf.constant(_EIGVEC), alpha * tf.constant(_EIGVAL))


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.saturate_cast(tf.round(image), tf.uint8)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How to turn an image into the model's input.

  ``train_preset``: ``paper`` (shorter side to ``resize_size``, centre crop ``resize_size``, random
  ``image_size`` crop, flip, PCA colour noise, mean subtraction), ``torchvision``
  (RandomResizedCrop(``image_size``), flip, normalise), ``small`` (pad ``pad`` pixels with zeros,
  random crop back, flip) or ``small_noflip`` (the same without the flip, for digits).
  ``eval_preset``: ``center_crop`` (shorter side to ``resize_size``, centre ``image_size`` crop),
  ``ten_crop`` (the 10 views, stacked on axis 1 of the batch) or ``small`` (resize to
  ``image_size`` only). ``mean``/``std`` are per channel for pixels in [0, 1]; the paper preset
  ignores ``std`` (it only subtracts the mean). ``train``/``eval`` run on the host and give uint8;
  ``normalizer()`` is the rest, for the device.
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
    keep_tf_off_gpus()
    if self.train_preset not in TRAIN_PRESETS:
      raise ValueError(f"train_preset must be one of {TRAIN_PRESETS}; got {self.train_preset!r}")
    if self.eval_preset not in EVAL_PRESETS:
      raise ValueError(f"eval_preset must be one of {EVAL_PRESETS}; got {self.eval_preset!r}")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3; got {self.channels}")
    if len(self.mean) != self.channels or len(self.std) != self.channels:
      raise ValueError(f"mean and std need {self.channels} values each; got {self.mean}, "
                       f"{self.std}")
    if self.resize_size < self.image_size:
      raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size "
                       f"({self.image_size})")
    if self.train_preset == "paper" and self.channels != 3:
      raise ValueError("the paper preset's PCA colour noise needs channels=3")

  def normalizer(self) -> augment.Normalize:
    std = (1.0,) * self.channels if self.train_preset == "paper" else self.std
    return augment.Normalize(tuple(self.mean), tuple(std))

  def _whole(self, image: tf.Tensor, encoded: bool) -> tf.Tensor:
    size = self.image_size
    return _resized_region(image, encoded, self.channels,
                           lambda height, width: (size, size, 0, 0, size, size))

  def train(self, image: tf.Tensor, seed: tf.Tensor, encoded: bool) -> dict[str, tf.Tensor]:
    """One example's view: ``image`` (uint8 HWC) and, for ``paper``, its ``colour`` shift."""
    crop_seed, flip_seed, colour_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    size, side = self.image_size, self.resize_size
    if self.train_preset == "paper":
      def region(height, width):
        rh, rw = _shorter_side_to(height, width, side)
        top, left = tf.unstack(_crop_offset(tf.constant([side - size + 1] * 2), crop_seed))
        return rh, rw, (rh - side) // 2 + top, (rw - side) // 2 + left, size, size
      view = _to_uint8(_resized_region(image, encoded, self.channels, region))
    elif self.train_preset == "torchvision":
      pixels, _, _ = _decode_window(image, encoded, self.channels,
                                    lambda height, width: _rrc_window(height, width, crop_seed))
      view = _to_uint8(tf.image.resize(pixels, (size, size), "bilinear", antialias=True))
    else:
      padded = tf.pad(_to_uint8(self._whole(image, encoded)),
                      [[self.pad, self.pad], [self.pad, self.pad], [0, 0]])
      top, left = tf.unstack(_crop_offset(tf.constant([2 * self.pad + 1] * 2), crop_seed))
      view = padded[top:top + size, left:left + size]
    if self.train_preset != "small_noflip":
      view = tf.image.stateless_random_flip_left_right(view, flip_seed)
    out = {"image": tf.ensure_shape(view, (size, size, self.channels))}
    if self.train_preset == "paper":
      out["colour"] = pca_colour(colour_seed)
    return out

  def eval(self, image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """One example's eval view, uint8: (H, W, C), or (10, H, W, C) for ``ten_crop``."""
    size, side = self.image_size, self.resize_size
    if self.eval_preset == "small":
      return _to_uint8(self._whole(image, encoded))
    paper = self.train_preset == "paper"  # the paper's crops come from the centre square

    def region(height, width):
      rh, rw = _shorter_side_to(height, width, side)
      top, left = ((rh - side) // 2, (rw - side) // 2) if paper else (0, 0)
      if self.eval_preset == "ten_crop":
        return (rh, rw, top, left) + ((side, side) if paper else (rh, rw))
      if paper:
        return rh, rw, top + (side - size) // 2, left + (side - size) // 2, size, size
      return rh, rw, (rh - size) // 2, (rw - size) // 2, size, size

    view = _to_uint8(_resized_region(image, encoded, self.channels, region))
    return ten_crop(view, size) if self.eval_preset == "ten_crop" else view

  def eval_shape(self) -> tuple[int, ...]:
    return ((10,) if self.eval_preset == "ten_crop" else ()) + (
        self.image_size, self.image_size, self.channels)


# ----------------------------------------------------------------------------------------------
# Iterators.

DEFAULT_SHARDS = 16
_POSITIONS = 2**31  # more than the examples of any epoch: (epoch, position) -> one number
_ENDLESS = 2**62


def local_batch_size(global_batch: int) -> int:
  """This process's share of ``global_batch``; it must split evenly over all devices."""
  devices = jax.device_count()
  if global_batch < 1 or global_batch % devices:
    raise ValueError(f"global batch size {global_batch} must be a positive multiple of the "
                     f"{devices} devices (over {jax.process_count()} processes); try "
                     f"{max(devices, global_batch // devices * devices)}")
  return global_batch // jax.process_count()


def _to_layout(batch: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
  if layout == "jit":
    return batch
  devices = jax.local_device_count()
  return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def _seed_of(*parts: Any) -> int:
  """A 31-bit seed from (seed, epoch[, shard]): the same on every process."""
  return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op: parallelism comes from map's parallel calls, and TF's op-level threads
  # would otherwise fight XLA's for the same cores.
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _bad_image_error(source: Source, error: Exception) -> Exception:
  """Finds which files of a folder source broke decoding and names them."""
  if not source.files:
    return error
  bad = find_undecodable(source.files)
  if not bad:
    return error
  listed = "\n".join(f"  {p}: {r}" for p, r in bad[:20])
  more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
  return ValueError(f"{len(bad)} image(s) in {source.name} cannot be decoded:\n{listed}{more}\n"
                    "Fix or remove them, or set skip_bad_images to leave them out.")


def _numpy_batches(ds: tf.data.Dataset, source: Source) -> Iterator[dict[str, np.ndarray]]:
  it = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      raise _bad_image_error(source, e) from e
    yield batch


def _read_image(image: tf.Tensor, source: Source) -> tf.Tensor:
  return tf.io.read_file(image) if source.read_files else image


def _check_shards(num_shards: int, global_batch: int) -> int:
  processes = jax.process_count()
  if not isinstance(num_shards, int) or num_shards < 1 or num_shards % processes or (
      global_batch % num_shards):
    raise ValueError(
        f"data_shards={num_shards!r} must be a multiple of the {processes} process(es) and "
        f"divide the global batch {global_batch}: each process reads whole shards and each "
        "batch takes as many rows from every shard")
  return num_shards


def steps_per_epoch(source: Source, global_batch: int, num_shards: int = DEFAULT_SHARDS,
                    shards: Sequence[Part] | None = None) -> int:
  """Train steps in an epoch; ValueError when the split has less than one batch."""
  if source.lookup is not None:
    count, where, need = source.num_examples, "", f"one global batch of {global_batch}"
  else:
    shards = shards or source.parts(_check_shards(num_shards, global_batch), True)
    count = min(p.num_examples for p in shards)
    where = f" per data shard ({num_shards} shards)"
    need = f"the {global_batch // num_shards} rows each gives to a batch of {global_batch}"
    global_batch //= num_shards
  if count < global_batch:
    raise ValueError(f"{source.name} {source.split!r} has {count} examples{where}, fewer than "
                     f"{need}")
  return count // global_batch


class TrainIterator:
  """Endless, deterministic train batches; ``step`` is the position to store in a checkpoint.

  ``num_shards`` only applies to sources that cannot be indexed (TFDS): it must be a multiple of
  the process count and divide ``global_batch``.
  """

  def __init__(self, source: Source, preprocess: Preprocess, global_batch: int, *,
               seed: int = 0, start_step: int = 0, layout: str = "jit",
               num_shards: int = DEFAULT_SHARDS):
    _check_layout(layout)
    self.source, self.preprocess, self.layout, self.seed = source, preprocess, layout, seed
    self.global_batch = global_batch
    self.batch_size = local_batch_size(global_batch)
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0; got {start_step}")
    self._shards = None
    if source.lookup is None:
      self._shards = source.parts(_check_shards(num_shards, global_batch), True)
      self._rows = global_batch // num_shards
    self.steps_per_epoch = steps_per_epoch(source, global_batch, num_shards, self._shards)
    self.step = start_step
    self._batches = self._generate(start_step)

  def _indexed(self, start_step: int) -> tf.data.Dataset:
    """One endless stream from ``start_step``: local element ``j`` is a row of global batch
    ``j // local_batch``; its epoch's permutation (``index_shuffle``, never materialised) picks
    the example."""
    batch, local, steps = self.global_batch, self.batch_size, self.steps_per_epoch
    first_row, last = jax.process_index() * local, self.source.num_examples - 1
    base = tf.constant(_seed_of(self.seed), tf.int64)
    lookup = self.source.lookup

    def locate(j):
      step, row = j // local, first_row + j % local
      epoch, position = step // steps, (step % steps) * batch + row
      index = tf.random.experimental.index_shuffle(position, tf.stack([base, epoch]), last)
      return lookup(index), tf.stack([base, epoch * _POSITIONS + position])

    return tf.data.Dataset.range(start_step * local, _ENDLESS).map(locate)

  def _sharded(self, epoch: int, skip_steps: int) -> tf.data.Dataset:
    """Epoch ``epoch`` from step ``skip_steps`` on: this process's shards, ``rows`` examples of
    each in turn."""
    rows, steps = self._rows, self.steps_per_epoch
    per_process = len(self._shards) // jax.process_count()
    first = jax.process_index() * per_process
    streams = []
    for shard in range(first, first + per_process):
      base = _seed_of(self.seed, epoch, shard)
      # The skipped records are read (a TFRecord stream has no index) but not decoded.
      ds = self._shards[shard].make(base).take(steps * rows).skip(skip_steps * rows)
      seeds = tf.data.Dataset.range(skip_steps * rows, steps * rows).map(
          lambda i, base=base: tf.stack([tf.constant(base, tf.int64), i]))
      streams.append(tf.data.Dataset.zip(ds, seeds))
    choice = tf.data.Dataset.range((steps - skip_steps) * rows * per_process).map(
        lambda i: (i // rows) % per_process)
    return tf.data.Dataset.choose_from_datasets(streams, choice)

  def _batched(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    src, pre = self.source, self.preprocess

    def process(ex, seed):
      view = pre.train(_read_image(ex["image"], src), seed, src.encoded)
      return view | {"label": ex["label"]}

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.batch_size, drop_remainder=True)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))

  def _generate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    if not self._shards:
      yield from _numpy_batches(self._batched(self._indexed(start_step)), self.source)
      return
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      yield from _numpy_batches(self._batched(self._sharded(epoch, skip)), self.source)
      epoch, skip = epoch + 1, 0

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self.step += 1
    return _to_layout(batch, self.layout)

  def state(self) -> dict[str, int]:
    """What a checkpoint needs to recreate this iterator (with the same source and settings)."""
    return {"step": self.step, "seed": self.seed}


def eval_batches(source: Source, preprocess: Preprocess, global_batch: int, *,
                 layout: str = "jit") -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order; the tail is padded and ``mask`` marks real rows.

  Each process reads a contiguous part, and every process yields the same number of batches (its
  part padded up to the largest part), so that collective eval steps line up.
  """
  _check_layout(layout)
  batch_size = local_batch_size(global_batch)
  parts = source.parts(jax.process_count(), False)
  mine = parts[jax.process_index()]
  steps = max(1, math.ceil(max(p.num_examples for p in parts) / batch_size))

  def process(ex):
    view = preprocess.eval(_read_image(ex["image"], source), source.encoded)
    return {"image": view, "label": ex["label"], "mask": tf.constant(True)}

  ds = mine.make(None).map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros(preprocess.eval_shape(), tf.uint8), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False)}).repeat(steps * batch_size - mine.num_examples)
  ds = _with_options(ds.concatenate(padding).batch(batch_size).prefetch(tf.data.AUTOTUNE))
  for batch in _numpy_batches(ds, source):
    yield _to_layout(batch, layout)


def prefetch_to_device(iterator: Iterator[dict[str, np.ndarray]], size: int,
                       put: Callable[[np.ndarray], Any]) -> Iterator[dict[str, Any]]:
  """Keeps ``size`` batches in flight to the devices so the step never waits on the transfer.

  ``put`` maps a host array to a device array, e.g. ``jax.device_put`` onto a local-device
  sharding (pmap) or ``lambda x: jax.make_array_from_process_local_data(sharding, x)`` (jit).
  """
  queue = collections.deque()

  def enqueue(n):
    for batch in iterator:
      queue.append(jax.tree_util.tree_map(put, batch))
      if len(queue) >= n:
        return

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
