"""Training metrics: ``WORKDIR/metrics.jsonl`` plus TensorBoard scalars in ``WORKDIR/tensorboard/``.

Each :meth:`MetricLogger.write` appends one JSON object per line, ``{"step": 100, "train_loss":
2.3, ...}``, and flushes and fsyncs it, so a crash or preemption loses nothing already written.
The file stays strict JSON (readable by ``jq`` and browsers, not only by Python): a non-finite
value is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``, and :func:`read_metrics` turns
those back into floats.

A run resumed from the checkpoint of step ``k`` calls :meth:`MetricLogger.resume_at` first, which
drops the lines the interrupted run wrote after step ``k``, so the file has no step twice.
TensorBoard's event files are append-only and are left alone: TensorBoard itself discards the
orphaned points when it reads steps going backwards.

The TensorBoard writer (``tensorboardX``: event files without TensorFlow) is imported only when
the first scalar is written, so importing this module, or logging with ``tensorboard=False``,
stays light.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode(value: Any) -> float | str:
  value = float(value)
  if math.isfinite(value):
    return value
  return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode(record: dict[str, Any]) -> dict[str, Any]:
  return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def _parse_lines(path: str) -> list[tuple[str, dict[str, Any] | None]]:
  """(raw line, record or None if it is not a metrics record) for each non-blank line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
          raise ValueError("not an object with an integer 'step'")
      except ValueError as e:
        # A line torn by a crash mid-write must not make the whole history unreadable.
        warnings.warn(f"{path}:{lineno}: skipping malformed line ({e}): {line.strip()[:80]!r}")
        record = None
      out.append((line, record))
  return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` in file order, non-finite values back as floats."""
  path = os.path.join(workdir, METRICS_FILE)
  return [_decode(r) for _, r in _parse_lines(path) if r is not None]


class MetricLogger:
  """Appends step metrics to ``metrics.jsonl`` and TensorBoard; a no-op when not ``enabled``.

  Pass ``enabled=jax.process_index() == 0`` so that only one host of a multi-host run writes.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.tensorboard = tensorboard
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._tb_writer = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def _open(self):
    if self._file is None:
      self._file = open(self.path, "a", encoding="utf-8")
      # After a crash mid-line, start on a fresh line so the next record is not glued to the torn
      # one (read_metrics then skips just the torn line).
      if self._file.tell() > 0:
        with open(self.path, "rb") as f:
          f.seek(-1, os.SEEK_END)
          if f.read(1) != b"\n":
            self._file.write("\n")
    return self._file

  def _tb(self):
    if self._tb_writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb_writer = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR))
    return self._tb_writer

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs ``metrics`` (scalars: python, numpy or JAX) at ``step``; durable on return."""
    if not self.enabled:
      return
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step number; rename the metric")
    step = int(step)
    values = {str(k): float(v) for k, v in metrics.items()}
    record = {"step": step, **{k: _encode(v) for k, v in values.items()}}
    f = self._open()
    f.write(json.dumps(record, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
    if self.tensorboard and values:
      writer = self._tb()
      for k, v in values.items():
        writer.add_scalar(k, v, step)
      writer.flush()

  def resume_at(self, step: int) -> None:
    """Atomically drops the records after ``step`` (and malformed lines) from ``metrics.jsonl``.

    Call it when resuming from the checkpoint of ``step``, before the first :meth:`write`.
    """
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
      self._file = None
    if not os.path.exists(self.path):
      return
    lines = _parse_lines(self.path)
    kept = [line if line.endswith("\n") else line + "\n"
            for line, r in lines if r is not None and r["step"] <= step]
    if len(kept) == len(lines):
      return
    fd, tmp = tempfile.mkstemp(dir=self.workdir, prefix=METRICS_FILE + ".", suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except BaseException:
      os.unlink(tmp)
      raise

  def close(self) -> None:
    """Flushes and closes both outputs; a later :meth:`write` reopens them."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb_writer is not None:
      self._tb_writer.close()
      self._tb_writer = None

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
