"""Input pipelines: sources, presets, determinism, resume, eval padding, bad images."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the data pipeline needs the 'train' extra")
tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

from alexnet_jax import input_pipeline as ip  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_preprocess  # noqa: E402

DIGITS = ip.Preprocess("small_noflip", "small", image_size=28, channels=1, mean=(0.5,),
                       std=(0.5,))


SMALL_RGB = ip.Preprocess("small", "small", image_size=16, resize_size=16, mean=(0.5,) * 3,
                          std=(0.5,) * 3)


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A small TFDS dataset prepared on disk: sharded reads need real record files."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(200, 0), "test": self._generate_examples(50, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
      yield i, {"image": rng.integers(0, 256, (20, 24, 3), np.uint8), "label": i % 10}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_digits_source_and_batches():
  train, test = ip.create_source("digits", "train"), ip.create_source("digits", "test")
  assert (train.num_examples, test.num_examples) == (1437, 360)
  assert train.num_classes == 10
  x, y = ip.digits_split("test")
  assert x.shape == (360, 28, 28, 1) and x.dtype == np.uint8 and x.max() > 200
  assert np.bincount(y).min() >= 35  # stratified: every digit well represented
  batch = next(ip.TrainIterator(train, DIGITS, 32, seed=0))
  assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
  x = np.asarray(DIGITS.normalizer()(batch))  # on the device, in the steps
  assert x.dtype == np.float32 and -1.0 <= x.min() < -0.9 and 0.9 < x.max() <= 1.0
  with pytest.raises(ValueError, match="splits 'train' and 'test'"):
    ip.create_source("digits", "validation")


def test_same_seed_same_batches_other_seed_different():
  src = ip.create_source("digits", "train")
  a = _take(ip.TrainIterator(src, DIGITS, 64, seed=3), 3)
  b = _take(ip.TrainIterator(src, DIGITS, 64, seed=3), 3)
  c = _take(ip.TrainIterator(src, DIGITS, 64, seed=4), 3)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  # Same examples, other augmentation: seed the order alike by comparing a fixed-order source.
  pre = ip.Preprocess("small", "small", image_size=28, channels=1, mean=(0.5,), std=(0.5,))
  one = ip.array_source(np.tile(ip.digits_split("train")[0][:1], (64, 1, 1, 1)),
                        np.zeros(64, np.int64))
  views = next(ip.TrainIterator(one, pre, 64, seed=0))["image"]
  assert len({v.tobytes() for v in views}) > 32  # 64 copies of one image, augmented differently


def test_resume_is_exact_across_an_epoch_boundary():
  src = ip.create_source("digits", "train")
  it = ip.TrainIterator(src, DIGITS, 64, seed=7)
  assert it.steps_per_epoch == 22
  straight = _take(it, 27)
  assert it.state() == {"step": 27, "seed": 7}
  resumed = _take(ip.TrainIterator(src, DIGITS, 64, seed=7, start_step=20), 7)
  _assert_same_batches(straight[20:], resumed)
  # The second epoch is a new order, not a replay of the first.
  assert not np.array_equal(straight[0]["label"], straight[22]["label"])


def _processes_batches(monkeypatch, source, pre, batch, processes, steps, **kwargs):
  """Each global batch of ``steps`` as ``processes`` processes would feed it: their local rows
  concatenated in process order."""
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  per_process = []
  for index in range(processes):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    per_process.append(_take(ip.TrainIterator(source, pre, batch, **kwargs), steps))
  monkeypatch.undo()
  return [{k: np.concatenate([p[step][k] for p in per_process]) for k in per_process[0][step]}
          for step in range(steps)]


@pytest.mark.parametrize("kind", ["indexed", "tfds_shards"])
def test_one_data_order_on_any_process_count_and_exact_resume(monkeypatch, tiny_tfds, kind):
  if kind == "indexed":
    source, pre, spe = ip.create_source("digits", "train"), DIGITS, 1437 // 16
  else:
    source, pre = ip.tfds_source("tiny_images", "train", data_dir=tiny_tfds), SMALL_RGB
    spe = 200 // 4 // (16 // 4)  # 4 shards of 50, 4 rows of each per batch
  kwargs = dict(seed=3, num_shards=4)
  assert ip.TrainIterator(source, pre, 16, **kwargs).steps_per_epoch == spe
  start = spe - 2  # the resume crosses the epoch boundary
  one = _processes_batches(monkeypatch, source, pre, 16, 1, spe + 2, **kwargs)
  for processes in (2, 4):
    _assert_same_batches(_processes_batches(monkeypatch, source, pre, 16, processes, 4,
                                            **kwargs), one[:4])
    _assert_same_batches(_processes_batches(monkeypatch, source, pre, 16, processes, 4,
                                            start_step=start, **kwargs), one[start:])
  # Every example once per epoch (but the remainder), and the next epoch a new order.
  labels = np.concatenate([b["label"] for b in one[:spe]])
  assert len(labels) == spe * 16 and not np.array_equal(one[0]["label"], one[spe]["label"])
  if kind == "indexed":
    images = np.concatenate([b["image"] for b in one[:spe]]).reshape(spe * 16, -1)
    assert len({im.tobytes() for im in images}) > 0.97 * spe * 16  # (digits has duplicates)


def _sample_photo_files():
  """JPEGs and PNGs cut from scikit-learn's two photos, at ImageNet-like sizes."""
  from sklearn.datasets import load_sample_images
  import io
  files = []
  for photo in load_sample_images().images:
    for size in ((500, 375), (375, 500), (300, 300)):
      for fmt in ("JPEG", "PNG"):
        out = io.BytesIO()
        Image.fromarray(photo).resize(size, Image.BICUBIC).save(out, fmt, quality=90)
        files.append(out.getvalue())
  return files


@pytest.mark.parametrize("train_preset,eval_preset", [
    ("torchvision", "center_crop"), ("paper", "ten_crop"), ("paper", "center_crop"),
    ("torchvision", "ten_crop"), ("small", "small")])
def test_presets_give_the_float_pipelines_results_up_to_rounding(train_preset, eval_preset):
  # The host rounds to uint8 once, after the resize: at most half a level of 255 off the float
  # pipeline, divided by std on the device. Measured: exactly that bound, plus float noise
  # (1e-4), for JPEGs (cropped decode with a margin) and PNGs (decoded whole) alike.
  pre = ip.Preprocess(train_preset, eval_preset)
  norm = pre.normalizer()
  bound = 0.5 / 255 / min(norm.std) + 1e-4
  for i, data in enumerate(_sample_photo_files()):
    data = tf.constant(data)
    pixels = tf.io.decode_image(data, channels=3, expand_animations=False)
    for draw in range(3):
      seed = tf.constant([11, 3 * i + draw], tf.int64)
      view = {k: v.numpy()[None] for k, v in pre.train(data, seed, encoded=True).items()}
      np.testing.assert_allclose(np.asarray(norm(view))[0],
                                 reference_preprocess.train(pre, pixels, seed).numpy(),
                                 rtol=0, atol=bound)
    view = pre.eval(data, encoded=True).numpy()[None]
    np.testing.assert_allclose(np.asarray(norm({"image": view}))[0],
                               reference_preprocess.evaluate(pre, pixels).numpy(),
                               rtol=0, atol=bound)


def test_tensorflow_sees_no_gpu():
  assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_even_bounds_are_disjoint_and_cover(parts):
  equal = [set(range(s, e)) for s, e in ip.even_bounds(1001, parts, True)]
  assert len({len(t) for t in equal}) == 1 and sum(map(len, equal)) == 1001 // parts * parts
  assert len(set().union(*equal)) == sum(map(len, equal))
  uneven = [set(range(s, e)) for s, e in ip.even_bounds(1001, parts, False)]
  assert set().union(*uneven) == set(range(1001)) and sum(map(len, uneven)) == 1001
  assert max(map(len, uneven)) - min(map(len, uneven)) <= 1


def test_eval_sees_every_example_once_padded_and_masked():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1001, 8, 8, 1), np.uint8)
  labels = np.arange(1001) % 10
  src = ip.array_source(images, labels, split="test")
  pre = ip.Preprocess("small", "small", image_size=8, channels=1, mean=(0.0,), std=(1.0,))
  batches = list(ip.eval_batches(src, pre, 64))
  assert len(batches) == 16 and all(b["image"].shape[0] == 64 for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 1001 and mask[:1001].all()
  got = np.concatenate([b["image"] for b in batches])[mask]
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], labels)


def test_imagenet2012_mock_presets_shapes_and_ranges():
  with tfds.testing.mock_data(num_examples=6):
    src = ip.create_source("imagenet2012", "train")
    assert src.encoded and src.num_classes == 1000 and src.num_examples == 6
    mean, std = np.array(ip.IMAGENET_MEAN), np.array(ip.IMAGENET_STD)
    for preset, low, high in (("torchvision", -mean / std, (1 - mean) / std),
                              ("paper", -mean - 0.5, 1 - mean + 0.5)):
      pre = ip.Preprocess(preset, "center_crop")
      batch = next(ip.TrainIterator(src, pre, 6, seed=0, num_shards=1))
      assert batch["image"].shape == (6, 224, 224, 3) and batch["image"].dtype == np.uint8
      assert ("colour" in batch) == (preset == "paper")
      x = np.asarray(pre.normalizer()(batch))
      assert np.all(x >= low.min() - 1e-5) and np.all(x <= high.max() + 1e-5)
      assert batch["label"].min() >= 0 and batch["label"].max() < 1000
    val = ip.create_source("imagenet2012", "validation")
    batch = next(ip.eval_batches(val, ip.Preprocess("paper", "ten_crop"), 4))
    assert batch["image"].shape == (4, 10, 224, 224, 3)


def test_imagenet2012_without_archives_says_which_files_go_where(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    ip.create_source("imagenet2012", "train", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(tmp_path / "manual"))
  msg = str(e.value)
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  assert str(tmp_path / "manual") in msg


def test_ten_crop_geometry():
  image = tf.reshape(tf.range(10 * 12 * 1), (10, 12, 1))
  crops = ip.ten_crop(image, 6).numpy()
  x = image.numpy()
  expected = [x[:6, :6], x[:6, 6:], x[4:, :6], x[4:, 6:], x[2:8, 3:9]]
  for i, e in enumerate(expected):
    np.testing.assert_array_equal(crops[i], e)
    np.testing.assert_array_equal(crops[i + 5], e[:, ::-1])


def test_random_resized_crop_geometry():
  image = tf.reshape(tf.cast(tf.range(40 * 40 * 3), tf.float32), (40, 40, 3))
  seed = tf.constant([1, 2], tf.int64)
  whole = ip.random_resized_crop(image, 40, seed, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(whole.numpy(), image.numpy(), atol=1e-3)
  # A 20x80 image can never hold a full-area square: the fallback is the centre 20x20 square.
  wide = tf.reshape(tf.cast(tf.range(20 * 80 * 1), tf.float32), (20, 80, 1))
  centre = ip.random_resized_crop(wide, 20, seed, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(centre.numpy(), wide.numpy()[:, 30:50], atol=1e-3)
  sizes = set()
  for i in range(20):
    out = ip.random_resized_crop(image, 16, tf.constant([i, 0], tf.int64))
    assert out.shape == (16, 16, 3)
    sizes.add(float(out.numpy().std()))
  assert len(sizes) > 10


def test_pca_noise_covariance_matches_the_paper():
  draws = np.stack([ip.pca_colour(tf.constant([i, 5], tf.int64)).numpy() for i in range(4000)])
  vec, val = np.array(ip._EIGVEC), np.array(ip._EIGVAL)
  expected = vec @ np.diag((ip.PCA_NOISE_STD * val) ** 2) @ vec.T
  np.testing.assert_allclose(np.cov(draws.T), expected, atol=0.1 * expected.max())


def _write_folder(root, bad=False):
  rng = np.random.default_rng(0)
  colours = {"cat": (200, 30, 30), "dog": (30, 30, 200)}
  for split in ("train", "val"):
    for name, rgb in colours.items():
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(5):
        arr = np.clip(np.array(rgb) + rng.integers(-20, 20, (40, 50, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.jpg", quality=95)
      base = np.full((40, 50, 3), rgb, np.uint8)
      Image.fromarray(base).convert("L").save(d / "grey.png")
      Image.fromarray(base).convert("RGBA").save(d / "rgba.png")
      Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg", quality=95)
  (root / "train" / "cat" / "notes.txt").write_text("not an image")
  if bad:
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")


def test_folder_source_converts_grey_rgba_cmyk(tmp_path):
  _write_folder(tmp_path)
  src = ip.create_source(f"folder:{tmp_path}", "val")
  assert src.num_examples == 16 and src.num_classes == 2
  pre = ip.Preprocess("torchvision", "small", image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
  (batch,) = list(ip.eval_batches(src, pre, 16))
  assert batch["image"].shape == (16, 32, 32, 3)
  by_file = dict(zip([os.path.basename(f) + str(l) for f, l in zip(src.files, batch["label"])],
                     batch["image"].mean(axis=(1, 2)) / 255))
  # CMYK and RGBA decode to the colour PIL sees in RGB; grey is replicated to three channels.
  for label, name in enumerate(("cat", "dog")):
    want = np.asarray(Image.open(tmp_path / "val" / name / "cmyk.jpg").convert("RGB"))
    np.testing.assert_allclose(by_file[f"cmyk.jpg{label}"], want.mean(axis=(0, 1)) / 255,
                               atol=0.03)
    rgba = np.asarray(Image.open(tmp_path / "val" / name / "rgba.png").convert("RGB"))
    np.testing.assert_allclose(by_file[f"rgba.png{label}"], rgba.mean(axis=(0, 1)) / 255,
                               atol=0.01)
    grey = by_file[f"grey.png{label}"]
    assert np.ptp(grey) < 1e-6 and grey[0] > 0
  with pytest.raises(ValueError, match="splits found: .*train.*val"):
    ip.create_source(f"folder:{tmp_path}", "test")


def test_folder_bad_image_named_or_skipped(tmp_path):
  _write_folder(tmp_path, bad=True)
  pre = ip.Preprocess("torchvision", image_size=32, resize_size=36)
  src = ip.create_source(f"folder:{tmp_path}", "train")
  with pytest.raises(ValueError, match=r"(?s)1 image\(s\).*broken\.jpg: jpeg"):
    _take(ip.TrainIterator(src, pre, 17, seed=0), 1)
  src = ip.create_source(f"folder:{tmp_path}", "train", skip_bad_images=True)
  assert [os.path.basename(f) for f in src.skipped] == ["broken.jpg"]
  assert src.num_examples == 16
  assert next(ip.TrainIterator(src, pre, 16, seed=0))["image"].shape == (16, 32, 32, 3)


def test_bad_settings_are_reported():
  src = ip.create_source("digits", "train")
  with pytest.raises(ValueError, match="1437 examples, fewer than one global batch of 2048"):
    ip.TrainIterator(src, DIGITS, 2048)
  with pytest.raises(ValueError, match="layout must be one of"):
    ip.TrainIterator(src, DIGITS, 64, layout="pjit")
  with pytest.raises(ValueError, match="train_preset must be one of"):
    ip.Preprocess("random")
  with pytest.raises(ValueError, match="mean and std need 1"):
    ip.Preprocess("small", channels=1)


def test_bad_shard_settings_are_reported(tiny_tfds):
  src = ip.tfds_source("tiny_images", "train", data_dir=tiny_tfds)
  with pytest.raises(ValueError, match=r"data_shards=5 must be a multiple of the 1 process\(es\) "
                                       "and divide the global batch 24"):
    ip.TrainIterator(src, SMALL_RGB, 24, num_shards=5)
  with pytest.raises(ValueError, match=r"50 examples per data shard \(4 shards\), fewer than "
                                       "the 64 rows"):
    ip.TrainIterator(src, SMALL_RGB, 256, num_shards=4)


def test_prefetch_to_device_keeps_order_and_values():
  batches = [{"x": np.full((2, 3), i, np.float32)} for i in range(5)]
  got = list(ip.prefetch_to_device(iter(batches), 2, jax.device_put))
  assert [int(b["x"][0, 0]) for b in got] == list(range(5))
  assert all(isinstance(b["x"], jax.Array) for b in got)


def test_eight_devices_layouts_and_divisibility():
  code = textwrap.dedent("""
      import numpy as np, pytest
      from alexnet_jax import input_pipeline as ip
      src = ip.create_source("digits", "train")
      pre = ip.Preprocess("small_noflip", "small", image_size=28, channels=1, mean=(0.5,),
                          std=(0.5,))
      b = next(ip.TrainIterator(src, pre, 64, layout="pmap", seed=1))
      assert b["image"].shape == (8, 8, 28, 28, 1) and b["label"].shape == (8, 8), b["image"].shape
      flat = next(ip.TrainIterator(src, pre, 64, layout="jit", seed=1))
      np.testing.assert_array_equal(b["image"].reshape(flat["image"].shape), flat["image"])
      with pytest.raises(ValueError, match="multiple of the 8 devices"):
        ip.TrainIterator(src, pre, 60)
      ev = list(ip.eval_batches(ip.create_source("digits", "test"), pre, 64,
                                layout="pmap"))
      assert sum(int(e["mask"].sum()) for e in ev) == 360 and ev[0]["mask"].shape == (8, 8)
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
