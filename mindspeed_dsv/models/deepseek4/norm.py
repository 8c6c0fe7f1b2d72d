"""V4's RMSNorm: the weight is kept in fp32 and multiplied before the cast back (transformers' DeepseekV4RMSNorm
and the release's RMSNorm), unlike V3's norm, which casts first. In fp32 the two orders agree; in bf16 only
this one matches transformers."""

from __future__ import annotations

import torch


class V4RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        # fp32 whatever the model's params_dtype (transformers' _keep_in_fp32_modules_strict)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)
