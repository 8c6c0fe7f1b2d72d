"""The training loop on Megatron-Core: model chunks, DDP, optimizer, scheduler, schedules, logging, checkpoints."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from mindspeed_dsv.rankfiles import McoreCheckpointError
from mindspeed_dsv.layout import LayoutError, ParallelLayout
from mindspeed_dsv.models import DeepSeekConfig, build_model_chunks, model_transformer_config
from mindspeed_dsv.models.family import DEEPSEEK4, family_of, model_config
from mindspeed_dsv.platform import current_platform, init_distributed
from mindspeed_dsv.platform.megatron_compat import GRAD_ACCUM_FUSION_DEVICES

from . import checkpointing, records
from .arguments import ArgumentError, build_parser, report_error, tokenizer_dir
from .flops import device_peak_tflops, train_flops_per_token
from .inputs import check_inputs, read_model_config
from .metrics import MetricsLogger


@dataclass
class TrainState:
    args: object
    layout: ParallelLayout
    cfg: DeepSeekConfig
    hf_config: dict
    models: list
    optimizer: object
    scheduler: object
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # per logged step: dict of metrics (tests read it)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of a step is NaN/inf (--check-for-nan-in-loss-and-grad)."""


def check_finite(iteration: int, metrics: dict) -> None:
    """Stop a run that has diverged (or loaded corrupt weights) instead of training on, and saving, NaN.
    Both values are global (all-reduced), so every rank raises at the same iteration."""
    bad = {k: metrics.get(k) for k in ("lm loss", "grad norm")
           if metrics.get(k) is not None and not math.isfinite(metrics[k])}
    if bad:
        values = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteError(
            f"iteration {iteration}: {values}; stopping without saving (diverged, or a corrupt checkpoint/data). "
            "Lower --lr or check the inputs; --no-check-for-nan-in-loss-and-grad trains on regardless")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _recompute_options(args) -> dict:
    modules = list(args.recompute_modules or [])
    if args.recompute_activation_function:
        modules.append("moe_act")
    if args.recompute_mla_up_proj:
        modules.append("mla_up_proj")
    granularity = args.recompute_granularity or ("selective" if modules else None)
    opts = dict(
        recompute_granularity=granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    if granularity == "selective":
        opts["recompute_modules"] = modules or ["core_attn"]
    return opts


def check_run(args, own_batches: bool = False) -> tuple[dict, ParallelLayout]:
    """The checks that need no process group: flags, config.json, the platform, the tokenizer and the datasets
    (named when missing, truncated or of the other kind). Returns (config.json, layout). `own_batches`: the caller
    feeds its own micro-batches (benchmarks), so no tokenizer or dataset is opened and none is checked."""
    platform = current_platform()
    hf_config = read_model_config(args)
    # flags + the checkpoint's layout record + the dataset summary; the dry run calls the same function
    layout, notes = records.resolve(args, _world_size(), hf_config)
    if notes and int(os.environ.get("RANK", "0")) == 0:
        print("layout flags taken from the checkpoint: " + ", ".join(notes), flush=True)
    checkpointing.check_save_dir(args.save, args.load, args.lora_load, args.finetune, args.overwrite)
    # On npu a shim lets megatron's constructors read torch.npu type names as torch.cuda ones (platform/).
    if args.use_distributed_optimizer and platform.device_type == "cpu":
        raise ArgumentError(
            "--use-distributed-optimizer needs cuda or npu: megatron-core 0.16.1's distributed optimizer "
            "accepts only torch.cuda parameter types"
        )
    if args.bf16 and platform.device_type == "cpu":
        raise ArgumentError("--bf16 needs cuda or npu: megatron-core 0.16.1's mixed-precision optimizer "
                            "accepts only torch.cuda parameter types; train fp32 on cpu")
    if not own_batches:
        check_inputs(args)
    return hf_config, layout


def setup(args, own_batches: bool = False) -> TrainState:
    """Everything up to the first step. Flags are validated before any process group or weight exists.
    `own_batches`: see check_run (train_step is then driven with the caller's batches, not build_data_iterators)."""
    platform = current_platform()
    hf_config, layout = check_run(args, own_batches)
    family = family_of(hf_config)
    cfg = model_config(hf_config)
    from mindspeed_dsv.ops import OpsConfig, configure_ops, describe

    ops = configure_ops(OpsConfig.from_args(args), platform)  # raises, naming the flag, before any weight exists
    chunks = layout.num_model_chunks
    qlora = bool(args.lora_r and args.qlora_nf4)
    ep, etp = layout.megatron_expert_sizes()  # --moe-tp-extend-ep is megatron's expert-TP 1 over TP*EP ranks
    init_distributed(tp=layout.tp, pp=layout.pp, ep=ep, etp=etp, vpp=chunks if chunks > 1 else None, seed=args.seed,
                     embedding_on_first_stage_only=layout.dualpipev)

    params_dtype = torch.bfloat16 if args.bf16 else torch.float32
    if family == DEEPSEEK4:
        tconfig, models = _build_deepseek4(cfg, layout, args, params_dtype, platform, qlora)
    else:
        tconfig, models = _build_deepseek3(cfg, layout, args, params_dtype, platform, qlora)
    device = platform.device()
    if not qlora:
        for m in models:
            m.to(device)
    # Weights first, then adapters: QLoRA quantizes the loaded base, and LoRA's frozen base must be the
    # checkpoint's. The optimizer is built afterwards, so its fp32 master copies start from the loaded weights.
    resume = None  # (path, file state) whose optimizer/scheduler/iteration the run continues from
    if args.load:
        path, loaded = checkpointing.read_checkpoint(args.load, layout, verify=not args.no_verify_checksums)
        checkpointing.load_weights(path, loaded, models, layout, adapters=False)
        resume = (path, loaded)
    if args.lora_r:
        models = [_apply_lora(m, args, device) for m in models]
        if resume is not None and checkpointing.has_adapters(resume[1]):
            checkpointing.load_weights(*resume, models, layout, adapters=True)
        if args.lora_load:
            path, adapters = checkpointing.read_checkpoint(args.lora_load, layout, verify=not args.no_verify_checksums)
            checkpointing.load_weights(path, adapters, models, layout, adapters=True)
            resume = (path, adapters)
    if qlora:  # the NF4 storage is on the device already; the adapters and untargeted weights follow
        for m in models:
            m.to(device)

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    models = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=m,
                                disable_bucketing=(i > 0))
        for i, m in enumerate(models)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, models)
    decay_iters = args.lr_decay_iters or args.train_iters
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay_iters)
    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = [m.no_sync for m in models] if len(models) > 1 else models[0].no_sync

    state = TrainState(args, layout, cfg, hf_config, models, optimizer, scheduler)
    if dist.get_rank() == 0:
        print(f"layout: {layout.to_dict()}", flush=True)
        print(f"kernels: {describe(OpsConfig.from_args(args), ops.impls)}", flush=True)
    if resume is not None and not args.finetune:
        state.iteration, state.consumed_samples = checkpointing.restore_training_state(
            *resume, optimizer, scheduler, load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
            verify=not args.no_verify_checksums)
    return state


def _build_deepseek3(cfg, layout, args, params_dtype, platform, qlora: bool):
    """megatron's TransformerConfig and the GPTModel chunks of this pipeline rank (on the host)."""
    tconfig = model_transformer_config(
        cfg,
        layout,
        params_dtype=params_dtype,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        # LoRA keeps the whole base frozen, the routing bias included: adapters merge onto the base as it was.
        moe_router_bias_update_rate=0.0 if args.lora_r else args.moe_router_bias_update_rate,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        mtp_loss_scaling_factor=args.mtp_loss_scaling_factor,
        init_method_std=args.init_method_std,
        # megatron's linears accumulate their weight gradient into DDP's main_grad inside the GEMM (the kernel
        # comes from a shim in platform/megatron_compat.py)
        gradient_accumulation_fusion=(not args.no_gradient_accumulation_fusion
                                      and platform.device_type in GRAD_ACCUM_FUSION_DEVICES),
        # QLoRA builds and loads on the host: apply_qlora then quantizes one layer's weight at a time onto the
        # device, so the bf16 shard never exists there whole (see below).
        use_cpu_initialization=True if qlora else None,
        # ... where random init of weights that --load overwrites (strictly) would only cost host time.
        **({"perform_initialization": False} if qlora and args.load else {}),
        **_recompute_options(args),
    )
    return tconfig, build_model_chunks(cfg, layout, tconfig)


def _build_deepseek4(cfg, layout, args, params_dtype, platform, qlora: bool):
    """The V4 TransformerConfig (its MoE blocks and the schedules read it) and the DeepSeekV4Model chunks of this
    pipeline rank. arguments.deepseek4_problems has refused what V4 does not act on; the CSA indexers are frozen
    (stages.freeze_indexer says why)."""
    from mindspeed_dsv.models.deepseek4.config import transformer_config as v4_transformer_config
    from mindspeed_dsv.models.deepseek4.stages import build_stage_chunks, freeze_indexer, tie_embedding_copies

    chunks = layout.num_model_chunks
    tconfig = v4_transformer_config(
        cfg, pp=layout.pp, ep=layout.ep, params_dtype=params_dtype,
        moe_router_bias_update_rate=0.0 if args.lora_r else args.moe_router_bias_update_rate,
        init_method_std=args.init_method_std,
        # the MTP layers sit on the output stage (stages.build_stage reads the layout's count, which must match)
        mtp_num_layers=layout.mtp_num_layers or 0,
        mtp_loss_scaling_factor=args.mtp_loss_scaling_factor,
        use_cpu_initialization=True if qlora else None,  # as for V3: QLoRA quantizes from the host
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        gradient_accumulation_fusion=(not args.no_gradient_accumulation_fusion
                                      and platform.device_type in GRAD_ACCUM_FUSION_DEVICES),
        # whole-layer recompute only (arguments.deepseek4_problems refuses the selective kinds)
        **_recompute_options(args),
        **({"perform_initialization": False} if qlora and args.load else {}),
    )
    models = build_stage_chunks(cfg, layout, tconfig)
    tie_embedding_copies(models, layout)
    for m in models:
        freeze_indexer(m)
    return tconfig, models


def _apply_lora(model, args, device):
    from mindspeed_dsv.peft.lora import LoraConfig, apply_lora

    cfg = LoraConfig(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     lora_target_modules=tuple(args.lora_target_modules), init_seed=args.seed)
    if args.qlora_nf4:
        from mindspeed_dsv.peft.qlora import apply_qlora

        return apply_qlora(model, cfg, device=device)
    return apply_lora(model, cfg)


def _to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _loss_func(loss_mask, output_tensor):
    """Mean token loss over the micro-batch's unmasked tokens (SFT prompts and padding are masked)."""
    losses = output_tensor.float()
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    loss = (losses * mask).sum() / count
    return loss, {"lm loss": torch.stack([loss.detach(), torch.ones_like(count)])}


def _forward_step(device, data_iterator, model):
    batch = _to_device(next(data_iterator), device)
    # packed_seq_params only where the batch has them: DeepSeek-V4's forward takes none (and refuses packing)
    packed = {"packed_seq_params": batch["packed_seq_params"]} if batch.get("packed_seq_params") is not None else {}
    output = model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        **packed,
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_lm_loss(losses_reduced) -> float | None:
    """Average 'lm loss' over micro-batches here, then over the ranks that computed a loss (last stage): the sum
    of micro-batch losses over the sum of their counts, so ranks without a loss (earlier stages) add nothing.

    float32, not float64: HCCL on Atlas A2/A3 has no float64 all-reduce. A float32 sum of a few thousand
    micro-batch means of size ~10 loses nothing visible in a logged loss."""
    platform = current_platform()
    total = torch.zeros(2, dtype=torch.float32, device=platform.device())
    for item in losses_reduced:
        total += item["lm loss"].to(total)
    dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _aux_metrics(num_microbatches: int) -> dict:
    """MTP and MoE balance losses megatron tracked during the step, averaged over micro-batches.

    Each rank holds the values of its own layers (MTP only on the last stage), so the combination is:
    mean over the data/tensor-parallel copies within a pipeline stage, then sum over stages. The exchange
    is one all_gather_object that every rank joins, whatever it tracked.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    local = {}
    mtp = MTPLossLoggingHelper.tracker
    if "values" in mtp:
        local["mtp loss"] = float(mtp["values"].sum()) / num_microbatches
        MTPLossLoggingHelper.clean_loss_in_tracker()
    for name, entry in get_moe_layer_wise_logging_tracker().items():
        if "values" in entry:
            local[name.replace("_", " ")] = float(entry["values"].sum()) / num_microbatches
    clear_aux_losses_tracker()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (parallel_state.get_pipeline_model_parallel_rank(), local))
    per_stage: dict[str, dict[int, list[float]]] = {}
    for stage, values in gathered:
        for name, value in values.items():
            per_stage.setdefault(name, {}).setdefault(stage, []).append(value)
    return {name: sum(sum(v) / len(v) for v in stages.values()) for name, stages in per_stage.items()}


def _stage_seq_length(state: TrainState) -> int:
    """The seq_length the schedules size their stage messages by ([seq, micro-batch, hidden]): DeepSeek-V4's
    stages exchange hc_mult streams per token as [S * hc_mult, B, D] (models/deepseek4/model.py)."""
    if family_of(state.hf_config) == DEEPSEEK4:
        from mindspeed_dsv.models.deepseek4 import stage_tensor_shape

        return stage_tensor_shape(state.cfg, state.args.seq_length, state.args.micro_batch_size)[0]
    return state.args.seq_length


def _run_schedule(state: TrainState, iterators, num_microbatches: int, forward_only: bool):
    """One global batch through the pipeline schedule (megatron's 1F1B, interleaved or none; our dualpipev);
    the losses of the micro-batches the loss stage computed."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .dualpipev import forward_backward_dualpipev

    chunks = len(state.models) > 1  # the interleaved schedule takes one model and iterator per chunk
    if state.layout.dualpipev:
        schedule = partial(forward_backward_dualpipev, moe_fb_overlap=state.args.moe_fb_overlap)
    else:
        schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=partial(_forward_step, current_platform().device()),
        data_iterator=iterators if chunks else iterators[0],
        model=state.models if chunks else state.models[0],
        num_microbatches=num_microbatches,
        seq_length=_stage_seq_length(state),
        micro_batch_size=state.args.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(state: TrainState, train_iters, num_microbatches: int):
    args = state.args
    for m in state.models:
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = _run_schedule(state, train_iters, num_microbatches, forward_only=False)
    ok, grad_norm, _ = state.optimizer.step()
    if ok:
        state.scheduler.step(increment=args.global_batch_size)
    metrics = {"lm loss": _reduce_lm_loss(losses), "grad norm": grad_norm}
    metrics.update(_aux_metrics(num_microbatches))
    return metrics, ok


@torch.no_grad()
def evaluate(state: TrainState, valid_iters, num_microbatches: int) -> float | None:
    for m in state.models:
        m.eval()
    total = [_reduce_lm_loss(_run_schedule(state, valid_iters, num_microbatches, forward_only=True))
             for _ in range(state.args.eval_iters)]
    for m in state.models:
        m.train()
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
    vals = [v for v in total if v is not None]
    return sum(vals) / len(vals) if vals else None


def train(args) -> TrainState:
    from .data import build_data_iterators

    state = setup(args)
    platform = current_platform()
    layout = state.layout
    dp = _world_size() // (layout.tp * layout.pp)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    train_iters, valid_iters, real_tokens = build_data_iterators(args, layout, state.consumed_samples, state.cfg)
    peak = args.peak_tflops
    if peak is None and platform.is_accelerator:
        peak = device_peak_tflops(platform.device_name())
    # no FLOPs formula for DeepSeek-V4 yet (training/flops.py): TFLOP/s and MFU are logged as n/a
    flops_per_token = train_flops_per_token(state.cfg, args.seq_length, layout.mtp_num_layers or 0)  # V3 or V4
    logger = MetricsLogger(args, flops_per_token, peak, world_size=_world_size())

    for m in state.models:
        m.train()
    save_every = args.save_interval
    while state.iteration < args.train_iters:
        platform.synchronize()
        start = time.perf_counter()
        metrics, ok = train_step(state, train_iters, num_microbatches)
        platform.synchronize()
        elapsed = time.perf_counter() - start
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        metrics["lr"] = state.optimizer.param_groups[0]["lr"]
        metrics["skipped"] = not ok
        # tokens/s and MFU count the tokens of the samples, not the padding that fills their rows
        record = logger.step(state.iteration, metrics, elapsed, real_tokens.take())
        state.history.append(record)
        if args.check_for_nan_in_loss_and_grad:
            check_finite(state.iteration, metrics)
        if args.eval_interval and state.iteration % args.eval_interval == 0 and valid_iters is not None:
            val = evaluate(state, valid_iters, num_microbatches)
            logger.validation(state.iteration, val)
            record["valid loss"] = val
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            break
        if args.save and save_every and state.iteration % save_every == 0 and state.iteration < args.train_iters:
            _save(state)
    if args.save:
        _save(state)
    logger.close()
    return state


def _save(state: TrainState):
    args = state.args
    checkpointing.save_checkpoint(
        args.save, state.iteration, state.models, state.optimizer, state.scheduler, state.consumed_samples,
        state.layout, args, state.hf_config, lora_only=args.lora_ckpt_filter,
        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
        tokenizer_dir=tokenizer_dir(args),
    )
    if dist.get_rank() == 0:
        print(f"saved checkpoint at iteration {state.iteration} to {args.save}", flush=True)


def main(argv=None, prog: str = "mindspeed_dsv.train", check_only: bool = False) -> int:
    """Exit 0, or 2 for a flag/input error and 1 for a checkpoint error: one line `prog: error: ...` (first rank
    only for flag and input errors, which every rank hits alike), no usage block, no traceback. check_only: run
    `check_run` and stop (the example scripts do this before torchrun; see mindspeed_dsv.training.preflight)."""
    parser = build_parser(prog=prog)
    args = parser.parse_args(argv)
    from mindspeed_dsv.data.checks import InputError
    from mindspeed_dsv.ops import OpUnavailableError

    try:
        if check_only:
            check_run(args)
        else:
            train(args)
    except (ArgumentError, OpUnavailableError, LayoutError, InputError) as err:
        report_error(parser.prog, str(err))
        return 2
    except (checkpointing.CheckpointError, McoreCheckpointError, NonFiniteError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        from mindspeed_dsv.platform import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
