"""The dualpipev pipeline schedule on megatron-core 0.16.1: its pipeline process group, its forward_step /
backward_step (loss scaling, MTP and MoE auxiliary losses), our op order.

P pipeline ranks hold 2P virtual stages; rank r runs chunk 0 (virtual stage r) and chunk 1 (virtual stage
2P-1-r), so data enters and the loss is taken on rank 0. Activations flow 0 -> P-1 through the chunk-0 stages,
turn around locally on rank P-1 (chunk 0's output is chunk 1's input) and flow back P-1 -> 0 through the chunk-1
stages; gradients flow the other way. The order of forwards and backwards on each rank is
``mindspeed_dsv.pipeline_order.dualpipev_slots``, the list the planner simulates; with --moe-fb-overlap a slot
may pair a forward with a backward that run together (training/fb_overlap.py).

Point-to-point messages are hidden states of one shape. A rank receives from a neighbour in the order that
neighbour sends (known from the neighbour's op list), keeping early arrivals until they are needed; sends are
asynchronous. This matches messages on any backend (gloo and NCCL match by posting order, without tags) and
cannot deadlock where the op order itself does not.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from mindspeed_dsv.pipeline_order import dualpipev_order, dualpipev_slots

from .fb_overlap import run_pair


def _messages(pp: int, rank: int, num_microbatches: int, forward_only: bool) -> dict[int, list[tuple]]:
    """What `rank` sends, to whom, in order: peer rank -> [(kind, chunk, microbatch), ...]; a message is named by
    the op that produces it (F: its output, B: its input gradient)."""
    out: dict[int, list[tuple]] = {}
    for op in dualpipev_order(pp, rank, num_microbatches, forward_only):
        # F0 feeds rank+1, F1 feeds rank-1; B0 returns to rank-1, B1 to rank+1. The turn on the last rank and
        # the loss on rank 0 are local.
        step = {("F", 0): 1, ("F", 1): -1, ("B", 0): -1, ("B", 1): 1}[(op.kind, op.chunk)]
        peer = rank + step
        if 0 <= peer < pp:
            out.setdefault(peer, []).append((op.kind, op.chunk, op.microbatch))
    return out


class _Links:
    """Asynchronous sends; receives in the sender's order, buffering what arrives before it is needed."""

    def __init__(self, group, pp: int, rank: int, num_microbatches: int, forward_only: bool, shape, dtype, device):
        self.group, self.rank = group, rank
        self.ranks = dist.get_process_group_ranks(group)
        self.shape, self.dtype, self.device = shape, dtype, device
        self.expected = {peer: deque(msgs[rank]) for peer in (rank - 1, rank + 1) if 0 <= peer < pp
                         for msgs in [_messages(pp, peer, num_microbatches, forward_only)] if rank in msgs}
        self.arrived: dict[tuple, torch.Tensor] = {}
        self.pending: list = []

    def send(self, peer: int, tensor: torch.Tensor) -> None:
        # each sent buffer is kept until its send completes; completed ones are dropped here, so a step does not
        # hold every micro-batch's gradient
        self.pending = [(work, kept) for work, kept in self.pending if not work.is_completed()]
        buf = tensor.contiguous()
        self.pending.append((dist.isend(buf, self.ranks[peer], group=self.group), buf))

    def recv(self, peer: int, key: tuple) -> torch.Tensor:
        while key not in self.arrived:
            if not self.expected.get(peer):
                raise RuntimeError(f"dualpipev: rank {self.rank} waits for {key} that rank {peer} never sends")
            nxt = self.expected[peer].popleft()
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            dist.irecv(buf, self.ranks[peer], group=self.group).wait()
            self.arrived[nxt] = buf
        return self.arrived.pop(key)

    def finish(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
        if self.arrived:
            raise RuntimeError(f"dualpipev: messages received but never used: {sorted(self.arrived)}")


def forward_backward_dualpipev(*, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
                               micro_batch_size: int, forward_only: bool = False, moe_fb_overlap: bool = False):
    """One global batch through the two chunks of this rank in dualpipev order; like megatron's
    forward_backward_* functions, returns the loss-function outputs of the micro-batches (on rank 0, where the
    loss is taken) and finalizes the gradients when not forward_only. With `moe_fb_overlap` the paired slots of
    `dualpipev_slots` run their forward and backward together (training/fb_overlap.py)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
    from megatron.core.utils import get_model_config, get_model_type

    assert isinstance(model, list) and len(model) == 2, "dualpipev runs two model chunks per rank"
    config = get_model_config(model[0])
    model_type = get_model_type(model[0])
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    seq = seq_length // tp if config.sequence_parallel else seq_length
    device = next(model[0].parameters()).device
    links = _Links(parallel_state.get_pipeline_model_parallel_group(), pp, rank, num_microbatches, forward_only,
                   (seq, micro_batch_size, config.hidden_size), config.pipeline_dtype, device)
    cp_size = parallel_state.get_context_parallel_world_size()
    if moe_fb_overlap:
        _check_overlap_dispatchers(model)

    losses: list = []
    inputs: dict[tuple, torch.Tensor | None] = {}  # (chunk, mb) -> stage input (None on rank 0 chunk 0)
    outputs: dict[tuple, torch.Tensor] = {}  # (chunk, mb) -> stage output (the loss on rank 0 chunk 1)
    turn: dict[int, torch.Tensor] = {}  # last rank: chunk-0 output = chunk-1 input (the V's turn, no message)
    turned: dict[int, torch.Tensor] = {}  # last rank: chunk-1 input gradient = chunk-0 output gradient

    def forward_input(chunk: int, mb: int):
        if chunk == 0:
            x = None if rank == 0 else links.recv(rank - 1, ("F", 0, mb))
        elif rank == pp - 1:
            x = turn.pop(mb).detach()
        else:
            x = links.recv(rank + 1, ("F", 1, mb))
        if x is not None:
            x.requires_grad_(not forward_only)
        return x

    def forward_run(chunk: int, mb: int, x):
        is_loss = chunk == 1 and rank == 0
        y, _ = forward_step(forward_step_func, data_iterator[chunk], model[chunk], num_microbatches, x, losses,
                            config, cp_size, is_first_microbatch=(mb == 0), current_microbatch=mb,
                            vp_stage=chunk, is_last_stage=is_loss)
        if not forward_only:
            inputs[(chunk, mb)], outputs[(chunk, mb)] = x, y
        return y

    def forward_output(chunk: int, mb: int, y) -> None:
        if chunk == 1 and rank == 0:
            return  # the loss
        if chunk == 0 and rank == pp - 1:
            turn[mb] = y
        elif chunk == 0:
            links.send(rank + 1, y)
        else:
            links.send(rank - 1, y)

    def backward_input(chunk: int, mb: int):
        if chunk == 1:
            return None if rank == 0 else links.recv(rank - 1, ("B", 1, mb))
        if rank == pp - 1:
            return turned.pop(mb)
        return links.recv(rank + 1, ("B", 0, mb))

    def backward_run(chunk: int, mb: int, dy):
        return backward_step(inputs.pop((chunk, mb)), outputs.pop((chunk, mb)), dy, model_type, config)

    def backward_output(chunk: int, mb: int, dx) -> None:
        if chunk == 1 and rank == pp - 1:
            turned[mb] = dx
        elif chunk == 1:
            links.send(rank + 1, dx)
        elif rank > 0:
            links.send(rank - 1, dx)

    steps = {"F": (forward_input, forward_run, forward_output), "B": (backward_input, backward_run, backward_output)}

    def run_slot(slot) -> None:
        # A pair receives both inputs first and sends both outputs after, in op order: each peer gets its
        # messages in the order it expects (DualPipe's F&B does the same).
        got = [steps[op.kind][0](op.chunk, op.microbatch) for op in slot]
        if len(slot) == 1:
            out = [steps[slot[0].kind][1](slot[0].chunk, slot[0].microbatch, got[0])]
        else:
            (f, b), out = slot, [None, None]

            def run(i, op):
                out[i] = steps[op.kind][1](op.chunk, op.microbatch, got[i])

            run_pair(lambda: run(0, f), lambda: run(1, b))
        for op, o in zip(slot, out):
            steps[op.kind][2](op.chunk, op.microbatch, o)

    no_sync = config.no_sync_func
    contexts = [f() for f in no_sync] if isinstance(no_sync, list) else [no_sync()] if no_sync else []
    for c in contexts:
        c.__enter__()
    try:
        for slot in dualpipev_slots(pp, rank, num_microbatches, forward_only, overlap=moe_fb_overlap):
            run_slot(slot)
        links.finish()
    finally:
        for c in reversed(contexts):
            c.__exit__(None, None, None)
    if not forward_only:
        finalize_dualpipev_grads(model)
    return losses


def _check_overlap_dispatchers(model: list) -> None:
    """--moe-fb-overlap hands over at our all-to-all dispatcher's transfers; any other dispatcher would never
    hand over (the flag would not act)."""
    from mindspeed_dsv.models.moe_layer import AllToAllTokenDispatcher

    for chunk in model:
        for m in chunk.modules():
            d = getattr(m, "token_dispatcher", None)
            if d is not None and not isinstance(d, AllToAllTokenDispatcher):
                raise ValueError(f"--moe-fb-overlap needs our all-to-all token dispatcher (expert parallel > 1, "
                                 f"--moe-token-dispatcher-type alltoall, dropless); this model uses "
                                 f"{type(d).__name__}")


def _embedding_weight(chunk):
    """The word embedding of a model chunk: GPTModel's sits in embedding.word_embeddings, DeepSeekV4Model's
    embedding is the VocabParallelEmbedding itself."""
    return getattr(chunk.embedding, "word_embeddings", chunk.embedding).weight


def finalize_dualpipev_grads(model: list) -> None:
    """megatron's finalize_model_grads (data-parallel and sequence-parallel reductions, router bias update; the
    trainer made the embedding group rank 0 alone, see init_distributed), then the MTP chunk's embedding copy
    and the embedding share one gradient: their sum, as when both live in one module."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_attr_wrapped_model

    inner = [get_attr_wrapped_model(m, "pre_process", return_model_obj=True) for m in model]
    finalize_model_grads(model)
    if inner[0].pre_process and inner[1].mtp_process:
        a, b = _embedding_weight(inner[0]).main_grad, _embedding_weight(inner[1]).main_grad
        a.add_(b)
        b.copy_(a)
