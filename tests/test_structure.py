"""The package's shape: no import cycle, nothing done at import, no reach outside the package,
and one source for every default."""

import ast
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "alexnet_jax"
# Dotted below the package: "training", "data.loader", ...; "data" is the subpackage's __init__.
MODULES = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts != ("__init__.py",))


def _tree(module):
  path = PACKAGE.joinpath(*module.split("."))
  return ast.parse((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text())


def _module(dotted):
  """The MODULES entry that an absolute import of ``alexnet_jax.<dotted>`` names, if any."""
  while dotted and dotted not in MODULES:
    dotted = dotted.rpartition(".")[0]
  return dotted or None


def _imports(module):
  """The package's modules that ``module`` imports, at the top or inside functions."""
  found = set()
  for node in ast.walk(_tree(module)):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "alexnet_jax":
      base = node.module.partition(".")[2]
      for a in node.names:
        found.add(_module(f"{base}.{a.name}" if base else a.name) or _module(base))
    elif isinstance(node, ast.Import):
      found |= {_module(a.name.partition(".")[2]) for a in node.names
                if a.name.startswith("alexnet_jax.")}
  return found - {module, None}


def test_no_import_cycle():
  graph = {m: _imports(m) for m in MODULES}
  done, path = set(), []

  def visit(m):
    if m in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
    if m not in done:
      path.append(m)
      for dep in sorted(graph[m]):
        visit(dep)
      path.pop()
      done.add(m)

  for m in MODULES:
    visit(m)
  assert graph["checkpointing"].isdisjoint({"training", "pretrained"})  # the cycle there was


def test_each_module_imports_alone_and_leaves_the_environment_as_it_was():
  # Third-party libraries set variables of their own when imported: they go first.
  code = f"""
import importlib, os, sys
for lib in ("jax", "flax", "optax", "tensorflow", "tensorflow_datasets", "orbax.checkpoint",
            "torch", "sklearn", "matplotlib"):
  try:
    importlib.import_module(lib)
  except ImportError:
    pass
before = dict(os.environ)
for name in {MODULES!r}:
  for loaded in [m for m in sys.modules if m == "alexnet_jax" or m.startswith("alexnet_jax.")]:
    del sys.modules[loaded]
  importlib.import_module("alexnet_jax." + name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
assert not changed, changed
"""
  subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_the_library_stays_inside_its_package_and_acts_only_when_called():
  for module in MODULES + ["__init__"]:
    tree = _tree(module)
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not any((n or "").split(".")[0] == "configs" for n in names), module
      if isinstance(node, ast.Attribute) and node.attr == "path":
        assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), module
    # At the top: imports, definitions, constants and the __main__ guard; no calls for effect.
    for node in tree.body:
      ok = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef,
                             ast.Assign, ast.AnnAssign)) or (
          isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
          isinstance(node, ast.If) and ast.unparse(node.test) in (
              "__name__ == '__main__'", "TYPE_CHECKING"))
      assert ok, f"{module}.py line {node.lineno}: {ast.unparse(node)[:80]}"


def test_one_source_of_defaults():
  pytest.importorskip("ml_collections")
  from configs import default
  from alexnet_jax import optim

  config = default.get_config()
  quickstart_own = {"warmup_epochs"}  # the quickstart's recipe, set over the library's default
  for field, value in optim.DEFAULTS.items():
    if field not in quickstart_own:
      assert config[field] == value, field
  # The library's behaviour for an omitted optimizer field is the default config's.
  required = dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="plateau",
                  batch_size=32)
  full = types.SimpleNamespace(**required, **{k: config[k] for k in optim.DEFAULTS})
  full.warmup_epochs = optim.DEFAULTS["warmup_epochs"]
  omitted = types.SimpleNamespace(**required)
  params = {"w": np.ones((3,), np.float32)}
  grads = {"w": np.full((3,), 0.5, np.float32)}
  updates = []
  for c in (full, omitted):
    tx = optim.create_optimizer(c, 10, 100)
    state, plateau = tx.init(params), optim.init_plateau()
    for error in (0.5, 0.5, 0.5, 0.5):  # no improvement: the patience runs out
      plateau, state = optim.update_plateau(optim.plateau_rule(c), plateau, state, error)
    updates.append(tx.update(grads, state, params)[0]["w"])
  np.testing.assert_array_equal(*updates)
