"""alexnet-jax: the AlexNet family in JAX/Flax.

Importing this package pulls in jax, flax and numpy only; PyTorch is imported solely by
``alexnet_jax.torch_interop``, ``alexnet_jax.torch_reference`` and the tools built on them.
"""

from alexnet_jax.models import (
    INITS,
    SETTINGS,
    VARIANT_SETTINGS,
    VARIANTS,
    AlexNet,
    adaptive_avg_pool,
    count_params,
    create_model,
    init_params,
    local_response_norm,
    param_shapes,
    variant_settings,
)

__version__ = "0.1.0"

__all__ = [
    "AlexNet",
    "INITS",
    "SETTINGS",
    "VARIANTS",
    "VARIANT_SETTINGS",
    "adaptive_avg_pool",
    "count_params",
    "create_model",
    "init_params",
    "local_response_norm",
    "param_shapes",
    "variant_settings",
]
