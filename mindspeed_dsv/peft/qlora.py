"""QLoRA: LoRA over a frozen base weight stored as NF4 and dequantized for each matmul.

`apply_qlora(model, cfg)` quantizes the local (TP/EP) shard of every targeted Megatron parallel linear to
NF4 (see nf4.py), removes the bf16/fp32 weight Parameter — the NF4 bytes live in a plain attribute, so no
optimizer, DDP buffer or grad-norm ever sees them — and adds a LoRA adapter exactly as `apply_lora` does.
In forward the shard is dequantized to the original dtype, handed to the unchanged Megatron layer for that
call only, and dropped again. Whatever autograd saves of that weight for the backward (Megatron's linear saves
its weight to compute the input gradient) is replaced, through `torch.autograd.graph.saved_tensors_hooks`, by a
reference to the NF4 storage and dequantized again when the backward unpacks it: no full-precision copy of a
frozen weight lives from a layer's forward to its backward, only while that layer computes. Megatron's own
communication (TP all-reduce, SP all-gather / reduce-scatter, expert comm) runs unchanged.

`dequantize_model_weights(model)` puts dequantized weights back as frozen Parameters under their Megatron
names, in memory (what mcore2hf does to an `hf2mcore --qlora-nf4` base before merging adapters into it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .lora import LoraConfig, LoraParallelLinear, wrap_targets
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["QLoraParallelLinear", "quantize_linear_weight", "save_nf4_instead_of", "apply_qlora", "dequantize_model_weights", "nf4_state_dict"]


def quantize_linear_weight(linear: nn.Module, blocksize: int = 64, double_quant: bool = False,
                           device: Optional[torch.device] = None) -> NF4Tensor:
    """Replace `linear.weight` (a Parameter) by NF4 storage in `linear.nf4_weight`; returns it.

    With `device` the weight is copied there, quantized there, and the source Parameter is dropped before
    this returns: a model built and loaded on the host reaches the device one layer's weight at a time."""
    weight = linear.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(linear).__name__} has no weight tensor to quantize")
    device = torch.device(device) if device is not None else weight.device
    nf4 = quantize_nf4(weight.detach().to(device), blocksize=blocksize, double_quant=double_quant)
    del linear._parameters["weight"]
    linear.weight = None  # Megatron code checks `self.weight is None`; the forward below fills it per call
    linear.nf4_weight = nf4
    # dtype/device stand-in for code that sizes adapters from the weight.
    linear.nf4_reference = torch.empty(0, dtype=weight.dtype, device=device)
    return nf4


class _NF4Saved:
    """What autograd keeps instead of a saved view of a dequantized weight: the NF4 storage and the view."""

    __slots__ = ("nf4", "size", "stride", "offset")

    def __init__(self, nf4: NF4Tensor, t: torch.Tensor):
        self.nf4, self.size, self.stride, self.offset = nf4, t.size(), t.stride(), t.storage_offset()

    def unpack(self) -> torch.Tensor:
        return dequantize_nf4(self.nf4).as_strided(self.size, self.stride, self.offset)


def save_nf4_instead_of(weight: torch.Tensor, nf4: NF4Tensor):
    """saved_tensors_hooks under which any tensor autograd saves that views `weight`'s storage (the weight
    itself, or `weight.t()`) is kept as `nf4` and dequantized again when the backward needs it."""
    # Only plain facts of the weight are captured: autograd keeps these hooks with every tensor saved under
    # them, and a closure over the weight itself would keep the very copy this avoids alive.
    storage, device, dtype = weight.untyped_storage().data_ptr(), weight.device, weight.dtype

    def pack(t: torch.Tensor):
        if t.device == device and t.dtype == dtype and t.untyped_storage().data_ptr() == storage:
            return _NF4Saved(nf4, t)
        return t

    def unpack(saved):
        return saved.unpack() if isinstance(saved, _NF4Saved) else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class QLoraParallelLinear(LoraParallelLinear):
    """LoraParallelLinear whose base weight is NF4, dequantized for each forward (and for its backward)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        nf4: Optional[NF4Tensor] = getattr(base, "nf4_weight", None)
        if nf4 is None:  # dequantize_model_weights already restored a full-precision weight
            return super().forward(x, *args, **kwargs)
        weight = dequantize_nf4(nf4)  # plain tensor, requires_grad=False: Megatron's frozen-weight path
        base.weight = weight
        try:
            with save_nf4_instead_of(weight, nf4):
                output, bias = base(x, *args, **kwargs)
        finally:
            base.weight = None
        del weight
        lora = self.lora_forward(x, kwargs.get("runtime_gather_output"))
        return output + lora.to(output.dtype), bias


def apply_qlora(model: nn.Module, cfg: LoraConfig, blocksize: int = 64, double_quant: bool = False,
                device: Optional[torch.device] = None) -> nn.Module:
    """Quantize the targeted linears' local weight shards to NF4 and add LoRA adapters; freeze the rest.

    `device`: where the NF4 storage goes (default: where each weight is). Training builds and loads the model
    on the host and passes the accelerator here, so each layer's weight is copied to the device, quantized and
    released in turn (the bf16 shard never exists there whole); it then moves the rest of the model."""

    def wrap(module, init_key):
        quantize_linear_weight(module, blocksize=blocksize, double_quant=double_quant, device=device)
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
