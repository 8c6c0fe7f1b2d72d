"""Test-side helpers for DeepSeek-V4: the tiny HF config and a random transformers DeepseekV4ForCausalLM built
from it. Every parameter and buffer is randomised, including the ones transformers initialises to zeros or ones
(attention sinks, compressor position biases, hyper-connection base/scale, router bias, the hash table), so a
wrong mapping of any of them shows up in the logits."""

from __future__ import annotations

import json
import os

import torch

from tests.model.hf_reference import ROOT

TINY_V4_DIR = os.path.join(ROOT, "assets", "tiny_deepseek4")


def tiny_v4_config(**overrides) -> dict:
    with open(os.path.join(TINY_V4_DIR, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(overrides)
    n = cfg["num_hidden_layers"]
    for key in ("layer_types", "mlp_layer_types"):  # a shorter model keeps the first layers' types
        cfg[key] = cfg[key][:n]
    return cfg


def single_layer_config(layer_type: str, mlp_type: str = "moe", **overrides) -> dict:
    """One decoder layer of one attention type: the unit the layer-by-layer equality tests start from."""
    return tiny_v4_config(num_hidden_layers=1, layer_types=[layer_type], mlp_layer_types=[mlp_type], **overrides)


def make_hf_v4_model(hf_cfg: dict, seed: int = 0, scale: float = 1.0):
    """`scale` multiplies the spread of the weight matrices (0.1, experts 0.2): the tiny widths use 1; real widths
    (thousands of inputs per output) need ~0.2 to keep activations and logits of ordinary size."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV4Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("hc_scale", ".scale")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")) or ".shared_experts." in name:
                p.normal_(0.0, 0.2 * scale)  # wide enough that the SwiGLU clamp (swiglu_limit) cuts some entries
            elif name.endswith(("sinks", "position_bias", "base", "hc_base")):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.1 * scale if p.dim() > 1 else 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
            elif name.endswith("tid2eid"):
                # k distinct experts per token, as the released tables hold
                b.copy_(torch.stack([torch.randperm(config.n_routed_experts)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def make_hf_v4_mtp(hf_cfg: dict, k: int):
    """MTP depth k for the model of `hf_cfg`: (a one-layer transformers model whose decoder layer, hc_head and
    norm are the depth's block: sliding attention, learned routing; the depth's tensors under our
    transformers-side names `model.mtp.{k}.*`, including that block's). transformers has no MTP, so the
    depth's own tensors (enorm, hnorm, e_proj, h_proj) are made here, randomised as the rest."""
    block = make_hf_v4_model(dict(hf_cfg, num_hidden_layers=1, layer_types=["sliding_attention"],
                                  mlp_layer_types=["moe"]), seed=100 + k)
    d = hf_cfg["hidden_size"]
    g = torch.Generator().manual_seed(200 + k)
    p = f"model.mtp.{k}."
    sd = {p + f"{n}.weight": 1.0 + 0.1 * torch.randn(d, generator=g) for n in ("enorm", "hnorm")}
    sd.update({p + f"{n}.weight": 0.1 * torch.randn(d, d, generator=g) for n in ("e_proj", "h_proj")})
    for name, t in block.state_dict(keep_vars=True).items():  # the block's own parameters (their grads)
        if name.startswith("model.layers.0."):
            sd[p + name[len("model.layers.0."):]] = t
        elif name.startswith("model.hc_head.") or name == "model.norm.weight":
            sd[p + name[len("model."):]] = t
    return block, sd


def token_ids(vocab: int, batch: int = 2, seq: int = 30, seed: int = 1) -> torch.Tensor:
    """Default length 30: not a multiple of either compression rate (4, 8) and longer than the sliding window."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def hf_v4_to_ours(hf_model, model, n_experts: int, ep_rank: int = 0, ep_size: int = 1, mtp_sd=None) -> None:
    """Copy transformers' weights into our DeepSeekV4Model name by name (written independently of the V4
    name map, so the model tests do not trust the converter). Every target tensor must be covered.
    With expert parallelism this rank holds global experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) as
    local_experts 0..E/ep-1."""
    local = n_experts // ep_size
    first = ep_rank * local
    sd = dict(hf_model.state_dict())
    sd.update(mtp_sd or {})  # MTP depths: make_hf_v4_mtp's `model.mtp.{k}.*` tensors
    out = {
        "embedding.weight": sd["model.embed_tokens.weight"],
        "final_layernorm.weight": sd["model.norm.weight"],
        "output_layer.weight": sd["lm_head.weight"],
    }
    for k in ("hc_fn", "hc_base", "hc_scale"):
        out[f"hc_head.{k}"] = sd[f"model.hc_head.{k}"]
    renames = {
        "input_layernorm.": "input_layernorm.",
        "post_attention_layernorm.": "pre_mlp_layernorm.",
        "attn_hc.": "attn_hc.",
        "ffn_hc.": "ffn_hc.",
        "self_attn.q_a_proj.": "self_attention.linear_q_down_proj.",
        "self_attn.q_a_norm.": "self_attention.q_layernorm.",
        "self_attn.q_b_proj.": "self_attention.linear_q_up_proj.",
        "self_attn.kv_proj.": "self_attention.linear_kv_proj.",
        "self_attn.kv_norm.": "self_attention.kv_layernorm.",
        "self_attn.o_b_proj.": "self_attention.linear_proj.",
        "self_attn.compressor.indexer.q_b_proj.": "self_attention.compressor.indexer.q_b_proj.",
        "self_attn.compressor.indexer.scorer.weights_proj.": "self_attention.compressor.indexer.weights_proj.",
        "self_attn.compressor.indexer.": "self_attention.compressor.indexer.compressor.",
        "self_attn.compressor.": "self_attention.compressor.window.",
        "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
        "mlp.gate.": "mlp.router.",
    }
    mtp_own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "e_proj.weight": "e_proj.weight",
               "h_proj.weight": "h_proj.weight", "norm.weight": "final_layernorm.weight",
               **{f"hc_head.{w}": f"hc_head.{w}" for w in ("hc_fn", "hc_base", "hc_scale")}}
    for name, t in sd.items():
        if name.startswith("model.mtp."):
            k, rest = name[len("model.mtp."):].split(".", 1)
            if rest in mtp_own:
                out[f"mtp.layers.{k}.{mtp_own[rest]}"] = t
                continue
            mg = f"mtp.layers.{k}.transformer_layer."
        elif name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            mg = f"layers.{i}."
        else:
            continue
        if rest == "self_attn.o_a_proj.weight":
            out[mg + "self_attention.linear_o_group_proj"] = t
        elif rest == "self_attn.sinks":
            out[mg + "self_attention.attn_sink"] = t
        elif rest == "mlp.experts.gate_up_proj":
            for e in range(local):
                out[mg + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = t[first + e]
        elif rest == "mlp.experts.down_proj":
            for e in range(local):
                out[mg + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = t[first + e]
        elif rest.startswith("mlp.shared_experts."):
            if rest.endswith("gate_proj.weight"):
                up = sd[name.replace("gate_proj", "up_proj")]
                out[mg + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([t, up], 0)
            elif rest.endswith("down_proj.weight"):
                out[mg + "mlp.shared_experts.linear_fc2.weight"] = t
        else:
            for hf_prefix, mg_prefix in renames.items():  # first match wins: longer prefixes come first
                if rest.startswith(hf_prefix):
                    out[mg + mg_prefix + rest[len(hf_prefix):]] = t
                    break
            else:
                raise KeyError(f"no mapping for {name}")
    # keep this stage's part; its decoder layers count from 0 (megatron's per-stage names)
    first = model.layer_ids[0] if len(model.layer_ids) else 0
    staged = {}
    for k, v in out.items():
        if k.startswith("layers."):
            i, rest = k[len("layers."):].split(".", 1)
            if int(i) in model.layer_ids:
                staged[f"layers.{int(i) - first}.{rest}"] = v
        elif k.startswith("embedding."):
            if model.pre_process or model.mtp_process:  # the MTP stage holds a copy
                staged[k] = v
        elif k.startswith("mtp."):
            if model.mtp_process and int(k.split(".")[2]) < model.mtp_num_layers:
                staged[k] = v
        elif model.post_process:
            staged[k] = v
    out = staged
    target = model.state_dict()
    unexpected = sorted(set(out) - set(target))
    missing = sorted(k for k in target if k not in out and not k.endswith("_extra_state"))
    assert not unexpected and not missing, (unexpected, missing)
    with torch.no_grad():
        for k, v in out.items():
            assert target[k].shape == v.shape, (k, target[k].shape, v.shape)
            target[k].copy_(v)
