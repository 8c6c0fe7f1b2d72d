"""Megatron-Core checkpoint -> HF DeepSeek-V3 safetensors (one shard per decoder layer + one for the rest)."""

from __future__ import annotations

import os
import time

from tqdm import tqdm

from ckpt_convert import deepseek4 as v4
from ckpt_convert import hf_io
from ckpt_convert.jobs import run_jobs
from mindspeed_dsv.files import sha256_file, write_json_atomic
from ckpt_convert.mcore_io import McoreCheckpointError, McoreReader, read_record
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import names as nm


def hf_groups(reader: McoreReader, cfg: dict, layout: ParallelLayout) -> list[tuple[str, list[str]]]:
    """(shard file stem, HF names) in file order: embeddings/norm/head first, then one file per layer."""
    by_layer: dict = {}
    for name in reader.names():
        m = reader.entries[reader.hf_of_name[name]][0][4]
        by_layer.setdefault(m.hf_layer, []).append(name)
    for k, shared in enumerate(mtp_shared(cfg, layout)):
        by_layer.setdefault(nm.dims(cfg).num_hidden_layers + k, []).extend(shared)
    keys = sorted(by_layer, key=lambda x: -1 if x is None else x)
    return [("other" if k is None else f"layer{k}", by_layer[k]) for k in keys]


def mtp_shared(cfg: dict, layout: ParallelLayout) -> list[dict[str, str]]:
    """Per MTP depth, the HF copies of main tensors it writes (HF name -> main HF name): DeepSeek-V3's
    embed_tokens / shared_head.head; none for DeepSeek-V4, whose release shares the main ones."""
    if v4.is_v4(cfg):
        return []
    return [nm.mtp_shared_names(cfg, k) for k in range(layout.mtp_num_layers or 0)]


def _reader(spec) -> McoreReader:
    if spec.get("kind") == "mindspeed":  # MindSpeed-LLM rank files, renamed to ours as they are read (mindspeed2hf)
        from ckpt_convert.hf2mcore import make_reader

        return make_reader(spec)
    layout = ParallelLayout.from_dict(spec["layout"])
    return McoreReader(spec["dir"], layout, spec["cfg"], mla_mm_split=spec["mla_mm_split"],
                       lora_dir=spec["lora_dir"], lora_alpha=spec["lora_alpha"], lora_r=spec["lora_r"],
                       verify_checksums=spec["verify_checksums"], lora_target_modules=spec["lora_target_modules"])


_R: dict = {}  # the process's reader (the parent's in serial mode, one per worker process otherwise)


def _write_group(spec, names, shared, path, fp8):
    reader = _R.get("reader")
    if reader is None:
        reader = _R["reader"] = _reader(spec)
    tensors = {}
    for n in names:
        src = shared.get(n, n)
        tensors[n] = reader.read_full(src).clone()
    if spec.get("hf_spelling"):  # DeepSeek-V4: a layer's experts restacked, in the source's spelling
        tensors = v4.to_spelling(tensors, spec["hf_spelling"], spec["cfg"])
    written = hf_io.save_shard(tensors, path, fp8=fp8)
    info = {n: (tuple(t.shape), t.numel() * t.element_size()) for n, t in written.items()}
    return info, len(reader.lora_used), sha256_file(path)


def convert(load_dir: str, save_dir: str, given_layout: dict, lora_load: str | None = None, lora_r=None,
            lora_alpha=None, save_fp8: bool = False, workers: int = 1, progress: bool = True,
            mla_mm_split: bool | None = None, tokenizer_dir: str | None = None, verify_checksums: bool = True,
            lora_target_modules: list[str] | None = None) -> dict:
    """Write the HF export of `load_dir` as `save_dir`, which is replaced as a whole once the export is complete
    (hf_io.staged_dir); the caller has checked `save_dir` (hf_io.check_save_dir)."""
    t0 = time.time()
    layout = ParallelLayout.load(load_dir)
    _check_flags(layout, given_layout, load_dir)
    cfg = hf_io.read_config(load_dir)
    record = read_record(load_dir)
    recorded_split = bool(record.get("mla_mm_split", False))
    if mla_mm_split is not None and mla_mm_split != recorded_split:
        raise McoreCheckpointError(f"--mla-mm-split: the checkpoint was written with mla_mm_split={recorded_split}")
    if lora_load is not None:
        ll = ParallelLayout.load(lora_load) if os.path.isfile(os.path.join(lora_load, "layout.json")) else None
        if ll is not None and ll.diff(layout):
            raise McoreCheckpointError(f"--lora-load {lora_load}: its layout differs from the base checkpoint:\n  "
                                       + "\n  ".join(ll.diff(layout)))
    # The adapters' r/alpha/target modules as training recorded them (flags may only repeat them); a base
    # without recorded LoRA settings and without --lora-load keeps the flags (needed only if it holds adapters).
    from ckpt_convert.lora import lora_settings, recorded_lora

    if lora_load is not None or recorded_lora(load_dir)["lora_r"] is not None:
        lora_r, lora_alpha, lora_target_modules = lora_settings(lora_load or load_dir, lora_r, lora_alpha,
                                                                lora_target_modules)
    hf_spelling = None
    if v4.is_v4(cfg):
        if save_fp8:
            raise McoreCheckpointError("DeepSeek-V4: --save-fp8 is not supported yet (the export is unquantized)")
        hf_spelling = record.get("hf_spelling") or v4.OFFICIAL
    spec = dict(dir=load_dir, layout=layout.to_dict(), cfg=cfg, mla_mm_split=recorded_split, lora_dir=lora_load,
                hf_spelling=hf_spelling,
                lora_alpha=lora_alpha, lora_r=lora_r, verify_checksums=verify_checksums,
                lora_target_modules=lora_target_modules)
    return export(spec, save_dir, record, load_dir, lora_load, save_fp8, workers, progress, tokenizer_dir, t0)


def export(spec: dict, save_dir: str, record: dict, load_dir: str, lora_load: str | None, save_fp8: bool,
           workers: int, progress: bool, tokenizer_dir: str | None, t0: float) -> dict:
    """The HF export of the checkpoint `spec` describes (our rank files, or MindSpeed-LLM's: kind 'mindspeed'),
    written as `save_dir` once complete. Worker processes rebuild the same reader from `spec`."""
    cfg, layout = spec["cfg"], ParallelLayout.from_dict(spec["layout"])
    reader = _reader(spec)
    if reader.adapter_only():
        raise McoreCheckpointError(f"--load-dir {load_dir}: adapter-only checkpoint (lora_only recorded): pass the "
                                   "base checkpoint as --load-dir and this one as --lora-load, or add "
                                   "--save-lora-to-hf to export the adapter alone (PEFT)")
    extra = reader.unexpected_keys()
    if extra:
        raise McoreCheckpointError(f"{load_dir}: tensors that layout.json does not account for (is the layout "
                                   f"right?):\n  " + "\n  ".join(extra[:10]))
    groups = hf_groups(reader, cfg, layout)
    reader.check_embedding_copies()  # V3 and V4: the MTP stage's embedding copy equals the first stage's
    shared = {}
    for names in mtp_shared(cfg, layout):
        shared.update(names)

    with hf_io.staged_dir(save_dir) as stage:
        total, n, copied = _write_export(stage, spec, reader, groups, shared, record, load_dir, lora_load, save_fp8,
                                         workers, progress, tokenizer_dir)
    reader.close()
    return {"bytes": total, "seconds": time.time() - t0, "files": n, "tokenizer_files": copied}


def _write_export(out_dir, spec, reader, groups, shared, record, load_dir, lora_load, save_fp8, workers, progress,
                  tokenizer_dir):
    """Shards, index (with each shard's sha256), config.json and tokenizer files into the staging `out_dir`."""
    cfg = spec["cfg"]
    n = len(groups)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    bar = tqdm(total=n, desc="mcore2hf shards", unit="file", disable=not progress)
    lora_merged = 0
    _R.clear()
    if workers <= 1:
        _R["reader"] = reader  # serial: _write_group reuses the caller's reader; workers build their own
    calls = [(spec, names, shared, os.path.join(out_dir, fname), save_fp8) for (_, names), fname in zip(groups, files)]
    results = []
    for call, result in run_jobs(_write_group, calls, workers):
        results.append((os.path.basename(call[3]), result))
        bar.update(1)
    bar.close()
    checksums = {}
    # Every process reports how many adapters its reader merged (a worker's count covers all its groups).
    for fname, (info, used, digest) in results:
        lora_merged = max(lora_merged, used)
        checksums[fname] = digest
        for name, (_, nbytes) in info.items():
            weight_map[name] = fname
            total += nbytes
    if lora_load is not None and lora_merged == 0:  # raised inside staged_dir: nothing is published
        raise McoreCheckpointError(f"--lora-load {lora_load}: no LoRA weights matched any base tensor "
                                   f"(target modules {spec['lora_target_modules'] or 'any'})")
    hf_io.write_index(out_dir, weight_map, total, checksums)
    out_cfg = dict(cfg)
    if save_fp8:
        out_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    else:
        out_cfg.pop("quantization_config", None)
    write_json_atomic(os.path.join(out_dir, "config.json"), out_cfg)
    copied = hf_io.copy_side_files(load_dir, out_dir)
    for src in (tokenizer_dir, record.get("source_dir")):
        if not copied and src and os.path.isdir(src):
            copied = hf_io.copy_side_files(src, out_dir)
    return total, n, copied


def _check_flags(layout: ParallelLayout, given: dict, where: str) -> None:
    """Every layout flag the user gave must equal the recorded layout; name the field otherwise."""
    from mindspeed_dsv.layout import flag_name

    bad = []
    for field, value in given.items():
        if value is None:
            continue
        rec = getattr(layout, field)
        if field == "expert_tensor_parallel_size":  # unset in layout.json means "= TP"
            rec = layout.expert_tp
        if field in ("num_layer_list", "noop_layers"):
            value = [int(x) for x in str(value).replace(" ", "").split(",") if x != ""] if isinstance(value, str) \
                else list(value)
            rec = list(rec or [])
        if value != rec:
            bad.append(f"{flag_name(field, 'source-')} ({field}): flag {value!r} != checkpoint {rec!r}")
    if bad:
        raise McoreCheckpointError(f"{where}/layout.json: the checkpoint layout differs from the flags:\n  "
                                   + "\n  ".join(bad))
