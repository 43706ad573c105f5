"""Numerical parity of every variant against its PyTorch twin (fp32).

``python -m alexnet_jax.parity [--variant NAME|all] [--precision highest|default]`` prints, per
variant, the max absolute and max relative difference of eval-mode logits, of the gradients of a
cross-entropy loss for every parameter, and of the parameters after SGD steps (momentum, weight
decay, one learning-rate drop), and exits non-zero when any is over tolerance.

Relative difference of a tensor = max|flax - torch| / max|torch|. Dropout is off throughout: masks
cannot match across frameworks.

Gradients are compared only on batches where both frameworks take the same path through the
network: the same ReLU on/off pattern and the same max-pool winner in every window. In fp32 the two
forwards differ by ~1e-6, so a pool window whose two largest values are closer than that can pick a
different winner and send the whole gradient of that window to a neighbouring pixel. That is
rounding, not a bug, but it moves conv kernel gradients by up to ~1e-2. Such batches are redrawn
(the count is reported); they are rare enough that a few redraws suffice.

The JAX side runs on JAX's default backend under ``jax.default_matmul_precision(PRECISION)``;
PyTorch runs on the CPU at its default full fp32, the same reference on any machine. ``highest``
(the default) makes JAX's matmuls and convolutions full fp32 everywhere. ``default`` is JAX's own
choice: on CPU the same, on GPUs and TPUs rounded inputs (TF32 on NVIDIA GPUs). There the
comparison is a coarse check with a looser tolerance, and batches are not redrawn, since at that
rounding few batches take the same path in both frameworks.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: without torch, one line, no traceback
  from alexnet_jax import extras
  extras.require("python -m alexnet_jax.parity", "torch")

import argparse
import dataclasses
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from alexnet_jax import ops
from alexnet_jax.models import VARIANTS, AlexNet, create_model
from alexnet_jax.torch_interop import params_from_torch
from alexnet_jax.torch_reference import nchw, torch_model

LOGITS_TOL = 1e-5  # max|diff| <= LOGITS_TOL * max|logit|
GRAD_TOL = 1e-4  # per-parameter relative difference
PARAM_TOL = 1e-4  # per-parameter relative difference after the SGD steps
# Off CPU, JAX's default precision rounds fp32 matmul and convolution inputs to fewer mantissa
# bits (TF32 on NVIDIA GPUs, bf16 passes on TPUs): the tolerances above would report that rounding
# as failures, and ReLU/max-pool paths then rarely match over a whole batch. This one still catches
# wiring errors (a wrong layout, transpose or layer), which show as differences of order one.
# docs/gpu.md has measurements.
ROUNDED_TOL = 1e-1

PRECISIONS: tuple[str, ...] = ("highest", "default")  # values of jax.default_matmul_precision

MAX_REDRAWS = 50
# A small learning rate keeps the random-data training from pushing many units onto the ReLU/pool
# decision boundaries, where fp32 rounding alone would send the two runs different ways.
LR, LR_DROP_FACTOR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.1, 0.9, 5e-4


@dataclasses.dataclass(frozen=True)
class Case:
  """One model to compare: a variant, optional setting overrides and the input sides to test."""
  variant: str
  sizes: tuple[int, ...]
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def label(self) -> str:
    extra = ",".join(f"{k}={v}" for k, v in self.overrides)
    return f"{self.variant}[{extra}]" if extra else self.variant


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """What ``run_case`` checks: relative tolerances, and whether batches must take the same path."""
  logits: float = LOGITS_TOL
  grads: float = GRAD_TOL
  params: float = PARAM_TOL
  same_path: bool = True


def tolerances(precision: str, backend: str | None = None) -> Tolerances:
  """The tolerances for JAX at ``precision`` on ``backend`` (default: JAX's default backend)."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
  if precision == "default" and (backend or jax.default_backend()) != "cpu":
    return Tolerances(ROUNDED_TOL, ROUNDED_TOL, ROUNDED_TOL, same_path=False)
  return Tolerances()


@dataclasses.dataclass(frozen=True)
class Row:
  """One compared quantity: the worst tensor, its differences and whether it is within tolerance."""
  case: str
  what: str
  worst: str
  max_abs: float
  max_rel: float
  tol: float
  note: str = ""

  @property
  def ok(self) -> bool:
    return bool(self.max_rel <= self.tol)


def default_cases(variant: str) -> list[Case]:
  """Cases for ``variant``: its nominal input; extra sizes for the adaptive pool; both LRN parities."""
  model = create_model(variant)
  if variant == "alexnet":
    return [Case(variant, (224, 256, 300))]
  cases = [Case(variant, (model.input_size,))]
  if any(model.lrn_after):
    even = model.lrn_size + 1 if model.lrn_size % 2 else model.lrn_size - 1
    cases.append(Case(variant, (model.input_size,), (("lrn_size", even),)))
  return cases


def _rel_rows(case: str, what: str, flax_tree: dict, torch_tree: dict, tol: float,
              note: str = "") -> Row:
  worst = ("", 0.0, -1.0)
  for layer in flax_tree:
    for name in flax_tree[layer]:
      a, b = np.asarray(flax_tree[layer][name]), np.asarray(torch_tree[layer][name])
      diff = float(np.abs(a - b).max())
      rel = diff / max(float(np.abs(b).max()), np.finfo(np.float32).tiny)
      if rel > worst[2]:
        worst = (f"{layer}/{name}", diff, rel)
  return Row(case, what, worst[0], worst[1], worst[2], tol, note)


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.numpy()


def _torch_grads_as_flax(net: torch.nn.Module, variant: str, overrides: dict) -> dict:
  grads = {k: p.grad for k, p in net.named_parameters()}
  return params_from_torch(grads, variant, **overrides)


def _torch_path(net: torch.nn.Module, x: np.ndarray) -> tuple[list, list]:
  """Outputs of the hidden conv/dense layers and the inputs of the max pools, in forward order."""
  weighted, pool_inputs, hooks = [], [], []
  for module in net.modules():
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
      hooks.append(module.register_forward_hook(lambda m, i, o: weighted.append(_nhwc(o))))
    elif isinstance(module, torch.nn.MaxPool2d):
      hooks.append(module.register_forward_hook(lambda m, i, o: pool_inputs.append(i[0])))
  try:
    with torch.no_grad():
      net(nchw(x))
  finally:
    for h in hooks:
      h.remove()
  return weighted[:-1], pool_inputs


def _flax_path(model: AlexNet) -> Callable[[Any, np.ndarray], tuple[list, list]]:
  """Same as ``_torch_path`` for the Flax model (pool inputs as NCHW torch tensors).

  Compiled as the compared gradients are: op-by-op dispatch would use other kernels, whose
  rounding can tip a near-zero ReLU input or a near-tied pool window the other way.
  """
  @_jit
  def path(params, x):
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    acts = state["intermediates"]["activations"]
    # After the ReLU (and LRN, which keeps signs): positive exactly where the layer's output is.
    convs = [acts[f"conv{i + 1}"] for i in range(len(model.conv_features))]
    pool_inputs = [a for a, pool in zip(convs, model.pool_after) if pool]
    return convs + [acts["fc1"], acts["fc2"]], pool_inputs

  def as_numpy(params, x):
    hidden, pool_inputs = path(params, x)
    return [np.asarray(h) for h in hidden], [nchw(np.asarray(a)) for a in pool_inputs]
  return as_numpy


def _same_path(model: AlexNet, flax_path: Callable, params: Any, net: torch.nn.Module,
               x: np.ndarray) -> bool:
  """True when both frameworks switch the same ReLUs on and pick the same max-pool winners."""
  (hidden_a, pools_a), (hidden_b, pools_b) = flax_path(params, x), _torch_path(net, x)
  if any(not np.array_equal(a > 0, b > 0) for a, b in zip(hidden_a, hidden_b)):
    return False
  window, stride = model.pool_window, model.pool_stride
  winners = lambda t: torch.nn.functional.max_pool2d(t, window, stride, return_indices=True)[1]
  return all(torch.equal(winners(a), winners(b)) for a, b in zip(pools_a, pools_b))


def run_case(case: Case, batch: int = 4, steps: int = 10, seed: int = 0,
             precision: str = "highest") -> list[Row]:
  """Compares ``case`` in Flax (at matmul ``precision``) and PyTorch; one Row per quantity."""
  tols = tolerances(precision)
  with jax.default_matmul_precision(precision):  # _run_case's jitted functions trace in here
    return _run_case(case, batch, steps, seed, tols)


def _run_case(case: Case, batch: int, steps: int, seed: int, tols: Tolerances) -> list[Row]:
  overrides = dict(case.overrides)
  model = create_model(case.variant, **overrides)
  torch.manual_seed(seed)
  net = torch_model(case.variant, **overrides).eval()  # eval(): dropout off
  params = jax.tree_util.tree_map(jnp.asarray,
                                  params_from_torch(net.state_dict(), case.variant, **overrides))
  rng = np.random.default_rng(seed)
  rows = _logit_rows(case, model, net, params, batch, rng, tols.logits)
  drop_at = steps // 2
  batches = _Batches(case, model, net, batch, rng, tols.same_path)
  rows += _training_rows(case, model, net, params, batches, steps, drop_at, tols)
  rows.append(_optimizer_row(case, params, steps, drop_at, rng))
  rows.extend(_torchvision_rows(case, seed, tols.logits))
  return rows


def _jit(fun: Callable) -> Callable:
  return jax.jit(fun, compiler_options=ops.compiler_options())  # as the train and eval steps


def _sgd(drop_at: int) -> optax.GradientTransformation:
  """``torch.optim.SGD(momentum, weight_decay)`` with ``MultiStepLR([drop_at])``, in optax."""
  schedule = optax.piecewise_constant_schedule(LR, {drop_at: LR_DROP_FACTOR})
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(schedule, MOMENTUM))


def _torch_sgd(tensors: Iterable[torch.Tensor], drop_at: int) -> tuple[Any, Any]:
  opt = torch.optim.SGD(tensors, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  return opt, torch.optim.lr_scheduler.MultiStepLR(opt, [drop_at], LR_DROP_FACTOR)


def _logits_row(label: str, what: str, out: np.ndarray, ref: np.ndarray, tol: float) -> Row:
  diff = float(np.abs(out - ref).max())
  return Row(label, what, "logits", diff, diff / float(np.abs(ref).max()), tol)


def _logit_rows(case: Case, model: AlexNet, net: torch.nn.Module, params: Any, batch: int,
                rng: np.random.Generator, tol: float) -> list[Row]:
  apply = _jit(lambda p, x: model.apply({"params": p}, x))  # the default eval forward
  rows = []
  for size in case.sizes:
    x = rng.standard_normal((batch, size, size, model.in_channels), np.float32)
    with torch.no_grad():
      ref = net(nchw(x)).numpy()
    rows.append(_logits_row(case.label, f"logits {size}x{size}", np.asarray(apply(params, x)),
                            ref, tol))
  return rows


class _Batches:
  """Random training batches, redrawn where asked until both frameworks take the same path."""

  def __init__(self, case: Case, model: AlexNet, net: torch.nn.Module, batch: int,
               rng: np.random.Generator, same_path: bool):
    self.label, self.same_path = case.label, same_path
    self.model, self.net, self.batch, self.rng = model, net, batch, rng
    self.flax_path = _flax_path(model)
    self.redraws = 0

  def _draw(self) -> tuple[np.ndarray, np.ndarray]:
    side, m = self.model.input_size, self.model
    x = self.rng.standard_normal((self.batch, side, side, m.in_channels), np.float32)
    return x, self.rng.integers(0, m.num_classes, self.batch)

  def draw(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    if not self.same_path:
      return self._draw()
    for _ in range(MAX_REDRAWS):
      x, y = self._draw()
      if _same_path(self.model, self.flax_path, params, self.net, x):
        return x, y
      self.redraws += 1
    raise RuntimeError(f"{self.label}: {MAX_REDRAWS} batches in a row took different ReLU/max-pool "
                       "paths in Flax and PyTorch; the forwards disagree beyond rounding")

  def note(self) -> str:
    return f"{self.redraws} batches redrawn" if self.same_path else "paths not matched"


def _training_rows(case: Case, model: AlexNet, net: torch.nn.Module, params: Any,
                   batches: _Batches, steps: int, drop_at: int, tols: Tolerances) -> list[Row]:
  """Loss gradients at the initial params, and the params after ``steps`` SGD steps."""
  tx = _sgd(drop_at)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @_jit
  def sgd_step(p, opt_state, x, y):
    g = jax.grad(loss_fn)(p, x, y)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, g

  opt, lr_sched = _torch_sgd(net.parameters(), drop_at)
  opt_state = tx.init(params)
  rows = []
  for step in range(steps):
    x, y = batches.draw(params)
    params, opt_state, grads = sgd_step(params, opt_state, x, y)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(nchw(x)), torch.from_numpy(y)).backward()
    if step == 0:  # weight decay is added in step(), after this
      rows.append(_rel_rows(case.label, "gradients", grads,
                            _torch_grads_as_flax(net, case.variant, dict(case.overrides)),
                            tols.grads, batches.note()))
      batches.redraws = 0
    opt.step()
    lr_sched.step()
  trained = params_from_torch(net.state_dict(), case.variant, **dict(case.overrides))
  rows.append(_rel_rows(case.label, f"params after {steps} SGD steps", params, trained,
                        tols.params, batches.note()))
  return rows


def _optimizer_row(case: Case, params: Any, steps: int, drop_at: int,
                   rng: np.random.Generator) -> Row:
  """The update rule alone: optax and torch.optim.SGD fed the same gradients, O(1) in size.

  Within the network run the updates are tiny next to the weights, so a wrong weight decay or
  momentum would hide under the tolerance; here the change dominates and is what is compared.
  The rule is elementwise, so the first and last layers stand for all.
  """
  layers = list(params)
  params = {layer: params[layer] for layer in (layers[0], layers[-1])}
  names = [(layer, name) for layer in params for name in params[layer]]
  ours = jax.tree_util.tree_map(np.asarray, params)
  tensors = [torch.tensor(ours[l][n], requires_grad=True) for l, n in names]
  opt, lr_sched = _torch_sgd(tensors, drop_at)
  tx = _sgd(drop_at)
  opt_state = tx.init(ours)
  for _ in range(steps):
    grads = jax.tree_util.tree_map(
        lambda p: rng.standard_normal(p.shape, np.float32), ours)
    updates, opt_state = tx.update(grads, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    for t, (l, n) in zip(tensors, names):
      t.grad = torch.from_numpy(np.asarray(grads[l][n]))
    opt.step()
    lr_sched.step()
  change = lambda tree: {l: {n: np.asarray(tree[l][n]) - np.asarray(params[l][n])
                             for n in tree[l]} for l in tree}
  theirs = {l: {} for l in params}
  for t, (l, n) in zip(tensors, names):
    theirs[l][n] = t.detach().numpy()
  return _rel_rows(case.label, f"SGD rule alone, change over {steps} steps", change(ours),
                   change(theirs), PARAM_TOL)


def _torchvision_rows(case: Case, seed: int, tol: float) -> list[Row]:
  """For plain ``alexnet``, also compares against torchvision's own module when importable."""
  if case.variant != "alexnet" or case.overrides:
    return []
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
  except Exception:  # torchvision raises more than ImportError when its torch does not match
    return []
  torch.manual_seed(seed)
  net = torchvision.models.alexnet(weights=None).eval()
  params = params_from_torch(net.state_dict(), "alexnet")
  x = np.random.default_rng(seed).standard_normal((4, 224, 224, 3), np.float32)
  with torch.no_grad():
    ref = net(nchw(x)).numpy()
  out = np.asarray(create_model("alexnet").apply({"params": params}, x))
  return [_logits_row(case.label, "logits vs torchvision.models.alexnet", out, ref, tol)]


def format_rows(rows: Iterable[Row]) -> str:
  lines = [f"{'case':<34} {'quantity':<36} {'worst tensor':<14} {'max abs':>10} "
           f"{'max rel':>10} {'tol':>8}  ok"]
  for r in rows:
    lines.append(f"{r.case:<34} {r.what:<36} {r.worst:<14} {r.max_abs:>10.3e} {r.max_rel:>10.3e} "
                 f"{r.tol:>8.0e}  {'yes' if r.ok else 'NO ':<4} {r.note}".rstrip())
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m alexnet_jax.parity", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="all", choices=("all",) + VARIANTS,
                      help="variant to check (default: all)")
  parser.add_argument("--batch", type=int, default=4, help="images per batch (default: 4)")
  parser.add_argument("--steps", type=int, default=10,
                      help="SGD steps; the learning rate drops 10x halfway (default: 10)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--precision", default="highest", choices=PRECISIONS,
                      help="jax.default_matmul_precision for the JAX side: highest is full fp32 on "
                           "every backend; default is JAX's own (TF32 on NVIDIA GPUs), checked "
                           "against a looser tolerance off CPU (default: highest)")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 2:
    parser.error("--batch must be >= 1 and --steps >= 2 (the learning-rate drop needs two phases)")

  variants = VARIANTS if args.variant == "all" else (args.variant,)
  backend = jax.default_backend()
  print(f"precision: {args.precision} (jax.default_matmul_precision), JAX backend: {backend}, "
        "PyTorch: cpu, fp32")
  if not tolerances(args.precision, backend).same_path:
    print(f"note: JAX's default precision rounds fp32 matmuls and convolutions on {backend}; "
          f"checked against tolerance {ROUNDED_TOL:.0e} without matching ReLU/max-pool paths "
          "(--precision highest for the fp32 check)")
  try:
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import
  except Exception as e:  # pylint: disable=broad-except
    print(f"note: torchvision is not importable ({type(e).__name__}); alexnet is compared "
             "against the built-in PyTorch reference only")
  all_rows = []
  for variant in variants:
    for case in default_cases(variant):
      print(f"checking {case.label} at {', '.join(map(str, case.sizes))} ...")
      all_rows += run_case(case, batch=args.batch, steps=args.steps, seed=args.seed,
                           precision=args.precision)
  print(format_rows(all_rows))
  failed = [r for r in all_rows if not r.ok]
  if failed:
    print(f"FAILED: {len(failed)} of {len(all_rows)} comparisons over tolerance")
    return 1
  print(f"all {len(all_rows)} comparisons within tolerance")
  return 0


if __name__ == "__main__":
  sys.exit(main())
