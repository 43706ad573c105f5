"""Training: steps of every variant, exact resume, parallel-mode equality, checkpoints, eval."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("grain", reason="training needs the 'train' extra")

from alexnet_jax import VARIANTS, checkpointing, pretrained, training  # noqa: E402
from alexnet_jax.data import sources  # noqa: E402
from configs import default  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(conv_features=(8, 16, 16, 16, 8), hidden_width=32)


def tiny_config(**overrides):
  """The quickstart config with a narrow alexnet_small and few steps: seconds per run."""
  c = default.get_config()
  c.model_overrides.update(TINY)
  c.num_train_steps = 8
  c.batch_size = 16
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.warmup_epochs = 0.0
  c.tensorboard = False
  c.async_checkpointing = False
  c.update(overrides)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _max_rel(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()
                   / max(np.abs(np.asarray(y)).max(), 1e-12))  # zero-initialised biases
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_a_few_steps(variant):
  model = training.create_model(variant, num_classes=10)
  size = {"alexnet": 64}.get(variant, model.input_size)  # alexnet's adaptive pool takes 64x64
  config = tiny_config(model=variant)
  tx = training.optim.create_optimizer(config, 10, 10)
  state = training.create_train_state(config, model, tx)
  steps = training.make_steps("jit", model, tx)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((2, size, size, model.in_channels), np.float32),
           "label": rng.integers(0, 10, 2).astype(np.int32)}
  before = jax.device_get(state.params)
  losses = []
  state = training.place_state(state, steps)
  for _ in range(2):
    state, metrics = steps.train(state, jax.tree_util.tree_map(steps.put, batch))
    losses.append(float(metrics["train_loss"]))
  assert np.all(np.isfinite(losses)) and int(state.step) == 2
  assert _max_rel(jax.device_get(state.params), before) > 0


def test_bfloat16_compute_keeps_float32_params(tmp_path):
  state = training.train_and_evaluate(tiny_config(dtype="bfloat16", num_train_steps=2,
                                                  eval_every_steps=2), str(tmp_path))
  leaves = jax.tree_util.tree_leaves(state.params)
  assert all(x.dtype == np.float32 for x in leaves)
  assert all(np.isfinite(m.get("train_loss", 0.0)) for m in _metrics(tmp_path))


def test_cross_entropy_label_smoothing_and_topk():
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32))
  labels = np.array([0, 1])
  plain = np.asarray(training.cross_entropy(logits, labels))
  np.testing.assert_allclose(plain, -np.log([0.7, 0.3]), rtol=1e-6)
  smooth = np.asarray(training.cross_entropy(logits, labels, 0.3))
  targets = np.eye(3)[labels] * 0.7 + 0.1
  np.testing.assert_allclose(smooth, -(targets * logits).sum(-1), rtol=1e-6)
  np.testing.assert_array_equal(training.topk_correct(logits, labels, 1), [1, 0])
  np.testing.assert_array_equal(training.topk_correct(logits, labels, 2), [1, 1])


def test_quickstart_learns_digits(tmp_path):
  # The README quickstart cut to half its epochs (the full run reaches 95.0%; it needs about 2
  # epochs to leave chance level, then climbs fast, and this shorter schedule ends at 0.59):
  # the real model on real digits, well above chance (0.1).
  config = default.get_config()
  config.num_epochs = 3.0
  config.tensorboard = False
  training.train_and_evaluate(config, str(tmp_path))
  final = [m for m in _metrics(tmp_path) if "eval_top1" in m][-1]
  assert final["eval_count"] == 360
  assert final["eval_top1"] >= 0.5, final


def test_resume_is_exact(tmp_path):
  straight, halted = str(tmp_path / "straight"), str(tmp_path / "halted")
  a = training.train_and_evaluate(tiny_config(), straight)
  training.train_and_evaluate(tiny_config(halt_at_step=4), halted)
  assert [m["step"] for m in _metrics(halted) if "train_loss" in m] == [2, 4]
  b = training.train_and_evaluate(tiny_config(), halted)  # resumes at step 4
  _assert_trees_equal(a.params, b.params)
  _assert_trees_equal(a.opt_state, b.opt_state)
  drop = ("images_per_sec",)
  clean = lambda ms: [{k: v for k, v in m.items() if k not in drop} for m in ms]
  assert clean(_metrics(straight)) == clean(_metrics(halted))


def test_eval_counts_every_example_once():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (1001, 28, 28, 1), np.uint8)
  labels = rng.integers(0, 10, 1001)
  source = sources.ArraySource(images, labels, split="test", num_classes=10)
  config = tiny_config()
  model = training.create_model_from_config(config, 10)
  tx = training.optim.create_optimizer(config, 10, 10)
  state = training.create_train_state(config, model, tx)
  pre = training.create_preprocess(config)
  # uint8 batches, normalised on the device inside the eval step
  steps = training.make_steps("jit", model, tx, normalize=pre.normalizer())
  metrics = training.evaluate(steps, state.params, source, pre, 64)
  assert metrics["eval_count"] == 1001
  x = (images.astype(np.float32) / 255 - 0.5) / 0.5
  logits = np.asarray(model.apply({"params": state.params}, x))
  assert metrics["eval_top1"] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-6)


def test_ten_crop_eval_averages_softmax():
  config = tiny_config()
  model = training.create_model_from_config(config, 10)
  params = training.init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  views = rng.standard_normal((3, 10, 28, 28, 1), np.float32)
  labels = np.array([1, 2, 3], np.int32)
  batch = {"image": views, "label": labels, "mask": np.array([True, True, False])}
  steps = training.make_steps("jit", model, optax.identity())
  sums = steps.eval(params, jax.tree_util.tree_map(steps.put, batch))
  probs = jax.nn.softmax(model.apply({"params": params}, views.reshape(30, 28, 28, 1)))
  probs = np.asarray(probs).reshape(3, 10, -1).mean(1)
  nll = -np.log(probs[np.arange(3), labels])[:2].sum()
  assert float(sums["count"]) == 2
  assert float(sums["eval_loss"]) == pytest.approx(nll, rel=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config(learning_rate=1e12, schedule="constant", num_train_steps=40,
                       checkpoint_every_steps=1, eval_every_steps=0, eval_every_epochs=0.0)
  config.model_overrides.dropout_rate = 0.0
  with pytest.raises(FloatingPointError, match="training loss became"):
    training.train_and_evaluate(config, str(tmp_path))
  manager = checkpointing.create_manager(str(tmp_path), config)
  latest = manager.latest_step()
  model = training.create_model_from_config(config, 10)
  tx = training.optim.create_optimizer(config, 10, 40)
  state = checkpointing.restore(manager, training.create_train_state(config, model, tx))
  manager.close()
  assert latest is not None and latest < 40
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))


def test_init_from_pth_replaces_the_head_only_when_asked(tmp_path):
  torch = pytest.importorskip("torch")
  from alexnet_jax import torch_interop
  from alexnet_jax.torch_reference import torch_model

  net = torch_model("alexnet_small", num_classes=7, **TINY)
  pth = str(tmp_path / "pretrained.pth")
  torch.save(net.state_dict(), pth)
  config = tiny_config(init_from=pth, num_train_steps=2)
  with pytest.raises(ValueError, match="init_replace_head"):
    training.train_and_evaluate(config, str(tmp_path / "a"))
  config.init_replace_head = True
  model = training.create_model_from_config(config, 10)
  params = pretrained.load_weights(pth, model, "alexnet_small", replace_head=True)
  expected = torch_interop.params_from_torch(net.state_dict(), "alexnet_small", num_classes=7,
                                             **TINY)
  np.testing.assert_array_equal(params["conv1"]["kernel"], expected["conv1"]["kernel"])
  assert params["fc3"]["kernel"].shape == (32, 10)
  trained = training.train_and_evaluate(config, str(tmp_path / "b"))
  # Another run's workdir is a starting point too: its latest params, a fresh optimizer.
  config = tiny_config(init_from=str(tmp_path / "b"))
  from_run = pretrained.load_weights(config.init_from, model, "alexnet_small")
  _assert_trees_equal(from_run, trained.params)


EIGHT_DEVICES_PRELUDE = f"""
import sys, numpy as np, jax
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_training import tiny_config, _max_rel
from alexnet_jax import training
assert jax.device_count() == 8
"""


def _run_on_eight_devices(code):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES_PRELUDE + textwrap.dedent(code)],
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-4000:]


def _no_dropout_config(**overrides):
  config = tiny_config(**overrides)
  config.model_overrides.dropout_rate = 0.0  # masks depend on the device count
  return config


def test_pmap_jit_hybrid_and_one_device_give_the_same_parameters():
  _run_on_eight_devices("""
      results = {}
      for mode, devices, model_parallel in (
          ("pmap", jax.devices(), 1), ("jit", jax.devices(), 1), ("hybrid", jax.devices(), 2),
          ("hybrid", jax.devices()[:4], 2), ("jit", jax.devices()[:1], 1)):
        config = tiny_config(num_train_steps=5, batch_size=16)
        config.model_overrides.dropout_rate = 0.0
        model = training.create_model_from_config(config, 10)
        tx = training.optim.create_optimizer(config, 89, 5)
        steps = training.make_steps(mode, model, tx, devices=devices,
                                    model_parallel=model_parallel)
        state = training.place_state(training.create_train_state(config, model, tx), steps)
        src, _ = training.create_sources(config)
        it = training.loader.TrainLoader(src, training.create_preprocess(config), 16)
        for _ in range(5):
          state, _ = steps.train(state, jax.tree_util.tree_map(steps.put, next(it)))
        if mode == "hybrid":  # still split after the steps: fc1 and its momentum, not conv1
          momentum = [x for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
                      if jax.tree_util.keystr(p).endswith("['fc1']['kernel']")]
          assert len(momentum) == 1
          for kernel in [state.params["fc1"]["kernel"]] + momentum:
            assert kernel.addressable_shards[0].data.shape == (72, 32 // model_parallel)
          assert state.params["conv1"]["kernel"].sharding.is_fully_replicated
        results[mode, len(devices)] = jax.device_get(state.params)
      for key, params in results.items():
        rel = _max_rel(params, results["jit", 1])
        print(key, rel)
        assert rel <= 1e-5, (key, rel)
      # Dropout keys: 8 devices x 2 steps, all distinct, and the same again from the same seed.
      keys = jax.pmap(lambda s: training.step_rng(jax.random.PRNGKey(0), s), "data")
      draw = lambda: np.concatenate([keys(np.full(8, s, np.int32)) for s in (0, 1)])
      first = draw()
      assert len({k.tobytes() for k in first}) == 16
      np.testing.assert_array_equal(first, draw())
      print("ok")
  """)


@pytest.mark.parametrize("mode, model_parallel, message", [
    ("hybrid", 3, "model_parallel must be a positive divisor of the 1 devices; got 3"),
    ("jit", 2, "model_parallel=2 needs parallel='hybrid'; got 'jit'"),
    ("hybrid", 1, "hybrid mode needs at least 2 data-parallel groups"),
    ("threads", 1, "config.parallel must be one of ('pmap', 'jit', 'hybrid')"),
])
def test_make_steps_rejects_bad_parallel_settings(mode, model_parallel, message):
  model = training.create_model("alexnet_small", **TINY)
  with pytest.raises(ValueError) as error:
    training.make_steps(mode, model, optax.sgd(0.1), devices=jax.devices()[:1],
                        model_parallel=model_parallel)
  assert message in str(error.value)


def test_checkpoints_move_between_device_counts(tmp_path):
  # 8 devices (pmap) to step 3, 1 device to step 6, 8 devices (jit) to the end: the same
  # parameters as one device all the way.
  workdir = str(tmp_path / "moved")
  _run_on_eight_devices(f"""
      from test_training import _no_dropout_config
      config = _no_dropout_config(halt_at_step=3, parallel="pmap")
      training.train_and_evaluate(config, {workdir!r})
      print("ok")
  """)
  training.train_and_evaluate(_no_dropout_config(halt_at_step=6), workdir)
  _run_on_eight_devices(f"""
      from test_training import _no_dropout_config
      training.train_and_evaluate(_no_dropout_config(), {workdir!r})
      print("ok")
  """)
  manager = checkpointing.create_manager(workdir, tiny_config())
  assert manager.latest_step() == 8
  config = _no_dropout_config()
  model = training.create_model_from_config(config, 10)
  tx = training.optim.create_optimizer(config, 89, 8)
  moved = checkpointing.restore(manager, training.create_train_state(config, model, tx))
  manager.close()
  reference = training.train_and_evaluate(config, str(tmp_path / "straight"))
  assert _max_rel(moved.params, reference.params) <= 1e-5


def test_cli_trains_evaluates_and_plots(tmp_path):
  workdir = str(tmp_path / "run")
  flags = ["--config.num_train_steps=4", "--config.eval_every_steps=2",
           "--config.batch_size=16", "--config.model_overrides.hidden_width=32",
           "--config.model_overrides.conv_features=(8,16,16,16,8)", "--config.warmup_epochs=0"]
  run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                                      f"--workdir={workdir}", *flags, *args], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=600)
  out = run()
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 4/4" in out.stdout and "eval at step 4" in out.stdout
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{workdir}/tensorboard"))
  out = run("--mode=eval", "--config.eval_checkpoint=best")
  assert out.returncode == 0 and "best checkpoint (step" in out.stdout, out.stderr[-3000:]
  out = subprocess.run([sys.executable, "-m", "alexnet_jax.plot", workdir], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  bad = run("--config.parallel=threads")
  assert bad.returncode != 0 and "config.parallel must be one of" in bad.stderr
