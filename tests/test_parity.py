import pytest

pytest.importorskip("torch", reason="parity is measured against PyTorch")

from alexnet_jax import VARIANTS, parity  # noqa: E402


@pytest.mark.parametrize("case", [c for v in VARIANTS for c in parity.default_cases(v)],
                         ids=lambda c: c.label)
def test_parity_within_tolerance(case):
  rows = parity.run_case(case)
  bad = [r for r in rows if not r.ok]
  assert not bad, parity.format_rows(bad)
