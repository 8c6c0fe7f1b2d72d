"""Ascend NPU implementations through torch_npu's fused operators.

torch_npu is imported inside each call (never at module import), so this module imports on any install.
Each function has the same signature and result as its plain-torch reference; the argument conventions of the
torch_npu operators are noted where they differ from ours.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

# sparse_mode=3 (rightDownCausal) reads a compressed 2048x2048 upper-triangular mask (True = masked)
# instead of a full [s, s] one; bottom-right alignment is also the reference's causal convention.
_CAUSAL_SPARSE_MODE = 3
_COMPRESSED_MASK_SIZE = 2048
_compressed_masks: dict = {}
# npu_grouped_matmul with one 3-D weight: "group_list第1维最大支持1024, 即最多支持1024个group"
MAX_GROUPS = 1024


def _torch_npu():
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:  # resolution only picks 'npu' on an npu platform, so this is a broken install
        raise RuntimeError("an NPU kernel was selected but torch_npu cannot be imported") from e


def _compressed_causal_mask(device) -> torch.Tensor:
    key = str(device)
    if key not in _compressed_masks:
        n = _COMPRESSED_MASK_SIZE
        _compressed_masks[key] = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    return _compressed_masks[key]


def attention(q, k, v, softmax_scale, causal=True, attention_mask=None, cu_seqlens=None):
    """npu_fusion_attention. q, k [s, b, h, d_qk], v [s, b, h, d_v] -> [s, b, h * d_v].

    The kernel takes one head dim for q/k/v, so V is zero-padded to d_qk and the output sliced back (MLA).
    Unpacked: layout 'SBH' (a free reshape of megatron's [s, b, h, d]). Packed (cu_seqlens, batch 1):
    layout 'TND' with actual_seq_qlen/actual_seq_kvlen = cumulative ends (cu_seqlens[1:]) as host ints.
    """
    torch_npu = _torch_npu()
    sq, b, h, d_qk = q.shape
    sk, d_v = k.shape[0], v.shape[-1]
    if d_v < d_qk:
        v = F.pad(v, (0, d_qk - d_v))
    kwargs = dict(scale=float(softmax_scale), keep_prob=1.0)
    if causal and attention_mask is None:
        kwargs.update(atten_mask=_compressed_causal_mask(q.device), sparse_mode=_CAUSAL_SPARSE_MODE)
    elif attention_mask is not None:
        if cu_seqlens is not None:
            raise ValueError("npu attention: an explicit attention_mask cannot be combined with cu_seqlens (TND)")
        masked = attention_mask
        if causal:
            masked = masked | torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        kwargs.update(atten_mask=masked, sparse_mode=0)
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch 1 in [s, b, h, d]; q is {tuple(q.shape)}")
        ends = [int(x) for x in cu_seqlens[1:].tolist()]
        out = torch_npu.npu_fusion_attention(
            q.reshape(sq, h, d_qk),
            k.reshape(sk, h, d_qk),
            v.reshape(sk, h, d_qk),
            h,
            "TND",
            actual_seq_qlen=ends,
            actual_seq_kvlen=ends,
            **kwargs,
        )[0]
    else:
        out = torch_npu.npu_fusion_attention(
            q.reshape(sq, b, h * d_qk), k.reshape(sk, b, h * d_qk), v.reshape(sk, b, h * d_qk), h, "SBH", **kwargs
        )[0]
    return out.reshape(sq, b, h, d_qk)[..., :d_v].reshape(sq, b, h * d_v)


def rms_norm(x, weight, eps):
    """npu_rms_norm returns (y, rstd); y = x * rstd * gamma."""
    return _torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]


def apply_rotary(x, cos, sin, interleaved: bool = True):
    """npu_rotary_mul(x, r1, r2) = x * r1 + rotate_half(x) * r2 on 4-D x, rotate_half in halves.

    With x de-interleaved to [evens | odds] and r1 = [cos | cos], r2 = [sin | sin], that is exactly the
    reference's interleaved rotation, output layout included.
    """
    if x.dim() != 4:
        raise ValueError(f"npu rotary needs 4-D x ([s, b, h, d] or [b, s, h, d]), got {tuple(x.shape)}")
    if interleaved:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    r1 = torch.cat([cos, cos], dim=-1).to(x.dtype)
    r2 = torch.cat([sin, sin], dim=-1).to(x.dtype)
    while r1.dim() < 4:
        r1, r2 = r1.unsqueeze(0), r2.unsqueeze(0)
    return _torch_npu().npu_rotary_mul(x, r1, r2)


def swiglu(x):
    """npu_swiglu splits dim into halves [a | b] and returns silu(a) * b."""
    return _torch_npu().npu_swiglu(x, dim=-1)


class _GroupedMatmul(torch.autograd.Function):
    """npu_grouped_matmul forward and backward, counts passed with group_list_type=1.

    group_list_type=0 would mean cumulative ends, 1 means per-group counts; we pass counts as they come from
    the router. forward/dgrad split the M (token) axis (group_type=0); wgrad splits the K axis of xᵀ·dy
    (group_type=2), one [K, N] result per expert.

    The weight goes in as ONE 3-D [E, K, N] tensor (the op's "single x / single weight / single y" form), not a
    list of E matrices: the list form caps the weight list and group_list at 128 groups, the 3-D form at 1024,
    and accepts a transposed weight, so dgrad passes the [E, N, K] view without a copy (torch_npu 2.13.0
    _op_plugin_docs.py, npu_grouped_matmul; MindSpeed's BF16GMMFunction does the same).
    """

    @staticmethod
    def forward(ctx, x, w, counts):
        torch_npu = _torch_npu()
        ctx.save_for_backward(x, w, counts)
        return torch_npu.npu_grouped_matmul(
            [x], [w], group_list=counts, split_item=3, group_type=0, group_list_type=1
        )[0]

    @staticmethod
    def backward(ctx, grad):
        torch_npu = _torch_npu()
        x, w, counts = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch_npu.npu_grouped_matmul(
            [grad], [w.transpose(1, 2)], group_list=counts, split_item=3, group_type=0, group_list_type=1
        )[0]
        dw = torch_npu.npu_grouped_matmul(
            [x.t()], [grad], group_list=counts, split_item=3, group_type=2, group_list_type=1
        )[0]
        return dx, dw.reshape(w.shape), None


def grouped_matmul(x, weights, tokens_per_expert):
    w = weights if isinstance(weights, torch.Tensor) else torch.stack(list(weights))
    if x.dim() != 2 or w.dim() != 3 or tokens_per_expert.numel() != w.shape[0]:
        raise ValueError(
            f"grouped_matmul: x {tuple(x.shape)} must be [T, K], weights {tuple(w.shape)} [E, K, N], "
            f"tokens_per_expert {tuple(tokens_per_expert.shape)} [E]"
        )
    if w.shape[0] > MAX_GROUPS:
        raise ValueError(
            f"grouped_matmul on npu: {w.shape[0]} experts on one rank, npu_grouped_matmul takes at most "
            f"{MAX_GROUPS} groups; raise --expert-model-parallel-size"
        )
    counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)  # group_list must be int64
    return _GroupedMatmul.apply(x, w.contiguous(), counts)


def _require_bf16(op: str, tokens) -> None:
    # torch_npu 2.13.0 docs: "当前版本permuted_tokens仅支持bfloat16"; casting fp32 tokens down would change the
    # numbers of an fp32 run behind the user's back, so the combination is refused instead.
    if tokens.dtype != torch.bfloat16:
        raise ValueError(
            f"{op} on npu takes bfloat16 tokens only (torch_npu 2.13.0), got {tokens.dtype}: "
            f"--use-fused-moe-token-permute-and-unpermute needs --bf16 on npu"
        )


def permute(tokens, indices):
    """npu_moe_token_permute -> (permuted_tokens, sorted_indices int32), same convention as the reference.
    indices go in as int64 (the documented dtype)."""
    _require_bf16("npu_moe_token_permute", tokens)
    return _torch_npu().npu_moe_token_permute(tokens, indices.to(torch.int64))


def unpermute(permuted_tokens, sorted_indices, probs):
    """npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs): probs in bf16, the tokens' dtype."""
    _require_bf16("npu_moe_token_unpermute", permuted_tokens)
    return _torch_npu().npu_moe_token_unpermute(
        permuted_tokens, sorted_indices.to(torch.int32), probs.to(permuted_tokens.dtype)
    )
