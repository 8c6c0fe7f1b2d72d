"""Test-side helpers: random HF DeepSeek-V3 models and a direct (TP=1, PP=1, EP=1) copy of their weights into
our megatron model. Written independently of ckpt_convert so the model tests do not trust the converter."""

from __future__ import annotations

import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_DIR = os.path.join(ROOT, "assets", "tiny_deepseek3")


def tiny_hf_config(**overrides) -> dict:
    with open(os.path.join(TINY_DIR, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(overrides)
    return cfg


def make_hf_model(hf_cfg: dict, seed: int = 0):
    """A DeepseekV3ForCausalLM in fp32 with random weights, including random router biases and norms (so a
    wrong mapping of either shows up in the logits)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def hf_to_megatron_tp1(hf_model, mg_model, cfg, grouped: bool = False) -> None:
    """Copy weights name by name. HF layer i -> megatron decoder.layers.i (no noop layers, one stage).
    grouped: the model's routed experts are GroupedMLPExperts (weight1 / weight2) instead of SequentialMLP."""
    sd = hf_model.state_dict()
    out = {}
    out["embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        out.update(_layer(sd, f"model.layers.{i}.", f"decoder.layers.{i}.", cfg, moe=cfg.moe_layer_pattern[i] == 1,
                          grouped=grouped))
    missing, unexpected = [], []
    target = mg_model.state_dict()
    for k, v in out.items():
        if k not in target:
            unexpected.append(k)
            continue
        assert target[k].shape == v.shape, (k, target[k].shape, v.shape)
        target[k].copy_(v)
    for k in target:
        if k not in out and not k.endswith("_extra_state") and not k.startswith("mtp."):
            missing.append(k)
    assert not unexpected and not missing, (unexpected, missing)


def _layer(sd, hf, mg, cfg, moe, grouped=False):
    out = {
        mg + "input_layernorm.weight": sd[hf + "input_layernorm.weight"],
        mg + "pre_mlp_layernorm.weight": sd[hf + "post_attention_layernorm.weight"],
        mg + "self_attention.linear_kv_down_proj.weight": sd[hf + "self_attn.kv_a_proj_with_mqa.weight"],
        mg + "self_attention.kv_layernorm.weight": sd[hf + "self_attn.kv_a_layernorm.weight"],
        mg + "self_attention.linear_kv_up_proj.weight": sd[hf + "self_attn.kv_b_proj.weight"],
        mg + "self_attention.linear_proj.weight": sd[hf + "self_attn.o_proj.weight"],
    }
    if cfg.q_lora_rank is None:
        out[mg + "self_attention.linear_q_proj.weight"] = sd[hf + "self_attn.q_proj.weight"]
    else:
        out[mg + "self_attention.linear_q_down_proj.weight"] = sd[hf + "self_attn.q_a_proj.weight"]
        out[mg + "self_attention.q_layernorm.weight"] = sd[hf + "self_attn.q_a_layernorm.weight"]
        out[mg + "self_attention.linear_q_up_proj.weight"] = sd[hf + "self_attn.q_b_proj.weight"]
    if not moe:
        gate, up = sd[hf + "mlp.gate_proj.weight"], sd[hf + "mlp.up_proj.weight"]
        out[mg + "mlp.linear_fc1.weight"] = torch.cat([gate, up], 0)
        out[mg + "mlp.linear_fc2.weight"] = sd[hf + "mlp.down_proj.weight"]
        return out
    out[mg + "mlp.router.weight"] = sd[hf + "mlp.gate.weight"]
    out[mg + "mlp.router.expert_bias"] = sd[hf + "mlp.gate.e_score_correction_bias"]
    gate_up = sd[hf + "mlp.experts.gate_up_proj"]  # [E, 2I, H]: gate rows then up rows
    down = sd[hf + "mlp.experts.down_proj"]  # [E, H, I]
    if grouped:  # weight1 [H, E*2I] is read as [E, H, 2I] (a plain view), weight2 [E*I, H] as [E, I, H]
        w1 = torch.stack([gate_up[e].t() for e in range(cfg.n_routed_experts)])
        out[mg + "mlp.experts.weight1"] = w1.reshape(cfg.hidden_size, -1)
        out[mg + "mlp.experts.weight2"] = torch.cat([down[e].t() for e in range(cfg.n_routed_experts)], 0)
    for e in range(cfg.n_routed_experts if not grouped else 0):
        out[mg + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
        out[mg + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
    if cfg.n_shared_experts:
        gate, up = sd[hf + "mlp.shared_experts.gate_proj.weight"], sd[hf + "mlp.shared_experts.up_proj.weight"]
        out[mg + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([gate, up], 0)
        out[mg + "mlp.shared_experts.linear_fc2.weight"] = sd[hf + "mlp.shared_experts.down_proj.weight"]
    return out
