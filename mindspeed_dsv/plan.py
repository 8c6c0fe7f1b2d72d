"""Dry-run planner: validate a layout against a DeepSeek-V3 or V4 config.json (V4's tensors: plan_deepseek4.py) and
print, per pipeline stage and chunk, the layers, parameter counts and an estimate of device memory, without
building the model.

    python -m mindspeed_dsv.plan --model-config assets/deepseek3_671b/config.json \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 8 --expert-model-parallel-size 16 \
        --num-layers 64 --noop-layers 61,62,63 --schedules-method dualpipev --moe-tp-extend-ep \
        --sequence-parallel --world-size 512 --micro-batch-size 1 --global-batch-size 3840 --seq-length 4096 \
        --bf16 --use-distributed-optimizer --recompute-granularity full --recompute-method block \
        --recompute-num-layers 8

Parameters are counted exactly from the config shapes, tensor by tensor from the conversion's name map
(models/names.py: the one place for shapes and split rules; MLA down
projections and norms replicated over TP, up/out projections, dense and shared MLP and vocabulary split over
TP, routed experts split over EP and, unless --moe-tp-extend-ep, each over TP). Memory is an estimate; the
formulas are written next to the code that applies them (``_layer_activation_elems``, ``_simulate``,
``_memory``) and in docs/en/layouts.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from mindspeed_dsv.models import names as nm
from mindspeed_dsv.models.config import DeepSeekConfig
from mindspeed_dsv.layout import LayoutError, ParallelLayout, add_layout_args

GiB = 1024 ** 3
# QLoRA NF4: 4-bit codes plus one fp32 absmax per 64-element block (bitsandbytes default block size,
# no double quantisation): 0.5 + 4/64 bytes per quantised weight element.
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64


class PlanError(LayoutError):
    """An invalid training flag (the message names it)."""


# --------------------------------------------------------------------------------------------- model shape
def model_shape(cfg: Any) -> DeepSeekConfig:
    """The model's shapes as the one DeepSeekConfig; errors name --model-config."""
    if isinstance(cfg, DeepSeekConfig):
        return cfg
    try:
        return DeepSeekConfig.from_hf(cfg)
    except (KeyError, ValueError) as e:
        raise PlanError(f"--model-config: {e}") from None


def load_model_config(path: str | os.PathLike) -> dict:
    """Read an HF config.json (a file, or a directory holding one)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.isfile(p):
        raise PlanError(f"--model-config: {p} does not exist")
    try:
        with open(p) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PlanError(f"--model-config: {p} is not valid JSON (line {e.lineno}: {e.msg})") from None


# --------------------------------------------------------------------------------------------- inventory
@dataclass(frozen=True)
class Tensor:
    """One parameter (or ``count`` identical ones, e.g. the routed experts of a layer).

    split: 'rep' replicated over TP; 'col' / 'row' / 'vocab' split over TP; 'expert_col' / 'expert_row'
    routed experts: split over EP (or TP*EP with --moe-tp-extend-ep) and then over the expert TP.
    """

    name: str
    shape: tuple[int, ...]
    split: str
    group: str  # mla | norm | dense_mlp | routed_experts | shared_experts | router | embedding | output | mtp
    count: int = 1
    linear: bool = False  # a LoRA / NF4 target (weight of a linear layer inside a layer)
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count

    def local_numel(self, layout: ParallelLayout) -> float:
        one = math.prod(self.shape)
        if self.split == "rep":
            return one * self.count
        if self.split in ("col", "row", "vocab"):
            return one * self.count / layout.tp
        local = self.count / (layout.ep * (layout.tp if layout.moe_tp_extend_ep else 1))
        return one * local / layout.expert_tp

    def local_one_numel(self, layout: ParallelLayout) -> float:
        """Elements of one of the `count` tensors on a device (one expert's shard, not all local experts)."""
        one = math.prod(self.shape)
        if self.split == "rep":
            return one
        if self.split in ("col", "row", "vocab"):
            return one / layout.tp
        return one / layout.expert_tp

    def local_lora_numel(self, layout: ParallelLayout, r: int) -> float:
        """LoRA A (r x in) and B (out x r) on this device: the side that the base weight splits is split too."""
        if not self.linear:
            return 0
        out_f, in_f = self.shape
        if self.split == "rep":
            return r * (in_f + out_f) * self.count
        if self.split == "col":
            return (r * in_f + r * out_f / layout.tp) * self.count
        if self.split == "row":
            return (r * in_f / layout.tp + r * out_f) * self.count
        local = self.count / (layout.ep * (layout.tp if layout.moe_tp_extend_ep else 1))
        etp = layout.expert_tp
        if self.split == "expert_col":
            return (r * in_f + r * out_f / etp) * local
        return (r * in_f / etp + r * out_f) * local


# The planner's split names for the name map's TP split rules (models/names.py, the one place for both).
_SPLIT = {nm.REPLICATED: "rep", nm.COLUMN: "col", nm.GLU: "col", nm.HEAD_PART: "col", nm.ROW: "row"}


def _group(name: str) -> str:
    if name.endswith("norm.weight"):
        return "norm"
    if "self_attention." in name:
        return "mla"
    if ".router." in name:
        return "router"
    if ".experts." in name:
        return "routed_experts"
    if ".shared_experts." in name:
        return "shared_experts"
    if name.startswith("mlp."):
        return "dense_mlp"
    return "mtp"


def _tensor(m: DeepSeekConfig, e: nm.TensorMap, prefix: str = "") -> Tensor:
    return Tensor(prefix + e.mcore[: -len(".weight")] if e.mcore.endswith(".weight") else prefix + e.mcore,
                  nm.full_shape(m, e), _SPLIT[e.split], _group(e.mcore), linear=e.lora_module is not None,
                  # A buffer in Megatron (updated by the load-balancing rule, not by the optimizer).
                  trainable=not e.mcore.endswith("router.expert_bias"))


def decoder_layer_tensors(m: DeepSeekConfig, dense: bool) -> list[Tensor]:
    """One decoder layer from the name map (names.whole_layer_maps): the same tensors, shapes and TP split rules
    as the rank files. Routed experts become one entry of `count` experts split over EP ('expert_col' /
    'expert_row': then over the expert TP like a column / row parallel linear)."""
    out, experts = [], {}
    for e in nm.whole_layer_maps(m, dense):
        if e.expert is None:
            out.append(_tensor(m, e))
            continue
        fc = e.mcore.rsplit(".", 2)[-2]  # linear_fc1 / linear_fc2
        if fc not in experts:
            experts[fc] = Tensor(f"mlp.experts.{fc}", nm.full_shape(m, e),
                                 "expert_col" if e.split == nm.GLU else "expert_row", "routed_experts", count=0,
                                 linear=e.lora_module is not None)
        experts[fc] = dataclasses.replace(experts[fc], count=experts[fc].count + 1)
    return out + list(experts.values())


def embedding_tensors(m: DeepSeekConfig, rows: tuple[int, int] | None = None) -> list[Tensor]:
    """`rows` (names.vocab_rows): the padded vocabulary the device holds; None: the HF rows."""
    e = nm.embedding_map(rows=rows)
    return [Tensor("embedding.word_embeddings", nm.full_shape(m, e), "vocab", "embedding")]


def output_tensors(m: DeepSeekConfig, rows: tuple[int, int] | None = None) -> list[Tensor]:
    out = [_tensor(m, nm.final_norm_map())]
    if not m.tie_word_embeddings:
        e = nm.output_map(rows=rows)
        out.append(Tensor("output_layer", nm.full_shape(m, e), "vocab", "output", linear=False))
    return out


def mtp_layer_tensors(m: DeepSeekConfig) -> list[Tensor]:
    """One MTP module: enorm, hnorm, eh_proj (2h -> h, column split), a full decoder layer, final norm.
    It shares the word embedding and output layer with the main model (Megatron; HF stores copies)."""
    before, after = nm.mtp_own_maps(m, 0)
    layer = decoder_layer_tensors(m, dense=not m.mtp_layer_is_moe)
    return ([dataclasses.replace(_tensor(m, e), name="mtp." + e.mcore.split(".", 3)[-1][: -len(".weight")])
             for e in before]
            + [dataclasses.replace(t, name="mtp." + t.name) for t in layer]
            + [dataclasses.replace(_tensor(m, after), name="mtp.final_layernorm")])


def activated_numel(tensors: list[Tensor], m: DeepSeekConfig) -> int:
    """Parameters one token touches: routed experts count top-k of n_routed_experts."""
    total = 0
    for t in tensors:
        if t.group == "routed_experts":
            total += math.prod(t.shape) * m.num_experts_per_tok
        else:
            total += t.numel
    return total


# --------------------------------------------------------------------------------------------- train args
@dataclass
class TrainArgs:
    """Training flags that change memory (Megatron/MindSpeed names)."""

    micro_batch_size: int = 1
    seq_length: int = 4096
    global_batch_size: int | None = None
    bf16: bool = True
    use_distributed_optimizer: bool = False
    recompute_granularity: str | None = None  # None | 'full' | 'selective'
    recompute_method: str | None = None  # 'uniform' | 'block'
    recompute_num_layers: int | None = None
    world_size: int | None = None
    lora_r: int | None = None
    qlora_nf4: bool = False
    device_memory_gb: float | None = None

    def validate(self) -> None:
        for name in ("micro_batch_size", "seq_length"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise PlanError(f"--recompute-granularity must be 'full' or 'selective', got {self.recompute_granularity!r}")
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                raise PlanError(f"--recompute-granularity full needs --recompute-method uniform|block, "
                                f"got {self.recompute_method!r}")
            if not self.recompute_num_layers or self.recompute_num_layers < 1:
                raise PlanError(f"--recompute-granularity full needs --recompute-num-layers >= 1, "
                                f"got {self.recompute_num_layers!r}")
        elif self.recompute_method is not None:
            raise PlanError(f"--recompute-method {self.recompute_method} needs --recompute-granularity full")
        if self.lora_r is not None and self.lora_r < 1:
            raise PlanError(f"--lora-r must be >= 1, got {self.lora_r}")
        if self.qlora_nf4 and not self.lora_r:
            raise PlanError("--qlora-nf4 needs --lora-r (QLoRA trains LoRA adapters on an NF4 base)")
        if self.world_size is not None and self.world_size < 1:
            raise PlanError(f"--world-size must be >= 1, got {self.world_size}")


# --------------------------------------------------------------------------------------------- plan
@dataclass
class ChunkPlan:
    pp_rank: int
    chunk: int
    virtual_stage: int
    layers: list[int]
    noop: list[int]
    dense: list[int]
    moe: list[int]
    hf_index: dict[int, int | None]
    embedding: bool
    output: bool
    mtp_layers: int
    params: int  # full (unsplit) parameters held by this (stage, chunk)
    params_per_device: int  # parameters on one device of this stage (after TP/EP splits)


@dataclass
class Memory:
    """Bytes per device."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class StagePlan:
    pp_rank: int
    chunks: list[ChunkPlan]
    params: int
    params_per_device: int
    trainable_per_device: int
    memory: Memory
    in_flight_microbatches: float


@dataclass
class Plan:
    layout: ParallelLayout
    model: Any  # DeepSeekConfig (V3) or DeepSeekV4Config
    train: TrainArgs
    world_size: int | None
    dp: int | None
    expert_dp: int | None
    num_microbatches: int | None
    total_params: int  # main model (embedding, decoder, final norm, output), the "671B"
    activated_params: int
    mtp_params: int  # MTP modules, sharing embedding and output with the main model
    hf_checkpoint_params: int  # what an HF checkpoint stores: main + MTP + MTP's own embed/head copies
    params_by_group: dict[str, int]
    stages: list[StagePlan]
    megatron_pp_layout: str | None
    warnings: list[str] = field(default_factory=list)
    schedules: list[ScheduleRow] = field(default_factory=list)  # 1F1B / VPP / dualpipev at this PP (pp > 1)

    @property
    def max_memory(self) -> float:
        return max(s.memory.total for s in self.stages)


def _layer_activation_elems(m: DeepSeekConfig, layout: ParallelLayout, train: TrainArgs, dense: bool) -> tuple[float, float]:
    """(elements kept for backward by one decoder layer for one micro-batch, extra fp32 bytes).

    T = micro_batch * seq_length / cp tokens; `sp` = TP if sequence parallel else 1 divides what lives in
    hidden size; `t` = TP divides per-head and per-intermediate tensors. Flash attention keeps no s x s
    scores. Counted tensors:
      attention: norm input, projection input (T*h/sp each); q down output and q norm output (T*q_lora
        each; the down projections are replicated over TP); kv down output (T*(kv_lora+rope)) and kv norm
        output (T*kv_lora); q, k (T*heads*(nope+rope)/t each), v and attention output (T*heads*v/t each).
      dense MLP: norm input, fc1 input (T*h/sp each), fc1 output (2*T*ffn/t), SwiGLU output (T*ffn/t).
      MoE: norm input, router/dispatch input (T*h/sp each); router logits and probs in fp32 (2*T*E/sp);
        R = top_k*T token copies reach the experts (top_k*T/t with --moe-tp-extend-ep, which spreads them
        over TP too); per copy: expert input and output (2h) plus fc1 and SwiGLU outputs (3*moe_ffn/etp);
        shared experts as a dense MLP of width moe_ffn*n_shared.
    """
    t = layout.tp
    sp = t if layout.sequence_parallel else 1
    T = train.micro_batch_size * train.seq_length / layout.cp
    h, nh = m.hidden_size, m.num_attention_heads
    qr = m.q_lora_rank or 0
    attn = (2 * T * h / sp + 2 * T * qr + T * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
            + T * nh * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim) / t)
    if dense:
        return attn + 2 * T * h / sp + 3 * T * m.intermediate_size / t, 0.0
    rows = m.num_experts_per_tok * T / (t if layout.moe_tp_extend_ep else 1)
    etp = layout.expert_tp
    shared = 2 * T * m.moe_intermediate_size * m.n_shared_experts / t + T * m.moe_intermediate_size * m.n_shared_experts / t
    mlp = 2 * T * h / sp + rows * (2 * h + 3 * m.moe_intermediate_size / etp) + shared
    router_bytes = 2 * T * m.n_routed_experts / sp * 4
    return attn + mlp, router_bytes


@dataclass
class ScheduleRow:
    """One pipeline schedule simulated for this layout's PP and micro-batches (mindspeed_dsv.pipeline_order)."""

    name: str
    bubble: float  # idle fraction of the ranks' time
    peak_in_flight: list[float]  # per rank, micro-batches whose activations it holds at its peak (rank units)
    current: bool = False  # the schedule of the planned layout


def _simulate(layout: ParallelLayout, num_microbatches: int, fb_overlap: bool = False):
    """Play the op order the trainer runs for this layout (megatron's 1F1B / interleaved, our dualpipev; with
    `fb_overlap` dualpipev's paired forward+backward slots of --moe-fb-overlap) against its data dependencies.
    Forward time of a virtual stage = its real (non-noop) layers, backward = 2x."""
    from mindspeed_dsv import pipeline_order as po

    pp, chunks, m = layout.pp, layout.num_model_chunks, num_microbatches
    if layout.dualpipev:
        orders = [po.dualpipev_slots(pp, r, m, overlap=fb_overlap) for r in range(pp)]
    elif chunks > 1:
        orders = [po.interleaved_order(pp, r, m, chunks) for r in range(pp)]
    else:
        orders = [po.one_f_one_b_order(pp, r, m) for r in range(pp)]
    real = [0] * layout.num_virtual_stages
    for r in range(pp):
        for c in range(chunks):
            real[layout._virtual_stage(r, c)] = sum(not layout.is_noop(i) for i in layout.stage_layers(r, c))
    return po.simulate(orders, layout._virtual_stage, layout.num_virtual_stages,
                       lambda kind, v: real[v] * (1.0 if kind == "F" else 2.0))


def _sim_microbatches(layout: ParallelLayout, num_microbatches: int | None) -> int:
    """The plan's micro-batches, or (no --global-batch-size) 4*pp: a multiple of pp and >= 2*pp, as every
    schedule needs, and enough for the in-flight peak, which stops growing after the warm-up."""
    return num_microbatches if num_microbatches is not None else 4 * layout.pp


def schedule_table(layout: ParallelLayout, num_microbatches: int | None) -> list[ScheduleRow]:
    """1F1B, interleaved 1F1B with 2 chunks per rank, and dualpipev for this layout's layers, PP and
    micro-batches, each where its constraints hold (layers divisible, micro-batches enough); the layout's own
    schedule is added if it is none of these (VPP with more chunks)."""
    from mindspeed_dsv.pipeline_order import ScheduleError

    m = _sim_microbatches(layout, num_microbatches)
    base = dataclasses.replace(layout, vpp=None, dualpipev=False, noop_layers=list(layout.noop_layers))
    variants = [("1F1B", base)]
    if layout.num_layer_list is None and layout.num_layers % (2 * layout.pp) == 0:
        variants += [("interleaved 1F1B, 2 chunks", dataclasses.replace(base, vpp=layout.num_layers // (2 * layout.pp))),
                     ("dualpipev", dataclasses.replace(base, dualpipev=True))]
    if all(lay != layout for _, lay in variants):
        variants.append((f"interleaved 1F1B, {layout.num_model_chunks} chunks", layout))
    rows = []
    for name, lay in variants:
        try:
            lay.validate()
            sims = [(name, _simulate(lay, m), lay == layout)]
            if lay.dualpipev:
                # --moe-fb-overlap pairs slots; communication is free in the simulation, so this row shows what
                # pairing costs in bubble, not the all-to-all time it hides
                sims.append(("dualpipev + --moe-fb-overlap", _simulate(lay, m, fb_overlap=True), False))
        except (LayoutError, ScheduleError):
            continue
        rows += [ScheduleRow(n, sim.bubble, sim.peak_in_flight, current=cur) for n, sim, cur in sims]
    return rows


@dataclass(frozen=True)
class Inventory:
    """What the planner needs of one model family (DeepSeek-V3 here, V4 in plan_deepseek4.py). Layers are
    numbered as in the HF checkpoint; `dense` is the layout's first-k-dense rule (V4 has no dense layers)."""

    model: Any  # the family's config dataclass
    cfg_view: dict  # the config.json fields the layout takes defaults from and is checked against
    vocab_size: int
    stream_width: int  # elements per token passed between layers (V3: hidden; V4: hc_mult * hidden)
    num_hidden_layers: int
    first_k_dense_replace: int
    num_nextn_predict_layers: int
    layer_tensors: Callable[[int, bool], list[Tensor]]
    layer_activation: Callable[[int, bool, ParallelLayout, TrainArgs], tuple[float, float]]
    embedding: Callable[[tuple[int, int] | None], list[Tensor]]
    output: Callable[[tuple[int, int] | None], list[Tensor]]
    mtp: Callable[[], list[Tensor]]
    mtp_activation: Callable[[ParallelLayout, TrainArgs], tuple[float, float]]
    numel: Callable[[list[Tensor]], int]
    activated: Callable[[list[Tensor]], int]
    hf_params_per_mtp_copy: int  # what an HF checkpoint stores per MTP module besides the module itself
    tp_refusal: str | None = None  # why the family cannot split over TP (None: it can)


def deepseek3_inventory(m: DeepSeekConfig) -> Inventory:
    dense_t, moe_t = decoder_layer_tensors(m, dense=True), decoder_layer_tensors(m, dense=False)
    return Inventory(
        model=m, cfg_view={k: getattr(m, k) for k in m.__dataclass_fields__ if k not in ("rope", "extra")},
        vocab_size=m.vocab_size, stream_width=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
        first_k_dense_replace=m.first_k_dense_replace, num_nextn_predict_layers=m.num_nextn_predict_layers,
        layer_tensors=lambda i, dense: dense_t if dense else moe_t,
        layer_activation=lambda i, dense, layout, train: _layer_activation_elems(m, layout, train, dense),
        embedding=lambda rows: embedding_tensors(m, rows), output=lambda rows: output_tensors(m, rows),
        mtp=lambda: mtp_layer_tensors(m),
        mtp_activation=lambda layout, train: _layer_activation_elems(m, layout, train, not m.mtp_layer_is_moe),
        numel=lambda ts: sum(t.numel for t in ts), activated=lambda ts: activated_numel(ts, m),
        # HF checkpoints store every MTP module with its own embed_tokens and shared_head.head.
        hf_params_per_mtp_copy=2 * m.vocab_size * m.hidden_size)


def inventory(model_cfg: Any) -> Inventory:
    """The family's inventory for an HF config dict (models/family.py decides the family) or a config object."""
    from mindspeed_dsv.models.deepseek4.config import DeepSeekV4Config

    if isinstance(model_cfg, dict):
        from mindspeed_dsv.models.family import DEEPSEEK4, family_of

        try:
            is_v4 = family_of(model_cfg) == DEEPSEEK4
        except ValueError as e:
            raise PlanError(f"--model-config: {e}") from None
        if is_v4:
            try:
                model_cfg = DeepSeekV4Config.from_hf(model_cfg)
            except (KeyError, ValueError) as e:
                raise PlanError(f"--model-config: {e}") from None
    if isinstance(model_cfg, DeepSeekV4Config):
        from mindspeed_dsv.plan_deepseek4 import deepseek4_inventory

        return deepseek4_inventory(model_cfg)
    return deepseek3_inventory(model_shape(model_cfg))


def make_plan(model_cfg: Any, layout: ParallelLayout, train_args: TrainArgs | None = None) -> Plan:
    """Validate ``layout`` (filled with config.json defaults) and ``train_args`` and compute the plan.
    Raises LayoutError/PlanError naming the flag. Builds nothing."""
    train = train_args or TrainArgs()
    inv = inventory(model_cfg)
    cfg_view = inv.cfg_view
    layout = layout.with_model_defaults(cfg_view)
    if layout.tp > 1 and inv.tp_refusal:
        raise PlanError(f"--tensor-model-parallel-size {layout.tp}: {inv.tp_refusal}")
    layout.validate_against(cfg_view)
    train.validate()
    layout.validate_runtime(world_size=train.world_size, seq_length=train.seq_length)
    warnings: list[str] = []

    dp = layout.data_parallel_size(train.world_size) if train.world_size else None
    edp = layout.expert_data_parallel_size(train.world_size) if train.world_size else None
    num_mb = None
    if train.global_batch_size is not None:
        if dp is None:
            raise PlanError("--global-batch-size needs --world-size (or --nnodes and --nproc-per-node)")
        if train.global_batch_size % (train.micro_batch_size * dp) != 0:
            raise PlanError(f"--global-batch-size {train.global_batch_size} must be divisible by "
                            f"--micro-batch-size * DP = {train.micro_batch_size} * {dp}")
        num_mb = train.global_batch_size // (train.micro_batch_size * dp)
        if layout.num_model_chunks > 1 and not layout.dualpipev and num_mb % layout.pp != 0:
            raise PlanError(f"interleaved pipeline ({'--num-layers-per-virtual-pipeline-stage'}) needs the number of "
                            f"micro-batches ({num_mb}) divisible by --pipeline-model-parallel-size {layout.pp}")
        if num_mb < layout.pp:
            warnings.append(f"only {num_mb} micro-batches for {layout.pp} pipeline stages: the pipeline never fills")
    if layout.pp > 1:
        from mindspeed_dsv.pipeline_order import ScheduleError

        try:
            sim = _simulate(layout, _sim_microbatches(layout, num_mb))
        except ScheduleError as err:
            raise PlanError(str(err)) from None
        in_flight = sim.peak_in_flight
    else:
        in_flight = [1.0]
    if layout.first_k_dense_replace < inv.first_k_dense_replace:
        warnings.append(f"--first-k-dense-replace {layout.first_k_dense_replace} < config's "
                        f"{inv.first_k_dense_replace}: dense layers of the checkpoint will not fit this model")

    mtp_layers = layout.mtp_num_layers or 0
    layer_t = lru_cache(maxsize=None)(inv.layer_tensors)
    layer_act = lru_cache(maxsize=None)(lambda i, dense: inv.layer_activation(i, dense, layout, train))
    emb_t, out_t = inv.embedding(None), inv.output(None)  # model counts: the HF vocabulary
    # What the devices hold: --make-vocab-size-divisible-by pads the vocabulary rows (zeros, never predicted).
    padded_rows = layout.padded_vocab_size(inv.vocab_size)
    padded = None if padded_rows == inv.vocab_size else (inv.vocab_size, padded_rows)
    emb_dev, out_dev = inv.embedding(padded), inv.output(padded)
    mtp_t = [inv.mtp() for _ in range(mtp_layers)]

    numel = inv.numel
    def local(ts): return sum(t.local_numel(layout) for t in ts)

    # Whole-model counts (HF numbering; noop layers have no parameters).
    real_dense = min(layout.first_k_dense_replace, inv.num_hidden_layers)
    hf_layers = [layer_t(i, i < real_dense) for i in range(inv.num_hidden_layers)]
    total = numel(emb_t) + numel(out_t) + sum(numel(ts) for ts in hf_layers)
    activated = inv.activated(emb_t) + inv.activated(out_t) + sum(inv.activated(ts) for ts in hf_layers)
    mtp_total = sum(numel(ts) for ts in mtp_t)
    n_hf_mtp = inv.num_nextn_predict_layers
    hf_total = total + n_hf_mtp * (numel(inv.mtp()) + inv.hf_params_per_mtp_copy)
    groups: dict[str, int] = {}
    for ts in [emb_t, out_t] + hf_layers:
        for t in ts:
            groups[t.group] = groups.get(t.group, 0) + numel([t])
    groups["mtp"] = mtp_total

    # Per stage and chunk.
    lora_r = train.lora_r
    stages: list[StagePlan] = []
    for r in range(layout.pp):
        chunks: list[ChunkPlan] = []
        stage_tensors: list[Tensor] = []
        per_chunk_layer_acts: list[list[tuple[float, float]]] = []
        holds_embedding = any(layout.has_embedding(r, c) for c in range(layout.num_model_chunks))
        for c in range(layout.num_model_chunks):
            ids = layout.stage_layers(r, c)
            noop = [i for i in ids if layout.is_noop(i)]
            dense = [i for i in ids if not layout.is_noop(i) and layout.is_dense(i)]
            moe = [i for i in ids if not layout.is_noop(i) and not layout.is_dense(i)]
            ts: list[Tensor] = []
            for i in ids:
                if not layout.is_noop(i):
                    ts += layer_t(layout.hf_layer_index(i), i in dense)
            if layout.has_embedding(r, c):
                ts += emb_dev
            if layout.has_output(r, c):
                ts += out_dev
            if layout.has_mtp(r, c):
                for one in mtp_t:
                    ts += one
                if not holds_embedding:
                    # Megatron keeps a copy of the word embedding next to MTP when it is on another stage.
                    ts += [dataclasses.replace(emb_dev[0], name="mtp.embedding_replica")]
            stage_tensors += ts
            chunks.append(ChunkPlan(
                pp_rank=r, chunk=c, virtual_stage=layout._virtual_stage(r, c), layers=ids, noop=noop, dense=dense,
                moe=moe, hf_index={i: layout.hf_layer_index(i) for i in ids}, embedding=layout.has_embedding(r, c),
                output=layout.has_output(r, c), mtp_layers=mtp_layers if layout.has_mtp(r, c) else 0,
                params=int(numel([t for t in ts if t.name != "mtp.embedding_replica"])),
                params_per_device=int(round(local(ts)))))
            per_chunk_layer_acts.append(
                [layer_act(layout.hf_layer_index(i), i in dense) for i in ids if not layout.is_noop(i)])

        # ---- memory
        w_bytes = 2 if train.bf16 else 4
        if train.qlora_nf4:
            # Only what training quantizes is NF4: the LoRA-targeted linears (every one, as --lora-r assumes).
            # Embedding, output layer, norms, router and MTP's eh_proj stay in the training dtype. Each QLoRA
            # linear dequantizes its weight only while it computes (forward, and again in the backward), so one
            # layer's dequantized weight is alive at a time: the largest one is added.
            weights = sum(t.local_numel(layout) * (NF4_BYTES_PER_PARAM if t.linear else w_bytes)
                          for t in stage_tensors)
            weights += max((t.local_one_numel(layout) for t in stage_tensors if t.linear), default=0) * w_bytes
        else:
            weights = local(stage_tensors) * w_bytes
        if lora_r:
            lora_local = sum(t.local_lora_numel(layout, lora_r) for t in stage_tensors)
            weights += lora_local * w_bytes
            dense_train, expert_train = lora_local, 0.0  # adapters are small: treat as non-expert
        else:
            dense_train = sum(t.local_numel(layout) for t in stage_tensors
                              if t.trainable and not t.split.startswith("expert"))
            expert_train = sum(t.local_numel(layout) for t in stage_tensors
                               if t.trainable and t.split.startswith("expert"))
        trainable = dense_train + expert_train
        # Mixed precision (Megatron): fp32 main grads (4 B); Adam keeps fp32 master weights + m + v (12 B),
        # or m + v only (8 B) when the model itself is fp32. The distributed optimizer shards those states over
        # DP*CP for dense parameters and over the expert-data-parallel group for expert parameters.
        grads = trainable * 4
        opt_b = 12 if train.bf16 else 8
        if train.use_distributed_optimizer and dp:
            optimizer = dense_train * opt_b / (dp * layout.cp) + expert_train * opt_b / edp
        else:
            optimizer = trainable * opt_b
        activations = _activations(inv, layout, train, per_chunk_layer_acts, chunks, in_flight[r])
        memory = Memory(weights=weights, grads=grads, optimizer=optimizer, activations=activations)
        stages.append(StagePlan(pp_rank=r, chunks=chunks, params=sum(ch.params for ch in chunks),
                                params_per_device=int(round(local(stage_tensors))),
                                trainable_per_device=int(round(trainable)), memory=memory,
                                in_flight_microbatches=in_flight[r]))

    if train.device_memory_gb:
        over = [s.pp_rank for s in stages if s.memory.total > train.device_memory_gb * GiB]
        if over:
            warnings.append(f"estimated memory exceeds --device-memory-gb {train.device_memory_gb} on pipeline "
                            f"stage(s) {over}")
    try:
        mpl = None if layout.dualpipev else layout.to_megatron_pp_layout_str()
    except LayoutError:
        mpl = None
    return Plan(layout=layout, model=inv.model, train=train, world_size=train.world_size, dp=dp, expert_dp=edp,
                num_microbatches=num_mb, total_params=int(total), activated_params=int(activated),
                mtp_params=int(mtp_total), hf_checkpoint_params=int(hf_total), params_by_group=groups,
                stages=stages, megatron_pp_layout=mpl, warnings=warnings,
                schedules=schedule_table(layout, num_mb) if layout.pp > 1 else [])


def _activations(inv: Inventory, layout, train, per_chunk_layer_acts, chunks, in_flight: float) -> float:
    """Activation bytes on pipeline rank r at its peak.

    Per micro-batch, each real layer keeps its `_layer_activation_elems` (bf16: 2 bytes each, fp32 router
    extra), except layers recomputed under --recompute-granularity full, which keep only their input
    (T*h/sp). uniform: the rank's layers form groups of N, each keeps its input; block: the first N layers
    of each chunk keep only their input. That per-micro-batch total is multiplied by `in_flight`, the rank's
    peak of micro-batches held, from the simulation of its schedule (`_simulate`). Then
    added once: the recompute working set (one group / one layer re-run in full), and on the output
    stage the fp32 logits (T*vocab/t*4 bytes, plus one set per MTP layer) and the MTP layers' own
    activations. 'selective' recompute is counted like none (flash attention already keeps no scores).
    """
    a_bytes = 2 if train.bf16 else 4
    sp = layout.tp if layout.sequence_parallel else 1
    T = train.micro_batch_size * train.seq_length / layout.cp
    layer_input = T * inv.stream_width / sp * a_bytes
    per_mb = 0.0
    working = 0.0
    full = train.recompute_granularity == "full"
    N = train.recompute_num_layers or 0
    for acts in per_chunk_layer_acts:
        full_bytes = [e * a_bytes + extra for e, extra in acts]
        if not full or not acts:
            per_mb += sum(full_bytes)
        elif train.recompute_method == "uniform":
            groups = math.ceil(len(acts) / N)
            per_mb += groups * layer_input
            working = max(working, max(sum(full_bytes[i:i + N]) for i in range(0, len(full_bytes), N)))
        else:  # block
            k = min(N, len(acts))
            per_mb += k * layer_input + sum(full_bytes[k:])
            if k:
                working = max(working, max(full_bytes[:k]))
    total = per_mb * in_flight + working
    if any(ch.output for ch in chunks):
        logits = T * layout.padded_vocab_size(inv.vocab_size) / layout.tp * 4
        mtp = layout.mtp_num_layers or 0
        mtp_layer, mtp_extra = inv.mtp_activation(layout, train)
        total += logits * (1 + mtp) + mtp * (mtp_layer * a_bytes + mtp_extra + 3 * layer_input)
    if any(ch.embedding for ch in chunks):
        total += layer_input
    return total


# --------------------------------------------------------------------------------------------- printing
def _runs(ids: list[int], kind) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for i in ids:
        k = kind(i)
        if out and out[-1][0] == k and out[-1][2] == i - 1:
            out[-1] = (k, out[-1][1], i)
        else:
            out.append((k, i, i))
    return out


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _describe_chunk(layout: ParallelLayout, ch: ChunkPlan) -> str:
    def kind(i):
        return "noop" if layout.is_noop(i) else ("dense" if layout.is_dense(i) else "moe")
    parts = []
    if ch.embedding:
        parts.append("[embedding]")
    for k, a, b in _runs(ch.layers, kind):
        ids = f"{a}" if a == b else f"{a}-{b}"
        if k != "noop":
            ha, hb = layout.hf_layer_index(a), layout.hf_layer_index(b)
            if (ha, hb) != (a, b):
                ids += f" (hf {ha}" + ("" if ha == hb else f"-{hb}") + ")"
        parts.append(f"{ids} {k}")
    if ch.output:
        parts.append("[final-norm+output]")
    if ch.mtp_layers:
        parts.append(f"[mtp x{ch.mtp_layers}]")
    return ", ".join(parts) if parts else "(empty)"


def format_plan(plan: Plan) -> str:
    L, tr = plan.layout, plan.train
    lines = []
    sched = "dualpipev" if L.dualpipev else (f"interleaved VPP, {L.num_model_chunks} chunks of {L.vpp} layers"
                                            if L.vpp else "1F1B")
    lines.append(f"layout: TP {L.tp}  PP {L.pp}  EP {L.ep}  CP {L.cp}  schedule {sched}"
                 f"{'  moe-tp-extend-ep' if L.moe_tp_extend_ep else ''}{'  sequence-parallel' if L.sequence_parallel else ''}"
                 f"{'  grouped-gemm' if L.moe_grouped_gemm else ''}")
    lines.append(f"layers: {L.num_layers} decoder (noop {','.join(map(str, L.noop_layers)) or 'none'}), "
                 f"first {L.first_k_dense_replace} dense, MTP {L.mtp_num_layers}, "
                 f"{L.num_experts} routed experts, {L.num_local_experts()} per device")
    if plan.world_size:
        lines.append(f"world {plan.world_size}: DP {plan.dp}, expert-DP {plan.expert_dp}"
                     + (f", {plan.num_microbatches} micro-batches of {tr.micro_batch_size} x {tr.seq_length} tokens"
                        if plan.num_microbatches else ""))
    if plan.megatron_pp_layout:
        s = plan.megatron_pp_layout
        lines.append(f"megatron pipeline_model_parallel_layout: {s if len(s) < 140 else s[:137] + '...'}")
    lines.append("")
    lines.append(f"parameters: {_fmt_count(plan.total_params)} main model ({plan.total_params:,}), "
                 f"{_fmt_count(plan.activated_params)} activated per token; MTP +{_fmt_count(plan.mtp_params)}; "
                 f"HF checkpoint {_fmt_count(plan.hf_checkpoint_params)}")
    lines.append("  by group: " + ", ".join(f"{k} {_fmt_count(v)}" for k, v in plan.params_by_group.items()))
    lines.append("")
    for s in plan.stages:
        for ch in s.chunks:
            tag = f"stage {s.pp_rank}" + (f" chunk {ch.chunk} (virtual stage {ch.virtual_stage})"
                                          if L.num_model_chunks > 1 else "")
            lines.append(f"{tag}: {_describe_chunk(L, ch)}")
            lines.append(f"    params {_fmt_count(ch.params)} in stage, {_fmt_count(ch.params_per_device)} per device")
        mem = s.memory
        lines.append(f"  stage {s.pp_rank} per device: {_fmt_count(s.params_per_device)} params "
                     f"({_fmt_count(s.trainable_per_device)} trainable); memory GiB: weights {mem.weights / GiB:.1f}, "
                     f"grads {mem.grads / GiB:.1f}, optimizer {mem.optimizer / GiB:.1f}, activations "
                     f"{mem.activations / GiB:.1f} ({s.in_flight_microbatches:g} micro-batches in flight), "
                     f"total {mem.total / GiB:.1f}")
    if plan.schedules:
        m = _sim_microbatches(L, plan.num_microbatches)
        lines.append("")
        lines.append(f"pipeline schedules at PP {L.pp}, {m} micro-batches (simulated op order; forward = real layers "
                     "of a stage, backward = 2x, communication free):")
        for row in plan.schedules:
            peaks = " ".join(f"{p:g}" for p in row.peak_in_flight)
            mark = "  <- this layout" if row.current else ""
            lines.append(f"  {row.name:<28} bubble {100 * row.bubble:5.1f}%   peak in-flight micro-batches per "
                         f"rank: {peaks}{mark}")
    lines.append("")
    lines.append(f"peak estimated memory per device: {plan.max_memory / GiB:.1f} GiB "
                 "(excludes communication buffers, allocator fragmentation and framework workspace)")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mindspeed_dsv.plan",
        allow_abbrev=False,  # a mistyped flag must fail, not silently match a longer one
        description="Dry-run plan of a DeepSeek-V3 or V4 training layout: validates the flags against config.json and "
                    "prints per-stage layers, parameter counts and estimated memory per device. Allocates nothing.")
    p.add_argument("--model-config", required=True,
                   help="HF config.json (or the directory holding it) of the model, e.g. assets/deepseek3_671b.")
    add_layout_args(p)
    g = p.add_argument_group("training (memory)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="Sequences per micro-batch per device. Default 1.")
    g.add_argument("--seq-length", type=int, default=4096, help="Tokens per sequence. Default 4096.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Sequences per optimizer step over all DP ranks; sets the number of micro-batches. "
                        "Needs the world size.")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="bf16", action="store_true", default=True,
                      help="bf16 weights and activations with fp32 grads and Adam states (default).")
    prec.add_argument("--fp32", dest="bf16", action="store_false", help="Plan for fp32 training instead of bf16.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard fp32 master weights and Adam states over the data-parallel ranks (ZeRO-1).")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="Activation recomputation: 'full' keeps only layer inputs for the chosen layers; "
                        "'selective' recomputes core attention (counted like none: flash attention keeps no scores).")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="With full recompute: 'uniform' groups the layers of a rank in blocks of "
                        "--recompute-num-layers and keeps each block's input; 'block' recomputes the first "
                        "--recompute-num-layers layers of each chunk.")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="N for --recompute-method.")
    g.add_argument("--world-size", type=int, default=None, help="Total devices. Or give --nnodes and --nproc-per-node.")
    g.add_argument("--nnodes", type=int, default=None, help="Nodes (world size = nnodes * nproc-per-node).")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="Devices per node: 8 on A2 and 8xH100, 16 on A3.")
    g.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank: only adapters on every attention/MLP/expert linear are trained.")
    g.add_argument("--qlora-nf4", action="store_true",
                   help="QLoRA: base linear weights stored as NF4 (4-bit); needs --lora-r.")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="Warn when a stage's estimate exceeds this (64 for Ascend 910B/A3 dies, 80 for H100).")
    return p


def train_args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    world = ns.world_size
    if ns.nnodes is not None or ns.nproc_per_node is not None:
        if ns.nnodes is None or ns.nproc_per_node is None:
            raise PlanError("--nnodes and --nproc-per-node go together")
        w = ns.nnodes * ns.nproc_per_node
        if world is not None and world != w:
            raise PlanError(f"--world-size {world} differs from --nnodes * --nproc-per-node = {w}")
        world = w
    return TrainArgs(micro_batch_size=ns.micro_batch_size, seq_length=ns.seq_length,
                     global_batch_size=ns.global_batch_size, bf16=ns.bf16,
                     use_distributed_optimizer=ns.use_distributed_optimizer,
                     recompute_granularity=ns.recompute_granularity, recompute_method=ns.recompute_method,
                     recompute_num_layers=ns.recompute_num_layers, world_size=world, lora_r=ns.lora_r,
                     qlora_nf4=ns.qlora_nf4, device_memory_gb=ns.device_memory_gb)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)  # unknown flags: argparse names them and exits 2
    try:
        cfg = load_model_config(ns.model_config)
        layout = ParallelLayout.from_args(ns)
        plan = make_plan(cfg, layout, train_args_from_namespace(ns))
    except LayoutError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
