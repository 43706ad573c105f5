"""The optional extra a command needs, named in one line when it is not installed.

  @extras.needed_by("python -m alexnet_jax.plot")  # or: with extras.needed_by(...):
  def main(argv=None): ...

Inside, a ``ModuleNotFoundError`` for a module of one of pyproject.toml's extras prints
``error: COMMAND needs the 'train' extra (No module named 'grain'): pip install
'alexnet-jax[train]'`` to stderr and exits with status 1; any other error, a missing module that
no extra provides included, passes with its traceback. ``require`` checks modules up front
without importing them. Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Iterator, NoReturn

DISTRIBUTION = "alexnet-jax"
# The top-level modules of each extra's own requirements in pyproject.toml (tests/test_extras.py
# holds them to it). Their dependencies are left out: one of those missing is a broken install,
# which the traceback shows better than an extra would.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "train": ("grain", "array_record", "tensorflow_datasets", "simplejpeg", "cv2", "PIL",
              "sklearn", "orbax", "ml_collections", "absl", "tensorboardX", "matplotlib"),
    "tfds": ("tensorflow", "importlib_resources"),
    "test": ("pytest", "tensorboard"),
}
EXIT_STATUS = 1  # that of the commands' other one-line errors


def extra_of(module: str | None) -> str | None:
  """The extra that provides ``module`` (a dotted name counts by its top level), or None."""
  top = (module or "").partition(".")[0]
  return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def _line(command: str, missing: list[str]) -> str:
  extras = list(dict.fromkeys(extra_of(m) for m in missing))
  named = " and ".join(f"{e!r}" for e in extras)
  return (f"error: {command} needs the {named} extra{'s' if len(extras) > 1 else ''} (No module "
          f"named {', '.join(repr(m) for m in missing)}): pip install "
          f"'{DISTRIBUTION}[{','.join(extras)}]'")


def describe(command: str, error: BaseException) -> str:
  """The ``error:`` line for ``error``: the extra to install if it is a missing extra's module."""
  name = error.name if isinstance(error, ModuleNotFoundError) else None
  return _line(command, [name]) if extra_of(name) else f"error: {error}"


def _exit(line: str) -> NoReturn:
  # Printed here, not as SystemExit's message: distributed.run_or_abort ends a multi-process run
  # with os._exit, which would drop that message.
  print(line, file=sys.stderr, flush=True)
  raise SystemExit(EXIT_STATUS)


def _missing(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is None  # imports only the parents of a dotted name
  except ModuleNotFoundError:  # a parent is missing
    return True


def require(command: str, *modules: str) -> None:
  """Exits with one line naming the extras to install unless every module of ``modules`` (each
  an extra's) is installed. Nothing is imported; ``needed_by`` covers what this leaves out."""
  unknown = [m for m in modules if extra_of(m) is None]
  if unknown:
    raise ValueError(f"{', '.join(unknown)}: not of any extra ({', '.join(EXTRA_MODULES)})")
  missing = [m for m in modules if _missing(m)]
  if missing:
    _exit(_line(command, missing))


@contextlib.contextmanager
def needed_by(command: str) -> Iterator[None]:
  """Turns a missing extra's ``ModuleNotFoundError`` inside into one ``error:`` line and exit
  status 1; a context manager or a decorator."""
  try:
    yield
  except ModuleNotFoundError as e:
    if extra_of(e.name) is None:  # not an extra's: a bug or a broken install, traceback and all
      raise
    _exit(describe(command, e))
