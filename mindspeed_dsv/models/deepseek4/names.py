"""The DeepSeek-V4 name map: transformers' DeepseekV4ForCausalLM tensor names <-> our DeepSeekV4Model's names,
at TP 1 / PP 1 / EP 1. Same entry type (`TensorMap`) and split kinds as the V3 map in models/names.py, whose
`shard_for_rank` / `unshard` build and undo each entry; V4 adds one kind: EXPERT_SLICE, one expert's slice of
transformers' stacked expert tensors (experts.gate_up_proj [E, 2I, D] is exactly SequentialMLP's linear_fc1
per expert, gate rows then up rows; experts.down_proj [E, D, I] its linear_fc2).

Conversion, round-trip tests and (later) verify / LoRA export read this module; nothing else spells a V4
checkpoint name.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mindspeed_dsv.models.names import GLU, REPLICATED, NameMapError, TensorMap, shard_for_rank, unshard

from .config import CSA, HASH_MOE, SLIDING, DeepSeekV4Config

EXPERT_SLICE = "expert_slice"  # hf = (stacked [E, ...],); the mcore tensor is hf[0][m.expert]


def _one(mc: str, hf: str, layer: int | None = None) -> TensorMap:
    return TensorMap(mcore=mc, hf=(hf,), split=REPLICATED, hf_layer=layer)


def _compressor(mc: str, hf: str, layer: int) -> list[TensorMap]:
    return [_one(mc + k, hf + k, layer) for k in ("kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight")]


def layer_maps(cfg: DeepSeekV4Config, i: int) -> list[TensorMap]:
    hf, mc = f"model.layers.{i}.", f"layers.{i}."
    out = [
        _one(mc + f"{hc}.{k}", hf + f"{hc}.{k}", i) for hc in ("attn_hc", "ffn_hc") for k in ("fn", "base", "scale")
    ]
    pairs = [
        ("input_layernorm.weight", "input_layernorm.weight"),
        ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
        ("self_attention.q_layernorm.weight", "self_attn.q_a_norm.weight"),
        ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
        ("self_attention.linear_kv_proj.weight", "self_attn.kv_proj.weight"),
        ("self_attention.kv_layernorm.weight", "self_attn.kv_norm.weight"),
        ("self_attention.linear_o_group_proj", "self_attn.o_a_proj.weight"),
        ("self_attention.linear_proj.weight", "self_attn.o_b_proj.weight"),
        ("self_attention.attn_sink", "self_attn.sinks"),
        ("mlp.router.weight", "mlp.gate.weight"),
        ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight"),
    ]
    if cfg.mlp_layer_types[i] == HASH_MOE:
        pairs.append(("mlp.router.tid2eid", "mlp.gate.tid2eid"))
    else:
        pairs.append(("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"))
    out += [_one(mc + m, hf + h, i) for m, h in pairs]
    if cfg.layer_types[i] != SLIDING:
        out += _compressor(mc + "self_attention.compressor.window.", hf + "self_attn.compressor.", i)
    if cfg.layer_types[i] == CSA:
        idx_mc, idx_hf = mc + "self_attention.compressor.indexer.", hf + "self_attn.compressor.indexer."
        out += _compressor(idx_mc + "compressor.", idx_hf, i)
        out.append(_one(idx_mc + "q_b_proj.weight", idx_hf + "q_b_proj.weight", i))
        out.append(_one(idx_mc + "weights_proj.weight", idx_hf + "scorer.weights_proj.weight", i))
    out.append(TensorMap(
        mcore=mc + "mlp.shared_experts.linear_fc1.weight",
        hf=(hf + "mlp.shared_experts.gate_proj.weight", hf + "mlp.shared_experts.up_proj.weight"),
        split=GLU, hf_layer=i,
    ))
    for e in range(cfg.n_routed_experts):
        for fc, stacked in (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj")):
            out.append(TensorMap(mcore=mc + f"mlp.experts.local_experts.{e}.{fc}.weight",
                                 hf=(hf + f"mlp.experts.{stacked}",), split=EXPERT_SLICE, hf_layer=i, expert=e))
    return out


def model_maps(cfg: DeepSeekV4Config) -> list[TensorMap]:
    out = [
        _one("embedding.weight", "model.embed_tokens.weight"),
        _one("final_layernorm.weight", "model.norm.weight"),
        _one("output_layer.weight", "lm_head.weight"),
    ]
    out += [_one(f"hc_head.{k}", f"model.hc_head.{k}") for k in ("hc_fn", "hc_base", "hc_scale")]
    for i in range(cfg.num_hidden_layers):
        out += layer_maps(cfg, i)
    return out


def _check_names(have, want, side: str) -> None:
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise NameMapError(
            f"DeepSeek-V4 {side} state dict: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def hf_to_mcore(hf: Mapping[str, torch.Tensor], cfg: DeepSeekV4Config) -> dict[str, torch.Tensor]:
    """Our state dict from transformers' (every name must be used; none may be missing)."""
    maps = model_maps(cfg)
    _check_names(hf, {n for m in maps for n in m.hf}, "HF")

    def read(name, rows=None, cols=None):
        t = hf[name]
        return t[rows] if rows is not None else (t[:, cols] if cols is not None else t)

    out = {}
    for m in maps:
        if m.split == EXPERT_SLICE:
            stacked = hf[m.hf[0]]
            if stacked.shape[0] != cfg.n_routed_experts:
                raise NameMapError(f"{m.hf[0]}: {stacked.shape[0]} experts, the config has {cfg.n_routed_experts}")
            out[m.mcore] = stacked[m.expert]
        else:
            out[m.mcore] = shard_for_rank(m, read, lambda n: hf[n].shape)
    return out


def mcore_to_hf(mc: Mapping[str, torch.Tensor], cfg: DeepSeekV4Config) -> dict[str, torch.Tensor]:
    """transformers' state dict from ours (inverse of hf_to_mcore, bit for bit)."""
    maps = model_maps(cfg)
    _check_names({k for k in mc if not k.endswith("_extra_state")}, {m.mcore for m in maps}, "megatron")
    out, slices = {}, {}
    for m in maps:
        if m.split == EXPERT_SLICE:
            slices.setdefault(m.hf[0], {})[m.expert] = mc[m.mcore]
        else:
            out.update(unshard(m, [mc[m.mcore]]))
    for name, parts in slices.items():
        out[name] = torch.stack([parts[e] for e in range(len(parts))])
    return out
