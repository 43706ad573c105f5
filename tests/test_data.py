"""The input pipeline: sources, host views, the global order, resume, eval padding, bad images,
and training and predict with TensorFlow not installed."""

import functools
import glob
import io
import os
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("grain", reason="the input pipeline needs the 'train' extra")
from PIL import Image  # noqa: E402

from alexnet_jax.data import host, loader, order, sources  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = host.Preprocess("small_noflip", "small", image_size=28, resize_size=28, channels=1,
                         mean=(0.5,), std=(0.5,))
SMALL_RGB = host.Preprocess("small", "small", image_size=16, resize_size=16, mean=(0.5,) * 3,
                            std=(0.5,) * 3)
# Runs a script as on a machine without TensorFlow: every import of it fails as if it were not
# installed (sys.modules["tensorflow"] = None would not do: TFDS takes a present key for "loaded").
NO_TENSORFLOW = textwrap.dedent("""
    import sys
    class _Hide:
      def __init__(self, inner): self.inner = inner
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow": return None
        return self.inner.find_spec(name, path, target)
      def invalidate_caches(self): getattr(self.inner, "invalidate_caches", lambda: None)()
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@functools.cache  # TFDS registers a builder class by name, once
def _tiny_tfds_builder():
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A small TFDS dataset prepared on disk (preparing needs TensorFlow; reading does not)."""
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

  return TinyImages


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs the 'tfds' extra")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _tiny_tfds_builder()(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_digits_source_and_batches():
  train, test = sources.create_source("digits", "train"), sources.create_source("digits", "test")
  assert (len(train), len(test)) == (1437, 360) and train.num_classes == 10
  x, y = sources.digits_split("test")
  assert x.shape == (360, 28, 28, 1) and x.dtype == np.uint8 and x.max() > 200
  assert np.bincount(y).min() >= 35  # stratified: every digit well represented
  batch = next(loader.TrainLoader(train, DIGITS, 32, seed=0))
  assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
  assert "flip" not in batch  # small_noflip
  x = np.asarray(DIGITS.normalizer()(batch))  # on the device, in the steps
  assert x.dtype == np.float32 and -1.0 <= x.min() < -0.9 and 0.9 < x.max() <= 1.0
  with pytest.raises(ValueError, match="splits 'train' and 'test'"):
    sources.create_source("digits", "validation")


def test_same_seed_same_batches_other_seed_different():
  src = sources.create_source("digits", "train")
  a = _take(loader.TrainLoader(src, DIGITS, 64, seed=3), 3)
  b = _take(loader.TrainLoader(src, DIGITS, 64, seed=3, threads=1), 3)  # any thread count
  c = _take(loader.TrainLoader(src, DIGITS, 64, seed=4), 3)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  # 64 copies of one image, augmented differently: crops, and flips the device applies.
  pre = host.Preprocess("small", "small", image_size=28, resize_size=28, channels=1,
                        mean=(0.5,), std=(0.5,))
  one = sources.ArraySource(np.tile(sources.digits_split("train")[0][:1], (64, 1, 1, 1)),
                            np.zeros(64, np.int64))
  batch = next(loader.TrainLoader(one, pre, 64, seed=0))
  assert len({v.tobytes() for v in batch["image"]}) > 16
  assert 10 < batch["flip"].sum() < 54
  views = np.asarray(pre.normalizer()(batch))
  assert len({v.tobytes() for v in views}) > 32


def test_resume_is_exact_across_an_epoch_boundary():
  src = sources.create_source("digits", "train")
  it = loader.TrainLoader(src, DIGITS, 64, seed=7)
  assert it.steps_per_epoch == 22
  straight = _take(it, 27)
  assert it.state() == {"step": 27, "seed": 7}
  resumed = _take(loader.TrainLoader(src, DIGITS, 64, seed=7, start_step=20), 7)
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
    per_process.append(_take(loader.TrainLoader(source, pre, batch, **kwargs), steps))
  monkeypatch.undo()
  return [{k: np.concatenate([p[step][k] for p in per_process]) for k in per_process[0][step]}
          for step in range(steps)]


@pytest.mark.parametrize("kind", ["digits", "tfds"])
def test_one_data_order_on_any_process_count_and_exact_resume(monkeypatch, request, kind):
  if kind == "digits":
    source, pre = sources.create_source("digits", "train"), DIGITS
  else:
    source = sources.create_source("tiny_images", "train",
                                   data_dir=request.getfixturevalue("tiny_tfds"))
    pre = SMALL_RGB
  spe = len(source) // 16
  kwargs = dict(seed=3)
  start = spe - 2  # the resume crosses the epoch boundary
  one = _processes_batches(monkeypatch, source, pre, 16, 1, spe + 2, **kwargs)
  for processes in (2, 4):
    _assert_same_batches(_processes_batches(monkeypatch, source, pre, 16, processes, 4,
                                            **kwargs), one[:4])
    _assert_same_batches(_processes_batches(monkeypatch, source, pre, 16, processes, 4,
                                            start_step=start, **kwargs), one[start:])
  # Every example at most once per epoch, and the next epoch a new order.
  labels = np.concatenate([b["label"] for b in one[:spe]])
  assert len(labels) == spe * 16 and not np.array_equal(one[0]["label"], one[spe]["label"])
  images = np.concatenate([b["image"] for b in one[:spe]]).reshape(spe * 16, -1)
  assert len({im.tobytes() for im in images}) > 0.97 * spe * 16  # (digits has duplicates)


def test_the_global_order_is_a_permutation_per_epoch():
  o = order.GlobalOrder(103, 10, seed=5)
  assert o.steps_per_epoch == 10
  for epoch in range(2):
    seen = [o.locate(epoch * 10 + s, r)[0] for s in range(10) for r in range(10)]
    assert len(set(seen)) == 100 and set(seen) <= set(range(103))
  draws = {float(o.locate(s, r)[1].random()) for s in range(3) for r in range(10)}
  assert len(draws) == 30  # one generator per (epoch, position)
  assert o.locate(3, 4)[1].random() == o.locate(3, 4)[1].random()
  with pytest.raises(ValueError, match="has 7 examples, fewer than one global batch of 10"):
    order.steps_per_epoch(7, 10)


def _photo(size=(500, 375), fmt="JPEG"):
  from sklearn.datasets import load_sample_images
  out = io.BytesIO()
  Image.fromarray(load_sample_images().images[0]).resize(size, Image.BICUBIC).save(
      out, fmt, quality=90)
  return out.getvalue()


def _differences(a, b):
  diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
  return diff.mean(), np.percentile(diff, 99)


def test_a_box_of_the_output_size_is_sliced_and_others_resampled_as_pil_would():
  data = _photo()
  whole = host.decode(data, 3)
  assert whole.shape == (375, 500, 3)
  np.testing.assert_array_equal(host.resample(data, (10, 20, 234, 244), (224, 224), 3),
                                whole[10:234, 20:244])
  pil = lambda box, out: np.asarray(Image.fromarray(whole).resize(out[::-1], Image.BILINEAR,
                                                                  box=box))
  # Enlarged: bilinear at the exact fractional place, as PIL (measured: mean 0.03, max 1).
  mean, p99 = _differences(host.resample(data, (12.0, 30.5, 42.0, 70.5), (48, 64), 3),
                           pil((30.5, 12.0, 70.5, 42.0), (48, 64)))
  assert mean < 0.1 and p99 <= 1
  # Shrunk: OpenCV's area filter against PIL's antialiased bilinear (measured on whole-pixel
  # boxes: mean 0.33, 99th percentile 6; on a box with fractional edges, cut at whole pixels:
  # 0.68 and 12).
  mean, p99 = _differences(host.resample(data, (12, 30, 100, 130), (48, 64), 3),
                           pil((30, 12, 130, 100), (48, 64)))
  assert mean < 0.6 and p99 < 10
  mean, p99 = _differences(host.resample(data, (12.0, 30.5, 100.0, 130.5), (48, 64), 3),
                           pil((30.5, 12.0, 130.5, 100.0), (48, 64)))
  assert mean < 1.2 and p99 < 20
  # A box at least twice the output is decoded at a DCT scale first, whose filter is softer
  # than PIL's bilinear one. The bound: a mean difference under 6 levels of 255, 99% of pixels
  # within 40 (measured on this photo at 1/2, 1/3 and 1/7 of its size: means 4.4, 3.4 and 1.8,
  # 99th percentiles 31, 24 and 11).
  for out in ((187, 250), (112, 149), (56, 74)):
    dct = host.resample(data, (0, 0, 375, 500), out, 3).astype(np.float32)
    full = np.asarray(Image.fromarray(whole).resize(out[::-1], Image.BILINEAR), np.float32)
    assert np.abs(dct - full).mean() < 6 and np.percentile(np.abs(dct - full), 99) < 40, out


def test_a_paper_store_image_costs_a_slice():
  # 256x256 (shorter side already 256): the paper view is the drawn 224 window, unresampled.
  data = _photo((256, 256))
  whole = host.decode(data, 3)
  pre = host.Preprocess("paper")
  rng = np.random.default_rng(0)
  view = pre.train(data, rng)
  top, left = np.random.default_rng(0).integers(0, 33, 2)
  np.testing.assert_array_equal(view["image"], whole[top:top + 224, left:left + 224])
  assert view["colour"].shape == (3,) and view["flip"].dtype == np.bool_
  np.testing.assert_array_equal(host.Preprocess(eval_preset="center_crop").eval(data),
                                whole[16:240, 16:240])


@pytest.mark.parametrize("train_preset,eval_preset", [
    ("torchvision", "center_crop"), ("paper", "ten_crop"), ("small", "small")])
def test_presets_shapes_ranges_and_device_half(train_preset, eval_preset):
  pre = host.Preprocess(train_preset, eval_preset)
  norm = pre.normalizer()
  mean, std = np.array(pre.mean), np.array(pre.std if train_preset != "paper" else (1.0,) * 3)
  low, high = (-mean - 0.5) / std, (1 - mean + 0.5) / std
  for fmt, size in (("JPEG", (500, 375)), ("PNG", (300, 400)), ("JPEG", (375, 500))):
    data = _photo(size, fmt)
    views = [pre.train(data, np.random.default_rng(i)) for i in range(4)]
    batch = {k: np.stack([v[k] for v in views]) for k in views[0]}
    assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.uint8
    assert ("colour" in batch) == (train_preset == "paper")
    x = np.asarray(norm(batch))
    assert np.all(x >= low.min() - 1e-5) and np.all(x <= high.max() + 1e-5)
    # The device flips where the host drew it.
    plain = np.asarray(norm({k: v for k, v in batch.items() if k != "flip"}))
    for i, flip in enumerate(batch["flip"]):
      np.testing.assert_array_equal(x[i], plain[i][:, ::-1] if flip else plain[i])
    assert pre.eval(data).shape == pre.eval_shape()


def test_ten_crop_geometry():
  image = np.arange(10 * 12).reshape(10, 12, 1)
  crops = host.ten_crop(image, 6)
  expected = [image[:6, :6], image[:6, 6:], image[4:, :6], image[4:, 6:], image[2:8, 3:9]]
  for i, e in enumerate(expected):
    np.testing.assert_array_equal(crops[i], e)
    np.testing.assert_array_equal(crops[i + 5], e[:, ::-1])


def test_random_resized_crop_windows():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = host.rrc_window(375, 500, rng)
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0 and 0.7 <= w / h <= 1.4
  # A 20x80 image can never hold a full-area square: the fallback is the centre 20x20 square.
  assert host.rrc_window(20, 80, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 30, 20, 20)


def test_pca_noise_covariance_matches_the_paper():
  draws = np.stack([host.pca_colour(np.random.default_rng(i)) for i in range(4000)])
  vec, val = np.array(host.EIGVEC), np.array(host.EIGVAL)
  expected = vec @ np.diag((host.PCA_NOISE_STD * val) ** 2) @ vec.T
  np.testing.assert_allclose(np.cov(draws.T), expected, atol=0.1 * expected.max())


def test_eval_sees_every_example_once_padded_and_masked():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1001, 8, 8, 1), np.uint8)
  labels = np.arange(1001) % 10
  src = sources.ArraySource(images, labels, split="test")
  pre = host.Preprocess("small", "small", image_size=8, resize_size=8, channels=1,
                        mean=(0.0,), std=(1.0,))
  batches = list(loader.eval_batches(src, pre, 64))
  assert len(batches) == 16 and all(b["image"].shape[0] == 64 for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 1001 and mask[:1001].all()
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[mask], images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], labels)


def test_tfds_source_reads_array_record_and_refuses_tfrecord(tiny_tfds, tmp_path):
  src = sources.create_source("tiny_images", "test", data_dir=tiny_tfds)
  assert len(src) == 50 and src.num_classes == 10 and src.encoded
  image, label = src[3]
  assert isinstance(image, bytes) and 0 <= label < 10 and host.decode(image, 3).shape == (20, 24, 3)
  _tiny_tfds_builder()(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  with pytest.raises(ValueError, match="prepared as tfrecord.*tfds convert_format"):
    sources.create_source("tiny_images", "train", data_dir=str(tmp_path))


def test_imagenet2012_without_archives_says_which_files_go_where(tmp_path):
  pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs the 'tfds' extra")
  with pytest.raises(FileNotFoundError) as e:
    sources.create_source("imagenet2012", "train", data_dir=str(tmp_path / "tfds"),
                          manual_dir=str(tmp_path / "manual"))
  msg = str(e.value)
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  assert str(tmp_path / "manual") in msg


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
  src = sources.create_source(f"folder:{tmp_path}", "val")
  assert len(src) == 16 and src.num_classes == 2
  pre = host.Preprocess("torchvision", "small", image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
  (batch,) = list(loader.eval_batches(src, pre, 16))
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
    sources.create_source(f"folder:{tmp_path}", "test")


def test_folder_bad_image_is_named(tmp_path):
  _write_folder(tmp_path, bad=True)
  pre = host.Preprocess("torchvision", image_size=32, resize_size=36)
  src = sources.create_source(f"folder:{tmp_path}", "train")
  with pytest.raises(ValueError, match=r"broken\.jpg cannot be decoded.*alexnet_jax\.prepare"):
    _take(loader.TrainLoader(src, pre, 17, seed=0), 1)


def test_bad_settings_are_reported():
  src = sources.create_source("digits", "train")
  with pytest.raises(ValueError, match="1437 examples, fewer than one global batch of 2048"):
    loader.TrainLoader(src, DIGITS, 2048)
  with pytest.raises(ValueError, match="train_preset must be one of"):
    host.Preprocess("random")
  with pytest.raises(ValueError, match="mean and std need 1"):
    host.Preprocess("small", channels=1)


def test_prefetch_to_device_keeps_order_and_values():
  batches = [{"x": np.full((2, 3), i, np.float32)} for i in range(5)]
  got = list(loader.prefetch_to_device(iter(batches), 2, jax.device_put))
  assert [int(b["x"][0, 0]) for b in got] == list(range(5))
  assert all(isinstance(b["x"], jax.Array) for b in got)


def test_prefetch_to_device_raises_the_threads_error_and_stops_when_closed():
  def failing():
    yield {"x": np.zeros(2)}
    raise ValueError("a bad image")

  it = loader.prefetch_to_device(failing(), 2, jax.device_put)
  assert int(next(it)["x"][0]) == 0
  with pytest.raises(ValueError, match="a bad image"):
    next(it)
  pulled = []

  def endless():
    while True:
      pulled.append(len(pulled))
      yield {"x": np.full(2, pulled[-1])}

  it = loader.prefetch_to_device(endless(), 2, jax.device_put)
  assert [int(next(it)["x"][0]) for _ in range(3)] == [0, 1, 2]
  it.close()
  deadline = time.time() + 10
  while any(t.name == "prefetch_to_device" for t in threading.enumerate()):
    assert time.time() < deadline, "the prefetch thread outlived its generator"
    time.sleep(0.01)
  assert len(pulled) <= 3 + 2 + 1  # taken, queued, in hand: no more read after the close


def test_grain_worker_processes_give_the_same_batches():
  src = sources.create_source("digits", "train")
  a = _take(loader.TrainLoader(src, DIGITS, 64, seed=2, start_step=21), 3)
  b = _take(loader.TrainLoader(src, DIGITS, 64, seed=2, start_step=21, workers=2), 3)
  _assert_same_batches(a, b)


def test_training_and_predict_run_without_tensorflow(tmp_path):
  pytest.importorskip("tensorboard", reason="the test reads the events with TensorBoard")
  pytest.importorskip("ml_collections", reason="train.py needs the 'train' extra")
  _write_folder(tmp_path / "photos")
  code = NO_TENSORFLOW + textwrap.dedent(f"""
      import json, runpy
      sys.argv = ["train.py", "--workdir", {str(tmp_path / "run")!r},
                  "--config.num_train_steps=6", "--config.eval_every_steps=3",
                  "--config.log_every_steps=3"]
      try:
        runpy.run_path("train.py", run_name="__main__")
      except SystemExit as e:
        assert not e.code, e.code
      from alexnet_jax import predict, pretrained, models
      import jax
      model = models.create_model("alexnet_half", num_classes=10)
      weights = {str(tmp_path / "w.msgpack")!r}
      pretrained.save_params(weights, models.init_params(model, jax.random.key(0)))
      code = predict.main([{str(tmp_path / "photos" / "val")!r}, "--variant", "alexnet_half",
                           "--num-classes", "10", "--weights", weights, "--json", "--topk", "2"])
      assert code == 0, code
      loaded = sorted(m for m in sys.modules if m.partition(".")[0] == "tensorflow")
      print("tensorflow modules:", loaded)
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "tensorflow modules: []" in out.stdout
  assert "eval at step 6" in out.stdout
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  (events,) = glob.glob(str(tmp_path / "run" / "tensorboard" / "events.out.tfevents.*"))
  acc = EventAccumulator(events)
  acc.Reload()
  assert [e.step for e in acc.Scalars("train_loss")] == [3, 6]
  assert [e.step for e in acc.Scalars("eval_top1")] == [3, 6]


def test_eight_devices_divisibility_and_pmap_put():
  code = textwrap.dedent("""
      import jax, numpy as np, pytest
      from alexnet_jax import training
      from alexnet_jax.data import host, loader, sources
      from configs import default
      src = sources.create_source("digits", "train")
      pre = host.Preprocess("small_noflip", "small", image_size=28, resize_size=28, channels=1,
                            mean=(0.5,), std=(0.5,))
      b = next(loader.TrainLoader(src, pre, 64, seed=1))
      assert b["image"].shape == (64, 28, 28, 1)
      config = default.get_config()
      model = training.create_model_from_config(config, 10)
      steps = training.make_steps("pmap", model, training.optim.create_optimizer(config, 1, 1))
      placed = steps.put(b["image"])
      assert placed.shape == (8, 8, 28, 28, 1), placed.shape
      np.testing.assert_array_equal(np.asarray(placed).reshape(b["image"].shape), b["image"])
      with pytest.raises(ValueError, match="multiple of the 8 devices"):
        loader.TrainLoader(src, pre, 60)
      ev = list(loader.eval_batches(sources.create_source("digits", "test"), pre, 64))
      assert sum(int(e["mask"].sum()) for e in ev) == 360 and ev[0]["mask"].shape == (64,)
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
