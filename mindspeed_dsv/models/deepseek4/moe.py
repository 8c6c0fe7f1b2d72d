"""V4's MoE block on megatron's MoELayer (alltoall dispatcher, SequentialMLP experts, shared expert; the SwiGLU
clamp is megatron's activation_func_clamp_value) with V4's routers in place of megatron's TopKRouter:

- scores = sqrt(softplus(logits)); the chosen experts' scores are renormalised (+1e-20) and scaled by
  routed_scaling_factor;
- learned layers pick top-k of scores + expert bias (the bias only selects, as in V3);
- hash layers (the first mlp_layer_types == 'hash_moe') pick tid2eid[token id], a fixed [vocab, k] table,
  and have no expert bias.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import build_module

from .config import HASH_MOE, DeepSeekV4Config


class V4Router(TopKRouter):
    """Learned V4 routing; megatron's expert_bias buffer and token counts (for the bias update) are kept."""

    def __init__(self, config, pg_collection=None, routed_scaling_factor: float = 1.0):
        # megatron router options that `routing` below does not compute are refused, not ignored
        unsupported = {
            "moe_expert_capacity_factor": config.moe_expert_capacity_factor,
            "moe_z_loss_coeff": config.moe_z_loss_coeff,
            "moe_input_jitter_eps": config.moe_input_jitter_eps,
            "moe_router_num_groups": config.moe_router_num_groups,
            "moe_router_force_load_balancing": config.moe_router_force_load_balancing or None,
            "moe_enable_routing_replay": config.moe_enable_routing_replay or None,
        }
        if config.moe_router_load_balancing_type != "none" and config.moe_aux_loss_coeff:
            unsupported["moe_router_load_balancing_type"] = config.moe_router_load_balancing_type
        named = {k: v for k, v in unsupported.items() if v}
        if named:
            raise ValueError(f"DeepSeek-V4 routing does not support {named}")
        super().__init__(config=config, pg_collection=pg_collection)
        self.routed_scaling_factor = routed_scaling_factor

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.topk(scores + self.expert_bias, self.topk, dim=-1).indices

    def routing(self, logits: torch.Tensor, padding_mask=None):
        if padding_mask is not None:
            raise NotImplementedError("DeepSeek-V4 routing does not take a padding mask")
        logits = logits.view(-1, self.config.num_moe_experts)
        scores = F.softplus(logits).sqrt()
        indices = self.select(scores)
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        probs = torch.zeros_like(scores).scatter(1, indices, weights)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, indices, True)
        if self.enable_expert_bias:
            self._apply_expert_bias(routing_map)
        return probs, routing_map


class V4HashRouter(V4Router):
    """Hash routing: experts from tid2eid[token id]; the learned gate only weights them."""

    def __init__(self, config, pg_collection=None, routed_scaling_factor: float = 1.0, vocab_size: int = 0):
        super().__init__(dataclasses.replace(config, moe_router_enable_expert_bias=False), pg_collection,
                         routed_scaling_factor)
        # transformers initialises the table to zeros (real values come from the checkpoint), which _check_table
        # refuses; a model trained from scratch needs a valid table: k distinct experts per token, drawn from a
        # fixed seed so that every rank and every layout holds the same one (the table is never trained).
        # no bias buffers at all (megatron sets them to None): its finalize_model_grads updates every module that
        # has an `expert_bias` attribute
        del self.expert_bias, self.local_tokens_per_expert
        table = torch.zeros(vocab_size, self.topk, dtype=torch.long)
        if config.perform_initialization and vocab_size:
            g = torch.Generator().manual_seed(0)
            table = torch.rand(vocab_size, config.num_moe_experts, generator=g).argsort(dim=-1)[:, : self.topk]
        self.register_buffer("tid2eid", table)
        self.input_ids = None  # set by V4MoELayer for the duration of one forward
        self._table_checked = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._table_checked = False
        return super()._load_from_state_dict(*args, **kwargs)

    def _check_table(self) -> None:
        """A row naming one expert twice would make transformers run that expert twice with the weight counted
        twice, while a routing map holds each expert once; such tables (transformers' all-zero init among
        them) are refused rather than computed differently. Checked once per loaded table."""
        ids = self.tid2eid.sort(dim=-1).values
        repeated = (ids[:, 1:] == ids[:, :-1]).any(dim=-1)
        out_of_range = ((ids < 0) | (ids >= self.config.num_moe_experts)).any(dim=-1)
        bad = (repeated | out_of_range).nonzero().flatten()
        if bad.numel():
            t = int(bad[0])
            raise ValueError(
                f"mlp.router.tid2eid: token {t} maps to experts {self.tid2eid[t].tolist()} ({bad.numel()} bad rows); "
                f"every row must name {self.topk} distinct experts in [0, {self.config.num_moe_experts})"
            )
        self._table_checked = True

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        if self.input_ids is None:
            raise RuntimeError("hash routing needs the token ids of the batch (V4MoELayer.forward(input_ids=...))")
        if not self._table_checked:
            self._check_table()
        return self.tid2eid[self.input_ids.reshape(-1)].long()


class V4MoELayer(MoELayer):
    """megatron's MoELayer taking [B, S, D] hidden states and the [B, S] token ids (for hash routing): the
    layer only views tokens as rows, so the token order of hidden states and ids must agree."""

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None):
        if isinstance(self.router, V4HashRouter):
            self.router.input_ids = input_ids
            try:
                out, _ = super().forward(hidden_states)
            finally:
                self.router.input_ids = None
            return out
        out, _ = super().forward(hidden_states)
        return out


def build_moe(config, cfg: DeepSeekV4Config, layer: int) -> V4MoELayer:
    spec = get_moe_module_spec_for_backend(backend=LocalSpecProvider(), num_experts=cfg.n_routed_experts)
    spec.module = V4MoELayer
    if cfg.mlp_type(layer) == HASH_MOE:
        router = functools.partial(V4HashRouter, routed_scaling_factor=cfg.routed_scaling_factor,
                                   vocab_size=cfg.vocab_size)
    else:
        router = functools.partial(V4Router, routed_scaling_factor=cfg.routed_scaling_factor)
    spec.submodules.router = router
    return build_module(spec, config=config, layer_number=layer + 1)
