"""Metric logging (metrics.jsonl, TensorBoard, resume) and the curves plot."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import plot
from alexnet_jax.plot import make_figure
from alexnet_jax.metric_log import MetricLogger, read_metrics


def test_write_and_read_back(tmp_path):
  with MetricLogger(str(tmp_path), tensorboard=False) as log:
    log.write(1, {"train_loss": 2.5, "lr": np.float32(0.01)})
    log.write(np.int64(2), {"eval_top1": 0.75})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "train_loss": 2.5, "lr": pytest.approx(0.01)}, {"step": 2, "eval_top1": 0.75}]
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  assert type(records[1]["step"]) is int and records[0]["train_loss"] == 2.5


def test_flushed_before_close(tmp_path):
  log = MetricLogger(str(tmp_path), tensorboard=False)
  log.write(5, {"train_loss": 1.0})
  # Another reader sees the line while the logger is still open, as after a crash.
  assert read_metrics(str(tmp_path)) == [{"step": 5, "train_loss": 1.0}]
  log.close()


def test_disabled_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricLogger(str(workdir), enabled=False) as log:
    log.write(1, {"train_loss": 1.0})
    log.resume_at(0)
  assert not workdir.exists()


def test_step_is_reserved(tmp_path):
  with pytest.raises(ValueError, match="reserved"):
    MetricLogger(str(tmp_path), tensorboard=False).write(1, {"step": 3.0})


def test_nonfinite_values_are_strict_json(tmp_path):
  with MetricLogger(str(tmp_path), tensorboard=False) as log:
    log.write(1, {"a": float("nan"), "b": float("inf"), "c": -np.inf, "d": 1.0})
  line = (tmp_path / "metrics.jsonl").read_text()

  def reject(token):
    raise ValueError(f"non-standard JSON token {token}")
  assert json.loads(line, parse_constant=reject) == {
      "step": 1, "a": "nan", "b": "inf", "c": "-inf", "d": 1.0}
  (r,) = read_metrics(str(tmp_path))
  assert math.isnan(r["a"]) and r["b"] == math.inf and r["c"] == -math.inf and r["d"] == 1.0


def test_resume_at_drops_later_steps(tmp_path):
  with MetricLogger(str(tmp_path), tensorboard=False) as log:
    for step in range(1, 7):
      log.write(step, {"train_loss": float(step)})
    log.write(4, {"eval_top1": 0.5})
  # The run restarts from the checkpoint of step 4 and logs steps 5 and 6 again.
  with MetricLogger(str(tmp_path), tensorboard=False) as log:
    log.resume_at(4)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 4]
    log.write(5, {"train_loss": 50.0})
    log.write(6, {"train_loss": 60.0})
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6]
  assert [r["train_loss"] for r in records if r["step"] > 4] == [50.0, 60.0]
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left behind


def test_resume_at_while_open_and_without_file(tmp_path):
  log = MetricLogger(str(tmp_path / "fresh"), tensorboard=False)
  log.resume_at(10)  # nothing logged yet: nothing to do
  log.write(11, {"x": 1.0})
  log.write(12, {"x": 2.0})
  log.resume_at(11)  # the logger must not keep appending to the replaced file
  log.write(12, {"x": 3.0})
  log.close()
  assert read_metrics(str(tmp_path / "fresh")) == [{"step": 11, "x": 1.0}, {"step": 12, "x": 3.0}]


def test_torn_last_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')
  with MetricLogger(str(tmp_path), tensorboard=False) as log:
    log.write(2, {"x": 2.0})
  with pytest.warns(UserWarning, match="malformed"):
    assert read_metrics(str(tmp_path)) == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}]
  with pytest.warns(UserWarning, match="malformed"):
    MetricLogger(str(tmp_path), tensorboard=False).resume_at(2)
  assert (tmp_path / "metrics.jsonl").read_text() == (
      '{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n')


def test_import_does_not_load_tensorflow():
  code = ("import sys, alexnet_jax.metric_log, alexnet_jax.plot; "
          "bad = [m for m in ('tensorflow', 'tensorboard', 'matplotlib') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_tensorboard_scalars(tmp_path):
  pytest.importorskip("tensorboardX", reason="TensorBoard logging needs the 'train' extra")
  pytest.importorskip("tensorboard")  # the reader
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util import tensor_util

  with MetricLogger(str(tmp_path)) as log:
    log.write(3, {"train_loss": 2.5, "lr": 0.1})
    log.write(7, {"train_loss": 1.25})
  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for event in EventFileLoader(files[0]).Load():
    for value in event.summary.value:
      assert value.metadata.plugin_data.plugin_name == "scalars"
      scalars[(value.tag, event.step)] = float(tensor_util.make_ndarray(value.tensor))
  assert scalars == {("train_loss", 3): 2.5, ("lr", 3): pytest.approx(0.1),
                     ("train_loss", 7): 1.25}


def _synthetic_run(workdir):
  with MetricLogger(str(workdir), tensorboard=False) as log:
    for step in range(0, 200, 10):
      log.write(step, {"train_loss": 5.0 / (1 + step), "train_top1": step / 200,
                       "lr": 0.01 * 0.9 ** (step // 10)})
      if step % 50 == 0:
        log.write(step, {"eval_loss": 6.0 / (1 + step), "eval_top1": step / 250,
                         "eval_top5": step / 220})


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 10_000


def test_plot_default_and_out(tmp_path):
  pytest.importorskip("matplotlib")
  _synthetic_run(tmp_path)
  path = plot.plot_metrics(str(tmp_path))
  assert path == str(tmp_path / "curves.png")
  _assert_png(path)
  out = tmp_path / "sub" / "c.png"
  assert plot.main([str(tmp_path), "--out", str(out)]) == 0
  _assert_png(out)


def test_plot_missing_keys_and_nan(tmp_path):
  pytest.importorskip("matplotlib")
  with MetricLogger(str(tmp_path), tensorboard=False) as log:
    log.write(1, {"train_loss": float("nan")})
    log.write(2, {"train_loss": 1.0})
  _assert_png(plot.plot_metrics(str(tmp_path)))


def test_plot_panels():
  pytest.importorskip("matplotlib")
  records = [{"step": 0, "train_loss": 3.0, "lr": 0.0}, {"step": 10, "train_loss": 2.0, "lr": 0.1}]
  loss, acc, lr = make_figure(records).axes
  assert [line.get_label() for line in loss.get_lines()] == ["train_loss"]
  np.testing.assert_array_equal(loss.get_lines()[0].get_xydata(), [[0, 3.0], [10, 2.0]])
  assert not acc.get_lines()
  assert lr.get_yscale() == "linear"  # a zero learning rate has no log
  records[0]["lr"] = 1e-4
  assert make_figure(records).axes[2].get_yscale() == "log"


def test_plot_cli_errors(tmp_path, capsys):
  assert plot.main([str(tmp_path / "missing")]) == 1
  assert "no such workdir" in capsys.readouterr().err
  assert plot.main([str(tmp_path)]) == 1
  assert "no metrics.jsonl" in capsys.readouterr().err
  (tmp_path / "metrics.jsonl").write_text("")
  assert plot.main([str(tmp_path)]) == 1
  assert "holds no metrics" in capsys.readouterr().err
  assert not (tmp_path / "curves.png").exists()


def test_plot_module_entry_point(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "alexnet_jax.plot", str(tmp_path / "missing")],
                        capture_output=True, text=True)
  assert proc.returncode == 1 and "error: no such workdir" in proc.stderr
