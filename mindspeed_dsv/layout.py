"""The parallel layout of a DeepSeek-V3 model: one object for conversion, training and the dry-run plan.

A ``ParallelLayout`` says how the decoder layers, experts and embeddings of one model are spread over
tensor (TP), pipeline (PP, with optional virtual stages or dualpipev) and expert (EP) parallel ranks.
Conversion writes it next to the shards as ``layout.json``; training rebuilds it from its flags and compares
(``diff``) before loading; the planner prints it. The flag names follow MindSpeed-LLM / Megatron.

Layer numbering. "Global" layer ids count every decoder layer the pipeline builds, noop layers included
(MindSpeed's ``--num-layers`` = real layers + noop layers, MTP excluded). HF checkpoints have no noop
layers, so the HF index of a real layer is its global id minus the noop ids before it.

Pipeline placement (all MindSpeed conventions):
  * standard: stage r holds a consecutive block, ``num_layers/pp`` each or ``--num-layer-list``;
  * VPP (``--num-layers-per-virtual-pipeline-stage N``): virtual stage ``v*pp + r`` (rank r, chunk v)
    holds the v*pp+r-th block of N consecutive layers;
  * dualpipev: 2*pp virtual stages of equal size; rank r chunk 0 is virtual stage r, chunk 1 is virtual
    stage 2*pp-1-r, so rank 0 holds the embedding, the first layers, the last layers, the output and MTP.
MTP layers always live with the output layer (MindSpeed convention).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

LAYOUT_FILE = "layout.json"
LAYOUT_FORMAT_VERSION = 1


class LayoutError(ValueError):
    """An invalid or mismatching parallel layout. The message names the offending flag(s) and values."""


# Field -> (trainer flag, conversion flag with prefix placeholder). Used for messages and for argparse.
_FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "ep": "--expert-model-parallel-size",
    "expert_tensor_parallel_size": "--expert-tensor-parallel-size",
    "vpp": "--num-layers-per-virtual-pipeline-stage",
    "num_layer_list": "--num-layer-list",
    "noop_layers": "--noop-layers",
    "dualpipev": "--schedules-method dualpipev",
    "num_layers": "--num-layers",
    "mtp_num_layers": "--mtp-num-layers",
    "first_k_dense_replace": "--first-k-dense-replace",
    "num_experts": "--num-experts",
    "moe_grouped_gemm": "--moe-grouped-gemm",
    "moe_tp_extend_ep": "--moe-tp-extend-ep",
    "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
    "sequence_parallel": "--sequence-parallel",
    "cp": "--context-parallel-size",
}

# Fields that decide what lies in which shard: a checkpoint written with one value cannot be loaded with
# another. sequence_parallel and cp only change how activations are split at run time.
SHARD_FIELDS = (
    "tp", "pp", "ep", "expert_tensor_parallel_size", "vpp", "num_layer_list", "noop_layers", "dualpipev", "num_layers",
    "mtp_num_layers", "first_k_dense_replace", "num_experts", "moe_grouped_gemm", "moe_tp_extend_ep",
    "make_vocab_size_divisible_by",
)


def flag_name(field_name: str, prefix: str = "") -> str:
    """The command-line flag of a layout field; ``prefix`` ('target-'/'source-') renames TP/PP/EP the way
    MindSpeed's converters do (``--target-tensor-parallel-size``)."""
    if prefix and field_name == "expert_tensor_parallel_size":
        return f"--{prefix}expert-tensor-parallel-size"
    if prefix and field_name in ("tp", "pp", "ep"):
        word = {"tp": "tensor", "pp": "pipeline", "ep": "expert"}[field_name]
        return f"--{prefix}{word}-parallel-size"
    return _FLAGS[field_name]


def _flags(prefix: str = "") -> dict[str, str]:
    """The flag table with TP/PP/EP spelled as ``flag_name(..., prefix)``."""
    names = ("tp", "pp", "ep", "expert_tensor_parallel_size")
    return {**_FLAGS, **{k: flag_name(k, prefix) for k in names}} if prefix else _FLAGS


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _parse_int_list(value: Any, flag: str) -> list[int] | None:
    """'1,2,3' / [1, 2, 3] / None -> list[int] | None, with an error naming the flag."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        parts = [p for p in text.replace(" ", ",").split(",") if p != ""]
    else:
        parts = list(value)
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        raise LayoutError(f"{flag}: expected a comma-separated list of integers, got {value!r}") from None


@dataclass
class ParallelLayout:
    """TP/PP/EP/VPP/dualpipev placement of a DeepSeek-V3 model (see the module docstring).

    Model-shape fields (num_layers, mtp_num_layers, first_k_dense_replace, num_experts) may be left None
    and filled from the HF config with ``with_model_defaults``; ``validate_against`` checks given ones.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    # Megatron's --expert-tensor-parallel-size: TP inside each routed expert, 1 or TP; None = TP (megatron's
    # default). At 1 the expert weights are whole on every rank and the expert grid (ETP x EP) no longer lines up
    # with the attention grid (TP), so the rank files are not the full TP x EP grid (see rank_files).
    expert_tensor_parallel_size: int | None = None
    # MindSpeed's --num-layers-per-virtual-pipeline-stage (layers per virtual stage); None = no VPP.
    vpp: int | None = None
    num_layer_list: list[int] | None = None
    noop_layers: list[int] = field(default_factory=list)
    dualpipev: bool = False
    # Decoder layers built by the pipeline: real layers + noop layers, MTP excluded (MindSpeed definition).
    num_layers: int | None = None
    mtp_num_layers: int | None = None
    first_k_dense_replace: int | None = None
    num_experts: int | None = None
    moe_grouped_gemm: bool = False
    moe_tp_extend_ep: bool = False
    # Megatron's --make-vocab-size-divisible-by: the embedding and output layer hold padded_vocab_size rows.
    make_vocab_size_divisible_by: int = 1
    sequence_parallel: bool = False
    cp: int = 1

    def __post_init__(self) -> None:
        self.num_layer_list = _parse_int_list(self.num_layer_list, _FLAGS["num_layer_list"])
        self.noop_layers = sorted(_parse_int_list(self.noop_layers, _FLAGS["noop_layers"]) or [])

    # ------------------------------------------------------------------ validation
    def validate(self, flag_prefix: str = "") -> "ParallelLayout":
        """Check the layout on its own (no model config). Raises LayoutError naming the flag; returns self.
        ``flag_prefix`` ('target-'/'source-') names TP/PP/EP by the converters' flags in the messages."""
        _FLAGS = _flags(flag_prefix)  # noqa: N806 - shadows the module table for this call's messages
        for name in ("tp", "pp", "ep", "cp", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"{flag_name(name, flag_prefix)} must be a positive integer, got {value!r}")
        if self.num_layers is None:
            raise LayoutError(f"{_FLAGS['num_layers']} is not set (give it, or fill it from config.json "
                              "with with_model_defaults)")
        if self.num_layers < 1:
            raise LayoutError(f"{_FLAGS['num_layers']} must be >= 1, got {self.num_layers}")
        if self.mtp_num_layers is not None and self.mtp_num_layers < 0:
            raise LayoutError(f"{_FLAGS['mtp_num_layers']} must be >= 0, got {self.mtp_num_layers}")
        if self.first_k_dense_replace is not None and self.first_k_dense_replace < 0:
            raise LayoutError(f"{_FLAGS['first_k_dense_replace']} must be >= 0, got {self.first_k_dense_replace}")

        # noop layers
        if len(set(self.noop_layers)) != len(self.noop_layers):
            raise LayoutError(f"{_FLAGS['noop_layers']}: duplicate layer ids in {self.noop_layers}")
        bad = [i for i in self.noop_layers if not 0 <= i < self.num_layers]
        if bad:
            raise LayoutError(f"{_FLAGS['noop_layers']}: ids {bad} out of range [0, {self.num_layers}) "
                              f"for {_FLAGS['num_layers']} {self.num_layers} (num-layers counts noop layers)")
        if len(self.noop_layers) >= self.num_layers:
            raise LayoutError(f"{_FLAGS['noop_layers']}: all {self.num_layers} layers are noop layers")

        # num-layer-list. MindSpeed: exclusive with VPP and with noop layers (both stated in its converter
        # docs). MindSpeed also only accepts it with num-layers == 61; we accept any count (the tiny model
        # needs it) and check num-layers against config.json in validate_against instead.
        if self.num_layer_list is not None:
            if self.vpp is not None:
                raise LayoutError(f"{_FLAGS['num_layer_list']} and {_FLAGS['vpp']} cannot be used together "
                                  f"(got {_FLAGS['num_layer_list']} {self._nll_str()} and {_FLAGS['vpp']} {self.vpp})")
            if self.noop_layers:
                raise LayoutError(f"{_FLAGS['num_layer_list']} and {_FLAGS['noop_layers']} cannot be used together "
                                  f"(got {self._nll_str()} and {','.join(map(str, self.noop_layers))}); pick one")
            if self.dualpipev:
                # Our deviation, stated: dualpipev chunks are equal halves of 2*pp virtual stages, so an
                # uneven per-rank list has no meaning there.
                raise LayoutError(f"{_FLAGS['num_layer_list']} cannot be used with {_FLAGS['dualpipev']} "
                                  "(dualpipev splits the layers into 2*pp equal virtual stages)")
            if len(self.num_layer_list) != self.pp:
                raise LayoutError(f"{_FLAGS['num_layer_list']} {self._nll_str()} has {len(self.num_layer_list)} "
                                  f"entries but {_FLAGS['pp']} is {self.pp}; give one entry per pipeline stage")
            if any(n < 0 for n in self.num_layer_list):
                raise LayoutError(f"{_FLAGS['num_layer_list']} {self._nll_str()} has a negative entry")
            if sum(self.num_layer_list) != self.num_layers:
                raise LayoutError(f"{_FLAGS['num_layer_list']} {self._nll_str()} sums to {sum(self.num_layer_list)} "
                                  f"but {_FLAGS['num_layers']} is {self.num_layers}")
        elif self.dualpipev:
            if self.vpp is not None:
                raise LayoutError(f"{_FLAGS['dualpipev']} cannot be used with {_FLAGS['vpp']} {self.vpp} "
                                  "(dualpipev already gives each rank two chunks)")
            if self.num_layers % (2 * self.pp) != 0:
                raise LayoutError(f"{_FLAGS['dualpipev']} needs {_FLAGS['num_layers']} ({self.num_layers}) divisible "
                                  f"by 2 * {_FLAGS['pp']} ({2 * self.pp}); pad with {_FLAGS['noop_layers']}")
        elif self.vpp is not None:
            if self.vpp < 1:
                raise LayoutError(f"{_FLAGS['vpp']} must be >= 1, got {self.vpp}")
            if self.pp < 2:
                raise LayoutError(f"{_FLAGS['vpp']} {self.vpp} needs {_FLAGS['pp']} > 1 (got {self.pp})")
            if self.num_layers % (self.pp * self.vpp) != 0:
                raise LayoutError(f"{_FLAGS['num_layers']} ({self.num_layers}) must be divisible by "
                                  f"{_FLAGS['pp']} * {_FLAGS['vpp']} ({self.pp} * {self.vpp} = {self.pp * self.vpp})")
        elif self.num_layers % self.pp != 0:
            raise LayoutError(f"{_FLAGS['num_layers']} ({self.num_layers}) must be divisible by {_FLAGS['pp']} "
                              f"({self.pp}); or give {_FLAGS['num_layer_list']}, or pad with {_FLAGS['noop_layers']}")

        # experts
        if self.num_experts is not None:
            if self.num_experts < 1:
                raise LayoutError(f"{_FLAGS['num_experts']} must be >= 1, got {self.num_experts}")
            if self.moe_tp_extend_ep:
                if self.num_experts % (self.tp * self.ep) != 0:
                    raise LayoutError(
                        f"{_FLAGS['moe_tp_extend_ep']}: {_FLAGS['tp']} * {_FLAGS['ep']} ({self.tp} * {self.ep} = "
                        f"{self.tp * self.ep}) must divide {_FLAGS['num_experts']} {self.num_experts}")
            elif self.num_experts % self.ep != 0:
                raise LayoutError(f"{_FLAGS['ep']} {self.ep} must divide {_FLAGS['num_experts']} {self.num_experts}")
        etp = self.expert_tensor_parallel_size
        if etp is not None:
            if etp not in (1, self.tp):
                raise LayoutError(f"{_FLAGS['expert_tensor_parallel_size']} must be 1 or {_FLAGS['tp']} "
                                  f"({self.tp}), got {etp!r}")
            if self.moe_tp_extend_ep and etp != 1:
                raise LayoutError(f"{_FLAGS['moe_tp_extend_ep']} keeps experts whole (expert-TP 1); "
                                  f"{_FLAGS['expert_tensor_parallel_size']} {etp} contradicts it")
        return self

    def validate_against(self, model_cfg: Any, flag_prefix: str = "") -> "ParallelLayout":
        """Check the layout against a model config (HF config.json dict or any object with
        num_attention_heads, vocab_size, n_routed_experts, num_hidden_layers, first_k_dense_replace,
        num_nextn_predict_layers). Runs ``validate`` first. Returns self. ``flag_prefix`` as in validate."""
        self.validate(flag_prefix)
        _FLAGS = _flags(flag_prefix)  # noqa: N806
        heads = _get(model_cfg, "num_attention_heads")
        vocab = _get(model_cfg, "vocab_size")
        experts = _get(model_cfg, "n_routed_experts")
        hidden_layers = _get(model_cfg, "num_hidden_layers")
        first_k = _get(model_cfg, "first_k_dense_replace")
        nextn = _get(model_cfg, "num_nextn_predict_layers", 0) or 0

        if heads is not None and heads % self.tp != 0:
            raise LayoutError(f"{_FLAGS['tp']} {self.tp} must divide num_attention_heads {heads} of config.json")
        for key in ("intermediate_size", "moe_intermediate_size"):
            size = _get(model_cfg, key)
            if size is None or (key == "moe_intermediate_size" and self.expert_tp == 1):
                continue
            if size % self.tp != 0:
                raise LayoutError(f"{_FLAGS['tp']} {self.tp} must divide {key} {size} of config.json")
        if experts is not None:
            if self.num_experts is not None and self.num_experts != experts:
                raise LayoutError(f"{_FLAGS['num_experts']} {self.num_experts} differs from n_routed_experts "
                                  f"{experts} of config.json")
            if self.moe_tp_extend_ep and experts % (self.tp * self.ep) != 0:
                raise LayoutError(f"{_FLAGS['moe_tp_extend_ep']}: {_FLAGS['tp']} * {_FLAGS['ep']} = {self.tp * self.ep} "
                                  f"must divide n_routed_experts {experts} of config.json")
            if not self.moe_tp_extend_ep and experts % self.ep != 0:
                raise LayoutError(f"{_FLAGS['ep']} {self.ep} must divide n_routed_experts {experts} of config.json")
        if hidden_layers is not None:
            real = self.num_layers - len(self.noop_layers)
            if real != hidden_layers:
                raise LayoutError(
                    f"{_FLAGS['num_layers']} {self.num_layers} minus {len(self.noop_layers)} "
                    f"{_FLAGS['noop_layers']} = {real} real layers, but config.json has num_hidden_layers "
                    f"{hidden_layers} ({_FLAGS['num_layers']} must count the noop layers, not MTP)")
        if self.first_k_dense_replace is not None:
            limit = first_k if first_k is not None else hidden_layers
            if limit is not None and self.first_k_dense_replace > limit:
                # MindSpeed's converter allows fewer dense layers than the checkpoint (the rest are dropped
                # as a debugging aid); more dense layers than the checkpoint has cannot be filled.
                raise LayoutError(f"{_FLAGS['first_k_dense_replace']} {self.first_k_dense_replace} exceeds "
                                  f"first_k_dense_replace {limit} of config.json")
        if self.mtp_num_layers is not None and self.mtp_num_layers > nextn:
            raise LayoutError(f"{_FLAGS['mtp_num_layers']} {self.mtp_num_layers} exceeds num_nextn_predict_layers "
                              f"{nextn} of config.json")
        return self

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Megatron's rule: the vocabulary rounded up to a multiple of make_vocab_size_divisible_by * TP, so the
        embedding and output layer split evenly over TP. The padded rows are zero, never predicted (masked out of
        the loss's softmax) and stripped on export."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return -(-vocab_size // multiple) * multiple

    def validate_runtime(self, world_size: int | None = None, seq_length: int | None = None) -> "ParallelLayout":
        """Checks that only matter when training runs (not for conversion): sequence parallel with MoE+TP
        (Megatron-Core raises otherwise), world size, context-parallel sequence split."""
        if self.tp > 1 and (self.num_experts or 0) > 0 and not self.sequence_parallel:
            raise LayoutError(f"{_FLAGS['tp']} {self.tp} with MoE needs {_FLAGS['sequence_parallel']} "
                              "(Megatron-Core refuses to train MoE with TP > 1 without it)")
        if world_size is not None:
            self.data_parallel_size(world_size)
        if seq_length is not None:
            div = self.cp * 2 if self.cp > 1 else 1  # causal CP load-balancing splits into 2*cp chunks
            div = max(div, self.tp if self.sequence_parallel else 1)
            if seq_length % div != 0:
                raise LayoutError(f"--seq-length {seq_length} must be divisible by {div} "
                                  f"({_FLAGS['cp']} {self.cp}, {_FLAGS['tp']} {self.tp}"
                                  f"{' with ' + _FLAGS['sequence_parallel'] if self.sequence_parallel else ''})")
        return self

    def with_model_defaults(self, model_cfg: Any) -> "ParallelLayout":
        """A copy with the unset model-shape fields taken from config.json: num_layers = num_hidden_layers +
        noop layers, mtp_num_layers = num_nextn_predict_layers, first_k_dense_replace, num_experts."""
        out = dataclasses.replace(self, noop_layers=list(self.noop_layers),
                                  num_layer_list=None if self.num_layer_list is None else list(self.num_layer_list))
        if out.num_layers is None and _get(model_cfg, "num_hidden_layers") is not None:
            out.num_layers = int(_get(model_cfg, "num_hidden_layers")) + len(out.noop_layers)
        if out.mtp_num_layers is None:
            out.mtp_num_layers = int(_get(model_cfg, "num_nextn_predict_layers", 0) or 0)
        if out.first_k_dense_replace is None and _get(model_cfg, "first_k_dense_replace") is not None:
            out.first_k_dense_replace = int(_get(model_cfg, "first_k_dense_replace"))
        if out.num_experts is None and _get(model_cfg, "n_routed_experts") is not None:
            out.num_experts = int(_get(model_cfg, "n_routed_experts"))
        return out

    # ------------------------------------------------------------------ sizes
    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (TP*PP*CP); also checks that the expert groups tile the world (TP*EP*PP | world)."""
        model = self.tp * self.pp * self.cp
        if world_size < 1 or world_size % model != 0:
            raise LayoutError(f"world size {world_size} is not divisible by {_FLAGS['tp']} * {_FLAGS['pp']} * "
                              f"{_FLAGS['cp']} = {self.tp} * {self.pp} * {self.cp} = {model}")
        # Expert layers: megatron's expert grid, ETP*EP ranks per expert group (experts TP-split, whole at
        # expert-TP 1, or TP folded into EP by --moe-tp-extend-ep), replicated over the remaining
        # expert-data-parallel ranks.
        ep, etp = self.megatron_expert_sizes()
        expert = etp * ep * self.pp
        if world_size % expert != 0:
            raise LayoutError(f"world size {world_size} is not divisible by expert-TP * {_FLAGS['ep']} * "
                              f"{_FLAGS['pp']} = {etp} * {ep} * {self.pp} = {expert}")
        return world_size // model

    def expert_data_parallel_size(self, world_size: int) -> int:
        """Ranks that hold the same expert shard (the distributed optimizer shards expert states over these)."""
        self.data_parallel_size(world_size)
        ep, etp = self.megatron_expert_sizes()
        return world_size // (etp * ep * self.pp)

    def min_world_size(self) -> int:
        """The fewest ranks megatron accepts for this layout (both grids tile it): PP * lcm(TP, ETP*EP)."""
        ep, etp = self.megatron_expert_sizes()
        return self.pp * math.lcm(self.tp, etp * ep)

    @property
    def num_model_chunks(self) -> int:
        """Model chunks per pipeline rank: 1, num_layers/(pp*vpp) with VPP, or 2 with dualpipev."""
        if self.dualpipev:
            return 2
        if self.vpp is not None:
            self._need_num_layers()
            return self.num_layers // (self.pp * self.vpp)
        return 1

    @property
    def num_virtual_stages(self) -> int:
        return self.pp * self.num_model_chunks

    # ------------------------------------------------------------------ placement
    def _need_num_layers(self) -> int:
        if self.num_layers is None:
            raise LayoutError(f"{_FLAGS['num_layers']} is not set")
        return self.num_layers

    def _nll_str(self) -> str:
        return ",".join(map(str, self.num_layer_list or []))

    def _virtual_stage(self, pp_rank: int, chunk: int) -> int:
        if not 0 <= pp_rank < self.pp:
            raise LayoutError(f"pipeline rank {pp_rank} out of range for {_FLAGS['pp']} {self.pp}")
        if not 0 <= chunk < self.num_model_chunks:
            raise LayoutError(f"model chunk {chunk} out of range: this layout has {self.num_model_chunks} chunk(s)")
        if self.dualpipev:
            return pp_rank if chunk == 0 else 2 * self.pp - 1 - pp_rank
        return chunk * self.pp + pp_rank

    def virtual_stage_sizes(self) -> list[int]:
        """Decoder layers (noop included) in each virtual stage, in layer-id order."""
        n = self._need_num_layers()
        if self.num_layer_list is not None:
            return list(self.num_layer_list)
        stages = self.num_virtual_stages
        return [n // stages] * stages

    def stage_layers(self, pp_rank: int, chunk: int = 0) -> list[int]:
        """Global decoder layer ids (noop layers included) that (pp_rank, chunk) runs, in execution order."""
        v = self._virtual_stage(pp_rank, chunk)
        sizes = self.virtual_stage_sizes()
        start = sum(sizes[:v])
        return list(range(start, start + sizes[v]))

    def layer_location(self, layer_id: int) -> tuple[int, int, int]:
        """(pp_rank, chunk, local index) of a global decoder layer id."""
        for r in range(self.pp):
            for c in range(self.num_model_chunks):
                ids = self.stage_layers(r, c)
                if layer_id in ids:
                    return r, c, ids.index(layer_id)
        raise LayoutError(f"layer id {layer_id} out of range for {_FLAGS['num_layers']} {self.num_layers}")

    def is_noop(self, layer_id: int) -> bool:
        return layer_id in self.noop_layers

    def hf_layer_index(self, layer_id: int) -> int | None:
        """Index of the layer in an HF checkpoint (``model.layers.{i}``); None for a noop layer."""
        n = self._need_num_layers()
        if not 0 <= layer_id < n:
            raise LayoutError(f"layer id {layer_id} out of range [0, {n}) for {_FLAGS['num_layers']} {n}")
        if self.is_noop(layer_id):
            return None
        return layer_id - sum(1 for i in self.noop_layers if i < layer_id)

    def global_layer_id(self, hf_index: int) -> int:
        """Inverse of hf_layer_index."""
        real = [i for i in range(self._need_num_layers()) if not self.is_noop(i)]
        if not 0 <= hf_index < len(real):
            raise LayoutError(f"HF layer index {hf_index} out of range [0, {len(real)})")
        return real[hf_index]

    def is_dense(self, layer_id: int) -> bool:
        """True for a real layer whose HF index is below first_k_dense_replace (dense MLP, not MoE)."""
        hf = self.hf_layer_index(layer_id)
        if hf is None:
            return False
        if self.first_k_dense_replace is None:
            raise LayoutError(f"{_FLAGS['first_k_dense_replace']} is not set")
        return hf < self.first_k_dense_replace

    def has_embedding(self, pp_rank: int, chunk: int = 0) -> bool:
        return self._virtual_stage(pp_rank, chunk) == 0

    def has_output(self, pp_rank: int, chunk: int = 0) -> bool:
        """Final norm + output layer (and the loss) live on the last virtual stage."""
        return self._virtual_stage(pp_rank, chunk) == self.num_virtual_stages - 1

    def has_mtp(self, pp_rank: int, chunk: int = 0) -> bool:
        """MTP layers sit with the output layer (MindSpeed convention)."""
        return bool(self.mtp_num_layers) and self.has_output(pp_rank, chunk)

    # ------------------------------------------------------------------ checkpoint naming, experts
    def rank_dir_name(self, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
        """Megatron's per-rank directory (megatron/training/checkpointing.py get_checkpoint_name):
        ``mp_rank_{tp:02d}``, ``_{pp:03d}`` appended when PP > 1, ``_{ep:03d}`` appended when EP > 1."""
        for rank, size, name in ((tp_rank, self.tp, "tp"), (pp_rank, self.pp, "pp"), (ep_rank, self.ep, "ep")):
            if not 0 <= rank < size:
                raise LayoutError(f"{name} rank {rank} out of range for {flag_name(name)} {size}")
        name = f"mp_rank_{tp_rank:02d}"
        if self.pp > 1:
            name += f"_{pp_rank:03d}"
        if self.ep > 1:
            name += f"_{ep_rank:03d}"
        return name

    def num_local_experts(self) -> int:
        if self.num_experts is None:
            raise LayoutError(f"{_FLAGS['num_experts']} is not set")
        groups = self.ep * (self.tp if self.moe_tp_extend_ep else 1)
        return self.num_experts // groups

    def local_experts(self, ep_rank: int, tp_rank: int = 0) -> list[int]:
        """Global ids of the routed experts on (ep_rank, tp_rank). Normally experts are split over EP only
        and each expert's weights over TP (tp_rank does not change the list). With --moe-tp-extend-ep the
        experts are split over the TP*EP ranks instead, whole, in the order ep_rank*tp + tp_rank."""
        if not 0 <= ep_rank < self.ep:
            raise LayoutError(f"ep rank {ep_rank} out of range for {_FLAGS['ep']} {self.ep}")
        if not 0 <= tp_rank < self.tp:
            raise LayoutError(f"tp rank {tp_rank} out of range for {_FLAGS['tp']} {self.tp}")
        n = self.num_local_experts()
        group = ep_rank * self.tp + tp_rank if self.moe_tp_extend_ep else ep_rank
        return list(range(group * n, (group + 1) * n))

    @property
    def expert_tp(self) -> int:
        """TP degree applied inside each expert's weights (1 with --moe-tp-extend-ep or
        --expert-tensor-parallel-size 1)."""
        if self.moe_tp_extend_ep:
            return 1
        return self.tp if self.expert_tensor_parallel_size is None else self.expert_tensor_parallel_size

    def megatron_expert_sizes(self) -> tuple[int, int]:
        """(expert_model_parallel_size, expert_tensor_parallel_size) for megatron's parallel_state and
        TransformerConfig. --moe-tp-extend-ep is megatron's expert-TP 1 with the experts spread over TP*EP ranks."""
        if self.moe_tp_extend_ep:
            return self.ep * self.tp, 1
        return self.ep, self.expert_tp

    def file_ep_rank(self, megatron_ep_rank: int) -> int:
        """The `ep` of a rank file from megatron's expert-model-parallel rank (with --moe-tp-extend-ep megatron's
        EP group spans TP*EP ranks, ordered ep*tp + tp, and the file keeps MindSpeed's ep over EP)."""
        return megatron_ep_rank // self.tp if self.moe_tp_extend_ep else megatron_ep_rank

    def rank_files(self) -> list[tuple[int, int, int]]:
        """(tp, pp, ep) of every distinct rank file, pipeline-major, each file once.

        Megatron-core 0.16.1 numbers the ranks of one pipeline stage r = 0..; the attention grid puts
        tp = r % TP, the expert grid (order tp-ep-dp) ep = (r // ETP) % EP. With expert-TP = TP (or
        --moe-tp-extend-ep, whose ep is folded the same way) every (tp, ep) pair occurs: the TP x EP grid. With
        expert-TP 1 at TP > 1 only the pairs (r % TP, r % EP) occur: lcm(TP, EP) files per stage, each holding its
        TP shard of the dense weights and its EP group's experts whole (tests/layout: checked against megatron)."""
        if self.expert_tp == self.tp or self.moe_tp_extend_ep:
            pairs = [(t, e) for e in range(self.ep) for t in range(self.tp)]
        else:
            pairs = sorted({(r % self.tp, r % self.ep) for r in range(math.lcm(self.tp, self.ep))},
                           key=lambda te: (te[1], te[0]))
        return [(t, p, e) for p in range(self.pp) for t, e in pairs]

    # ------------------------------------------------------------------ megatron
    def to_megatron_pp_layout(self) -> list[list[str]]:
        """``pipeline_model_parallel_layout`` for megatron-core 0.16.1 TransformerConfig: one list per
        (rank, chunk) slot, in megatron's slot order chunk*pp + rank, of LayerType names, which is what Megatron's
        list form takes (its single letters 'E','t','m','L' exist only in the string form, see
        to_megatron_pp_layout_str): 'embedding', 'decoder' (noop layers included; the model builder turns those
        ids into identity layers), 'mtp' and 'loss'. TransformerConfig must get num_layers = self.num_layers
        (noop included) and mtp_num_layers = self.mtp_num_layers.

        For dualpipev the slot of (rank r, chunk 1) holds virtual stage 2*pp-1-r: megatron numbers layers
        chunk-major, so its layer offsets would be wrong for chunk 1; the model builder wraps this list in
        ``models.builder.DualPipeVLayerLayout``, which numbers them in dualpipev order.
        """
        self.validate()
        stages = [[] for _ in range(self.num_virtual_stages)]
        for r in range(self.pp):
            for c in range(self.num_model_chunks):
                v = self._virtual_stage(r, c)
                stage = ["embedding"] if v == 0 else []
                stage += ["decoder"] * len(self.stage_layers(r, c))
                if v == self.num_virtual_stages - 1:
                    stage += ["mtp"] * (self.mtp_num_layers or 0) + ["loss"]
                stages[c * self.pp + r] = stage
        return stages

    def to_megatron_pp_layout_str(self) -> str:
        """The same layout in Megatron's string form, e.g. 'Ettt|tttmL' (E embedding, t decoder, m MTP, L loss)."""
        if self.dualpipev:
            raise LayoutError(f"{_FLAGS['dualpipev']} has no Megatron string layout: megatron would number chunk 1 "
                              "of rank r as virtual stage pp+r (the builder's DualPipeVLayerLayout numbers it "
                              "2*pp-1-r)")
        letter = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}
        return "|".join("".join(letter[x] for x in s) for s in self.to_megatron_pp_layout())

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParallelLayout":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LayoutError(f"unknown layout fields {unknown}; known: {sorted(names)}")
        return cls(**dict(data))

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/layout.json`` (through a temporary file renamed when complete)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LAYOUT_FILE)
        record = {"layout_version": LAYOUT_FORMAT_VERSION, "layout": self.to_dict()}
        try:  # a readable map for people; ignored by load()
            record["stages"] = {f"pp{r}_chunk{c}": self.stage_layers(r, c)
                                for r in range(self.pp) for c in range(self.num_model_chunks)}
        except LayoutError:
            pass
        fd, tmp = tempfile.mkstemp(prefix=".layout.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ParallelLayout":
        path = os.path.join(directory, LAYOUT_FILE)
        if not os.path.isfile(path):
            raise LayoutError(f"{path}: no layout record; was this checkpoint written by our converter?")
        try:
            with open(path) as f:
                record = json.load(f)
        except json.JSONDecodeError as e:
            raise LayoutError(f"{path}: not valid JSON ({e})") from None
        version = record.get("layout_version")
        if version != LAYOUT_FORMAT_VERSION:
            raise LayoutError(f"{path}: layout_version {version!r}, this code reads {LAYOUT_FORMAT_VERSION}")
        return cls.from_dict(record["layout"])

    def diff(self, other: "ParallelLayout", fields: Iterable[str] | None = None) -> list[str]:
        """One line per differing field, naming the flag: '--tensor-model-parallel-size (tp): 2 != 4'.
        ``fields`` restricts the comparison (e.g. SHARD_FIELDS when checking a checkpoint)."""
        names = list(fields) if fields is not None else [f.name for f in dataclasses.fields(self)]
        out = []
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if name == "expert_tensor_parallel_size":  # None and TP mean the same ("= TP", a change of TP says it)
                a, b = ("TP" if x.expert_tp == x.tp else x.expert_tp for x in (self, other))
            if a != b:
                out.append(f"{_FLAGS[name]} ({name}): {a!r} != {b!r}")
        return out

    def check_checkpoint(self, recorded: "ParallelLayout", where: str = "checkpoint") -> None:
        """Raise LayoutError if a checkpoint's recorded layout differs from this one in a shard field."""
        d = recorded.diff(self, SHARD_FIELDS)
        if d:
            raise LayoutError(f"{where} layout differs from the flags (recorded != requested):\n  " + "\n  ".join(d))

    # ------------------------------------------------------------------ argparse
    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any], prefix: str | None = None) -> "ParallelLayout":
        """Build from argparse results of the trainer (``tensor_model_parallel_size``...) or of a converter
        (``target_tensor_parallel_size`` / ``source_...``). ``prefix`` picks 'target'/'source' explicitly."""
        ns = dict(args) if isinstance(args, Mapping) else vars(args)

        def size(word: str, trainer_key: str) -> int:
            keys = [f"{prefix.rstrip('-_').replace('-', '_')}_{word}_parallel_size"] if prefix else \
                [trainer_key, f"target_{word}_parallel_size", f"source_{word}_parallel_size"]
            for k in keys:
                if ns.get(k) is not None:
                    return int(ns[k])
            return 1

        schedules = ns.get("schedules_method")
        if schedules not in (None, "", "dualpipev"):
            raise LayoutError(f"--schedules-method: only 'dualpipev' is known, got {schedules!r}")
        return cls(
            tp=size("tensor", "tensor_model_parallel_size"),
            pp=size("pipeline", "pipeline_model_parallel_size"),
            ep=size("expert", "expert_model_parallel_size"),
            expert_tensor_parallel_size=_etp(ns, prefix),
            vpp=ns.get("num_layers_per_virtual_pipeline_stage"),
            num_layer_list=ns.get("num_layer_list"),
            noop_layers=ns.get("noop_layers") or [],
            dualpipev=bool(ns.get("dualpipev")) or schedules == "dualpipev",
            num_layers=ns.get("num_layers"),
            mtp_num_layers=ns.get("mtp_num_layers"),
            first_k_dense_replace=ns.get("first_k_dense_replace"),
            num_experts=ns.get("num_experts"),
            moe_grouped_gemm=bool(ns.get("moe_grouped_gemm", False)),
            moe_tp_extend_ep=bool(ns.get("moe_tp_extend_ep", False)),
            make_vocab_size_divisible_by=int(ns.get("make_vocab_size_divisible_by") or 1),
            sequence_parallel=bool(ns.get("sequence_parallel", False)),
            cp=int(ns.get("context_parallel_size") or 1),
        )


def _etp(ns: Mapping[str, Any], prefix: str | None) -> int | None:
    keys = [f"{prefix.rstrip('-_').replace('-', '_')}_expert_tensor_parallel_size"] if prefix else \
        ["expert_tensor_parallel_size", "target_expert_tensor_parallel_size", "source_expert_tensor_parallel_size"]
    for k in keys:
        if ns.get(k) is not None:
            return int(ns[k])
    return None


LAYOUT_HELP = {
    "tp": "Tensor-parallel size: attention heads, dense/shared MLP, vocabulary and (unless --moe-tp-extend-ep) "
          "each expert are split over this many ranks. Default 1. Must match training.",
    "pp": "Pipeline-parallel size: decoder layers are split into this many stages. Default 1. Must match training.",
    "ep": "Expert-parallel size: routed experts are split over this many ranks; must divide the expert count. "
          "Default 1. Must match training.",
    "expert_tensor_parallel_size": "Tensor-parallel size inside each routed expert: 1 keeps every expert whole on "
                                   "its rank (MindSpeed-LLM's A2 template: TP4 EP32 with 1), or the tensor-parallel "
                                   "size. Default: the tensor-parallel size (as megatron). Must match training.",
    "vpp": "Layers per virtual pipeline stage (interleaved 1F1B): each rank holds num_layers/(pp*N) chunks. "
           "Cannot be used with --num-layer-list. Default None (off). Must match training.",
    "num_layer_list": "Comma-separated decoder layers per pipeline stage, e.g. 7,7,7,8,8,8,8,8; one entry per "
                      "stage, summing to --num-layers. Cannot be used with --noop-layers or VPP. Default None "
                      "(even split). Must match training.",
    "noop_layers": "Comma-separated global ids of placeholder (identity) layers added to even out the stages, "
                   "e.g. 61,62,63 with --num-layers 64. Cannot be used with --num-layer-list. Default none. "
                   "Must match training.",
    "schedules_method": "Pipeline schedule: 'dualpipev' puts virtual stages r and 2*pp-1-r on rank r (rank 0 holds "
                        "the embedding, the first and last layers, the output layer, the loss and MTP) and runs "
                        "DeepSeek's DualPipeV order. Needs --pipeline-model-parallel-size > 1, --num-layers "
                        "divisible by 2*pp (pad with --noop-layers), at least 2*pp micro-batches, no VPP, untied "
                        "embeddings. Default None (1F1B, or interleaved with VPP). Must match training.",
    "num_layers": "Decoder layers including --noop-layers, excluding MTP. Default: num_hidden_layers of config.json "
                  "plus the noop layers. Must match training.",
    "mtp_num_layers": "Multi-token-prediction layers kept (0 drops them); they live with the output layer. "
                      "Default: num_nextn_predict_layers of config.json. Must match training.",
    "first_k_dense_replace": "Leading layers (HF numbering) with a dense MLP instead of MoE. Default: config.json. "
                             "Must match training.",
    "num_experts": "Routed experts. Default: n_routed_experts of config.json. Must match training.",
    "moe_grouped_gemm": "Store each layer's local experts as one grouped weight (weight1/weight2) instead of "
                        "per-expert linears; training computes them with one grouped GEMM (cpu/cuda: "
                        "torch._grouped_mm, npu: npu_grouped_matmul). Default off. Must match training.",
    "moe_tp_extend_ep": "Split whole experts over TP*EP ranks instead of splitting each expert over TP. "
                        "Default off. Must match training.",
    "make_vocab_size_divisible_by": "Pad the vocabulary (embedding and output-layer rows) to a multiple of this "
                                    "times the tensor-parallel size, as Megatron does; the padded ids are never "
                                    "predicted (masked out of the loss) and export strips them. Default 1 (pad "
                                    "only what TP needs to split evenly). Must match training.",
    "sequence_parallel": "Split norms/dropout activations over TP along the sequence (required for MoE with "
                         "TP > 1). Default off. Training only; does not change the checkpoint.",
    "cp": "Context-parallel size: the sequence is split over this many ranks. Default 1. Training only; "
          "does not change the checkpoint.",
}


def add_layout_args(parser: argparse.ArgumentParser, prefix: str = "") -> argparse._ArgumentGroup:
    """Declare the layout flags on ``parser``. prefix '' gives the trainer's names
    (--tensor-model-parallel-size ...); 'target-' / 'source-' gives the converters' names
    (--target-tensor-parallel-size ...). Other flags are the same in both. Read back with from_args."""
    g = parser.add_argument_group("parallel layout")
    for name in ("tp", "pp", "ep"):
        g.add_argument(flag_name(name, prefix), type=int, default=1, help=LAYOUT_HELP[name])
    g.add_argument(flag_name("expert_tensor_parallel_size", prefix), type=int, default=None, metavar="N",
                   help=LAYOUT_HELP["expert_tensor_parallel_size"])
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N",
                   help=LAYOUT_HELP["vpp"])
    g.add_argument("--num-layer-list", type=str, default=None, metavar="N,N,...", help=LAYOUT_HELP["num_layer_list"])
    g.add_argument("--noop-layers", type=str, default=None, metavar="ID,ID,...", help=LAYOUT_HELP["noop_layers"])
    g.add_argument("--schedules-method", type=str, default=None, choices=["dualpipev"],
                   help=LAYOUT_HELP["schedules_method"])
    g.add_argument("--num-layers", type=int, default=None, help=LAYOUT_HELP["num_layers"])
    g.add_argument("--mtp-num-layers", type=int, default=None, help=LAYOUT_HELP["mtp_num_layers"])
    g.add_argument("--first-k-dense-replace", type=int, default=None, help=LAYOUT_HELP["first_k_dense_replace"])
    g.add_argument("--num-experts", type=int, default=None, help=LAYOUT_HELP["num_experts"])
    g.add_argument("--moe-grouped-gemm", action="store_true", help=LAYOUT_HELP["moe_grouped_gemm"])
    g.add_argument("--moe-tp-extend-ep", action="store_true", help=LAYOUT_HELP["moe_tp_extend_ep"])
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1, metavar="N",
                   help=LAYOUT_HELP["make_vocab_size_divisible_by"])
    g.add_argument("--sequence-parallel", action="store_true", help=LAYOUT_HELP["sequence_parallel"])
    g.add_argument("--context-parallel-size", type=int, default=1, help=LAYOUT_HELP["cp"])
    return g


__all__ = [
    "LAYOUT_FILE", "LayoutError", "ParallelLayout", "SHARD_FIELDS", "add_layout_args", "flag_name",
]
