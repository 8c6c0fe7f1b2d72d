"""QLoRA: LoRA over a frozen base weight stored as NF4 and dequantized for each matmul.

`apply_qlora(model, cfg)` quantizes the local (TP/EP) shard of every targeted Megatron parallel linear to
NF4 (see nf4.py), removes the bf16/fp32 weight Parameter — the NF4 bytes live in a plain attribute, so no
optimizer, DDP buffer or grad-norm ever sees them — and adds a LoRA adapter exactly as `apply_lora` does.
In forward the shard is dequantized to the original dtype, handed to the unchanged Megatron layer for that
call only, and dropped again, so the full-precision copy exists for one layer at a time.

`dequantize_model_weights(model)` puts dequantized weights back as frozen Parameters under their Megatron
names (`--qlora-save-dequantize`: the saved checkpoint is a plain bf16 LoRA checkpoint that ckpt_convert
merges like any other).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .lora import LoraConfig, LoraParallelLinear, wrap_targets
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["QLoraParallelLinear", "quantize_linear_weight", "apply_qlora", "dequantize_model_weights", "nf4_state_dict"]


def quantize_linear_weight(linear: nn.Module, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Replace `linear.weight` (a Parameter) by NF4 storage in `linear.nf4_weight`; returns it."""
    weight = linear.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(linear).__name__} has no weight tensor to quantize")
    nf4 = quantize_nf4(weight.detach(), blocksize=blocksize, double_quant=double_quant)
    del linear._parameters["weight"]
    linear.weight = None  # Megatron code checks `self.weight is None`; the forward below fills it per call
    linear.nf4_weight = nf4
    # dtype/device stand-in for code that sizes adapters from the weight.
    linear.nf4_reference = torch.empty(0, dtype=weight.dtype, device=weight.device)
    return nf4


class QLoraParallelLinear(LoraParallelLinear):
    """LoraParallelLinear whose base weight is NF4, dequantized for each forward (and for its backward)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        nf4: Optional[NF4Tensor] = getattr(base, "nf4_weight", None)
        if nf4 is None:  # dequantize_model_weights already restored a full-precision weight
            return super().forward(x, *args, **kwargs)
        base.weight = dequantize_nf4(nf4)  # plain tensor, requires_grad=False: Megatron's frozen-weight path
        try:
            output, bias = base(x, *args, **kwargs)
        finally:
            base.weight = None
        lora = self.lora_forward(x, kwargs.get("runtime_gather_output"))
        return output + lora.to(output.dtype), bias


def apply_qlora(model: nn.Module, cfg: LoraConfig, blocksize: int = 64, double_quant: bool = False) -> nn.Module:
    """Quantize the targeted linears' local weight shards to NF4 and add LoRA adapters; freeze the rest."""

    def wrap(module, init_key):
        quantize_linear_weight(module, blocksize=blocksize, double_quant=double_quant)
        return QLoraParallelLinear(
            module, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, init_key=init_key, init_seed=cfg.init_seed
        )

    return wrap_targets(model, cfg, wrap, "apply_qlora")


def dequantize_model_weights(model: nn.Module) -> nn.Module:
    """Turn every NF4 base weight back into a frozen Parameter named `weight` (original dtype); in place."""
    for module in model.modules():
        nf4 = module.__dict__.get("nf4_weight")  # not getattr: the LoRA wrapper delegates attributes
        if isinstance(nf4, NF4Tensor):
            del module.weight
            module.weight = nn.Parameter(dequantize_nf4(nf4), requires_grad=False)
            del module.nf4_weight
            del module.nf4_reference
    return model


def nf4_state_dict(model: nn.Module) -> dict[str, dict]:
    """`<base module path>.weight` -> NF4Tensor.state_dict() for every quantized weight (for saving NF4 as is)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QLoraParallelLinear):
            nf4 = getattr(module.base_layer, "nf4_weight", None)
            if nf4 is not None:
                out[f"{name}.weight" if name else "weight"] = nf4.state_dict()
    return out
