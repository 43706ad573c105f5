"""Every command run without its extra says in one line which extra to install: the commands run
in subprocesses where the extra's modules cannot be imported, as after a plain ``pip install .``.
"""

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from alexnet_jax import extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Makes the modules named in HIDDEN (by top level) unimportable, as if not installed: every finder
# is asked through a wrapper that finds nothing for them (and find_spec says None, as for a module
# that is not there). Then runs the command as __main__.
PRELUDE = textwrap.dedent("""
    import runpy, sys
    class _Hide:
      def __init__(self, inner): self.inner = inner
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN: return None
        return self.inner.find_spec(name, path, target)
      def invalidate_caches(self): getattr(self.inner, "invalidate_caches", lambda: None)()
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    sys.argv = [TARGET] + ARGS
    if TARGET.endswith(".py"):
      runpy.run_path(TARGET, run_name="__main__")
    else:
      runpy.run_module(TARGET, run_name="__main__", alter_sys=True)
""")


def _run(target, args, hidden):
  code = f"HIDDEN, TARGET, ARGS = {set(hidden)!r}, {target!r}, {list(args)!r}\n" + PRELUDE
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def _assert_says_extra(out, command, extra, modules):
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  named = ", ".join(repr(m) for m in modules)
  assert lines[-1] == (f"error: {command} needs the {extra!r} extra (No module named {named}): "
                       f"pip install 'alexnet-jax[{extra}]'"), out.stderr[-3000:]


@pytest.fixture
def files(tmp_path):
  """An image path, a .pth file and a workdir with metrics: only their existence matters here."""
  (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8 not decoded: the command stops first")
  (tmp_path / "w.pth").write_bytes(b"not read: torch is imported first")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 2.3}))
  return tmp_path


# (target, args, hidden modules, command as named, extra, the missing modules it names)
CASES = {
    # A plain `pip install .`: the two reports.
    "train": ("train.py", ["--workdir", "{tmp}/w"], ["ml_collections", "grain", "PIL"],
              "python train.py", "train", ["ml_collections"]),
    "predict": ("alexnet_jax.predict", ["{tmp}/cat.jpg"],
                ["PIL", "simplejpeg", "cv2", "grain", "tensorflow", "torch"],
                "python -m alexnet_jax.predict", "train", ["PIL", "simplejpeg", "cv2"]),
    # Past the flags: the library's own imports, then those of a run (the digits' sklearn).
    "train_library": ("train.py", ["--workdir", "{tmp}/w"], ["grain"], "python train.py",
                      "train", ["grain"]),
    "train_run": ("train.py", ["--workdir", "{tmp}/w", "--config.num_train_steps=1"],
                  ["sklearn"], "python train.py", "train", ["sklearn"]),
    "predict_pth": ("alexnet_jax.predict", ["{tmp}/cat.jpg", "--weights", "{tmp}/w.pth"],
                    ["torch"], "python -m alexnet_jax.predict", "torch", ["torch"]),
    "convert": ("alexnet_jax.convert", ["{tmp}/w.pth", "{tmp}/w.msgpack", "--variant", "alexnet"],
                ["torch"], "python -m alexnet_jax.convert", "torch", ["torch"]),
    "export_pth": ("alexnet_jax.export", ["--variant", "alexnet", "--weights", "{tmp}/w.pth",
                                          "--out", "{tmp}/a.bin"],
                   ["torch"], "python -m alexnet_jax.export", "torch", ["torch"]),
    "parity": ("alexnet_jax.parity", [], ["torch"], "python -m alexnet_jax.parity", "torch",
               ["torch"]),
    "plot": ("alexnet_jax.plot", ["{tmp}/run"], ["matplotlib"], "python -m alexnet_jax.plot",
             "train", ["matplotlib"]),
    "bench_train": ("alexnet_jax.bench", ["train"], ["torch"], "python -m alexnet_jax.bench",
                    "torch", ["torch"]),
    "bench_data": ("alexnet_jax.bench", ["data"], ["PIL", "grain"], "python -m alexnet_jax.bench",
                   "train", ["PIL", "grain"]),
    "prepare": ("alexnet_jax.prepare", ["digits", "{tmp}/store", "--mode", "shorter"],
                ["grain", "array_record", "simplejpeg"], "python -m alexnet_jax.prepare",
                "train", ["grain", "array_record", "simplejpeg"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_command_without_its_extra_names_it_in_one_line(case, files):
  target, args, hidden, command, extra, modules = CASES[case]
  out = _run(target, [a.format(tmp=files) for a in args], hidden)
  _assert_says_extra(out, command, extra, modules)


def test_a_missing_module_of_no_extra_keeps_its_traceback(capsys):
  with pytest.raises(ModuleNotFoundError):
    with extras.needed_by("cmd"):
      import alexnet_jax_no_such_module  # noqa: F401  pylint: disable=import-outside-toplevel
  with pytest.raises(ModuleNotFoundError):  # no name: not known to be an extra's
    with extras.needed_by("cmd"):
      raise ModuleNotFoundError("No module named 'grain'")
  with pytest.raises(ImportError):  # a module that is there but fails to import
    with extras.needed_by("cmd"):
      raise ImportError("cannot import name 'x' from 'grain'", name="grain")
  assert capsys.readouterr().err == ""


def test_needed_by_as_decorator_and_context_manager(capsys):
  @extras.needed_by("python -m tool")
  def main():
    raise ModuleNotFoundError("No module named 'orbax.checkpoint'", name="orbax.checkpoint")

  for _ in range(2):  # reusable: a decorator's context is made anew per call
    with pytest.raises(SystemExit) as e:
      main()
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        "error: python -m tool needs the 'train' extra (No module named 'orbax.checkpoint'): "
        "pip install 'alexnet-jax[train]'\n")
  with extras.needed_by("cmd"):
    pass


def test_require_names_every_missing_extra_without_importing(monkeypatch, capsys):
  real = importlib.util.find_spec
  gone = {"torch", "grain", "cv2"}
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name.partition(".")[0] in gone else real(name, *a))
  extras.require("cmd", "pytest")  # there
  with pytest.raises(SystemExit) as e:
    extras.require("cmd", "torch", "pytest", "grain", "cv2")
  assert e.value.code == 1
  assert capsys.readouterr().err == (
      "error: cmd needs the 'torch' and 'train' extras (No module named 'torch', 'grain', 'cv2'): "
      "pip install 'alexnet-jax[torch,train]'\n")
  with pytest.raises(ValueError, match="numpy"):  # a core dependency: a slip in the caller
    extras.require("cmd", "numpy")


def test_describe():
  assert extras.describe("cmd", ValueError("bad")) == "error: bad"
  assert extras.describe("cmd", ModuleNotFoundError("x", name="numpy.linalg")) == "error: x"
  assert extras.describe("cmd", ModuleNotFoundError("x", name="tensorflow.io")) == (
      "error: cmd needs the 'tfds' extra (No module named 'tensorflow.io'): "
      "pip install 'alexnet-jax[tfds]'")


def test_the_extras_modules_are_pyproject_extras_requirements():
  tomllib = pytest.importorskip("tomllib")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert extras.DISTRIBUTION == project["name"]
  declared = project["optional-dependencies"]
  assert set(extras.EXTRA_MODULES) == set(declared)
  norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  provided = {}  # installed distribution -> its top-level modules
  for module, dists in importlib.metadata.packages_distributions().items():
    for dist in dists:
      provided.setdefault(norm(dist), set()).add(module)
  for extra, requirements in declared.items():
    own = {norm(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}
    own.discard(norm(project["name"]))  # another extra, listed under its own name
    modules = set(extras.EXTRA_MODULES[extra])
    for dist in own & set(provided):  # each requirement has its module listed
      assert provided[dist] & modules, (extra, dist, provided[dist])
    for module in modules:  # and each module listed is one of a requirement's
      owners = {d for d, ms in provided.items() if module in ms}
      assert not owners or owners & own, (extra, module, owners)
    assert len(extras.EXTRA_MODULES[extra]) == len(modules), extra


def test_it_imports_only_the_standard_library():
  with open(extras.__file__, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert {n.partition(".")[0] for n in names} <= set(sys.stdlib_module_names) | {"__future__"}
