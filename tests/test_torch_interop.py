"""PyTorch state_dicts to Flax params and back, for every variant."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import alexnet_jax as A  # noqa: E402
from alexnet_jax import pretrained  # noqa: E402
from alexnet_jax.torch_interop import params_from_torch, params_to_torch  # noqa: E402
from alexnet_jax.torch_reference import torch_model  # noqa: E402


@pytest.mark.parametrize("variant", A.VARIANTS)
def test_param_count_matches_torch_twin_and_round_trip_is_exact(variant):
  net = torch_model(variant)
  params = params_from_torch(net.state_dict(), variant)
  flax_params = A.init_params(A.create_model(variant), jax.random.key(0))
  assert A.count_params(flax_params) == sum(p.numel() for p in net.parameters())
  back = params_to_torch(params, variant)
  assert list(back) == list(net.state_dict())
  for k, v in net.state_dict().items():
    assert torch.equal(back[k], v), k


def test_strict_state_dict_errors_list_everything():
  sd = torch_model("alexnet").state_dict()
  sd.pop("features.0.bias")
  sd["extra.weight"] = torch.zeros(1)
  with pytest.raises(ValueError) as e:
    params_from_torch(sd, "alexnet", num_classes=10)
  msg = str(e.value)
  assert "features.0.bias" in msg and "extra.weight" in msg and "classifier.6.weight" in msg


def test_a_feature_extractor_loads_a_full_state_dict_without_its_head(tmp_path):
  narrow = dict(conv_features=(8, 16, 16, 16, 8), hidden_width=32)
  params = A.init_params(A.create_model("alexnet", **narrow), jax.random.key(0))
  pth = str(tmp_path / "full.pth")
  torch.save(params_to_torch(params, "alexnet", **narrow), pth)
  features = A.create_model("alexnet", num_classes=0, **narrow)
  loaded = pretrained.load_weights(pth, features, "alexnet")
  assert set(loaded) == set(params) - {"fc3"}
  np.testing.assert_array_equal(loaded["fc1"]["kernel"], params["fc1"]["kernel"])
  direct = params_from_torch(torch.load(pth), "alexnet", num_classes=0, **narrow)
  np.testing.assert_array_equal(direct["conv1"]["kernel"], params["conv1"]["kernel"])
  assert "fc3" not in direct
