"""PyTorch twins of the Flax variants, for parity checks and weight exchange.

One configurable ``torch.nn.Module`` built from the same settings as the Flax model, so the two
cannot drift apart. State_dict keys follow ``torch_interop.torch_layer_names``: torchvision's
``features.N`` / ``classifier.N`` for most variants, ``conv1``..``fc3`` for
``alexnet_small`` (as its write-up names them; docs/variants.md). Imports torch: keep it out of
the jax-only import path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet_jax.models import AlexNet, create_model
from alexnet_jax.torch_interop import torch_layer_names, torch_naming


class TorchAlexNet(nn.Module):
  """The PyTorch module with the architecture of a Flax ``AlexNet`` (NCHW input)."""

  def __init__(self, cfg: AlexNet, naming: str = "sequential"):
    super().__init__()
    channels = (cfg.in_channels,) + tuple(cfg.conv_features)
    features: list[nn.Module] = []
    for i in range(len(cfg.conv_features)):
      k, p = cfg.conv_kernels[i], cfg.conv_paddings[i]
      features += [nn.Conv2d(channels[i], channels[i + 1], k, stride=cfg.conv_strides[i],
                             padding=p, groups=cfg.groups[i]), nn.ReLU()]
      if cfg.lrn_after[i]:
        features.append(nn.LocalResponseNorm(cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k))
      if cfg.pool_after[i]:
        features.append(nn.MaxPool2d(cfg.pool_window, cfg.pool_stride))
    h, w = cfg.flatten_hw
    widths_in = (channels[-1] * h * w, cfg.hidden_width, cfg.hidden_width)
    widths_out = (cfg.hidden_width, cfg.hidden_width, cfg.num_classes)
    classifier: list[nn.Module] = []
    for i in range(3):
      hidden = i < 2
      if hidden and cfg.dropout_placement == "before_hidden":
        classifier.append(nn.Dropout(cfg.dropout_rate))
      classifier.append(nn.Linear(widths_in[i], widths_out[i]))
      if hidden:
        classifier.append(nn.ReLU())
        if cfg.dropout_placement == "after_hidden":
          classifier.append(nn.Dropout(cfg.dropout_rate))

    pool = [nn.AdaptiveAvgPool2d(cfg.avgpool_size)] if cfg.avgpool_size is not None else []
    self._plan = features + pool + [nn.Flatten()] + classifier
    if naming == "sequential":
      self.features = nn.Sequential(*features)
      if pool:
        self.avgpool = pool[0]
      self.classifier = nn.Sequential(*classifier)
    else:
      # Named style: weighted layers are attributes conv1.., fc1..; the parameter-free ones are
      # registered too (no state_dict entries) so train()/eval() reaches the dropouts.
      weighted = [m for m in self._plan if isinstance(m, (nn.Conv2d, nn.Linear))]
      for name, module in zip(torch_layer_names(cfg, "named"), weighted):
        setattr(self, name, module)
      self.stateless = nn.ModuleList(
          [m for m in self._plan if not isinstance(m, (nn.Conv2d, nn.Linear))])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for module in self._plan:
      x = module(x)
    return x

  def blocks(self) -> list[list[nn.Module]]:
    """The modules in forward order, by block: each conv with its ReLU, LRN and max pool, then
    the rest (adaptive pool, flatten, classifier) as one."""
    conv_tail = (nn.ReLU, nn.LocalResponseNorm, nn.MaxPool2d)
    blocks: list[list[nn.Module]] = []
    for module in self._plan:
      if isinstance(module, nn.Conv2d) or (
          blocks and isinstance(blocks[-1][0], nn.Conv2d) and not isinstance(module, conv_tail)):
        blocks.append([])
      blocks[-1].append(module)
    return blocks


def nchw(x: np.ndarray) -> torch.Tensor:
  """An NHWC batch as the NCHW tensor the twin takes."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_model(variant: str, **overrides: Any) -> TorchAlexNet:
  """The PyTorch twin of ``create_model(variant, **overrides)``, with PyTorch's default init."""
  return TorchAlexNet(create_model(variant, **overrides), torch_naming(variant))
