"""The run's flags checked against what is already on disk, before any process group or weight exists.

Two records are read: the checkpoint's layout (``--load``/``--lora-load``: ``layout.json``, written by hf2mcore,
reshard and every save) and the instruction dataset's ``{prefix}_summary.json`` (written by preprocess). The
real run (``loop.setup``) and the training scripts' ``--dry-run`` (``examples/mcore/deepseek3/dry_run.py``) both
call ``resolve``, so the dry run refuses exactly what the run would refuse a second later.
"""

from __future__ import annotations

import json
import os

from mindspeed_dsv.layout import LAYOUT_FILE, SHARD_FIELDS, ParallelLayout, flag_name

from .arguments import ArgumentError, _is_deepseek4, validate
from .inputs import check_checkpoint_dir

# Layout fields a checkpoint record may fill in when their flag is not given. TP/PP/EP default to 1 rather
# than to "not given", so they stay what the flags say (a difference is then named by check_checkpoint).
_FILLABLE = tuple(f for f in SHARD_FIELDS if f not in ("tp", "pp", "ep"))


def _dest(field: str) -> str:
    return "schedules_method" if field == "dualpipev" else flag_name(field)[2:].replace("-", "_")


def _as_flag_value(field: str, value):
    """The value as argparse would have stored it (lists as 'a,b,c' strings, dualpipev as its method name)."""
    if field == "dualpipev":
        return "dualpipev"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def recorded_layout(directory: str | None, *, required: bool, flag: str = "--load") -> ParallelLayout | None:
    """The layout recorded in ``directory`` (None when there is no directory, or, unless ``required``, no record
    yet: a dry run may come before the conversion)."""
    if not directory:
        return None
    if not required and not os.path.isfile(os.path.join(directory, LAYOUT_FILE)):
        return None
    check_checkpoint_dir(flag, directory)  # names the flag when the directory is not a checkpoint at all
    return ParallelLayout.load(directory)  # raises LayoutError naming the file when it is broken


def fill_layout_from_checkpoint(args, recorded: ParallelLayout, model_cfg: dict) -> list[str]:
    """Set the layout flags the user did not give to the checkpoint's recorded values; returns 'flag value'
    for each one whose value differs from config.json's default (e.g. --mtp-num-layers 0 of a checkpoint
    converted without MTP from a config that says one)."""
    defaults = ParallelLayout.from_args(args).with_model_defaults(model_cfg)
    taken = []
    for field in _FILLABLE:
        dest = _dest(field)
        value = getattr(recorded, field)
        given = getattr(args, dest, None)
        if not (given is None or given is False or given == "") or value is None or value is False or value == []:
            continue  # given by the user, or nothing recorded (identity checks: 0 is a value, not "unset")
        setattr(args, dest, _as_flag_value(field, value))
        if getattr(defaults, field) != value:
            taken.append(f"{flag_name(field)} {getattr(args, dest)}" if field != "dualpipev" else flag_name(field))
    return taken


def summary_path(prefix: str) -> str:
    return prefix + "_summary.json"


def check_dataset_summary(args, model_cfg: dict | None = None) -> None:
    """Instruction data: --seq-length must equal the row length the data was written with (recorded in
    ``{prefix}_summary.json``). A longer one trains on padding (and counts it), a shorter one cannot hold the rows."""
    if not (args.is_instruction_dataset and args.data_path and args.seq_length):
        return
    for prefix in args.data_path:
        path = summary_path(prefix)
        if not os.path.isfile(path):
            continue  # datasets from other tools have no summary; SFTDataset still checks the row lengths
        try:
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            raise ArgumentError(f"{path}: cannot read the dataset summary ({e})") from None
        if model_cfg is not None and summary.get("packing") not in (None, "none") and _is_deepseek4(model_cfg):
            raise ArgumentError(f"{path}: the data is packed ({summary.get('packing')}); DeepSeek-V4 attends "
                                "positions 0..S-1 of a row as one sequence, so preprocess without --pack")
        recorded = summary.get("seq_length")
        if recorded and recorded != args.seq_length:
            packing = "truncated" if summary.get("packing") in (None, "none") else "packed"
            raise ArgumentError(
                f"--seq-length {args.seq_length} differs from the seq_length {recorded} the data was {packing} to "
                f"({path}); train with --seq-length {recorded}, or preprocess again with "
                f"--seq-length {args.seq_length}")


def resolve(args, world_size: int, model_cfg: dict, *, dry_run: bool = False):
    """Flags + checkpoint record + dataset summary -> the run's layout, or ArgumentError/LayoutError naming
    the flag. Returns (layout, notes): notes say which layout flags were taken from the checkpoint."""
    base = recorded_layout(args.load, required=not dry_run)
    notes = []
    if base is not None:
        where = os.path.join(args.load, LAYOUT_FILE)
        notes = [f"{n} (from {where})" for n in fill_layout_from_checkpoint(args, base, model_cfg)]
    layout = validate(args, world_size, model_cfg)
    for flag, directory in (("--load", args.load), ("--lora-load", getattr(args, "lora_load", None))):
        recorded = recorded_layout(directory, required=not dry_run, flag=flag)
        if recorded is not None:
            layout.check_checkpoint(recorded, where=directory)  # the check read_checkpoint repeats on load
    check_dataset_summary(args, model_cfg)
    return layout, notes
