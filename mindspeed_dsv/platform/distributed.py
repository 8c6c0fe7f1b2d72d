"""Process groups: torch.distributed with the platform's backend, then megatron's parallel_state."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from .device import current_platform
from .megatron_compat import apply_megatron_compat


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    etp: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    embedding_on_first_stage_only: bool = False,
) -> None:
    """Initialise torch.distributed (from torchrun's env vars) and megatron's model-parallel groups.

    `vpp` is the number of virtual pipeline chunks per stage (megatron's meaning), not MindSpeed's
    layers-per-virtual-stage; the layout object converts between them. `embedding_on_first_stage_only`
    (dualpipev): the embedding and everything that shares it live on the first pipeline rank, so megatron's
    embedding group (by default first and last rank, whose gradients it sums) holds that rank alone.
    """
    from megatron.core import parallel_state, tensor_parallel

    platform = current_platform()
    apply_megatron_compat(platform)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        platform.set_device(local_rank)
        dist.init_process_group(
            backend=platform.backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        get_embedding_ranks=(lambda pp_ranks, *_: pp_ranks[:1]) if embedding_on_first_stage_only else None,
    )
    platform.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
