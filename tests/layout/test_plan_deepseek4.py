"""The planner on DeepSeek-V4: every tensor shape against transformers' DeepseekV4ForCausalLM (through the V4 name
map), the V4-Flash totals, a stage plan, and the V4 FLOPs against the same inventory."""

import math
import os

import pytest
import torch

from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models.deepseek4 import names as nm4
from mindspeed_dsv.models.deepseek4.config import DeepSeekV4Config
from mindspeed_dsv.models.family import model_config, read_hf_config
from mindspeed_dsv.models.names import GLU, REPLICATED
from mindspeed_dsv.plan import TrainArgs, make_plan
from mindspeed_dsv import plan_deepseek4 as p4
from mindspeed_dsv.training.flops import v4_forward_flops_per_token
from tests.model.deepseek4_reference import tiny_v4_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLASH = os.path.join(ROOT, "assets", "deepseek4_flash")


def _planner_shapes(cfg: DeepSeekV4Config) -> dict:
    """Our state-dict name -> shape, from the planner's inventory (routed experts expanded)."""
    out = {}
    for t in p4.embedding_tensors(cfg) + p4.output_tensors(cfg):
        out[t.name + (".weight" if t.name in ("embedding", "output_layer") else "")] = t.shape
    for i in range(cfg.num_hidden_layers):
        for t in p4.hf_layer_tensors(cfg, i):
            if t.group == "routed_experts":
                fc = t.name.rsplit(".", 1)[-1]
                for e in range(t.count):
                    out[f"layers.{i}.mlp.experts.local_experts.{e}.{fc}.weight"] = t.shape
            else:
                out[f"layers.{i}.{t.name}"] = t.shape
    return out


def test_tiny_shapes_equal_transformers():
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf_cfg = tiny_v4_config()
    with torch.device("meta"):
        hf = DeepseekV4ForCausalLM(DeepseekV4Config(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    hf_shapes = {n: tuple(t.shape) for n, t in list(hf.named_parameters()) + list(hf.named_buffers())}
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    want = {}
    for m in nm4.model_maps(cfg):
        shapes = [hf_shapes[h] for h in m.hf]
        if m.split == REPLICATED:
            want[m.mcore] = shapes[0]
        elif m.split == GLU:  # gate rows then up rows
            want[m.mcore] = (shapes[0][0] + shapes[1][0], shapes[0][1])
        else:  # EXPERT_SLICE: one expert of the stacked tensor
            want[m.mcore] = shapes[0][1:]
    assert _planner_shapes(cfg) == want


def test_flash_totals_and_a3_plan():
    plan = make_plan(read_hf_config(FLASH),
                     ParallelLayout(tp=1, pp=4, ep=64, num_layer_list=[11, 11, 11, 10]),
                     TrainArgs(world_size=256, global_batch_size=1024, use_distributed_optimizer=True,
                               recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    # transformers' DeepseekV4ForCausalLM on the meta device holds 284,332,230,231 parameters; its 40 learned-
    # routing layers keep e_score_correction_bias (256 each) as a buffer, which we count (router.expert_bias).
    assert plan.total_params == 284_332_230_231 + 40 * 256
    assert round(plan.activated_params / 1e9, 2) == 13.80
    assert [len(ch.layers) for s in plan.stages for ch in s.chunks] == [11, 11, 11, 10]
    assert plan.stages[-1].chunks[-1].mtp_layers == 1 and plan.stages[0].chunks[0].embedding
    # per device: everything but the routed experts, plus 256/64 = 4 experts of each layer
    cfg = plan.model
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    s1 = plan.stages[1]
    dense_part = s1.params - 11 * 256 * expert
    assert s1.params_per_device == dense_part + 11 * 4 * expert
    assert 0 < plan.max_memory / 2**30 < 64


def test_flash_refuses_tp(capsys):
    from mindspeed_dsv.plan import main

    assert main(["--model-config", FLASH, "--tensor-model-parallel-size", "2"]) == 2
    assert "--tensor-model-parallel-size 2: DeepSeek-V4 runs at TP 1" in capsys.readouterr().err


def test_v4_flops_linear_part_is_twice_the_activated_weights():
    """At seq_length 1 a query attends to itself only: the FLOPs are 2x every activated weight matrix (experts:
    top-k of them), plus the key and stream-mixing terms written out here."""
    cfg = model_config(FLASH)
    D, N, H, d = cfg.hidden_size, cfg.hc_mult, cfg.num_attention_heads, cfg.head_dim

    def matmul_weights(ts):
        return sum(math.prod(t.shape) * (cfg.num_experts_per_tok if t.group == "routed_experts" else t.count)
                   for t in ts if len(t.shape) == 2 and t.group != "embedding"
                   and not t.name.endswith(("position_bias", "tid2eid")))

    layers = [p4.hf_layer_tensors(cfg, i) for i in range(cfg.num_hidden_layers)]
    per_layer_extra = 2 * (2 * N * N * D + 4 * N * D) + 4 * H * d * 1
    want = (2 * (sum(matmul_weights(ts) for ts in layers) + matmul_weights(p4.output_tensors(cfg)))
            + cfg.num_hidden_layers * per_layer_extra + 2 * N * D)
    assert v4_forward_flops_per_token(cfg, 1) == pytest.approx(want, rel=1e-12)
    want_mtp = 2 * matmul_weights(p4.mtp_tensors(cfg)) + per_layer_extra + 2 * N * D + 2 * D * cfg.vocab_size
    assert v4_forward_flops_per_token(cfg, 1, 1) - v4_forward_flops_per_token(cfg, 1) == pytest.approx(want_mtp)
