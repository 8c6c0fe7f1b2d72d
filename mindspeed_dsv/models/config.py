"""DeepSeek model config read from a HF `config.json`, and its mapping onto megatron's MLATransformerConfig."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mindspeed_dsv.ops.rotary import RopeConfig


class ModelConfigError(ValueError):
    """A HF config that this model cannot represent exactly; the message names the field."""


@dataclass(frozen=True)
class DeepSeekConfig:
    """The architecture facts of a DeepseekV3ForCausalLM (and V2/V2-Lite shapes: q_lora_rank may be None)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int  # width of each routed / shared expert
    num_hidden_layers: int  # decoder layers, no MTP
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # the rest of config.json, untouched

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per HF decoder layer."""
        k = self.first_k_dense_replace if self.n_routed_experts else self.num_hidden_layers
        return [0 if i < k else 1 for i in range(self.num_hidden_layers)]

    @property
    def mtp_layer_is_moe(self) -> bool:
        """The kind of every MTP layer's transformer layer: that of the last decoder layer (megatron builds the MTP
        layer from the last layer's spec; DeepSeek-V3: MoE). The one place this is decided: the model builder,
        the name map, the planner and the FLOP count all ask here."""
        return bool(self.moe_layer_pattern[-1])

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "DeepSeekConfig":
        """From a HF model directory, a config.json path, or its parsed dict."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        return cls._from_dict(hf)

    @classmethod
    def _from_dict(cls, hf: dict) -> "DeepSeekConfig":
        model_type = hf.get("model_type")
        if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ModelConfigError(f"model_type={model_type!r}: expected deepseek_v3 (or deepseek_v2)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ModelConfigError(f"config.json lacks {missing}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is supported")
        if hf.get("attention_bias"):
            raise ModelConfigError("attention_bias=true is not supported (DeepSeek-V3 has no attention bias)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ModelConfigError(
                f"scoring_func={hf['scoring_func']!r}: the DeepSeek-V3 router scores with sigmoid; "
                "softmax routing (DeepSeek-V2) is not mapped yet"
            )
        known = set(cls.__dataclass_fields__) - {"rope", "extra"}
        cfg = cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf.get("moe_intermediate_size", hf["intermediate_size"]),
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            n_routed_experts=hf.get("n_routed_experts") or 0,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 0,
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope=RopeConfig.from_hf(hf),
            num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            extra={k: v for k, v in hf.items() if k not in known},
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse configs whose HF semantics megatron's router cannot reproduce exactly."""
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ModelConfigError(f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
            if self.n_group > 1 and self.num_experts_per_tok // self.topk_group != 2:
                # DeepSeek-V3 scores a group by the sum of its top-2 experts; megatron uses top-(topk/group_topk).
                raise ModelConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} with topk_group={self.topk_group}: megatron "
                    "scores groups by their top-(num_experts_per_tok/topk_group) experts, DeepSeek-V3 by top-2; "
                    "they agree only when num_experts_per_tok == 2 * topk_group"
                )
            if not self.norm_topk_prob and self.num_experts_per_tok > 1:
                raise ModelConfigError("norm_topk_prob=false: megatron's sigmoid router always normalises top-k")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rope"] = asdict(self.rope)
        return d


# Megatron's name for each MindSpeed/Megatron training option that shapes the model. Kept as plain kwargs so the
# trainer, the converter and tests build identical configs.
# What every DeepSeek family asks of megatron's TransformerConfig alike: RMSNorm, SwiGLU, no biases, no dropout,
# and none of megatron's own fusions (the ops layer picks kernels; megatron's fused paths need TE/Apex/CUDA;
# gradient-accumulation fusion is set by the trainer through `overrides`).
PLAIN_SWIGLU_BLOCKS: dict[str, Any] = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
)


def pipeline_p2p(backend: str) -> dict[str, Any]:
    """megatron's pipeline point-to-point setting for a backend; both DeepSeek families use it.

    gloo matches point-to-point messages between two ranks in posting order, with no tag; megatron's batched p2p
    posts "to prev" before "to next", so at PP=2 with VPP (prev == next) a rank's activation and gradient swap
    places (measured: VPP losses off at the first step, V3 and V4 alike). The unbatched path orders its sends and
    receives by even/odd rank and puts one direction on another group."""
    return dict(batch_p2p_comm=backend != "gloo")


def transformer_config(
    cfg: DeepSeekConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    mtp_num_layers: int | None = None,
    num_layers: int | None = None,
    pipeline_layout=None,
    moe_grouped_gemm: bool = False,
    moe_token_dispatcher_type: str = "alltoall",
    moe_aux_loss_coeff: float = 0.0,
    moe_router_bias_update_rate: float = 1e-3,
    moe_router_load_balancing_type: str = "seq_aux_loss",
    mtp_loss_scaling_factor: float = 0.3,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    recompute_modules: list[str] | None = None,
    use_cpu_initialization: bool | None = None,
    init_method_std: float = 0.02,
    **overrides,
):
    """megatron MLATransformerConfig for this model and parallel layout.

    num_layers: megatron's decoder layer count (HF layers plus noop layers); defaults to HF's.
    pipeline_layout: a megatron PipelineParallelLayerLayout (or its list form) for uneven stages / VPP.
    """
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from mindspeed_dsv.platform import current_platform

    platform = current_platform()
    if use_cpu_initialization is None:
        # On cpu there is no device to initialise on; elsewhere megatron initialises on the device (faster).
        use_cpu_initialization = not platform.is_accelerator
    num_layers = num_layers or cfg.num_hidden_layers
    mtp = cfg.num_nextn_predict_layers if mtp_num_layers is None else mtp_num_layers
    moe = cfg.n_routed_experts > 0
    bf16 = params_dtype == torch.bfloat16
    kwargs: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.qk_head_dim,
        # MLA
        multi_latent_attention=True,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_layernorm=True,  # MLA's q_a / kv_a layernorms
        rope_type="yarn" if cfg.rope.rope_type == "yarn" else "rope",
        rotary_base=cfg.rope.base,
        rotary_scaling_factor=cfg.rope.factor,
        original_max_position_embeddings=cfg.rope.original_max_position_embeddings,
        beta_fast=cfg.rope.beta_fast,
        beta_slow=cfg.rope.beta_slow,
        mscale=cfg.rope.mscale,
        mscale_all_dim=cfg.rope.mscale_all_dim,
        rotary_interleaved=False,  # MLA de-interleaves DeepSeek's rotary pairs itself
        # Block
        **PLAIN_SWIGLU_BLOCKS,
        layernorm_epsilon=cfg.rms_norm_eps,
        # MLPs build their activation from the spec (models.layers.SwiGLU -> ops.swiglu) instead of megatron's own
        # glu; the name says TE, but megatron only reads it as "use submodules.activation_func" here.
        use_te_activation_func=True,
        init_method_std=init_method_std,
        # Parallel
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,  # None: megatron takes TP
        sequence_parallel=sequence_parallel,
        pipeline_dtype=params_dtype,
        **pipeline_p2p(platform.backend),
        params_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        # MTP
        mtp_num_layers=mtp or None,
        mtp_loss_scaling_factor=mtp_loss_scaling_factor,
        # Recompute
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )
    if recompute_modules is not None:
        kwargs["recompute_modules"] = recompute_modules
    if pipeline_layout is not None:
        kwargs["pipeline_model_parallel_layout"] = pipeline_layout
    if moe:
        kwargs.update(
            num_moe_experts=cfg.n_routed_experts,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_shared_expert_intermediate_size=(cfg.n_shared_experts * cfg.moe_intermediate_size) or None,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=moe_router_bias_update_rate,
            moe_router_num_groups=cfg.n_group if cfg.n_group > 1 else None,
            moe_router_group_topk=cfg.topk_group if cfg.n_group > 1 else None,
            moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
            moe_router_dtype="fp32",  # DeepSeek computes router logits in fp32
            moe_router_load_balancing_type=moe_router_load_balancing_type,
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=moe_grouped_gemm,
            moe_layer_freq=_moe_layer_freq(cfg, num_layers),
        )
    from mindspeed_dsv.ops import get_ops

    from .rotary import mla_rope_fusion_options

    kwargs.update(mla_rope_fusion_options(get_ops().impls, cfg, tp))  # the configured kernels decide, as for every op
    kwargs.update(overrides)
    return MLATransformerConfig(**kwargs)


def _moe_layer_freq(cfg: DeepSeekConfig, num_layers: int) -> list[int]:
    """Per megatron layer (noop layers included, counted as dense: they are skipped by the builder)."""
    pattern = cfg.moe_layer_pattern
    return pattern + [0] * (num_layers - len(pattern))
