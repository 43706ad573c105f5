"""PyTorch state_dicts <-> Flax params for every variant.

Layouts: conv OIHW <-> HWIO (grouped: (O, I/g, k, k) <-> (k, k, I/g, O)), dense (out, in) <->
(in, out), and fc1's input axis permuted between torch's (C, H, W) flatten and Flax's (H, W, C).

PyTorch itself is imported only by the functions that read, write or build torch tensors, so this
module can be imported (and numpy state_dicts converted) without it.
"""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any, Mapping

import numpy as np

from alexnet_jax.models import AlexNet, create_model, param_shapes

# How the PyTorch twin of each variant names its layers: 'sequential' is torchvision's
# features.N / classifier.N, 'named' is the conv1..conv5 / fc1..fc3 attributes of alexnet_small's
# write-up (docs/variants.md).
TORCH_NAMING: Mapping[str, str] = {"alexnet_small": "named"}


def torch_naming(variant: str) -> str:
  return TORCH_NAMING.get(variant, "sequential")


def torch_layer_names(model: AlexNet, naming: str) -> dict[str, str]:
  """Flax layer name -> PyTorch module prefix, in forward order."""
  n_conv = len(model.conv_features)
  if naming == "named":
    return {**{f"conv{i + 1}": f"conv{i + 1}" for i in range(n_conv)},
            **{f"fc{i + 1}": f"fc{i + 1}" for i in range(3 if model.num_classes else 2)}}
  if naming != "sequential":
    raise ValueError(f"naming must be 'sequential' or 'named', got {naming!r}")
  names, index = {}, 0
  for i in range(n_conv):  # conv, ReLU, [LRN], [MaxPool]
    names[f"conv{i + 1}"] = f"features.{index}"
    index += 2 + int(model.lrn_after[i]) + int(model.pool_after[i])
  before = model.dropout_placement == "before_hidden"
  index = 0
  for i in range(3 if model.num_classes else 2):  # [Dropout], Linear, ReLU, [Dropout]; Linear
    hidden = i < 2
    index += int(hidden and before)
    names[f"fc{i + 1}"] = f"classifier.{index}"
    index += 1 + (1 + int(not before) if hidden else 0)
  return names


def head_prefix(model: AlexNet, naming: str) -> str:
  """The PyTorch prefix of the classifier head (fc3), also for a ``num_classes=0`` model."""
  return torch_layer_names(model.clone(num_classes=1), naming)["fc3"]


def _expected_torch_shapes(model: AlexNet, naming: str) -> dict[str, tuple[int, ...]]:
  channels = (model.in_channels,) + tuple(model.conv_features)
  h, w = model.flatten_hw
  dense_in = (channels[-1] * h * w, model.hidden_width, model.hidden_width)
  dense_out = (model.hidden_width, model.hidden_width, model.num_classes)
  shapes = {}
  for layer, prefix in torch_layer_names(model, naming).items():
    i = int(layer[-1]) - 1
    if layer.startswith("conv"):
      k = model.conv_kernels[i]
      shapes[f"{prefix}.weight"] = (channels[i + 1], channels[i] // model.groups[i], k, k)
      shapes[f"{prefix}.bias"] = (channels[i + 1],)
    else:
      shapes[f"{prefix}.weight"] = (dense_out[i], dense_in[i])
      shapes[f"{prefix}.bias"] = (dense_out[i],)
  return shapes


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _check_keys_and_shapes(what: str, got: Mapping[str, tuple[int, ...]],
                           expected: Mapping[str, tuple[int, ...]], hint: str) -> None:
  missing = [k for k in expected if k not in got]
  unexpected = [k for k in got if k not in expected]
  wrong = [f"{k}: got {tuple(got[k])}, expected {tuple(expected[k])}"
           for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
  if not (missing or unexpected or wrong):
    return
  lines = [f"{what} does not match the model:"]
  if missing:
    lines.append(f"  missing keys: {missing}")
  if unexpected:
    lines.append(f"  unexpected keys: {unexpected}")
  if wrong:
    lines.append("  wrong shapes:\n    " + "\n    ".join(wrong))
  if hint:
    lines.append(f"  hint: {hint}")
  raise ValueError("\n".join(lines))


def _state_dict_hint(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return "keys start with 'module.' (saved from DataParallel); strip that prefix first"
  last_w = list(expected)[-2]
  if last_w in state_dict and tuple(np.shape(state_dict[last_w]))[1:] == expected[last_w][1:]:
    n = np.shape(state_dict[last_w])[0]
    if n != expected[last_w][0]:
      return f"the classifier has {n} outputs: pass num_classes={n}"
  return ""


def _fc1_torch_to_flax(weight: np.ndarray, channels: int, hw: tuple[int, int]) -> np.ndarray:
  out = weight.shape[0]
  return weight.reshape(out, channels, *hw).transpose(2, 3, 1, 0).reshape(-1, out)


def _fc1_flax_to_torch(kernel: np.ndarray, channels: int, hw: tuple[int, int]) -> np.ndarray:
  out = kernel.shape[1]
  return kernel.reshape(*hw, channels, out).transpose(3, 2, 0, 1).reshape(out, -1)


def params_from_torch(state_dict: Mapping[str, Any], variant: str, **overrides: Any) -> dict:
  """Converts a PyTorch state_dict (tensors or numpy arrays) to Flax params for ``variant``.

  Strict: missing or unexpected keys and wrong shapes raise one ValueError listing all of them.
  With ``num_classes=0`` the file's classifier head is left out.
  """
  return state_dict_to_params(state_dict, create_model(variant, **overrides), torch_naming(variant),
                              f"state_dict for variant {variant!r}")


def state_dict_to_params(state_dict: Mapping[str, Any], model: AlexNet, naming: str,
                         what: str = "state_dict") -> dict:
  """``params_from_torch`` for a built ``model`` whose PyTorch twin names layers by ``naming``."""
  expected = _expected_torch_shapes(model, naming)
  arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
  if not model.num_classes:  # a feature extractor: the file's head is not wanted
    head = head_prefix(model, naming)
    arrays = {k: v for k, v in arrays.items() if k not in (f"{head}.weight", f"{head}.bias")}
  _check_keys_and_shapes(what,
                         {k: v.shape for k, v in arrays.items()}, expected,
                         _state_dict_hint(arrays, expected))
  dtype = np.dtype(model.param_dtype)
  params = {}
  for layer, prefix in torch_layer_names(model, naming).items():
    weight, bias = arrays[f"{prefix}.weight"], arrays[f"{prefix}.bias"]
    if layer.startswith("conv"):
      kernel = weight.transpose(2, 3, 1, 0)
    elif layer == "fc1":
      kernel = _fc1_torch_to_flax(weight, model.conv_features[-1], model.flatten_hw)
    else:
      kernel = weight.T
    params[layer] = {"kernel": np.ascontiguousarray(kernel, dtype),
                     "bias": np.ascontiguousarray(bias, dtype)}
  return params


def params_to_torch(params: Mapping[str, Any], variant: str, **overrides: Any
                    ) -> "collections.OrderedDict[str, Any]":
  """Converts Flax params of ``variant`` to a PyTorch state_dict (float tensors, torch order)."""
  import torch  # pylint: disable=import-outside-toplevel

  model = create_model(variant, **overrides)
  naming = torch_naming(variant)
  layers = torch_layer_names(model, naming)
  expected = {f"{layer}/{name}": leaf.shape
              for layer, sub in param_shapes(model).items() for name, leaf in sub.items()}
  flat = {f"{layer}/{name}": _to_numpy(value)
          for layer, sub in params.items() for name, value in sub.items()}
  _check_keys_and_shapes(f"params for variant {variant!r}", {k: v.shape for k, v in flat.items()},
                         expected, "")
  state_dict = collections.OrderedDict()
  for layer, prefix in layers.items():
    kernel = flat[f"{layer}/kernel"]
    if layer.startswith("conv"):
      weight = kernel.transpose(3, 2, 0, 1)
    elif layer == "fc1":
      weight = _fc1_flax_to_torch(kernel, model.conv_features[-1], model.flatten_hw)
    else:
      weight = kernel.T
    state_dict[f"{prefix}.weight"] = torch.from_numpy(np.array(weight, order="C"))
    state_dict[f"{prefix}.bias"] = torch.from_numpy(np.array(flat[f"{layer}/bias"], order="C"))
  return state_dict


def load_torch_state_dict(path: str) -> dict[str, Any]:
  """Reads a ``.pth`` state_dict safely: ``torch.load(weights_only=True)`` never runs pickled code.

  Training checkpoints that wrap the weights under 'state_dict' or 'model' are unwrapped.
  """
  import pickle  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel

  if os.path.getsize(path) == 0:
    raise ValueError(f"{path} is empty (0 bytes); expected a file written by "
                     "torch.save(model.state_dict(), path)")
  try:
    with warnings.catch_warnings():  # e.g. on the pickle protocol of a file refused anyway
      warnings.simplefilter("ignore")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "Weights only load failed" not in str(e):  # bytes that are no pickle at all
      raise ValueError(f"{path} cannot be read as a PyTorch file (truncated, or of another "
                       f"format?): {str(e).strip().splitlines()[0][:200]}") from e
    raise ValueError(f"{path} is not a torch.save file of tensors (a raw pickle, or one that "
                     "holds Python objects), so it was not loaded: unpickling it could run code. "
                     "Save the weights with torch.save(model.state_dict(), path)") from e
  except Exception as e:  # noqa: BLE001  (torch raises many kinds on a file it cannot parse)
    reason = str(e).strip().split(". ")[0].splitlines()[0][:200]
    raise ValueError(f"{path} cannot be read as a PyTorch file (truncated, or of another "
                     f"format?): {type(e).__name__}: {reason}") from e
  for key in ("state_dict", "model_state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of "
                     "parameter names to tensors)")
  return dict(obj)
