"""V4's rotary embedding: interleaved pairs on the *trailing* rope_head_dim channels of each head, applied in
place (the layout stays interleaved, because V4 rotates the values too and undoes the rotation on the
attention output before the grouped output projection mixes channels)."""

from __future__ import annotations

import torch

from mindspeed_dsv.ops import RopeConfig, get_ops, rotary_cos_sin


def cos_sin(rope: RopeConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of shape [*positions.shape, rope_dim // 2]."""
    return rotary_cos_sin(rope, positions, dtype=torch.float32)


def rotate_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * cos.shape[-1] channels of x (interleaved pairs) in fp32; cos/sin broadcast against
    x[..., :rope_dim // 2]. Pass -sin to undo a rotation."""
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    # ops' rotary returns [rotated evens | rotated odds]; interleave them back into pairs
    rotated = get_ops().apply_rotary(rope.float(), cos, sin, interleaved=True)
    half = rope_dim // 2
    rotated = torch.stack((rotated[..., :half], rotated[..., half:]), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, the statistic in fp32 (V4's per-head query norm and hyper-connection
    input norm have no weight)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
