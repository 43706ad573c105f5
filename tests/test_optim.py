"""alexnet_jax.optim against torch.optim, a numpy reference of the paper's rule and closed forms."""

import types

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alexnet_jax import optim

torch = pytest.importorskip("torch")

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
SPE, STEPS = 4, 40  # steps per epoch and steps of the schedule comparisons
PARAM_TOL = 1e-5


def _config(**overrides) -> ml_collections.ConfigDict:
  """A config with every optimizer field, constant LR by default."""
  config = ml_collections.ConfigDict(dict(
      batch_size=128,
      learning_rate=LR,
      lr_scaling="none",
      lr_base_batch_size=128,
      momentum=MOMENTUM,
      nesterov=False,
      momentum_rule="torch",
      weight_decay=WD,
      weight_decay_on_biases=True,
      schedule="constant",
      lr_decay_factor=0.1,
      lr_step_epochs=3,
      lr_milestones_epochs=(5,),
      warmup_epochs=0.0,
      plateau_patience=2,
      plateau_rtol=1e-4,
      plateau_min_scale=0.0,
  ))
  config.update(overrides)
  return config


def _params_and_grads(steps: int, seed: int = 0) -> tuple[dict, list[dict]]:
  rng = np.random.default_rng(seed)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(steps)]
  return params, grads


def _run_optax(tx: optax.GradientTransformation, params: dict,
               grads: list[dict]) -> tuple[list[dict], list[float]]:
  """Params after each update and the LR each update used (jitted, as in training)."""

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
  history, lrs = [], []
  for g in grads:
    p, s = step(p, s, g)
    history.append(jax.tree.map(np.asarray, p))
    lrs.append(float(optim.current_learning_rate(s)))
  return history, lrs


def _run_torch(make_opt, make_sched, params: dict, grads: list[dict]) -> tuple[list[dict], list]:
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = make_opt(tensors)
  sched = make_sched(opt)
  history, lrs = [], []
  for g in grads:
    for k, t in tensors.items():
      t.grad = torch.from_numpy(g[k].copy())
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
    history.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
  return history, lrs


def _max_rel(a: dict, b: dict) -> float:
  return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a)


@pytest.mark.parametrize("nesterov", [False, True])
def test_torch_rule_matches_torch_sgd_multistep(nesterov):
  params, grads = _params_and_grads(10)
  config = _config(schedule="multistep", lr_milestones_epochs=(5,), nesterov=nesterov)
  ours, our_lrs = _run_optax(optim.create_optimizer(config, 1, 10), params, grads)
  theirs, their_lrs = _run_torch(
      lambda t: torch.optim.SGD(t.values(), lr=LR, momentum=MOMENTUM, weight_decay=WD,
                                nesterov=nesterov),
      lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5], 0.1), params, grads)
  np.testing.assert_allclose(our_lrs, their_lrs, rtol=1e-6)
  assert their_lrs[4] != their_lrs[5]  # the drop is inside the run
  for a, b in zip(ours, theirs):
    assert _max_rel(a, b) <= PARAM_TOL


def test_no_weight_decay_on_biases_matches_torch_param_groups():
  params, grads = _params_and_grads(10)
  config = _config(weight_decay=0.05, weight_decay_on_biases=False)
  ours, _ = _run_optax(optim.create_optimizer(config, 1, 10), params, grads)
  theirs, _ = _run_torch(
      lambda t: torch.optim.SGD([{"params": [t["kernel"]]},
                                 {"params": [t["bias"]], "weight_decay": 0.0}],
                                lr=LR, momentum=MOMENTUM, weight_decay=0.05),
      lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0), params, grads)
  for a, b in zip(ours, theirs):
    assert _max_rel(a, b) <= PARAM_TOL
  # The mask matters: decaying the bias too gives a different bias.
  decayed, _ = _run_optax(optim.create_optimizer(_config(weight_decay=0.05), 1, 10), params,
                          grads)
  assert np.abs(decayed[-1]["bias"] - theirs[-1]["bias"]).max() > 1e-3


def _torch_lrs(make_sched) -> list[float]:
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
  sched, lrs = make_sched(opt), []
  for _ in range(STEPS):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  return lrs


def _warmup_then(lrs: list[float], warmup: int) -> list[float]:
  return [LR * t / warmup if t < warmup else lr for t, lr in enumerate(lrs)]


def _cosine_after_warmup(warmup: int) -> list[float]:
  return [LR * t / warmup if t < warmup else
          0.5 * LR * (1 + np.cos(np.pi * (t - warmup) / (STEPS - warmup))) for t in range(STEPS)]


SCHEDULE_CASES = {
    "constant": (dict(schedule="constant"), lambda: [LR] * STEPS),
    "step": (dict(schedule="step", lr_step_epochs=3), lambda: _torch_lrs(
        lambda o: torch.optim.lr_scheduler.StepLR(o, 3 * SPE, 0.1))),
    "multistep": (dict(schedule="multistep", lr_milestones_epochs=(3, 7, 7)), lambda: _torch_lrs(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3 * SPE, 7 * SPE, 7 * SPE], 0.1))),
    "cosine": (dict(schedule="cosine"), lambda: _torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=0.0))),
    "warmup_multistep": (
        dict(schedule="multistep", lr_milestones_epochs=(3, 7), warmup_epochs=1.5),
        lambda: _warmup_then(_torch_lrs(
            lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3 * SPE, 7 * SPE], 0.1)), 6)),
    "warmup_step": (dict(schedule="step", lr_step_epochs=3, warmup_epochs=2), lambda: _warmup_then(
        _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 3 * SPE, 0.1)), 8)),
    "warmup_constant_vs_linear_lr": (dict(schedule="constant", warmup_epochs=1), lambda: [0.0] + (
        # torch's LinearLR cannot start at 0; from step 1 on it matches a 0 -> LR ramp.
        _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, total_iters=3))[:-1])),
    "warmup_cosine": (dict(schedule="cosine", warmup_epochs=2), lambda: _cosine_after_warmup(8)),
}


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_schedule_matches_reference(name):
  overrides, reference = SCHEDULE_CASES[name]
  config = _config(momentum=0.0, weight_decay=0.0, **overrides)
  params, grads = _params_and_grads(STEPS)
  _, our_lrs = _run_optax(optim.create_optimizer(config, SPE, STEPS), params, grads)
  expected = reference()
  np.testing.assert_allclose(our_lrs, expected, rtol=1e-5, atol=1e-7 * LR)
  schedule = optim.learning_rate_schedule(config, SPE, STEPS)
  np.testing.assert_allclose([float(schedule(t)) for t in range(STEPS)], expected, rtol=1e-5,
                             atol=1e-7 * LR)


def _paper_numpy(params: dict, grads: list[dict], lrs: list[float]) -> list[dict]:
  """Krizhevsky et al. 2012: v <- m*v - wd*lr*w - lr*g; w <- w + v (float64)."""
  w = {k: v.astype(np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  history = []
  for g, lr in zip(grads, lrs):
    for k in w:
      v[k] = MOMENTUM * v[k] - WD * lr * w[k] - lr * g[k]
      w[k] = w[k] + v[k]
    history.append({k: x.copy() for k, x in w.items()})
  return history


def test_paper_rule_matches_numpy_and_differs_from_torch_after_lr_drop():
  params, grads = _params_and_grads(10)
  runs = {}
  for rule in ("paper", "torch"):
    config = _config(schedule="multistep", lr_milestones_epochs=(5,), momentum_rule=rule)
    runs[rule] = _run_optax(optim.create_optimizer(config, 1, 10), params, grads)
  (paper, lrs), (torch_rule, _) = runs["paper"], runs["torch"]
  assert lrs == pytest.approx([LR] * 5 + [LR * 0.1] * 5)
  reference = _paper_numpy(params, grads, lrs)

  def moved(history, t):  # the displacement from the start, so the comparison is not diluted
    return {k: history[t][k] - params[k] for k in params}

  for t in range(10):
    assert _max_rel(moved(paper, t), moved(reference, t)) <= PARAM_TOL
  for t in range(5):  # constant LR: the two rules are the same
    assert _max_rel(moved(paper, t), moved(torch_rule, t)) <= PARAM_TOL
  # After the drop torch rescales the whole momentum buffer, the paper lets it decay.
  assert _max_rel(moved(paper, 5), moved(torch_rule, 5)) > 0.1


def test_linear_lr_scaling():
  config = _config(lr_scaling="linear", batch_size=256, lr_base_batch_size=128)
  assert optim.scaled_learning_rate(config) == pytest.approx(2 * LR)
  assert optim.scaled_learning_rate(_config(batch_size=256)) == pytest.approx(LR)
  params, _ = _params_and_grads(0)
  state = optim.create_optimizer(config, SPE, STEPS).init(params)
  assert float(optim.current_learning_rate(state)) == pytest.approx(2 * LR)


def test_plateau_drops_lr_after_patience_and_survives_jit():
  config = _config(schedule="plateau", momentum=0.0, weight_decay=0.0, plateau_patience=2,
                   plateau_min_scale=0.005)
  tx = optim.create_optimizer(config, SPE, STEPS)
  params, grads = _params_and_grads(1)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(None)  # runs only when jax traces, i.e. when the state's types change
    updates, s = tx.update(g, s, p)
    return updates, s

  opt_state, plateau_state = tx.init(params), optim.init_plateau()
  rule = optim.plateau_rule(config)
  structure = jax.tree.structure(opt_state)
  errors = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
  # First two improve; then every `patience` evaluations without improvement drop the LR by 10,
  # down to min_scale (0.005, so the third drop stops at 0.005 instead of 0.001).
  expected = [1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005]
  for error, scale in zip(errors, expected):
    plateau_state, opt_state = optim.update_plateau(rule, plateau_state, opt_state, error)
    assert jax.tree.structure(opt_state) == structure
    assert float(optim.current_learning_rate(opt_state)) == pytest.approx(LR * scale, rel=1e-5)
    updates, opt_state = step(params, opt_state, grads[0])
    # momentum 0 and no weight decay: the update is -lr * g, at the new LR.
    np.testing.assert_allclose(updates["kernel"], -LR * scale * grads[0]["kernel"], rtol=1e-5)
    assert float(optim.current_learning_rate(opt_state)) == pytest.approx(LR * scale, rel=1e-5)
  assert len(traces) == 1
  # Both states round-trip through flax serialization, as checkpoints do.
  for state in (opt_state, plateau_state):
    restored = flax.serialization.from_bytes(state, flax.serialization.to_bytes(state))
    jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_plateau_scales_warmup():
  config = _config(schedule="plateau", momentum=0.0, weight_decay=0.0, warmup_epochs=1,
                   plateau_patience=1)
  tx = optim.create_optimizer(config, SPE, STEPS)
  params, grads = _params_and_grads(6)
  opt_state, plateau_state = tx.init(params), optim.init_plateau()
  rule = optim.plateau_rule(config)
  for error in (0.5, 0.5):  # improves, then one evaluation without improvement: scale 0.1
    plateau_state, opt_state = optim.update_plateau(rule, plateau_state, opt_state, error)
  lrs = []
  for g in grads:
    _, opt_state = tx.update(g, opt_state, params)
    lrs.append(float(optim.current_learning_rate(opt_state)))
  np.testing.assert_allclose(lrs, [0.1 * LR * t / SPE for t in range(4)] + [0.1 * LR] * 2,
                             rtol=1e-5, atol=1e-9)


def test_plateau_rejects_other_schedules():
  config = _config(schedule="multistep")
  plateau = _config(schedule="plateau")
  state = optim.init_plateau()
  params, _ = _params_and_grads(0)
  opt_state = optim.create_optimizer(config, SPE, STEPS).init(params)
  with pytest.raises(ValueError, match="config.schedule='plateau', got 'multistep'"):
    optim.plateau_rule(config)
  with pytest.raises(ValueError, match="schedule='plateau'"):  # config and opt_state disagree
    optim.update_plateau(optim.plateau_rule(plateau), state, opt_state, 0.5)


BAD_CONFIGS = [
    (dict(schedule="exponential"), "schedule"),
    (dict(momentum_rule="nesterov"), "momentum_rule"),
    (dict(lr_scaling="sqrt"), "lr_scaling"),
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(momentum=1.5), "momentum"),
    (dict(momentum=0.0, nesterov=True), "nesterov"),
    (dict(schedule="multistep", lr_milestones_epochs=()), "lr_milestones_epochs"),
    (dict(schedule="multistep", lr_milestones_epochs=(3, -1)), "lr_milestones_epochs"),
    (dict(schedule="step", lr_step_epochs=0), "lr_step_epochs"),
    (dict(schedule="step", lr_decay_factor=1.5), "lr_decay_factor"),
    (dict(warmup_epochs=-1.0), "warmup_epochs"),
    (dict(schedule="multistep", lr_milestones_epochs=(1,), warmup_epochs=2), "warmup_epochs"),
    (dict(schedule="plateau", plateau_patience=0), "plateau_patience"),
    (dict(schedule="plateau", plateau_rtol=0.0), "plateau_rtol"),
    (dict(schedule="plateau", plateau_min_scale=-0.1), "plateau_min_scale"),
    (dict(lr_scaling="linear", lr_base_batch_size=0), "lr_base_batch_size"),
    (dict(lr_scaling="linear", batch_size=-8), "batch_size"),
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_CONFIGS])
def test_bad_config_raises_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=f"config.{field}"):
    optim.create_optimizer(_config(**overrides), SPE, STEPS)


def test_bad_arguments_and_missing_fields_raise():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.create_optimizer(_config(), 0, STEPS)
  with pytest.raises(ValueError, match="num_train_steps"):
    optim.learning_rate_schedule(_config(), SPE, 0)
  # Any object with the fields works; a missing required one is named.
  fields = {k: v for k, v in _config().items() if k != "learning_rate"}
  with pytest.raises(ValueError, match="config.learning_rate is missing"):
    optim.create_optimizer(types.SimpleNamespace(**fields), SPE, STEPS)
  # ConfigDict's type safety cannot catch this one for a plain object.
  with pytest.raises(ValueError, match="config.nesterov"):
    optim.create_optimizer(types.SimpleNamespace(**{**fields, "learning_rate": LR, "nesterov": 1}),
                           SPE, STEPS)
  # Optional fields fall back to their defaults.
  minimal = types.SimpleNamespace(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD,
                                  schedule="constant")
  params, _ = _params_and_grads(0)
  state = optim.create_optimizer(minimal, SPE, STEPS).init(params)
  assert float(optim.current_learning_rate(state)) == pytest.approx(LR)


def test_a_run_shorter_than_its_warmup_warms_up_over_half_of_it():
  # e.g. --config.num_train_steps=6 under a 0.25-epoch warmup of 11 steps
  with pytest.warns(UserWarning, match=r"warmup_epochs=10.0 is 40 steps, not fewer than "
                                       r"num_train_steps=6: warming up over 3 steps"):
    schedule = optim.learning_rate_schedule(_config(warmup_epochs=10), SPE, 6)
  np.testing.assert_allclose([schedule(t) for t in range(6)], _warmup_then([LR] * 6, 3),
                             rtol=1e-6)
