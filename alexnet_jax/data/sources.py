"""Sources: one split's examples, ``len(source)`` and ``source[i] -> (image, label)``.

``image`` is encoded bytes (``source.encoded``) or a uint8 HWC array. Every source is a plain
picklable object, so that Grain's worker processes can read it, and the same on every process.
TFDS datasets are read through ``tfds.data_source`` (array_record files, random access, no
TensorFlow); only preparing a TFDS dataset needs TensorFlow (the ``tfds`` extra).
"""

from __future__ import annotations

import concurrent.futures
import os
import textwrap
import zlib
from typing import Any, Sequence

import numpy as np

from alexnet_jax.data import host

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DIGITS_SIDE = 28
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_EXAMPLES = {"train": 512, "test": 128}


class ArraySource:
  """In-memory uint8 images (N, H, W, C) and integer labels (N,)."""
  encoded = False

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str = "arrays",
               split: str = "train", num_classes: int | None = None):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels must have shape ({len(images)},); got {labels.shape}")
    self.images, self.labels = images, labels.astype(np.int32)
    self.name, self.split = name, split
    self.num_classes = (num_classes if num_classes is not None
                        else int(self.labels.max(initial=-1)) + 1)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return self.images[i], int(self.labels[i])


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 handwritten digits as uint8 28x28x1 images, split deterministically."""
  import jax  # pylint: disable=import-outside-toplevel
  from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel

  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test'; got {split!r}")
  digits = datasets.load_digits()
  # 8x8 values 0..16 -> 28x28 uint8, the size alexnet_small expects (bilinear, half-pixel
  # centres: an upsampling, so no antialiasing is involved).
  small = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)
  images = np.asarray(jax.device_get(jax.image.resize(
      small, (len(small), DIGITS_SIDE, DIGITS_SIDE, 1), "bilinear")))
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, digits.target, test_size=DIGITS_TEST_FRACTION, random_state=0,
      stratify=digits.target)
  return (train_x, train_y) if split == "train" else (test_x, test_y)


def synthetic_split(split: str, image_size: int, channels: int = 3, num_classes: int = 1000
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Random uint8 images and labels, for speed measurements without a dataset."""
  if split not in SYNTHETIC_EXAMPLES:
    raise ValueError(f"synthetic has splits {tuple(SYNTHETIC_EXAMPLES)}; got {split!r}")
  rng = np.random.default_rng(zlib.crc32(split.encode()))
  images = rng.integers(0, 256, (SYNTHETIC_EXAMPLES[split], image_size, image_size, channels),
                        np.uint8)
  return images, rng.integers(0, num_classes, len(images))


def _folder_classes(root: str) -> list[str]:
  """Class names: the sorted union of the class sub-folders of every split folder of ``root``."""
  classes = set()
  for split_dir in os.scandir(root):
    if split_dir.is_dir():
      classes.update(d.name for d in os.scandir(split_dir.path) if d.is_dir())
  return sorted(classes)


def _decode_problem(path: str) -> str | None:
  """None when ``path`` decodes, else the reason it does not."""
  try:
    with open(path, "rb") as f:
      host.decode(f.read(), 3)
    return None
  except (OSError, host.DecodeError) as e:
    return str(e)


def find_undecodable(paths: Sequence[str], workers: int = 8) -> list[tuple[str, str]]:
  """(path, reason) for every file in ``paths`` that the pipeline cannot decode."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # the decoders release the GIL
    reasons = list(pool.map(_decode_problem, paths))
  return [(p, r) for p, r in zip(paths, reasons) if r is not None]


class FolderSource:
  """Images in ``root/<split>/<class>/*.{jpg,png,...}``; classes are sorted folder names.

  With ``skip_bad_images`` every file is test-decoded first and the undecodable ones are left out
  and listed in ``skipped``; otherwise the first bad file stops the loader with its name.
  """
  encoded = True

  def __init__(self, root: str, split: str, *, skip_bad_images: bool = False):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      found = (sorted(d.name for d in os.scandir(root) if d.is_dir()) if os.path.isdir(root)
               else [])
      raise ValueError(f"image folder {split_dir!r} does not exist; expected "
                       f"{root}/<split>/<class>/<image files>, splits found: {found or 'none'}")
    classes = _folder_classes(root)
    files, labels = [], []
    for label, name in enumerate(classes):
      class_dir = os.path.join(split_dir, name)
      if os.path.isdir(class_dir):
        for f in sorted(os.listdir(class_dir)):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            files.append(os.path.join(class_dir, f))
            labels.append(label)
    if not files:
      raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {split_dir}/<class>/")
    self.skipped: list[str] = []
    if skip_bad_images:
      bad = {p for p, _ in find_undecodable(files)}
      self.skipped = [f for f in files if f in bad]
      labels = [l for f, l in zip(files, labels) if f not in bad]
      files = [f for f in files if f not in bad]
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self.name, self.split, self.num_classes = f"folder:{root}", split, len(classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    with open(self.files[i], "rb") as f:
      return f.read(), int(self.labels[i])

  def describe(self, i: int) -> str:
    return self.files[i]


def _missing_archives_error(builder: Any, manual_dir: str | None) -> FileNotFoundError | None:
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


def _prepare(builder: Any, manual_dir: str | None) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ImportError as e:
    raise ImportError(
        f"preparing the TFDS dataset {builder.name!r} needs TensorFlow ({e}): pip install "
        "'alexnet-jax[tfds]', or prepare it on another machine and copy "
        f"{builder.data_dir} here") from e
  except Exception as e:
    error = _missing_archives_error(builder, manual_dir)
    if error is None:
      raise
    raise error from e


class TfdsSource:
  """A TFDS image-classification dataset (``image`` and ``label`` features) by name, read as
  encoded images through ``tfds.data_source``. Not yet prepared, it is prepared as array_record
  (which needs TensorFlow); prepared as tfrecord, it is refused with the way to convert it."""
  encoded = True

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               manual_dir: str | None = None, prepare: bool = True):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
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
    if not builder.is_prepared():
      if not prepare:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}")
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      _prepare(builder, manual_dir)
    stored = builder.info.file_format
    if stored is not None and str(getattr(stored, "value", stored)) != "array_record":
      raise ValueError(
          f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
          f"{getattr(stored, 'value', stored)}, which has no random access; this loader reads "
          f"array_record. Convert it in place with `tfds convert_format --dataset_dir="
          f"{builder.data_dir} --out_file_format=array_record`, or prepare it again with "
          f"tfds.builder({name!r}, file_format='array_record').download_and_prepare()")
    self.name, self.split, self.data_dir = name, split, data_dir
    self.num_classes = features["label"].num_classes
    self._data = tfds.data_source(name, split=split, data_dir=data_dir,
                                  decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    example = self._data[i]
    return example["image"], int(example["label"])


def create_source(dataset: str, split: str, *, data_dir: str | None = None,
                  manual_dir: str | None = None, skip_bad_images: bool = False,
                  image_size: int = 224, channels: int = 3) -> Any:
  """``digits``, ``synthetic``, ``folder:/path`` or any TFDS name. ``image_size`` and
  ``channels`` only shape ``synthetic``'s images."""
  if dataset == "synthetic":
    images, labels = synthetic_split(split, image_size, channels)
    return ArraySource(images, labels, name="synthetic", split=split, num_classes=1000)
  if dataset == "digits":
    images, labels = digits_split(split)
    return ArraySource(images, labels, name="digits", split=split, num_classes=10)
  if dataset.startswith("folder:"):
    return FolderSource(dataset[len("folder:"):], split, skip_bad_images=skip_bad_images)
  return TfdsSource(dataset, split, data_dir=data_dir, manual_dir=manual_dir)
