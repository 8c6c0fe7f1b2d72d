"""DeepSeek-V4 (Flash / Pro) on megatron-core: config, model and the HF name map."""

from .config import DeepSeekV4Config, DeepSeekV4ConfigError, transformer_config
from .model import DeepSeekV4Model, stage_tensor_shape

__all__ = ["DeepSeekV4Config", "DeepSeekV4ConfigError", "DeepSeekV4Model", "stage_tensor_shape", "transformer_config"]
