"""The DeepSeek-V4 proxy of benchmarks/train_mfu.py: the shape both rows must build (the planner's parameter count
that every row is checked against) equals transformers' DeepseekV4ForCausalLM built from the same config, and the
layer pattern covers every attention type and both routings. Built on the meta device: no weights, fast."""

import torch

from benchmarks.train_mfu import TINY_V4, V4, expected_params, v4_config


def _transformers_params(hf_cfg: dict) -> int:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def test_v4_proxy_covers_every_layer_type_and_routing():
    cfg = v4_config(V4, 3)
    assert cfg["layer_types"] == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    assert cfg["mlp_layer_types"] == ["hash_moe", "moe", "moe"]
    assert cfg["num_nextn_predict_layers"] == 0
    # seq 4096: CSA keeps index_topk of 4096 / rate entries, so its top-k drops some
    assert cfg["index_topk"] < 4096 // cfg["compress_rates"]["compressed_sparse_attention"]
    longer = v4_config(V4, 5)
    assert longer["layer_types"][3:] == ["sliding_attention", "compressed_sparse_attention"]
    assert longer["mlp_layer_types"] == ["hash_moe"] + ["moe"] * 4


def test_v4_expected_params_equal_transformers():
    for cfg, want in ((v4_config(V4, 3), 2_689_440_743), (v4_config(TINY_V4, 3), None)):
        got = expected_params(cfg)
        assert got == _transformers_params(cfg)
        if want is not None:  # the count measured on the H200 (docs/en/performance.md)
            assert got == want
