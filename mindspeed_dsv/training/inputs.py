"""The run's input files (tokenizer, datasets), checked after the flags and before any process group or weight
exists, so a wrong path, a truncated file or the wrong kind of data is one line naming it.

Kept apart from ``arguments.validate``: a training script's ``--dry-run`` validates the flags of a 671B template
on a machine that does not hold its files yet.
"""

from __future__ import annotations

import json
import os

from mindspeed_dsv.data.checks import InputError, check_data_kind, check_indexed_dataset, check_tokenizer_dir
from mindspeed_dsv.training.arguments import resolve_model_config_path, tokenizer_dir


def data_prefixes(args) -> list[str]:
    """The dataset prefixes of --data-path, without the blend weights ('0.7 a 0.3 b' -> ['a', 'b'])."""
    from megatron.core.datasets.utils import get_blend_from_list

    return list(get_blend_from_list(list(args.data_path))[0])


def check_checkpoint_dir(flag: str, path: str) -> None:
    """A directory written by hf2mcore or a --save: its iteration tracker and layout record are there."""
    from mindspeed_dsv.rankfiles import TRACKER

    if not os.path.isdir(path):
        raise InputError(f"{flag} {path}: the checkpoint directory does not exist")
    missing = [n for n in (TRACKER, "layout.json") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise InputError(f"{flag} {path}: no {' / '.join(missing)}: not a Megatron checkpoint written by "
                         "`python -m ckpt_convert hf2mcore` or by training's --save (convert a HF model first)")


def check_inputs(args) -> list[str]:
    """Raise InputError naming the file; return the dataset prefixes the run opens (three per SFT prefix)."""
    for flag, path in (("--load", args.load), ("--lora-load", args.lora_load)):
        if path is not None:
            check_checkpoint_dir(flag, path)
    flag = "--tokenizer-name-or-path" if args.tokenizer_name_or_path else "--load/--model-config directory"
    check_tokenizer_dir(tokenizer_dir(args), flag)
    datasets = check_data_kind(data_prefixes(args), args.is_instruction_dataset)
    for prefix in datasets:
        check_indexed_dataset(prefix)
    return datasets


def read_model_config(args) -> dict | None:
    """config.json named by --model-config (or inside --load); None when neither flag is given (validate says so)."""
    if args.model_config is None and args.load is None:
        return None
    path = resolve_model_config_path(args)
    flag, given = ("--model-config", args.model_config) if args.model_config else ("--load", args.load)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(given) else f"holds no {os.path.basename(path)}"
        raise InputError(f"{flag} {given}: {what} (give a checkpoint directory with config.json, or --model-config)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
