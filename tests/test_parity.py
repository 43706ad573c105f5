import pytest

pytest.importorskip("torch", reason="parity is measured against PyTorch")

import jax  # noqa: E402

from alexnet_jax import VARIANTS, parity  # noqa: E402


@pytest.mark.parametrize("case", [c for v in VARIANTS for c in parity.default_cases(v)],
                         ids=lambda c: c.label)
def test_parity_within_tolerance(case):
  rows = parity.run_case(case)
  bad = [r for r in rows if not r.ok]
  assert not bad, parity.format_rows(bad)


# The smallest variant, one batch of one image, the fewest steps the CLI allows.
SMALL_RUN = ["--variant", "alexnet_small", "--batch", "1", "--steps", "2"]


def _record_precision(monkeypatch) -> list:
  """The matmul precision in force each time parity builds a model: it is run under the same."""
  seen = []
  create_model = parity.create_model
  def spy(*args, **kwargs):
    seen.append(jax.config.jax_default_matmul_precision)
    return create_model(*args, **kwargs)
  monkeypatch.setattr(parity, "create_model", spy)
  return seen


def test_cli_at_highest_precision_says_so_and_checks_fp32(capsys, monkeypatch):
  seen = _record_precision(monkeypatch)
  assert parity.main(SMALL_RUN + ["--precision", "highest"]) == 0
  out = capsys.readouterr().out
  assert ("precision: highest (jax.default_matmul_precision), "
          f"JAX backend: {jax.default_backend()}") in out
  assert "highest" in seen
  assert "batches redrawn" in out and f"{parity.LOGITS_TOL:.0e}" in out


def test_cli_at_default_precision_off_cpu_checks_loosely(capsys, monkeypatch):
  # What a GPU or TPU gets; on CPU the default precision is checked as highest is.
  tolerances = parity.tolerances
  monkeypatch.setattr(parity, "tolerances",
                      lambda precision, backend=None: tolerances(precision, "gpu"))
  seen = _record_precision(monkeypatch)
  assert parity.main(SMALL_RUN + ["--precision", "default"]) == 0
  out = capsys.readouterr().out
  assert "precision: default (jax.default_matmul_precision)" in out
  assert "default" in seen
  assert "paths not matched" in out and f"tolerance {parity.ROUNDED_TOL:.0e}" in out


def test_cli_rejects_an_unknown_precision(capsys):
  with pytest.raises(SystemExit) as exit_info:
    parity.main(SMALL_RUN + ["--precision", "tensorfloat32"])
  assert exit_info.value.code == 2
  assert "invalid choice: 'tensorfloat32'" in capsys.readouterr().err


def test_default_precision_is_checked_loosely_only_off_cpu():
  exact = parity.Tolerances()
  assert parity.tolerances("highest", "cpu") == exact
  assert parity.tolerances("default", "cpu") == exact
  assert parity.tolerances("highest", "gpu") == exact
  rounded = parity.tolerances("default", "gpu")
  assert not rounded.same_path
  assert min(rounded.logits, rounded.grads, rounded.params) > max(exact.logits, exact.grads,
                                                                  exact.params)
  with pytest.raises(ValueError, match="unknown precision"):
    parity.tolerances("fast")
