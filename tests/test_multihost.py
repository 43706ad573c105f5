"""Multi-process runs on JAX's distributed runtime: real OS processes on 127.0.0.1, CPU backend,
gloo collectives, forced CPU devices per process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("grain", reason="training needs the 'train' extra")

from test_training import _max_rel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_FLAGS = ["--config.batch_size=16", "--config.model_overrides.hidden_width=32",
              "--config.model_overrides.conv_features=(8,16,16,16,8)",
              "--config.warmup_epochs=0", "--config.log_every_steps=2",
              "--config.async_checkpointing=False", "--config.tensorboard=False"]
# The survivor hears of it from JAX's runtime (missed heartbeats) or from a failed collective.
DEATH_NOTICES = ("another task died", "another process died first")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """``count`` copies of a command, each with ``devices`` CPU devices; output goes to files."""

  def __init__(self, tmp_path, name, count, devices, command):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    port = _free_port()
    self.logs = [tmp_path / f"{name}.{i}.log" for i in range(count)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(command(i, port), cwd=tmp_path, env=env, stdout=f,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

  def output(self, i):
    return self.logs[i].read_text()

  def wait(self, timeout=600):
    deadline = time.time() + timeout
    try:
      return [p.wait(max(1.0, deadline - time.time())) for p in self.procs]
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()

  def check(self, timeout=600):
    codes = self.wait(timeout)
    for i, code in enumerate(codes):
      assert code == 0, f"process {i} exited with {code}:\n{self.output(i)[-4000:]}"


def _worker(tmp_path, name, mode, processes, devices):
  out = tmp_path / f"{name}.npz"
  Processes(tmp_path, name, processes, devices, lambda i, port: [
      sys.executable, os.path.join(HERE, "multihost_worker.py"), mode, str(processes), str(i),
      str(port), str(out)]).check()
  return dict(np.load(out))


def test_two_processes_give_the_parameters_of_one_process_and_of_one_device(tmp_path):
  reference = _worker(tmp_path, "one_device", "jit", 1, 1)
  runs = {"2 processes x 2 devices, jit": _worker(tmp_path, "jit2x2", "jit", 2, 2),
          "2 processes x 2 devices, pmap": _worker(tmp_path, "pmap2x2", "pmap", 2, 2),
          "2 processes x 2 devices, hybrid (data 2 x model 2)": _worker(
              tmp_path, "hybrid2x2", "hybrid", 2, 2),
          "1 process x 4 devices, jit": _worker(tmp_path, "jit1x4", "jit", 1, 4)}
  params = lambda run: {k: v for k, v in run.items() if not k.startswith("eval/")}
  assert len(params(reference)) == 17  # 8 layers' kernels and biases, and the last train loss
  for name, run in runs.items():
    assert _max_rel(params(run), params(reference)) <= 1e-5, name
    # The masked eval batch has 5 real rows spread over the processes: each counted once.
    assert run["eval/count"] == 5, name
    np.testing.assert_allclose(run["eval/eval_loss"], reference["eval/eval_loss"], rtol=1e-5)


def _train_py_command(workdir, port, i, processes, *flags):
  distributed = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={i}", "--heartbeat_timeout=5"] if processes > 1 else [])
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *TINY_FLAGS,
          *distributed, *flags]


def _train_py(tmp_path, name, workdir, processes, devices, *flags):
  return Processes(tmp_path, name, processes, devices,
                   lambda i, port: _train_py_command(workdir, port, i, processes, *flags))


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}


def test_train_py_data_order_and_resume_on_any_process_count(tmp_path):
  from test_faults import _final  # a checkpoint's params, on this process's one device

  common = ["--config.num_train_steps=8", "--config.log_every_steps=1",
            "--config.eval_every_steps=4"]
  one = str(tmp_path / "one")  # 1 process x 4 devices, uninterrupted
  _train_py(tmp_path, "one", one, 1, 4, *common).check()
  halved = str(tmp_path / "halved")  # 2 processes x 2 devices to step 4 ...
  first = _train_py(tmp_path, "first", halved, 2, 2, *common, "--config.halt_at_step=4")
  first.check()
  other_modes = str(tmp_path / "other_modes")
  shutil.copytree(halved, other_modes)
  resumed = _train_py(tmp_path, "resumed", halved, 1, 4, *common)  # ... then 1 x 4 to the end
  resumed.check()
  four = str(tmp_path / "four")  # 4 processes x 1 device, 6 steps
  _train_py(tmp_path, "four", four, 4, 1, *common, "--config.halt_at_step=6").check()

  # The same batches whatever the topology: the same losses, and the same final params.
  assert "jit over 4 device(s)" in first.output(0) and "at step 4" in resumed.output(0)
  reference = _train_losses(one)
  assert sorted(reference) == list(range(1, 9))
  for name, run, steps in (("2 x 2 then 1 x 4", halved, range(1, 9)),
                           ("4 x 1", four, range(1, 7))):
    losses = _train_losses(run)
    for step in steps:
      assert losses[step] == pytest.approx(reference[step], rel=1e-5), (name, step)
  assert _max_rel(_final(halved, 8)["params"], _final(one, 8)["params"]) <= 1e-5

  # The step-4 checkpoint also resumes in the other parallel modes: pmap on 2 processes x 1
  # device, then hybrid (data 2 x model 2) on 1 x 4.
  second = _train_py(tmp_path, "second", other_modes, 2, 1, *common, "--config.halt_at_step=6",
                     "--config.parallel=pmap")
  second.check()
  third = _train_py(tmp_path, "third", other_modes, 1, 4, *common, "--config.parallel=hybrid",
                    "--config.model_parallel=2")
  third.check()
  assert "at step 4" in second.output(0) and "pmap over 2 device(s)" in second.output(0)
  assert "at step 6" in third.output(0) and "hybrid over 4 device(s)" in third.output(0)
  for run in (first, second):  # only process 0 reports
    assert "step " not in run.output(1) and "eval at" not in run.output(1)
  with open(os.path.join(other_modes, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]  # each line once (train, then eval at 4 and 8)
  with open(os.path.join(other_modes, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval_count" in r]
  assert [r["eval_count"] for r in evals] == [360, 360]  # digits' test split, each image once
  assert sorted(os.listdir(os.path.join(other_modes, "checkpoints"))) == ["4", "6", "8"]


LONG_RUN = ["--config.num_train_steps=100000", "--config.eval_every_steps=0"]


@pytest.mark.parametrize("victim", [1, 0])  # a worker, and the coordinator
def test_when_a_process_is_killed_the_other_stops_with_a_clear_error(tmp_path, victim):
  run = _train_py(tmp_path, "run", str(tmp_path / "run"), 2, 2, *LONG_RUN)
  deadline = time.time() + 300
  while "step 4/" not in run.output(0):
    assert time.time() < deadline and all(p.poll() is None for p in run.procs), run.output(0)
    time.sleep(0.5)
  run.procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.time()
  code = run.procs[1 - victim].wait(timeout=120)
  stopped_after = time.time() - killed_at
  run.wait()
  assert code != 0
  assert any(n in run.output(1 - victim) for n in DEATH_NOTICES), run.output(1 - victim)[-3000:]
  assert stopped_after < 60, stopped_after  # heartbeat timeout 5 s, and JAX's own checks


def test_when_a_process_raises_the_other_stops_too(tmp_path):
  missing = "/missing/alexnet.pth"  # e.g. a file that only process 0's machine has
  run = Processes(tmp_path, "run", 2, 2, lambda i, port: _train_py_command(
      str(tmp_path / "run"), port, i, 2, *LONG_RUN, *([f"--config.init_from={missing}"] * i)))
  codes = run.wait(timeout=120)
  assert codes[1] == 1 and f"init_from={missing!r} does not exist" in run.output(1)
  assert "process 1 of 2 failed" in run.output(1)
  assert codes[0] != 0, run.output(0)[-3000:]


@pytest.fixture
def no_cluster_env(monkeypatch):
  from alexnet_jax import distributed
  for name in distributed.ENV_VARS.values():
    monkeypatch.delenv(name, raising=False)
  return distributed


def test_initialize_does_nothing_unless_asked(no_cluster_env):
  assert no_cluster_env.initialize() is False


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(num_processes=2), {}, "got num_processes but not coordinator_address, process_id"),
    ({}, {"JAX_PROCESS_ID": "1"}, "got process_id but not coordinator_address, num_processes"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "$JAX_NUM_PROCESSES must be an integer; got 'two'"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), {},
     "process_id must be in [0, 1] for 2 processes; got 2"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=0, process_id=0), {},
     "num_processes must be >= 1; got 0"),
])
def test_initialize_rejects_incomplete_or_bad_settings(no_cluster_env, monkeypatch, kwargs, env,
                                                       message):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError) as error:
    no_cluster_env.initialize(**kwargs)
  assert message in str(error.value)
