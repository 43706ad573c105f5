"""Writing files whole or not at all, and the errors a command reports in one line."""

from __future__ import annotations

import os


class CheckpointError(Exception):
  """A checkpoint that cannot be used; the message says which and why."""


# What a user can fix (settings, files, a damaged checkpoint, a full disk, a diverged run, a
# missing extra): the command-line tools report these in one line, without a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError, CheckpointError)


def write_atomically(path: str, data: bytes | bytearray | str) -> None:
  """Writes ``data`` to ``path`` through a temporary file, on disk before the rename: a reader
  never sees half a file, and a failure leaves none."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w" if isinstance(data, str) else "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
