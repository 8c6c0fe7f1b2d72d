"""The DeepSeek-V4 name map: transformers' state dict -> ours -> transformers' is bit-identical, and the
converted state dict equals the one the model tests build independently (tests/model/deepseek4_reference)."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model, make_hf_v4_mtp, tiny_v4_config


def _roundtrip_on_rank():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.models.deepseek4.names import hf_to_mcore, mcore_to_hf
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours

    init_distributed()
    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    mtp_sd = {k: v.detach() for d in range(2) for k, v in make_hf_v4_mtp(hf_cfg, d)[1].items()}
    problems, sizes = [], []
    for mtp in (0, 2):  # without MTP the checkpoint's MTP tensors are left out
        hf_sd = {**make_hf_v4_model(hf_cfg).state_dict(), **mtp_sd}
        ours = hf_to_mcore(hf_sd, cfg, mtp_num_layers=mtp)
        # the independent copy of the same weights into a real model
        model = DeepSeekV4Model(cfg, mtp_num_layers=mtp)
        hf_v4_to_ours(make_hf_v4_model(hf_cfg), model, cfg.n_routed_experts, mtp_sd=mtp_sd)
        target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        if set(ours) != set(target):
            problems.append((mtp, "mcore names", sorted(set(ours) ^ set(target))))
        problems += [(mtp, "mcore", k) for k in target if k in ours and not torch.equal(ours[k], target[k])]
        back = mcore_to_hf(target, cfg, mtp_num_layers=mtp)
        want = {k: v for k, v in hf_sd.items() if mtp or not k.startswith("model.mtp.")}
        if set(back) != set(want):
            problems.append((mtp, "hf names", sorted(set(back) ^ set(want))))
        problems += [(mtp, "hf", k) for k in want
                     if k in back and (back[k].dtype != want[k].dtype or not torch.equal(back[k], want[k]))]
        sizes.append(len(want))
    return problems, sizes


def test_roundtrip_is_bit_identical():
    ((problems, (n, n_mtp)),) = run_distributed(_roundtrip_on_rank, 1)
    assert n > 100 and n_mtp > n + 2 * 30
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


def test_official_scales_and_unknown_mtp_names_are_refused_by_name():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import official_to_transformers
    from mindspeed_dsv.models.names import NameMapError

    cfg = DeepSeekV4Config.from_hf(tiny_v4_config())
    with pytest.raises(NameMapError, match=r"layers.0.attn.wq_a.scale: FP8/FP4 block scales"):
        official_to_transformers({"layers.0.attn.wq_a.scale": torch.ones(1)}, cfg)
    with pytest.raises(NameMapError, match=r"mtp.0.eh_proj.weight: not a DeepSeek-V4 tensor name"):
        official_to_transformers({"mtp.0.eh_proj.weight": torch.ones(1)}, cfg)


def test_official_mtp_spelling_round_trips():
    """The release's `mtp.K.*` names (own tensors, its decoder layer, per-expert tensors) <-> our
    transformers-side `model.mtp.K.*`, bit for bit; hf_to_mcore reads both spellings alike."""
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import hf_to_mcore, official_to_transformers, transformers_to_official

    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    sd = {**make_hf_v4_model(hf_cfg).state_dict(), **{k: v.detach() for k, v in make_hf_v4_mtp(hf_cfg, 0)[1].items()}}
    official = transformers_to_official(sd, cfg)
    for name in ("mtp.0.e_proj.weight", "mtp.0.hnorm.weight", "mtp.0.norm.weight", "mtp.0.hc_head_fn",
                 "mtp.0.attn.wkv.weight", "mtp.0.hc_attn_fn", "mtp.0.ffn.gate.bias", "mtp.0.ffn.experts.3.w1.weight"):
        assert name in official, name
    back = official_to_transformers(official, cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    a, b = hf_to_mcore(official, cfg, mtp_num_layers=1), hf_to_mcore(sd, cfg, mtp_num_layers=1)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["mtp.layers.0.hc_head.hc_fn"] is sd["model.mtp.0.hc_head.hc_fn"]
