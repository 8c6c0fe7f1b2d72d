"""The DeepSeek-V4 name map: transformers' DeepseekV4ForCausalLM tensor names <-> our DeepSeekV4Model's names,
at TP 1 / PP 1 / EP 1. Same entry type (`TensorMap`) and split kinds as the V3 map in models/names.py, whose
`shard_for_rank` / `unshard` build and undo each entry; V4 adds one kind: EXPERT_SLICE, one expert's slice of
transformers' stacked expert tensors (experts.gate_up_proj [E, 2I, D] is exactly SequentialMLP's linear_fc1
per expert, gate rows then up rows; experts.down_proj [E, D, I] its linear_fc2).

The official release spells the same tensors differently (bare `layers.N.attn.wq_a.weight`, one tensor per
routed expert `ffn.experts.E.w1/w2/w3`); `official_to_transformers` / `transformers_to_official` translate,
and `hf_to_mcore` accepts either spelling.

Conversion, round-trip tests and (later) verify / LoRA export read this module; nothing else spells a V4
checkpoint name.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from mindspeed_dsv.models.names import GLU, REPLICATED, NameMapError, TensorMap, shard_for_rank, unshard

from .config import CSA, HASH_MOE, SLIDING, DeepSeekV4Config

EXPERT_SLICE = "expert_slice"  # hf = (stacked [E, ...],); the mcore tensor is hf[0][m.expert]


def _one(mc: str, hf: str, layer: int | None = None) -> TensorMap:
    return TensorMap(mcore=mc, hf=(hf,), split=REPLICATED, hf_layer=layer)


def _compressor(mc: str, hf: str, layer: int) -> list[TensorMap]:
    return [_one(mc + k, hf + k, layer) for k in ("kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight")]


# The megatron linears LoRA can adapt (peft.lora.LORA_TARGET_MODULES spells the same leaf names); the compressors'
# and indexers' projections, the router and the grouped output projection (a Parameter) are not among them.
LORA_LINEARS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_proj", "linear_proj", "linear_fc1", "linear_fc2")


def lora_module_of(mcore: str) -> str | None:
    """The LoRA module path of a linear's weight (`...linear_proj.weight` -> `...linear_proj`), None otherwise."""
    if not mcore.endswith(".weight"):
        return None
    module = mcore[:-len(".weight")]
    return module if module.rsplit(".", 1)[-1] in LORA_LINEARS else None


def _lora(m: TensorMap) -> TensorMap:
    return dataclasses.replace(m, lora_module=lora_module_of(m.mcore))


def layer_maps(cfg: DeepSeekV4Config, i: int, hf: str | None = None, mc: str | None = None) -> list[TensorMap]:
    """Decoder layer i (MTP layers: i = num_hidden_layers + k, under the MTP prefixes)."""
    hf = f"model.layers.{i}." if hf is None else hf
    mc = f"layers.{i}." if mc is None else mc
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
    if cfg.mlp_type(i) == HASH_MOE:
        pairs.append(("mlp.router.tid2eid", "mlp.gate.tid2eid"))
    else:
        pairs.append(("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"))
    out += [_lora(_one(mc + m, hf + h, i)) for m, h in pairs]
    if cfg.attention_type(i) != SLIDING:
        out += _compressor(mc + "self_attention.compressor.window.", hf + "self_attn.compressor.", i)
    if cfg.attention_type(i) == CSA:
        idx_mc, idx_hf = mc + "self_attention.compressor.indexer.", hf + "self_attn.compressor.indexer."
        out += _compressor(idx_mc + "compressor.", idx_hf, i)
        out.append(_one(idx_mc + "q_b_proj.weight", idx_hf + "q_b_proj.weight", i))
        out.append(_one(idx_mc + "weights_proj.weight", idx_hf + "scorer.weights_proj.weight", i))
    out.append(_lora(TensorMap(
        mcore=mc + "mlp.shared_experts.linear_fc1.weight",
        hf=(hf + "mlp.shared_experts.gate_proj.weight", hf + "mlp.shared_experts.up_proj.weight"),
        split=GLU, hf_layer=i,
    )))
    for e in range(cfg.n_routed_experts):
        for fc, stacked in (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj")):
            out.append(_lora(TensorMap(mcore=mc + f"mlp.experts.local_experts.{e}.{fc}.weight",
                                       hf=(hf + f"mlp.experts.{stacked}",), split=EXPERT_SLICE, hf_layer=i,
                                       expert=e)))
    return out


def mtp_maps(cfg: DeepSeekV4Config, k: int) -> list[TensorMap]:
    """MTP depth k. transformers drops MTP, so its side is our own spelling `model.mtp.{k}.*` (the release's
    `mtp.{k}.*` renamed as its decoder layers are); ours is `mtp.layers.{k}.*` around a V4 decoder layer."""
    i, hf, mc = cfg.num_hidden_layers + k, f"model.mtp.{k}.", f"mtp.layers.{k}."
    own = [("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"), ("e_proj.weight", "e_proj.weight"),
           ("h_proj.weight", "h_proj.weight"), ("final_layernorm.weight", "norm.weight")]
    own += [(f"hc_head.{w}", f"hc_head.{w}") for w in ("hc_fn", "hc_base", "hc_scale")]
    return [_one(mc + m, hf + h, i) for m, h in own] + layer_maps(cfg, i, hf, mc + "transformer_layer.")


def model_maps(cfg: DeepSeekV4Config, mtp_num_layers: int = 0) -> list[TensorMap]:
    out = [
        _one("embedding.weight", "model.embed_tokens.weight"),
        _one("final_layernorm.weight", "model.norm.weight"),
        _one("output_layer.weight", "lm_head.weight"),
    ]
    out += [_one(f"hc_head.{k}", f"model.hc_head.{k}") for k in ("hc_fn", "hc_base", "hc_scale")]
    for i in range(cfg.num_hidden_layers):
        out += layer_maps(cfg, i)
    for k in range(mtp_num_layers):
        out += mtp_maps(cfg, k)
    return out


def _check_names(have, want, side: str) -> None:
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise NameMapError(
            f"DeepSeek-V4 {side} state dict: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def hf_to_mcore(hf: Mapping[str, torch.Tensor], cfg: DeepSeekV4Config, mtp_num_layers: int = 0
                ) -> dict[str, torch.Tensor]:
    """Our state dict from transformers' or the official release's (every name must be used; none may be
    missing). MTP depths from mtp_num_layers on are left out (training without them)."""
    if is_official_spelling(hf):
        hf = official_to_transformers(hf, cfg)
    hf = {n: t for n, t in hf.items() if _mtp_depth(n) < mtp_num_layers}
    maps = model_maps(cfg, mtp_num_layers)
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


def _mtp_depth(name: str) -> float:
    """k of a transformers-side `model.mtp.{k}.*` name, -inf for other names."""
    return int(name.split(".")[2]) if name.startswith("model.mtp.") else float("-inf")


def mcore_to_hf(mc: Mapping[str, torch.Tensor], cfg: DeepSeekV4Config, mtp_num_layers: int = 0
                ) -> dict[str, torch.Tensor]:
    """transformers' state dict from ours (inverse of hf_to_mcore, bit for bit)."""
    maps = model_maps(cfg, mtp_num_layers)
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


# ----------------------------------------------------------------------------- the official release's names
_OFFICIAL_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
# within layers.N. : official suffix -> transformers suffix (per-expert tensors are handled apart)
_OFFICIAL_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"hc_{blk}_{k}": f"{blk}_hc.{k}" for blk in ("attn", "ffn") for k in ("fn", "base", "scale")},
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    **{f"attn.{src}compressor.{a}": f"self_attn.compressor.{dst}{b}"
       for src, dst in (("", ""), ("indexer.", "indexer."))
       for a, b in (("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"), ("ape", "position_bias"),
                    ("norm.weight", "kv_norm.weight"))},
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_HF_TO_OFFICIAL_LAYER = {v: k for k, v in _OFFICIAL_LAYER.items()}
# within mtp.K. : the MTP layer's own tensors (its decoder-layer tensors are spelled as in layers.N.)
_OFFICIAL_MTP = {
    **{f"{w}.weight": f"{w}.weight" for w in ("enorm", "hnorm", "e_proj", "h_proj", "norm")},
    **{f"hc_head_{k}": f"hc_head.hc_{k}" for k in ("fn", "base", "scale")},
}
_HF_TO_OFFICIAL_MTP = {v: k for k, v in _OFFICIAL_MTP.items()}


def is_official_spelling(names) -> bool:
    return any(n.startswith("layers.") or n in _OFFICIAL_GLOBAL for n in names)


def official_to_transformers(sd: Mapping[str, torch.Tensor], cfg: DeepSeekV4Config) -> dict[str, torch.Tensor]:
    """The release's names -> transformers' (routed experts stacked as transformers holds them). Quantized
    tensors (`.scale` siblings) are refused: not converted yet. MTP depth K (`mtp.K.*`) becomes our
    transformers-side spelling `model.mtp.K.*`."""
    out, experts = {}, {}
    for name, t in sd.items():
        if name.endswith(".scale"):
            raise NameMapError(f"{name}: FP8/FP4 block scales (dequantization) is not supported for DeepSeek-V4 yet")
        if name in _OFFICIAL_GLOBAL:
            out[_OFFICIAL_GLOBAL[name]] = t
            continue
        parts = name.split(".", 2)
        if parts[0] not in ("layers", "mtp") or len(parts) < 3 or not parts[1].isdigit():
            raise NameMapError(f"{name}: not a DeepSeek-V4 tensor name")
        src, rest = f"{parts[0]}.{int(parts[1])}.", parts[2]
        dst = f"model.{src}"
        if rest.startswith("ffn.experts."):
            e, w = rest[len("ffn.experts."):].split(".", 1)
            experts.setdefault(src, {})[(int(e), w)] = t
        elif rest in _OFFICIAL_LAYER:
            out[dst + _OFFICIAL_LAYER[rest]] = t
        elif parts[0] == "mtp" and rest in _OFFICIAL_MTP:
            out[dst + _OFFICIAL_MTP[rest]] = t
        else:
            raise NameMapError(f"{name}: not a DeepSeek-V4 tensor name")
    for src, per in experts.items():
        try:
            out[f"model.{src}mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([per[(e, "w1.weight")], per[(e, "w3.weight")]], 0) for e in range(cfg.n_routed_experts)])
            out[f"model.{src}mlp.experts.down_proj"] = torch.stack(
                [per[(e, "w2.weight")] for e in range(cfg.n_routed_experts)])
        except KeyError as err:
            e, w = err.args[0]
            raise NameMapError(f"{src}ffn.experts.{e}.{w}: missing") from None
        if len(per) != 3 * cfg.n_routed_experts:
            raise NameMapError(f"{src}ffn.experts: {len(per)} tensors, expected {3 * cfg.n_routed_experts}")
    return out


def transformers_to_official(sd: Mapping[str, torch.Tensor], cfg: DeepSeekV4Config) -> dict[str, torch.Tensor]:
    """Inverse of official_to_transformers."""
    to_official = {v: k for k, v in _OFFICIAL_GLOBAL.items()}
    out = {}
    for name, t in sd.items():
        if name in to_official:
            out[to_official[name]] = t
            continue
        parts = name.split(".", 3)
        if len(parts) < 4 or parts[0] != "model" or parts[1] not in ("layers", "mtp") or not parts[2].isdigit():
            raise NameMapError(f"{name}: not a DeepSeek-V4 tensor name")
        dst, rest = f"{parts[1]}.{parts[2]}.", parts[3]
        if rest == "mlp.experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{dst}ffn.experts.{e}.w1.weight"] = gate[e].contiguous()
                out[f"{dst}ffn.experts.{e}.w3.weight"] = up[e].contiguous()
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{dst}ffn.experts.{e}.w2.weight"] = t[e].contiguous()
        elif rest in _HF_TO_OFFICIAL_LAYER:
            out[dst + _HF_TO_OFFICIAL_LAYER[rest]] = t
        elif parts[1] == "mtp" and rest in _HF_TO_OFFICIAL_MTP:
            out[dst + _HF_TO_OFFICIAL_MTP[rest]] = t
        else:
            raise NameMapError(f"{name}: not a DeepSeek-V4 tensor name")
    return out
