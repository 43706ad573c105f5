"""Data-parallel scaling arithmetic: ``python -m alexnet_jax.scaling``.

Per step, each device computes its share of the batch and then all-reduces the full gradient. The
compute is XLA's own FLOP count of the model's forward and backward (``cost_analysis`` of the
lowered gradient, no compilation). The communication is a ring all-reduce, which sends and
receives ``2 (N - 1) / N`` times the gradient's bytes per device. The hardware figures are
options, not measurements: the defaults are an H100 at 40% of its dense bf16 peak, NCCL's bus
bandwidth on NVLink within an 8-GPU node, and one 400 Gb/s InfiniBand link per GPU between nodes.
Compute and communication are shown without overlap: the step takes between the larger of the two
and their sum.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from alexnet_jax.models import VARIANTS, count_params, create_model, init_params


def model_costs(variant: str = "alexnet") -> dict[str, float]:
  """Parameter counts (all, convolutions, dense) and train FLOPs per image from XLA."""
  model = create_model(variant)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  total = count_params(params)
  conv = count_params({k: v for k, v in params.items() if k.startswith("conv")})

  def loss(p, x, y):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  side, batch = model.input_size, 8
  x = jax.ShapeDtypeStruct((batch, side, side, model.in_channels), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  flops = jax.jit(jax.grad(loss)).lower(params, x, y).cost_analysis()["flops"]
  return {"params": total, "conv_params": conv, "dense_params": total - conv,
          "train_flops_per_image": flops / batch}


def allreduce_bytes_per_device(num_bytes: float, devices: int) -> float:
  """Bytes each device sends (and receives) in a ring all-reduce of ``num_bytes``."""
  return 2.0 * (devices - 1) / devices * num_bytes


def scaling_table(costs: dict[str, float], devices: Sequence[int], batches: Sequence[int], *,
                  tflops: float, node_size: int, intra_gbps: float, inter_gbps: float,
                  grad_bytes: int = 4) -> list[dict[str, float]]:
  """One row per (devices, per-device batch): compute and all-reduce times in ms."""
  rows = []
  for n in devices:
    bandwidth = intra_gbps if n <= node_size else inter_gbps
    volume = allreduce_bytes_per_device(costs["params"] * grad_bytes, n) if n > 1 else 0.0
    comm_ms = volume / (bandwidth * 1e9) * 1e3
    for b in batches:
      compute_ms = costs["train_flops_per_image"] * b / (tflops * 1e12) * 1e3
      rows.append({"devices": n, "batch_per_device": b, "global_batch": n * b,
                   "compute_ms": compute_ms, "allreduce_mb": volume / 1e6,
                   "link_gbps": bandwidth, "allreduce_ms": comm_ms,
                   "comm_over_compute": comm_ms / compute_ms})
  return rows


def format_table(rows: list[dict[str, float]]) -> str:
  """Markdown; ratios above 1 (communication dominates) in bold."""
  lines = ["| devices | batch/device | compute ms | all-reduce MB/device | link GB/s | "
           "all-reduce ms | comm/compute |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = f"{r['comm_over_compute']:.2f}x"
    ratio = f"**{ratio}**" if r["comm_over_compute"] > 1 else ratio
    lines.append(f"| {r['devices']} | {r['batch_per_device']} | {r['compute_ms']:.2f} | "
                 f"{r['allreduce_mb']:.0f} | {r['link_gbps']:g} | {r['allreduce_ms']:.2f} | "
                 f"{ratio} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.scaling", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="alexnet", choices=VARIANTS)
  parser.add_argument("--devices", type=int, nargs="+", default=[8, 16, 64, 256])
  parser.add_argument("--batch", type=int, nargs="+", default=[32, 128, 256],
                      help="per-device batch sizes")
  parser.add_argument("--tflops", type=float, default=400.0,
                      help="achieved TFLOP/s per device (default: 40%% of an H100's 989)")
  parser.add_argument("--node_size", type=int, default=8, help="devices per node")
  parser.add_argument("--intra_gbps", type=float, default=400.0,
                      help="all-reduce bus bandwidth within a node, GB/s (NVLink)")
  parser.add_argument("--inter_gbps", type=float, default=50.0,
                      help="all-reduce bandwidth per device between nodes, GB/s "
                           "(400 Gb/s InfiniBand per GPU)")
  parser.add_argument("--grad_bytes", type=int, default=4, choices=(2, 4),
                      help="bytes per gradient element: 4 for fp32 (this library), 2 for bf16")
  args = parser.parse_args(argv)
  if min(args.devices + args.batch) < 1 or min(args.tflops, args.intra_gbps,
                                               args.inter_gbps) <= 0:
    parser.error("device counts, batches, TFLOP/s and bandwidths must be positive")
  costs = model_costs(args.variant)
  print(f"{args.variant}: {costs['params']:,} parameters ({costs['conv_params']:,} in "
        f"convolutions, {costs['dense_params']:,} dense); "
        f"{costs['train_flops_per_image'] / 1e9:.2f} GFLOP per image per train step (XLA); "
        f"{args.tflops:g} TFLOP/s per device; gradients of {args.grad_bytes} bytes\n")
  print(format_table(scaling_table(costs, args.devices, args.batch, tflops=args.tflops,
                                   node_size=args.node_size, intra_gbps=args.intra_gbps,
                                   inter_gbps=args.inter_gbps, grad_bytes=args.grad_bytes)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
