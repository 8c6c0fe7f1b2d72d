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


# DeepSeek-V4's routed experts: FP4 e2m1, two values per int8 byte (low nibble = even column), one ue8m0 scale per
# 32 input columns (transformers' FP8 dequantizer, integrations/finegrained_fp8.py, reads them the same way).
FP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int = FP4_BLOCK) -> torch.Tensor:
    """e2m1(packed) [M, 2K] * scale[i, j // block] in float32, cast to `dtype`."""
    if packed.dim() != 2:
        raise ValueError(f"FP4-packed weights are 2-D, got shape {tuple(packed.shape)}")
    m, k = packed.shape[0], 2 * packed.shape[1]
    if tuple(scale.shape) != (m, -(-k // block)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit FP4 weight {(m, k)} in 1x{block} blocks "
                         f"(expected {(m, -(-k // block))})")
    # one gather from a 256-entry table of (low, high) value pairs: ~4x faster than two nibble lookups, and the
    # products below are the same float32 multiplications (bit-identical results)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    pairs = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=-1)  # byte b -> (lut[b & 15], lut[b >> 4])
    values = pairs[packed.contiguous().view(torch.uint8).long()].reshape(m, k)
    if k % block == 0:
        return (values.view(m, k // block, block) * scale.float()[:, :, None]).reshape(m, k).to(dtype)
    return (values * scale.float().repeat_interleave(block, 1)[:, :k]).to(dtype)
