"""Write Megatron-Core rank files for a target layout from any source that serves HF-named tensors.

`hf2mcore` reads a HF directory (HFReader); `reshard` reads another Megatron checkpoint (McoreReader) through
the same path, so both produce identical bytes for identical weights. One rank file is built and written at a
time (per worker process): peak memory is about one rank file plus one HF tensor.
"""

from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm

from ckpt_convert import deepseek4 as v4
from ckpt_convert import hf_io
from ckpt_convert.jobs import run_jobs
from mindspeed_dsv.files import crash_point, inside, is_empty_dir, replace_dir, sha256_file, write_json_atomic
from ckpt_convert.mcore_io import (TRACKER, McoreReader, all_ranks, args_record, checkpoint_contents,
                                   clean_stale_temporaries, iter_dir_name, read_iteration, save_rank_file,
                                   write_checksums, write_record, write_tracker)
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import family
from mindspeed_dsv.models import names as nm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    pass


def make_reader(spec: dict):
    """Readers are rebuilt in each worker process from a picklable spec."""
    if spec["kind"] == "hf" and spec.get("family") == family.DEEPSEEK4:
        from ckpt_convert.deepseek4 import hf_reader

        return hf_reader(spec["dir"], DTYPES[spec.get("fp8_dtype", "bf16")], spec.get("verify_checksums", True))
    if spec["kind"] == "hf":
        return hf_io.HFReader(spec["dir"], fp8_dtype=DTYPES[spec.get("fp8_dtype", "bf16")],
                              verify_checksums=spec.get("verify_checksums", True))
    layout = ParallelLayout.from_dict(spec["layout"])
    if spec["kind"] == "mindspeed":  # MindSpeed-LLM rank files, renamed to ours as they are read
        from ckpt_convert.mindspeed import MindSpeedReader

        return MindSpeedReader(spec["dir"], layout, spec["cfg"], spec.get("mla_mm_split", False))
    return McoreReader(spec["dir"], layout, spec["cfg"], mla_mm_split=spec.get("mla_mm_split", False),
                       verify_checksums=spec.get("verify_checksums", True))


def layout_str(layout: ParallelLayout) -> str:
    s = f"TP={layout.tp} PP={layout.pp} EP={layout.ep}"
    if layout.vpp:
        s += f" VPP={layout.vpp}"
    if layout.moe_tp_extend_ep:
        s += " moe-tp-extend-ep"
    elif layout.expert_tp != layout.tp:
        s += f" expert-TP={layout.expert_tp}"
    return s


def check_source(reader, cfg: dict, layout: ParallelLayout, mla_mm_split: bool, check_shapes: bool = True) -> None:
    """Before writing anything: every tensor the layout needs exists, has the shape config.json implies, and
    splits evenly over the layout. Raises ConversionError naming tensor, shape and layout."""
    missing: dict[str, str] = {}
    seen: set[str] = set()
    for tp, pp, ep in all_ranks(layout):
        for c in range(layout.num_model_chunks):
            for m in family.rank_maps(cfg, layout, tp, pp, ep, c, mla_mm_split):
                for h in m.hf:
                    if h not in reader:
                        missing.setdefault(h, f"{m.mcore} of {layout.rank_dir_name(tp, pp, ep)}")
                        continue
                    if not check_shapes or (h, m.split, m.tp) in seen:
                        continue
                    seen.add((h, m.split, m.tp))
                    shape = tuple(reader.shape(h))
                    want = v4.expected_hf_shape(cfg, h) if v4.is_v4(cfg) else nm.expected_hf_shape(cfg, h)
                    if want is not None and shape != tuple(want):
                        raise ConversionError(f"{h}: shape {list(shape)} but config.json implies {list(want)}")
                    dim = {nm.ROW: 1, nm.GROUPED_W2: 1}.get(m.split, 0)
                    if m.tp > 1 and m.split != nm.REPLICATED and m.rows is None and shape[dim] % m.tp:
                        raise ConversionError(
                            f"{h}: shape {list(shape)} does not fit the layout {layout_str(layout)}: dim {dim} "
                            f"({shape[dim]}) is not divisible by TP {m.tp} (needed for {m.mcore})")
    if missing:
        lines = [f"  {h} (for {where})" for h, where in list(missing.items())[:10]]
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConversionError(f"{getattr(reader, 'dir', 'source')}: missing tensor(s):\n" + "\n".join(lines) + more)


def needed_names(cfg: dict, layout: ParallelLayout, mla_mm_split: bool) -> set[str]:
    """Every HF tensor some rank file of `layout` is built from."""
    out: set[str] = set()
    for tp, pp, ep in all_ranks(layout):
        for c in range(layout.num_model_chunks):
            for m in family.rank_maps(cfg, layout, tp, pp, ep, c, mla_mm_split):
                out.update(m.hf)
    return out


# Rows compared at a time when checking an MTP copy against the main tensor (bounds memory for a 129k vocabulary).
_COMPARE_ROWS = 8192


def check_mtp_copies(reader, cfg: dict, layout: ParallelLayout) -> set[str]:
    """Megatron's MTP layers reuse the main embedding and output layer; HF stores a copy of each per MTP layer
    (`model.layers.{N+k}.embed_tokens` / `shared_head.head`). A copy that differs from the main tensor would be
    lost silently, so each present copy is compared bit for bit. Returns the copies checked (they count as used);
    raises ConversionError naming both tensors and the first differing row."""
    checked = set()
    if v4.is_v4(cfg):  # the V4 release stores no copies (its MTP uses the main embedding and head)
        return checked
    for k in range(layout.mtp_num_layers or 0):
        for copy, main in nm.mtp_shared_names(cfg, k).items():
            if copy not in reader:
                continue
            if main not in reader:
                raise ConversionError(f"{reader.dir}: {copy} is present but the main tensor {main} is missing")
            a, b = reader.shape(copy), reader.shape(main)
            if list(a) != list(b):
                raise ConversionError(f"{reader.dir}: {copy} has shape {list(a)} but {main} has {list(b)}; Megatron's "
                                      f"MTP layer uses {main} itself, so the two must be equal")
            for r0 in range(0, a[0], _COMPARE_ROWS):
                rows = slice(r0, min(r0 + _COMPARE_ROWS, a[0]))
                x, y = reader.read(copy, rows=rows), reader.read(main, rows=rows)
                if not torch.equal(x, y):
                    bad = int((x != y).reshape(x.shape[0], -1).any(1).nonzero()[0, 0]) + r0
                    raise ConversionError(
                        f"{reader.dir}: {copy} differs from {main} (first at row {bad}, max |diff| "
                        f"{(x.float() - y.float()).abs().max().item():.3g}); Megatron's MTP layer {k} uses {main} "
                        f"itself, so converting would drop the MTP copy. Make them equal or convert without MTP "
                        f"(--mtp-num-layers 0 --allow-unused-weights)")
            checked.add(copy)
    return checked


def check_unused(reader, cfg: dict, layout: ParallelLayout, mla_mm_split: bool, allow: bool = False) -> list[str]:
    """Every tensor of the HF source that no rank file is built from (FP8 scales of used tensors count as used).
    Refused with a ConversionError listing them unless `allow` (--allow-unused-weights); returns the list."""
    used = needed_names(cfg, layout, mla_mm_split) | check_mtp_copies(reader, cfg, layout)
    unused = sorted(n for n in reader.names() if n not in used)
    if unused and not allow:
        lines = [f"  {n} {list(reader.shape(n))}" for n in unused[:20]]
        more = f"\n  ... and {len(unused) - 20} more" if len(unused) > 20 else ""
        raise ConversionError(
            f"{reader.dir}: {len(unused)} tensor(s) would not be converted for layout {layout_str(layout)} "
            f"(MTP layers {layout.mtp_num_layers or 0}):\n" + "\n".join(lines) + more
            + "\nPass --allow-unused-weights to convert without them.")
    return unused


def _cast(t: torch.Tensor, mcore_name: str, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        return t
    if mcore_name.endswith("router.expert_bias"):  # megatron keeps the expert bias in float32
        return t.float()
    return t.to(dtype)


def qlora_targets(m: nm.TensorMap, qlora: dict | None) -> bool:
    """Whether --qlora-nf4 stores entry m as NF4: a LoRA-able linear named in --lora-target-modules."""
    return bool(qlora) and m.lora_module is not None and m.lora_module.rsplit(".", 1)[-1] in qlora["target_modules"]


def build_rank(reader, cfg, layout, tp, pp, ep, mla_mm_split, dtype, qlora: dict | None = None
               ) -> dict[str, dict[str, torch.Tensor]]:
    """One rank file's chunks. With `qlora` ({'target_modules', 'blocksize'}) the targeted linears' shards are
    stored as NF4 (NF4Tensor.state_dict(), the layout mindspeed_dsv.peft.qlora.nf4_state_dict saves): each
    rank quantizes its own shard, exactly what QLoRA training does to the weight it loads."""
    from mindspeed_dsv.peft.nf4 import quantize_nf4

    chunks = {}
    for c in range(layout.num_model_chunks):
        sd = {}
        for m in family.rank_maps(cfg, layout, tp, pp, ep, c, mla_mm_split):
            try:
                t = nm.shard_for_rank(m, reader.read, reader.shape)
            except nm.NameMapError as e:
                raise ConversionError(f"{e} (layout {layout_str(layout)})") from None
            t = _cast(t, m.mcore, dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                # a TP row slice is a contiguous view of the whole tensor, and torch.save writes a view's whole
                # storage: every rank file would hold the full embedding, output layer, ... (measured: +38% bytes)
                t = t.clone()
            if qlora_targets(m, qlora):
                t = quantize_nf4(t, blocksize=qlora["blocksize"], double_quant=False, backend="torch").state_dict()
            sd[m.mcore] = t
        chunks[nm.chunk_key(layout, c)] = sd
    return chunks


def _write_one(spec, cfg, layout_dict, tp, pp, ep, mla_mm_split, dtype_name, tmp_iter, args, qlora=None
               ) -> tuple[str, int, str]:
    """Build and write one rank file; returns (path relative to the iteration, tensor bytes, sha256)."""
    layout = ParallelLayout.from_dict(layout_dict)
    reader = worker_reader(spec)
    chunks = build_rank(reader, cfg, layout, tp, pp, ep, mla_mm_split, DTYPES.get(dtype_name), qlora)
    rel = f"{layout.rank_dir_name(tp, pp, ep)}/model_optim_rng.pt"
    path = os.path.join(tmp_iter, rel)
    nbytes = save_rank_file(path, chunks, args)
    return rel, nbytes, sha256_file(path)


_READERS: dict = {}


def worker_reader(spec):
    """The reader `spec` describes, built once per process (the parent's is registered by write_mcore)."""
    key = repr(sorted((k, str(v)) for k, v in spec.items()))
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = make_reader(spec)
    return _READERS[key]


def check_save_dir(save_dir: str, load_dir: str, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a --save-dir that holds files (unless --overwrite) or that is
    (inside) --load-dir."""
    if inside(save_dir, load_dir):
        raise ConversionError(f"--save-dir {save_dir} is (inside) --load-dir {load_dir}: write to another directory")
    if not is_empty_dir(save_dir) and not overwrite:
        held = checkpoint_contents(save_dir)
        iters = [h for h in held if h != TRACKER]
        latest = read_iteration(save_dir) if TRACKER in held else "none"
        what = f"a checkpoint ({len(iters)} iteration(s), tracker at {latest})" if held else "files"
        raise ConversionError(f"--save-dir {save_dir} already holds {what}: choose an empty directory, or pass "
                              "--overwrite to replace its iteration 1 (other iterations are left as they are)")


def _check_kept_iterations(save_dir: str, layout: ParallelLayout) -> None:
    """--overwrite keeps iterations other than 1, but layout.json is one record for the whole directory: refuse a
    new layout that would no longer describe them."""
    kept = [h for h in checkpoint_contents(save_dir) if h not in (TRACKER, iter_dir_name(1))]
    if not kept or not os.path.isfile(os.path.join(save_dir, "layout.json")):
        return
    diff = ParallelLayout.load(save_dir).diff(layout)
    if diff:
        raise ConversionError(f"--overwrite: {save_dir} keeps {', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''}, "
                              "written for another layout (" + "; ".join(diff) + "); layout.json would no longer "
                              "describe them. Convert into another directory")


def write_mcore(spec: dict, cfg: dict, layout: ParallelLayout, save_dir: str, params_dtype: str | None = None,
                mla_mm_split: bool = False, workers: int = 1, record: dict | None = None,
                side_files_from: str | None = None, progress: bool = True, qlora: dict | None = None,
                overwrite: bool = False, allow_unused: bool = False) -> dict:
    """Convert the source described by `spec` into `save_dir` for `layout`. Returns stats (with `unused`: the HF
    tensors left out, only possible with `allow_unused`). `qlora` ({'target_modules': [...], 'blocksize': 64})
    stores those linears as NF4 (see build_rank). A non-empty `save_dir` is refused unless `overwrite`; then only
    iteration 1, the records and the tracker are replaced."""
    t0 = time.time()
    check_save_dir(save_dir, spec["dir"], overwrite)
    _check_kept_iterations(save_dir, layout)
    reader = make_reader(spec)
    check_source(reader, cfg, layout, mla_mm_split, check_shapes=spec["kind"] == "hf")
    unused = check_unused(reader, cfg, layout, mla_mm_split, allow_unused) if spec["kind"] == "hf" else []
    if spec["kind"] == "mcore":
        reader.check_embedding_copies()
    _READERS.clear()
    _READERS[repr(sorted((k, str(v)) for k, v in spec.items()))] = reader

    os.makedirs(save_dir, exist_ok=True)
    clean_stale_temporaries(save_dir)
    final_iter = os.path.join(save_dir, iter_dir_name(1))
    tmp_iter = final_iter + f".partial-{os.getpid()}"
    dtype_name = params_dtype
    args = args_record(cfg, layout, params_dtype or str(cfg.get("torch_dtype", "keep")), mla_mm_split,
                       qlora_nf4=bool(qlora))
    jobs = all_ranks(layout)
    total = 0
    bar = tqdm(total=len(jobs), desc="hf2mcore rank files", unit="file", disable=not progress)
    ld = layout.to_dict()
    digests = {}
    calls = [(spec, cfg, ld, tp, pp, ep, mla_mm_split, dtype_name, tmp_iter, args, qlora) for tp, pp, ep in jobs]
    for _, (rel, n, digest) in run_jobs(_write_one, calls, workers):
        total += n
        digests[rel] = digest
        bar.update(1)
    bar.close()
    write_checksums(tmp_iter, digests)
    crash_point("hf2mcore:iteration_written")

    # Complete: swap the iteration directory in (atomically), then the records, the tracker file last.
    replace_dir(tmp_iter, final_iter)
    crash_point("hf2mcore:iteration_in_place")
    layout.save(save_dir)
    write_json_atomic(os.path.join(save_dir, "config.json"), cfg)
    if side_files_from:
        hf_io.copy_side_files(side_files_from, save_dir)
    rec = dict(record or {})
    rec.update(params_dtype=params_dtype, mla_mm_split=mla_mm_split, layout=ld,
               qlora_nf4=None if not qlora else dict(qlora, double_quant=False))
    write_record(save_dir, rec)
    write_tracker(save_dir, 1)
    crash_point("hf2mcore:tracker_written")
    secs = time.time() - t0
    return {"bytes": total, "seconds": secs, "files": len(jobs), "unused": unused}
