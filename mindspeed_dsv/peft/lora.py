"""LoRA adapters on Megatron-Core's tensor-parallel linears.

`apply_lora(model, cfg)` replaces every targeted `ColumnParallelLinear` / `RowParallelLinear` (attention,
dense MLP, shared experts and the `linear_fc1`/`linear_fc2` of each local expert of a `SequentialMLP`) by
a `LoraParallelLinear` that holds the original layer as `base_layer` plus two small linears:

    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)

How the adapter splits under tensor parallelism (TP) follows the base layer, so that the output equals the
TP=1 result and each communication happens once, on r-wide activations:

| base | A [r, in] | B [out, r] | forward comm of the LoRA path | backward comm |
|---|---|---|---|---|
| column | replicated | split on dim 0 like the base | none (all-gather h over the sequence with SP) | all-reduce dh (reduce-scatter with SP) |
| row | split on dim 1 like the base | replicated | all-reduce h (reduce-scatter with SP) | none |

With sequence parallelism the replicated matrix only sees the local sequence chunk, so it is tagged
`sequence_parallel = True` and Megatron's `finalize_model_grads` sums its gradient over TP, exactly as it does
for layer norms. Experts with explicit expert communication (expert-TP > 1 or EP > 1) leave reduction of
activations to the token dispatcher, so the LoRA path does no activation comm there and instead sums the
gradient of its replicated matrix over the expert-TP group.

The base layer keeps its Megatron parameter names in `state_dict()` / `sharded_state_dict()` (the wrapper
removes its own `base_layer.` level), so base checkpoints from `ckpt_convert` load unchanged; adapter
weights are named `<base module path>.lora_A.weight` and `<base module path>.lora_B.weight`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

__all__ = [
    "LORA_TARGET_MODULES",
    "LoraConfig",
    "LoraParallelLinear",
    "apply_lora",
    "lora_state_dict",
    "load_lora_state_dict",
    "merge_lora",
    "mark_only_lora_trainable",
    "wrap_targets",
]

# MindSpeed-LLM names of the linears LoRA may target in a DeepSeek-V3 (MLA + MoE) or GPT model, and
# DeepSeek-V4's one shared K=V projection (linear_kv_proj).
LORA_TARGET_MODULES = (
    "linear_qkv",
    "linear_q_proj",
    "linear_q_down_proj",
    "linear_kv_down_proj",
    "linear_q_up_proj",
    "linear_kv_up_proj",
    "linear_kv_proj",
    "linear_proj",
    "linear_fc1",
    "linear_fc2",
)

_BASE = "base_layer."


@dataclasses.dataclass
class LoraConfig:
    """The LoRA flags of the training CLI (`--lora-r`, `--lora-alpha`, `--lora-dropout`,
    `--lora-target-modules`). Defaults follow MindSpeed-LLM."""

    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: Sequence[str] = ()
    # Adapters are initialised from a generator seeded by (init_seed, the layout-independent module name),
    # so TP/PP/EP layouts of the same model start from identical adapters.
    init_seed: int = 1234

    def __post_init__(self):
        self.lora_target_modules = tuple(self.lora_target_modules)
        if self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError(f"lora_target_modules is empty; choose from {', '.join(LORA_TARGET_MODULES)}")
        unknown = sorted(set(self.lora_target_modules) - set(LORA_TARGET_MODULES))
        if unknown:
            raise ValueError(
                f"unknown lora_target_modules {unknown}; valid names are {', '.join(LORA_TARGET_MODULES)}"
            )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_r


def merge_lora(base_weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    """W + (alpha / r) * B @ A, computed in float32 and returned in the base weight's dtype.

    Shapes: W [out, in], A [r, in], B [out, r] (full, unsplit matrices, or matching TP shards: a column
    shard of W with the matching rows of B and the full A; a row shard of W with the matching columns of A
    and the full B).
    """
    if A.dim() != 2 or B.dim() != 2 or base_weight.dim() != 2:
        raise ValueError(
            f"merge_lora wants 2-D tensors, got W {tuple(base_weight.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if A.shape[0] != r or B.shape[1] != r or B.shape[0] != base_weight.shape[0] or A.shape[1] != base_weight.shape[1]:
        raise ValueError(
            f"merge_lora shape mismatch: W {tuple(base_weight.shape)} needs A [{r}, {base_weight.shape[1]}] and "
            f"B [{base_weight.shape[0]}, {r}], got A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    delta = (B.float() @ A.float()) * (alpha / r)
    return (base_weight.float() + delta).to(base_weight.dtype)


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _group_rank(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group)


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight tensor, or a stand-in carrying its dtype/device (QLoRA keeps NF4 storage)."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    ref = getattr(base, "nf4_reference", None)
    if ref is not None:
        return ref
    raise TypeError(f"{type(base).__name__} has no weight tensor to attach LoRA to")


class LoraParallelLinear(nn.Module):
    """A Megatron parallel linear plus a LoRA adapter; returns `(output, bias)` like the base layer."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, init_key: str = "",
                 init_seed: int = 1234):
        super().__init__()
        if isinstance(base_layer, ColumnParallelLinear):
            self.parallel_mode = "column"
        elif isinstance(base_layer, RowParallelLinear):
            self.parallel_mode = "row"
        elif isinstance(base_layer, ReplicatedLinear):
            # MLA's down projections: the same whole weight on every TP rank, input/output not split over TP.
            self.parallel_mode = "replicated"
        else:
            raise TypeError(f"LoRA supports ColumnParallelLinear/RowParallelLinear/Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.tp_group = base_layer.tp_group
        self.tp_size = _group_size(self.tp_group)
        self.tp_rank = _group_rank(self.tp_group)
        self.explicit_expert_comm = bool(getattr(base_layer, "explicit_expert_comm", False))
        if self.parallel_mode == "replicated":
            self.sequence_parallel = bool(base_layer.config.sequence_parallel) and self.tp_size > 1
            in_full, out_full = base_layer.in_features, base_layer.out_features
        else:
            self.sequence_parallel = bool(getattr(base_layer, "sequence_parallel", False)) and self.tp_size > 1
            in_full, out_full = base_layer.input_size, base_layer.output_size
        if self.parallel_mode == "replicated":
            in_local, out_local = in_full, out_full
        elif self.parallel_mode == "column":
            in_local, out_local = in_full, base_layer.output_size_per_partition
        else:
            in_local, out_local = base_layer.input_size_per_partition, out_full

        ref = _base_weight(base_layer)
        self.lora_A = nn.Linear(in_local, r, bias=False, device=ref.device, dtype=ref.dtype)
        self.lora_B = nn.Linear(r, out_local, bias=False, device=ref.device, dtype=ref.dtype)
        self._init_adapter(in_full, out_full, init_key, init_seed)

        # Megatron bookkeeping: TP split attributes (grad-norm dedup, checkpoint sharding), expert params'
        # data-parallel group (`allreduce=False`), and which replicated matrix needs its grad summed.
        split_a = self.parallel_mode == "row" and self.tp_size > 1
        split_b = self.parallel_mode == "column" and self.tp_size > 1
        set_tensor_model_parallel_attributes(self.lora_A.weight, split_a, 1, 1)
        set_tensor_model_parallel_attributes(self.lora_B.weight, split_b, 0, 1)
        if self.parallel_mode == "replicated":
            replicated = (self.lora_A.weight, self.lora_B.weight)
        else:
            replicated = (self.lora_B.weight if self.parallel_mode == "row" else self.lora_A.weight,)
        if self.sequence_parallel and not self.explicit_expert_comm:
            # Each TP rank sees a slice of the sequence: these grads are partial sums over TP.
            for p in replicated:
                p.sequence_parallel = True
        base_w = getattr(base_layer, "weight", None)
        if base_w is not None and hasattr(base_w, "allreduce"):
            for p in (self.lora_A.weight, self.lora_B.weight):
                p.allreduce = base_w.allreduce

        self._register_state_dict_hook(_drop_base_prefix)
        self._register_load_state_dict_pre_hook(_add_base_prefix)

    @torch.no_grad()
    def _init_adapter(self, in_full: int, out_full: int, key: str, seed: int) -> None:
        """A: kaiming-uniform(a=sqrt(5)) over the full [r, in] (peft's init), then this rank's slice; B: 0."""
        gen = torch.Generator().manual_seed((zlib.crc32(key.encode()) ^ seed) & 0x7FFFFFFFFFFFFFFF)
        a_full = torch.empty(self.r, in_full, dtype=torch.float32)
        nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=gen)
        if self.parallel_mode == "row":
            n = self.lora_A.weight.shape[1]
            a_full = a_full[:, self.tp_rank * n : (self.tp_rank + 1) * n]
        self.lora_A.weight.copy_(a_full)
        self.lora_B.weight.zero_()

    def __getattr__(self, name: str):
        # Megatron code reads attributes of its linears (weight, bias, config, ...): delegate the ones the
        # wrapper does not have.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def _lora_weight(self, w: torch.Tensor) -> torch.Tensor:
        # Expert layers with explicit expert comm: the dispatcher reduces activations, each expert-TP rank
        # holds a partial gradient of the replicated matrix; sum it (identity forward, all-reduce backward).
        if self.explicit_expert_comm and self.tp_size > 1:
            return copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        return w

    def lora_forward(self, x: torch.Tensor, runtime_gather_output: Optional[bool] = None) -> torch.Tensor:
        a = self.lora_A.weight
        b = self.lora_B.weight
        x = self.dropout(x)
        comm = self.tp_size > 1 and not self.explicit_expert_comm
        if self.parallel_mode == "replicated":
            # Tokens stay where they are (the sequence slice under SP); the whole low-rank product runs locally.
            return torch.matmul(torch.matmul(x, a.t()), b.t()) * self.scaling
        if self.parallel_mode == "column":
            h = torch.matmul(x, self._lora_weight(a).t())
            if comm:
                if self.sequence_parallel:
                    h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
                else:
                    h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            y = torch.matmul(h, b.t())
            gather = self.base_layer.gather_output if runtime_gather_output is None else runtime_gather_output
            if gather and self.tp_size > 1:
                y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        else:
            if comm and not self.base_layer.input_is_parallel:
                x = scatter_to_tensor_model_parallel_region(x, group=self.tp_group)
            h = torch.matmul(x, a.t())
            if comm:
                if self.sequence_parallel:
                    h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                else:
                    h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            y = torch.matmul(h, self._lora_weight(b).t())
        return y * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(x, *args, **kwargs)
        lora = self.lora_forward(x, kwargs.get("runtime_gather_output"))
        return output + lora.to(output.dtype), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Base layer's shards under the unchanged prefix, plus the adapter split like the base."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = dict(self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata))
        own = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        axis = {"column": {"lora_B.weight": 0}, "row": {"lora_A.weight": 1}, "replicated": {}}[self.parallel_mode]
        sd.update(make_sharded_tensors_for_checkpoint(own, prefix, axis, sharded_offsets))
        return sd


def _drop_base_prefix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix + _BASE):]] = state_dict.pop(key)
    return state_dict


def _add_base_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if not rest.startswith(("lora_A.", "lora_B.", _BASE)):
            state_dict[prefix + _BASE + rest] = state_dict.pop(key)


def _global_module_key(model: nn.Module, name: str) -> str:
    """`name` with pipeline-local layer indices and EP-local expert indices replaced by global ones."""
    out: list[str] = []
    chain = [model]  # modules along the path
    for part in name.split(".") if name else []:
        module = chain[-1].get_submodule(part)
        if part.isdigit() and out and out[-1] == "layers" and getattr(module, "layer_number", None) is not None:
            part = str(module.layer_number - 1)  # megatron's layer_number is global and 1-based
        elif part.isdigit() and out and out[-1] == "local_experts" and len(chain) >= 2:
            experts = chain[-2]  # the SequentialMLP: global index = ep_rank * num_local_experts + local
            n_local = getattr(experts, "num_local_experts", None)
            if n_local is not None:
                part = str(_group_rank(getattr(experts, "ep_group", None)) * n_local + int(part))
        chain.append(module)
        out.append(part)
    return ".".join(out)


def _iter_targets(model: nn.Module, targets: Iterable[str]):
    targets = set(targets)
    for name, module in model.named_modules():
        if isinstance(module, LoraParallelLinear):
            continue
        if name.rsplit(".", 1)[-1] in targets and isinstance(
            module, (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear)
        ):
            yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def wrap_targets(model: nn.Module, cfg: LoraConfig, wrap, who: str) -> nn.Module:
    """Replace every parallel linear named in cfg.lora_target_modules by `wrap(module, init_key)` in place and
    freeze all non-adapter parameters; returns `model`. Raises (naming `who`) if no module matched: a typo in
    --lora-target-modules would otherwise train nothing. Init keys are taken before any module is replaced."""
    found = list(_iter_targets(model, cfg.lora_target_modules))
    if not found:
        raise ValueError(
            f"{who}: no ColumnParallelLinear/RowParallelLinear named {list(cfg.lora_target_modules)} in the model"
        )
    keys = {name: _global_module_key(model, name) for name, _ in found}
    for name, module in found:
        _set_submodule(model, name, wrap(module, keys[name]))
    mark_only_lora_trainable(model)
    return model


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap every targeted parallel linear of `model` in a LoraParallelLinear (see wrap_targets)."""

    def wrap(module, init_key):
        return LoraParallelLinear(
            module, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, init_key=init_key, init_seed=cfg.init_seed
        )

    return wrap_targets(model, cfg, wrap, "apply_lora")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only: `<base module path>.lora_A.weight` / `.lora_B.weight` (this rank's shards)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraParallelLinear):
            prefix = f"{name}." if name else ""
            out[prefix + "lora_A.weight"] = module.lora_A.weight.detach()
            out[prefix + "lora_B.weight"] = module.lora_B.weight.detach()
    return out


_LORA_KEY = re.compile(r"^(?:(.*)\.)?lora_([AB])\.weight$")


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy adapter weights into the model's LoraParallelLinear modules (shapes must match this rank's)."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in expected)
    if strict and (missing or unexpected):
        raise KeyError(f"load_lora_state_dict: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    with torch.no_grad():
        for key, value in state_dict.items():
            if key not in expected:
                continue
            target = expected[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"load_lora_state_dict: {key} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
