"""A serialized ``jax.export`` artefact of a model with its weights, callable without this library.

  python -m alexnet_jax.export --variant alexnet --weights torchvision --out alexnet.jax \\
      [--platforms cpu,cuda,tpu] [--batch 8|dynamic]

The artefact maps a float32 NHWC batch, normalised as in training (ImageNet's mean/std for the
published weights), to logits; the weights are constants inside it. ``--batch dynamic`` leaves
the batch size symbolic. Load it with ``jax.export.deserialize(open(FILE, "rb").read()).call(x)``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax
import numpy as np

from alexnet_jax import extras, files, pretrained
from alexnet_jax.models import VARIANTS, AlexNet, create_model

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export(model: AlexNet, params: Any, platforms: Sequence[str] = ("cpu",),
           batch: int | None = None) -> jax.export.Exported:
  """``model``'s eval forward with ``params`` baked in; ``batch=None`` makes it symbolic."""
  side, channels = model.input_size, model.in_channels
  if batch is None:
    shape = jax.export.symbolic_shape(f"b, {side}, {side}, {channels}")
  else:
    shape = (batch, side, side, channels)
  params = jax.tree_util.tree_map(np.asarray, params)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  return jax.export.export(forward, platforms=tuple(platforms))(
      jax.ShapeDtypeStruct(shape, np.float32))


def _batch(text: str) -> int | None:
  if text == "dynamic":
    return None
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}")
  return int(text)


def _platforms(text: str) -> tuple[str, ...]:
  chosen = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = [p for p in chosen if p not in PLATFORMS]
  if unknown or not chosen:
    raise argparse.ArgumentTypeError(f"unknown platform(s) {unknown or [text]}; valid: "
                                     f"{', '.join(PLATFORMS)}")
  return chosen


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", required=True, choices=VARIANTS)
  parser.add_argument("--weights", required=True,
                      help="published weights' name (torchvision) or a .pth/.msgpack file or "
                           "Orbax checkpoint")
  parser.add_argument("--out", required=True, help="the artefact to write")
  parser.add_argument("--num-classes", type=int,
                      help="classifier outputs of the weights, if not the variant's")
  parser.add_argument("--platforms", type=_platforms, default=("cpu",),
                      help=f"comma-separated, of {', '.join(PLATFORMS)} (default: cpu)")
  parser.add_argument("--batch", type=_batch, default=None,
                      help="batch size, or 'dynamic' (the default) for a symbolic one")
  args = parser.parse_args(argv)
  overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
  try:
    model = create_model(args.variant, **overrides)
    params = pretrained.load_weights(args.weights, model, args.variant, what="--weights")
    exported = export(model, params, args.platforms, args.batch)
    data = exported.serialize()
    files.write_atomically(args.out, data)
  except files.USER_ERRORS as e:  # e.g. torch for a .pth file
    print(extras.describe(parser.prog, e), file=sys.stderr)
    return 1
  shape = exported.in_avals[0].shape
  print(f"{args.out}: {args.variant} for {', '.join(exported.platforms)}, input "
        f"{tuple(str(d) for d in shape)} float32 -> logits {exported.out_avals[0].shape[-1]}, "
        f"{len(data) / 2**20:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
