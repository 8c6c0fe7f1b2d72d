"""The DeepSeek-V4 model chunk(s) of the current pipeline rank under a ParallelLayout: the one function that the
trainer builds its chunks with (and the converters name rank-file keys by).

Each chunk is a `DeepSeekV4Model` holding the global decoder layers `layout.stage_layers(pp_rank, chunk)` (1F1B,
interleaved VPP, dualpipev's V); the embedding is on virtual stage 0 and the head on the last one.
"""

from __future__ import annotations

from megatron.core import parallel_state

from .config import DeepSeekV4Config
from .model import DeepSeekV4Model


class V4LayoutError(ValueError):
    """A layout DeepSeek-V4 cannot be placed in (noop layers)."""


def stage_layer_ids(layout, pp_rank: int, chunk: int) -> range:
    ids = layout.stage_layers(pp_rank, chunk)
    if any(layout.is_noop(i) for i in ids):
        raise V4LayoutError("DeepSeek-V4 has no noop layers: drop --noop-layers (use --num-layer-list for "
                            "uneven stages)")
    return range(ids[0], ids[0] + len(ids)) if ids else range(0)


def build_stage_chunks(cfg: DeepSeekV4Config, layout, config, pp_rank: int | None = None) -> list[DeepSeekV4Model]:
    """Every model chunk of pipeline rank `pp_rank` (default: megatron's current one), in chunk order."""
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return [
        DeepSeekV4Model(cfg, config, pre_process=layout.has_embedding(pp_rank, c),
                        post_process=layout.has_output(pp_rank, c), layers=stage_layer_ids(layout, pp_rank, c))
        for c in range(layout.num_model_chunks)
    ]


def freeze_indexer(model: DeepSeekV4Model) -> int:
    """Freeze the CSA lightning indexers (their compressor, query and head-weight projections): the indexer only
    chooses which compressed entries each query sees (a top-k), so the language-model loss gives its weights no
    gradient; trained, the optimizer's weight decay would only shrink them. Returns the number frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if ".indexer." in name:
            p.requires_grad_(False)
            frozen += 1
    return frozen
