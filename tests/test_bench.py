"""The train benchmark runs the library's step and PyTorch's, and reports every figure."""

import json
import os

import pytest

pytest.importorskip("torch", reason="the benchmark compares against PyTorch")
pytest.importorskip("grain", reason="the train step needs the 'train' extra")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alexnet_jax import bench, ops  # noqa: E402
from alexnet_jax.models import create_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_reports_both_frameworks(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)  # batch 8 takes AlexNet's batch-64 path
  # chunks of 4 images (conv1's output is 24x24x96 fp32), as 224x224 AlexNet's at batch 64
  monkeypatch.setattr(ops, "EVAL_CHUNK_BYTES", 4 * 24 * 24 * 96 * 4)
  out = tmp_path / "bench.json"
  assert bench.main(["train", "--variant", "alexnet_small", "--batch", "4", "8", "--rounds", "2",
                     "--iters", "1", "--no_torch_compile", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  # What it ran on, and the peaks the MFU is taken against.
  assert result["machine"]["jax_backend"] == "cpu" and result["torch"]["device"] == "cpu"
  assert result["machine"]["cpu_model"] == bench.cpu_model() and bench.cpu_model()
  assert result["matmul_tflops"] > 0 and result["datasheet_tflops"] is None
  assert [e["batch"] for e in result["batches"]] == [4, 8]
  for e in result["batches"]:
    assert set(e["compile_s"]) == {"jax"} and e["compile_s"]["jax"] > 0
    assert e["xla_train_step_memory_mb"] > 0 and e["peak_rss_mb"] > 0
    for kind in ("train", "forward"):
      speed = e[kind]
      assert set(speed["ips"]) == {"jax", "torch", "torch_channels_last"}
      # The figures are the medians of the rounds, which are reported too.
      for name, ips in speed["ips"].items():
        rounds = speed["rounds"][name]
        assert len(rounds) == 2 and min(rounds) > 0
        assert ips == pytest.approx(sum(rounds) / 2)
      # The ratios are against PyTorch eager's faster layout, which the result names.
      layouts = {name: speed["ips"][name] for name in ("torch", "torch_channels_last")}
      assert speed["anchor"] == max(layouts, key=layouts.get)
      assert speed["ratio"] == pytest.approx(speed["ips"]["jax"] / max(layouts.values()))
    # MFU is model FLOP/s over the measured peak.
    f = e["flops"]
    assert f["train_tflops"] == pytest.approx(
        f["train_gflop_per_image"] * e["train"]["ips"]["jax"] / 1e3)
    assert f["mfu_measured_peak"] == pytest.approx(f["train_tflops"] / result["matmul_tflops"])
    assert f["mfu_datasheet_peak"] is None
    # The eval forward's FLOPs count the whole batch (a step is ~3 forwards).
    assert 2 < f["train_gflop_per_image"] / f["fwd_gflop_per_image"] < 4
  small, large = result["batches"]
  # Winograd (conv2-conv5 on CPU) executes fewer FLOPs than the model's direct convolutions.
  flops = large["flops"]
  assert 0 < flops["executed_train_gflop_per_image"] < flops["train_gflop_per_image"]
  # The eval forward of 8 runs 2 chunks of 4 images; 4 is one chunk.
  assert (small["eval_chunk"], large["eval_chunk"]) == (4, 4)
  printed = capsys.readouterr().out
  assert "train step, img/s" in printed and "of the measured peak" in printed
  assert "batch 4:" in printed and "batch 8:" in printed
  assert f"host CPU {bench.cpu_model()}" in printed
  assert "img/s over the rounds: train jax " in printed
  assert "against PyTorch eager's faster layout" in printed
  assert "compile: jax " in printed


def test_bench_train_bfloat16_without_torch(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench.main(["train", "--variant", "alexnet_small", "--batch", "2", "--rounds", "1",
                     "--iters", "1", "--dtype", "bfloat16", "--no_torch", "--layers", "--json",
                     str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["dtype"] == "bfloat16" and result["torch"] is None
  assert result["torch_not_run"] == "not asked for"
  (entry,) = result["batches"]
  assert set(entry["train"]["ips"]) == {"jax"} and entry["train"]["ips"]["jax"] > 0
  assert entry["train"]["ratio"] is None
  # Each block alone in bf16, JAX only.
  assert len(entry["layers"]) == 7
  assert all(set(b["step_ms"]) == {"jax"} and b["step_ms"]["jax"] > 0 for b in entry["layers"])
  assert "PyTorch not run (not asked for)" in capsys.readouterr().out


def test_bench_train_layers(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench.main(["train", "--variant", "alexnet_small", "--batch", "4", "--rounds", "1",
                     "--iters", "1", "--no_torch_compile", "--layers", "--json", str(out)]) == 0
  (entry,) = json.loads(out.read_text())["batches"]
  blocks = entry["layers"]
  assert [b["name"] for b in blocks] == [f"conv{i}" for i in range(1, 6)] + [
      "classifier+loss", "SGD update"]
  # Each conv block ends where the model's does: after its pool, if any, else its ReLU.
  model = create_model("alexnet_small")
  x = np.zeros((4, model.input_size, model.input_size, model.in_channels), np.float32)
  _, state = model.apply(model.init(jax.random.key(0), x), x, mutable=["intermediates"])
  acts, pools = state["intermediates"]["activations"], 0
  for i, b in enumerate(blocks[:5]):
    pools += model.pool_after[i]
    expected = acts[f"pool{pools}" if model.pool_after[i] else f"conv{i + 1}"].shape
    assert tuple(b["output_shape"]) == expected, b["name"]
  for b in blocks:
    assert set(b["step_ms"]) == {"jax", "torch_channels_last"} and min(b["step_ms"].values()) > 0
  assert blocks[-1]["forward_ms"] == {} and min(blocks[0]["forward_ms"].values()) > 0
  printed = capsys.readouterr().out
  assert "per block, ms at batch 4" in printed and "whole train step" in printed
  assert "sum of blocks" in printed


def test_bench_train_ops(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench.main(["train", "--variant", "alexnet_small", "--batch", "4", "--rounds", "1",
                     "--iters", "1", "--no_torch", "--ops", "5", "--json", str(out)]) == 0
  (entry,) = json.loads(out.read_text())["batches"]
  top = entry["ops"]
  assert len(top) == 5 and [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
  # Every op's time by layer: the model's layers, and "" for the optimizer's and the loss's.
  layers = entry["op_layers"]
  assert set(layers) <= {"", *(f"conv{i}" for i in range(1, 6)), "fc1", "fc2", "fc3"}
  assert {"conv1", "conv5", "fc1"} <= set(layers) and min(layers.values()) >= 0
  assert sum(layers.values()) >= sum(t["ms"] for t in top) > 0
  printed = capsys.readouterr().out
  assert "XLA's profile of the train step at batch 4" in printed
  assert top[0]["name"] in printed and "by layer: " in printed


def test_datasheet_peaks_by_device_kind():
  assert bench.datasheet_tflops("NVIDIA H200", "bfloat16") == pytest.approx(989.4)
  assert bench.datasheet_tflops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756.0)
  assert bench.datasheet_tflops("NVIDIA H100 80GB HBM3", "float32") == pytest.approx(494.7)
  assert bench.datasheet_tflops("TPU v4", "float32") is None
  assert bench.datasheet_tflops("cpu", "bfloat16") is None


@pytest.mark.parametrize("argv", [["train", "--batch", "0"], ["train", "--batch", "8", "0"],
                                  ["train", "--dtype", "float16"], ["train", "--ops", "-1"]])
def test_bench_rejects_bad_arguments(argv):
  with pytest.raises(SystemExit):
    bench.main(argv)


def test_bench_data_reports_the_loader_from_stores_and_every_preset_against_bare_decode(
    tmp_path, capsys):
  out = tmp_path / "data.json"
  assert bench.main(["data", "--images", "32", "--batch", "8", "--steps", "1", "--rounds", "2",
                     "--threads", "2", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["threads"] == 2 and result["workers"] == 0 and result["cores"] >= 1
  # The schema: the loader end to end from the stores, against their bare decode.
  assert result["decode_ips_total"] == result["stores"]["paper"]["decode_ips_total"] > 0
  assert {name: p["store"] for name, p in result["loader"].items()} == {
      "paper": "paper", "torchvision": "shorter", "center_crop": "shorter"}
  for name, p in result["loader"].items():
    decode = result["stores"][p["store"]]["decode_ips_total"]
    assert len(p["rounds_ips_total"]) == 2 and p["ips_total"] > 0, name
    assert p["ratio_to_decode"] == pytest.approx(p["ips_total"] / decode)
    assert p["ips_per_core"] == pytest.approx(p["ips_total"] / result["cores"])
  # Stored at 256: a paper store's images are smaller files than the shorter store's.
  assert 0 < result["stores"]["paper"]["mean_jpeg_kb"] < result["stores"]["shorter"]["mean_jpeg_kb"]
  files = result["files"]["photos"]
  decode = files["decode_ips_per_core"]
  assert set(files["presets"]) == {"paper", "torchvision", "small", "small_noflip",
                                   "center_crop", "ten_crop"}
  for name, figures in files["presets"].items():
    assert len(figures["rounds_ips_per_core"]) == 2 and figures["ips_per_core"] > 0, name
    assert figures["ratio_to_decode"] == pytest.approx(figures["ips_per_core"] / decode)
  # uint8 pixels, int32 labels, a flip flag (and for paper 3 float32 colours; ten_crop sends
  # 10 views, no flip)
  train = files["presets"]["torchvision"]["host_to_device_bytes_per_image"]
  assert train == 224 * 224 * 3 + 4 + 1
  assert files["presets"]["paper"]["host_to_device_bytes_per_image"] == train + 12
  assert files["presets"]["ten_crop"]["host_to_device_bytes_per_image"] == 10 * 224 * 224 * 3 + 5
  printed = capsys.readouterr().out
  assert "bare decode (the limit)" in printed and "% of decode" in printed
  assert "paper loader, paper store" in printed and "/core" in printed


FEED_CONFIG = ["--config", "configs/imagenet_torchvision.py", "--config.model=alexnet_small",
               "--config.image_size=28", "--config.resize_size=32", "--config.batch_size=8",
               "--config.parallel=jit", "--config.tensorboard=False"]


def test_bench_feed_times_the_loop_fed_and_on_device_and_each_stage(tmp_path, capsys,
                                                                     monkeypatch):
  monkeypatch.chdir(ROOT)  # the config files, as train.py finds them
  out = tmp_path / "feed.json"
  assert bench.main(["feed", *FEED_CONFIG, "--steps", "4", "--window", "2", "--json",
                     str(out)]) == 0
  r = json.loads(out.read_text())
  assert (r["model"], r["batch"], r["train_preset"], r["store_mode"]) == (
      "alexnet_small", 8, "torchvision", "shorter")
  assert r["store_images"] == 16 and r["timed_steps"] == 4 and r["cpu_model"]
  # The loop's own logged windows after the two warm-up ones: 4 steps in windows of 2.
  for loop in r["loops"].values():
    assert len(loop["windows_ips"]) == 2 and min(loop["windows_ips"]) > 0
  assert r["fed_ips"] == r["loops"]["loader"]["ips"] > 0
  assert r["ratio"] == pytest.approx(r["fed_ips"] / r["device_resident_ips"])
  stages = r["stages_ips"]
  assert set(stages) == {"loader", "host_to_device", "step"} and min(stages.values()) > 0
  assert stages["step"] == r["device_resident_ips"]
  assert r["binds"] == min(stages, key=stages.get)
  printed = capsys.readouterr().out
  assert "loop fed by the loader" in printed and "<- the slowest stage" in printed


@pytest.mark.parametrize("argv, message", [
    ([], "--config FILE is needed"),
    (["--config", "configs/imagenet_torchvision.py", "--config.no_such_field=1"],
     "no_such_field"),
    (["--config", "configs/imagenet_torchvision.py", "--steps", "0"], "must be positive"),
    (["--config", "configs/imagenet_torchvision.py", "--nonsense"], "unrecognized arguments"),
])
def test_bench_feed_rejects_bad_arguments(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit):
    bench.main(["feed", *argv])
  assert message in capsys.readouterr().err
