"""megatron's MoELayer with a host-sync-free token dispatcher when every expert is on this rank.

Without Transformer Engine, megatron-core 0.16.1's alltoall dispatcher permutes tokens with `masked_select`
(a device-to-host sync for the output size, twice: tokens and probs), copies the per-expert counts to the
host and waits for them (another sync), and at one rank splits the permuted rows into one chunk per expert
and concatenates them again. Each sync drains the GPU's queue once per MoE layer per micro-batch.

`LocalTokenDispatcher` does the same job with none of that, when there is nothing to communicate
(expert-parallel size 1 and expert-tensor-parallel size 1, dropless): tokens are permuted with
`ops.permute` (a stable sort by expert id: the row order megatron's permute produces), the counts stay on the
device for the grouped GEMM, and `ops.unpermute` returns each token's probability-weighted sum of its experts'
outputs, summed in fp32 (megatron sums them in the activation dtype with scatter_add). The routing
probabilities are applied at that sum, as transformers' DeepSeek-V3 does, so the experts get no probabilities
(`GroupedMLPExperts` takes None for "already weighted elsewhere").

With expert parallelism, capacity factors or megatron's SequentialMLP (which reads the counts on the host
anyway) the layer keeps megatron's dispatcher unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from mindspeed_dsv.ops import count_tokens_per_expert, get_ops


class LocalTokenDispatcher(MoETokenDispatcher):
    """Dispatcher for a rank that holds all experts: permute -> (no communication) -> unpermute."""

    def __init__(self, config, pg_collection, ops=None):
        super().__init__(config=config, pg_collection=pg_collection)
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
        from .experts import GroupedMLPExperts

        return (
            pg_collection.ep.size() == 1
            and pg_collection.expt_tp.size() == 1
            and config.moe_token_dispatcher_type == "alltoall"
            and config.moe_expert_capacity_factor is None
            and not config.moe_pad_expert_input_to_capacity
            and not config.moe_router_padding_for_quantization
            and not config.moe_shared_expert_overlap
            and not config.moe_apply_probs_on_input
            and isinstance(experts, GroupedMLPExperts)
        )

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, hidden_states.shape[-1])
        # Each token's k experts (in increasing id): a dropless routing map has exactly k set per row. (A row with
        # fewer would add experts of probability 0; the counts below follow `indices`, so the rows stay consistent.)
        indices = torch.argsort(routing_map.to(torch.uint8), dim=1, descending=True, stable=True)[:, : self.topk]
        self.token_probs = probs.gather(1, indices)  # [tokens, k], differentiable towards the router
        self.tokens_per_expert = count_tokens_per_expert(indices, routing_map.shape[1])  # on the device
        permuted, self.sorted_indices = self.ops.permute(tokens, indices)
        return permuted, None

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states, probs):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, None

    def combine_preprocess(self, hidden_states):
        return hidden_states

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        out = self.ops.unpermute(hidden_states, self.sorted_indices, self.token_probs)
        self.sorted_indices = self.token_probs = None
        return out.view(self.hidden_shape)


class DeepSeekMoELayer(MoELayer):
    """megatron's MoELayer; its dispatcher is `LocalTokenDispatcher` where that applies."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:  # as MoELayer.__init__ resolves it
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if LocalTokenDispatcher.applies(config, pg_collection, self.experts):
            self.token_dispatcher = LocalTokenDispatcher(config, pg_collection)
