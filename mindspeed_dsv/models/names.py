"""The one name map: HF DeepSeek-V3 tensor names <-> Megatron-Core tensor names <-> how each splits over TP/EP.

Conversion (hf2mcore, mcore2hf, reshard), `verify`, LoRA merge and PEFT export all read this module; nothing
else spells a checkpoint tensor name.

Megatron names follow megatron-core 0.16.1's local (non-TE) GPT layer spec with MLA
(`get_gpt_layer_local_spec(multi_latent_attention=True)`), with one change made by our layer spec: MLA's q/kv
*down* projections (`linear_q_down_proj`, `linear_kv_down_proj`) are megatron's TP-duplicated `Linear`, so every
TP rank holds them whole (REPLICATED, as are LoRA's A and B on them); the up projections are
ColumnParallelLinear and `linear_proj` RowParallelLinear. Gated MLPs store [gate; up] stacked in `linear_fc1`; under TP each rank holds
[gate_shard; up_shard]. Grouped-GEMM experts follow megatron's GroupedMLP: `weight1` is [H, E_local * 2I/tp]
whose memory is E_local blocks of fc1_shard^T ([H, 2I/tp]) and `weight2` is [E_local * I/tp, H] made of
fc2_shard^T blocks (GroupedMLP.forward views them as [E, H, -1] and [E, -1, H]).

The map is produced per rank file (tp_rank, pp_rank, ep_rank) and model chunk as a list of `TensorMap`.
`shard_for_rank` builds one rank's tensor from HF tensors (read lazily, only the rows/columns that rank
needs); `unshard` turns the TP shards of one entry back into full HF tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from mindspeed_dsv.models.config import DeepSeekConfig

# How one Megatron tensor relates to its HF tensor(s) and to TP.
REPLICATED = "replicated"  # every TP rank holds the full tensor (norms, router, expert bias, MLA down projections)
COLUMN = "column"  # split over TP along dim 0 (ColumnParallelLinear, VocabParallelEmbedding)
ROW = "row"  # split over TP along dim 1 (RowParallelLinear)
GLU = "glu"  # hf = (gate, up); full = [gate; up]; TP rank k holds [gate_k; up_k]
GROUPED_W1 = "grouped_w1"  # hf = (gate_e0, up_e0, gate_e1, up_e1, ...); GroupedMLP weight1
GROUPED_W2 = "grouped_w2"  # hf = (down_e0, down_e1, ...); GroupedMLP weight2
HEAD_PART = "head_part"  # --mla-mm-split: a per-head slice of one HF up-projection, split over TP by heads

SPLITS = (REPLICATED, COLUMN, ROW, GLU, GROUPED_W1, GROUPED_W2, HEAD_PART)


class NameMapError(ValueError):
    """A tensor that is missing or does not fit the requested layout; the message names it."""


@dataclass(frozen=True)
class TensorMap:
    mcore: str  # key in the model chunk's state_dict
    hf: tuple[str, ...]  # HF tensors it is made of, in order
    split: str  # one of SPLITS
    tp: int = 1  # TP degree applied to this tensor (1 = not split)
    tp_rank: int = 0
    hf_layer: int | None = None  # HF decoder layer index (MTP layers continue after the last), None = other
    # HEAD_PART only: (num_heads, per-head sizes of the HF tensor's parts, which part)
    head_part: tuple[int, tuple[int, ...], int] | None = None
    # For LoRA: the linear module (mcore path without '.weight') and the HF linear modules it covers
    lora_module: str | None = None
    expert: int | None = None  # global routed-expert id (SequentialMLP), for messages
    # Vocabulary padding (--make-vocab-size-divisible-by), embedding / output layer only: (HF rows, padded rows).
    # The Megatron tensor has the padded rows (zeros past the HF ones), split over TP; unshard strips them.
    rows: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------- model dims
def dims(cfg: Any) -> DeepSeekConfig:
    """The model facts the name map needs: the one DeepSeekConfig, from itself or a config.json dict."""
    if isinstance(cfg, DeepSeekConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return DeepSeekConfig.from_hf(cfg)
    raise TypeError(f"expected a DeepSeekConfig or a config.json dict, got {type(cfg).__name__}")


# --------------------------------------------------------------------------------------------- per layer
# (mcore suffix, hf suffix, split, lora-able linear?) for the attention block. HF names are DeepseekV3's.
def _attention(d: DeepSeekConfig, mla_mm_split: bool) -> list[tuple]:
    out = [("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED, None)]
    if d.q_lora_rank is None:
        out.append(("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",), COLUMN, None))
    else:
        out += [
            ("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), REPLICATED, None),
            ("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), REPLICATED, None),
        ]
    q_up = "self_attention.linear_q_up_proj.weight" if d.q_lora_rank is not None else None
    q_hf = "self_attn.q_b_proj.weight" if d.q_lora_rank is not None else None
    if q_up and not mla_mm_split:
        out.append((q_up, (q_hf,), COLUMN, None))
    elif q_up:
        sizes = (d.qk_nope_head_dim, d.qk_rope_head_dim)
        out += [
            ("self_attention.linear_qk_nope.weight", (q_hf,), HEAD_PART, (d.num_attention_heads, sizes, 0)),
            ("self_attention.linear_qk_rope.weight", (q_hf,), HEAD_PART, (d.num_attention_heads, sizes, 1)),
        ]
    out += [
        ("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",), REPLICATED, None),
        ("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), REPLICATED, None),
    ]
    if not mla_mm_split:
        out.append(("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), COLUMN, None))
    else:
        sizes = (d.qk_nope_head_dim, d.v_head_dim)
        out += [
            ("self_attention.linear_kv_nope.weight", ("self_attn.kv_b_proj.weight",), HEAD_PART,
             (d.num_attention_heads, sizes, 0)),
            ("self_attention.linear_v.weight", ("self_attn.kv_b_proj.weight",), HEAD_PART,
             (d.num_attention_heads, sizes, 1)),
        ]
    out += [
        ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW, None),
        ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED, None),
    ]
    return out


def layer_maps(
    d: DeepSeekConfig,
    layout,
    hf_index: int,
    mc_prefix: str,
    tp_rank: int,
    ep_rank: int,
    dense: bool,
    mla_mm_split: bool = False,
) -> list[TensorMap]:
    """The entries of one decoder layer (HF `model.layers.{hf_index}`) as stored in rank (tp_rank, ep_rank)
    under `mc_prefix` (e.g. 'decoder.layers.3.' or 'mtp.layers.0.transformer_layer.')."""
    hp = f"model.layers.{hf_index}."
    tp = layout.tp
    out: list[TensorMap] = []

    def add(mc, hf, split, part=None, tp_deg=None, expert=None):
        deg = 1 if split == REPLICATED else (tp if tp_deg is None else tp_deg)
        # LoRA attaches to linears only (not norms, router or expert bias); grouped experts have no per-expert linear.
        is_linear = mc.rsplit(".", 2)[-2].startswith("linear_")
        lora = mc_prefix + mc[: -len(".weight")] if is_linear and split not in (GROUPED_W1, GROUPED_W2) else None
        out.append(TensorMap(mcore=mc_prefix + mc, hf=tuple(hp + h for h in hf), split=split, tp=deg,
                             tp_rank=tp_rank if deg > 1 else 0, hf_layer=hf_index, head_part=part,
                             lora_module=lora, expert=expert))

    for mc, hf, split, part in _attention(d, mla_mm_split):
        add(mc, hf, split, part)
    if dense:
        add("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU)
        add("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW)
        return out

    add("mlp.router.weight", ("mlp.gate.weight",), REPLICATED)
    add("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), REPLICATED)
    etp = layout.expert_tp
    experts = layout.local_experts(ep_rank, tp_rank)
    if layout.moe_grouped_gemm:
        w1 = tuple(f"mlp.experts.{e}.{p}_proj.weight" for e in experts for p in ("gate", "up"))
        w2 = tuple(f"mlp.experts.{e}.down_proj.weight" for e in experts)
        add("mlp.experts.weight1", w1, GROUPED_W1, tp_deg=etp)
        add("mlp.experts.weight2", w2, GROUPED_W2, tp_deg=etp)
    else:
        for j, e in enumerate(experts):
            add(f"mlp.experts.local_experts.{j}.linear_fc1.weight",
                (f"mlp.experts.{e}.gate_proj.weight", f"mlp.experts.{e}.up_proj.weight"), GLU, tp_deg=etp, expert=e)
            add(f"mlp.experts.local_experts.{j}.linear_fc2.weight", (f"mlp.experts.{e}.down_proj.weight",), ROW,
                tp_deg=etp, expert=e)
    if d.n_shared_experts:
        add("mlp.shared_experts.linear_fc1.weight",
            ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), GLU)
        add("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), ROW)
    return out


def vocab_rows(d: DeepSeekConfig, layout) -> tuple[int, int] | None:
    """(HF rows, padded rows) of the embedding / output layer under `layout`, None when nothing is padded."""
    padded = layout.padded_vocab_size(d.vocab_size) if layout is not None else d.vocab_size
    return None if padded == d.vocab_size else (d.vocab_size, padded)


def embedding_map(tp: int = 1, tp_rank: int = 0, rows: tuple[int, int] | None = None) -> TensorMap:
    return TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), COLUMN, tp,
                     tp_rank if tp > 1 else 0, rows=rows)


def final_norm_map() -> TensorMap:
    return TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED)


def output_map(tp: int = 1, tp_rank: int = 0, rows: tuple[int, int] | None = None) -> TensorMap:
    return TensorMap("output_layer.weight", ("lm_head.weight",), COLUMN, tp, tp_rank if tp > 1 else 0, rows=rows)


def mtp_own_maps(d: DeepSeekConfig, k: int, tp: int = 1, tp_rank: int = 0) -> tuple[list[TensorMap], TensorMap]:
    """MTP layer k's own tensors around its transformer layer: (enorm, hnorm, eh_proj) before, final norm after."""
    h = d.num_hidden_layers + k
    hp, mp = f"model.layers.{h}.", f"mtp.layers.{k}."
    before = [
        TensorMap(mp + "enorm.weight", (hp + "enorm.weight",), REPLICATED, hf_layer=h),
        TensorMap(mp + "hnorm.weight", (hp + "hnorm.weight",), REPLICATED, hf_layer=h),
        TensorMap(mp + "eh_proj.weight", (hp + "eh_proj.weight",), COLUMN, tp, tp_rank if tp > 1 else 0,
                  hf_layer=h, lora_module=None),
    ]
    return before, TensorMap(mp + "final_layernorm.weight", (hp + "shared_head.norm.weight",), REPLICATED, hf_layer=h)


def rank_maps(
    cfg: Any, layout, tp_rank: int, pp_rank: int, ep_rank: int, chunk: int = 0, mla_mm_split: bool = False,
) -> list[TensorMap]:
    """Every tensor of model chunk `chunk` in rank file (tp_rank, pp_rank, ep_rank), in state_dict order."""
    d = dims(cfg)
    tp = layout.tp
    out: list[TensorMap] = []
    has_mtp = layout.has_mtp(pp_rank, chunk)
    rows = vocab_rows(d, layout)
    # Megatron builds the embedding on the first stage and, for MTP, also on the stage that holds MTP.
    if layout.has_embedding(pp_rank, chunk) or has_mtp:
        out.append(embedding_map(tp, tp_rank, rows))
    for i, layer_id in enumerate(layout.stage_layers(pp_rank, chunk)):
        hf = layout.hf_layer_index(layer_id)
        if hf is None:  # noop layer: an identity module without parameters
            continue
        out += layer_maps(d, layout, hf, f"decoder.layers.{i}.", tp_rank, ep_rank, layout.is_dense(layer_id),
                          mla_mm_split)
    if layout.has_output(pp_rank, chunk):
        out.append(final_norm_map())
    if has_mtp:
        for k in range(layout.mtp_num_layers):
            before, after = mtp_own_maps(d, k, tp, tp_rank)
            out += before
            out += layer_maps(d, layout, d.num_hidden_layers + k, f"mtp.layers.{k}.transformer_layer.", tp_rank,
                              ep_rank, not d.mtp_layer_is_moe, mla_mm_split)
            out.append(after)
    if layout.has_output(pp_rank, chunk):
        out.append(output_map(tp, tp_rank, rows))
    return out


def mtp_shared_names(cfg: Any, k: int) -> dict[str, str]:
    """HF tensors of MTP layer k that Megatron does not store separately (it reuses the main embedding and
    output layer): HF name -> the HF name whose value it takes."""
    d = dims(cfg)
    hp = f"model.layers.{d.num_hidden_layers + k}."
    return {hp + "embed_tokens.weight": "model.embed_tokens.weight", hp + "shared_head.head.weight": "lm_head.weight"}


def chunk_key(layout, chunk: int) -> str:
    """The key of a model chunk in model_optim_rng.pt: 'model' without VPP/dualpipev, else 'model{chunk}'."""
    return "model" if layout.num_model_chunks == 1 else f"model{chunk}"


# --------------------------------------------------------------------------------------------- shard / unshard
# `read(name, rows=None, cols=None)` returns HF tensor `name`, or only rows/cols (slice objects) of it.
Reader = Callable[..., torch.Tensor]


def _range(n: int, tp: int, k: int, what: str) -> slice:
    if n % tp:
        raise NameMapError(f"{what}: size {n} is not divisible by TP {tp}")
    s = n // tp
    return slice(k * s, (k + 1) * s)


def shard_for_rank(m: TensorMap, read: Reader, shape_of: Callable[[str], Sequence[int]]) -> torch.Tensor:
    """The tensor rank m.tp_rank stores for entry m, reading only what that rank needs."""
    tp, k = m.tp, m.tp_rank
    where = f"{m.mcore} (from {', '.join(m.hf[:2])}{', ...' if len(m.hf) > 2 else ''}) with TP {tp}"
    if m.split == REPLICATED:
        return read(m.hf[0])
    if m.split == COLUMN and m.rows is not None:  # padded vocabulary: this rank's rows, zeros past the HF ones
        real, padded = m.rows
        want = _range(padded, tp, k, where)
        have = slice(min(want.start, real), min(want.stop, real))
        t = read(m.hf[0], rows=have if have.stop > have.start else slice(0, 1))[: have.stop - have.start]
        pad = t.new_zeros((want.stop - want.start - t.shape[0],) + tuple(t.shape[1:]))
        return torch.cat([t, pad]) if pad.shape[0] else t
    if m.split == COLUMN:
        rows = None if tp == 1 else _range(shape_of(m.hf[0])[0], tp, k, where)
        return read(m.hf[0], rows=rows)
    if m.split == ROW:
        cols = None if tp == 1 else _range(shape_of(m.hf[0])[1], tp, k, where)
        return read(m.hf[0], cols=cols)
    if m.split == GLU:
        rows = None if tp == 1 else _range(shape_of(m.hf[0])[0], tp, k, where)
        return torch.cat([read(m.hf[0], rows=rows), read(m.hf[1], rows=rows)], dim=0)
    if m.split == GROUPED_W1:
        blocks = []
        for e in range(0, len(m.hf), 2):
            rows = None if tp == 1 else _range(shape_of(m.hf[e])[0], tp, k, where)
            blocks.append(torch.cat([read(m.hf[e], rows=rows), read(m.hf[e + 1], rows=rows)], dim=0).t())
        w = torch.stack(blocks)  # [E, H, 2I/tp]
        return w.reshape(w.shape[1], -1)
    if m.split == GROUPED_W2:
        blocks = []
        for name in m.hf:
            cols = None if tp == 1 else _range(shape_of(name)[1], tp, k, where)
            blocks.append(read(name, cols=cols).t())
        w = torch.stack(blocks)  # [E, I/tp, H]
        return w.reshape(-1, w.shape[2])
    if m.split == HEAD_PART:
        n, sizes, part = m.head_part
        full_rows = shape_of(m.hf[0])[0]
        if full_rows != n * sum(sizes):
            raise NameMapError(f"{m.hf[0]}: {full_rows} rows, expected {n} heads x {sum(sizes)}")
        rows = None if tp == 1 else _range(full_rows, tp, k, where)
        w = read(m.hf[0], rows=rows)
        off = sum(sizes[:part])
        return w.view(-1, sum(sizes), w.shape[-1])[:, off:off + sizes[part]].reshape(-1, w.shape[-1]).contiguous()
    raise NameMapError(f"unknown split {m.split!r} for {m.mcore}")


def unshard(m: TensorMap, shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full HF tensors from the TP shards (ordered by tp rank; one shard if m.tp == 1) of entry m.
    HEAD_PART entries return their part under the HF name; `merge_head_parts` joins them."""
    if len(shards) != m.tp:
        raise NameMapError(f"{m.mcore}: got {len(shards)} TP shards, the layout has TP {m.tp}")
    if m.split == REPLICATED:
        return {m.hf[0]: shards[0]}
    if m.split == COLUMN:
        full = shards[0] if m.tp == 1 else torch.cat(list(shards), 0)
        if m.rows is not None:  # padded vocabulary: the HF rows only
            if full.shape[0] != m.rows[1]:
                raise NameMapError(f"{m.mcore}: {full.shape[0]} rows over TP, the padded vocabulary has {m.rows[1]}")
            full = full[: m.rows[0]].contiguous()
        return {m.hf[0]: full}
    if m.split == ROW:
        return {m.hf[0]: shards[0] if m.tp == 1 else torch.cat(list(shards), 1)}
    if m.split == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {m.hf[0]: torch.cat([h[0] for h in halves], 0), m.hf[1]: torch.cat([h[1] for h in halves], 0)}
    if m.split == GROUPED_W1:
        n_exp = len(m.hf) // 2
        per = [s.reshape(n_exp, s.shape[0], -1) for s in shards]  # [E, H, 2I/tp], the GroupedMLP view
        out = {}
        for e in range(n_exp):
            halves = [p[e].t().chunk(2, dim=0) for p in per]
            out[m.hf[2 * e]] = torch.cat([h[0] for h in halves], 0).contiguous()
            out[m.hf[2 * e + 1]] = torch.cat([h[1] for h in halves], 0).contiguous()
        return out
    if m.split == GROUPED_W2:
        n_exp = len(m.hf)
        per = [s.reshape(n_exp, -1, s.shape[-1]) for s in shards]  # [E, I/tp, H]
        return {m.hf[e]: torch.cat([p[e].t() for p in per], 1).contiguous() for e in range(n_exp)}
    if m.split == HEAD_PART:
        return {m.hf[0]: shards[0] if m.tp == 1 else torch.cat(list(shards), 0)}
    raise NameMapError(f"unknown split {m.split!r} for {m.mcore}")


def merge_head_parts(head_part: tuple[int, tuple[int, ...], int], parts: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Inverse of HEAD_PART: the per-head parts (full over TP) back into one [n*sum(sizes), in] tensor."""
    n, sizes, _ = head_part
    missing = [i for i in range(len(sizes)) if i not in parts]
    if missing:
        raise NameMapError(f"--mla-mm-split: part(s) {missing} of a split up-projection are missing")
    views = [parts[i].reshape(n, sizes[i], -1) for i in range(len(sizes))]
    return torch.cat(views, dim=1).reshape(n * sum(sizes), -1).contiguous()


# --------------------------------------------------------------------------------------------- LoRA
def lora_splits(split: str) -> tuple[str, str]:
    """TP split of (lora_A, lora_B) for a LoRA on a base linear with `split`: a column-parallel base keeps A
    whole and splits B by rows; a row-parallel base splits A by columns and keeps B whole."""
    if split in (COLUMN, HEAD_PART):
        return REPLICATED, COLUMN
    if split == GLU:
        return REPLICATED, GLU
    if split == ROW:
        return ROW, REPLICATED
    if split == REPLICATED:  # MLA's down projections: base and adapter are whole on every TP rank
        return REPLICATED, REPLICATED
    raise NameMapError(f"LoRA on a {split} tensor is not supported")


# HF (PEFT) module name of each LoRA-able Megatron linear (the last path component).
MCORE_TO_HF_MODULE = {
    "linear_q_proj": ["q_proj"],
    "linear_q_down_proj": ["q_a_proj"],
    "linear_q_up_proj": ["q_b_proj"],
    "linear_kv_down_proj": ["kv_a_proj_with_mqa"],
    "linear_kv_up_proj": ["kv_b_proj"],
    "linear_proj": ["o_proj"],
    "linear_fc1": ["gate_proj", "up_proj"],
    "linear_fc2": ["down_proj"],
    "eh_proj": ["eh_proj"],
}


def hf_module(hf_weight_name: str) -> str:
    """'model.layers.0.self_attn.q_b_proj.weight' -> 'model.layers.0.self_attn.q_b_proj'."""
    return hf_weight_name[: -len(".weight")]


__all__ = [
    "COLUMN", "dims", "GLU", "GROUPED_W1", "GROUPED_W2", "HEAD_PART", "MCORE_TO_HF_MODULE", "NameMapError", "REPLICATED",
    "ROW", "SPLITS", "TensorMap", "chunk_key", "expected_hf_shape", "full_shape", "hf_module", "layer_maps",
    "lora_splits", "merge_head_parts", "mtp_shared_names", "rank_maps", "shard_for_rank", "unshard",
    "embedding_map", "final_norm_map", "output_map", "mtp_own_maps", "whole_layer_maps",
]


def expected_hf_shape(cfg: Any, name: str) -> tuple[int, ...] | None:
    """The shape config.json implies for HF tensor `name` (None for a name this map does not know)."""
    d = dims(cfg)
    H, n = d.hidden_size, d.num_attention_heads
    qk = d.qk_nope_head_dim + d.qk_rope_head_dim
    top = {"model.embed_tokens.weight": (d.vocab_size, H), "lm_head.weight": (d.vocab_size, H),
           "model.norm.weight": (H,)}
    if name in top:
        return top[name]
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return None
    suffix = ".".join(parts[3:])
    if suffix.startswith("mlp.experts.") and suffix.split(".")[2].isdigit():
        suffix = "mlp.experts.E." + ".".join(suffix.split(".")[3:])
    I, Im = d.intermediate_size, d.moe_intermediate_size
    table = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (n * qk, H),
        "self_attn.q_a_proj.weight": (d.q_lora_rank, H), "self_attn.q_a_layernorm.weight": (d.q_lora_rank,),
        "self_attn.q_b_proj.weight": (n * qk, d.q_lora_rank),
        "self_attn.kv_a_proj_with_mqa.weight": (d.kv_lora_rank + d.qk_rope_head_dim, H),
        "self_attn.kv_a_layernorm.weight": (d.kv_lora_rank,),
        "self_attn.kv_b_proj.weight": (n * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank),
        "self_attn.o_proj.weight": (H, n * d.v_head_dim),
        "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I),
        "mlp.gate.weight": (d.n_routed_experts, H), "mlp.gate.e_score_correction_bias": (d.n_routed_experts,),
        "mlp.experts.E.gate_proj.weight": (Im, H), "mlp.experts.E.up_proj.weight": (Im, H),
        "mlp.experts.E.down_proj.weight": (H, Im),
        "mlp.shared_experts.gate_proj.weight": (Im * d.n_shared_experts, H),
        "mlp.shared_experts.up_proj.weight": (Im * d.n_shared_experts, H),
        "mlp.shared_experts.down_proj.weight": (H, Im * d.n_shared_experts),
        "enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H),
        "shared_head.norm.weight": (H,), "embed_tokens.weight": (d.vocab_size, H),
        "shared_head.head.weight": (d.vocab_size, H),
    }
    return table.get(suffix)


# --------------------------------------------------------------------------------------------- whole shapes
def full_shape(cfg: Any, m: TensorMap) -> tuple[int, ...]:
    """Entry m's Megatron shape before any TP split (one expert's for a per-expert entry), from the HF shapes
    config.json implies (expected_hf_shape): the one source of tensor shapes for conversion and the planner."""
    d = dims(cfg)
    hf = [expected_hf_shape(d, h) for h in m.hf]
    if any(s is None for s in hf):
        raise NameMapError(f"{m.mcore}: no shape known for {[h for h, s in zip(m.hf, hf) if s is None]}")
    if m.split == COLUMN and m.rows is not None:
        return (m.rows[1],) + tuple(hf[0][1:])
    if m.split in (REPLICATED, COLUMN, ROW):
        return tuple(hf[0])
    if m.split == GLU:
        return (hf[0][0] + hf[1][0], hf[0][1])
    if m.split == HEAD_PART:
        n, sizes, part = m.head_part
        return (n * sizes[part], hf[0][1])
    if m.split == GROUPED_W1:  # [H, E * 2I]
        return (hf[0][1], sum(s[0] for s in hf))
    if m.split == GROUPED_W2:  # [E * I, H]
        return (sum(s[1] for s in hf), hf[0][0])
    raise NameMapError(f"unknown split {m.split!r} for {m.mcore}")


def whole_layer_maps(cfg: Any, dense: bool, mla_mm_split: bool = False) -> list[TensorMap]:
    """One decoder layer's tensors unsplit (TP 1, EP 1, one SequentialMLP entry per routed expert), named
    without the 'decoder.layers.N.' prefix: what the planner prices, with the rank files' kinds and split rules."""
    from mindspeed_dsv.layout import ParallelLayout  # layout does not import names; lazily all the same

    d = dims(cfg)
    layout = ParallelLayout(mtp_num_layers=0).with_model_defaults(d)
    return layer_maps(d, layout, 0, "", 0, 0, dense, mla_mm_split)
