"""The prepared store: ``python -m alexnet_jax.prepare`` and ``prepared:`` sources."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alexnet_jax import bench, training
from alexnet_jax.data import host, loader, prepare, sources

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_data import _tiny_tfds_builder, _write_folder  # noqa: E402
from test_training import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """14 photo-cut JPEGs (500x375, some portrait) in train/, 4 in validation/, one broken."""
  root = tmp_path_factory.mktemp("photos")
  bench.write_photo_jpegs(str(root / "v"), 4, classes=2, seed=1)
  bench.write_photo_jpegs(str(root), 14, classes=2)
  os.rename(root / "v" / "train", root / "validation")
  os.rmdir(root / "v")
  (root / "train" / "class001" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  return root


def _records(store, split):
  src = sources.PreparedSource(str(store), split)
  return [src[i] for i in range(len(src))]


def test_paper_store_holds_the_centre_square_of_every_image(photos, tmp_path, capsys):
  meta = prepare.prepare(f"folder:{photos}", str(tmp_path / "s"), mode="paper", size=64,
                         shard_size=4, workers=2)
  out = capsys.readouterr().out
  assert "1 undecodable left out" in out and "prepare: 19/19 images" in out, out
  assert meta["splits"]["train"]["num_examples"] == 14
  assert meta["splits"]["train"]["skipped"] == 1
  # 15 files in shards of 4, 4, 4 and 3; the broken one (the last file) left out of its shard.
  assert sorted(s["num_examples"] for s in meta["splits"]["train"]["shards"]) == [2, 4, 4, 4]
  assert meta["class_names"] == ["class000", "class001"] and meta["num_classes"] == 2
  skipped = (tmp_path / "s" / "skipped.txt").read_text().splitlines()
  assert len(skipped) == 1 and skipped[0].startswith(str(photos / "train" / "class001" /
                                                         "broken.jpg"))
  assert not os.path.exists(tmp_path / "s" / prepare.PROGRESS_DIR)
  folder = sources.FolderSource(str(photos), "train")
  good = [i for i in range(len(folder)) if not folder.files[i].endswith("broken.jpg")]
  errors = []
  for (jpeg, label), i in zip(_records(tmp_path / "s", "train"), good):
    original, original_label = folder[i]
    assert label == original_label
    stored = host.decode(jpeg, 3).astype(int)
    want = prepare.store_view(original, "paper", 64, 3).astype(int)
    assert stored.shape == (64, 64, 3)
    errors.append(np.abs(stored - want))
    assert np.percentile(errors[-1], 99) < 40
  # JPEG quality 90 with 4:2:0 chroma, on 64x64 views of detailed photos: measured a mean
  # |error| of 4.2 (at most 5.0 for one image); the same views shifted by 2 pixels are >= 9.5.
  assert np.mean(errors) < 5


def test_shorter_store_keeps_the_aspect_and_never_upscales(tmp_path):
  images = np.zeros((3, 90, 120, 3), np.uint8)
  images[:, :, :60] = 200
  small = sources.ArraySource(images, np.array([0, 1, 2]), name="a")
  assert prepare.store_view(images[0], "shorter", 60, 3).shape == (60, 80, 3)
  assert prepare.store_view(images[0], "shorter", 100, 3).shape == (90, 120, 3)
  assert prepare.store_view(images[0], "paper", 100, 3).shape == (100, 100, 3)
  assert prepare.store_view(images[0][:, :, :1], "shorter", 45, 1).shape == (45, 60, 1)
  assert len(small) == 3


def test_digits_store_trains_and_matches_a_clean_run_after_kill_9(tmp_path):
  """An interrupted run keeps its finished shards; the rerun makes the same store."""
  command = lambda out: [sys.executable, "-m", "alexnet_jax.prepare", "digits", str(out),
                         "--mode", "paper", "--size", "28", "--shard_size", "32", "--workers",
                         "1", "--splits", "train"]
  clean = tmp_path / "clean"
  subprocess.run(command(clean), check=True, cwd=ROOT, capture_output=True)
  store = tmp_path / "killed"
  proc = subprocess.Popen(command(store), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  progress = store / prepare.PROGRESS_DIR
  deadline = time.time() + 120
  while len([f for f in os.listdir(progress) if f.startswith("train-")]
            if progress.exists() else []) < 3:
    assert proc.poll() is None and time.time() < deadline, "prepare ended before the kill"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (store / "metadata.json").exists()  # readers never take it for complete
  with pytest.raises(sources.StoreError, match="has not finished"):
    sources.PreparedSource(str(store), "train")
  # A shard counts as finished once its record of completion is written (after its rename).
  kept = {f[:-len(".json")]: os.stat(store / f[:-len(".json")]).st_mtime_ns
          for f in os.listdir(progress) if f.startswith("train-") and f.endswith(".json")}
  rerun = subprocess.run(command(store), cwd=ROOT, capture_output=True, text=True, check=True)
  assert f"{len(kept)} already written" in rerun.stdout, rerun.stdout
  for f, mtime in kept.items():
    assert os.stat(store / f).st_mtime_ns == mtime, f"{f} was written again"
  assert _records(store, "train") == _records(clean, "train")
  assert not [f for f in os.listdir(store) if f.endswith(".partial")]
  # The store trains like any source.
  config = tiny_config(dataset=f"prepared:{store}", eval_split="train", train_preset="small",
                       eval_preset="small", num_train_steps=2, eval_every_steps=2)
  training.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert [json.loads(line).get("eval_count") for line in f][-1] == 1437


def test_ctrl_c_keeps_the_finished_shards_and_says_how_to_finish(tmp_path):
  store = tmp_path / "s"
  proc = subprocess.Popen(
      [sys.executable, "-m", "alexnet_jax.prepare", "digits", str(store), "--mode", "shorter",
       "--size", "28", "--shard_size", "8", "--workers", "2", "--splits", "train"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  progress = store / prepare.PROGRESS_DIR
  deadline = time.time() + 120
  while len([f for f in os.listdir(progress) if f.endswith(".array_record.json")]
            if progress.exists() else []) < 2:
    assert proc.poll() is None and time.time() < deadline, "prepare ended before the signal"
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in err, err
  assert err.strip().splitlines() == [f"prepare: interrupted; the finished shards are kept in "
                                      f"{store}: run the same command again to finish"]
  assert not (store / "metadata.json").exists()
  done = [f for f in os.listdir(progress) if f.endswith(".array_record.json")]
  assert all((store / f[:-len(".json")]).exists() for f in done) and len(done) < 180


def test_rerun_with_other_settings_or_a_changed_source_is_refused(tmp_path):
  _write_folder(tmp_path / "data")
  out = str(tmp_path / "s")
  prepare.prepare(f"folder:{tmp_path / 'data'}", out, mode="shorter", size=32, workers=1)
  again = prepare.prepare(f"folder:{tmp_path / 'data'}", out, mode="shorter", size=32)
  assert again["splits"]["val"]["num_examples"] == 16
  with pytest.raises(ValueError, match="size 48 differs from the run that started this store"):
    prepare.prepare(f"folder:{tmp_path / 'data'}", out, mode="shorter", size=48)
  (tmp_path / "data" / "val" / "cat" / "0.jpg").unlink()
  with pytest.raises(ValueError, match="the source changed since"):
    prepare.prepare(f"folder:{tmp_path / 'data'}", out, mode="shorter", size=32)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
  root = tmp_path_factory.mktemp("store")
  _write_folder(root / "data")
  store = root / "s"
  prepare.prepare(f"folder:{root / 'data'}", str(store), mode="shorter", size=32, workers=1,
                  shard_size=6)
  return store


def _train_py(tmp_path, store, *flags):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={tmp_path / 'run'}",
       f"--config.dataset=prepared:{store}", "--config.eval_split=val", "--config.channels=3",
       "--config.train_preset=torchvision", "--config.eval_preset=center_crop",
       "--config.resize_size=32", "--config.mean=(0.5,0.5,0.5)", "--config.std=(0.5,0.5,0.5)",
       "--config.batch_size=8", "--config.num_train_steps=1", *flags],
      cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  return proc.returncode, proc.stdout + proc.stderr


def test_train_py_stops_in_one_line_on_a_store_that_does_not_fit_or_is_damaged(
    small_store, tmp_path):
  code, out = _train_py(tmp_path, small_store, "--config.resize_size=36")
  errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert code == 1 and "Traceback" not in out, out[-3000:]
  assert errors == [f"error: prepared store {small_store} (metadata.json) has size 32; "
                    "resize_size is 36 (prepare with --size 36, or set resize_size=32)"], out
  damaged = tmp_path / "damaged"
  shutil.copytree(small_store, damaged)
  shard = damaged / "train-00001-of-00003.array_record"
  shard.write_bytes(shard.read_bytes()[:-100])
  code, out = _train_py(tmp_path, damaged)
  errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert code == 1 and "Traceback" not in out, out[-3000:]
  assert len(errors) == 1 and errors[0].startswith(f"error: prepared store file {shard} is "
                                                   "damaged"), out


def test_store_checks_the_config_fields(small_store):
  src = sources.PreparedSource(str(small_store), "train")
  src.check("torchvision", "center_crop", 32, 3)
  src.check("small", "small", 99, 3)  # presets that read no resize_size
  for args, field in [(("paper", "center_crop", 32, 3), "mode 'shorter'; train_preset 'paper'"),
                      (("torchvision", "ten_crop", 40, 3), "size 32; resize_size is 40"),
                      (("small", "small", 32, 1), "3 channel")]:
    with pytest.raises(sources.StoreError, match=field):
      src.check(*args)
  with pytest.raises(sources.StoreError, match=r"splits \['train', 'val'\], not 'test'"):
    sources.PreparedSource(str(small_store), "test")


def test_tfds_source_feeds_grain_workers_and_prepares(tmp_path):
  """A TFDS source pickles into Grain's worker processes (without its builder's class), and
  prepare reads it."""
  pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs the 'tfds' extra")
  data_dir = str(tmp_path / "tfds")
  _tiny_tfds_builder()(data_dir=data_dir, file_format="array_record").download_and_prepare()
  src = sources.TfdsSource("tiny_images", "train", data_dir=data_dir)
  pre = host.Preprocess("small", "small", image_size=16)
  in_process = next(loader.TrainLoader(src, pre, 8, seed=1))
  in_workers = next(loader.TrainLoader(src, pre, 8, seed=1, workers=1))
  for key in in_process:
    np.testing.assert_array_equal(in_process[key], in_workers[key])
  meta = prepare.prepare("tiny_images", str(tmp_path / "s"), mode="shorter", size=16,
                         data_dir=data_dir, shard_size=64, workers=2)
  assert {s: v["num_examples"] for s, v in meta["splits"].items()} == {"test": 50, "train": 200}
  assert meta["fingerprint"]["train"] == "tfds:tiny_images/1.0.0/train:200"
  stored = _records(tmp_path / "s", "train")
  assert [label for _, label in stored] == [src[i][1] for i in range(len(src))]
  assert host.decode(stored[0][0], 3).shape == (16, 19, 3)  # 20x24, shorter side to 16


def test_a_flipped_bit_in_a_shard_stops_the_read_naming_the_file(small_store, tmp_path):
  damaged = tmp_path / "s"
  shutil.copytree(small_store, damaged)
  shard = damaged / "val-00000-of-00003.array_record"
  src = sources.PreparedSource(str(damaged), "val")
  data = bytearray(shard.read_bytes())
  data[data.index(src[1][0][100:140]) + 20] ^= 0x01  # inside a JPEG: the size check cannot see it
  shard.write_bytes(bytes(data))
  src = sources.PreparedSource(str(damaged), "val")
  with pytest.raises(sources.StoreError, match=f"{shard} record .* cannot be read .*hash"):
    for i in range(len(src)):
      src[i]
