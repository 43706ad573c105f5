"""The train benchmark runs the library's step and PyTorch's, and reports every figure."""

import json

import pytest

pytest.importorskip("torch", reason="the benchmark compares against PyTorch")
pytest.importorskip("tensorflow", reason="the train step needs the 'train' extra")

from alexnet_jax import bench, models, ops  # noqa: E402


def test_bench_train_reports_both_frameworks(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)  # batch 8 takes AlexNet's batch-64 path
  # chunks of 4 images (conv1's output is 24x24x96 fp32), as 224x224 AlexNet's at batch 64
  monkeypatch.setattr(models, "EVAL_CHUNK_BYTES", 4 * 24 * 24 * 96 * 4)
  out = tmp_path / "bench.json"
  assert bench.main(["train", "--variant", "alexnet_small", "--batch", "8", "--rounds", "2",
                     "--iters", "1", "--no_torch_compile", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  for key in ("jax_train_ips", "torch_train_ips", "jax_fwd_ips", "torch_fwd_ips",
              "matmul_gflops", "compile_s_jax", "xla_train_step_memory_mb", "peak_rss_mb"):
    assert result[key] > 0, key
  assert result["ratio_train"] == pytest.approx(result["jax_train_ips"]
                                                / result["torch_train_ips"])
  assert result["ratio_fwd"] == pytest.approx(result["jax_fwd_ips"] / result["torch_fwd_ips"])
  # The figures are the medians of the rounds, which are reported too.
  for kind in ("train", "fwd"):
    for name in ("jax", "torch"):
      rounds = result[f"rounds_{kind}_ips"][name]
      assert len(rounds) == 2 and min(rounds) > 0
      assert result[f"{name}_{kind}_ips"] == pytest.approx(sum(rounds) / 2)
  # Winograd (conv2-conv5 on CPU) executes fewer FLOPs than the model's direct convolutions.
  assert 0 < result["executed_train_gflop_per_image"] < result["train_gflop_per_image"]
  # The eval forward runs 2 chunks of 4 images; its FLOPs still count all 8 (a step is ~3 forwards).
  assert result["cpu_eval_chunk"] == 4
  assert 2 < result["train_gflop_per_image"] / result["fwd_gflop_per_image"] < 4
  printed = capsys.readouterr().out
  assert "train step, img/s" in printed and "measured fp32 matmul" in printed
  assert "img/s over the rounds: train jax " in printed


def test_bench_rejects_bad_counts():
  with pytest.raises(SystemExit):
    bench.main(["train", "--batch", "0"])
