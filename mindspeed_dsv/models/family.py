"""Which model family an HF config belongs to, and its config object: the one place that decides.

DeepSeek-V3 (and V2 / Kimi-K2, same architecture) is `models.config.DeepSeekConfig`; DeepSeek-V4 is
`models.deepseek4.config.DeepSeekV4Config`. Converters, the trainer, the planner and the benchmarks ask here
instead of testing `model_type` themselves.
"""

from __future__ import annotations

import json
import os
from typing import Any

DEEPSEEK3 = "deepseek3"
DEEPSEEK4 = "deepseek4"
_V3_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
_V4_TYPES = ("deepseek_v4",)


def read_hf_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """A HF model directory, a config.json path, or an already parsed dict."""
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def family_of(hf: dict[str, Any]) -> str:
    """DEEPSEEK3 or DEEPSEEK4. The official V4 release's config.json has no model_type of transformers' spelling
    but carries `compress_ratios`, which no V3 config has."""
    model_type = hf.get("model_type")
    if model_type in _V4_TYPES or (model_type is None and "compress_ratios" in hf):
        return DEEPSEEK4
    if model_type in _V3_TYPES:
        return DEEPSEEK3
    raise ValueError(f"model_type={model_type!r}: expected one of {_V3_TYPES + _V4_TYPES}")


def model_config(source: str | os.PathLike | dict):
    """The family's config dataclass for a HF config (directory, path or dict)."""
    hf = read_hf_config(source)
    if family_of(hf) == DEEPSEEK4:
        from mindspeed_dsv.models.deepseek4.config import DeepSeekV4Config

        return DeepSeekV4Config.from_hf(hf)
    from mindspeed_dsv.models.config import DeepSeekConfig

    return DeepSeekConfig.from_hf(hf)


def rank_maps(hf: dict[str, Any], layout, tp_rank: int, pp_rank: int, ep_rank: int, chunk: int = 0,
              mla_mm_split: bool = False) -> list:
    """The name map (models.names.TensorMap entries) of one rank file's model chunk, for the family of `hf`:
    what the converters write, read and check rank files with."""
    if family_of(hf) == DEEPSEEK4:
        from mindspeed_dsv.models.deepseek4.stages import rank_maps as v4_rank_maps

        return v4_rank_maps(model_config(hf), layout, tp_rank, pp_rank, ep_rank, chunk, mla_mm_split)
    from mindspeed_dsv.models.names import rank_maps as v3_rank_maps

    return v3_rank_maps(hf, layout, tp_rank, pp_rank, ep_rank, chunk, mla_mm_split)
