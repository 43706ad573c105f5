"""Input pipelines on tf.data: TFDS datasets, folders of images and the bundled ``digits``.

Batches are numpy dicts ``{"image": float (N, H, W, C), "label": int32 (N,)}`` (eval adds a
``"mask"``) shaped for the train step (``layout``: ``"pmap"`` puts a leading local-device axis,
``"jit"`` keeps host-local rows for ``jax.make_array_from_process_local_data``).

Determinism and resume: the order of an epoch depends only on (seed, epoch, process) and every
example's augmentation only on (seed, process, epoch, its position in the epoch), drawn with
stateless random ops. An iterator created with ``start_step=k`` rebuilds epoch ``k //
steps_per_epoch`` and skips the records before step ``k`` without decoding them, so it yields
exactly the batches an uninterrupted iterator yields from step ``k``.

TensorFlow is imported here only, and is hidden from every GPU so that it leaves accelerator memory
to JAX.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import textwrap
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")

import tensorflow_datasets as tfds  # noqa: E402  (after hiding the GPUs from TF)

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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DIGITS_SIDE = 28
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_EXAMPLES = {"train": 512, "test": 128}


# ----------------------------------------------------------------------------------------------
# Sources: the examples of one split that belong to this process.


@dataclasses.dataclass
class Source:
  """One split's examples for this process.

  ``make(shuffle_seed)`` returns a ``tf.data.Dataset`` of ``{"image", "label"}`` in a fixed order
  (``shuffle_seed=None``) or in an order fixed by the seed. ``image`` is encoded bytes
  (``encoded=True``), a path to such bytes (``read_files=True``) or a uint8 HWC array.
  ``num_examples`` is this process's count and ``max_num_examples`` the largest count over
  processes (eval pads every process up to it).
  """
  name: str
  split: str
  num_examples: int
  max_num_examples: int
  num_classes: int
  encoded: bool
  make: Callable[[int | None], tf.data.Dataset]
  read_files: bool = False
  files: Sequence[str] | None = None  # folder sources: this process's files, in make(None) order
  skipped: Sequence[str] = ()  # folder sources: undecodable files left out on request


def _process_slice(n: int, drop_remainder: bool) -> tuple[slice, int]:
  """This process's contiguous part of ``n`` examples, and the largest part over processes."""
  count, index = jax.process_count(), jax.process_index()
  if drop_remainder:
    size = n // count
    return slice(index * size, (index + 1) * size), size
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (index < extra)), base + (extra > 0)


def _shuffled(ds: tf.data.Dataset, n: int, seed: int | None, buffer: int | None = None
              ) -> tf.data.Dataset:
  if seed is None:
    return ds
  return ds.shuffle(min(n, buffer or n), seed=seed, reshuffle_each_iteration=False)


def array_source(images: np.ndarray, labels: np.ndarray, *, name: str = "arrays",
                 split: str = "train", num_classes: int | None = None,
                 drop_remainder: bool = True) -> Source:
  """A source over in-memory uint8 images (N, H, W, C) and integer labels (N,)."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must have shape ({len(images)},); got {labels.shape}")
  part, largest = _process_slice(len(images), drop_remainder)
  images, labels = images[part], labels[part].astype(np.int32)

  def make(seed):
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return _shuffled(ds, len(images), seed)

  classes = num_classes if num_classes is not None else int(labels.max(initial=-1)) + 1
  return Source(name, split, len(images), largest, classes, False, make)


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


def folder_source(root: str, split: str, *, drop_remainder: bool = True,
                  skip_bad_images: bool = False) -> Source:
  """Images in ``root/<split>/<class>/*.{jpg,png,...}``; classes are sorted folder names.

  With ``skip_bad_images`` every file is test-decoded first (one pass over the folder) and the
  undecodable ones are left out and listed in ``Source.skipped``; otherwise the first bad file
  stops the pipeline with an error naming it.
  """
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
  part, largest = _process_slice(len(files), drop_remainder)
  files, labels = files[part], labels[part]
  skipped = []
  if skip_bad_images:
    bad = {p for p, _ in find_undecodable(files)}
    skipped = [f for f in files if f in bad]
    kept = [i for i, f in enumerate(files) if f not in bad]
    files, labels = [files[i] for i in kept], [labels[i] for i in kept]
    largest = len(files)  # processes skip different counts; eval pads to this process's count

  paths, label_arr = np.array(files), np.array(labels, np.int32)

  def make(seed):
    ds = tf.data.Dataset.from_tensor_slices({"image": paths, "label": label_arr})
    return _shuffled(ds, len(paths), seed)

  # Files are read when decoded, so that skipping to a resume point does not read them.
  return Source(f"folder:{root}", split, len(files), largest, len(classes), True, make,
                read_files=True, files=files, skipped=skipped)


def _count_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):  # no metadata (e.g. tfds.testing.mock_data): count the records
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
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
                manual_dir: str | None = None, drop_remainder: bool = True,
                shuffle_buffer: int = 16_384, prepare: bool = True) -> Source:
  """A TFDS image-classification dataset (``image`` and ``label`` features) by name."""
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
  splits = tfds.even_splits(split, jax.process_count(), drop_remainder=drop_remainder)
  mine = splits[jax.process_index()]
  counts = [_count_examples(builder, s) for s in splits]

  def make(seed):
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=mine, shuffle_files=seed is not None, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
    return _shuffled(ds, counts[jax.process_index()], seed, shuffle_buffer)

  return Source(name, split, counts[jax.process_index()], max(counts),
                features["label"].num_classes, True, make)


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
                  manual_dir: str | None = None, train: bool = True,
                  skip_bad_images: bool = False, image_size: int = 224, channels: int = 3
                  ) -> Source:
  """``digits``, ``synthetic``, ``folder:/path`` or any TFDS name; train splits drop the uneven
  remainder. ``image_size`` and ``channels`` only shape ``synthetic``'s images."""
  if dataset == "synthetic":
    images, labels = synthetic_split(split, image_size, channels)
    return array_source(images, labels, name="synthetic", split=split, num_classes=1000,
                        drop_remainder=train)
  if dataset == "digits":
    images, labels = digits_split(split)
    return array_source(images, labels, name="digits", split=split, num_classes=10,
                        drop_remainder=train)
  if dataset.startswith("folder:"):
    return folder_source(dataset[len("folder:"):], split, drop_remainder=train,
                         skip_bad_images=skip_bad_images)
  return tfds_source(dataset, split, data_dir=data_dir, manual_dir=manual_dir,
                     drop_remainder=train)


# ----------------------------------------------------------------------------------------------
# Preprocessing. Images arrive as uint8 HWC; each function returns float32 in the model's layout.


def _decode(image: tf.Tensor, channels: int, source: Source) -> tf.Tensor:
  if source.read_files:
    image = tf.io.read_file(image)
  if source.encoded:
    return tf.io.decode_image(image, channels=channels, expand_animations=False)
  have = image.shape[-1]
  if have == channels:
    return image
  if channels == 1:
    return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))), tf.uint8)
  return tf.tile(image, [1, 1, channels])


def _resize_shorter(image: tf.Tensor, side: int) -> tf.Tensor:
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = side / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  new = tf.maximum(new, side)  # rounding must not leave a side just under ``side``
  return tf.image.resize(image, new, "bilinear", antialias=True)


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.shape(image)
  top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def _random_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  return tf.image.stateless_random_crop(image, (size, size, tf.shape(image)[-1]), seed)


def _normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  return (image / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _pca_noise(image01: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  alpha = tf.random.stateless_normal((3,), seed, stddev=PCA_NOISE_STD)
  rgb = tf.linalg.matvec(tf.constant(_EIGVEC), alpha * tf.constant(_EIGVAL))
  return image01 + rgb


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10
                        ) -> tf.Tensor:
  """torchvision's RandomResizedCrop: area ~ U(scale), log-ratio ~ U(log ratio), 10 tries, then a
  centre crop with the ratio clamped; resized to ``size`` (bilinear, antialiased)."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  height, width = shape[0], shape[1]
  area = height * width * tf.random.stateless_uniform((attempts,), seeds[0], *scale)
  log_r = tf.random.stateless_uniform((attempts,), seeds[1], math.log(ratio[0]),
                                      math.log(ratio[1]))
  aspect = tf.exp(log_r)
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  in_ratio = width / height
  fallback_w = tf.where(in_ratio < ratio[0], width,
                        tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  any_ok = tf.reduce_any(ok)
  ch = tf.cast(tf.where(any_ok, h[first], fallback_h), tf.int32)
  cw = tf.cast(tf.where(any_ok, w[first], fallback_w), tf.int32)
  ih, iw = tf.shape(image)[0], tf.shape(image)[1]
  top = tf.where(any_ok, tf.random.stateless_uniform((), seeds[2], 0, ih - ch + 1, tf.int32),
                 (ih - ch) // 2)
  left = tf.where(any_ok, tf.random.stateless_uniform((), seeds[3], 0, iw - cw + 1, tf.int32),
                  (iw - cw) // 2)
  crop = image[top:top + ch, left:left + cw]
  return tf.image.resize(crop, (size, size), "bilinear", antialias=True)


def ten_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The four corner crops, the centre crop and their horizontal flips: (10, size, size, C)."""
  shape = tf.shape(image)
  bottom, right = shape[0] - size, shape[1] - size
  corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]
  crops = tf.stack([image[t:t + size, l:l + size] for t, l in corners])
  return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How to turn a decoded uint8 image into the model's input.

  ``train_preset``: ``paper`` (shorter side to ``resize_size``, centre crop ``resize_size``, random
  ``image_size`` crop, flip, PCA colour noise, mean subtraction), ``torchvision``
  (RandomResizedCrop(``image_size``), flip, normalise), ``small`` (pad ``pad`` pixels with zeros,
  random crop back, flip) or ``small_noflip`` (the same without the flip, for digits).
  ``eval_preset``: ``center_crop`` (shorter side to ``resize_size``, centre ``image_size`` crop),
  ``ten_crop`` (the 10 views, stacked on axis 1 of the batch) or ``small`` (resize to
  ``image_size`` only). ``mean``/``std`` are per channel for pixels in [0, 1]; the paper preset
  ignores ``std`` (it only subtracts the mean).
  """
  train_preset: str = "torchvision"
  eval_preset: str = "center_crop"
  image_size: int = 224
  resize_size: int = 256
  channels: int = 3
  pad: int = 4
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  dtype: Any = tf.float32

  def __post_init__(self):
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

  def train(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    crop_seed, flip_seed, colour_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    image = tf.cast(image, tf.float32)
    if self.train_preset == "paper":
      image = _center_crop(_resize_shorter(image, self.resize_size), self.resize_size)
      image = _random_crop(image, self.image_size, crop_seed)
    elif self.train_preset == "torchvision":
      image = random_resized_crop(image, self.image_size, crop_seed)
    else:
      image = tf.image.resize(image, (self.image_size, self.image_size), "bilinear",
                              antialias=True)
      image = tf.pad(image, [[self.pad, self.pad], [self.pad, self.pad], [0, 0]])
      image = _random_crop(image, self.image_size, crop_seed)
    if self.train_preset != "small_noflip":
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if self.train_preset == "paper":
      image = _pca_noise(image / 255.0, colour_seed) * 255.0
    return self._normalize(tf.ensure_shape(image, (self.image_size, self.image_size,
                                                   self.channels)))

  def eval(self, image: tf.Tensor) -> tf.Tensor:
    image = tf.cast(image, tf.float32)
    if self.eval_preset == "small":
      image = tf.image.resize(image, (self.image_size, self.image_size), "bilinear",
                              antialias=True)
    else:
      image = _resize_shorter(image, self.resize_size)
      if self.train_preset == "paper":  # the paper's crops come from the centre square
        image = _center_crop(image, self.resize_size)
      image = (ten_crop if self.eval_preset == "ten_crop" else _center_crop)(image,
                                                                               self.image_size)
    return self._normalize(image)

  def _normalize(self, image: tf.Tensor) -> tf.Tensor:
    std = (1.0,) * self.channels if self.train_preset == "paper" else self.std
    return tf.cast(_normalize(image, self.mean, std), self.dtype)


# ----------------------------------------------------------------------------------------------
# Iterators.


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


def _example_seeds(seed: int, epoch: int) -> int:
  """A base seed for (seed, process, epoch); examples add their index within the epoch."""
  return zlib.crc32(f"{seed}/{jax.process_index()}/{epoch}".encode()) & 0x7FFFFFFF


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


class TrainIterator:
  """Endless, deterministic train batches; ``step`` is the position to store in a checkpoint."""

  def __init__(self, source: Source, preprocess: Preprocess, global_batch: int, *,
               seed: int = 0, start_step: int = 0, layout: str = "jit"):
    _check_layout(layout)
    self.source, self.preprocess, self.layout, self.seed = source, preprocess, layout, seed
    self.batch_size = local_batch_size(global_batch)
    self.steps_per_epoch = source.num_examples // self.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{source.name} {source.split!r} has {source.num_examples} examples in "
                       f"this process, fewer than one batch of {self.batch_size}")
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0; got {start_step}")
    self.step = start_step
    self._batches = self._generate(start_step)

  def epoch_dataset(self, epoch: int, skip_steps: int = 0) -> tf.data.Dataset:
    """Epoch ``epoch``'s batches from ``skip_steps`` on."""
    src, pre = self.source, self.preprocess
    base = _example_seeds(self.seed, epoch)
    ds = src.make(base).enumerate()
    ds = ds.skip(skip_steps * self.batch_size)  # before decoding: skipping costs only reads

    def process(index, ex):
      image = _decode(ex["image"], pre.channels, src)
      seed = tf.stack([tf.constant(base, tf.int64), index])
      return {"image": pre.train(image, seed), "label": ex["label"]}

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.batch_size, drop_remainder=True)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))

  def _generate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      yield from _numpy_batches(self.epoch_dataset(epoch, skip), self.source)
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

  Every process yields the same number of batches (its source padded up to the largest process's
  count), so that collective eval steps line up.
  """
  _check_layout(layout)
  batch_size = local_batch_size(global_batch)
  steps = max(1, math.ceil(source.max_num_examples / batch_size))
  total = steps * batch_size

  def process(ex):
    image = _decode(ex["image"], preprocess.channels, source)
    return {"image": preprocess.eval(image), "label": ex["label"], "mask": tf.constant(True)}

  ds = source.make(None).map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  shape = ((10,) if preprocess.eval_preset == "ten_crop" else ()) + (
      preprocess.image_size, preprocess.image_size, preprocess.channels)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros(shape, preprocess.dtype), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False)}).repeat(total - source.num_examples)
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
