"""Core attention: softmax(q kᵀ · scale + causal mask) v, with q/k head dim allowed to differ from v's (MLA).

Tensors use megatron's layout: q, k [s, b, h, d_qk], v [s, b, h, d_v]; output [s, b, h * d_v].
"""

from __future__ import annotations

import torch


def attention_torch(q, k, v, softmax_scale: float, causal: bool = True, attention_mask=None):
    """Plain math in fp32: the reference every other implementation is checked against.

    attention_mask: optional bool tensor broadcastable to [b, h, s_q, s_k], True where attention is NOT allowed
    (megatron's convention), combined with the causal mask.
    """
    sq, b, h, _ = q.shape
    sk = k.shape[0]
    qf, kf, vf = (t.permute(1, 2, 0, 3).to(torch.float32) for t in (q, k, v))  # [b, h, s, d]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale
    masked = None
    if causal:
        masked = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
    if attention_mask is not None:
        masked = attention_mask if masked is None else (masked | attention_mask)
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vf).to(q.dtype)  # [b, h, s, dv]
    return out.permute(2, 0, 1, 3).reshape(sq, b, h * v.shape[-1])


def packed_attention_mask(cu_seqlens: torch.Tensor, seq_len: int, causal: bool = True) -> torch.Tensor:
    """Bool [s, s], True where attention is NOT allowed, for sequences packed back to back.

    cu_seqlens: int tensor [n + 1] of cumulative lengths starting at 0 (flash-attn / megatron THD convention).
    A position only sees positions of its own sequence (and, if causal, not later ones).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1], got {tuple(cu_seqlens.shape)}")
    pos = torch.arange(seq_len, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    masked = segment[:, None] != segment[None, :]
    if causal:
        masked = masked | torch.ones(seq_len, seq_len, dtype=torch.bool, device=pos.device).triu(1)
    return masked


def _check_packed(q, cu_seqlens):
    if q.shape[1] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch 1 in [s, b, h, d]; q is {tuple(q.shape)}")
    if q.device.type == "cpu" and int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed sequence has {q.shape[0]} tokens")


def attention_packed_torch(q, k, v, softmax_scale, causal=True, attention_mask=None, cu_seqlens=None):
    """The reference with packed-sequence support: cu_seqlens becomes a block-diagonal mask."""
    if cu_seqlens is not None:
        _check_packed(q, cu_seqlens)
        packed = packed_attention_mask(cu_seqlens, q.shape[0], causal=False)
        attention_mask = packed if attention_mask is None else (attention_mask | packed)
    return attention_torch(q, k, v, softmax_scale, causal=causal, attention_mask=attention_mask)


def _sdpa(q, k, v, softmax_scale, causal, attention_mask, cu_seqlens, pad_v):
    import torch.nn.functional as F

    sq, b, h, d_qk = q.shape
    sk, d_v = k.shape[0], v.shape[-1]
    if pad_v and d_v < d_qk:
        # flash attention wants one head dim for q, k and v; zero columns of V give zero output columns.
        v = F.pad(v, (0, d_qk - d_v))
    masked = attention_mask
    if cu_seqlens is not None:
        _check_packed(q, cu_seqlens)
        packed = packed_attention_mask(cu_seqlens, sq, causal=False)
        masked = packed if masked is None else (masked | packed)
    is_causal = causal and masked is None and sq == sk
    if causal and not is_causal:
        # SDPA's is_causal is top-left aligned; the reference is bottom-right aligned (matters when sq != sk).
        tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        masked = tri if masked is None else (masked | tri)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=None if masked is None else ~masked, is_causal=is_causal, scale=softmax_scale
    )
    return out[..., :d_v].permute(2, 0, 1, 3).reshape(sq, b, h * d_v)


def attention_sdpa(q, k, v, softmax_scale, causal=True, attention_mask=None, cu_seqlens=None):
    """torch SDPA with V as is: torch picks the memory-efficient (or cuDNN) kernel when d_v != d_qk."""
    return _sdpa(q, k, v, softmax_scale, causal, attention_mask, cu_seqlens, pad_v=False)


def attention_sdpa_pad_v(q, k, v, softmax_scale, causal=True, attention_mask=None, cu_seqlens=None):
    """torch SDPA with V zero-padded to d_qk (then sliced back), which lets the flash kernel run for MLA."""
    return _sdpa(q, k, v, softmax_scale, causal, attention_mask, cu_seqlens, pad_v=True)
