"""The data-parallel scaling arithmetic behind README's table."""

import pytest

from alexnet_jax import scaling


def test_ring_allreduce_volume():
  assert scaling.allreduce_bytes_per_device(100.0, 2) == 100.0
  assert scaling.allreduce_bytes_per_device(100.0, 8) == pytest.approx(175.0)


def test_alexnet_costs_come_from_the_model_and_xla():
  costs = scaling.model_costs("alexnet")
  assert costs["params"] == 61_100_840
  assert costs["conv_params"] == 2_469_696
  assert costs["conv_params"] + costs["dense_params"] == costs["params"]
  # Multiply-adds of the forward pass from the layer shapes (output positions x kernel volume x
  # filters); the train step is the forward plus a backward of roughly twice its cost.
  convs = [(55, 11 * 11 * 3, 64), (27, 5 * 5 * 64, 192), (13, 3 * 3 * 192, 384),
           (13, 3 * 3 * 384, 256), (13, 3 * 3 * 256, 256)]
  macs = sum(side * side * k * f for side, k, f in convs) + costs["dense_params"]
  assert 2.4 < costs["train_flops_per_image"] / (2 * macs) < 3.0


def test_table_rows_and_where_communication_dominates():
  costs = {"params": 1_000_000, "train_flops_per_image": 1e9}
  rows = scaling.scaling_table(costs, [1, 4, 16], [10, 40], tflops=1.0, node_size=4,
                               intra_gbps=100.0, inter_gbps=10.0)
  assert [(r["devices"], r["batch_per_device"]) for r in rows] == [
      (1, 10), (1, 40), (4, 10), (4, 40), (16, 10), (16, 40)]
  by_key = {(r["devices"], r["batch_per_device"]): r for r in rows}
  assert by_key[1, 10]["allreduce_ms"] == 0.0
  assert by_key[4, 10]["compute_ms"] == pytest.approx(10.0)  # 10 GFLOP at 1 TFLOP/s
  assert by_key[4, 10]["allreduce_ms"] == pytest.approx(6e6 / 100e9 * 1e3)  # 1.5 x 4 MB
  assert by_key[16, 40]["link_gbps"] == 10.0  # beyond one node: the slower link
  table = scaling.format_table(rows)
  assert table.count("\n") == len(rows) + 1
  assert ("**" in table) == any(r["comm_over_compute"] > 1 for r in rows)
