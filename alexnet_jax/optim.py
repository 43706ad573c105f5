"""SGD optimizer and learning-rate schedules built from a training config.

The config is read by attribute only (an ``ml_collections.ConfigDict`` or any object with these
fields). Fields and defaults (``REQUIRED`` = no default); ``DEFAULTS`` holds them, and
``configs/default.py`` takes them from there:

================================  =============  ===============================================
field                             default        meaning
================================  =============  ===============================================
``learning_rate``                 REQUIRED       base LR (> 0), before ``lr_scaling``
``lr_scaling``                    ``'none'``     ``'none'`` or ``'linear'``: LR *= batch_size /
                                                 lr_base_batch_size (arXiv 1404.5997)
``lr_base_batch_size``            ``128``        batch size that ``learning_rate`` is tuned for
``batch_size``                    REQUIRED with  global batch size
                                  ``'linear'``
``momentum``                      REQUIRED       in [0, 1)
``nesterov``                      ``False``      Nesterov momentum (needs momentum > 0)
``momentum_rule``                 ``'torch'``    ``'torch'`` or ``'paper'``, see below
``weight_decay``                  REQUIRED       >= 0, L2 added to the gradient
``weight_decay_on_biases``        ``True``       False: no decay on parameters with ndim <= 1
``schedule``                      REQUIRED       ``'constant' | 'step' | 'multistep' | 'cosine'
                                                 | 'plateau'``
``lr_decay_factor``               ``0.1``        in (0, 1), for step, multistep and plateau
``lr_step_epochs``                ``30``         'step': decay every this many epochs (StepLR)
``lr_milestones_epochs``          ``()``         'multistep': epochs of the drops (MultiStepLR)
``warmup_epochs``                 ``0.0``        linear warmup from 0, composed with any schedule
``plateau_patience``              ``2``          'plateau': evaluations without improvement
``plateau_rtol``                  ``1e-4``       'plateau': relative improvement that counts
``plateau_min_scale``             ``1e-3``       'plateau': the LR never goes below base * this
================================  =============  ===============================================

Momentum rules, for LR ``lr``, momentum ``m``, weight decay ``wd``, gradient ``g``:

* ``'torch'`` (``torch.optim.SGD``): ``b <- m*b + g + wd*w; w <- w - lr*b``.
* ``'paper'`` (Krizhevsky et al. 2012): ``v <- m*v - wd*lr*w - lr*g; w <- w + v``. The LR is
  applied before the momentum trace, so after an LR drop the velocity built up at the old LR
  decays out instead of being rescaled at once. With a constant LR the two rules are identical.

Epoch-based fields become step counts through ``steps_per_epoch``; step ``t`` (0-based) is the
``t``-th update. Warmup ramps the LR linearly from 0 (at step 0) to the schedule's LR over
``round(warmup_epochs * steps_per_epoch)`` steps; a run too short for that (a smoke run) warms
up over half its steps, with a warning. Step and multistep drops stay at their absolute
epochs (they must come after the warmup); cosine decays to 0 over the steps left after the warmup.

The 'plateau' schedule (the paper's "divide the LR by 10 when the validation error stops
improving") uses ``optax.contrib.reduce_on_plateau``. Its state lives on the host, outside the
train step: ``init_plateau`` makes it, and ``update_plateau`` feeds it each validation error
through ``plateau_rule(config)`` and writes the resulting scale into the optimizer state, so the
next update uses ``LR * scale``.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

SCHEDULES = ("constant", "step", "multistep", "cosine", "plateau")
MOMENTUM_RULES = ("torch", "paper")
LR_SCALINGS = ("none", "linear")

_REQUIRED = object()
# torchvision's AlexNet recipe (8 GPUs x 32): what configs/imagenet_torchvision.py sets, and
# what `bench train` times.
TORCHVISION_RECIPE = {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                      "schedule": "step", "lr_step_epochs": 30, "warmup_epochs": 0.0}

DEFAULTS = {
    "lr_scaling": "none",
    "lr_base_batch_size": 128,
    "nesterov": False,
    "momentum_rule": "torch",
    "weight_decay_on_biases": True,
    "lr_decay_factor": 0.1,
    "lr_step_epochs": 30,
    "lr_milestones_epochs": (),
    "warmup_epochs": 0.0,
    "plateau_patience": 2,
    "plateau_rtol": 1e-4,
    "plateau_min_scale": 1e-3,
}


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The validated optimizer fields of a config."""
  learning_rate: float  # after lr_scaling
  momentum: float
  nesterov: bool
  momentum_rule: str
  weight_decay: float
  weight_decay_on_biases: bool
  schedule: str
  lr_decay_factor: float
  lr_step_epochs: int
  lr_milestones_epochs: tuple[int, ...]  # only validated for the schedule that uses it
  warmup_epochs: float
  plateau_patience: int
  plateau_rtol: float
  plateau_min_scale: float


def _get(config: Any, name: str) -> Any:
  value = getattr(config, name, DEFAULTS.get(name, _REQUIRED))
  if value is _REQUIRED:
    raise ValueError(f"config.{name} is missing.")
  return value


def is_real(x: Any) -> bool:
  """A real number, not a bool."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x: Any) -> bool:
  """An integer, not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(config: Any, name: str, low: float, high: float = float("inf"), *,
          low_open: bool = False, high_open: bool = True) -> float:
  """``config.<name>`` as a float, checked to lie in the interval [low, high) (or as given)."""
  value = _get(config, name)
  ok = is_real(value)
  if ok:
    ok = (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"config.{name} must be a number in {interval}, got {value!r}.")
  return float(value)


def _positive_int(value: Any, name: str) -> int:
  if not is_int(value) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def _choice(config: Any, name: str, valid: tuple[str, ...]) -> str:
  value = _get(config, name)
  if value not in valid:
    raise ValueError(f"config.{name} must be one of {valid}, got {value!r}.")
  return value


def _bool(config: Any, name: str) -> bool:
  value = _get(config, name)
  if not isinstance(value, bool):
    raise ValueError(f"config.{name} must be True or False, got {value!r}.")
  return value


def _settings(config: Any) -> _Settings:
  """Reads and validates the optimizer fields of ``config``; raises ValueError naming the field."""
  schedule = _choice(config, "schedule", SCHEDULES)
  momentum = _real(config, "momentum", 0.0, 1.0)
  nesterov = _bool(config, "nesterov")
  if nesterov and momentum == 0.0:
    raise ValueError("config.nesterov=True needs config.momentum > 0, got momentum 0.")
  decays = schedule in ("step", "multistep", "plateau")
  step_epochs = _get(config, "lr_step_epochs")
  if schedule == "step":
    step_epochs = _positive_int(step_epochs, "config.lr_step_epochs")
  milestones = _get(config, "lr_milestones_epochs")
  if schedule == "multistep":
    if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
      raise ValueError(f"config.lr_milestones_epochs must be a sequence of positive integers, "
                       f"got {milestones!r}.")
    milestones = tuple(_positive_int(m, "config.lr_milestones_epochs entries")
                       for m in milestones)
    if not milestones:
      raise ValueError("config.lr_milestones_epochs must name at least one epoch for "
                       "schedule='multistep'.")
  plateau = schedule == "plateau"
  patience = _get(config, "plateau_patience")
  if plateau:
    patience = _positive_int(patience, "config.plateau_patience")
  return _Settings(
      learning_rate=scaled_learning_rate(config),
      momentum=momentum,
      nesterov=nesterov,
      momentum_rule=_choice(config, "momentum_rule", MOMENTUM_RULES),
      weight_decay=_real(config, "weight_decay", 0.0),
      weight_decay_on_biases=_bool(config, "weight_decay_on_biases"),
      schedule=schedule,
      lr_decay_factor=(_real(config, "lr_decay_factor", 0.0, 1.0, low_open=True) if decays
                       else _get(config, "lr_decay_factor")),
      lr_step_epochs=step_epochs,
      lr_milestones_epochs=milestones,
      warmup_epochs=_real(config, "warmup_epochs", 0.0),
      plateau_patience=patience,
      plateau_rtol=(_real(config, "plateau_rtol", 0.0, 1.0, low_open=True, high_open=False)
                    if plateau else _get(config, "plateau_rtol")),
      plateau_min_scale=(_real(config, "plateau_min_scale", 0.0, 1.0, high_open=False)
                         if plateau else _get(config, "plateau_min_scale")),
  )


def check_settings(config: Any) -> None:
  """Raises ValueError naming the first optimizer field of ``config`` out of range."""
  _settings(config)


def scaled_learning_rate(config: Any) -> float:
  """The base LR after ``lr_scaling``: times batch_size / lr_base_batch_size for 'linear'."""
  lr = _real(config, "learning_rate", 0.0, low_open=True)
  if _choice(config, "lr_scaling", LR_SCALINGS) == "linear":
    batch = _positive_int(_get(config, "batch_size"), "config.batch_size")
    base = _positive_int(_get(config, "lr_base_batch_size"), "config.lr_base_batch_size")
    lr *= batch / base
  return lr


def _decay_schedule(s: _Settings, steps_per_epoch: int,
                    num_train_steps: int) -> tuple[optax.Schedule, int | None]:
  """The schedule without warmup, and the step of its first LR drop (None: it has none)."""
  lr = s.learning_rate
  if s.schedule == "step":
    every = s.lr_step_epochs * steps_per_epoch
    return optax.exponential_decay(lr, every, s.lr_decay_factor, staircase=True), every
  if s.schedule == "multistep":
    # A dict cannot hold a step twice; a repeated milestone drops twice, as in MultiStepLR.
    counts = collections.Counter(m * steps_per_epoch for m in s.lr_milestones_epochs)
    drops = {step: s.lr_decay_factor**n for step, n in counts.items()}
    return optax.piecewise_constant_schedule(lr, drops), min(drops)
  if s.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, num_train_steps), None
  # 'plateau' scales this constant from the host, see update_plateau.
  return optax.constant_schedule(lr), None


def _schedule(s: _Settings, steps_per_epoch: Any, num_train_steps: Any) -> optax.Schedule:
  steps_per_epoch = _positive_int(steps_per_epoch, "steps_per_epoch")
  num_train_steps = _positive_int(num_train_steps, "num_train_steps")
  warmup = int(round(s.warmup_epochs * steps_per_epoch))
  if warmup >= num_train_steps:  # a smoke run of a few steps
    warnings.warn(f"config.warmup_epochs={s.warmup_epochs} is {warmup} steps, not fewer than "
                  f"num_train_steps={num_train_steps}: warming up over {num_train_steps // 2} "
                  "steps (half the run) instead", stacklevel=2)
    warmup = num_train_steps // 2
  if s.schedule == "cosine" and warmup:
    return optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, warmup, num_train_steps)
  decay, first_drop = _decay_schedule(s, steps_per_epoch, num_train_steps)
  if not warmup:
    return decay
  if first_drop is not None and first_drop < warmup:
    field = "lr_step_epochs" if s.schedule == "step" else "lr_milestones_epochs"
    raise ValueError(f"config.warmup_epochs={s.warmup_epochs} must end before the first LR drop "
                     f"(config.{field} puts it at step {first_drop}, warmup is {warmup} steps).")
  # join_schedules restarts the count at the boundary; shift it back so drops keep their epochs.
  return optax.join_schedules(
      [optax.linear_schedule(0.0, s.learning_rate, warmup), lambda step: decay(step + warmup)],
      [warmup])


def learning_rate_schedule(config: Any, steps_per_epoch: int,
                           num_train_steps: int) -> optax.Schedule:
  """The LR as a function of the 0-based update step, warmup included.

  For 'plateau' this is the LR before the plateau scale (warmup, then the constant base LR).
  """
  return _schedule(_settings(config), steps_per_epoch, num_train_steps)


class PlateauScheduleState(NamedTuple):
  """State of the 'plateau' LR: the update count and the scale set by ``update_plateau``."""
  count: jax.Array  # int32, shape ()
  scale: jax.Array  # float32, shape ()


class _PlateauScaledSchedule:
  """An ``optax.StatefulSchedule``: the step schedule times a scale kept in the optimizer state.

  A plain numeric hyperparameter could carry the scale too, but not together with a warmup:
  ``inject_hyperparams`` recomputes scheduled hyperparameters on every update and ignores
  overrides of them.
  """

  def __init__(self, schedule: optax.Schedule):
    self._schedule = schedule

  def init(self) -> PlateauScheduleState:
    return PlateauScheduleState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32))

  def update(self, state: PlateauScheduleState, **extra_args) -> PlateauScheduleState:
    del extra_args
    return state._replace(count=state.count + 1)

  def __call__(self, state: PlateauScheduleState, **extra_args) -> jax.Array:
    del extra_args
    return self._schedule(state.count) * state.scale


def _no_decay_on_vectors(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def create_optimizer(config: Any, steps_per_epoch: int,
                     num_train_steps: int) -> optax.GradientTransformation:
  """SGD with momentum, weight decay and the configured LR schedule.

  Wrapped in ``optax.inject_hyperparams``: ``opt_state.hyperparams`` holds ``learning_rate``,
  ``momentum`` and ``weight_decay`` as arrays (see ``current_learning_rate``).
  """
  s = _settings(config)
  schedule = _schedule(s, steps_per_epoch, num_train_steps)
  if s.schedule == "plateau":
    schedule = _PlateauScaledSchedule(schedule)
  mask = None if s.weight_decay_on_biases else _no_decay_on_vectors

  def chain(learning_rate, momentum, weight_decay):
    decay = optax.add_decayed_weights(weight_decay, mask)
    if s.momentum_rule == "torch":
      return optax.chain(decay, optax.sgd(learning_rate, momentum, s.nesterov))
    # 'paper': the trace accumulates -lr * (g + wd * w), i.e. the velocity v of the paper.
    return optax.chain(decay, optax.scale_by_learning_rate(learning_rate),
                       optax.trace(momentum, s.nesterov))

  return optax.inject_hyperparams(chain)(schedule, s.momentum, s.weight_decay)


def optimizer_for_layout(config: Any) -> optax.GradientTransformation:
  """``config``'s optimizer for a state template (restoring, evaluating): its state's layout does
  not depend on the schedule's length, which is set arbitrarily here."""
  return create_optimizer(config, steps_per_epoch=1, num_train_steps=10**9)


def current_learning_rate(opt_state: Any) -> jax.Array:
  """The LR of a ``create_optimizer`` state.

  After ``init`` this is the LR of the first update; after an update, the LR that update used;
  after ``update_plateau``, the LR at the new scale.
  """
  hyperparams = getattr(opt_state, "hyperparams", None)
  if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
    raise ValueError(f"opt_state must be the state of create_optimizer's transformation, got "
                     f"{type(opt_state).__name__}.")
  return jnp.asarray(hyperparams["learning_rate"])


def plateau_rule(config: Any) -> optax.GradientTransformationExtraArgs:
  """The reduce-on-plateau logic of ``config`` (schedule 'plateau'), for ``update_plateau``."""
  s = _settings(config)
  if s.schedule != "plateau":
    raise ValueError(f"plateau_rule needs config.schedule='plateau', got {s.schedule!r}.")
  return optax_contrib.reduce_on_plateau(
      factor=s.lr_decay_factor, patience=s.plateau_patience, rtol=s.plateau_rtol, atol=0.0,
      cooldown=0, accumulation_size=1, min_scale=s.plateau_min_scale)


def _plateau_dummy() -> jax.Array:
  # reduce_on_plateau takes its dtypes from the "params" it is initialized with.
  return jnp.zeros([], jnp.float32)


def init_plateau() -> optax_contrib.ReduceLROnPlateauState:
  """The host-side plateau state (a pytree of scalars), to be checkpointed with the train state.

  Every schedule gets one, unused but for 'plateau', so that every run's checkpoint has the same
  structure. Its layout does not depend on the plateau settings, only on the dummy's dtype.
  """
  return optax_contrib.reduce_on_plateau().init(_plateau_dummy())


def update_plateau(rule: optax.GradientTransformationExtraArgs,
                   plateau_state: optax_contrib.ReduceLROnPlateauState,
                   opt_state: Any, eval_error: float
                   ) -> tuple[optax_contrib.ReduceLROnPlateauState, Any]:
  """Feeds one validation error to the plateau logic; returns it and opt_state at the new scale.

  Call once per evaluation, outside the train step, with ``rule = plateau_rule(config)``. The LR
  of later updates is the schedule's LR times the scale. Raises ValueError unless ``opt_state``
  has the 'plateau' schedule, as calling it then is a bug.
  """
  _, plateau_state = rule.update(_plateau_dummy(), plateau_state, value=eval_error)
  old = opt_state.hyperparams_states["learning_rate"]
  if not isinstance(old, PlateauScheduleState):
    raise ValueError("opt_state must come from create_optimizer with schedule='plateau' (when "
                     "restoring a checkpoint, restore into such a state as the target).")
  scale = jnp.asarray(plateau_state.scale, old.scale.dtype)
  lr = opt_state.hyperparams["learning_rate"]
  # The next update recomputes the LR from the new scale; rescale the logged value right away.
  # Dtypes are kept so that a jitted train step does not retrace.
  unscaled = jnp.where(old.scale > 0, lr / old.scale, 0.0)
  hyperparams = {**opt_state.hyperparams,
                 "learning_rate": (unscaled * scale).astype(jnp.result_type(lr))}
  states = {**opt_state.hyperparams_states, "learning_rate": old._replace(scale=scale)}
  return plateau_state, opt_state._replace(hyperparams=hyperparams, hyperparams_states=states)
