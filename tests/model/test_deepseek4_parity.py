"""DeepSeek-V4 on megatron-core against transformers' DeepseekV4ForCausalLM on the same random weights
(fp32, cpu, TP1), one attention type at a time and then the whole tiny model."""

import pytest
import torch

from tests.model.deepseek4_reference import make_hf_v4_model, single_layer_config, tiny_v4_config, token_ids


def test_tiny_config_exercises_every_path():
    """The shipped tiny config reaches every branch the equality tests are meant to cover."""
    cfg = tiny_v4_config()
    assert set(cfg["layer_types"]) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert set(cfg["mlp_layer_types"]) == {"hash_moe", "moe"} and cfg["mlp_layer_types"][0] == "hash_moe"
    ids = token_ids(cfg["vocab_size"])
    seq = ids.shape[1]
    rates = cfg["compress_rates"].values()
    assert all(seq % r for r in rates), "the sequence length must leave a partial window"
    assert seq > cfg["sliding_window"]
    assert cfg["index_topk"] < seq // cfg["compress_rates"]["compressed_sparse_attention"], "top-k must drop entries"
    assert cfg["hc_mult"] > 1
    hf = make_hf_v4_model(cfg)
    clamped, total = [0], [0]

    def count(_mod, _inp, up):  # the shared expert's up projection, clamped to +-swiglu_limit
        clamped[0] += int((up.abs() > cfg["swiglu_limit"]).sum())
        total[0] += up.numel()

    for layer in hf.model.layers:
        layer.mlp.shared_experts.up_proj.register_forward_hook(count)
    with torch.no_grad():
        hf(ids)
    assert 0 < clamped[0] < total[0], (clamped, total)
