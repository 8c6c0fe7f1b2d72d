"""V4 attention: low-rank queries with a weightless per-head norm, one shared K=V head, a sliding window over
the raw tokens plus (CSA / HCA layers) compressed entries, per-head attention sinks, the rotation undone on
the output, and a grouped low-rank output projection.

megatron-core 0.16.1 has no module for any of this (its MLA has a latent KV and per-head keys); the
projections are megatron's TP-replicated Linear.
"""

from __future__ import annotations

import torch

from .compressor import CompressedKV, linear
from .config import SLIDING, DeepSeekV4Config
from .norm import V4RMSNorm
from .rope import cos_sin, rotate_trailing, unweighted_rms_norm


def sliding_window_bias(seq_len: int, window: int, device, dtype) -> torch.Tensor:
    """[S, S] additive mask: query t sees keys t - window < j <= t."""
    t = torch.arange(seq_len, device=device)
    visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    return torch.zeros((seq_len, seq_len), dtype=dtype, device=device).masked_fill(~visible, float("-inf"))


def attention_with_sinks(q, kv, bias, sinks, scale):
    """softmax over [keys | sink] of q . k * scale + bias, the sink's share dropped; values are the keys.
    q [B, H, S, d], kv [B, T, d], bias [B, 1, S, T], sinks [H]."""
    logits = torch.matmul(q, kv.unsqueeze(1).transpose(-1, -2)) * scale + bias
    b, h, s, _ = logits.shape
    # the fp32 sinks promote the row to fp32 for the softmax, as transformers' torch.cat does in bf16
    logits = torch.cat([logits, sinks.reshape(1, h, 1, 1).expand(b, h, s, 1)], dim=-1)
    # subtract the row max as transformers does (its comment: not in the original, guards bf16 overflow)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs.to(kv.dtype), kv.unsqueeze(1))


class V4Attention(torch.nn.Module):
    """Parameter layout follows transformers' DeepseekV4Attention; megatron-style names in names map."""

    def __init__(self, config, cfg: DeepSeekV4Config, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer_type = cfg.attention_type(layer)
        self.rope = cfg.main_rope if self.layer_type == SLIDING else cfg.compress_rope
        h, d = cfg.num_attention_heads, cfg.head_dim
        self.linear_q_down_proj = linear(config, cfg.hidden_size, cfg.q_lora_rank)
        self.q_layernorm = V4RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.linear_q_up_proj = linear(config, cfg.q_lora_rank, h * d)
        self.linear_kv_proj = linear(config, cfg.hidden_size, d)
        self.kv_layernorm = V4RMSNorm(d, cfg.rms_norm_eps)
        # grouped output projection: group g maps heads [g*H/G, (g+1)*H/G) to o_lora_rank channels
        self.linear_o_group_proj = torch.nn.Parameter(
            torch.empty(cfg.o_groups * cfg.o_lora_rank, h * d // cfg.o_groups, dtype=config.params_dtype)
        )
        config.init_method(self.linear_o_group_proj)
        self.linear_proj = linear(config, cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size)
        self.attn_sink = torch.nn.Parameter(torch.zeros(h, dtype=torch.float32))
        self.compressor = None if self.layer_type == SLIDING else CompressedKV(config, cfg, self.layer_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] (positions 0..S-1) -> [B, S, D]."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, d = cfg.num_attention_heads, cfg.head_dim
        cos, sin = cos_sin(self.rope, torch.arange(s, device=x.device))  # [S, r/2]
        q_residual = self.q_layernorm(self.linear_q_down_proj(x)[0])
        q = self.linear_q_up_proj(q_residual)[0].view(b, s, h, d).transpose(1, 2)  # [B, H, S, d]
        q = rotate_trailing(unweighted_rms_norm(q, cfg.rms_norm_eps), cos, sin)
        kv = rotate_trailing(self.kv_layernorm(self.linear_kv_proj(x)[0]), cos, sin)  # [B, S, d]
        bias = sliding_window_bias(s, cfg.sliding_window, x.device, x.dtype).expand(b, s, s)
        if self.compressor is not None:
            entries, entry_bias = self.compressor(x, q_residual)
            kv = torch.cat([kv, entries], dim=1)
            bias = torch.cat([bias, entry_bias.to(bias.dtype)], dim=-1)
        out = attention_with_sinks(q, kv, bias.unsqueeze(1), self.attn_sink, d**-0.5)  # [B, H, S, d]
        # K = V carried the keys' rotation into the output: rotate back by the query's angle
        out = rotate_trailing(out, cos, -sin).transpose(1, 2)  # [B, S, H, d]
        g = cfg.o_groups
        w = self.linear_o_group_proj.view(g, cfg.o_lora_rank, -1)  # [G, R, H*d/G]
        grouped = torch.einsum("bsgi,gri->bsgr", out.reshape(b, s, g, -1), w).flatten(2)
        return self.linear_proj(grouped)[0]
