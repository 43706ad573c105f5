"""Multi-process (multi-host) runs on JAX's own distributed runtime (``jax.distributed``).

Every process runs the same program on its own devices; ``jax.distributed.initialize`` connects
them through a coordinator (process 0) before JAX touches any device. After that the code is the
same as on one host: data is read per process (``data.loader``), steps are compiled over all
devices of all processes (``training.make_steps``) and only process 0 logs.

JAX's runtime also watches the processes: when one stops sending heartbeats for
``heartbeat_timeout_seconds``, the others are terminated with "Terminating process because the JAX
distributed service detected fatal errors", instead of waiting forever in a collective.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

import jax

# train.py's flags fall back to these; JAX itself reads JAX_COORDINATOR_ADDRESS too.
ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
            "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _from_env(name: str, value):
  if value is not None:
    return value
  raw = os.environ.get(ENV_VARS[name])
  if raw is None or raw == "":
    return None
  if name == "coordinator_address":
    return raw
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"${ENV_VARS[name]} must be an integer; got {raw!r}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto_detect: bool = False,
               heartbeat_timeout_seconds: int = 100, initialization_timeout: int = 300) -> bool:
  """Starts ``jax.distributed`` if asked to; returns whether it did.

  It is asked to by any of the three arguments (or ``$JAX_COORDINATOR_ADDRESS``,
  ``$JAX_NUM_PROCESSES``, ``$JAX_PROCESS_ID``), or by ``auto_detect``, which lets JAX read them
  from the cluster (Cloud TPU pod slices, SLURM, Open MPI). Call it before any other JAX call.
  """
  args = {name: _from_env(name, value) for name, value in (
      ("coordinator_address", coordinator_address), ("num_processes", num_processes),
      ("process_id", process_id))}
  given = {k: v for k, v in args.items() if v is not None}
  if not given and not auto_detect:
    return False
  if given and not auto_detect and len(given) < 3:
    missing = sorted(set(args) - set(given))
    raise ValueError(
        f"multi-process run: got {', '.join(sorted(given))} but not {', '.join(missing)}; give "
        "all three (flags --coordinator_address, --num_processes, --process_id, or $"
        + ", $".join(ENV_VARS.values()) + "), or --distributed to detect them on a Cloud TPU pod "
        "or a SLURM/Open MPI cluster")
  n, i = args["num_processes"], args["process_id"]
  if n is not None and n < 1:
    raise ValueError(f"num_processes must be >= 1; got {n}")
  if n is not None and i is not None and not 0 <= i < n:
    raise ValueError(f"process_id must be in [0, {n - 1}] for {n} processes; got {i}")
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    # CPU processes need a collectives backend to talk to each other (the default in newer JAX).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                             initialization_timeout=initialization_timeout)
  return True


def run_or_abort(main: Callable[[], object]) -> object:
  """Runs ``main``; in a multi-process run, an exception ends this process at once.

  A normal exit would first wait (up to JAX's shutdown timeout, minutes) for the other processes
  to shut down, while they wait in a collective for this one. Exiting at once lets them see it is
  gone and stop within the heartbeat timeout.
  """
  if jax.process_count() == 1:
    return main()
  try:
    return main()
  except SystemExit as e:  # main has said why
    code = e.code if isinstance(e.code, int) else 1
    if code:
      print(f"process {jax.process_index()} of {jax.process_count()} failed", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  except BaseException as e:  # noqa: B036  (KeyboardInterrupt too: the peers must not hang)
    traceback.print_exc()
    hint = (" in a collective or transfer: most likely another process died first; see its log"
            if isinstance(e, jax.errors.JaxRuntimeError) else "")
    print(f"process {jax.process_index()} of {jax.process_count()} failed{hint}",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
