"""Rotary position embedding with DeepSeek's YaRN scaling.

Formulas follow the YaRN paper as DeepSeek-V3 uses it: frequencies blended between interpolation and
extrapolation by a linear ramp over the correction range (floored/ceiled), and the attention factor
mscale(factor, mscale) / mscale(factor, mscale_all_dim) applied to cos and sin. The softmax scale gets a
separate mscale(factor, mscale_all_dim)**2 (see `yarn_softmax_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    dim: int  # rotary dims per head (qk_rope_head_dim)
    base: float = 10000.0
    rope_type: str = "default"  # 'default' | 'yarn'
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    interleaved: bool = True  # DeepSeek stores rotary dims as interleaved pairs (x0,x1),(x2,x3),...

    @classmethod
    def from_hf(cls, hf: dict) -> "RopeConfig":
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        common = dict(
            dim=hf["qk_rope_head_dim"], base=float(base), interleaved=bool(hf.get("rope_interleave", True))
        )
        if rope_type == "default":
            return cls(**common)
        if rope_type != "yarn":
            raise ValueError(f"rope type {rope_type!r} is not supported (DeepSeek uses 'yarn' or none)")
        factor = params.get("factor")
        if factor is None:
            factor = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
        return cls(
            rope_type="yarn",
            factor=float(factor),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=float(params.get("mscale") or 0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0),
            **common,
        )


def inv_freq_and_attention_factor(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    dim, base = cfg.dim, cfg.base
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_type == "default":
        return 1.0 / pos_freqs, 1.0

    def correction_dim(rotations):
        return (dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (cfg.factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    if cfg.mscale and cfg.mscale_all_dim:
        attention_factor = yarn_get_mscale(cfg.factor, cfg.mscale) / yarn_get_mscale(
            cfg.factor, cfg.mscale_all_dim
        )
    else:
        attention_factor = yarn_get_mscale(cfg.factor)
    return inv_freq, float(attention_factor)


def yarn_softmax_scale(cfg: RopeConfig, qk_head_dim: int) -> float:
    """1/sqrt(d) times mscale(factor, mscale_all_dim)^2, as DeepSeek-V3 scales its attention logits."""
    scale = qk_head_dim**-0.5
    if cfg.rope_type == "yarn" and cfg.mscale_all_dim:
        m = yarn_get_mscale(cfg.factor, cfg.mscale_all_dim)
        scale = scale * m * m
    return scale


def rotary_cos_sin(cfg: RopeConfig, positions: torch.Tensor, dtype=torch.float32):
    """cos/sin of shape [*positions.shape, dim // 2] (one angle per rotated pair), attention factor applied."""
    inv_freq, attention_factor = inv_freq_and_attention_factor(cfg)
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dim of x. cos/sin broadcast against x[..., : dim // 2].

    interleaved: pairs are (x0,x1),(x2,x3)...; the output is laid out de-interleaved [rotated evens | rotated odds],
    exactly as DeepSeek-V3's reference does (q and k are laid out alike, so q·k is unchanged by the layout).
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
