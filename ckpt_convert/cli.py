"""Command line of ckpt_convert. Flag names follow MindSpeed-LLM's convert_ckpt_deepseek3*.py."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mindspeed_dsv.layout import LayoutError, ParallelLayout, add_layout_args

LAYOUT_DESTS = {  # argparse dest (with prefix) -> ParallelLayout field
    "{p}tensor_parallel_size": "tp", "{p}pipeline_parallel_size": "pp", "{p}expert_parallel_size": "ep",
    "{p}expert_tensor_parallel_size": "expert_tensor_parallel_size",
    "num_layers_per_virtual_pipeline_stage": "vpp", "num_layer_list": "num_layer_list", "noop_layers": "noop_layers",
    "num_layers": "num_layers", "mtp_num_layers": "mtp_num_layers", "first_k_dense_replace": "first_k_dense_replace",
    "num_experts": "num_experts", "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
}

DTYPE_HELP = ("Data type of the written Megatron weights: fp32, bf16 or fp16. Default: keep the source dtype "
              "(FP8 sources are dequantized to bf16). The router expert bias always stays float32 when cast. "
              "Should match training: bf16 for training's --bf16, fp32 otherwise (training has no fp16; it "
              "casts on load). Give one of --params-dtype, --bf16, --fp16.")


def _common_target(p: argparse.ArgumentParser) -> None:
    add_layout_args(p, prefix="target-")
    p.add_argument("--mla-mm-split", action="store_true",
                   help="Store MLA's two up-projections as four (linear_qk_nope, linear_qk_rope, linear_kv_nope, "
                        "linear_v), MindSpeed's --mla-mm-split. Default off. Must match training.")
    p.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], default=None, help=DTYPE_HELP)
    p.add_argument("--bf16", action="store_true", help="Same as --params-dtype bf16.")
    p.add_argument("--fp16", action="store_true", help="Same as --params-dtype fp16.")
    p.add_argument("--workers", type=int, default=1,
                   help="Processes writing rank files in parallel; peak memory grows with it. Default 1.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--overwrite", action="store_true",
                   help="Write into a --save-dir that already holds files: iteration 1, layout.json, config.json, "
                        "convert.json and the tracker are replaced (the tracker then says 1); other iterations "
                        "are left as they are. Default: a non-empty --save-dir is refused.")


VERIFY_HELP = ("Do not compare rank files with the sha256 recorded in their iteration's checksums.json before "
               "reading them (a mismatch is otherwise an error naming the file). Default: verify.")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m ckpt_convert",
                                  description="DeepSeek-V3 checkpoint conversion between HF and Megatron-Core.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hf2mcore", help="HF safetensors -> Megatron-Core rank files for a target layout",
                       description="Read a HF DeepSeek-V3 directory (BF16/FP32, or FP8 with 128x128 block scales, "
                                   "dequantized on the fly) and write Megatron-Core rank files for the target layout.")
    p.add_argument("--load-dir", required=True, help="HF directory: config.json + safetensors (+ index).")
    p.add_argument("--save-dir", required=True, help="Output Megatron checkpoint directory.")
    p.add_argument("--model-type-hf", default=None, choices=["deepseek3", "deepseek4"],
                   help="HF model family the checkpoint must be: deepseek3 (DeepseekV3ForCausalLM) or deepseek4 "
                        "(DeepseekV4ForCausalLM); a config.json of the other family is refused. Default: the "
                        "family config.json names.")
    p.add_argument("--qlora-nf4", action="store_true",
                   help="Store the base weights of the --lora-target-modules linears as NF4 (bitsandbytes' "
                        "4-bit NormalFloat, blocks of 64, no double quantization), each rank quantizing its own "
                        "shard, for QLoRA training; the rest stays in --params-dtype. mcore2hf dequantizes them "
                        "(and merges LoRA into the dequantized base). Default off.")
    p.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="With --qlora-nf4: the Megatron linears to quantize, the same names as training's "
                        "--lora-target-modules (linear_q_up_proj linear_kv_up_proj linear_proj linear_fc1 ...).")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="Do not compare the shards with the sha256 that an index written by mcore2hf records "
                        "(a mismatch is otherwise an error naming the shard). Default: verify.")
    p.add_argument("--allow-unused-weights", action="store_true",
                   help="Convert even when the HF directory holds tensors the target model does not use (listed "
                        "in the output as 'unused'; e.g. MTP layers with --mtp-num-layers 0). Default off: such "
                        "tensors are listed and the conversion is refused.")
    _common_target(p)

    p = sub.add_parser("reshard", help="Megatron-Core layout -> another layout, without going through HF",
                       description="Rewrite a checkpoint written by hf2mcore/training for another layout. The "
                                   "source layout comes from its layout.json; the flags give the target.")
    p.add_argument("--load-dir", required=True, help="Source Megatron checkpoint (with layout.json).")
    p.add_argument("--save-dir", required=True, help="Output Megatron checkpoint directory.")
    p.add_argument("--no-verify-checksums", action="store_true", help=VERIFY_HELP)
    _common_target(p)

    p = sub.add_parser("mcore2hf", help="Megatron-Core -> HF safetensors (optionally merging LoRA / PEFT export)",
                       description="Write HF safetensors shards + index + config.json (+ tokenizer files). The "
                                   "layout is read from --load-dir/layout.json; layout flags, when given, must agree.")
    p.add_argument("--load-dir", required=True, help="Megatron checkpoint (base, base+LoRA, or LoRA-only with "
                                                     "--save-lora-to-hf).")
    p.add_argument("--save-dir", required=True, help="Output HF directory.")
    g = add_layout_args(p, prefix="source-")
    p.set_defaults(**{a.dest: None for a in g._group_actions})
    p.add_argument("--mla-mm-split", action="store_true", default=None,
                   help="Assert the checkpoint was written with --mla-mm-split (recorded in convert.json).")
    p.add_argument("--lora-load", default=None,
                   help="Adapter-only checkpoint (same rank layout) to merge into the base weights. Without it, "
                        "LoRA keys found in --load-dir itself are merged.")
    p.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank. Default: the lora_r training recorded in the adapter checkpoint; needed only "
                        "for checkpoints that record none; a value differing from the recorded one is refused.")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha (scale alpha/r). Default: the recorded lora_alpha; needed only for "
                        "checkpoints that record none; a value differing from the recorded one is refused.")
    p.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="Megatron module names LoRA was applied to (linear_q_up_proj linear_proj linear_fc1 ...). "
                        "Default: the recorded ones (all adapters found if none recorded). A merge refuses a list "
                        "that differs from the recorded one; with --save-lora-to-hf a part of it selects what is "
                        "exported; without a record, only adapters of these modules are merged/exported.")
    p.add_argument("--save-lora-to-hf", action="store_true",
                   help="--load-dir holds only LoRA weights: write a PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) instead of merged weights. Not with --moe-grouped-gemm.")
    p.add_argument("--save-fp8", action="store_true",
                   help="Write linear weights as FP8 e4m3 with 128x128 weight_scale_inv blocks (official format).")
    p.add_argument("--tokenizer-dir", default=None,
                   help="Copy tokenizer files from here if the checkpoint has none. Default: the recorded HF source.")
    p.add_argument("--workers", type=int, default=1, help="Processes writing HF shards in parallel. Default 1.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--overwrite", action="store_true",
                   help="Write into a --save-dir that already holds files: once the new export is complete, every "
                        "weight file of the directory that is not part of it (*.safetensors, *.bin, their index) "
                        "is removed; other files stay. Default: a non-empty --save-dir is refused.")
    p.add_argument("--no-verify-checksums", action="store_true", help=VERIFY_HELP)

    # MindSpeed-LLM checkpoints (ckpt_convert/mindspeed.py): their source flags are the ones their mcore2hf takes.
    p = sub.add_parser("mindspeed2mcore", help="MindSpeed-LLM DeepSeek-V3 checkpoint -> ours (any target layout)",
                       description="Read MindSpeed-LLM rank files (their names: fused linear_qkv, "
                                   "mtp.final_layernorms) and write ours. The source layout comes from the "
                                   "checkpoint's saved args, or from the --source-*/layout flags (as typed for "
                                   "MindSpeed-LLM's mcore2hf); --target-* flags change TP/PP/EP/VPP/dualpipev/noop "
                                   "layers of the output (default: the source layout). Weights only: optimizer and "
                                   "RNG state are not converted; the output is iteration 1.")
    _mindspeed_source(p)
    p.add_argument("--save-dir", required=True, help="Output directory for our checkpoint (new or empty).")
    _mindspeed_target(p)
    p.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], default=None, help=DTYPE_HELP)
    p.add_argument("--workers", type=int, default=1, help="Processes writing rank files in parallel. Default 1.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = sub.add_parser("mindspeed2hf", help="MindSpeed-LLM DeepSeek-V3 checkpoint -> HF safetensors",
                       description="Read MindSpeed-LLM rank files (layout from saved args or the --source-* flags) "
                                   "and write HF safetensors + index + config.json (+ tokenizer files of "
                                   "--model-config).")
    _mindspeed_source(p)
    p.add_argument("--save-dir", required=True, help="Output HF directory (new or empty).")
    p.add_argument("--save-fp8", action="store_true",
                   help="Write linear weights as FP8 e4m3 with 128x128 weight_scale_inv blocks (official format).")
    p.add_argument("--workers", type=int, default=1, help="Processes writing HF shards in parallel. Default 1.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = sub.add_parser("mcore2mindspeed", help="Our checkpoint -> MindSpeed-LLM DeepSeek-V3 rank files",
                       description="Write our checkpoint (layout from its layout.json) as MindSpeed-LLM rank files, "
                                   "in the layout changed by the --target-* flags (default: the same). The saved "
                                   "args carry the layout, so mindspeed2mcore reads it back without flags.")
    p.add_argument("--load-dir", required=True, help="Our checkpoint (hf2mcore, reshard or training output).")
    p.add_argument("--save-dir", required=True, help="Output directory for MindSpeed-LLM rank files (new or empty).")
    _mindspeed_target(p)
    p.add_argument("--workers", type=int, default=1, help="Processes writing their rank files in parallel. Default 1.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = sub.add_parser("verify", help="Compare logits of the HF model and of the Megatron checkpoint",
                       description="Load --hf-dir with transformers and --mcore-dir with our model in the "
                                   "checkpoint's recorded layout (layout.json) on the same token ids; print max/mean "
                                   "abs and relative logit difference as JSON; exit 1 over --tolerance. A multi-rank "
                                   "layout needs TP*PP*EP ranks: under torchrun (WORLD_SIZE set) each process is one "
                                   "rank; otherwise the ranks are started here as local gloo processes.")
    p.add_argument("--hf-dir", required=True, help="HF directory the checkpoint should match (transformers loads it).")
    p.add_argument("--mcore-dir", required=True, help="Megatron checkpoint written by hf2mcore/reshard/training "
                                                      "(with layout.json and config.json).")
    p.add_argument("--tokens-file", required=True, help="JSON list of lists of token ids (equal lengths).")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="Largest max-abs logit difference that passes. Default 1e-3 (fp32); use about 0.5 for bf16.")
    p.add_argument("--save-logits", default=None,
                   help="torch.save the Megatron logits here (float32 [batch, seq, vocab], TP-gathered).")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="Compute dtype of both models. Default fp32.")
    p.add_argument("--no-verify-checksums", action="store_true", help=VERIFY_HELP)
    return top


def _mindspeed_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-dir", required=True, help="MindSpeed-LLM checkpoint: latest_checkpointed_iteration.txt "
                                                     "+ iter_*/mp_rank_*/model_optim_rng.pt.")
    p.add_argument("--model-config", default=None, metavar="DIR",
                   help="Directory with the model's HF config.json (and tokenizer files). Default: --load-dir "
                        "(MindSpeed-LLM does not store config.json there; give the HF model directory).")
    g = add_layout_args(p, prefix="source-")
    p.set_defaults(**{a.dest: None for a in g._group_actions})
    p.add_argument("--mla-mm-split", action="store_true", default=None,
                   help="The checkpoint stores MLA's up-projections as four (MindSpeed-LLM --mla-mm-split). "
                        "Default: from the saved args, else off.")


MINDSPEED_TARGET = {  # ParallelLayout field -> --target-* flag of mindspeed2mcore / mcore2mindspeed
    "tp": "--target-tensor-parallel-size", "pp": "--target-pipeline-parallel-size",
    "ep": "--target-expert-parallel-size", "expert_tensor_parallel_size": "--target-expert-tensor-parallel-size",
    "vpp": "--target-num-layers-per-virtual-pipeline-stage",
    "num_layer_list": "--target-num-layer-list", "noop_layers": "--target-noop-layers",
    "schedules_method": "--target-schedules-method", "num_layers": "--target-num-layers",
}


def _mindspeed_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target layout (default: the source's)")
    for field, flag in MINDSPEED_TARGET.items():
        kind = str if field in ("num_layer_list", "noop_layers", "schedules_method") else int
        extra = {"choices": ["dualpipev", "none"]} if field == "schedules_method" else {}
        g.add_argument(flag, type=kind, default=None, help=f"Output layout: {flag[len('--target-'):]} "
                       "(same meaning as in hf2mcore). Default: the source checkpoint's value.", **extra)


def _mindspeed_given(ns) -> tuple[dict, dict]:
    given = {field: getattr(ns, dest.format(p="source_"), None) for dest, field in LAYOUT_DESTS.items()}
    given["moe_grouped_gemm"] = ns.moe_grouped_gemm
    given["moe_tp_extend_ep"] = ns.moe_tp_extend_ep
    given["schedules_method"] = ns.schedules_method
    given["mla_mm_split"] = ns.mla_mm_split
    return given, _mindspeed_target_values(ns)


def _mindspeed_target_values(ns) -> dict:
    return {field: getattr(ns, flag[2:].replace("-", "_"), None) for field, flag in MINDSPEED_TARGET.items()}


def cmd_mindspeed(ns) -> int:
    from ckpt_convert import hf_io, mindspeed

    if ns.command == "mcore2mindspeed":
        stats = mindspeed.mcore2mindspeed(ns.load_dir, ns.save_dir, _mindspeed_target_values(ns), ns.workers,
                                          not ns.no_progress)
    else:
        cfg_dir = ns.model_config or ns.load_dir
        if not os.path.isfile(os.path.join(cfg_dir, "config.json")):
            raise ValueError(f"no config.json in {cfg_dir}: give the HF model directory as --model-config DIR")
        cfg = hf_io.read_config(cfg_dir)
        given, target = _mindspeed_given(ns)
        if ns.command == "mindspeed2mcore":
            stats = mindspeed.mindspeed2mcore(ns.load_dir, ns.save_dir, cfg, given, target, cfg_dir,
                                              _dtype(ns), ns.workers, not ns.no_progress)
        else:
            stats = mindspeed.mindspeed2hf(ns.load_dir, ns.save_dir, cfg, given, cfg_dir, ns.workers,
                                           not ns.no_progress, ns.save_fp8)
    print(json.dumps({"save_dir": ns.save_dir, **stats}, default=str))
    return 0


def _dtype(ns) -> str | None:
    """The one dtype asked for; two different ones (--bf16 --fp16, --params-dtype fp32 --bf16) are refused
    rather than one silently winning."""
    given = {f"--params-dtype {ns.params_dtype}": ns.params_dtype} if ns.params_dtype else {}
    if getattr(ns, "bf16", False):
        given["--bf16"] = "bf16"
    if getattr(ns, "fp16", False):
        given["--fp16"] = "fp16"
    if len(set(given.values())) > 1:
        raise ValueError(f"contradictory dtype flags {' and '.join(given)}: give one of --params-dtype, --bf16, "
                         "--fp16")
    return next(iter(given.values()), None)


def target_layout(ns, cfg: dict) -> ParallelLayout:
    layout = ParallelLayout.from_args(ns, prefix="target").with_model_defaults(cfg)
    layout.validate_against(cfg, flag_prefix="target-")
    k = cfg.get("first_k_dense_replace")
    if k is not None and layout.first_k_dense_replace != k:
        raise LayoutError(f"--first-k-dense-replace {layout.first_k_dense_replace} differs from "
                          f"first_k_dense_replace {k} of config.json (dense layers cannot become MoE layers)")
    if layout.num_experts is not None and layout.ep > layout.num_experts:
        raise LayoutError(f"--target-expert-parallel-size {layout.ep} exceeds the {layout.num_experts} experts")
    return layout


def cmd_hf2mcore(ns) -> int:
    from ckpt_convert import hf_io
    from ckpt_convert.hf2mcore import write_mcore

    qlora = None
    if ns.qlora_nf4:
        from mindspeed_dsv.peft.lora import LORA_TARGET_MODULES

        if not ns.lora_target_modules:
            raise ValueError("--qlora-nf4 needs --lora-target-modules (the linears QLoRA training adapts)")
        unknown = sorted(set(ns.lora_target_modules) - set(LORA_TARGET_MODULES))
        if unknown:
            raise ValueError(f"--lora-target-modules: unknown module(s) {unknown}; valid: {', '.join(LORA_TARGET_MODULES)}")
        qlora = {"target_modules": sorted(set(ns.lora_target_modules)), "blocksize": 64}
    elif ns.lora_target_modules:
        raise ValueError("--lora-target-modules only applies with --qlora-nf4 in hf2mcore")
    import torch

    from mindspeed_dsv.models.family import DEEPSEEK4, family_of

    cfg = hf_io.read_config(ns.load_dir)
    if ns.model_type_hf is not None and ns.model_type_hf != family_of(cfg):
        raise ValueError(f"--model-type-hf {ns.model_type_hf}: {ns.load_dir}/config.json is a {family_of(cfg)} "
                         f"model (architectures {cfg.get('architectures')})")
    nextn = int(cfg.get("num_nextn_predict_layers") or 0)
    v4 = family_of(cfg) == DEEPSEEK4
    if v4 and ns.mtp_num_layers is None and nextn:
        from ckpt_convert.deepseek4 import hf_reader

        names = hf_reader(ns.load_dir, torch.bfloat16, verify_checksums=False).names()  # rank-map names
        if not any(n.startswith("model.mtp.") for n in names):
            print(f"note: config.json has num_nextn_predict_layers {nextn} but {ns.load_dir} holds no MTP weights "
                  "(mtp.* / model.mtp.*); converting without MTP (--mtp-num-layers 0)", file=sys.stderr)
            ns.mtp_num_layers = 0
    elif ns.mtp_num_layers is None and nextn:
        reader = hf_io.HFReader(ns.load_dir, verify_checksums=False)  # names only; write_mcore's reader verifies
        if f"model.layers.{cfg['num_hidden_layers']}.eh_proj.weight" not in reader:
            print(f"note: config.json has num_nextn_predict_layers {nextn} but {ns.load_dir} holds no MTP weights "
                  f"(model.layers.{cfg['num_hidden_layers']}.*); converting without MTP (--mtp-num-layers 0)",
                  file=sys.stderr)
            ns.mtp_num_layers = 0
    layout = target_layout(ns, cfg)
    spec = {"kind": "hf", "dir": ns.load_dir, "verify_checksums": not ns.no_verify_checksums, "family": family_of(cfg)}
    record = {"source_dir": os.path.abspath(ns.load_dir), "command": "hf2mcore"}
    if v4:
        from ckpt_convert.deepseek4 import spelling_of

        record["hf_spelling"] = spelling_of(ns.load_dir)  # what mcore2hf writes back
    stats = write_mcore(spec, cfg, layout, ns.save_dir, _dtype(ns), ns.mla_mm_split, ns.workers, record=record,
                        side_files_from=ns.load_dir, progress=not ns.no_progress, qlora=qlora,
                        overwrite=ns.overwrite, allow_unused=ns.allow_unused_weights)
    if stats["unused"]:
        print(f"note: --allow-unused-weights: {len(stats['unused'])} tensor(s) of {ns.load_dir} were not converted "
              f"(listed under 'unused')", file=sys.stderr)
    print(json.dumps({"save_dir": ns.save_dir, **stats}))
    return 0


def cmd_reshard(ns) -> int:
    from ckpt_convert import hf_io
    from ckpt_convert.hf2mcore import write_mcore
    from ckpt_convert.mcore_io import read_record

    src = ParallelLayout.load(ns.load_dir)
    cfg = hf_io.read_config(ns.load_dir)
    rec = read_record(ns.load_dir)
    if ns.mtp_num_layers is None and rec.get("hf_spelling"):  # DeepSeek-V4: MTP as the source has it
        ns.mtp_num_layers = src.mtp_num_layers
    layout = target_layout(ns, cfg)
    spec = {"kind": "mcore", "dir": ns.load_dir, "layout": src.to_dict(), "cfg": cfg,
            "mla_mm_split": bool(rec.get("mla_mm_split", False)), "verify_checksums": not ns.no_verify_checksums}
    record = {"source_dir": rec.get("source_dir"), "command": "reshard", "resharded_from": os.path.abspath(ns.load_dir)}
    if rec.get("hf_spelling"):
        record["hf_spelling"] = rec["hf_spelling"]
    stats = write_mcore(spec, cfg, layout, ns.save_dir, _dtype(ns), ns.mla_mm_split, ns.workers, record=record,
                        side_files_from=ns.load_dir, progress=not ns.no_progress, overwrite=ns.overwrite)
    print(json.dumps({"save_dir": ns.save_dir, **stats}))
    return 0


def cmd_mcore2hf(ns) -> int:
    from ckpt_convert import hf_io, mcore2hf
    from ckpt_convert.mcore_io import McoreReader, read_record

    given = {}
    for dest, field in LAYOUT_DESTS.items():
        given[field] = getattr(ns, dest.format(p="source_"), None)
    given["moe_grouped_gemm"] = ns.moe_grouped_gemm or None
    given["moe_tp_extend_ep"] = ns.moe_tp_extend_ep or None
    given["dualpipev"] = True if ns.schedules_method == "dualpipev" else None
    hf_io.check_save_dir(ns.save_dir, [ns.load_dir] + ([ns.lora_load] if ns.lora_load else []), ns.overwrite)
    verify = not ns.no_verify_checksums
    if ns.save_lora_to_hf:
        from ckpt_convert.lora import export_peft, lora_settings

        r, alpha, targets = lora_settings(ns.load_dir, ns.lora_r, ns.lora_alpha, ns.lora_target_modules,
                                          subset_ok=True)
        layout = ParallelLayout.load(ns.load_dir)
        mcore2hf._check_flags(layout, given, ns.load_dir)
        cfg = hf_io.read_config(ns.load_dir)
        rec = read_record(ns.load_dir)
        reader = McoreReader(ns.load_dir, layout, cfg, mla_mm_split=bool(rec.get("mla_mm_split", False)),
                             verify_checksums=verify)
        with hf_io.staged_dir(ns.save_dir) as stage:  # published whole, like mcore2hf.convert's export
            stats = export_peft(reader, cfg, layout, stage, r, alpha, targets, base_model=rec.get("source_dir"))
    else:
        stats = mcore2hf.convert(ns.load_dir, ns.save_dir, given, ns.lora_load, ns.lora_r, ns.lora_alpha,
                                 ns.save_fp8, ns.workers, not ns.no_progress, ns.mla_mm_split, ns.tokenizer_dir,
                                 verify_checksums=verify, lora_target_modules=ns.lora_target_modules)
    print(json.dumps({"save_dir": ns.save_dir, **stats}))
    return 0


def cmd_verify(ns) -> int:
    from ckpt_convert.verify import run_verify

    return run_verify(ns)


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    fn = {"hf2mcore": cmd_hf2mcore, "reshard": cmd_reshard, "mcore2hf": cmd_mcore2hf, "verify": cmd_verify,
          "mindspeed2mcore": cmd_mindspeed, "mindspeed2hf": cmd_mindspeed, "mcore2mindspeed": cmd_mindspeed}
    try:
        return fn[ns.command](ns)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueErrors that name what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
