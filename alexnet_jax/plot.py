"""Training curves: ``python -m alexnet_jax.plot WORKDIR [--out FILE.png]``.

Reads ``WORKDIR/metrics.jsonl`` (written by :class:`alexnet_jax.metric_log.MetricLogger`) and
draws three panels against the step: loss (``train_loss``, ``eval_loss``), accuracy
(``train_top1``, ``eval_top1``, ``eval_top5``) and learning rate (``lr``, on a log scale when all
positive). Metrics missing from the file are not drawn. The PNG goes to ``WORKDIR/curves.png``
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from alexnet_jax import extras
from alexnet_jax.metric_log import METRICS_FILE, read_metrics

if TYPE_CHECKING:
  from matplotlib.figure import Figure

PANELS = (
    ("loss", ("train_loss", "eval_loss")),
    ("accuracy", ("train_top1", "eval_top1", "eval_top5")),
    ("learning rate", ("lr",)),
)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of ``key``, sorted by step; NaNs stay in and show as gaps."""
  points = sorted(((r["step"], float(r[key])) for r in records
                   if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)),
                  key=lambda p: p[0])
  return [s for s, _ in points], [v for _, v in points]


def make_figure(records: list[dict[str, Any]], title: str = "") -> Figure:
  """A ``matplotlib.figure.Figure`` (on an Agg canvas) of the three panels of ``records``."""
  # The object API with an explicit Agg canvas leaves pyplot's global backend and figures alone.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top,redefined-outer-name

  fig = Figure(figsize=(15, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(PANELS))
  for ax, (name, keys) in zip(axes, PANELS):
    drawn = False
    for key in keys:
      steps, values = _series(records, key)
      if steps:
        ax.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)
        drawn = True
        finite = [v for v in values if math.isfinite(v)]
        # A schedule decaying by orders of magnitude is flat on a linear axis; a zero (warmup
        # start) or negative value has no log, so those stay linear.
        if key == "lr" and finite and min(finite) > 0:
          ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if drawn:
      ax.legend()
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  if title:
    fig.suptitle(title)
  return fig


def plot_metrics(workdir: str, out: str | None = None) -> str:
  """Writes the curves of ``workdir/metrics.jsonl`` to ``out`` (default ``curves.png`` there).

  Returns the PNG's path. Raises FileNotFoundError when the workdir or its metrics file is missing
  and ValueError when the file holds no records.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no such workdir: {workdir}")
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {METRICS_FILE} in {workdir}")
  records = read_metrics(workdir)
  if not records:
    raise ValueError(f"{path} holds no metrics")
  out = out or os.path.join(workdir, "curves.png")
  fig = make_figure(records, title=os.path.basename(os.path.normpath(os.path.abspath(workdir))))
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, format="png", dpi=100)
  return out


@extras.needed_by("python -m alexnet_jax.plot")  # matplotlib, of the train extra
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", help="training workdir holding metrics.jsonl")
  parser.add_argument("--out", help="PNG to write (default: WORKDIR/curves.png)")
  args = parser.parse_args(argv)
  try:
    out = plot_metrics(args.workdir, args.out)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
