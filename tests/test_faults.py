"""Faults: kills, signals, damaged checkpoints, config drift, a full disk and bad input.

Real ``train.py`` processes and real signals; each test asserts the outcome and, where training
goes on, that the final parameters and optimizer state equal an uninterrupted run's bit for bit.
"""

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("grain", reason="training needs the 'train' extra")

from test_multihost import Processes  # noqa: E402
from test_training import _assert_trees_equal, tiny_config  # noqa: E402

from alexnet_jax import checkpointing, config_checks, convert, training  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS, EVERY, LONG = 60, 10, 100
# Wide enough dense layers (an 8 MB checkpoint) that a save lasts long enough to be killed in.
FLAGS = ["--config.batch_size=16", "--config.model_overrides.hidden_width=1024",
         "--config.model_overrides.conv_features=(8,16,16,16,8)", "--config.warmup_epochs=0",
         "--config.log_every_steps=1", "--config.tensorboard=False",
         f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}",
         "--config.eval_every_steps=0", "--config.eval_every_epochs=0"]


def _no_traceback_of_ours(out):
  """Orbax's and TensorStore's threads may print their own; ours must not."""
  return not re.search(r'File ".*(train\.py|alexnet_jax/)', out)


def _command(workdir, *flags):
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *FLAGS, *flags]


def _start(tmp_path, name, workdir, *flags):
  log = open(tmp_path / f"{name}.log", "w")
  proc = subprocess.Popen(_command(workdir, *flags), cwd=tmp_path, stdout=log,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  proc.log = tmp_path / f"{name}.log"
  return proc


def _run(tmp_path, name, workdir, *flags, timeout=300):
  proc = _start(tmp_path, name, workdir, *flags)
  proc.wait(timeout)
  return proc.returncode, proc.log.read_text()


def _wait_for(predicate, what, timeout=300, procs=()):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, f"timed out waiting for {what}"
    assert all(p.poll() is None for p in procs), f"exited while waiting for {what}"
    time.sleep(0.05)


def _last_step(text):
  steps = [int(line.split()[1].split("/")[0]) for line in text.splitlines()
           if line.startswith("step ")]
  return steps[-1] if steps else 0


def _final(workdir, step=STEPS):
  """The params and optimizer state of a workdir's checkpoint ``step``, as numpy."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  on_this_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # from any topology
  with checkpointing.ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(path).item_metadata
    stored = stored.tree if hasattr(stored, "tree") else stored
    state = checkpointer.restore(path, jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_this_device), stored))
  return {"params": state["params"], "opt_state": state["opt_state"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run's final state."""
  tmp = tmp_path_factory.mktemp("reference")
  code, out = _run(tmp, "reference", str(tmp / "run"))
  assert code == 0, out[-3000:]
  return _final(str(tmp / "run"))


def _resume_and_compare(tmp_path, workdir, reference):
  code, out = _run(tmp_path, "resume", workdir)
  assert code == 0, out[-3000:]
  assert "resumed from" in out, out[-3000:]
  _assert_trees_equal(_final(workdir), reference)
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))
  return out


def test_kill_9_at_a_random_step_then_resume_exactly(tmp_path, reference):
  workdir = str(tmp_path / "run")
  at = random.Random().randint(EVERY + 1, STEPS - 5)
  proc = _start(tmp_path, "killed", workdir)
  # Past the step and a complete checkpoint to resume from (the async save of step 10 can
  # still be in flight at step 11).
  saved = lambda: any(d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints")))
  _wait_for(lambda: _last_step(proc.log.read_text()) >= at and saved(), f"step {at}",
            procs=[proc])
  proc.send_signal(signal.SIGKILL)
  proc.wait(60)
  killed_at = _last_step(proc.log.read_text())
  assert killed_at < STEPS, f"finished before the kill (at step {at})"
  _resume_and_compare(tmp_path, workdir, reference)


def test_kill_9_during_an_async_save_then_resume_exactly(tmp_path, reference):
  workdir = str(tmp_path / "run")
  tmp_dirs = lambda: glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))
  for attempt in range(3):  # a save can end between seeing it and the kill: then again
    proc = _start(tmp_path, f"killed{attempt}", workdir)  # async saves: the default
    # A save after the first complete one, so that there is a checkpoint to resume from.
    _wait_for(lambda: (tmp_dirs() and any(d.isdigit() for d in os.listdir(
        os.path.join(workdir, "checkpoints")))) or proc.poll() is not None, "a save to begin")
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    if tmp_dirs():
      break
  assert tmp_dirs(), "no kill landed during a save"
  _resume_and_compare(tmp_path, workdir, reference)


def test_sigint_and_sigterm_set_the_flag_once_then_stop_at_once():
  from alexnet_jax import preemption
  for signum in (signal.SIGINT, signal.SIGTERM):
    before = signal.getsignal(signum)
    with preemption.Watcher() as watcher:
      assert not watcher.reached(1)
      os.kill(os.getpid(), signum)
      time.sleep(0.1)  # the handler runs between bytecodes of the main thread
      assert watcher.reached(2) and watcher.received == signum.name
      assert signal.getsignal(signum) is before  # a second signal acts as without the watcher
    assert signal.getsignal(signum) is before


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path, reference):
  signum = signal.SIGTERM
  workdir = str(tmp_path / "run")
  proc = _start(tmp_path, "stopped", workdir)
  _wait_for(lambda: _last_step(proc.log.read_text()) >= EVERY + 3, "training", procs=[proc])
  seen = _last_step(proc.log.read_text())
  proc.send_signal(signum)
  sent = time.time()
  code = proc.wait(60)
  took = time.time() - sent
  out = proc.log.read_text()
  assert code == 0, out[-3000:]
  assert took < 60
  print(f"SIGTERM, one process: saved and exited in {took:.1f} s")
  line = [ln for ln in out.splitlines() if ln.startswith(f"stopped by {signum.name}")]
  assert len(line) == 1, out[-3000:]
  stopped = int(line[0].split("at step ")[1].split("/")[0])
  assert seen <= stopped < STEPS and f"checkpoint {stopped} is saved" in line[0]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
  out = _resume_and_compare(tmp_path, workdir, reference)
  assert f"at step {stopped}" in out  # no step lost


def _two_processes(tmp_path, name, workdir, *flags):
  return Processes(tmp_path, name, 2, 1, lambda i, port: _command(
      workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--process_id={i}", "--heartbeat_timeout=10", *flags))


def test_sigterm_to_two_processes_saves_the_same_step_on_both(tmp_path):
  steps = f"--config.num_train_steps={LONG}"  # the processes step in turn: a long enough run
  straight = _two_processes(tmp_path, "straight", str(tmp_path / "straight"), steps)
  straight.check()
  workdir = str(tmp_path / "run")
  run = _two_processes(tmp_path, "stopped", workdir, steps)
  _wait_for(lambda: _last_step(run.output(0)) >= EVERY + 3, "training", procs=run.procs)
  for p in run.procs:
    p.send_signal(signal.SIGTERM)
  sent = time.time()
  codes = run.wait(timeout=90)
  took = time.time() - sent
  assert codes == [0, 0], (run.output(0)[-3000:], run.output(1)[-3000:])
  assert took < 60
  print(f"SIGTERM, two processes: both saved and exited in {took:.1f} s")
  line = [ln for ln in run.output(0).splitlines() if ln.startswith("stopped by preemption")]
  assert len(line) == 1, run.output(0)[-3000:]
  stopped = int(line[0].split("at step ")[1].split("/")[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
  assert stopped < LONG, stopped
  # Damage the preempted checkpoint too: both processes must agree to go back to the one before.
  _flip_one_bit(_largest_data_file(os.path.join(workdir, "checkpoints", str(stopped))))
  before = max(s for s in range(EVERY, stopped, EVERY))
  resumed = _two_processes(tmp_path, "resumed", workdir, steps)
  resumed.check()
  assert f"checkpoint {stopped} in" in resumed.output(0) and "file-changed" in resumed.output(0)
  assert f"at step {before}" in resumed.output(0)
  assert os.listdir(os.path.join(workdir, "checkpoints", checkpointing.CORRUPT_DIR)) == [
      f"{stopped}-file-changed"]
  _assert_trees_equal(_final(workdir, LONG), _final(str(tmp_path / "straight"), LONG))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints, in this process: a run to step 8 of 12 (checkpoints 4 and 8), damaged.


def _config(**overrides):
  return tiny_config(**{"num_train_steps": 12, "checkpoint_every_steps": 4, "eval_every_steps": 0,
                        "eval_every_epochs": 0.0, **overrides})


@pytest.fixture(scope="module")
def halted(tmp_path_factory):
  """(a workdir halted at step 8, the final state of an uninterrupted run to 12)."""
  tmp = tmp_path_factory.mktemp("halted")
  reference = training.train_and_evaluate(_config(), str(tmp / "straight"))
  training.train_and_evaluate(_config(halt_at_step=8), str(tmp / "halted"))
  return str(tmp / "halted"), reference


def _largest_data_file(step_dir):
  return max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)


def _flip_one_bit(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def _flip_unlisted(step_dir):
  """A bit flipped after the file list was lost: for the array checksums alone to find."""
  os.remove(os.path.join(step_dir, checkpointing.FILE_LIST))
  _flip_one_bit(_largest_data_file(step_dir))


# damage: (how, the reason the checkpoint is moved aside for)
DAMAGE = {
    "file-deleted": (lambda d: os.remove(_largest_data_file(d)), "file-missing"),
    "file-zeroed": (lambda d: open(_largest_data_file(d), "r+b").write(
        bytes(os.path.getsize(_largest_data_file(d)))), "file-changed"),
    "file-truncated": (lambda d: os.truncate(_largest_data_file(d),
                                             os.path.getsize(_largest_data_file(d)) // 2),
                       "file-size"),
    "bit-flipped": (lambda d: _flip_one_bit(_largest_data_file(d)), "file-changed"),
    "bit-flipped-unlisted": (_flip_unlisted, "checksum-mismatch"),
    "manifest-deleted": (lambda d: os.remove(f"{d}/state/manifest.ocdbt"), "file-missing"),
    "item-deleted": (lambda d: shutil.rmtree(f"{d}/state"), "state-missing"),
}


def _damaged_copy(halted, tmp_path, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(halted[0], workdir)
  DAMAGE[damage][0](os.path.join(workdir, "checkpoints", "8"))
  return workdir


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_goes_on(
    halted, tmp_path, capsys, damage):
  workdir = _damaged_copy(halted, tmp_path, damage)
  state = training.train_and_evaluate(_config(), workdir)
  err = capsys.readouterr().err
  reason = DAMAGE[damage][1]
  assert f"checkpoint 8 in {workdir}/checkpoints is damaged ({reason})" in err, err[-3000:]
  corrupt = os.listdir(os.path.join(workdir, "checkpoints", checkpointing.CORRUPT_DIR))
  assert corrupt == [f"8-{reason}"], corrupt
  _assert_trees_equal(state.params, halted[1].params)
  _assert_trees_equal(state.opt_state, halted[1].opt_state)
  # The next rerun finds an intact latest checkpoint and does not trip over the old one.
  training.train_and_evaluate(_config(), workdir)
  assert "damaged" not in capsys.readouterr().err
  assert len(os.listdir(os.path.join(workdir, "checkpoints", checkpointing.CORRUPT_DIR))) == 1


def test_eval_of_a_damaged_checkpoint_fails_with_one_line(halted, tmp_path):
  workdir = _damaged_copy(halted, tmp_path, "bit-flipped-unlisted")
  with pytest.raises(checkpointing.DamagedCheckpoint, match="checksum-mismatch"):
    training.evaluate_checkpoint(_config(), workdir)
  code, out = _run(tmp_path, "eval", workdir, "--mode=eval",
                   "--config.model_overrides.hidden_width=32")  # the tiny model of _config
  lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert code == 1 and len(lines) == 1 and _no_traceback_of_ours(out), out[-3000:]
  assert "checkpoint 8 in" in lines[0] and "damaged (checksum-mismatch)" in lines[0]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # eval moves nothing


def test_a_changed_config_is_refused_or_allowed(halted, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(halted[0], workdir)
  with pytest.raises(config_checks.ConfigChanged) as error:
    training.train_and_evaluate(_config(batch_size=32, seed=7), workdir)
  message = str(error.value)
  assert "batch_size: 16 -> 32" in message and "seed: 0 -> 7" in message
  assert "allow_config_change=True" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]  # untouched
  with pytest.raises(config_checks.ConfigChanged, match="num_train_steps: 12 -> 10"):
    training.train_and_evaluate(_config(num_train_steps=10), workdir)
  # Logging, checkpointing and eval frequency, and a longer run, are not changes of the run.
  training.train_and_evaluate(_config(log_every_steps=3, keep_checkpoints=5, halt_at_step=9,
                                      eval_every_steps=9), workdir)
  assert "changed config" not in capsys.readouterr().err
  training.train_and_evaluate(_config(label_smoothing=0.1, allow_config_change=True), workdir)
  err = capsys.readouterr().err
  assert "resuming step 9 with a changed config" in err and "label_smoothing: 0.0 -> 0.1" in err


def test_a_non_finite_state_is_never_saved(tmp_path):
  config = _config()
  model = training.create_model_from_config(config, 10)
  tx = training.optim.create_optimizer(config, 10, 12)
  state = training.create_train_state(config, model, tx)
  params = jax.tree_util.tree_map(np.asarray, state.params)
  params["fc2"]["kernel"] = params["fc2"]["kernel"].copy()
  params["fc2"]["kernel"][3, 4] = np.nan
  manager = checkpointing.create_manager(str(tmp_path), config)
  with pytest.raises(FloatingPointError, match=r"NaN or inf at step 3.*none \(no checkpoint"):
    checkpointing.save(manager, 3, state.replace(params=params), config)
  manager.close()
  assert manager.latest_step() is None


def test_the_checksum_is_the_same_on_any_number_of_devices():
  from test_training import _run_on_eight_devices
  _run_on_eight_devices("""
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from alexnet_jax import checkpointing
      x = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
      mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
      split = jax.device_put(x, NamedSharding(mesh, P("a", "b")))
      assert len(split.addressable_shards) == 8
      one = jax.device_put(x, jax.devices()[3])
      assert checkpointing.fingerprint({"w": split}) == checkpointing.fingerprint({"w": one})
      print("ok")
  """)


def test_one_bit_changes_the_checksum():
  x = np.arange(1000, dtype=np.float32).reshape(10, 100)
  y = x.copy()
  y.view(np.uint32)[7, 31] ^= 1 << 30
  z = x.copy()
  z[[2, 3]] = z[[3, 2]]  # two rows swapped: the same values, other positions
  sums = [checkpointing.fingerprint({"w": a})[0]["w"] for a in (x, y, z)]
  assert len(set(sums)) == 3


# ----------------------------------------------------------------------------------------------
# A full disk: the async save fails and the run stops at once, the previous checkpoint intact.


@pytest.fixture
def small_disk(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  mount = tmp_path / "run" / "checkpoints"
  mount.mkdir(parents=True)
  # Room for two 8 MB checkpoints, not three (keep_checkpoints keeps them all).
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  yield str(tmp_path / "run")
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_failed_async_save_stops_the_run_at_once(tmp_path, small_disk):
  code, out = _run(tmp_path, "full", small_disk, "--config.async_checkpointing=True",
                   "--config.keep_checkpoints=100", "--config.num_train_steps=400",
                   "--config.checkpoint_every_steps=100")
  errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert code == 1 and len(errors) == 1 and _no_traceback_of_ours(out), out[-3000:]
  assert "No space left on device" in errors[0] or "ENOSPC" in errors[0], errors[0]
  failed = int(errors[0].split("saving checkpoint ")[1].split()[0])
  assert _last_step(out) < failed + 100, "reported only at the next save"
  intact = sorted(int(s) for s in os.listdir(os.path.join(small_disk, "checkpoints"))
                  if s.isdigit())
  assert intact and intact[-1] < failed
  assert f"newest complete checkpoint is step {intact[-1]}" in errors[0]
  config = tiny_config()
  config.model_overrides.hidden_width = 1024
  model = training.create_model_from_config(config, 10)
  tx = training.optim.create_optimizer(config, 10, 400)
  manager = checkpointing.create_manager(small_disk, config, training=False)
  restored = checkpointing.restore_step(manager, intact[-1],
                                        training.create_train_state(config, model, tx))
  manager.close()
  assert int(restored.step) == intact[-1]  # and its checksums verified


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each.


@pytest.mark.parametrize("fields, message", [
    ({"keep_checkpoints": -1}, "config.keep_checkpoints must be a positive integer; got -1"),
    ({"checkpoint_every_steps": -5}, "config.checkpoint_every_steps must be an integer >= 0"),
    ({"batch_size": 0}, "config.batch_size must be a positive integer; got 0"),
    ({"log_every_steps": 0}, "config.log_every_steps must be a positive integer"),
    ({"num_train_steps": -5}, "config.num_train_steps must be a positive integer, or -1"),
    ({"num_train_steps": -1, "num_epochs": 0.0},
     "config.num_epochs must be a positive number when num_train_steps is -1; got 0.0"),
    ({"prefetch": 0}, "config.prefetch must be a positive integer"),
    ({"model": "alexnet9"}, "config.model must be one of ('alexnet'"),
    ({"parallel": "threads"}, "config.parallel must be one of ('pmap', 'jit', 'hybrid')"),
    ({"dtype": "float16"}, "config.dtype must be one of ('float32', 'bfloat16')"),
    ({"model_parallel": 2}, "config.model_parallel=2 needs config.parallel='hybrid'"),
    ({"train_preset": "big"}, "config.train_preset must be one of"),
    ({"eval_preset": "paper"}, "config.eval_preset must be one of"),
    ({"schedule": "linear"}, "config.schedule must be one of"),
])
def test_bad_config_values_are_named(fields, message):
  config = tiny_config(**fields)
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  assert message in str(error.value)


def test_settings_are_checked_before_the_sources_are_built(tmp_path):
  # A missing folder would be reported first if the sources were built before the checks.
  config = tiny_config(parallel="nonsense", dataset="folder:/nonexistent")
  with pytest.raises(ValueError, match="config.parallel must be one of"):
    training.train_and_evaluate(config, str(tmp_path))


def test_every_shipped_config_is_valid():
  import importlib
  for name in ("default", "synthetic", "cifar10", "imagenette", "imagenet_paper",
               "imagenet_torchvision"):
    config_checks.validate(importlib.import_module(f"configs.{name}").get_config())


def test_a_batch_larger_than_the_data_names_both(tmp_path):
  with pytest.raises(ValueError, match=r"config.batch_size=4096 is larger than the 1437 "
                                       r"examples of digits split 'train'"):
    training.train_and_evaluate(tiny_config(batch_size=4096), str(tmp_path))


@pytest.mark.parametrize("flag, message", [
    ("--config.keep_checkpoints=-1",
     "error: config.keep_checkpoints must be a positive integer; got -1"),
    ("--config.keep_checkpoint=3", "error: the config has no field 'keep_checkpoint' (set by a "
                                   "--config.FIELD=... override)"),
    ("--config.dataset=imagenet2013", "error: unknown dataset 'imagenet2013': config.dataset is"),
])
def test_train_py_reports_a_bad_value_in_one_line(tmp_path, flag, message):
  code, out = _run(tmp_path, "bad", str(tmp_path / "run"), flag)
  assert code == 1 and "Traceback" not in out, out[-3000:]
  errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), out[-3000:]
  assert len(out.splitlines()) < 20, out[-3000:]  # no list of every TFDS dataset


def _malformed_files(tmp_path):
  torch = pytest.importorskip("torch")
  good = tmp_path / "good.pth"
  torch.save({"w": torch.zeros(3)}, good)
  data = good.read_bytes()
  files = {"truncated.pth": data[:len(data) // 2], "empty.pth": b"",
           "raw-pickle.pth": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins"
                             b"\x94\x8c\x04eval\x94\x93\x94.",
           "garbage.msgpack": b"\xc1\xc1 not msgpack"}
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
  return [str(tmp_path / name) for name in files]


@pytest.mark.parametrize("index", range(4))
def test_convert_and_init_from_reject_malformed_files_in_one_line(tmp_path, capsys, index):
  path = _malformed_files(tmp_path)[index]
  out = str(tmp_path / ("out.pth" if path.endswith(".msgpack") else "out.msgpack"))
  assert convert.main([path, out, "--variant", "alexnet_small"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {path}"), err
  assert not os.path.exists(out)
  config = tiny_config(init_from=path)
  with pytest.raises(ValueError, match=f"^{path}"):
    training.train_and_evaluate(config, str(tmp_path / "run"))
