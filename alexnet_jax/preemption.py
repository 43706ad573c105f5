"""Stopping a run cleanly on SIGTERM or SIGINT: finish the step, save it, exit normally.

One process: a signal handler sets a flag that the training loop reads after every step.
Several processes: they must all save the same step. ``jax.distributed`` starts JAX's preemption
service, which takes SIGTERM over and agrees with the other processes on a step that none has
passed (``multihost_utils.reached_preemption_sync_point``, called after every step); SIGINT is
handed to it as a SIGTERM. A second signal to a single process stops it at once; JAX's service
takes every SIGTERM, so a multi-process run that must stop at once needs SIGKILL.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Watcher:
  """``with Watcher() as w: ... if w.reached(step): save and stop``."""

  def __init__(self):
    self.received: str | None = None  # the signal's name, once one has come
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._service = self._multi

  def _on_signal(self, signum: int, frame: Any) -> None:
    del frame
    if self._multi:  # JAX's service hears SIGTERM, from every process that gets one
      os.kill(os.getpid(), signal.SIGTERM)
      return
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    # os.write: print() is not safe inside a handler that may interrupt another print.
    os.write(2, f"\n{self.received} received: stopping after this step, once it is saved "
                "(send it again to stop at once)\n".encode())

  def __enter__(self) -> "Watcher":
    if threading.current_thread() is threading.main_thread():  # signals reach no other thread
      for signum in (signal.SIGINT,) if self._multi else SIGNALS:
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def reached(self, steps_done: int) -> bool:
    """Whether to save and stop after this run's ``steps_done``-th step (1, 2, ...).

    Every process must call it after every step. JAX's service counts calls from 1 and picks
    the step after the largest count it hears, so a notice that comes before the first step
    (while restoring or compiling) still lands on one: hence steps done, not the step number.
    """
    if not self._service:
      return self.received is not None
    try:
      if multihost_utils.reached_preemption_sync_point(steps_done):
        self.received = "preemption notice (SIGTERM)"
        return True
    except RuntimeError:  # jax_enable_preemption_service is off
      self._service = False
      if jax.process_index() == 0:
        print("warning: JAX's preemption service is off (jax_enable_preemption_service): a "
              "SIGTERM stops this multi-process run without saving", flush=True)
    return False
