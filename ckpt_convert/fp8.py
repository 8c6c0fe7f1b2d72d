"""DeepSeek-V3 FP8 weights: e4m3 values with one float32 scale per 128x128 block (`<name>_scale_inv`).

The official recipe (DeepSeek-V3 `inference/kernel.py` weight_dequant, `fp8_cast_bf16.py`) computes
w[i, j] = float32(q[i, j]) * scale_inv[i // 128, j // 128] and stores the result in bf16. Shapes not divisible
by 128 have ceil(M/128) x ceil(N/128) scales; the edge blocks simply cover fewer rows/columns.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    m, n = shape
    rows, cols = -(-m // block), -(-n // block)
    if tuple(scale.shape) != (rows, cols):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight {tuple(shape)} in {block}x{block} "
                         f"blocks (expected ({rows}, {cols}))")
    return scale.float().repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: int = BLOCK) -> torch.Tensor:
    """float32(q) * scale_inv per block, cast to `dtype` (bf16 as the official conversion does)."""
    if q.dim() != 2:
        raise ValueError(f"block FP8 weights are 2-D, got shape {tuple(q.shape)}")
    out = q.float() * _expand(scale_inv, tuple(q.shape), block)
    return out.to(dtype)


def quantize_block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse used by `mcore2hf --save-fp8`: per block, scale_inv = amax / 448 (1 for an all-zero block),
    q = e4m3(w / scale_inv). Returns (q, scale_inv float32 [ceil(M/128), ceil(N/128)])."""
    if w.dim() != 2:
        raise ValueError(f"block FP8 weights are 2-D, got shape {tuple(w.shape)}")
    m, n = w.shape
    rows, cols = -(-m // block), -(-n // block)
    wf = w.float()
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:m, :n] = wf
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wf / _expand(scale, (m, n), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
