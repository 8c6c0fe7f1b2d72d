"""DeepSeek-V3 on megatron-core: config from HF, layer specs, model builder."""

from .builder import build_model, default_layout, layer_kinds, model_transformer_config
from .config import DeepSeekConfig, ModelConfigError, transformer_config

__all__ = [
    "DeepSeekConfig",
    "ModelConfigError",
    "build_model",
    "default_layout",
    "layer_kinds",
    "model_transformer_config",
    "transformer_config",
]
