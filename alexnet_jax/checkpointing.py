"""Orbax checkpoints of a training run, and starting points from other runs or PyTorch weights.

``WORKDIR/checkpoints`` holds the last ``config.keep_checkpoints`` checkpoints plus the best one by
eval top-1. Each holds the train state (params, optimizer state, step, RNG, plateau state), the
data iterator's position and the config. The state is saved unreplicated, so a checkpoint restores
on any number of devices.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax.models import AlexNet, init_params

WHICH = ("latest", "best")


def create_manager(workdir: str, config: Any) -> ocp.CheckpointManager:
  policies = ocp.checkpoint_managers
  keep_best = policies.BestN(get_metric_fn=lambda m: m["eval_top1"], n=1,
                             keep_checkpoints_without_metrics=False)
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=config.async_checkpointing,
      best_fn=lambda m: m["eval_top1"], best_mode="max",
      preservation_policy=policies.AnyPreservationPolicy(
          [policies.LatestN(n=max(1, config.keep_checkpoints)), keep_best]))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Mapping[str, int],
         config: Any, eval_metrics: Mapping[str, float] | None = None) -> None:
  """Saves in the background; the device-to-host copy is done before this returns."""
  if step in manager.all_steps():
    return
  metrics = {"eval_top1": float(eval_metrics["eval_top1"])} if eval_metrics else None
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(dict(data_state)),
      config=ocp.args.JsonSave(config.to_dict())), metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, template: Any, which: str = "latest") -> Any | None:
  """The state of the latest or best checkpoint shaped like ``template``, or None if none."""
  if which not in WHICH:
    raise ValueError(f"eval_checkpoint must be one of {WHICH}; got {which!r}")
  step = manager.latest_step() if which == "latest" else manager.best_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return restored["state"]


def _restore_params(path: str) -> Any:
  """``params`` of the latest checkpoint in a workdir, its ``checkpoints`` folder or a step."""
  path = os.path.abspath(path)
  for folder in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
      with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
          read_only=True)) as manager:
        step = manager.latest_step()
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      return state["state"]["params"]
  if os.path.isdir(os.path.join(path, "state")):
    return ocp.StandardCheckpointer().restore(os.path.join(path, "state"))["params"]
  raise FileNotFoundError(f"init_from={path!r} is neither a .pth/.pt/.msgpack file nor an Orbax "
                          "checkpoint (a workdir, its checkpoints folder or one step folder)")


def _torch_params(path: str, config: Any, model: AlexNet) -> Any:
  from alexnet_jax import torch_interop

  state_dict = torch_interop.load_torch_state_dict(path)
  from alexnet_jax.training import model_overrides

  overrides = model_overrides(config)
  overrides.setdefault("in_channels", model.in_channels)
  head = torch_interop.torch_layer_names(model, torch_interop.torch_naming(config.model))["fc3"]
  weight = state_dict.get(f"{head}.weight")
  if weight is not None:  # the file's own class count, so that only the head can differ
    overrides["num_classes"] = int(weight.shape[0])
  return torch_interop.params_from_torch(state_dict, config.model, **overrides)


def load_pretrained(path: str, config: Any, model: AlexNet) -> Any:
  """Params from ``path`` for ``model``; a different classifier head is replaced only when
  ``config.init_replace_head`` asks for it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from={path!r} does not exist")
  if path.endswith((".pth", ".pt")):
    params = _torch_params(path, config, model)
  elif path.endswith(".msgpack"):
    from alexnet_jax.convert import load_params
    params = load_params(path)
  else:
    params = _restore_params(path)
  from alexnet_jax.torch_interop import flax_param_shapes

  params = jax.tree_util.tree_map(np.asarray, params)
  fresh = flax_param_shapes(model)  # shapes only: nothing is initialised unless the head is
  shape = lambda t: jax.tree_util.tree_map(np.shape, t)
  if set(params) != set(fresh):
    raise ValueError(f"init_from={path!r} has layers {sorted(params)}, the model has "
                     f"{sorted(fresh)}; is config.model ({config.model}) the variant it was "
                     "trained as?")
  wrong = [k for k in fresh if shape(params[k]) != shape(fresh[k])]
  if wrong and wrong != ["fc3"]:
    raise ValueError(f"init_from={path!r}: shapes differ from {config.model}'s in "
                     f"{', '.join(f'{k} {shape(params[k])} vs {shape(fresh[k])}' for k in wrong)}")
  if wrong:
    if not config.init_replace_head:
      raise ValueError(
          f"init_from={path!r} has a {shape(params['fc3'])['kernel'][1]}-class head, the model "
          f"{model.num_classes} classes; set config.init_replace_head=True to start the head "
          "afresh")
    params["fc3"] = init_params(model, jax.random.PRNGKey(config.seed))["fc3"]
  return params
