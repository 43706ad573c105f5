"""Where a compiled step's time goes, op by op: XLA's own profile of a few calls, summed by HLO
instruction and by the model layer each instruction's metadata names.

``jax.profiler.trace`` writes a ``*.trace.json.gz`` whose events carry the names of the
compiled module's instructions (as in ``compiled.as_text()``). An op that XLA runs asynchronously
(on CPU, its larger matrix products and convolutions, which hand their work to Eigen's threads)
shows only its launch; ops that run side by side on different cores each count in full. So the
figures rank the loops (fusions) against each other, not the whole step's wall time.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
import tempfile
from typing import Any, Callable, Sequence

# One instruction of the entry computation: `%name = shape op(...)`, metadata's op_name if any.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One HLO instruction's time per call of the profiled function."""
  name: str  # as in ``compiled.as_text()``
  shape: str
  layer: str  # the model layer its metadata names; "" for none (optimizer, loss, copies)
  ms: float
  events: int  # per call


def _instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Shape and metadata op_name of each instruction of the entry computation."""
  entry = hlo_text[hlo_text.index("\nENTRY "):]
  found = {}
  for line in entry.splitlines()[1:]:
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(line)
      found[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
  return found


def _layer(op_name: str, layers: Sequence[str]) -> str:
  """The last path component of ``op_name`` that is one of ``layers`` (a Flax module's scope)."""
  return next((part for part in reversed(op_name.split("/")) if part in layers), "")


def op_times(run: Callable[[], Any], hlo_text: str, layers: Sequence[str] = (),
             calls: int = 3) -> list[OpTime]:
  """Profile ``calls`` calls of ``run`` (which runs the compiled module ``hlo_text`` and blocks
  until done), slowest op first."""
  import jax

  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(calls):
        run()
    (trace,) = pathlib.Path(folder).glob("plugins/profile/*/*.trace.json.gz")
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  instructions = _instructions(hlo_text)
  micros, counts = collections.defaultdict(float), collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in instructions:
      micros[event["name"]] += event["dur"]
      counts[event["name"]] += 1
  times = [OpTime(name, instructions[name][0], _layer(instructions[name][1], layers),
                  us / calls / 1e3, counts[name] // calls) for name, us in micros.items()]
  return sorted(times, key=lambda t: -t.ms)


def layer_totals(times: Sequence[OpTime]) -> dict[str, float]:
  """ms per call by layer ("" for ops of no layer), largest first."""
  totals: dict[str, float] = collections.defaultdict(float)
  for t in times:
    totals[t.layer] += t.ms
  return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
