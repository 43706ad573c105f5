"""Weights in one call, and the one place weights are read: published names, ``.pth``, ``.msgpack``
and Orbax checkpoints.

``load("alexnet")`` returns torchvision's IMAGENET1K_V1 weights as Flax params. The file is taken
from PyTorch's hub cache if it is there, else downloaded; its SHA-256 is checked against the prefix
in its name, it is converted once and kept torch-free as msgpack under ``cache_dir()``, so later
loads need neither PyTorch nor the network.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import http.client
import importlib.util
import os
import re
import sys
import time
import urllib.request
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization

from alexnet_jax.files import write_atomically
from alexnet_jax.models import AlexNet, create_model, init_params, param_shapes

TORCH_SUFFIXES = (".pth", ".pt")
FLAX_SUFFIXES = (".msgpack",)


@dataclasses.dataclass(frozen=True)
class Published:
  """A published weights file: the variant it fits and where it is."""

  variant: str
  url: str

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]

  @property
  def sha256_prefix(self) -> str:
    """The hash prefix in the file name, as PyTorch's hub names its files (NAME-HASH.pth)."""
    match = re.search(r"-([a-f0-9]{6,})\.", self.filename)
    if not match:
      raise ValueError(f"{self.filename} has no -HASH. part to check it against")
    return match.group(1)


PUBLISHED: Mapping[str, Published] = {
    "torchvision": Published("alexnet",
                             "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
# The variant's name stands for its published weights.
ALIASES: Mapping[str, str] = {"alexnet": "torchvision"}


def published(name: str) -> Published | None:
  """The published weights called ``name`` (``torchvision`` or ``alexnet``), or None."""
  return PUBLISHED.get(ALIASES.get(name, name))


def _known() -> str:
  return ", ".join(sorted({*PUBLISHED, *ALIASES}))


def _published_or_raise(name: str) -> Published:
  entry = published(name)
  if entry is None:
    raise ValueError(f"no published weights called {name!r}; known: {_known()}")
  return entry


def cache_dir() -> str:
  """Where converted weights are kept: ``$ALEXNET_JAX_CACHE``, default ``~/.cache/alexnet_jax``."""
  return os.environ.get("ALEXNET_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "alexnet_jax")


def torch_hub_dir() -> str:
  """PyTorch's hub cache of downloaded weights, as ``torch.hub`` finds it."""
  home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "torch")
  return os.path.join(home, "hub", "checkpoints")


# ----------------------------------------------------------------------------------------------
# Flax msgpack params.


def save_params(path: str, params: Any) -> None:
  """Writes a Flax param tree to ``path`` (msgpack) atomically: a failure leaves no partial file."""
  write_atomically(path, serialization.msgpack_serialize(
      {layer: {k: np.asarray(v) for k, v in sub.items()} for layer, sub in params.items()}))


def load_params(path: str) -> dict:
  """Reads a Flax param tree written by ``save_params``; ValueError if it is not one."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    params = serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001  (msgpack raises several kinds on bad bytes)
    raise ValueError(f"{path} cannot be read as Flax msgpack params (truncated or of another "
                     f"format?): {type(e).__name__} {str(e)[:200]}".rstrip()) from e
  if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
    raise ValueError(f"{path} holds a {type(params).__name__}, not a Flax param tree "
                     "({layer: {kernel, bias}}) as written by alexnet_jax.convert")
  return params


# ----------------------------------------------------------------------------------------------
# Published weights.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _check_hash(path: str, prefix: str, then: str) -> None:
  got = _sha256(path)
  if not got.startswith(prefix):
    raise ValueError(f"{path}: its SHA-256 {got[:16]}... does not start with {prefix}, the hash "
                     f"in its name: the file is damaged or not the published one. {then}")


def _download(url: str, path: str, progress: bool) -> None:
  """``url`` to ``path``, with a progress line on stderr; nothing is left at ``path`` on failure."""
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0)
      done, shown, start = 0, -1, time.monotonic()
      for block in iter(lambda: response.read(1 << 20), b""):
        f.write(block)
        done += len(block)
        percent = 100 * done // total if total else 0
        # A terminal gets one line redrawn; a log gets a line every 10%.
        if progress and (sys.stderr.isatty() or percent // 10 != shown // 10 or done == total):
          end = "\r" if sys.stderr.isatty() and done != total else "\n"
          rate = done / max(time.monotonic() - start, 1e-6) / 2**20
          print(f"downloading {os.path.basename(url)}: {percent:3d}% of "
                f"{total / 2**20:.0f} MiB, {rate:.1f} MiB/s", end=end, file=sys.stderr,
                flush=True)
          shown = percent
    if total and done != total:
      raise OSError(f"the download stopped at {done} of {total} bytes")
  except BaseException:
    if os.path.exists(path):
      os.remove(path)
    raise


def fetch(name: str = "alexnet", *, url: str | None = None, progress: bool = True) -> str:
  """The path of published weights ``name`` as torch-free msgpack in ``cache_dir()``, converting
  (PyTorch needed once) from the hub cache or a download (``url`` replaces the published address;
  the hash in its file name is checked)."""
  entry = _published_or_raise(name)
  if url is not None:
    entry = dataclasses.replace(entry, url=url)
  folder = cache_dir()
  converted = os.path.join(folder, f"{os.path.splitext(entry.filename)[0]}.msgpack")
  if os.path.exists(converted):
    return converted
  os.makedirs(folder, exist_ok=True)
  # Processes sharing the cache (one per GPU) wait here while the first fetches.
  with open(os.path.join(folder, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(converted):
      _convert(entry, folder, converted, progress)
  return converted


def _convert(entry: Published, folder: str, converted: str, progress: bool) -> None:
  placed = [os.path.join(folder, entry.filename), os.path.join(torch_hub_dir(), entry.filename)]
  source = next((p for p in placed if os.path.exists(p)), None)
  needs_torch = ImportError(f"converting {entry.filename} needs PyTorch once: pip install "
                            "'alexnet-jax[torch]'; later loads read the converted copy "
                            f"{converted} without it")
  if importlib.util.find_spec("torch") is None:  # before a download it could not convert
    raise needs_torch
  downloaded = source is None
  if downloaded:
    source = os.path.join(folder, f"{entry.filename}.part-{os.getpid()}")
    try:
      _download(entry.url, source, progress)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
      reason = getattr(e, "reason", None) or e
      raise OSError(f"cannot download {entry.url} ({reason}). Offline, put that file at "
                    f"{placed[1]} or {placed[0]} and load again") from e
  try:
    _check_hash(source, entry.sha256_prefix, "It was deleted; load again to download it anew"
                if downloaded else "Delete it and load again")
    from alexnet_jax import torch_interop  # pylint: disable=import-outside-toplevel
    try:
      state_dict = torch_interop.load_torch_state_dict(source)
    except ImportError as e:
      raise needs_torch from e
    save_params(converted, torch_interop.params_from_torch(state_dict, entry.variant))
  finally:
    if downloaded:  # the converted copy replaces the download, and a bad one is not kept
      os.remove(source)


def load(name: str = "alexnet", model: AlexNet | None = None, **fetch_kwargs: Any) -> dict:
  """Flax params of published weights ``name`` (``fetch_kwargs`` go to ``fetch``).

  ``model`` defaults to the variant they fit; a ``num_classes=0`` model gets them without fc3.
  """
  entry = _published_or_raise(name)
  if model is None:
    model = create_model(entry.variant)
  return match_model(load_params(fetch(name, **fetch_kwargs)), model, f"weights {name!r}")


# ----------------------------------------------------------------------------------------------
# Any source, for a model.


def match_model(params: Mapping[str, Any], model: AlexNet, source: str, *,
                replace_head: bool = False, seed: int = 0,
                replace_head_option: str = "replace_head=True") -> dict:
  """``params`` checked against ``model``'s shapes. A ``num_classes=0`` model drops fc3; a head of
  another class count is started afresh (from ``seed``) only with ``replace_head``. ``source``
  and ``replace_head_option`` are the caller's words for them in errors."""
  params = jax.tree_util.tree_map(np.asarray, dict(params))
  fresh = param_shapes(model)  # shapes only: nothing is initialised unless the head is
  if not model.num_classes:
    params.pop("fc3", None)
  shape = lambda t: jax.tree_util.tree_map(np.shape, t)
  if set(params) != set(fresh):
    raise ValueError(f"{source} has layers {sorted(params)}, the model has {sorted(fresh)}; "
                     "is the model the variant the weights were trained as?")
  wrong = [k for k in fresh if shape(params[k]) != shape(fresh[k])]
  if wrong and wrong != ["fc3"]:
    raise ValueError(f"{source}: shapes differ from the model's in "
                     f"{', '.join(f'{k} {shape(params[k])} vs {shape(fresh[k])}' for k in wrong)}")
  if wrong:
    if not replace_head:
      raise ValueError(
          f"{source} has a {shape(params['fc3'])['kernel'][1]}-class head, the model "
          f"{model.num_classes} classes; to start the head afresh, set {replace_head_option}")
    params["fc3"] = init_params(model, jax.random.PRNGKey(seed))["fc3"]
  return params


def _torch_params(path: str, model: AlexNet, variant: str) -> dict:
  from alexnet_jax import torch_interop  # pylint: disable=import-outside-toplevel

  state_dict = torch_interop.load_torch_state_dict(path)
  naming = torch_interop.torch_naming(variant)
  # The file's own class count, so that only the head can differ.
  weight = state_dict.get(f"{torch_interop.head_prefix(model, naming)}.weight")
  classes = int(weight.shape[0]) if weight is not None else model.num_classes
  return torch_interop.state_dict_to_params(state_dict, model.clone(num_classes=classes), naming)


def load_weights(source: str, model: AlexNet, variant: str, *, replace_head: bool = False,
                 seed: int = 0, what: str = "weights",
                 replace_head_option: str = "replace_head=True") -> dict:
  """Params for ``model`` (of ``variant``) from published weights' name, a ``.pth``/``.pt``
  state_dict, ``.msgpack`` params or an Orbax checkpoint (a workdir, its checkpoints folder or
  one step). ``what`` and ``replace_head_option`` are how the caller's user names ``source`` and
  ``replace_head``, for errors."""
  label = f"{what}={source!r}"
  entry = published(source)
  if entry is not None and not os.path.exists(source):
    if entry.variant != variant:
      raise ValueError(f"{label}: those weights are for the {entry.variant} variant, not "
                       f"{variant}")
    params = load_params(fetch(source))
  elif not os.path.exists(source):
    raise FileNotFoundError(f"{label} does not exist (and is not one of the published "
                            f"weights: {_known()})")
  elif source.endswith(TORCH_SUFFIXES):
    params = _torch_params(source, model, variant)
  elif source.endswith(FLAX_SUFFIXES):
    params = load_params(source)
  else:
    from alexnet_jax import checkpointing  # pylint: disable=import-outside-toplevel
    try:
      params = checkpointing.restore_params(source)
    except checkpointing.CheckpointError as e:
      raise ValueError(f"{label}: {e}") from e
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"{label}: {e}, nor a weights file ({'/'.join(TORCH_SUFFIXES + FLAX_SUFFIXES)})") from e
  return match_model(params, model, label, replace_head=replace_head, seed=seed,
                     replace_head_option=replace_head_option)
