"""LoRA and QLoRA (NF4) on Megatron-Core parallel linears."""

from .lora import LORA_TARGET_MODULES, LoraConfig, LoraParallelLinear, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from .qlora import QLoraParallelLinear, apply_qlora, dequantize_model_weights

__all__ = [
    "LORA_TARGET_MODULES", "LoraConfig", "LoraParallelLinear", "apply_lora", "lora_state_dict",
    "load_lora_state_dict", "merge_lora", "NF4Tensor", "quantize_nf4", "dequantize_nf4",
    "QLoraParallelLinear", "apply_qlora", "dequantize_model_weights",
]
