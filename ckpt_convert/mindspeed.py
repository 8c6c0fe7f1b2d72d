"""MindSpeed-LLM DeepSeek-V3 rank files <-> ours.

MindSpeed-LLM's converter (examples/mcore/deepseek3/convert_ckpt_deepseek3.py) and training write the same
rank-file layout as ours: `iter_N/mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt`, one `model` / `model{c}` entry per
model chunk, the V order of dualpipev with embedding, final norm, output layer and MTP on pipeline rank 0, noop
slots without weights, `--mla-mm-split`'s four up-projections and GroupedMLP's `weight1`/`weight2` under the same
names. They differ in a few tensor names only (facts and sources: shared/notes/mindspeed-llm-deepseek3.md §2):

    theirs                                              ours
    self_attention.linear_qkv.weight                    self_attention.linear_q_down_proj.weight   (rows [:q_lora])
      (replicated; [q_a_proj; kv_a_proj_with_mqa])      self_attention.linear_kv_down_proj.weight  (the rest)
    final_layernorm.weight   (when MTP is present)      decoder.final_layernorm.weight
    mtp.final_layernorms.{k}.weight                     mtp.layers.{k}.final_layernorm.weight

So a MindSpeed-LLM checkpoint is read by renaming each chunk into ours as its rank file is opened (`chunk_to_ours`,
in `MindSpeedReader`, which our writers read from: hf2mcore.write_mcore for any target layout (mindspeed2mcore) and
mcore2hf.export (mindspeed2hf)), and written by the inverse (`chunk_to_theirs`) as each of their rank files is built
(mcore2mindspeed, by hf2mcore's build_rank at another layout): one pass each way, no staging copy. Every key is
checked against the name map (names.rank_maps) of its rank file and chunk: an unknown key names the key, the file and
the layout it expected.

QLoRA NF4 weights (their `--qlora-nf4`, tags <= 26.0.0: bitsandbytes' packed quant state stored as
`<weight key>.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`) are
dequantized by our NF4 code (mindspeed_dsv.peft.nf4, the same format) to the dtype they record.

Expert-TP 1 at TP > 1 (`--expert-tensor-parallel-size 1`, their master A2 template: TP4 EP32): the files are the
ones megatron's ranks save, lcm(TP, EP) per pipeline stage, each with its TP shard of the dense weights and its EP
group's experts whole (ParallelLayout.rank_files); the saved args record the value, or give
`--source-expert-tensor-parallel-size 1`.

Not read (refused with a message): LoRA weights, grouped experts split over TP inside each expert (MindSpeed-LLM's
layout of that case is not documented well enough to be proven here). Optimizer state and RNG state are not converted (the output is a
weights-only checkpoint at iteration 1, as their converter writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shutil
import time

import torch
from tqdm import tqdm

from ckpt_convert import hf_io
from ckpt_convert.jobs import run_jobs
from ckpt_convert.mcore_io import (CKPT_FILE, McoreReader, all_ranks, args_record, iter_dir_name, load_rank_file,
                                   rank_file, read_iteration, save_rank_file, write_tracker)
from mindspeed_dsv.files import replace_dir
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import names as nm

QKV = "self_attention.linear_qkv.weight"
Q_DOWN = "self_attention.linear_q_down_proj.weight"
KV_DOWN = "self_attention.linear_kv_down_proj.weight"
OUR_FINAL_NORM = "decoder.final_layernorm.weight"
THEIR_FINAL_NORM_MTP = "final_layernorm.weight"
_THEIR_MTP_NORM = re.compile(r"^mtp\.final_layernorms\.(\d+)\.weight$")
_OUR_MTP_NORM = re.compile(r"^mtp\.layers\.(\d+)\.final_layernorm\.weight$")
# Entries of a rank file that are not model chunks; kept out of the conversion on purpose.
NON_MODEL_KEYS = ("checkpoint_version", "iteration", "args", "optimizer", "opt_param_scheduler", "rng_state",
                  "num_floating_point_operations_so_far")
# bitsandbytes' QuantState.as_dict(packed=True) entries, stored by MindSpeed-LLM under "<weight key>.<entry>"
_NF4_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


class MindSpeedCheckpointError(ValueError):
    """A MindSpeed-LLM checkpoint that cannot be read or written here; the message names what and where."""


# --------------------------------------------------------------------------------------------- one chunk
def _check_supported(layout: ParallelLayout) -> None:
    if layout.moe_grouped_gemm and layout.expert_tp > 1:
        raise MindSpeedCheckpointError(
            f"grouped experts split over TP inside each expert (--moe-grouped-gemm with TP {layout.tp}, expert-TP "
            f"{layout.expert_tp}) are not supported for MindSpeed-LLM interop; their training runs expert-TP 1 "
            "(--expert-tensor-parallel-size 1) or --moe-tp-extend-ep: give the one it used")


def _q_lora_rank(cfg: dict) -> int:
    q = nm.dims(cfg).q_lora_rank
    if not q:
        raise MindSpeedCheckpointError("MindSpeed-LLM's fused linear_qkv needs q_lora_rank (DeepSeek-V3); "
                                       "config.json has none")
    return q


def dequantize_bnb_nf4(packed: torch.Tensor, state: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """A weight stored as bitsandbytes NF4 (`packed` uint8 + the entries of QuantState.as_dict(packed=True)),
    dequantized by mindspeed_dsv.peft.nf4 to the dtype and shape the quant state records."""
    import json

    from mindspeed_dsv.peft.nf4 import NF4_CODE, NF4Tensor, dequantize_nf4

    try:
        meta = json.loads(bytes(state[".quant_state.bitsandbytes__nf4"].to(torch.uint8).tolist()).decode("utf-8"))
    except (KeyError, ValueError) as e:
        raise MindSpeedCheckpointError(f"{where}: NF4 quant state unreadable ({e})") from None
    if meta.get("quant_type") != "nf4" or not torch.equal(state[".quant_map"].float().cpu(), NF4_CODE):
        raise MindSpeedCheckpointError(f"{where}: quant type {meta.get('quant_type')!r} with its own code book; only "
                                       "bitsandbytes' NF4 is read")
    nested = ".nested_absmax" in state
    t = NF4Tensor(packed=packed.reshape(-1), absmax=state[".absmax"], shape=torch.Size(meta["shape"]),
                  dtype=getattr(torch, meta["dtype"]), blocksize=int(meta["blocksize"]),
                  offset=torch.tensor(float(meta["nested_offset"])) if nested else None,
                  absmax2=state[".nested_absmax"] if nested else None,
                  code2=state[".nested_quant_map"] if nested else None,
                  blocksize2=int(meta.get("nested_blocksize", 256)))
    return dequantize_nf4(t, backend="torch")


def _dequantize_nf4_entries(sd: dict, where: str) -> dict:
    """The chunk with every bitsandbytes NF4 weight (and its quant-state entries) replaced by the dense weight."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key in sd:
        for suffix in _NF4_SUFFIXES:
            if key.endswith(suffix):
                states.setdefault(key[: -len(suffix)], {})[suffix] = sd[key]
    if not states:
        return sd
    out = {k: v for k, v in sd.items() if not any(k.endswith(s) for s in _NF4_SUFFIXES)}
    for base, state in states.items():
        if base not in out:
            raise MindSpeedCheckpointError(f"{where}: NF4 quant state for {base} without the weight itself")
        out[base] = dequantize_bnb_nf4(out[base], state, f"{where}: {base}")
    return out


def chunk_to_ours(sd: dict, cfg: dict, where: str) -> dict[str, torch.Tensor]:
    """One model chunk of a MindSpeed-LLM rank file, renamed to our names (tensors are not copied; NF4 weights of
    their --qlora-nf4 are dequantized)."""
    q = _q_lora_rank(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in _dequantize_nf4_entries(sd, where).items():
        if key.endswith("_extra_state"):
            continue
        if ".lora_" in key:
            raise MindSpeedCheckpointError(f"{where}: {key}: LoRA weights are not converted; merge them with "
                                           "MindSpeed-LLM's merge_lora2hf first")
        if not torch.is_tensor(value):
            raise MindSpeedCheckpointError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
        if key.endswith(QKV):
            prefix = key[: -len(QKV)]
            if value.dim() != 2 or value.shape[0] <= q:
                raise MindSpeedCheckpointError(f"{where}: {key} has shape {list(value.shape)}; expected "
                                               f"[q_lora_rank {q} + kv_lora_rank + rope, hidden]")
            out[prefix + Q_DOWN] = value[:q]
            out[prefix + KV_DOWN] = value[q:]
        elif key == THEIR_FINAL_NORM_MTP:
            out[OUR_FINAL_NORM] = value
        elif m := _THEIR_MTP_NORM.match(key):
            out[f"mtp.layers.{m.group(1)}.final_layernorm.weight"] = value
        else:
            out[key] = value
    return out


def chunk_to_theirs(sd: dict, cfg: dict, mtp: bool, where: str) -> dict[str, torch.Tensor]:
    """One model chunk of our rank file in MindSpeed-LLM's names. `mtp`: the model has MTP layers (their
    final norm is then named `final_layernorm.weight`)."""
    _q_lora_rank(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if isinstance(value, dict):
            raise MindSpeedCheckpointError(f"{where}: {key} is stored as NF4 (--qlora-nf4); MindSpeed-LLM reads "
                                           "bitsandbytes' packing: convert a non-quantized checkpoint")
        if ".lora_" in key:
            raise MindSpeedCheckpointError(f"{where}: {key}: merge LoRA first (mcore2hf, then hf2mcore)")
        if key.endswith(Q_DOWN):
            prefix = key[: -len(Q_DOWN)]
            kv = sd.get(prefix + KV_DOWN)
            if kv is None:
                raise MindSpeedCheckpointError(f"{where}: {key} without {prefix + KV_DOWN}")
            out[prefix + QKV] = torch.cat([value, kv], dim=0)
        elif key.endswith(KV_DOWN):
            continue  # fused with its q_down above
        elif key == OUR_FINAL_NORM and mtp:
            out[THEIR_FINAL_NORM_MTP] = value
        elif m := _OUR_MTP_NORM.match(key):
            out[f"mtp.final_layernorms.{m.group(1)}.weight"] = value
        else:
            out[key] = value
    return out


def expected_shapes(cfg: dict, layout: ParallelLayout, tp: int, pp: int, ep: int, c: int,
                    mla_mm_split: bool) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every tensor of one rank file's chunk, from the name map applied to meta tensors
    of the shapes config.json implies (nothing is read or allocated)."""
    def read(name, rows=None, cols=None):
        t = torch.empty(nm.expected_hf_shape(cfg, name), device="meta")
        t = t if rows is None else t[rows]
        return t if cols is None else t[:, cols]

    def shape_of(name):
        return nm.expected_hf_shape(cfg, name)

    return {m.mcore: tuple(nm.shard_for_rank(m, read, shape_of).shape)
            for m in nm.rank_maps(cfg, layout, tp, pp, ep, c, mla_mm_split)}


def _layout_text(layout: ParallelLayout, mla_mm_split: bool) -> str:
    return (f"TP={layout.tp} PP={layout.pp} EP={layout.ep} expert-TP={layout.expert_tp} VPP={layout.vpp} "
            f"dualpipev={layout.dualpipev} "
            f"noop={layout.noop_layers} mtp={layout.mtp_num_layers} grouped={layout.moe_grouped_gemm} "
            f"tp-extend-ep={layout.moe_tp_extend_ep} mla-mm-split={mla_mm_split}")


def _check_keys(ours: dict, cfg: dict, layout: ParallelLayout, tp: int, pp: int, ep: int, c: int,
                mla_mm_split: bool, where: str) -> None:
    """The renamed chunk holds exactly the tensors of this rank and chunk in our name map, in their shapes."""
    want = expected_shapes(cfg, layout, tp, pp, ep, c, mla_mm_split)
    unknown = sorted(set(ours) - set(want))
    missing = sorted(set(want) - set(ours))
    wrong = [f"  {k}: shape {list(ours[k].shape)}, this layout needs {list(want[k])}"
             for k in sorted(set(ours) & set(want)) if tuple(ours[k].shape) != want[k]]
    if unknown or missing or wrong:
        lines = [f"  unknown key {k}" for k in unknown[:5]] + [f"  missing key {k}" for k in missing[:5]] + wrong[:5]
        raise MindSpeedCheckpointError(
            f"{where}: does not match the layout {_layout_text(layout, mla_mm_split)} (our names after "
            "renaming):\n" + "\n".join(lines) + "\nGive the layout flags that the checkpoint was trained or "
            "converted with.")


def _check_rank_dirs(load_dir: str, it: str, layout: ParallelLayout, mla_mm_split: bool) -> None:
    """The iteration directory holds exactly the rank files of the layout (a smaller TP/PP/EP would otherwise
    read a subset of the files)."""
    idir = os.path.join(load_dir, iter_dir_name(it))
    have = {d for d in os.listdir(idir) if d.startswith("mp_rank_")}
    want = {layout.rank_dir_name(tp, pp, ep) for tp, pp, ep in all_ranks(layout)}
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        raise MindSpeedCheckpointError(
            f"{idir}: rank directories do not match the layout {_layout_text(layout, mla_mm_split)}: "
            + (f"not in the layout {extra[:4]}{' ...' if len(extra) > 4 else ''}; " if extra else "")
            + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}; " if missing else "")
            + "give the --source-tensor/pipeline/expert-parallel-size the checkpoint was written with")


# --------------------------------------------------------------------------------------------- layout
SOURCE_FLAGS = {  # ParallelLayout field -> MindSpeed-LLM / Megatron saved-args name
    "tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size", "ep": "expert_model_parallel_size",
    "vpp": "num_layers_per_virtual_pipeline_stage", "num_layer_list": "num_layer_list", "noop_layers": "noop_layers",
    "num_layers": "num_layers", "mtp_num_layers": "mtp_num_layers", "first_k_dense_replace": "first_k_dense_replace",
    "num_experts": "num_experts", "moe_grouped_gemm": "moe_grouped_gemm", "moe_tp_extend_ep": "moe_tp_extend_ep",
    "expert_tensor_parallel_size": "expert_tensor_parallel_size",
}


def saved_args(load_dir: str) -> tuple[str, argparse.Namespace | None]:
    """(iteration, the `args` saved in the first rank file, or None: their converter saves none)."""
    it = read_iteration(load_dir)
    idir = os.path.join(load_dir, iter_dir_name(it))
    if not os.path.isdir(idir):
        raise MindSpeedCheckpointError(f"{load_dir}: tracker says iteration {it} but {idir} does not exist")
    ranks = sorted(d for d in os.listdir(idir) if d.startswith("mp_rank_"))
    if not ranks:
        raise MindSpeedCheckpointError(f"{idir}: no mp_rank_* directories")
    state = load_rank_file(os.path.join(idir, ranks[0], CKPT_FILE))
    return it, state.get("args")


def source_layout(given: dict, args: argparse.Namespace | None, cfg: dict) -> tuple[ParallelLayout, bool]:
    """The source layout: flags where given, else the checkpoint's saved args, else the defaults (TP/PP/EP 1,
    model shape from config.json). Returns (layout, mla_mm_split)."""
    saved = vars(args) if args is not None else {}
    fields = {}
    for field, key in SOURCE_FLAGS.items():
        value = given.get(field)
        if value is None:
            value = saved.get(key)
        if value is not None:
            fields[field] = value
    schedules = given.get("schedules_method") or saved.get("schedules_method")
    fields["dualpipev"] = schedules == "dualpipev"
    if fields.get("expert_tensor_parallel_size") == fields.get("tp", 1):
        # megatron saves the resolved value (= TP by default); unset, it follows TP through a --target-* change
        del fields["expert_tensor_parallel_size"]
    if isinstance(fields.get("noop_layers"), (set, tuple)):
        fields["noop_layers"] = sorted(fields["noop_layers"])
    layout = ParallelLayout(**fields).with_model_defaults(cfg)
    layout.validate_against(cfg, flag_prefix="source-")
    mm = given.get("mla_mm_split")
    mla_mm_split = bool(mm if mm is not None else saved.get("mla_mm_split", False))
    return layout, mla_mm_split


def retarget(layout: ParallelLayout, target: dict, cfg: dict) -> ParallelLayout:
    """`layout` with the given --target-* fields replaced (the rest kept), validated against the model."""
    changes = {k: v for k, v in target.items() if v is not None}
    if "schedules_method" in changes:  # 'dualpipev' or 'none'
        changes["dualpipev"] = changes.pop("schedules_method") == "dualpipev"
    if changes.get("vpp") == 0:  # --target-num-layers-per-virtual-pipeline-stage 0: no VPP
        changes["vpp"] = None
    out = dataclasses.replace(layout, **changes)
    out.validate_against(cfg, flag_prefix="target-")
    return out


# --------------------------------------------------------------------------------------------- directories
def _fresh_dir(path: str, flag: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise MindSpeedCheckpointError(f"{flag} {path} exists and is not empty; give an empty or new directory")


class MindSpeedReader(McoreReader):
    """Serves full HF-named tensors straight out of MindSpeed-LLM rank files: as each file is opened its chunks are
    renamed to ours (chunk_to_ours) and checked key by key and shape by shape against the name map (_check_keys),
    so mindspeed2mcore / mindspeed2hf write the output once, with no staging copy in our names."""

    def __init__(self, load_dir: str, layout: ParallelLayout, cfg: dict, mla_mm_split: bool = False):
        _check_supported(layout)
        _check_rank_dirs(load_dir, read_iteration(load_dir), layout, mla_mm_split)
        super().__init__(load_dir, layout, cfg, mla_mm_split=mla_mm_split, verify_checksums=False)

    def _load(self, path: str, tp: int, pp: int, ep: int) -> dict:
        state = load_rank_file(path, verify=False)  # their checkpoints record no checksums
        extra = sorted(k for k in state if k not in NON_MODEL_KEYS and not re.fullmatch(r"model\d*", k))
        if extra:
            raise MindSpeedCheckpointError(f"{path}: unknown top-level entries {extra}")
        out = {}
        hint = "the VPP/dualpipev flags differ from the checkpoint's"
        for c, ck, sd in _model_chunks(path, state, self.layout, hint):
            where = f"{path} [{ck}]"
            out[ck] = chunk_to_ours(sd, self.cfg, where)
            _check_keys(out[ck], self.cfg, self.layout, tp, pp, ep, c, self._mm_split, where)
        return out


def _model_chunks(path: str, state: dict, layout: ParallelLayout, hint: str):
    """(chunk index, chunk key, state dict) of every model chunk a rank file of `layout` holds; a missing one is
    an error naming the file, the keys it has and `hint`."""
    for c in range(layout.num_model_chunks):
        ck = nm.chunk_key(layout, c)
        if ck not in state:
            raise MindSpeedCheckpointError(
                f"{path}: no '{ck}' entry (has {sorted(k for k in state if k.startswith('model'))}); {hint}")
        yield c, ck, state[ck]


def mindspeed_args(cfg: dict, layout: ParallelLayout, mla_mm_split: bool) -> argparse.Namespace:
    """The `args` we save in their rank files: Megatron/MindSpeed-LLM names, so that a reader (theirs or ours)
    finds the layout without flags."""
    ns = args_record(cfg, layout, str(cfg.get("torch_dtype", "keep")), mla_mm_split)
    ns.noop_layers = ",".join(map(str, layout.noop_layers)) or None
    ns.untie_embeddings_and_output_weights = not cfg.get("tie_word_embeddings", False)
    return ns


def _copy_rank_as_theirs(load_dir: str, it: str, cfg: dict, layout_dict: dict, tp: int, pp: int, ep: int,
                         tmp_iter: str, args) -> int:
    """One of our rank files renamed to theirs, same layout."""
    layout = ParallelLayout.from_dict(layout_dict)
    path = rank_file(load_dir, layout, tp, pp, ep, it)
    state = load_rank_file(path)
    mtp = bool(layout.mtp_num_layers)
    chunks = {ck: chunk_to_theirs(sd, cfg, mtp, f"{path} [{ck}]")
              for _, ck, sd in _model_chunks(path, state, layout, "layout.json disagrees with the files")}
    return save_rank_file(os.path.join(tmp_iter, layout.rank_dir_name(tp, pp, ep), CKPT_FILE), chunks, args)


def _build_rank_as_theirs(spec: dict, cfg: dict, mla_mm_split: bool, layout_dict: dict, tp: int, pp: int, ep: int,
                          tmp_iter: str, args) -> int:
    """One rank file of another layout, built from our files by hf2mcore's build_rank (the reshard's own code) from
    the reader `spec` describes, renamed to theirs before it is saved."""
    from ckpt_convert.hf2mcore import build_rank, worker_reader

    layout = ParallelLayout.from_dict(layout_dict)
    chunks = build_rank(worker_reader(spec), cfg, layout, tp, pp, ep, mla_mm_split, None)
    mtp = bool(layout.mtp_num_layers)
    where = f"rank (tp {tp}, pp {pp}, ep {ep}) of the target layout"
    theirs = {ck: chunk_to_theirs(sd, cfg, mtp, f"{where} [{ck}]") for ck, sd in chunks.items()}
    return save_rank_file(os.path.join(tmp_iter, layout.rank_dir_name(tp, pp, ep), CKPT_FILE), theirs, args)


# --------------------------------------------------------------------------------------------- commands
def mindspeed2mcore(load_dir: str, save_dir: str, cfg: dict, given: dict, target: dict, model_config_dir: str,
                    params_dtype: str | None = None, workers: int = 1, progress: bool = True) -> dict:
    from ckpt_convert.hf2mcore import write_mcore

    _fresh_dir(save_dir, "--save-dir")
    it, args = saved_args(load_dir)
    src, mm = source_layout(given, args, cfg)
    dst = retarget(src, target, cfg)
    # One pass: our writer reads their files through MindSpeedReader (renamed and checked as each file opens),
    # for any target layout, the same one included; the output gets hf2mcore's checks and records.
    spec = {"kind": "mindspeed", "dir": load_dir, "layout": src.to_dict(), "cfg": cfg, "mla_mm_split": mm}
    record = {"command": "mindspeed2mcore", "source_dir": os.path.abspath(load_dir), "source_layout": src.to_dict(),
              "source_iteration": it}
    out = write_mcore(spec, cfg, dst, save_dir, params_dtype, mm, workers, record=record,
                      side_files_from=model_config_dir, progress=progress)
    return dict(out, source_layout=src.to_dict(), source_iteration=it)


def mindspeed2hf(load_dir: str, save_dir: str, cfg: dict, given: dict, model_config_dir: str, workers: int = 1,
                 progress: bool = True, save_fp8: bool = False) -> dict:
    from ckpt_convert import mcore2hf

    t0 = time.time()
    _fresh_dir(save_dir, "--save-dir")
    it, args = saved_args(load_dir)
    src, mm = source_layout(given, args, cfg)
    # One pass: the HF writer reads their files through MindSpeedReader (renamed and checked as each file opens);
    # tokenizer files come from --model-config's directory.
    spec = {"kind": "mindspeed", "dir": load_dir, "layout": src.to_dict(), "cfg": cfg, "mla_mm_split": mm}
    record = {"command": "mindspeed2hf", "source_dir": os.path.abspath(load_dir), "source_iteration": it}
    return mcore2hf.export(spec, save_dir, record, load_dir, None, save_fp8, workers, progress, model_config_dir, t0)


def mcore2mindspeed(load_dir: str, save_dir: str, target: dict, workers: int = 1, progress: bool = True) -> dict:
    from ckpt_convert.mcore_io import read_record

    _fresh_dir(save_dir, "--save-dir")
    cfg = hf_io.read_config(load_dir)
    src = ParallelLayout.load(load_dir)
    mm = bool(read_record(load_dir).get("mla_mm_split", False))
    dst = retarget(src, target, cfg)
    _check_supported(dst)
    if dst.to_dict() == src.to_dict():
        write_one = functools.partial(_copy_rank_as_theirs, load_dir, read_iteration(load_dir), cfg)
    else:
        # Another layout, in one pass: no resharded copy of ours is written on the way.
        from ckpt_convert.hf2mcore import check_source, worker_reader

        spec = {"kind": "mcore", "dir": load_dir, "layout": src.to_dict(), "cfg": cfg, "mla_mm_split": mm}
        reader = worker_reader(spec)  # this process's: the serial path reuses it
        check_source(reader, cfg, dst, mm, check_shapes=False)
        reader.check_embedding_copies()
        write_one = functools.partial(_build_rank_as_theirs, spec, cfg, mm)
    args = mindspeed_args(cfg, dst, mm)
    # Rank files go to a partial iteration directory, renamed when all are written; the tracker comes last.
    final_iter = os.path.join(save_dir, iter_dir_name(1))
    tmp_iter = final_iter + ".partial"
    shutil.rmtree(tmp_iter, ignore_errors=True)
    jobs = [(dst.to_dict(), tp, pp, ep, tmp_iter, args) for tp, pp, ep in all_ranks(dst)]
    bar = tqdm(total=len(jobs), desc="mcore2mindspeed rank files", unit="file", disable=not progress)
    for _ in run_jobs(write_one, jobs, workers):
        bar.update(1)
    bar.close()
    replace_dir(tmp_iter, final_iter)
    write_tracker(save_dir, 1)
    return {"files": len(jobs)}


__all__ = ["MindSpeedCheckpointError", "chunk_to_ours", "chunk_to_theirs", "mcore2mindspeed", "mindspeed2hf",
           "mindspeed2mcore", "source_layout"]
