"""Build the DeepSeek GPTModel chunk(s) that live on the current pipeline rank."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from .gpt import DeepSeekGPTModel

from .config import DeepSeekConfig, transformer_config
from .rotary import use_ops_rotary_in_mla
from .spec import DeepSeekSpecProvider, decoder_block_spec, mtp_block_spec


def default_layout(cfg: DeepSeekConfig, **kwargs):
    """The layout that matches megatron's current parallel_state (tp/pp/ep), even stages, no noop layers."""
    from mindspeed_dsv.layout import ParallelLayout

    fields = dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        num_layers=cfg.num_hidden_layers,
        mtp_num_layers=cfg.num_nextn_predict_layers,
        first_k_dense_replace=cfg.first_k_dense_replace,
        num_experts=cfg.n_routed_experts,
    )
    fields.update(kwargs)
    return ParallelLayout(**fields)


def layer_kinds(cfg: DeepSeekConfig, layout, pp_rank: int, chunk: int) -> list[str]:
    kinds = []
    for layer_id in layout.stage_layers(pp_rank, chunk):
        hf_index = layout.hf_layer_index(layer_id)
        if hf_index is None:
            kinds.append("noop")
        else:
            kinds.append("moe" if cfg.moe_layer_pattern[hf_index] else "dense")
    return kinds


def model_transformer_config(cfg: DeepSeekConfig, layout, **train_options):
    """The megatron config for this model under `layout`; train_options are transformer_config's kwargs."""
    moe_layer_freq = []
    for layer_id in range(layout.num_layers):
        hf_index = layout.hf_layer_index(layer_id)
        moe_layer_freq.append(0 if hf_index is None else cfg.moe_layer_pattern[hf_index])
    extra = {}
    if cfg.n_routed_experts:
        extra["moe_layer_freq"] = moe_layer_freq
    chunks = layout.num_model_chunks
    return transformer_config(
        cfg,
        tp=layout.tp,
        pp=layout.pp,
        ep=layout.ep,
        vpp=chunks if (chunks > 1 and not layout.dualpipev) else None,
        sequence_parallel=layout.sequence_parallel,
        num_layers=layout.num_layers,
        mtp_num_layers=layout.mtp_num_layers,
        pipeline_layout=layout.to_megatron_pp_layout() if layout.pp > 1 else None,
        moe_grouped_gemm=layout.moe_grouped_gemm,
        **extra,
        **train_options,
    )


def build_model(
    cfg: DeepSeekConfig,
    layout=None,
    *,
    vp_stage: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    config=None,
    **train_options,
) -> GPTModel:
    """The model chunk `vp_stage` (None without virtual pipeline) of the current pipeline rank.

    megatron's parallel_state must be initialised with the layout's tp/pp/ep. `config` may pass a prebuilt
    TransformerConfig (the trainer builds it once); otherwise it is made from the layout and train_options.
    """
    layout = layout if layout is not None else default_layout(cfg)
    if config is None:
        config = model_transformer_config(cfg, layout, params_dtype=params_dtype, **train_options)
    use_ops_rotary_in_mla()  # MLA's rotary follows the ops flags (models/rotary.py says why it is done this way)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunk = vp_stage or 0
    provider = DeepSeekSpecProvider(grouped_experts=layout.moe_grouped_gemm)
    experts = cfg.n_routed_experts or None
    block = decoder_block_spec(layer_kinds(cfg, layout, pp_rank, chunk), provider, experts)
    mtp = None
    if layout.mtp_num_layers and layout.has_mtp(pp_rank, chunk):
        mtp = mtp_block_spec(layout.mtp_num_layers, provider, experts, moe=bool(cfg.moe_layer_pattern[-1]))
    return DeepSeekGPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=layout.has_embedding(pp_rank, chunk),
        post_process=layout.has_output(pp_rank, chunk),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",  # MLA applies its own (YaRN) rotary inside attention
        parallel_output=True,
        mtp_block_spec=mtp,
        vp_stage=vp_stage,
    )
