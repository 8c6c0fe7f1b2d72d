"""Training flags, named as Megatron / MindSpeed-LLM name them, and their validation.

Everything here runs before any weight is read: a typo is an argparse error naming the flag, and flags that
contradict each other or the model's config.json fail with the flags named.
"""

from __future__ import annotations

import argparse
import os
import sys

from mindspeed_dsv.layout import LayoutError, ParallelLayout, add_layout_args


class ArgumentError(ValueError):
    """Contradictory or impossible flags; the message names them."""


def is_first_rank() -> bool:
    """Rank 0 of torchrun (or a plain single process): the one rank that reports a flag error every rank hits."""
    return os.environ.get("RANK", "0") == "0"


def report_error(prog: str, message: str) -> None:
    """`prog: error: message` on stderr, from the first rank only: under torchrun every rank checks the same
    flags and fails the same way, and N copies of one line (or of the usage block) hide it."""
    if is_first_rank():
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block of every flag), printed once under torchrun."""

    def error(self, message):
        report_error(self.prog, f"{message} (see --help)")
        sys.exit(2)


# Model-shape flags a script may pass; each must equal config.json when given (MindSpeed scripts pass them all).
SHAPE_FLAGS = {
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_router_topk": "num_experts_per_tok",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_nope_head_dim",
    "qk_pos_emb_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "vocab_size": "vocab_size",
}


def build_parser(prog: str = "mindspeed_dsv.train") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Pretrain or fine-tune (full, LoRA, QLoRA) a DeepSeek-V3-class model on Megatron-Core. "
        "Run under torchrun; flags follow Megatron / MindSpeed-LLM names.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model-config", default=None,
                   help="HF config.json (or its directory) of the model. Default: config.json inside --load.")
    for flag in SHAPE_FLAGS:
        m.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                       help=f"Checked against config.json's {SHAPE_FLAGS[flag]} when given; the model is built from config.json.")
    m.add_argument("--init-method-std", type=float, default=0.02, help="Std of the normal init (pretraining from scratch).")
    add_layout_args(p)

    k = p.add_argument_group("kernels (mindspeed_dsv.ops; see docs/en/ops.md)")
    k.add_argument("--use-flash-attn", action="store_true",
                   help="Fused attention: torch SDPA on cuda/cpu, npu_fusion_attention on npu.")
    k.add_argument("--use-fused-rmsnorm", action="store_true",
                   help="Every RMSNorm (layers, MLA q/kv, final, MTP) fused: cuda: torch.compile, npu: npu_rms_norm; "
                   "cpu: refused.")
    k.add_argument("--use-fused-rotary-pos-emb", action="store_true",
                   help="MLA's rotary (queries and keys) fused: cuda: megatron-core's Triton MLA RoPE kernels "
                   "(query rotated in place, key/value split with the rotated key part, no concatenation), "
                   "npu: npu_rotary_mul; cpu: refused.")
    k.add_argument("--use-fused-swiglu", action="store_true",
                   help="Every SwiGLU (dense MLP, shared and routed experts) fused: cuda: torch.compile, "
                   "npu: npu_swiglu; cpu: refused.")
    k.add_argument("--use-fused-moe-token-permute-and-unpermute", action="store_true",
                   help="MoE token permute/unpermute of our dispatchers (any EP/TP, alltoall, dropless) fused: "
                   "cuda: torch.compile of the sort-based permute, npu: npu_moe_token_permute/unpermute; cpu: refused.")
    k.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="Fused vocab-parallel cross entropy: one pass over the [tokens, vocab] logits forward and one "
                   "backward, no fp32 softmax kept, main and MTP losses (cuda: torch.compile'd passes; cpu/npu: the same math in eager torch, "
                   "no npu kernel).")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="*", default=None,
                   help="Dataset prefix(es) written by preprocess_data.py, optionally weighted: 'w1 prefix1 w2 prefix2'.")
    d.add_argument("--split", default="100,0,0", help="Train,valid,test proportions of each dataset.")
    d.add_argument("--tokenizer-name-or-path", default=None, help="HF tokenizer directory (for EOD/pad ids).")
    d.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"],
                   help="Only HF tokenizers are supported.")
    d.add_argument("--seq-length", type=int, required=False, default=None,
                   help="Tokens per sample. Instruction data: must equal the seq_length recorded in the "
                   "dataset's {prefix}_summary.json (the length preprocess packed or truncated to).")
    d.add_argument("--is-instruction-dataset", action="store_true",
                   help="Fine-tuning data (input_ids/labels written by preprocess with an instruction handler); "
                   "loss only where labels are not -100.")
    d.add_argument("--reset-position-ids", action="store_true",
                   help="Packed SFT data: restart positions at each sample and keep attention inside it.")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    d.add_argument("--no-shuffle", action="store_true", help="Keep dataset order (debugging).")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=1, help="Samples per micro-batch per data-parallel rank.")
    t.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="Compute each linear's weight gradient separately and add it to the fp32 gradient buffer, "
                   "instead of accumulating inside the GEMM. The fusion is on by default on cpu/cuda; on npu it is always off "
                   "(not verified there yet), which is what this flag asks for.")
    t.add_argument("--global-batch-size", type=int, default=None,
                   help="Samples per optimizer step over all data-parallel ranks. Default: micro-batch × DP.")
    t.add_argument("--train-iters", type=int, default=None, help="Optimizer steps to train.")
    t.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate.")
    t.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of decay.")
    t.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   help="Shape of the decay after warm-up.")
    t.add_argument("--lr-decay-iters", type=int, default=None, help="Steps over which to decay. Default: --train-iters.")
    t.add_argument("--lr-warmup-fraction", type=float, default=None, help="Warm-up as a fraction of decay steps.")
    t.add_argument("--lr-warmup-iters", type=int, default=0, help="Warm-up steps (exclusive with --lr-warmup-fraction).")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    t.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    t.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2.")
    t.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")
    t.add_argument("--clip-grad", type=float, default=1.0, help="Global gradient-norm clip (0 disables).")
    t.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and compute with fp32 master weights (there is no fp16 training; "
                   "without --bf16 training is fp32).")
    t.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="Stop with an error naming the iteration (exit 1, nothing saved) when the loss or the "
                   "gradient norm is not finite; --no-check-for-nan-in-loss-and-grad trains on.")
    t.add_argument("--seed", type=int, default=1234, help="Random seed (data order, init, dropout).")
    t.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard optimizer state over data-parallel ranks (ZeRO-1).")
    t.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="Activation recompute: full layers, or selected modules (--recompute-modules).")
    t.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="With full recompute: how layers are grouped.")
    t.add_argument("--recompute-num-layers", type=int, default=None, help="Layers per recompute group / block.")
    t.add_argument("--recompute-modules", nargs="*", default=None,
                   help="With selective recompute: core_attn, moe_act, layernorm, mla_up_proj, mlp, moe, shared_experts.")
    t.add_argument("--recompute-activation-function", action="store_true",
                   help="MindSpeed name: recompute the SwiGLU activations (selective recompute of moe_act).")
    t.add_argument("--recompute-mla-up-proj", action="store_true",
                   help="MindSpeed name: recompute MLA's up projections (selective recompute of mla_up_proj).")
    t.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="Sequence-level auxiliary balance loss weight.")
    t.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3,
                   help="Aux-loss-free balancing: step of the expert-bias update per global batch (0 freezes it; "
                   "LoRA/QLoRA runs always freeze it with the rest of the base).")
    t.add_argument("--moe-router-load-balancing-type", default="seq_aux_loss",
                   choices=["seq_aux_loss", "aux_loss", "none"], help="Auxiliary balance loss kind.")
    t.add_argument("--moe-token-dispatcher-type", default="alltoall", choices=["alltoall", "allgather"],
                   help="How tokens reach their experts across expert-parallel ranks.")
    t.add_argument("--moe-fb-overlap", action="store_true",
                   help="Under --schedules-method dualpipev, run one micro-batch's forward together with another's "
                   "backward, handing over at each expert all-to-all so one's transfer hides behind the other's "
                   "compute (DeepSeek's DualPipe). Needs expert parallel >= 2 and the alltoall dispatcher; "
                   "numbers unchanged.")
    t.add_argument("--mtp-loss-scaling-factor", type=float, default=0.3, help="Weight of the MTP loss.")

    c = p.add_argument_group("checkpointing")
    c.add_argument("--load", default=None, help="Checkpoint directory to start from (hf2mcore output or a --save dir).")
    c.add_argument("--save", default=None, help="Directory to save checkpoints to.")
    c.add_argument("--save-interval", type=int, default=None, help="Save every N steps (and at the end).")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="Stop (after saving, if --save) once the step count is a multiple of N; the schedule still "
                   "spans --train-iters, so a later --load resumes the same run.")
    c.add_argument("--finetune", action="store_true",
                   help="Load weights only: start at step 0 with fresh optimizer, scheduler and data order.")
    c.add_argument("--no-save-optim", action="store_true", help="Do not save optimizer state.")
    c.add_argument("--no-load-optim", action="store_true", help="Do not load optimizer state.")
    c.add_argument("--no-save-rng", action="store_true", help="Do not save RNG states.")
    c.add_argument("--no-load-rng", action="store_true", help="Do not load RNG states.")
    c.add_argument("--overwrite", action="store_true",
                   help="Save into a --save directory that holds checkpoints this run did not load from (or, with "
                   "--finetune, loaded from): iterations of the same number are replaced and the tracker moves to "
                   "this run's. Default: refused before training starts.")
    c.add_argument("--no-verify-checksums", action="store_true",
                   help="Load --load/--lora-load rank files without comparing them with the sha256 recorded in "
                   "their iteration's checksums.json. Default: a mismatch stops with an error naming the file.")

    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-interval", type=int, default=None, help="Validate every N steps.")
    e.add_argument("--eval-iters", type=int, default=0, help="Validation micro-batch groups per evaluation.")
    e.add_argument("--log-interval", type=int, default=1, help="Log every N steps.")
    e.add_argument("--tensorboard-dir", default=None, help="Write TensorBoard scalars (every step) here.")
    e.add_argument("--peak-tflops", type=float, default=None,
                   help="Device peak TFLOP/s for MFU. Default: known bf16 dense peak of the device, none on cpu.")

    lo = p.add_argument_group("LoRA / QLoRA")
    lo.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains all weights.")
    lo.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / r).")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    lo.add_argument("--lora-target-modules", nargs="*", default=None,
                    help="Megatron module names to adapt, e.g. linear_qkv linear_proj linear_fc1 linear_fc2 "
                    "linear_q_down_proj linear_q_up_proj linear_kv_down_proj linear_kv_up_proj.")
    lo.add_argument("--lora-load", default=None, help="Adapter-only checkpoint to resume LoRA from.")
    lo.add_argument("--lora-ckpt-filter", action="store_true", help="Save only the LoRA adapter weights.")
    lo.add_argument("--qlora-nf4", "--qlora", dest="qlora_nf4", action="store_true",
                    help="Store frozen base weights of the targeted linears as NF4 (QLoRA).")
    return p


def validate(args: argparse.Namespace, world_size: int, model_cfg: dict | None = None) -> ParallelLayout:
    """Check flags against each other, the world size and config.json; return the layout. Raises ArgumentError."""
    problems = _value_problems(args)
    if args.train_iters is None:
        problems.append("--train-iters is required")
    if args.seq_length is None:
        problems.append("--seq-length is required")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        problems.append("--lr-warmup-fraction and --lr-warmup-iters are exclusive")
    if args.train_iters is not None and args.lr_warmup_iters and args.lr_warmup_iters >= (args.lr_decay_iters or args.train_iters):
        problems.append(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay steps "
                        f"(--lr-decay-iters or --train-iters {args.lr_decay_iters or args.train_iters})")
    if args.lr >= 0 and args.min_lr > args.lr:
        problems.append(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.recompute_method and args.recompute_granularity != "full":
        problems.append("--recompute-method needs --recompute-granularity full")
    if args.recompute_modules and args.recompute_granularity != "selective":
        problems.append("--recompute-modules needs --recompute-granularity selective")
    if args.save_interval and not args.save:
        problems.append("--save-interval needs --save")
    if args.finetune and not args.load:
        problems.append("--finetune needs --load")
    if args.overwrite and not args.save:
        problems.append("--overwrite needs --save")
    if args.no_verify_checksums and not (args.load or args.lora_load):
        problems.append("--no-verify-checksums needs --load or --lora-load")
    if args.lora_r == 0 and (args.lora_target_modules or args.lora_ckpt_filter or args.lora_load or args.qlora_nf4):
        problems.append("LoRA flags (--lora-target-modules/--lora-ckpt-filter/--lora-load/--qlora-nf4) need --lora-r > 0")
    if args.lora_r and not args.lora_target_modules:
        problems.append("--lora-r needs --lora-target-modules")
    if args.qlora_nf4 and args.save and not args.lora_ckpt_filter:
        # The base weights live as NF4 outside the model's parameters, so a full save would lack them.
        problems.append("--qlora-nf4 with --save needs --lora-ckpt-filter (QLoRA saves its adapters; the frozen "
                        "base is the --load checkpoint, or its NF4 form from hf2mcore --qlora-nf4 for merging)")
    if args.eval_interval and not args.eval_iters:
        problems.append("--eval-interval needs --eval-iters > 0")
    if not args.data_path:
        problems.append("--data-path is required")
    if args.tensorboard_dir:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            problems.append("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")
    if args.model_config is None and args.load is None:
        problems.append("--model-config (or a --load directory holding config.json) is required")
    if problems:
        raise ArgumentError("; ".join(problems))

    if model_cfg is not None:
        for flag, key in SHAPE_FLAGS.items():
            given = getattr(args, flag)
            if given is not None and model_cfg.get(key) != given:
                problems.append(f"--{flag.replace('_', '-')} {given} differs from config.json {key}={model_cfg.get(key)}")
    try:
        layout = ParallelLayout.from_args(args)
        if model_cfg is not None:
            layout = layout.with_model_defaults(model_cfg)
            layout.validate_against(model_cfg)
        layout.validate()
        layout.validate_runtime(world_size=world_size, seq_length=args.seq_length)
    except LayoutError as err:
        problems.append(str(err))
        layout = None
    if layout is not None:
        if layout.cp > 1:
            problems.append("--context-parallel-size > 1 is not supported yet")
        dp = world_size // (layout.tp * layout.pp * layout.cp)
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * dp
        if args.global_batch_size % (args.micro_batch_size * dp):
            problems.append(
                f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                f"{args.micro_batch_size} × data-parallel size {dp}"
            )
        if layout.dualpipev:
            problems += _dualpipev_problems(layout, args, dp, model_cfg)
        if args.moe_fb_overlap:
            problems += _fb_overlap_problems(layout, args)
        if layout.tp > 1 and layout.num_experts and not layout.sequence_parallel:
            problems.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core rule)")
        if model_cfg is not None and _is_deepseek4(model_cfg):
            problems += deepseek4_problems(args, layout)
        if args.use_fused_moe_token_permute_and_unpermute and args.moe_token_dispatcher_type != "alltoall":
            # It acts through our token dispatchers (models/moe_layer.py), which replace megatron's alltoall one only.
            problems.append("--use-fused-moe-token-permute-and-unpermute needs --moe-token-dispatcher-type alltoall "
                            "(megatron's allgather dispatcher permutes with its own code and would ignore it)")
    if problems:
        raise ArgumentError("; ".join(problems))
    return layout


# Flags whose value must be > 0 (when given) and >= 0: megatron/torch otherwise fail later with an assertion or
# a schedule of zero steps, after the model is built.
_POSITIVE = ("train_iters", "seq_length", "micro_batch_size", "global_batch_size", "lr_decay_iters", "save_interval",
             "exit_interval", "eval_interval", "log_interval")
_NON_NEGATIVE = ("lr", "min_lr", "lr_warmup_iters", "weight_decay", "adam_eps", "clip_grad", "eval_iters",
                 "num_workers", "lora_r", "lora_dropout", "init_method_std", "moe_aux_loss_coeff",
                 "moe_router_bias_update_rate", "mtp_loss_scaling_factor")


def _value_problems(args) -> list[str]:
    """Single flags out of range, each named with its value."""
    problems = []
    for dest in _POSITIVE:
        value = getattr(args, dest, None)
        if value is not None and value <= 0:
            problems.append(f"--{dest.replace('_', '-')} must be > 0, got {value}")
    for dest in _NON_NEGATIVE:
        value = getattr(args, dest, None)
        if value is not None and value < 0:
            problems.append(f"--{dest.replace('_', '-')} must be >= 0, got {value}")
    for dest in ("adam_beta1", "adam_beta2", "lr_warmup_fraction"):
        value = getattr(args, dest, None)
        if value is not None and not 0 <= value < 1:
            problems.append(f"--{dest.replace('_', '-')} must be in [0, 1), got {value}")
    if args.lora_dropout >= 1:
        problems.append(f"--lora-dropout must be below 1, got {args.lora_dropout}")
    return problems


def _is_deepseek4(model_cfg: dict) -> bool:
    from mindspeed_dsv.models.family import DEEPSEEK4, family_of

    try:
        return family_of(model_cfg) == DEEPSEEK4
    except ValueError:
        return False  # an unknown model_type: building the model config names it


def deepseek4_problems(args, layout: ParallelLayout) -> list[str]:
    """Flags and layouts the DeepSeek-V4 trainer does not act on, each refused by name (they would otherwise be
    accepted and change nothing): its attention, hyper-connections and compressors are our own modules (TP 1,
    no megatron selective recompute or fused attention/rotary/SwiGLU inside them) and its MoE routing has no aux
    loss."""
    v4 = "DeepSeek-V4"
    out = []
    if layout.tp > 1 or layout.sequence_parallel:
        out.append(f"{v4} trains with --tensor-model-parallel-size 1 and no --sequence-parallel (its one shared "
                   "K=V head and compressors are not split over TP); use --expert-model-parallel-size and PP")
    if layout.noop_layers:
        out.append(f"{v4} has no noop layers: drop --noop-layers (--num-layer-list gives uneven stages)")
    if layout.moe_grouped_gemm or layout.moe_tp_extend_ep:
        out.append(f"{v4} experts are megatron's SequentialMLP: drop --moe-grouped-gemm / --moe-tp-extend-ep")
    if (args.recompute_granularity not in (None, "full") or args.recompute_modules
            or args.recompute_activation_function or args.recompute_mla_up_proj):
        out.append(f"{v4} recomputes whole layers only (--recompute-granularity full with --recompute-method "
                   "uniform or block): drop selective --recompute-* flags")
    if args.moe_aux_loss_coeff:
        out.append(f"{v4} routes without an auxiliary balance loss (expert-bias balancing): drop "
                   "--moe-aux-loss-coeff")
    if args.moe_token_dispatcher_type != "alltoall":
        out.append(f"{v4} dispatches tokens with megatron's alltoall dispatcher: drop --moe-token-dispatcher-type "
                   f"{args.moe_token_dispatcher_type}")
    for dest in ("use_flash_attn", "use_fused_rotary_pos_emb", "use_fused_swiglu",
                 "use_fused_moe_token_permute_and_unpermute", "reset_position_ids"):
        if getattr(args, dest, False):
            out.append(f"--{dest.replace('_', '-')} does not act on {v4} (its attention with sinks, partial "
                       "rotary and MoE are other modules; positions are always 0..S-1): drop it")
    return out


def entry_argv(entry: str, argv: list[str]) -> list[str]:
    """The trainer's flags for an entry script: posttrain_gpt.py is the trainer with --is-instruction-dataset."""
    if entry == "posttrain_gpt.py" and "--is-instruction-dataset" not in argv:
        return ["--is-instruction-dataset", *argv]
    return list(argv)


def _fb_overlap_problems(layout: ParallelLayout, args) -> list[str]:
    """--moe-fb-overlap overlaps a forward with a backward at our all-to-all dispatcher's transfers, in
    dualpipev's paired slots: without any of these it would not act."""
    out = []
    flag = "--moe-fb-overlap"
    if not layout.dualpipev:
        out.append(f"{flag} needs --schedules-method dualpipev (it overlaps dualpipev's paired forward and backward)")
    spread = layout.ep * (layout.tp if layout.moe_tp_extend_ep else 1)  # ranks the experts are spread over
    if spread < 2:
        out.append(f"{flag} needs experts spread over >= 2 ranks (--expert-model-parallel-size, times "
                   f"--tensor-model-parallel-size with --moe-tp-extend-ep): it hides the expert all-to-all; got "
                   f"{spread}")
    if args.moe_token_dispatcher_type != "alltoall":
        out.append(f"{flag} needs --moe-token-dispatcher-type alltoall (our all-to-all dispatcher hands over between "
                   f"the overlapped micro-batches)")
    return out


def _dualpipev_problems(layout: ParallelLayout, args, dp: int, model_cfg: dict | None) -> list[str]:
    """What --schedules-method dualpipev needs beyond the layout's own checks (layers divisible by 2*pp, no VPP,
    no --num-layer-list: ParallelLayout.validate)."""
    out = []
    flag = "--schedules-method dualpipev"
    if layout.pp < 2:
        out.append(f"{flag} needs --pipeline-model-parallel-size > 1 (got {layout.pp})")
    num_mb = args.global_batch_size // (args.micro_batch_size * dp)
    if num_mb < 2 * layout.pp:
        out.append(f"{flag} needs at least 2 * --pipeline-model-parallel-size = {2 * layout.pp} micro-batches per "
                   f"step; --global-batch-size {args.global_batch_size} / (--micro-batch-size {args.micro_batch_size}"
                   f" * data-parallel size {dp}) = {num_mb}")
    if model_cfg is not None and model_cfg.get("tie_word_embeddings"):
        out.append(f"{flag} needs untied embeddings, but config.json has tie_word_embeddings true (the embedding "
                   "and the output layer sit in different chunks of rank 0)")
    return out


def resolve_model_config_path(args) -> str:
    path = args.model_config or args.load
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def tokenizer_dir(args) -> str:
    """Where the run's tokenizer files are: --tokenizer-name-or-path, else the model config's directory."""
    return args.tokenizer_name_or_path or os.path.dirname(resolve_model_config_path(args))
