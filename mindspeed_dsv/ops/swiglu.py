"""SwiGLU on a fused [gate | up] projection: silu(gate) * up, gate being the first half of the last dim.

This is megatron's gated-linear-unit layout (linear_fc1 output = concat([gate, up], -1)) and the layout
`torch_npu.npu_swiglu(x, dim=-1)` expects.
"""

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim of x {tuple(x.shape)} must be even (concat of gate and up)")
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
