"""The DeepSeek-V4 name map: transformers' state dict -> ours -> transformers' is bit-identical, and the
converted state dict equals the one the model tests build independently (tests/model/deepseek4_reference)."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model, tiny_v4_config


def _roundtrip_on_rank():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.models.deepseek4.names import hf_to_mcore, mcore_to_hf
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours

    init_distributed()
    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    hf_sd = make_hf_v4_model(hf_cfg).state_dict()
    ours = hf_to_mcore(hf_sd, cfg)
    # the independent copy of the same weights into a real model
    model = DeepSeekV4Model(cfg)
    hf_v4_to_ours(make_hf_v4_model(hf_cfg), model, cfg.n_routed_experts)
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    problems = []
    if set(ours) != set(target):
        problems.append(("mcore names", sorted(set(ours) ^ set(target))))
    problems += [("mcore", k) for k in target if k in ours and not torch.equal(ours[k], target[k])]
    back = mcore_to_hf(target, cfg)
    if set(back) != set(hf_sd):
        problems.append(("hf names", sorted(set(back) ^ set(hf_sd))))
    problems += [("hf", k) for k in hf_sd if k in back and (back[k].dtype != hf_sd[k].dtype or not torch.equal(back[k], hf_sd[k]))]
    return problems, len(hf_sd)


def test_roundtrip_is_bit_identical():
    ((problems, n),) = run_distributed(_roundtrip_on_rank, 1)
    assert n > 100
    assert not problems, problems[:10]


def test_missing_and_unexpected_names_are_named():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import hf_to_mcore
    from mindspeed_dsv.models.names import NameMapError

    hf_cfg = tiny_v4_config(num_hidden_layers=2)
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    sd = dict(make_hf_v4_model(hf_cfg).state_dict())
    sd.pop("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight")
    sd["model.layers.1.self_attn.extra"] = torch.zeros(1)
    with pytest.raises(NameMapError, match=r"missing \['model.layers.1.self_attn.compressor.indexer.q_b_proj.weight'\]"
                       r".*unexpected \['model.layers.1.self_attn.extra'\]"):
        hf_to_mcore(sd, cfg)


def test_official_spelling_is_what_transformers_loads(tmp_path):
    """Our release spelling, saved and loaded by transformers (through its own deepseek_v4 conversion
    mapping), gives back the same tensors bit for bit; both spellings convert to the same megatron tensors."""
    import json

    from safetensors.torch import save_file
    from transformers import DeepseekV4ForCausalLM

    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import hf_to_mcore, official_to_transformers, transformers_to_official

    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    sd = make_hf_v4_model(hf_cfg).state_dict()
    official = transformers_to_official(sd, cfg)
    assert "layers.1.attn.indexer.compressor.wkv.weight" in official and "layers.3.ffn.experts.3.w3.weight" in official
    save_file(official, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    loaded = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).state_dict()
    assert set(loaded) == set(sd)
    assert [k for k in sd if not torch.equal(loaded[k], sd[k])] == []
    back = official_to_transformers(official, cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    a, b = hf_to_mcore(sd, cfg), hf_to_mcore(official, cfg)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_official_scales_and_mtp_are_refused_by_name():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import official_to_transformers
    from mindspeed_dsv.models.names import NameMapError

    cfg = DeepSeekV4Config.from_hf(tiny_v4_config())
    with pytest.raises(NameMapError, match=r"layers.0.attn.wq_a.scale: FP8/FP4 block scales"):
        official_to_transformers({"layers.0.attn.wq_a.scale": torch.ones(1)}, cfg)
    with pytest.raises(NameMapError, match=r"mtp.0.e_proj.weight: the MTP layer"):
        official_to_transformers({"mtp.0.e_proj.weight": torch.ones(1)}, cfg)
