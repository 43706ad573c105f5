"""Training and evaluation: one per-device step body, wrapped by ``jax.pmap`` or ``jax.jit`` +
``jax.shard_map``; ``train_and_evaluate(config, workdir)`` is the whole job.

The state is one global array per leaf in every mode (pmap broadcasts it with
``in_axes=None``; hybrid mode splits the dense layers' leaves), so a checkpoint does not depend on
the number of devices that wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alexnet_jax import checkpointing, config_checks, ops, optim, preemption, pretrained
from alexnet_jax.data import host, loader, order, sources
from alexnet_jax.metric_log import MetricLogger
from alexnet_jax.models import DTYPES as COMPUTE_DTYPES, AlexNet, create_model, init_params

AXIS = "data"
MODEL_AXIS = "model"  # hybrid mode's second mesh axis, over which the dense layers are split
PARALLEL_MODES = config_checks.PARALLEL_MODES
DTYPES = {name: getattr(jnp, name) for name in COMPUTE_DTYPES}


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # raw uint32 key: checkpointable as a plain array
  plateau: Any  # reduce-on-plateau state (updated on the host after evaluations)


# ----------------------------------------------------------------------------------------------
# Model, state, loss and metrics.


def model_overrides(config: Any) -> dict[str, Any]:
  """The AlexNet settings the config sets (unset placeholders are None)."""
  return {k: v for k, v in dict(config.get("model_overrides") or {}).items() if v is not None}


def create_model_from_config(config: Any, num_classes: int) -> AlexNet:
  overrides = model_overrides(config)
  overrides.setdefault("num_classes", num_classes)
  overrides.setdefault("in_channels", config.channels)
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype must be one of {tuple(DTYPES)}; got {config.dtype!r}")
  return create_model(config.model, dtype=DTYPES[config.dtype], **overrides)


def create_train_state(config: Any, model: AlexNet, tx: optax.GradientTransformation,
                       params: Any | None = None) -> TrainState:
  """A fresh state; ``params`` (e.g. converted PyTorch weights) replace the random init."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    params = init_params(model, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, plateau=optim.init_plateau())


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example cross-entropy, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the ``k`` highest logits (ties count against it)."""
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  higher = jnp.sum(logits > label_logit, axis=-1)
  return (higher < k).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The per-device step bodies. ``axis_name`` is the data axis of pmap or shard_map.


def step_rng(rng: jax.Array, step: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """Distinct per step and per device, and reproducible from the seed (for dropout masks)."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(axis_name))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: AlexNet,
               tx: optax.GradientTransformation, label_smoothing: float = 0.0,
               normalize: Callable[[Mapping[str, jax.Array]], jax.Array] | None = None,
               axis_name: str = AXIS) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's part of the batch; gradients are averaged over ``axis_name``.

  ``normalize`` turns the batch into the model's input (``data.device.Normalize`` for the input
  pipeline's uint8 batches); without it ``batch["image"]`` is the input."""
  dropout_rng = step_rng(state.rng, state.step, axis_name)
  images = normalize(batch) if normalize else batch["image"]

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True,
                         rngs={"dropout": dropout_rng})
    return cross_entropy(logits, batch["label"], label_smoothing).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if jax.lax.axis_size(axis_name) > 1:  # on one device XLA:CPU would still copy every gradient
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = jax.lax.pmean({"train_loss": loss,
                           "train_top1": topk_correct(logits, batch["label"], 1).mean()},
                          axis_name)
  metrics["lr"] = optim.current_learning_rate(opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, model: AlexNet,
              normalize: Callable[[Mapping[str, jax.Array]], jax.Array] | None = None,
              axis_name: str = AXIS) -> dict[str, jax.Array]:
  """Sums of loss and top-1/top-5 hits over the real (masked) rows, summed over devices.

  Ten-crop batches (N, 10, H, W, C) are scored on the mean of the 10 softmaxes.
  """
  images = normalize(batch) if normalize else batch["image"]
  labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
  if images.ndim == 5:
    n, views = images.shape[:2]
    logits = model.apply({"params": params}, images.reshape((n * views,) + images.shape[2:]))
    probs = jax.nn.softmax(logits.astype(jnp.float32)).reshape(n, views, -1).mean(axis=1)
    log_probs = jnp.log(probs + 1e-12)
  else:
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, images).astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  sums = {"eval_loss": nll * mask, "eval_top1": topk_correct(log_probs, labels, 1) * mask,
          "eval_top5": topk_correct(log_probs, labels, 5) * mask, "count": mask}
  return jax.lax.psum(jax.tree_util.tree_map(jnp.sum, sums), axis_name)


# ----------------------------------------------------------------------------------------------
# The thin wrappers (pmap, jit of shard_map, hybrid).


@dataclasses.dataclass(frozen=True)
class Steps:
  """Compiled steps for one parallel mode, and how host batches and the state reach the devices.

  ``put`` takes an array of this process's rows of a global batch (as the loader yields them) to
  the devices, in whatever layout the mode needs; ``state_sharding(path, leaf)`` is where a leaf
  of the train state lives.
  """
  train: Callable
  eval: Callable
  put: Callable
  state_sharding: Callable
  num_devices: int


def make_steps(mode: str, model: AlexNet, tx: optax.GradientTransformation, *,
               label_smoothing: float = 0.0, devices: list | None = None,
               model_parallel: int = 1,
               normalize: Callable[[Mapping[str, jax.Array]], jax.Array] | None = None) -> Steps:
  """``pmap``, ``jit(shard_map)`` or ``hybrid`` over ``devices`` (default: all of all processes).

  Each process feeds its own rows of the global batch; ``put`` splits them over its local
  devices (a leading device axis for pmap, ``jax.make_array_from_process_local_data`` else).
  ``hybrid`` ("One weird trick"): the devices form a (data, model) mesh with ``model_parallel``
  devices on the model axis; the convolutions are data-parallel and the dense layers (and their
  optimizer state) are split over the model axis, which XLA partitions around the same body.
  """
  if mode not in PARALLEL_MODES:
    raise ValueError(f"config.parallel must be one of {PARALLEL_MODES}; got {mode!r}")
  devices = np.array(devices or jax.devices())
  if mode != "hybrid" and model_parallel != 1:
    raise ValueError(f"model_parallel={model_parallel} needs parallel='hybrid'; got {mode!r}")
  if model_parallel < 1 or devices.size % model_parallel:
    raise ValueError(f"model_parallel must be a positive divisor of the {devices.size} devices; "
                     f"got {model_parallel}")
  train_body = functools.partial(train_step, model=model, tx=tx, label_smoothing=label_smoothing,
                                 normalize=normalize)
  eval_body = functools.partial(eval_step, model=model, normalize=normalize)
  if mode == "hybrid":
    if devices.size // model_parallel < 2:
      # XLA's partitioner rejects the data axis's all-reduce when that axis has one device.
      raise ValueError(f"hybrid mode needs at least 2 data-parallel groups: model_parallel "
                       f"({model_parallel}) must be at most half of the {devices.size} devices")
    mesh = Mesh(devices.reshape(-1, model_parallel), (AXIS, MODEL_AXIS))
  else:
    mesh = Mesh(devices, (AXIS,))
  # The state is global (over every device of every process) in all modes, so that Orbax can save
  # and restore it whatever the number of processes.
  replicated = NamedSharding(mesh, P())
  options = ops.compiler_options(devices.flat[0].platform)
  if mode == "pmap":
    return _pmap_steps(mesh, train_body, eval_body, options)
  rows = NamedSharding(mesh, P(AXIS))
  # check_vma=False: with it on, grad() would psum the gradient of the replicated params on its
  # own, and the body's explicit pmean would then average a sum; off, the body runs exactly as
  # under pmap. Only the data axis is manual: in hybrid mode XLA partitions the model axis.
  wrap = lambda body, out: jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=out,
                                         axis_names={AXIS}, check_vma=False)
  state_sharding = lambda path, x: replicated
  train = wrap(train_body, (P(), P()))
  if mode == "hybrid":
    state_sharding = functools.partial(_dense_split, mesh)
    train = _constrain_state(train, state_sharding)  # keeps the split from step to step
  return Steps(
      train=jax.jit(train, donate_argnums=(0,), compiler_options=options),
      eval=jax.jit(wrap(eval_body, P()), compiler_options=options),
      put=lambda x: jax.make_array_from_process_local_data(rows, x),
      state_sharding=state_sharding, num_devices=mesh.size)


def _pmap_steps(mesh: Mesh, train_body: Callable, eval_body: Callable,
                options: dict[str, Any]) -> Steps:
  """The bodies under ``jax.pmap`` over ``mesh``'s devices; the state replicated."""
  replicated = NamedSharding(mesh, P())
  local = [d for d in mesh.devices if d.process_index == jax.process_index()]
  local_rows = NamedSharding(Mesh(np.array(local), (AXIS,)), P(AXIS))
  train = jax.pmap(train_body, AXIS, in_axes=(None, 0), out_axes=(None, None),
                   donate_argnums=(0,), devices=list(mesh.devices))
  evaluate = jax.pmap(eval_body, AXIS, in_axes=(None, 0), out_axes=None,
                      devices=list(mesh.devices))
  if jax.process_count() > 1:
    # Without compiler options: a pmap compiled ahead of time expects global shapes where the
    # call passes local ones (multi-process runs are on GPUs and TPUs, where they are empty).
    train = _global_state_outputs(train, replicated)
  else:
    train, evaluate = _compiled_with(options, train), _compiled_with(options, evaluate)
  per_device = lambda x: x.reshape((len(local), -1) + x.shape[1:])
  return Steps(
      train=train, eval=evaluate,
      put=lambda x: jax.device_put(per_device(x), local_rows),
      state_sharding=lambda path, x: replicated, num_devices=mesh.size)


def _dense_split(mesh: Mesh, path: tuple, x: Any) -> NamedSharding:
  """Hybrid mode: dense kernels split by output unit (and their biases alike), except a layer
  whose width the model axis does not divide (e.g. a 10-class head over 4); the rest replicated.
  Applies to the optimizer state too, whose momentum has the params' paths."""
  dense = any(isinstance(getattr(k, "key", None), str) and k.key.startswith("fc") for k in path)
  if not dense or np.ndim(x) not in (1, 2) or np.shape(x)[-1] % mesh.shape[MODEL_AXIS]:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(None, MODEL_AXIS) if np.ndim(x) == 2 else P(MODEL_AXIS))


def _constrain_state(train: Callable, sharding_of: Callable) -> Callable:
  def constrained(state, batch):
    state, metrics = train(state, batch)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(x, sharding_of(path, x)), state), metrics
  return constrained


def _compiled_with(options: dict[str, Any], pmapped: Callable) -> Callable:
  """``pmapped`` compiled with ``options``: ``jax.pmap`` takes none, its ``lower().compile`` does.

  One executable per argument structure, shapes and dtypes, as pmap's own cache keeps.
  """
  if not options:
    return pmapped
  executables = {}

  def call(*args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = tree, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)
    if key not in executables:
      executables[key] = pmapped.lower(*args).compile(compiler_options=options)
    return executables[key](*args)
  call.executables = executables
  return call


def _global_state_outputs(pmapped: Callable, sharding: NamedSharding) -> Callable:
  """Over several processes, pmap returns each process's replicas as a host-local array, which
  Orbax cannot save; this views the same buffers as one global replicated array (no copy)."""
  def as_global(x):
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [shard.data for shard in x.addressable_shards])

  def train(state, batch):
    state, metrics = pmapped(state, batch)
    return jax.tree_util.tree_map(as_global, state), metrics
  return train


def place_state(state: TrainState, steps: Steps) -> TrainState:
  """Places the state where ``steps`` want it (replicated, or split in hybrid mode)."""
  return jax.device_put(state, jax.tree_util.tree_map_with_path(steps.state_sharding, state))


# ----------------------------------------------------------------------------------------------
# The job.


def create_preprocess(config: Any) -> host.Preprocess:
  return host.Preprocess(train_preset=config.train_preset, eval_preset=config.eval_preset,
                         image_size=config.image_size, resize_size=config.resize_size,
                         channels=config.channels, pad=config.pad, mean=tuple(config.mean),
                         std=tuple(config.std))


def create_source(config: Any, train: bool) -> Any:
  """The config's train or eval split."""
  split = config.train_split if train else config.eval_split
  return sources.create_source(config.dataset, split, data_dir=config.data_dir or None,
                               manual_dir=config.manual_dir or None,
                               image_size=config.image_size, channels=config.channels)


def create_sources(config: Any) -> tuple[Any, Any]:
  return create_source(config, train=True), create_source(config, train=False)


def evaluate(steps: Steps, params: Any, source: Any, preprocess: host.Preprocess,
             batch_size: int, prefetch: int = 2, threads: int | None = None, workers: int = 0
             ) -> dict[str, float]:
  """Loss, top-1 and top-5 over every example of ``source`` exactly once."""
  totals = None
  batches = loader.eval_batches(source, preprocess, batch_size, threads=threads, workers=workers)
  with contextlib.closing(loader.prefetch_to_device(batches, prefetch, steps.put)) as placed:
    for batch in placed:
      sums = steps.eval(params, batch)
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {k: float(v) / count for k, v in totals.items()} | {"eval_count": count}


def _loader_options(config: Any) -> dict[str, Any]:
  return {"threads": config.data_threads or None, "workers": config.data_workers}


def _num_train_steps(config: Any, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def _every(config_steps: int, config_epochs: float, steps_per_epoch: int) -> int:
  if config_steps > 0:
    return config_steps
  return max(1, int(round(config_epochs * steps_per_epoch))) if config_epochs > 0 else 0


def _progress(step: int, total: int, metrics: Mapping[str, float], start: float,
              start_step: int) -> str:
  elapsed = time.time() - start
  eta = elapsed / max(step - start_step, 1) * (total - step)
  return (f"step {step}/{total}  loss {metrics['train_loss']:.4f}  "
          f"top1 {metrics['train_top1']:.3f}  lr {metrics['lr']:.3g}  "
          f"{metrics['images_per_sec']:.0f} img/s  ETA {eta / 60:.1f} min")


def _check_store(config: Any, *splits: Any) -> None:
  """A prepared store must have been prepared for this config's presets and sizes."""
  for source in splits:
    if isinstance(source, sources.PreparedSource):
      source.check(config.train_preset, config.eval_preset, config.resize_size,
                   config.channels)


def _check_batch_fits(config: Any, source: Any) -> None:
  loader.local_batch_size(config.batch_size)  # divides over the devices
  if len(source) < config.batch_size:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the {len(source)} "
        f"examples of {source.name} split {source.split!r}: use a batch of at most "
        f"{len(source)} or a larger split")


# What feeds the loop: (steps, start_step) -> a generator of batches already on the devices,
# from global step start_step on; closed when the loop ends.
Feed = Callable[[Steps, int], Iterator[dict[str, Any]]]


def loader_feed(config: Any, source: Any, preprocess: host.Preprocess) -> Feed:
  """The config's input pipeline: ``source`` through the loader, put on the devices by a
  background thread ``config.prefetch`` batches ahead."""
  def feed(steps: Steps, start_step: int) -> Iterator[dict[str, Any]]:
    batches = loader.TrainLoader(source, preprocess, config.batch_size, seed=config.seed,
                                 start_step=start_step, **_loader_options(config))
    return loader.prefetch_to_device(batches, config.prefetch, steps.put)
  return feed


def train_and_evaluate(config: Any, workdir: str, feed: Feed | None = None) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its newest intact checkpoint if any.

  On SIGTERM or SIGINT the run saves the step it is on and returns (see ``preemption``).
  ``feed`` replaces the input pipeline's train batches (``loader_feed``), e.g. by batches made
  on the devices, to time the loop without it.
  """
  config_checks.validate(config)
  main_process = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  train_source, eval_source = create_sources(config)
  _check_store(config, train_source, eval_source)
  _check_batch_fits(config, train_source)
  preprocess = create_preprocess(config)
  model = create_model_from_config(config, train_source.num_classes)
  steps_per_epoch = order.steps_per_epoch(len(train_source), config.batch_size)
  num_steps = _num_train_steps(config, steps_per_epoch)
  tx = optim.create_optimizer(config, steps_per_epoch, num_steps)
  steps = make_steps(config.parallel, model, tx, label_smoothing=config.label_smoothing,
                     model_parallel=config.model_parallel, normalize=preprocess.normalizer())

  manager = checkpointing.create_manager(workdir, config)
  try:
    state, resumed = _initial_state(config, model, tx, steps, manager)
    if resumed and main_process:
      print(f"resumed from {manager.directory} at step {int(state.step)}", flush=True)
    feed = feed or loader_feed(config, train_source, preprocess)
    state = _train(config, workdir, state, steps, manager, feed, eval_source, preprocess,
                   num_steps, steps_per_epoch)
  except BaseException:
    try:
      manager.close()
    except Exception:  # noqa: BLE001  (a failed save again: the error in flight says it first)
      pass
    raise
  manager.close()
  return state


def _initial_state(config: Any, model: AlexNet, tx: optax.GradientTransformation, steps: Steps,
                   manager: Any) -> tuple[TrainState, bool]:
  """The newest intact checkpoint's state, or a fresh one (from ``init_from`` if set)."""
  if manager.latest_step() is not None:
    # Straight into the mode's layout: every process reads its own devices' parts.
    template = place_state(create_train_state(config, model, tx), steps)
    state = checkpointing.restore_latest(manager, template, config)
    if state is not None:
      return state, True
  # init_from only seeds a fresh run; a resumed one has its own weights.
  return place_state(create_train_state(
      config, model, tx, params=_initial_params(config, model)), steps), False


@dataclasses.dataclass(frozen=True)
class Plan:
  """When the loop logs, evaluates and saves, derived once from the config."""
  num_steps: int  # the run's length, which the schedule spans
  end: int  # where this run stops: num_steps, or halt_at_step
  log_every: int
  eval_every: int  # 0: only at num_steps
  save_every: int  # 0: only where the loop evaluates or stops

  @classmethod
  def from_config(cls, config: Any, num_steps: int, steps_per_epoch: int) -> "Plan":
    return cls(num_steps=num_steps,
               end=min(num_steps, config.halt_at_step) if config.halt_at_step > 0 else num_steps,
               log_every=config.log_every_steps,
               eval_every=_every(config.eval_every_steps, config.eval_every_epochs,
                                 steps_per_epoch),
               save_every=_every(config.checkpoint_every_steps, 0, steps_per_epoch))

  def evaluates(self, step: int) -> bool:
    return step == self.num_steps or bool(self.eval_every and step % self.eval_every == 0)

  def saves(self, step: int, stopping: bool) -> bool:
    # Every evaluation is saved: the best-checkpoint policy ranks checkpoints by their eval.
    return (self.evaluates(step) or stopping or step == self.end
            or bool(self.save_every and step % self.save_every == 0))

  def logs(self, step: int, saving: bool) -> bool:
    return step % self.log_every == 0 or saving


class Meter:
  """The means of the step metrics since the last summary, and the images/s of training alone."""

  def __init__(self, batch_size: int, diverged: Callable[[str], BaseException]):
    self.batch_size, self.diverged = batch_size, diverged
    self.pending: list[dict] = []
    self.restart()

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self.pending.append(metrics)

  def restart(self) -> None:
    """Starts the throughput window afresh (after a save, an evaluation)."""
    self.window_start = time.time()

  def summary(self, step: int) -> dict[str, float]:
    """Means since the last summary; a NaN/inf loss stops the run (before any save of it)."""
    values, self.pending = jax.device_get(self.pending), []
    losses = np.array([m["train_loss"] for m in values])
    if not np.all(np.isfinite(losses)):
      bad = step - len(losses) + int(np.argmin(np.isfinite(losses))) + 1
      raise self.diverged(f"training loss became {losses[~np.isfinite(losses)][0]} at step {bad}; "
                          "stopping")
    summary = {k: float(np.mean([m[k] for m in values])) for k in ("train_loss", "train_top1")}
    summary["lr"] = float(values[-1]["lr"])
    summary["images_per_sec"] = (len(values) * self.batch_size
                                 / max(time.time() - self.window_start, 1e-9))
    self.restart()
    return summary


def _train(config: Any, workdir: str, state: TrainState, steps: Steps, manager: Any,
           feed: Feed, eval_source: Any, preprocess: host.Preprocess,
           num_steps: int, steps_per_epoch: int) -> TrainState:
  """The training loop from ``state`` to ``num_steps`` (or ``halt_at_step``, or a signal)."""
  main_process = jax.process_index() == 0
  plan = Plan.from_config(config, num_steps, steps_per_epoch)
  saver = checkpointing.Saver(manager, config)
  meter = Meter(config.batch_size, lambda what: checkpointing.diverged(what, manager))
  # The host's count mirrors state.step, which it could read only by waiting for the device.
  step = start_step = int(state.step)
  log = MetricLogger(workdir, enabled=main_process, tensorboard=config.tensorboard)
  log.resume_at(start_step)
  evaluate_and_adapt = _evaluator(config, steps, eval_source, preprocess, log)
  if main_process:
    print(f"{config.model} on {config.dataset}: {num_steps} steps of {config.batch_size} "
          f"({steps_per_epoch} per epoch), {config.parallel} over {steps.num_devices} device(s)",
          flush=True)
  start = time.time()
  with (preemption.Watcher() as watcher, log,
        contextlib.closing(feed(steps, start_step)) as batches):
    while step < plan.end:
      state, metrics = steps.train(state, next(batches))
      step += 1
      saver.poll()
      meter.add(metrics)
      stopping = watcher.reached(step - start_step)
      saving = plan.saves(step, stopping)
      if plan.logs(step, saving):
        summary = meter.summary(step)
        log.write(step, summary)
        if main_process:
          print(_progress(step, num_steps, summary, start, start_step), flush=True)
      eval_metrics = None
      if plan.evaluates(step):
        state, eval_metrics = evaluate_and_adapt(state, step)
      if saving:
        saver.save(step, state, eval_metrics)
        meter.restart()
      if stopping:
        break
    saver.close()
  if watcher.received and step < plan.end and main_process:
    print(f"stopped by {watcher.received} at step {step}/{num_steps}: checkpoint {step} is "
          f"saved in {manager.directory}; rerun the same command to resume", flush=True)
  return jax.device_get(state)


def _evaluator(config: Any, steps: Steps, eval_source: Any, preprocess: host.Preprocess,
               log: MetricLogger) -> Callable[[TrainState, int], tuple[TrainState, dict]]:
  """``(state, step) -> (state, metrics)``: evaluates, logs, and lets the plateau schedule see
  the result."""
  plateau = optim.plateau_rule(config) if config.schedule == "plateau" else None

  def evaluate_and_adapt(state: TrainState, step: int) -> tuple[TrainState, dict[str, float]]:
    metrics = evaluate(steps, state.params, eval_source, preprocess,
                       config.eval_batch_size or config.batch_size, config.prefetch,
                       **_loader_options(config))
    log.write(step, metrics)
    if jax.process_index() == 0:
      print(f"eval at step {step}: loss {metrics['eval_loss']:.4f}  "
            f"top1 {metrics['eval_top1']:.4f}  top5 {metrics['eval_top5']:.4f}  "
            f"({int(metrics['eval_count'])} examples)", flush=True)
    if plateau is not None:
      plateau_state, opt_state = optim.update_plateau(plateau, state.plateau, state.opt_state,
                                                      1.0 - metrics["eval_top1"])
      state = state.replace(plateau=plateau_state, opt_state=opt_state)
    return state, metrics
  return evaluate_and_adapt


def _initial_params(config: Any, model: AlexNet) -> Any | None:
  """Params from ``config.init_from`` (published weights, a checkpoint, .pth or .msgpack), or
  None."""
  if not config.init_from:
    return None
  return pretrained.load_weights(config.init_from, model, config.model,
                                 replace_head=config.init_replace_head, seed=config.seed,
                                 what="init_from",
                                 replace_head_option="config.init_replace_head=True")


def evaluate_checkpoint(config: Any, workdir: str, which: str | None = None) -> dict[str, float]:
  """``--mode eval``: evaluates the latest (or best) checkpoint of ``workdir``."""
  config_checks.validate(config)
  which = which or config.eval_checkpoint
  eval_source = create_source(config, train=False)
  _check_store(config, eval_source)
  preprocess = create_preprocess(config)
  model = create_model_from_config(config, eval_source.num_classes)
  tx = optim.optimizer_for_layout(config)
  steps = make_steps(config.parallel, model, tx, model_parallel=config.model_parallel,
                     normalize=preprocess.normalizer())
  manager = checkpointing.create_manager(workdir, config, training=False)
  try:
    state = checkpointing.restore(
        manager, place_state(create_train_state(config, model, tx), steps), which)
  finally:
    manager.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  metrics = evaluate(steps, state.params, eval_source, preprocess,
                     config.eval_batch_size or config.batch_size, config.prefetch,
                     **_loader_options(config))
  if jax.process_index() == 0:
    print(f"{which} checkpoint (step {int(state.step)}): " +
          "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
  return metrics
