"""The top-k ImageNet classes of images, with torchvision's eval preprocessing.

  python -m alexnet_jax.predict cat.jpg photos/ [--weights torchvision|PATH] [--topk 5] [--json]

Folders are searched recursively for images. ``--weights`` takes published weights' name
(``torchvision``, downloaded once: ``alexnet_jax.pretrained``) or a ``.pth``/``.msgpack`` file
or Orbax checkpoint of ``--variant`` trained on ImageNet-normalised input: the images are resized
to 256/224 of the input side, centre-cropped and normalised with ImageNet's mean and std. With
1000 classes the output names ImageNet's classes, otherwise their indices. An unreadable file
gets an ``error:`` line and the others go on; the exit status is then 1. Needs the ``train``
extra (the image decoders).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import extras, ops, pretrained
from alexnet_jax.files import USER_ERRORS
from alexnet_jax.models import VARIANTS, AlexNet, create_model


def class_names() -> list[str]:
  """ImageNet-1k's class names in torchvision's class order."""
  text = importlib.resources.files("alexnet_jax").joinpath("imagenet_classes.txt").read_text()
  return text.splitlines()


def find_images(paths: Sequence[str]) -> list[str]:
  """Files as given, and the images under each folder (sorted); a missing path is a ValueError."""
  from alexnet_jax.data.sources import IMAGE_EXTENSIONS  # pylint: disable=import-outside-toplevel

  files = []
  for path in paths:
    if os.path.isdir(path):
      files += sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.exists(path):
      files.append(path)
    else:
      raise ValueError(f"{path} does not exist")
  return files


def _decoded(files: Sequence[str], preprocess: Any) -> Iterator[tuple[str, Any]]:
  """(file, uint8 image) or (file, the reason it cannot be read), in order."""
  from alexnet_jax.data import host  # pylint: disable=import-outside-toplevel

  for path in files:
    try:
      with open(path, "rb") as f:
        image = preprocess.eval(f.read())
    except (OSError, host.DecodeError) as e:
      image = f"cannot read it as an image ({e})"
    yield path, image


def _preprocess(model: AlexNet):
  from alexnet_jax.data import host  # pylint: disable=import-outside-toplevel

  # torchvision's eval: shorter side to 256/224 of the input, centre crop, ImageNet mean/std.
  size = model.input_size
  return host.Preprocess(eval_preset="center_crop", image_size=size,
                         resize_size=round(size * 256 / 224), channels=model.in_channels,
                         mean=host.IMAGENET_MEAN[:model.in_channels],
                         std=host.IMAGENET_STD[:model.in_channels])


def predict(files: Sequence[str], model: AlexNet, params: Any, topk: int = 5,
            batch_size: int = 16, progress: bool = True
            ) -> Iterator[tuple[str, list[tuple[int, float]] | str]]:
  """(file, [(class, probability)] best first) or (file, why it was skipped), in order."""
  preprocess = _preprocess(model)
  normalize = preprocess.normalizer()
  forward = jax.jit(
      lambda p, x: jax.nn.softmax(model.apply({"params": p}, normalize({"image": x}))),
      compiler_options=ops.compiler_options())
  topk = min(topk, model.num_classes)
  shown = progress and len(files) > batch_size
  pending: list[tuple[str, Any]] = []
  done = 0

  def flush():
    images = [image for _, image in pending if not isinstance(image, str)]
    probs = None
    if images:  # padded to the batch size, so that one compiled forward serves every batch
      batch = np.zeros((batch_size,) + images[0].shape, np.uint8)
      batch[:len(images)] = images
      probs = np.asarray(forward(params, jnp.asarray(batch)))[:len(images)]
    row = 0
    for path, image in pending:
      if isinstance(image, str):
        yield path, image
        continue
      best = np.argsort(-probs[row], kind="stable")[:topk]
      yield path, [(int(k), float(probs[row][k])) for k in best]
      row += 1
    pending.clear()

  for path, image in _decoded(files, preprocess):
    pending.append((path, image))
    if len(pending) == batch_size:
      yield from flush()
      done += batch_size
      if shown:
        print(f"predict: {done}/{len(files)} images", file=sys.stderr, flush=True)
  yield from flush()


COMMAND = "python -m alexnet_jax.predict"
# The image decoders and resizer, checked before the weights load (which can mean a download).
DECODERS = ("PIL", "simplejpeg", "cv2")


@extras.needed_by(COMMAND)
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER")
  parser.add_argument("--weights", default="torchvision",
                      help="published weights' name (torchvision) or a .pth/.msgpack file or "
                           "Orbax checkpoint (default: %(default)s)")
  parser.add_argument("--variant", default="alexnet", choices=VARIANTS)
  parser.add_argument("--num-classes", type=int,
                      help="classifier outputs of the weights, if not the variant's")
  parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
  parser.add_argument("--batch", type=int, default=16, help="images per forward (default: 16)")
  parser.add_argument("--json", action="store_true", help="print one JSON list instead")
  args = parser.parse_args(argv)
  if args.topk < 1 or args.batch < 1 or (args.num_classes or 1) < 1:
    parser.error("--topk, --batch and --num-classes must be >= 1")
  extras.require(COMMAND, *DECODERS)
  overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
  try:
    files = find_images(args.paths)
    if not files:
      raise ValueError(f"no images in {', '.join(args.paths)}")
    model = create_model(args.variant, **overrides)
    params = pretrained.load_weights(args.weights, model, args.variant, what="--weights")
  except USER_ERRORS as e:
    print(extras.describe(COMMAND, e), file=sys.stderr)  # an extra's missing module: which extra
    return 1
  names = class_names() if model.num_classes == 1000 else None
  name = lambda k: names[k] if names else f"class {k}"
  results, failed = [], 0
  for path, top in predict(files, model, params, args.topk, args.batch):
    if isinstance(top, str):
      failed += 1
      print(f"error: {path}: {top}", file=sys.stderr)
      results.append({"file": path, "error": top})
    elif args.json:
      results.append({"file": path, "top": [{"class": k, "name": name(k), "probability": p}
                                            for k, p in top]})
    else:
      print(path)
      for k, p in top:
        print(f"  {100 * p:6.2f}%  {name(k)} ({k})")
  if args.json:
    print(json.dumps(results, indent=1))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
