"""Grouped-GEMM experts for megatron's MoELayer without Transformer Engine or the CUDA-only `grouped_gemm` package.

`GroupedMLPExperts` is megatron's legacy `GroupedMLP` (0.16.1) with its two `gg.ops.gmm` calls replaced by
`ops.grouped_matmul` and its GLU by `ops.swiglu`, so the kernels follow the platform and the ops flags
(torch loop / torch._grouped_mm / npu_grouped_matmul). Everything a checkpoint sees is GroupedMLP's:

- `weight1` [hidden, num_local_experts * ffn * 2 / tp], read as [E, hidden, 2 * ffn / tp] (a plain view:
  expert e owns the e-th contiguous block), each expert's columns laid out [gate | up] per TP rank;
- `weight2` [num_local_experts * ffn / tp, hidden], read as [E, ffn / tp, hidden];
- `sharded_state_dict` is inherited unchanged, so distributed checkpoints map to and from SequentialMLP's
  `experts.linear_fc1.weight` / `experts.linear_fc2.weight` exactly as megatron's GroupedMLP does.

GroupedMLP.__init__ is not reused because it refuses to run without `grouped_gemm`; the constructor below
repeats its parameter set-up (same names, shapes, init functions and attributes) and allocates on the
platform's device instead of `torch.cuda.current_device()`. Unlike GroupedMLP it does not require bf16.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, _initialize_affine_weight_gpu
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.parameter import Parameter

from mindspeed_dsv.ops import Ops, get_ops
from mindspeed_dsv.platform import current_platform


class GroupedMLPExperts(GroupedMLP):
    """Drop-in for megatron's GroupedMLP (constructor, forward contract, parameters, sharded state dict).

    ops: the kernels to use; defaults to `mindspeed_dsv.ops.get_ops()` at construction time. It can be given
    through a ModuleSpec's `params`.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection=None,
        ops: Optional[Ops] = None,
    ):
        MegatronModule.__init__(self, config=config)  # not GroupedMLP.__init__: it demands grouped_gemm
        self.config: TransformerConfig = config
        self.num_local_experts = num_local_experts
        self.ops = ops or get_ops()
        if config.add_bias_linear:
            raise ValueError("GroupedMLPExperts has no expert biases (like GroupedMLP): set add_bias_linear=False")
        if getattr(config, "moe_latent_size", None) is not None:
            raise ValueError("GroupedMLPExperts does not support moe_latent_size (nor does GroupedMLP)")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()

        self.expert_parallel = config.expert_model_parallel_size > 1
        if config.gated_linear_unit and config.activation_func not in (F.silu, F.gelu):
            raise ValueError("activation function must be silu or gelu for gated experts (as in GroupedMLP)")
        self.activation_func = self._activation
        self.activation_recompute = (
            config.recompute_granularity == "selective" and "moe_act" in config.recompute_modules
        )
        if self.activation_recompute and (config.fp8 or config.fp4):
            raise ValueError("moe_act recompute for fp8 or fp4 is not supported by grouped experts")
        self.activation_func_with_probs = self._activation_with_probs

        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        tp_size = self.tp_group.size()
        tp_rank = self.tp_group.rank()

        fc1_output_size = config.moe_ffn_hidden_size * num_local_experts
        if config.gated_linear_unit:
            fc1_output_size *= 2
        fc1_output_size_per_partition = divide(fc1_output_size, tp_size)
        fc2_input_size = config.moe_ffn_hidden_size * num_local_experts
        fc2_input_size_per_partition = divide(fc2_input_size, tp_size)

        device = torch.device("cpu") if config.use_cpu_initialization else current_platform().device()
        self.weight1 = Parameter(
            torch.empty(config.hidden_size, fc1_output_size_per_partition, dtype=config.params_dtype, device=device)
        )
        self.weight2 = Parameter(
            torch.empty(fc2_input_size_per_partition, config.hidden_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            if config.use_cpu_initialization:
                _initialize_affine_weight_cpu(
                    self.weight1, config.hidden_size, fc1_output_size, fc1_output_size_per_partition,
                    partition_dim=1, init_method=config.init_method, params_dtype=config.params_dtype,
                    rank=tp_rank, world_size=tp_size,
                )  # fmt: skip
                _initialize_affine_weight_cpu(
                    self.weight2, fc2_input_size, config.hidden_size, fc2_input_size_per_partition,
                    partition_dim=0, init_method=config.output_layer_init_method,
                    params_dtype=config.params_dtype, rank=tp_rank, world_size=tp_size,
                )  # fmt: skip
            else:
                _initialize_affine_weight_gpu(self.weight1, config.init_method, partition_dim=1, is_expert=True)
                _initialize_affine_weight_gpu(
                    self.weight2, config.output_layer_init_method, partition_dim=0, is_expert=True
                )
        setattr(self.weight1, "allreduce", not self.expert_parallel)
        setattr(self.weight2, "allreduce", not self.expert_parallel)
        self.register_load_state_dict_post_hook(_drop_extra_state_keys)

    def _grouped_matmul(self, x, weight, shape, tokens_per_expert):
        """With gradient-accumulation fusion (as megatron's linears), the weight gradient is added into DDP's fp32
        main_grad inside the backward where the kernels can (ops.grouped_matmul_into_main_grad); else autograd
        writes a gradient and DDP's hook adds it."""
        fuse = self.ops.grouped_matmul_into_main_grad
        if fuse is not None and self.config.gradient_accumulation_fusion and hasattr(weight, "main_grad"):
            shape = weight.view(shape).shape
            return fuse(x, weight, shape, tokens_per_expert)
        return self.ops.grouped_matmul(x, weight.view(shape), tokens_per_expert)

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.gated_linear_unit:
            return self.config.activation_func(x)
        if self.config.activation_func is F.silu:
            return self.ops.swiglu(x)
        gate, up = torch.chunk(x, 2, dim=-1)
        return self.config.activation_func(gate) * up

    def _activation_with_probs(self, x: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
        if probs is None:  # the dispatcher weights the experts' outputs itself (LocalTokenDispatcher)
            return self._activation(x)
        dtype = x.dtype
        return (self._activation(x) * probs).to(dtype)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: Optional[torch.Tensor],
    ):
        """[tokens sorted by local expert, hidden], [num_local_experts] counts, [tokens] probs -> (out, None).

        permuted_probs None: the outputs are not weighted here (the dispatcher applies the routing weights)."""
        if self.activation_recompute:
            # fp8=None: 0.16.1 sets `self.fp8 = fp8 is not None`, so the default (False) would take the TE-only fp8
            # branch and hit an undefined FP8GlobalStateManager without Transformer Engine.
            self.activation_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
        if self.config.moe_apply_probs_on_input:  # never with LocalTokenDispatcher (its applies() excludes it)
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            original_dtype = permuted_local_hidden_states.dtype
            permuted_local_hidden_states = (permuted_probs.unsqueeze(-1) * permuted_local_hidden_states).to(
                original_dtype
            )
            permuted_probs = torch.ones_like(permuted_probs)
        probs = None if permuted_probs is None else permuted_probs.unsqueeze(-1)

        if permuted_local_hidden_states.nelement() != 0:
            w1_shape = (self.num_local_experts, self.config.hidden_size, -1)
            w2_shape = (self.num_local_experts, -1, self.config.hidden_size)
            fc1_output = self._grouped_matmul(permuted_local_hidden_states, self.weight1, w1_shape, tokens_per_expert)
            if self.activation_recompute:
                intermediate = self.activation_checkpoint.checkpoint(
                    self.activation_func_with_probs, fc1_output, probs
                )
                fc2_output = self._grouped_matmul(intermediate, self.weight2, w2_shape, tokens_per_expert)
                self.activation_checkpoint.discard_output_and_register_recompute(fc2_output)
            else:
                intermediate = self.activation_func_with_probs(fc1_output, probs)
                fc2_output = self._grouped_matmul(intermediate, self.weight2, w2_shape, tokens_per_expert)
        else:
            # No token for any local expert: run the weights anyway so every parameter gets a (zero) grad,
            # which keeps DDP's bucket bookkeeping identical across ranks (as GroupedMLP does).
            w1 = self.weight1.view(self.config.hidden_size, -1)
            w2 = self.weight2.view(-1, self.config.hidden_size)
            h = torch.matmul(permuted_local_hidden_states, w1)
            if self.activation_recompute:
                h = self.activation_checkpoint.checkpoint(self.activation_func_with_probs, h, probs)
                fc2_output = torch.matmul(h, w2)
                self.activation_checkpoint.discard_output_and_register_recompute(fc2_output)
            else:
                fc2_output = torch.matmul(self.activation_func_with_probs(h, probs), w2)
        return fc2_output, None


def _drop_extra_state_keys(module, incompatible_keys):
    """SequentialMLP-compatible checkpoints carry per-expert `_extra_state` keys that have no parameter here."""
    for key in list(incompatible_keys.unexpected_keys):
        if "_extra_state" in key:
            incompatible_keys.unexpected_keys.remove(key)
