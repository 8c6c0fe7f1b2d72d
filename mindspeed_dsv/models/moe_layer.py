"""megatron's MoELayer with host-sync-free token dispatchers of ours (grouped experts, dropless).

Without Transformer Engine, megatron-core 0.16.1's alltoall dispatcher permutes tokens with `masked_select`
(a device-to-host sync for the output size, twice: tokens and probs), copies the per-expert counts to the
host and waits for them (another sync), and splits the received rows into one chunk per expert and
concatenates them again. Each sync drains the accelerator's queue once per MoE layer per micro-batch.

Our dispatchers do the same job with `ops.permute` (a stable sort by expert id: the row order megatron's permute
produces) and `ops.unpermute` (each token's probability-weighted sum of its experts' outputs, summed in fp32;
megatron sums them in the activation dtype with scatter_add), so the ops flags (--use-fused-moe-token-permute-
and-unpermute) reach every layout. The routing probabilities are applied at that sum, as transformers'
DeepSeek-V3 does, so the experts get no probabilities: `GroupedMLPExperts` takes None for "already weighted", and
megatron's `SequentialMLP` (per-expert MLPs, what LoRA wraps) gets weights of 1 (x * 1 is exact in any dtype).

- `LocalTokenDispatcher`: every expert on this rank (expert-parallel and expert-tensor-parallel size 1): no
  communication, the counts stay on the device for the grouped GEMM.
- `AllToAllTokenDispatcher`: experts spread over ranks (EP and/or expert TP): megatron-core's all-to-all over
  its expert group, one each way (`comm_points.all_to_all`: where --moe-fb-overlap hands over between the
  overlapped forward and backward); one host sync for the split sizes the all-to-all needs.

With capacity factors or the allgather dispatcher the layer keeps megatron's dispatcher unchanged; the trainer refuses
--use-fused-moe-token-permute-and-unpermute there (it would not act).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from mindspeed_dsv.ops import count_tokens_per_expert, get_ops, routed_experts, sort_keys

from .comm_points import all_to_all


def _ours_apply(config, experts) -> bool:
    """The MoE settings both our dispatchers implement: alltoall type, dropless, no padding, no shared-expert
    overlap, probabilities applied after the experts, and experts we can hand weights that are already applied
    (`_experts_scale_by_probs`)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from .experts import GroupedMLPExperts

    return (
        config.moe_token_dispatcher_type == "alltoall"
        and config.moe_expert_capacity_factor is None
        and not config.moe_pad_expert_input_to_capacity
        and not config.moe_router_padding_for_quantization
        and not config.moe_shared_expert_overlap
        and not config.moe_apply_probs_on_input
        and isinstance(experts, (GroupedMLPExperts, SequentialMLP))
    )


def _experts_scale_by_probs(experts) -> bool:
    """The routing weights are applied at unpermute, so the experts must not apply them again: GroupedMLPExperts
    takes None (it skips the multiply); SequentialMLP's MLPs always scale by what they get, so they get ones."""
    from .experts import GroupedMLPExperts

    return not isinstance(experts, GroupedMLPExperts)


def _probs_for_experts(scale_by_probs: bool, rows: torch.Tensor):
    return torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device) if scale_by_probs else None


class LocalTokenDispatcher(MoETokenDispatcher):
    """Dispatcher for a rank that holds all experts: permute -> (no communication) -> unpermute."""

    def __init__(self, config, pg_collection, experts, ops=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.experts_scale_by_probs = _experts_scale_by_probs(experts)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError(
                f"LocalTokenDispatcher needs expert-parallel and expert-tensor-parallel size 1, got "
                f"ep={self.ep_size}, expert tp={self.tp_size}"
            )
        self.topk = config.moe_router_topk
        self.ops = ops or get_ops()

    @staticmethod
    def applies(config, pg_collection, experts) -> bool:
        """True where this dispatcher is exact and useful (see the module docstring)."""
        local = pg_collection.ep.size() == 1 and pg_collection.expt_tp.size() == 1
        return local and _ours_apply(config, experts)

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, hidden_states.shape[-1])
        # Each token's k experts (in increasing id): a dropless routing map has exactly k set per row. (A row with
        # fewer would add experts of probability 0; the counts below follow `indices`, so the rows stay consistent.)
        indices = routed_experts(routing_map, self.topk)
        self.token_probs = probs.gather(1, indices)  # [tokens, k], differentiable towards the router
        self.tokens_per_expert = count_tokens_per_expert(indices, routing_map.shape[1])  # on the device
        permuted, self.sorted_indices = self.ops.permute(tokens, sort_keys(indices, routing_map.shape[1]))
        return permuted, None

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states, probs):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, _probs_for_experts(self.experts_scale_by_probs, hidden_states)

    def combine_preprocess(self, hidden_states):
        return hidden_states

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        out = self.ops.unpermute(hidden_states, self.sorted_indices, self.token_probs)
        self.sorted_indices = self.token_probs = None
        return out.view(self.hidden_shape)


class AllToAllTokenDispatcher(MoETokenDispatcher):
    """Dispatcher for experts spread over ranks (expert parallel and/or expert tensor parallel), dropless.

    One all-to-all each way over megatron's expert group `tp_ep` (EP × expert-TP ranks): every (token, expert) row
    goes straight to each of the expert-TP ranks that hold a slice of that expert's weights, and their partial
    outputs come back and are summed with the routing probabilities in one `ops.unpermute` (fp32). The rows are
    laid out for the all-to-all by `ops.permute` over "expert slots" (expert, expert-TP rank): a stable sort by
    slot = (EP rank, expert-TP rank, local expert), which is the order of destination ranks in `tp_ep`. After the
    all-to-all a second `ops.permute` sorts the received rows by local expert for the grouped GEMM.

    megatron's alltoall dispatcher computes the same outputs with an all-to-all over EP, then an uneven all-gather
    over expert TP (which gloo cannot do) and a reduce-scatter back (in fp32); the bytes moved are the same
    (each row reaches etp ranks either way). Here the probabilities never travel, the per-expert counts for the
    grouped GEMM stay on the device, and the only host sync is one copy of the split sizes the all-to-all needs
    (megatron's without TE also syncs in `masked_select` twice and splits/concatenates the rows once per expert).
    With bf16 the expert-TP partial outputs travel in bf16 and are summed in fp32 at the token's rank (megatron
    sums them in fp32 before its all-to-all).
    """

    def __init__(self, num_local_experts: int, local_expert_indices, config, pg_collection, experts, ops=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.experts_scale_by_probs = _experts_scale_by_probs(experts)
        self.topk = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        first = local_expert_indices[0]
        if list(local_expert_indices) != list(range(first, first + num_local_experts)):
            raise ValueError(f"AllToAllTokenDispatcher needs contiguous local experts, got {list(local_expert_indices)}")
        if self.num_experts != num_local_experts * self.ep_size:
            raise ValueError(
                f"AllToAllTokenDispatcher: {self.num_experts} experts do not split into {num_local_experts} per rank "
                f"over expert-parallel size {self.ep_size}"
            )
        # The slot order below assumes tp_ep ranks are numbered ep-major (megatron's dispatcher reads its gathered
        # counts the same way); check it rather than trust it.
        ep_rank = pg_collection.ep.rank()
        if self.tp_ep_group.size() != self.ep_size * self.tp_size or self.tp_ep_group.rank() != ep_rank * self.tp_size + self.tp_rank:
            raise ValueError(
                f"AllToAllTokenDispatcher: expert group rank {self.tp_ep_group.rank()} of {self.tp_ep_group.size()} is "
                f"not ep rank {ep_rank} * expert-TP size {self.tp_size} + expert-TP rank {self.tp_rank}"
            )
        self.slot = self.tp_ep_group.rank()  # this rank's destination index in the all-to-all
        self.ops = ops or get_ops()

    @staticmethod
    def applies(config, pg_collection, experts) -> bool:
        """True where experts are spread over ranks and the MoE settings are ours (`_ours_apply`)."""
        spread = pg_collection.ep.size() > 1 or pg_collection.expt_tp.size() > 1
        return spread and _ours_apply(config, experts)

    def _slots(self, indices: torch.Tensor) -> torch.Tensor:
        """[T, k] global expert ids -> [T, k * etp] slot ids (ep rank, expert-TP rank, local expert), flattened."""
        local, tp = self.num_local_experts, self.tp_size
        ep_rank, local_id = indices // local, indices % local
        copies = torch.arange(tp, device=indices.device)
        slots = (ep_rank.unsqueeze(-1) * tp + copies) * local + local_id.unsqueeze(-1)  # [T, k, tp]
        return slots.reshape(indices.shape[0], -1)

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, hidden_states.shape[-1])
        indices = routed_experts(routing_map, self.topk)
        slots = self._slots(indices)
        # Every expert-TP copy of a row carries the row's probability: their partial outputs add up in unpermute.
        self.token_probs = probs.gather(1, indices).repeat_interleave(self.tp_size, dim=1)
        groups, local = self.tp_ep_group.size(), self.num_local_experts
        counts = count_tokens_per_expert(slots, groups * local)  # rows per slot, on the device
        # [groups, groups * local]: every rank's counts; the column block of this rank's slots is what it receives.
        everyone = gather_from_sequence_parallel_region(counts, group=self.tp_ep_group).view(groups, groups * local)
        received = everyone[:, self.slot * local : (self.slot + 1) * local]  # [source rank, local expert]
        splits = torch.cat([counts.view(groups, local).sum(dim=1), received.sum(dim=1)])
        host = splits.tolist()  # the one host sync: the all-to-all's split sizes
        self.input_splits, self.output_splits = host[:groups], host[groups:]
        self.received = received
        self.tokens_per_expert = received.sum(dim=0)  # [local experts], on the device
        permuted, self.sorted_indices = self.ops.permute(tokens, sort_keys(slots, groups * local))
        return permuted, None

    def token_dispatch(self, hidden_states, probs):
        return all_to_all(self.tp_ep_group, hidden_states, self.output_splits, self.input_splits, "dispatch"), probs

    def dispatch_postprocess(self, hidden_states, probs):
        self.local_sorted_indices = None
        if self.num_local_experts > 1:
            # Received rows come as [source rank][local expert]; the grouped GEMM wants them by local expert: each
            # row's local expert id, then the same stable sort as the first permute (no host sync: the total is known).
            chunk_expert = torch.arange(self.received.numel(), device=hidden_states.device) % self.num_local_experts
            row_expert = torch.repeat_interleave(
                chunk_expert, self.received.reshape(-1), output_size=hidden_states.shape[0]
            )
            hidden_states, self.local_sorted_indices = self.ops.permute(
                hidden_states, sort_keys(row_expert.unsqueeze(1), self.num_local_experts)
            )
        tokens_per_expert, self.tokens_per_expert, self.received = self.tokens_per_expert, None, None
        return hidden_states, tokens_per_expert, _probs_for_experts(self.experts_scale_by_probs, hidden_states)

    def combine_preprocess(self, hidden_states):
        if self.local_sorted_indices is not None:
            ones = torch.ones(hidden_states.shape[0], 1, dtype=hidden_states.dtype, device=hidden_states.device)
            hidden_states = self.ops.unpermute(hidden_states, self.local_sorted_indices, ones)
            self.local_sorted_indices = None
        return hidden_states

    def token_combine(self, hidden_states):
        return all_to_all(self.tp_ep_group, hidden_states, self.input_splits, self.output_splits, "combine")

    def combine_postprocess(self, hidden_states):
        out = self.ops.unpermute(hidden_states, self.sorted_indices, self.token_probs)
        self.sorted_indices = self.token_probs = None
        return out.view(self.hidden_shape)


class DeepSeekMoELayer(MoELayer):
    """megatron's MoELayer; its dispatcher is one of ours where that applies (see the module docstring)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:  # as MoELayer.__init__ resolves it
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if LocalTokenDispatcher.applies(config, pg_collection, self.experts):
            self.token_dispatcher = LocalTokenDispatcher(config, pg_collection, self.experts)
        elif AllToAllTokenDispatcher.applies(config, pg_collection, self.experts):
            self.token_dispatcher = AllToAllTokenDispatcher(
                self.num_local_experts, self.local_expert_indices, config, pg_collection, self.experts
            )
