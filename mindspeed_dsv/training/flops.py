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


def train_flops_per_token(cfg, seq_length: int, mtp_num_layers: int = 0) -> float:
    """3x the forward of a DeepSeekConfig (V3) or a DeepSeekV4Config (V4) model."""
    from mindspeed_dsv.models.deepseek4.config import DeepSeekV4Config

    if isinstance(cfg, DeepSeekV4Config):
        return 3 * v4_forward_flops_per_token(cfg, seq_length, mtp_num_layers)
    return 3 * forward_flops_per_token(cfg, seq_length, mtp_num_layers)


# ------------------------------------------------------------------------------------------------ DeepSeek-V4
# Per token, forward, as for V3 (multiply-add = 2 FLOPs). Keys a query attends to are averaged over the S
# positions of a sequence (causal): sliding window min(t+1, W); HCA every closed window, (t+1)//m';
# CSA min(index_topk, (t+1)//m) picked entries.
#   mHC, per sub-block (2 per layer): 2·(N·D)·(2+N)·N (mapping) + 2·N·N·D (stream mixing) + 4·N·D (pre/post)
#   attention: 2·D·q_lora (q down) + 2·q_lora·H·d (q up) + 2·D·d (kv) + 4·H·d·keys (scores + context, K=V)
#              + 2·H·d·o_lora (grouped o_a: g groups of H·d/g -> o_lora) + 2·g·o_lora·D (o_b)
#   compressor (CSA: 2d rows, HCA: d rows): 2·2·D·rows (kv and gate projections)
#   indexer (CSA): 2·2·D·2c (its compressor) + 2·q_lora·n_I·c (q) + 2·D·n_I (weights) + 2·n_I·c·(t+1)//m (scores)
#   MoE (every layer): 2·D·E (router) + (top_k + 1 shared)·2·3·D·I
#   head: 2·N·D·N + 2·N·D (hc_head) + 2·D·V (output layer)
#   MTP module: 2·2·D·D (e_proj, h_proj) + one sliding-window layer + hc_head + output layer


def _mean_keys(seq_length: int, per_position) -> float:
    return sum(per_position(t) for t in range(seq_length)) / seq_length


def v4_layer_flops_per_token(cfg, attention: str, seq_length: int) -> float:
    from mindspeed_dsv.models.deepseek4.config import CSA, SLIDING

    D, N, H, d = cfg.hidden_size, cfg.hc_mult, cfg.num_attention_heads, cfg.head_dim
    hyper = 2 * (2 * N * D * (2 + N) * N + 2 * N * N * D + 4 * N * D)
    keys = _mean_keys(seq_length, lambda t: min(t + 1, cfg.sliding_window))
    extra = 0.0
    if attention == CSA:
        keys += _mean_keys(seq_length, lambda t: min(cfg.index_topk, (t + 1) // cfg.csa_rate))
        c, n_i = cfg.index_head_dim, cfg.index_n_heads
        entries = _mean_keys(seq_length, lambda t: (t + 1) // cfg.csa_rate)
        extra = (2 * 2 * D * 2 * d + 2 * 2 * D * 2 * c + 2 * cfg.q_lora_rank * n_i * c + 2 * D * n_i
                 + 2 * n_i * c * entries)
    elif attention != SLIDING:
        keys += _mean_keys(seq_length, lambda t: (t + 1) // cfg.hca_rate)
        extra = 2 * 2 * D * d
    attn = (2 * D * cfg.q_lora_rank + 2 * cfg.q_lora_rank * H * d + 2 * D * d + 4 * H * d * keys
            + 2 * H * d * cfg.o_lora_rank + 2 * cfg.o_groups * cfg.o_lora_rank * D)
    moe = 2 * D * cfg.n_routed_experts + (cfg.num_experts_per_tok + 1) * 2 * 3 * D * cfg.moe_intermediate_size
    return hyper + attn + extra + moe


def v4_forward_flops_per_token(cfg, seq_length: int, mtp_num_layers: int = 0) -> float:
    from mindspeed_dsv.models.deepseek4.config import SLIDING

    D, N = cfg.hidden_size, cfg.hc_mult
    head = 2 * N * D * N + 2 * N * D + 2 * D * cfg.vocab_size
    total = sum(v4_layer_flops_per_token(cfg, t, seq_length) for t in cfg.layer_types) + head
    mtp = 2 * 2 * D * D + v4_layer_flops_per_token(cfg, SLIDING, seq_length) + head
    return total + mtp_num_layers * mtp


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
