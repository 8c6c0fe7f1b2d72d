"""Build the DeepSeek GPTModel chunk(s) that live on the current pipeline rank."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

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
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
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


class DualPipeVLayerLayout(PipelineParallelLayerLayout):
    """megatron's pipeline layout for dualpipev: slot (rank r, chunk 1) holds virtual stage 2*pp-1-r.

    megatron-core 0.16.1 numbers layers chunk-major (slot (r, 1) = virtual stage pp+r); only the numbering
    differs, so this subclass overrides the layer offsets and the flattened (layer-id) order and keeps the rest:
    megatron's slot table answers what each (rank, chunk) builds, and its checks then see the embedding first,
    the decoder layers, MTP and the loss last, as in any layout.
    """

    def __init__(self, layout: list, pipeline_model_parallel_size: int):
        super().__init__(layout, pipeline_model_parallel_size)
        if self.virtual_pipeline_model_parallel_size != 2:
            raise ValueError(f"dualpipev needs 2 chunks per rank, got {self.virtual_pipeline_model_parallel_size}")
        self.flatten_layout = [t for r, c in self._stage_slots() for t in self.layout[r][c]]

    def _stage_slots(self) -> list[tuple[int, int]]:
        """(rank, chunk) of virtual stages 0 .. 2*pp-1."""
        pp = self.pipeline_model_parallel_size
        return [(v, 0) for v in range(pp)] + [(2 * pp - 1 - v, 1) for v in range(pp, 2 * pp)]

    def get_layer_offset(self, layer_type: LayerType = LayerType.decoder, vp_stage=None, pp_rank=None):
        if pp_rank is None:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        slots = self._stage_slots()
        before = slots[: slots.index((pp_rank, vp_stage or 0))]
        return sum(self.layout[r][c].count(layer_type) for r, c in before)

    def get_layer_id_list(self, layer_type: LayerType = LayerType.decoder, vp_stage=None, pp_rank=None):
        offset = self.get_layer_offset(layer_type, vp_stage, pp_rank)
        return list(range(offset, offset + self.get_num_layers_to_build(layer_type, vp_stage, pp_rank)))


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
        ep=layout.megatron_expert_sizes()[0],
        etp=layout.megatron_expert_sizes()[1],
        vpp=chunks if chunks > 1 else None,
        sequence_parallel=layout.sequence_parallel,
        num_layers=layout.num_layers,
        mtp_num_layers=layout.mtp_num_layers,
        pipeline_layout=_megatron_pp_layout(layout),
        moe_grouped_gemm=layout.moe_grouped_gemm,
        **extra,
        **train_options,
    )


def _megatron_pp_layout(layout):
    if layout.pp == 1:
        return None
    if layout.dualpipev:
        return DualPipeVLayerLayout(layout.to_megatron_pp_layout(), layout.pp)
    return layout.to_megatron_pp_layout()


def _process_groups(layout) -> ProcessGroupCollection | None:
    """megatron's groups, except under dualpipev: there the embedding and the MTP layers (which keep their own
    copy of it) both live on rank 0, in chunks 0 and 1, so megatron's first/last-rank embedding group must not
    be used; build_model_chunks copies the weight and the trainer's dualpipev schedule sums the two gradients."""
    if not layout.dualpipev:
        return None
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.embd = None
    return pgs


def build_model_chunks(cfg: DeepSeekConfig, layout, config) -> list[GPTModel]:
    """Every model chunk of the current pipeline rank (one, VPP's, or dualpipev's two)."""
    chunks = layout.num_model_chunks
    models = [build_model(cfg, layout, vp_stage=(i if chunks > 1 else None), config=config) for i in range(chunks)]
    if layout.dualpipev and models[1].mtp_process:
        with torch.no_grad():  # megatron zero-fills the MTP copy, expecting the embedding group to fill it
            models[1].embedding.word_embeddings.weight.copy_(models[0].embedding.word_embeddings.weight)
    return models


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
        mtp = mtp_block_spec(layout.mtp_num_layers, provider, experts, moe=cfg.mtp_layer_is_moe)
    model = DeepSeekGPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=layout.padded_vocab_size(cfg.vocab_size),  # Megatron's padded rows (layout.padded_vocab_size)
        real_vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=layout.has_embedding(pp_rank, chunk),
        post_process=layout.has_output(pp_rank, chunk),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",  # MLA applies its own (YaRN) rotary inside attention
        parallel_output=True,
        mtp_block_spec=mtp,
        vp_stage=vp_stage,
        pg_collection=_process_groups(layout),
    )
    _reduce_expert_grads_over_expert_dp(model)
    return model


def _reduce_expert_grads_over_expert_dp(model) -> None:
    """Routed-expert weights are replicas over megatron's expert-data-parallel group, and DDP reduces a parameter
    over that group only when it is marked allreduce=False. megatron-core 0.16.1 marks expert weights so only at
    EP > 1; at EP 1 with expert-TP 1 and TP > 1 the expert group (the whole stage) is not the dense data-parallel
    group (which leaves out the TP ranks), so each TP rank would keep the gradient of its own tokens only. Marked
    always: where the two groups coincide it changes nothing."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
