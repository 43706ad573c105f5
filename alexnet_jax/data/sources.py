"""Sources: one split's examples, ``len(source)`` and ``source[i] -> (image, label)``.

``image`` is encoded bytes (``source.encoded``) or a uint8 HWC array. Every source is a plain
picklable object, so that Grain's worker processes can read it, and the same on every process.
TFDS datasets are read through TFDS's array_record data sources (random access, no TensorFlow);
only preparing a TFDS dataset needs TensorFlow (the ``tfds`` extra). ``prepared:/path`` is a store
written by ``python -m alexnet_jax.prepare`` (``PreparedSource``).

Besides ``len`` and ``[i]``, a source has ``name``, ``split``, ``num_classes``, ``class_names``
(or None), ``channels`` (what its images decode to) and ``fingerprint()``, a digest of what it
reads, which ``prepare`` records to notice a source that changed between runs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import textwrap
import zlib
from typing import Any

import numpy as np

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
    self.class_names, self.channels = None, images.shape[-1]

  def __len__(self) -> int:
    return len(self.images)

  def fingerprint(self) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(self.images).data)
    digest.update(np.ascontiguousarray(self.labels).data)
    return f"{self.name}:{digest.hexdigest()}"

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


class FolderSource:
  """Images in ``root/<split>/<class>/*.{jpg,png,...}``; classes are sorted folder names.

  The files are not test-decoded here (that would read the whole dataset on every process of
  every run): the first one that does not decode stops the loader with its name. ``prepare``
  decodes each once, and lists and leaves out the bad ones.
  """
  encoded, channels = True, 3

  def __init__(self, root: str, split: str):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      found = folder_splits(root)
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
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self.root, self.class_names = root, classes
    self.name, self.split, self.num_classes = f"folder:{root}", split, len(classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    with open(self.files[i], "rb") as f:
      return f.read(), int(self.labels[i])

  def describe(self, i: int) -> str:
    return self.files[i]

  def fingerprint(self) -> str:
    """Every file's path, size and modification time: a changed, added or removed file shows."""
    digest = hashlib.sha256()
    for path, label in zip(self.files, self.labels):
      stat = os.stat(path)
      digest.update(f"{os.path.relpath(path, self.root)}\0{label}\0{stat.st_size}\0"
                    f"{stat.st_mtime_ns}\n".encode())
    return f"{self.name}/{self.split}:{digest.hexdigest()}"


def folder_splits(root: str) -> list[str]:
  return sorted(d.name for d in os.scandir(root) if d.is_dir()) if os.path.isdir(root) else []


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
                       "'folder:/path/to/images', 'prepared:/path/to/store' or a TFDS name "
                       "(tfds.list_builders(), e.g. 'imagenet2012', 'cifar10')") from e
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
    self.class_names = list(features["label"].names)
    self.channels, self.full_name = 3, builder.info.full_name
    # Read through a builder made from the prepared files alone: unlike the registered builder
    # class (which may live in the user's own module), it pickles into Grain's worker processes.
    self._data = tfds.builder_from_directory(builder.data_dir).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._data)

  def fingerprint(self) -> str:
    return f"tfds:{self.full_name}/{self.split}:{len(self)}"

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    example = self._data[i]
    return example["image"], int(example["label"])


STORE_FORMAT = "alexnet-jax prepared store"
STORE_VERSION = 1
STORE_METADATA = "metadata.json"
# A record is the label (int32, little-endian) followed by the image's JPEG bytes.
_LABEL_BYTES = 4


def store_record(jpeg: bytes, label: int) -> bytes:
  return int(label).to_bytes(_LABEL_BYTES, "little", signed=True) + jpeg


class StoreError(ValueError):
  """A prepared store that is incomplete, damaged, or does not fit the config."""


def read_store_metadata(root: str) -> dict[str, Any]:
  path = os.path.join(root, STORE_METADATA)
  if not os.path.isfile(path):
    raise StoreError(f"{path} does not exist: {root} is not a prepared store, or its preparation "
                     "has not finished (run python -m alexnet_jax.prepare again to finish it)")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise StoreError(f"{path} is damaged ({e}); prepare the store again") from e
  if metadata.get("format") != STORE_FORMAT or metadata.get("version") != STORE_VERSION:
    raise StoreError(f"{path} is not version {STORE_VERSION} of the {STORE_FORMAT} format "
                     f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})")
  return metadata


class PreparedSource:
  """One split of a store written by ``python -m alexnet_jax.prepare``: JPEGs at training
  resolution in ArrayRecord shards, and ``metadata.json`` (mode, size, quality, counts, class
  names). Every shard's size is checked against the metadata when the source opens, so a
  truncated or missing file stops the run with its name."""
  encoded = True

  def __init__(self, root: str, split: str):
    from grain import sources as grain_sources  # pylint: disable=import-outside-toplevel
    meta = read_store_metadata(root)
    if split not in meta["splits"]:
      raise StoreError(f"prepared store {root} has splits {sorted(meta['splits'])}, not "
                       f"{split!r}")
    shards = meta["splits"][split]["shards"]
    self.paths = [os.path.join(root, s["file"]) for s in shards]
    for path, shard in zip(self.paths, shards):
      size = os.path.getsize(path) if os.path.isfile(path) else None
      if size != shard["bytes"]:
        found = "missing" if size is None else f"{size:,} bytes"
        raise StoreError(f"prepared store file {path} is damaged: {found}, the metadata says "
                         f"{shard['bytes']:,} bytes; prepare the store again")
    self.ends = list(np.cumsum([s["num_examples"] for s in shards]))
    self._data = grain_sources.ArrayRecordDataSource(self.paths)
    if len(self._data) != meta["splits"][split]["num_examples"]:
      raise StoreError(f"prepared store {root} split {split!r} holds {len(self._data)} records; "
                       f"its metadata says {meta['splits'][split]['num_examples']}")
    self.root, self.split, self.name = root, split, f"prepared:{root}"
    self.mode, self.size, self.quality = meta["mode"], meta["size"], meta["quality"]
    self.channels, self.num_classes = meta["channels"], meta["num_classes"]
    self.class_names, self.metadata = meta["class_names"], meta

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, i: int) -> tuple[bytes, int]:
    try:
      record = self._data[i]
    except Exception as e:  # noqa: BLE001  (riegeli reports damage in its own ways)
      raise StoreError(f"{self.describe(i)} cannot be read ({e}); prepare the store again"
                       ) from e
    return record[_LABEL_BYTES:], int.from_bytes(record[:_LABEL_BYTES], "little", signed=True)

  def describe(self, i: int) -> str:
    shard = bisect.bisect_right(self.ends, i)
    return f"{self.paths[shard]} record {i - (self.ends[shard - 1] if shard else 0)}"

  def fingerprint(self) -> str:
    return f"{self.name}/{self.split}:{self.metadata['fingerprint']}"

  def check(self, train_preset: str, eval_preset: str, resize_size: int, channels: int) -> None:
    """Stops a config that this store does not fit, naming the field."""
    where = f"prepared store {self.root} ({STORE_METADATA})"
    needs = {"paper": "paper", "torchvision": "shorter"}.get(train_preset)
    if needs and self.mode != needs:
      raise StoreError(f"{where} has mode {self.mode!r}; train_preset {train_preset!r} needs "
                       f"mode {needs!r} (python -m alexnet_jax.prepare ... --mode {needs})")
    if (train_preset == "paper" or eval_preset in ("center_crop", "ten_crop")) and (
        self.size != resize_size):
      raise StoreError(f"{where} has size {self.size}; resize_size is {resize_size} (prepare "
                       f"with --size {resize_size}, or set resize_size={self.size})")
    if self.channels != channels:
      raise StoreError(f"{where} has {self.channels} channel(s); config.channels is {channels}")


def create_source(dataset: str, split: str, *, data_dir: str | None = None,
                  manual_dir: str | None = None, image_size: int = 224, channels: int = 3
                  ) -> Any:
  """``digits``, ``synthetic``, ``folder:/path``, ``prepared:/path`` or any TFDS name.
  ``image_size`` and ``channels`` only shape ``synthetic``'s images."""
  if dataset == "synthetic":
    images, labels = synthetic_split(split, image_size, channels)
    return ArraySource(images, labels, name="synthetic", split=split, num_classes=1000)
  if dataset == "digits":
    images, labels = digits_split(split)
    return ArraySource(images, labels, name="digits", split=split, num_classes=10)
  if dataset.startswith("folder:"):
    return FolderSource(dataset[len("folder:"):], split)
  if dataset.startswith("prepared:"):
    return PreparedSource(dataset[len("prepared:"):], split)
  return TfdsSource(dataset, split, data_dir=data_dir, manual_dir=manual_dir)
