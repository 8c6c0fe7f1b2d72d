"""One place per model fact. The MTP layer's dense/MoE kind (DeepSeekConfig.mtp_layer_is_moe): the name map, the
planner and the FLOP count agree with it, for DeepSeek-V3's MoE MTP and for a model whose last decoder layer is
dense. Tensor shapes and TP split rules (models/names.py): the planner prices exactly the rank files' tensors."""

import pytest

from mindspeed_dsv import plan
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import DeepSeekConfig
from mindspeed_dsv.models import names as nm
from mindspeed_dsv.training.flops import attention_flops_per_token, forward_flops_per_token
from tests.model.hf_reference import tiny_hf_config


@pytest.mark.parametrize("first_k_dense,moe", [(1, True), (4, False)])  # the tiny model has 4 decoder layers
def test_every_consumer_agrees_on_the_mtp_kind(first_k_dense, moe):
    hf = tiny_hf_config(first_k_dense_replace=first_k_dense, num_nextn_predict_layers=1)
    cfg = DeepSeekConfig.from_hf(hf)
    assert cfg.mtp_layer_is_moe is moe
    assert cfg.mtp_layer_is_moe == bool(cfg.moe_layer_pattern[-1])  # megatron builds MTP from the last layer's spec

    layout = ParallelLayout(mtp_num_layers=1).with_model_defaults(cfg)
    mtp = [m.mcore for m in nm.rank_maps(hf, layout, 0, 0, 0) if m.mcore.startswith("mtp.")]
    assert any(".mlp.router.weight" in k for k in mtp) is moe
    assert any(k.endswith("transformer_layer.mlp.linear_fc1.weight") for k in mtp) is not moe

    tensors = plan.mtp_layer_tensors(cfg)
    assert any(t.group == "router" for t in tensors) is moe
    assert any(t.group == "dense_mlp" for t in tensors) is not moe

    # FLOPs: the MTP layer's MLP priced as its kind, written out from the config (tiny: top-k 2 of 8, 1 shared)
    H, V = cfg.hidden_size, cfg.vocab_size
    mlp = (2 * H * cfg.n_routed_experts + (cfg.num_experts_per_tok + cfg.n_shared_experts) * 6 * H *
           cfg.moe_intermediate_size) if moe else 6 * H * cfg.intermediate_size
    attn = attention_flops_per_token(cfg, 128)
    extra = forward_flops_per_token(cfg, 128, mtp_num_layers=1) - forward_flops_per_token(cfg, 128)
    assert extra == pytest.approx(4 * H * H + attn + mlp + 2 * H * V)


@pytest.mark.parametrize("sizes", [dict(tp=2, ep=2, sequence_parallel=True), dict(tp=1, ep=4),
                                   dict(tp=2, ep=2, moe_tp_extend_ep=True, sequence_parallel=True)])
def test_planner_prices_exactly_the_rank_files_tensors(sizes):
    """The planner's parameters per device equal the elements of the tensors hf2mcore's name map puts in that
    rank's file (shapes and TP split rules from one module: models/names.py)."""
    import math

    import torch

    hf = tiny_hf_config(num_nextn_predict_layers=1)
    cfg = DeepSeekConfig.from_hf(hf)
    layout = ParallelLayout(**sizes).with_model_defaults(cfg)
    shape_of = lambda name: nm.expected_hf_shape(cfg, name)  # noqa: E731

    def read(name, rows=None, cols=None):
        t = torch.empty(shape_of(name), device="meta")
        return t[rows or slice(None)] if t.dim() == 1 else t[rows or slice(None), cols or slice(None)]

    rank_numel = sum(math.prod(nm.shard_for_rank(m, read, shape_of).shape) for m in nm.rank_maps(hf, layout, 0, 0, 0))
    p = plan.make_plan(cfg, layout, plan.TrainArgs())
    assert p.stages[0].params_per_device == rank_numel
