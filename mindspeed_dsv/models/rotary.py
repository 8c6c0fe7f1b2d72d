"""MLA's rotary embedding (queries and keys) through `ops.apply_rotary`, so --use-fused-rotary-pos-emb acts on
DeepSeek (npu_rotary_mul on npu, torch.compile on cuda, the torch reference elsewhere).

megatron-core 0.16.1's MLASelfAttention computes the YaRN/RoPE angles itself (`freqs` [s, 1, 1, d], the d/2
angles repeated, and YaRN's `mscale`) and applies them with `apply_rotary_pos_emb`, a name it looks up in its own
module when it runs; nothing in its constructor or spec selects another function (its fused alternative needs
Triton kernels and CUDA). So `use_ops_rotary_in_mla()` replaces that one attribute of
`megatron.core.transformer.multi_latent_attention`, once, with `mla_apply_rotary_pos_emb`: the same signature
and the same numbers (megatron's unfused path de-interleaves the pairs, then rotates halves with
cos(freqs) * mscale cast to the input's dtype; `ops.apply_rotary(interleaved=True)` computes exactly that).
Packed sequences ('thd', cu_seqlens) rotate each sample from position 0, as megatron's thd path does.

On cuda, --use-fused-rotary-pos-emb (rotary impl 'mla_triton') goes further: megatron-core ships Triton kernels
for MLA's rotary (`fused_mla_yarn_rope_apply`, taken when its config says `apply_rope_fusion`) that rotate the
query's rope part in place and split the key/value up-projection into the key (nope part + the shared rotated rope
part, expanded over heads) and the value in one kernel: no `cat`, no expand copy, no separate rotary passes.
`mla_rope_fusion_options` turns that on. Those kernels read YaRN's cached cos/sin, so plain RoPE is expressed as
YaRN with factor 1 (the same frequencies up to an fp32 rounding of the ramp blend, attention factor and softmax
scale 1).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import multi_latent_attention

from mindspeed_dsv.ops import get_ops

_MEGATRONS = multi_latent_attention.apply_rotary_pos_emb


def _positions_in_sample(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens] position of each packed row inside its sample (no host sync)."""
    rows = torch.arange(num_tokens, device=cu_seqlens.device)
    sample = torch.searchsorted(cu_seqlens.to(rows.dtype), rows, right=True) - 1
    return rows - cu_seqlens.to(rows.dtype)[sample]


def mla_apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """megatron's `apply_rotary_pos_emb` for MLA, computed by `ops.apply_rotary`.

    t: [s, b, h, d] (or [t, h, d] packed, with cu_seqlens); freqs: [max_s, 1, 1, d] with the d/2 angles repeated.
    """
    if not config.multi_latent_attention or config.rotary_interleaved or config.apply_rope_fusion:
        raise ValueError(
            "mla_apply_rotary_pos_emb computes MLA's unfused rotary only (multi_latent_attention=True, "
            f"rotary_interleaved=False, apply_rope_fusion=False); got {config.multi_latent_attention}, "
            f"{config.rotary_interleaved}, {config.apply_rope_fusion}"
        )
    if cp_group is not None and cp_group.size() > 1:
        raise NotImplementedError("MLA rotary through ops: context parallelism is not supported")
    dim = freqs.shape[-1]
    if t.shape[-1] != dim:
        raise ValueError(f"MLA rotary: t {tuple(t.shape)} and freqs {tuple(freqs.shape)} differ in the last dim")
    angles = freqs[..., : dim // 2]
    if cu_seqlens is not None:
        # [t, h, d] -> [t, 1, h, d] (the 4-D layout the kernels take), angles of each row's own position
        angles = angles.reshape(angles.shape[0], -1)[_positions_in_sample(cu_seqlens, t.shape[0])]
        angles = angles.view(t.shape[0], 1, 1, -1)
        t = t.unsqueeze(1)
    cos = (torch.cos(angles) * mscale).to(t.dtype)
    sin = (torch.sin(angles) * mscale).to(t.dtype)
    out = get_ops().apply_rotary(t, cos, sin, interleaved=True)
    return out.squeeze(1) if cu_seqlens is not None else out


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def mla_rope_fusion_options(impls: dict, cfg, tp: int = 1) -> dict:
    """TransformerConfig entries that put MLA's rotary into megatron's Triton kernels when the ops chose them.

    Those kernels take `tl.arange` over the nope, rope and value head dims (powers of 2 only) and mask a block of
    heads without its block offset, so a head count per TP rank that is not a power of 2 would let the last block
    write into the next token's rows: such shapes are refused here, at model build, naming the flag."""
    if impls.get("rotary") != "mla_triton":
        return {}
    heads = cfg.num_attention_heads // tp
    dims = {"qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "attention heads per TP rank": heads}
    bad = [f"{k} {v}" for k, v in dims.items() if not _pow2(v) or (k == "qk_rope_head_dim" and v % 4)]
    if bad:
        from mindspeed_dsv.ops import OpUnavailableError

        raise OpUnavailableError(
            f"--use-fused-rotary-pos-emb on cuda runs megatron-core's Triton MLA rope kernels, which need powers of 2 "
            f"(the rope dim at least 4); this model has {', '.join(bad)}: drop the flag for it")
    return {"apply_rope_fusion": True, "rope_type": "yarn"}


def use_ops_rotary_in_mla() -> None:
    """Route MLA's rotary through the ops layer (idempotent; called by the model builder)."""
    multi_latent_attention.apply_rotary_pos_emb = mla_apply_rotary_pos_emb


def use_megatrons_rotary_in_mla() -> None:
    """Put megatron's function back (tests comparing the two)."""
    multi_latent_attention.apply_rotary_pos_emb = _MEGATRONS
