"""What one rank of a parallel layout holds of DeepSeek-V4: the decoder layers of a (pipeline rank, model chunk),
the `DeepSeekV4Model` stage the trainer builds for it (`build_stage`, `build_stage_chunks`), and the name map of
that stage's state dict (`rank_maps`), which the converters write and read rank files with. Both come from the same placement
(`stage_layer_ids`), so a rank file's keys are exactly the state-dict keys of the stage that loads it.

Routed experts are named per expert on the HF side (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`,
the names ckpt_convert's HF reader serves for transformers' stacked tensors and for the official release's
`ffn.experts.E.w1/w3/w2`), so a rank reads only its own experts. Expert parallelism keeps global experts
layout.local_experts(ep) as local_experts 0..n-1, as megatron's SequentialMLP numbers them.

MTP layers (`layout.mtp_num_layers`) live on the stage that holds the output layer (with dualpipev: chunk 1 of
pipeline rank 0) as `mtp.layers.k.*`, next to that stage's own copy of the embedding; their routed experts are
split over EP like the main layers'.
"""

from __future__ import annotations

import dataclasses

from mindspeed_dsv.models.names import GLU, REPLICATED, NameMapError, TensorMap

from .config import DeepSeekV4Config
from .names import EXPERT_SLICE, lora_module_of, model_maps


def check_layout(layout) -> None:
    """Refuse the layout features V4 does not have (one clear line each)."""
    if layout.tp != 1:
        raise NameMapError(f"DeepSeek-V4: tensor parallel size {layout.tp} is not supported (only 1): the one "
                           "shared K=V head and the compressors cannot be split over heads")
    if layout.noop_layers:
        raise NameMapError(f"DeepSeek-V4: noop layers {list(layout.noop_layers)} are not supported (a stage holds "
                           "a contiguous range of real layers)")
    if layout.moe_tp_extend_ep:
        raise NameMapError("DeepSeek-V4: --moe-tp-extend-ep does not apply (TP is 1)")


def stage_layer_ids(layout, pp_rank: int, chunk: int = 0) -> range:
    """Global (= HF) decoder layer ids of (pp_rank, chunk)."""
    ids = layout.stage_layers(pp_rank, chunk)
    return range(ids[0], ids[-1] + 1) if ids else range(0)


def build_stage(cfg: DeepSeekV4Config, layout, pp_rank: int, chunk: int = 0, config=None):
    """The DeepSeekV4Model of (pp_rank, chunk): embedding on the first virtual stage, head on the last, and
    there the layout's MTP layers with their own copy of the embedding (`config`, when given, must carry the
    same mtp_num_layers)."""
    from .model import DeepSeekV4Model

    check_layout(layout)
    return DeepSeekV4Model(cfg, config, pre_process=layout.has_embedding(pp_rank, chunk),
                           post_process=layout.has_output(pp_rank, chunk),
                           layers=stage_layer_ids(layout, pp_rank, chunk), mtp_num_layers=layout.mtp_num_layers or 0)


def build_stage_chunks(cfg: DeepSeekV4Config, layout, config, pp_rank: int | None = None) -> list:
    """Every model chunk of pipeline rank `pp_rank` (default: megatron's current one), in chunk order."""
    if pp_rank is None:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return [build_stage(cfg, layout, pp_rank, c, config) for c in range(layout.num_model_chunks)]


def freeze_indexer(model) -> int:
    """Freeze the CSA lightning indexers (their compressor, query and head-weight projections): the indexer only
    chooses which compressed entries each query sees (a top-k), so the language-model loss gives its weights no
    gradient; trained, the optimizer's weight decay would only shrink them. Returns the number frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if ".indexer." in name:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def tie_embedding_copies(models: list, layout) -> None:
    """Start the MTP stage's copy of the embedding equal to the embedding, as megatron's GPTModel does at setup
    (randomly initialised, the two would differ; loaded, they come equal from the checkpoint). Under dualpipev both
    are chunks of pipeline rank 0; otherwise the copy sits on the last rank, which joins the first in megatron's
    embedding group: it zero-fills its copy and the group sums. Every rank of the group must call this."""
    import torch
    from megatron.core import parallel_state

    if not layout.mtp_num_layers or layout.pp == 1:
        return  # one stage holds the embedding the MTP layers use
    with torch.no_grad():
        if layout.dualpipev:
            if models[1].mtp_process:
                models[1].embedding.weight.copy_(models[0].embedding.weight)
            return
        if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
            return
        for m in models:
            if hasattr(m, "embedding"):
                if not m.pre_process:
                    m.embedding.weight.zero_()
                torch.distributed.all_reduce(m.embedding.weight, group=parallel_state.get_embedding_group())


def _expert_map(m: TensorMap, mcore: str) -> TensorMap:
    per = f"{m.hf[0].rsplit('.mlp.experts.', 1)[0]}.mlp.experts.{m.expert}."  # model.layers.L / model.mtp.K
    lora = lora_module_of(mcore)
    if ".linear_fc1." in mcore:  # [gate; up], as transformers' gate_up_proj[e] holds them
        return TensorMap(mcore=mcore, hf=(per + "gate_proj.weight", per + "up_proj.weight"), split=GLU,
                         hf_layer=m.hf_layer, expert=m.expert, lora_module=lora)
    return TensorMap(mcore=mcore, hf=(per + "down_proj.weight",), split=REPLICATED, hf_layer=m.hf_layer,
                     expert=m.expert, lora_module=lora)


def rank_maps(cfg: DeepSeekV4Config, layout, tp_rank: int, pp_rank: int, ep_rank: int, chunk: int = 0,
              mla_mm_split: bool = False) -> list[TensorMap]:
    """Every tensor of model chunk `chunk` of rank file (tp_rank, pp_rank, ep_rank); mcore names are the
    stage's state-dict keys (layers counted from 0 on each stage, experts from 0 on each EP rank)."""
    check_layout(layout)
    if mla_mm_split:
        raise NameMapError("DeepSeek-V4: --mla-mm-split does not apply (V4 attention is not MLA)")
    if layout.padded_vocab_size(cfg.vocab_size) != cfg.vocab_size:
        raise NameMapError(f"DeepSeek-V4: --make-vocab-size-divisible-by {layout.make_vocab_size_divisible_by} would "
                           f"pad the vocabulary {cfg.vocab_size}; the V4 model keeps it unpadded (use 1)")
    ids = stage_layer_ids(layout, pp_rank, chunk)
    local = {g: i for i, g in enumerate(layout.local_experts(ep_rank, tp_rank))}
    pre, post = layout.has_embedding(pp_rank, chunk), layout.has_output(pp_rank, chunk)
    mtp = (layout.mtp_num_layers or 0) if post else 0
    out = []
    for m in model_maps(cfg, mtp):
        if m.hf_layer is None:
            # the MTP stage holds its own copy of the embedding (megatron's GPTModel layout)
            if ((pre or mtp > 0) if m.mcore.startswith("embedding.") else post):
                out.append(m)
            continue
        if m.mcore.startswith("mtp."):  # only on the last stage (mtp > 0 there); names as the model's
            mcore = m.mcore
        elif m.hf_layer in ids:
            mcore = f"layers.{m.hf_layer - ids.start}.{m.mcore.split('.', 2)[2]}"
        else:
            continue
        if m.split == EXPERT_SLICE:
            if m.expert not in local:
                continue
            mcore = mcore.replace(f".local_experts.{m.expert}.", f".local_experts.{local[m.expert]}.")
            out.append(_expert_map(m, mcore))
        else:
            # the LoRA module follows the stage-local name (adapter keys are the stage's state-dict keys)
            lora = lora_module_of(mcore) if m.lora_module else None
            out.append(dataclasses.replace(m, mcore=mcore, lora_module=lora))
    return out
