"""FLOPs of a DeepSeek-V3 training step, counted from the model's shapes.

Per token, forward, one multiply-add = 2 FLOPs; backward costs twice the forward, so a step is 3x forward.
Recomputed forwards are not counted (MFU measures useful work, as Megatron and PaLM do).

  attention (MLA), per layer:
    q       : 2·H·q_lora + 2·q_lora·nh·(dn+dr)      (or 2·H·nh·(dn+dr) without q_lora)
    kv_down : 2·H·(kv_lora + dr)
    kv_up   : 2·kv_lora·nh·(dn+dv)
    scores  : 2·nh·(dn+dr)·s/2        causal: each query sees s/2 keys on average
    context : 2·nh·dv·s/2
    out     : 2·nh·dv·H
  dense MLP: 2·3·H·I          (gate, up, down)
  MoE      : 2·H·E (router) + (top_k + n_shared)·2·3·H·I_moe     (only the routed experts a token uses)
  output   : 2·H·V
  MTP layer: 2·2H·H (eh_proj) + one MoE layer + 2·H·V
"""

from __future__ import annotations

from mindspeed_dsv.models.config import DeepSeekConfig


def attention_flops_per_token(cfg: DeepSeekConfig, seq_length: int) -> float:
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        q = 2 * H * cfg.q_lora_rank + 2 * cfg.q_lora_rank * nh * (dn + dr)
    else:
        q = 2 * H * nh * (dn + dr)
    kv = 2 * H * (cfg.kv_lora_rank + dr) + 2 * cfg.kv_lora_rank * nh * (dn + dv)
    core = 2 * nh * (dn + dr) * seq_length / 2 + 2 * nh * dv * seq_length / 2
    return q + kv + core + 2 * nh * dv * H


def mlp_flops_per_token(cfg: DeepSeekConfig, moe: bool) -> float:
    H = cfg.hidden_size
    if not moe:
        return 2 * 3 * H * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts
    return 2 * H * cfg.n_routed_experts + experts * 2 * 3 * H * cfg.moe_intermediate_size


def forward_flops_per_token(cfg: DeepSeekConfig, seq_length: int, mtp_num_layers: int = 0) -> float:
    attn = attention_flops_per_token(cfg, seq_length)
    total = sum(attn + mlp_flops_per_token(cfg, bool(m)) for m in cfg.moe_layer_pattern)
    total += 2 * cfg.hidden_size * cfg.vocab_size
    per_mtp = 2 * 2 * cfg.hidden_size * cfg.hidden_size + attn + mlp_flops_per_token(cfg, cfg.mtp_layer_is_moe)
    per_mtp += 2 * cfg.hidden_size * cfg.vocab_size
    return total + mtp_num_layers * per_mtp


def train_flops_per_token(cfg: DeepSeekConfig, seq_length: int, mtp_num_layers: int = 0) -> float:
    return 3 * forward_flops_per_token(cfg, seq_length, mtp_num_layers)


# Dense bf16 peaks (TFLOP/s) by device name, from the vendors' datasheets; MFU is measured against these
# unless --peak-tflops gives a measured number.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "910B": 313.0}


def device_peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return peak
    return None
