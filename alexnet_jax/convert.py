"""Convert AlexNet weights between PyTorch ``.pth`` state_dicts and Flax ``.msgpack`` params.

  python -m alexnet_jax.convert alexnet-owt-7be5be79.pth alexnet.msgpack --variant alexnet
  python -m alexnet_jax.convert alexnet.msgpack alexnet.pth --variant alexnet

The direction follows the input's extension (.pth/.pt -> Flax, .msgpack -> PyTorch). Flax params
are written with ``flax.serialization.msgpack_serialize`` and read back with
``alexnet_jax.pretrained.load_params``. ``.pth`` files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import sys
from typing import Any, Sequence

from alexnet_jax import extras
from alexnet_jax.models import VARIANTS, count_params
from alexnet_jax.files import write_atomically
from alexnet_jax.pretrained import FLAX_SUFFIXES, TORCH_SUFFIXES, load_params, save_params


def _parse_setting(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value  # a bare string such as weight_init=paper


def convert(src: str, dst: str, variant: str, overrides: dict[str, Any]) -> str:
  """Converts ``src`` to ``dst``; returns a one-line summary."""
  from alexnet_jax import torch_interop  # pylint: disable=import-outside-toplevel

  src_ext, dst_ext = os.path.splitext(src)[1].lower(), os.path.splitext(dst)[1].lower()
  if src_ext in TORCH_SUFFIXES and dst_ext in FLAX_SUFFIXES:
    params = torch_interop.params_from_torch(torch_interop.load_torch_state_dict(src), variant,
                                             **overrides)
    save_params(dst, params)
  elif src_ext in FLAX_SUFFIXES and dst_ext in TORCH_SUFFIXES:
    import torch  # pylint: disable=import-outside-toplevel

    params = load_params(src)
    buffer = io.BytesIO()
    torch.save(torch_interop.params_to_torch(params, variant, **overrides), buffer)
    write_atomically(dst, buffer.getvalue())
  else:
    raise ValueError(f"cannot tell the direction from {src!r} -> {dst!r}: convert "
                     f"{'/'.join(TORCH_SUFFIXES)} -> {'/'.join(FLAX_SUFFIXES)} or back")
  return f"{src} -> {dst}: {variant}, {count_params(params):,} parameters"


@extras.needed_by("python -m alexnet_jax.convert")  # torch, for either direction
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="input file: .pth/.pt (PyTorch) or .msgpack (Flax)")
  parser.add_argument("dst", help="output file: .msgpack (Flax) or .pth/.pt (PyTorch)")
  parser.add_argument("--variant", required=True, choices=VARIANTS)
  parser.add_argument("--num-classes", type=int, help="classifier outputs, if not the variant's")
  parser.add_argument("--set", dest="settings", type=_parse_setting, action="append", default=[],
                      metavar="KEY=VALUE",
                      help="override any model setting, e.g. --set hidden_width=2048 (repeatable)")
  args = parser.parse_args(argv)
  overrides = dict(args.settings)
  if args.num_classes is not None:
    overrides["num_classes"] = args.num_classes
  if not os.path.isfile(args.src):
    parser.error(f"{args.src} does not exist or is not a file")
  try:
    print(convert(args.src, args.dst, args.variant, overrides))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
