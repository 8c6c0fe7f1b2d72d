"""Save and load training checkpoints in the layout ckpt_convert writes (MindSpeed / Megatron legacy format).

One file per (tp, pp, ep) position under iter_XXXXXXX/ (ParallelLayout.rank_files), written by the lowest
rank of that position; the whole iteration directory (with checksums.json: the sha256 of every file) is written under a
temporary name, fsynced and renamed once every rank has finished, and latest_checkpointed_iteration.txt moves
last (mindspeed_dsv.files), so an interrupted save never replaces a good one; its leftovers go at the next save.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models.names import chunk_key
from mindspeed_dsv.files import crash_point, replace_dir, sha256_file, write_json_atomic
from mindspeed_dsv.rankfiles import (CKPT_FILE, TRACKER, checkpoint_contents, clean_stale_temporaries, copy_side_files,
                                     iter_dir_name, load_rank_file, read_iteration, verify_file, write_checksums,
                                     write_tracker)


class CheckpointError(RuntimeError):
    pass


DISTRIB_OPTIM_FILE = "distrib_optim.pt"


def _is_distributed(optimizer) -> bool:
    """True for megatron's DistributedOptimizer, alone or inside its ChainedOptimizer (dense + expert)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(hasattr(o, "get_parameter_state_dp_zero") for o in parts)


def _ranks(layout: ParallelLayout):
    """(tp, pp, ep) of this rank's file (layout.rank_files)."""
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        layout.file_ep_rank(parallel_state.get_expert_model_parallel_rank()),
    )


def _writes_its_file(layout: ParallelLayout) -> bool:
    """True on the lowest global rank holding this rank's (tp, pp, ep) file: that rank writes it. (Expert-data-
    parallel rank 0 is not enough: at expert-TP 1 with TP > 1 the TP ranks of one file position are expert-data-
    parallel replicas of each other, so that rule would leave files unwritten.)"""
    mine = _ranks(layout)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone.index(mine) == dist.get_rank()


def _rng_state():
    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state):
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def model_state(models, lora_only: bool = False) -> list[dict]:
    """Per chunk: the unwrapped module's state dict (megatron names), detached to cpu; LoRA-only if asked."""
    out = []
    for m in models:
        module = m.module if hasattr(m, "module") else m
        sd = {}
        for k, v in module.state_dict().items():
            if k.endswith("_extra_state"):
                continue
            if lora_only and ".lora_" not in k:
                continue
            sd[k] = v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
        out.append(sd)
    return out


def check_save_dir(save: str | None, load: str | None, lora_load: str | None, finetune: bool, overwrite: bool
                   ) -> None:
    """Before training: --save may hold checkpoints only when this run continues them (it was loaded from that
    directory with --load or --lora-load, without --finetune) or with --overwrite. Otherwise a save would replace
    another run's iterations and move its tracker back."""
    if not save or overwrite:
        return
    held = checkpoint_contents(save)
    if not held:
        return
    if not finetune and any(d and os.path.realpath(d) == os.path.realpath(save) for d in (load, lora_load)):
        return
    iters = [h for h in held if h != TRACKER]
    latest = read_iteration(save) if TRACKER in held else "none"
    why = "with --finetune, which restarts at step 0" if finetune and load else "that this run does not load from"
    raise CheckpointError(
        f"--save {save} already holds checkpoints ({len(iters)} iteration(s), latest {latest}) {why}: saving there "
        "would replace them and move its tracker. Choose another --save directory, resume with --load "
        f"{save}, or pass --overwrite")


def _file_digests(rank_dir: str) -> dict[str, str]:
    """sha256 of every file this rank's position wrote (relative to the iteration directory)."""
    out = {}
    for name in sorted(os.listdir(rank_dir)):
        out[f"{os.path.basename(rank_dir)}/{name}"] = sha256_file(os.path.join(rank_dir, name))
    return out


def save_checkpoint(save_dir, iteration, models, optimizer, scheduler, consumed_samples, layout: ParallelLayout,
                    args, model_config: dict, lora_only=False, save_optim=True, save_rng=True, tokenizer_dir=None):
    rank = dist.get_rank()
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        clean_stale_temporaries(save_dir)  # an interrupted save's iter_N.tmp, and this one's if it exists
        os.makedirs(tmp)
    dist.barrier()
    optim_state = optimizer.state_dict() if (save_optim and optimizer is not None) else None
    tp, pp, ep = _ranks(layout)
    writer = _writes_its_file(layout)
    rank_dir = os.path.join(tmp, layout.rank_dir_name(tp, pp, ep))
    os.makedirs(rank_dir, exist_ok=True)
    if optim_state is not None and _is_distributed(optimizer):
        # The distributed optimizer's moments are sharded over data-parallel ranks: megatron gathers them to
        # data-parallel rank 0, which writes distrib_optim.pt next to the model file (collective: all ranks call).
        optimizer.save_parameter_state(os.path.join(rank_dir, DISTRIB_OPTIM_FILE))
    if writer:
        state = {chunk_key(layout, c): sd for c, sd in enumerate(model_state(models, lora_only))}
        state.update(
            checkpoint_version=3.0,
            iteration=iteration,
            args=args,
            num_consumed_samples=consumed_samples,
            lora_only=lora_only,
        )
        if optim_state is not None:
            state["optimizer"] = optim_state
            state["opt_param_scheduler"] = scheduler.state_dict()
        if save_rng:
            state["rng_state"] = _rng_state()
        torch.save(state, os.path.join(rank_dir, CKPT_FILE))
    dist.barrier()
    # Each position's writer hashes its own files (in parallel); rank 0 records them inside the iteration.
    mine = _file_digests(rank_dir) if writer else {}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        write_checksums(tmp, {k: v for d in gathered for k, v in d.items()})
        crash_point("train_save:iteration_written")
        replace_dir(tmp, final)  # fsyncs it; an existing iteration of this number is swapped out atomically
        crash_point("train_save:iteration_in_place")
        layout.save(save_dir)
        write_json_atomic(os.path.join(save_dir, "config.json"), model_config)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            # So mcore2hf can hand transformers a complete model directory.
            copy_side_files(tokenizer_dir, save_dir)
        write_tracker(save_dir, iteration)
        crash_point("train_save:tracker_written")
    dist.barrier()
    return final


def read_checkpoint(load_dir, layout: ParallelLayout, verify: bool = True) -> tuple[str, dict]:
    """This rank's file of the checkpoint in `load_dir`, after checking its recorded layout against ours (and,
    with `verify`, its bytes against the iteration's checksums.json)."""
    recorded = ParallelLayout.load(load_dir)
    layout.check_checkpoint(recorded, where=load_dir)
    iteration = read_iteration(load_dir)
    tp, pp, ep = _ranks(layout)
    path = os.path.join(load_dir, iter_dir_name(iteration), layout.rank_dir_name(tp, pp, ep), CKPT_FILE)
    return path, load_rank_file(path, verify=verify)


def load_weights(path: str, state: dict, models, layout: ParallelLayout, *, adapters: bool) -> None:
    """Copy the file's weights into the model chunks. adapters=False: the base model (LoRA entries in the file
    are left for after the adapters exist); adapters=True: only the LoRA entries."""
    if not adapters and state.get("lora_only"):
        raise CheckpointError(f"{path}: adapter-only checkpoint (lora_only recorded, saved with "
                              "--lora-ckpt-filter): pass the base checkpoint as --load and this one as --lora-load")
    for c, m in enumerate(models):
        key = chunk_key(layout, c)
        module = m.module if hasattr(m, "module") else m
        if key not in state:
            raise CheckpointError(f"{path}: no '{key}' entry (model chunks in file: "
                                  f"{[k for k in state if k.startswith('model')]})")
        sd = {k: v for k, v in state[key].items() if (".lora_" in k) == adapters}
        if adapters and not sd:
            raise CheckpointError(f"{path}: no LoRA adapter weights in '{key}'")
        load_model_state(module, sd, path, only_adapters=adapters)


def has_adapters(state: dict) -> bool:
    return any(".lora_" in k for key in state if key.startswith("model") for k in state[key])


def _load_distributed_optimizer_shards(optimizer, optim_file: str) -> None:
    """megatron-core 0.16.1 copies every key of the inner optimizer's per-parameter state from the file; torch
    AdamW's state also holds 'step', which the file's shards (param, exp_avg, exp_avg_sq) do not (KeyError 'step',
    seen on 2x H200). 'step' is set aside while the shards load: load_state_dict has already restored it — as one
    tensor shared by every parameter's state (without TE / Apex), which torch's Adam / AdamW then advance in place,
    once per parameter (a resumed run's bias correction jumps). Each state gets its own copy back."""
    steps = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param_state in part.optimizer.state.values():
            if "step" in param_state:
                steps.append((param_state, param_state.pop("step")))
    try:
        optimizer.load_parameter_state(optim_file)
    finally:
        for param_state, step in steps:
            param_state["step"] = step.clone() if torch.is_tensor(step) else step


def restore_training_state(path: str, state: dict, optimizer, scheduler, *, load_optim=True, load_rng=True,
                           verify=True) -> tuple[int, int]:
    """Optimizer, scheduler and RNG states of a run; returns (iteration, consumed_samples) to resume from."""
    if state.get("iteration") in (None, "release"):
        return 0, 0
    if load_optim:
        if "optimizer" not in state:
            raise CheckpointError(f"{path}: no optimizer state; resume with --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if _is_distributed(optimizer):
            # the moments and fp32 master weights, sharded over data-parallel ranks (written by save_checkpoint)
            optim_file = os.path.join(os.path.dirname(path), DISTRIB_OPTIM_FILE)
            if not os.path.exists(optim_file):
                raise CheckpointError(f"{optim_file} is missing: the distributed optimizer's state was not saved "
                                      "with this checkpoint; resume with --no-load-optim")
            if verify:
                verify_file(optim_file)
            _load_distributed_optimizer_shards(optimizer, optim_file)
    if "opt_param_scheduler" in state:
        # The learning-rate schedule follows the step count, with or without the optimizer's moments.
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng and "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return int(state["iteration"]), int(state.get("num_consumed_samples", 0))


def load_model_state(module, sd: dict, where: str, only_adapters: bool = False) -> None:
    """Copy tensors by name, naming every missing, unexpected or mis-shaped tensor. With only_adapters the
    model's non-LoRA tensors are not expected in `sd`; otherwise its LoRA tensors are not."""
    own = {k: v for k, v in module.state_dict().items()
           if not k.endswith("_extra_state") and (".lora_" in k) == only_adapters}
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(sd) & set(own)) if torch.is_tensor(sd[k]) and sd[k].shape != own[k].shape]
    if unexpected or missing or bad_shape:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: {missing[:8]}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: {unexpected[:8]}")
        if bad_shape:
            lines.append("shape mismatch: " + "; ".join(bad_shape[:8]))
        raise CheckpointError(f"{where} does not fit this model/layout: " + " | ".join(lines))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
