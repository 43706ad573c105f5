"""One process of a multi-process run for test_multihost.py.

    python multihost_worker.py MODE NUM_PROCESSES PROCESS_ID PORT OUT_NPZ

Trains the narrow alexnet_small for a few steps on fixed global batches, of which this process
feeds its own rows, then evaluates one masked global batch. MODE is pmap, jit or hybrid (with 2
devices on the model axis). Process 0 writes the parameters and
the eval sums to OUT_NPZ. Run with ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``.
"""

import os
import sys

mode, num_processes, process_id, port, out = sys.argv[1:]
num_processes, process_id = int(num_processes), int(process_id)

from alexnet_jax import distributed  # noqa: E402

if num_processes > 1:
  distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                         heartbeat_timeout_seconds=10, initialization_timeout=120)

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # test_training, and the configs package
from test_training import _no_dropout_config  # noqa: E402

from alexnet_jax import training  # noqa: E402

GLOBAL_BATCH, STEPS, CLASSES = 8, 4, 10


def local_rows(batch):
  """This process's rows of a global batch, as the loader yields them."""
  size = GLOBAL_BATCH // jax.process_count()
  return {k: v[process_id * size:(process_id + 1) * size] for k, v in batch.items()}


def global_batch(seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((GLOBAL_BATCH, 28, 28, 1)).astype(np.float32),
          "label": rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)}


def main():
  config = _no_dropout_config(batch_size=GLOBAL_BATCH)
  model = training.create_model_from_config(config, CLASSES)
  tx = training.optim.create_optimizer(config, 10, STEPS)
  steps = training.make_steps(mode, model, tx, model_parallel=2 if mode == "hybrid" else 1)
  state = training.place_state(training.create_train_state(config, model, tx), steps)
  for step in range(STEPS):
    batch = jax.tree_util.tree_map(steps.put, local_rows(global_batch(step)))
    state, metrics = steps.train(state, batch)
  # 5 of the 8 rows are real: the sums must count each of them once over all processes.
  batch = global_batch(STEPS) | {"mask": np.arange(GLOBAL_BATCH) < 5}
  sums = steps.eval(state.params, jax.tree_util.tree_map(steps.put,
                                                         local_rows(batch)))
  params = jax.device_get(state.params)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, **flat, **{f"eval/{k}": np.asarray(v) for k, v in jax.device_get(sums).items()},
             train_loss=np.asarray(metrics["train_loss"]))
  print(f"process {process_id}: {jax.process_count()} processes, {jax.device_count()} devices, "
        f"{mode}, done", flush=True)


distributed.run_or_abort(main)
