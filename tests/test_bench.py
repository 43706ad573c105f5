"""The train benchmark runs the library's step and PyTorch's, and reports every figure."""

import json

import pytest

pytest.importorskip("torch", reason="the benchmark compares against PyTorch")
pytest.importorskip("grain", reason="the train step needs the 'train' extra")

from alexnet_jax import bench, ops  # noqa: E402


def test_bench_train_reports_both_frameworks(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)  # batch 8 takes AlexNet's batch-64 path
  # chunks of 4 images (conv1's output is 24x24x96 fp32), as 224x224 AlexNet's at batch 64
  monkeypatch.setattr(ops, "EVAL_CHUNK_BYTES", 4 * 24 * 24 * 96 * 4)
  out = tmp_path / "bench.json"
  assert bench.main(["train", "--variant", "alexnet_small", "--batch", "8", "--rounds", "2",
                     "--iters", "1", "--no_torch_compile", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in ("jax_train_ips", "torch_train_ips", "jax_fwd_ips", "torch_fwd_ips",
              "matmul_gflops", "compile_s_jax", "xla_train_step_memory_mb", "peak_rss_mb"):
    assert result[key] > 0, key
  # The ratios are against PyTorch eager's faster layout, which the result names.
  for kind in ("train", "fwd"):
    layouts = {name: result[f"{name}_{kind}_ips"] for name in ("torch", "torch_channels_last")}
    assert min(layouts.values()) > 0
    assert result[f"torch_{kind}_anchor"] == max(layouts, key=layouts.get)
    assert result[f"ratio_{kind}"] == pytest.approx(result[f"jax_{kind}_ips"]
                                                    / max(layouts.values()))
  # The figures are the medians of the rounds, which are reported too.
  for kind in ("train", "fwd"):
    for name in ("jax", "torch", "torch_channels_last"):
      rounds = result[f"rounds_{kind}_ips"][name]
      assert len(rounds) == 2 and min(rounds) > 0
      assert result[f"{name}_{kind}_ips"] == pytest.approx(sum(rounds) / 2)
  # Winograd (conv2-conv5 on CPU) executes fewer FLOPs than the model's direct convolutions.
  assert 0 < result["executed_train_gflop_per_image"] < result["train_gflop_per_image"]
  # The eval forward runs 2 chunks of 4 images; its FLOPs still count all 8 (a step is ~3 forwards).
  assert result["eval_chunk"] == 4
  assert 2 < result["train_gflop_per_image"] / result["fwd_gflop_per_image"] < 4
  printed = capsys.readouterr().out
  assert "train step, img/s" in printed and "measured fp32 matmul" in printed
  assert "img/s over the rounds: train jax " in printed
  assert "against PyTorch eager's faster layout" in printed


def test_bench_rejects_bad_counts():
  with pytest.raises(SystemExit):
    bench.main(["train", "--batch", "0"])


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
