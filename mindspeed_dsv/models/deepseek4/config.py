"""DeepSeek-V4 configuration: the HF config (transformers' `DeepseekV4Config` field names, and the legacy keys
of the official release's config.json) as one frozen dataclass, and the megatron TransformerConfig its MoE
blocks are built from.

Every HF field that changes the computation is read here; a value we do not implement is refused with an
error naming the field, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mindspeed_dsv.models.config import PLAIN_SWIGLU_BLOCKS, pipeline_p2p
from mindspeed_dsv.ops import RopeConfig

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
# The official release's config.json spells layer types as per-layer compression ratios.
_RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


class DeepSeekV4ConfigError(ValueError):
    """An HF config value this implementation does not compute; the message names the field."""


@dataclass(frozen=True)
class DeepSeekV4Config:
    vocab_size: int
    hidden_size: int
    moe_intermediate_size: int  # routed and shared experts alike
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # q, k and v (K=V, one shared head)
    rope_head_dim: int  # trailing channels of each head that are rotated
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    layer_types: tuple[str, ...]
    csa_rate: int
    hca_rate: int
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    mlp_layer_types: tuple[str, ...]
    n_routed_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    swiglu_limit: float | None
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    main_rope: RopeConfig  # sliding-only layers
    compress_rope: RopeConfig  # CSA / HCA layers, their compressors and the indexer
    max_position_embeddings: int
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False

    @property
    def n_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    def attention_type(self, layer: int) -> str:
        """Layer ids from num_hidden_layers on are MTP layers: sliding-only, as the release's compress_ratios
        (its last entry, 0) and its MTPBlock have them."""
        return self.layer_types[layer] if layer < self.num_hidden_layers else SLIDING

    def mlp_type(self, layer: int) -> str:
        """MTP layers route by the learned gate (the release hashes only layer ids below n_hash_layers)."""
        return self.mlp_layer_types[layer] if layer < self.num_hidden_layers else MOE

    def compress_rate(self, layer: int) -> int:
        return {SLIDING: 0, CSA: self.csa_rate, HCA: self.hca_rate}[self.attention_type(layer)]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "DeepSeekV4Config":
        def refuse(field, value, why):
            raise DeepSeekV4ConfigError(f"DeepSeek-V4 config: {field}={value!r} is not supported ({why})")

        n = int(hf["num_hidden_layers"])
        rates = dict(hf.get("compress_rates") or {CSA: 4, HCA: 128})
        if hf.get("compress_rate_csa") is not None:
            rates[CSA] = hf["compress_rate_csa"]
        if hf.get("compress_rate_hca") is not None:
            rates[HCA] = hf["compress_rate_hca"]
        layer_types = hf.get("layer_types")
        if layer_types is None and hf.get("compress_ratios") is not None:
            ratios = hf["compress_ratios"]
            bad = [r for r in ratios if r not in _RATIO_TO_LAYER_TYPE]
            if bad:
                refuse("compress_ratios", bad, f"known ratios are {sorted(_RATIO_TO_LAYER_TYPE)}")
            layer_types = [_RATIO_TO_LAYER_TYPE[r] for r in ratios]
        if layer_types is None:  # transformers' default layout
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(2, n)]
        layer_types = tuple(layer_types[:n])  # compress_ratios carries one extra entry for the MTP layer
        for t in layer_types:
            if t not in LAYER_TYPES:
                refuse("layer_types", t, f"expected one of {LAYER_TYPES}")
        mlp_types = hf.get("mlp_layer_types")
        if mlp_types is None:
            n_hash = int(hf.get("num_hash_layers", 3))
            mlp_types = [HASH_MOE] * min(n, n_hash) + [MOE] * max(0, n - n_hash)
        mlp_types = tuple(mlp_types[:n])
        for t in mlp_types:
            if t not in (HASH_MOE, MOE):
                refuse("mlp_layer_types", t, "expected 'hash_moe' or 'moe'")
        if len(layer_types) != n or len(mlp_types) != n:
            refuse("layer_types/mlp_layer_types", (len(layer_types), len(mlp_types)), f"need {n} entries each")

        head_dim = int(hf.get("head_dim", 512))
        if hf.get("qk_rope_head_dim") is not None:
            rope_dim = int(hf["qk_rope_head_dim"])
        else:
            rope_dim = int(head_dim * (hf.get("partial_rotary_factor") or 64 / 512))
        checks = {
            "num_key_value_heads": (hf.get("num_key_value_heads", 1), 1, "V4 has one shared K=V head"),
            "scoring_func": (hf.get("scoring_func", "sqrtsoftplus"), "sqrtsoftplus", "V4 scores experts with sqrt(softplus)"),
            "hidden_act": (hf.get("hidden_act", "silu"), "silu", "experts are SwiGLU"),
            "norm_topk_prob": (hf.get("norm_topk_prob", True), True, "transformers always renormalises"),
            "attention_bias": (hf.get("attention_bias", False), False, "V4 projections have no bias"),
            "mlp_bias": (hf.get("mlp_bias", False), False, "V4 projections have no bias"),
            # transformers builds exactly one shared MLP of moe_intermediate_size, whatever this says
            "n_shared_experts": (hf.get("n_shared_experts", 1), 1, "transformers builds exactly one shared expert"),
        }
        for field, (value, want, why) in checks.items():
            if value != want:
                refuse(field, value, why)
        if hf.get("attention_dropout", 0.0):
            refuse("attention_dropout", hf["attention_dropout"], "no attention dropout")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            num_hidden_layers=n,
            num_attention_heads=int(hf["num_attention_heads"]),
            head_dim=head_dim,
            rope_head_dim=rope_dim,
            q_lora_rank=int(hf["q_lora_rank"]),
            o_groups=int(hf["o_groups"]),
            o_lora_rank=int(hf["o_lora_rank"]),
            layer_types=layer_types,
            csa_rate=int(rates[CSA]),
            hca_rate=int(rates[HCA]),
            sliding_window=int(hf["sliding_window"]),
            index_n_heads=int(hf["index_n_heads"]),
            index_head_dim=int(hf["index_head_dim"]),
            index_topk=int(hf["index_topk"]),
            mlp_layer_types=mlp_types,
            n_routed_experts=int(hf["n_routed_experts"]),
            num_experts_per_tok=int(hf["num_experts_per_tok"]),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            swiglu_limit=None if hf.get("swiglu_limit") is None else float(hf["swiglu_limit"]),
            hc_mult=int(hf.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(hf.get("hc_eps", 1e-6)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            main_rope=RopeConfig(dim=rope_dim, base=_main_rope_theta(hf)),
            compress_rope=_compress_rope(hf, rope_dim, refuse),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            num_nextn_predict_layers=int(hf.get("num_nextn_predict_layers", 0)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


def _main_rope_theta(hf: dict) -> float:
    nested = (hf.get("rope_parameters") or {}).get("main")
    if isinstance(nested, dict):
        if nested.get("rope_type", "default") != "default":
            raise DeepSeekV4ConfigError(f"DeepSeek-V4 config: rope_parameters.main.rope_type={nested['rope_type']!r} "
                                        "is not supported (sliding layers use plain rope)")
        return float(nested["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def _compress_rope(hf: dict, rope_dim: int, refuse) -> RopeConfig:
    """The compressed layers' rope: compress_rope_theta with the YaRN settings of rope_parameters
    (rope_scaling in older configs). transformers forces YaRN's attention factor to 1 here (the V4 reference
    does not scale cos/sin); equal mscale and mscale_all_dim give our RopeConfig that factor."""
    nested = (hf.get("rope_parameters") or {}).get("compress")
    if isinstance(nested, dict):  # already nested per rope type, the way transformers stores it
        params, base = dict(nested), float(nested["rope_theta"])
    else:
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        base = float(hf.get("compress_rope_theta", 160000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(dim=rope_dim, base=base)
    if rope_type != "yarn":
        refuse("rope_parameters.rope_type", rope_type, "V4's compressed layers use 'yarn' or none")
    if params.get("attention_factor", 1.0) != 1.0:
        refuse("rope_parameters.attention_factor", params["attention_factor"], "V4 does not scale cos/sin")
    if params.get("truncate", True) is not True:
        refuse("rope_parameters.truncate", params["truncate"], "YaRN's correction range is truncated in V4")
    factor = params.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    return RopeConfig(
        dim=rope_dim,
        base=base,
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=1.0,
        mscale_all_dim=1.0,
    )


def transformer_config(
    cfg: DeepSeekV4Config,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    params_dtype: torch.dtype = torch.float32,
    moe_router_bias_update_rate: float = 1e-3,
    use_cpu_initialization: bool | None = None,
    init_method_std: float = 0.02,
    mtp_num_layers: int = 0,
    mtp_loss_scaling_factor: float = 0.3,
    **train_options,
):
    """megatron TransformerConfig for V4's MoE blocks (router, SequentialMLP experts, shared expert) and the
    parallel sizes. Attention and hyper-connections are our modules and read `cfg` directly. `train_options`
    are further TransformerConfig fields the trainer sets (virtual pipeline size, gradient-accumulation fusion,
    perform_initialization)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mindspeed_dsv.platform import current_platform

    if tp != 1:
        # The one shared K=V head and the compressors cannot be split over heads; transformers' own tp_plan
        # keeps attention replicated too.
        raise DeepSeekV4ConfigError(f"DeepSeek-V4: tensor parallel size {tp} is not supported (only 1)")
    if use_cpu_initialization is None:
        use_cpu_initialization = not current_platform().is_accelerator
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.moe_intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.head_dim,
        **{**PLAIN_SWIGLU_BLOCKS, **train_options},  # the trainer may turn gradient_accumulation_fusion on
        layernorm_epsilon=cfg.rms_norm_eps,
        # transformers clamps gate (max) and up (both sides) before SiLU, as megatron's glu does with this set
        activation_func_clamp_value=cfg.swiglu_limit,
        init_method_std=init_method_std,
        num_moe_experts=cfg.n_routed_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.moe_intermediate_size,
        # V4Router replaces megatron's scoring (sqrt-softplus) and top-k; megatron's expert-bias buffer and its
        # per-expert token counts (for the bias update) are used as they are. 'sigmoid' is the score
        # function megatron allows the expert bias with.
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=moe_router_bias_update_rate,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        pipeline_dtype=params_dtype,
        **pipeline_p2p(current_platform().backend),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        # megatron reads these too: finalize_model_grads all-reduces the embedding grads of the first and
        # the MTP stage when mtp_num_layers is set
        mtp_num_layers=mtp_num_layers or None,
        mtp_loss_scaling_factor=mtp_loss_scaling_factor,
    )
