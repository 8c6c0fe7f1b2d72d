"""verify on DeepSeek-V4: the converted checkpoint's logits equal transformers' on the source directory (fp32),
its MTP depth's those of the release's MTPBlock math around transformers' modules, and a changed weight (main
or MTP) is caught."""

import json

import torch

from ckpt_convert.cli import main
from tests.ckpt.helpers import edit_rank_file, rerecord_checksum
from tests.ckpt.test_deepseek4_convert import LAYOUTS, transformers_state, write_hf
from tests.model.deepseek4_reference import token_ids, tiny_v4_config


def _verify(hf, mc, tokens, capsys, *extra):
    code = main(["verify", "--hf-dir", hf, "--mcore-dir", mc, "--tokens-file", tokens, "--tolerance", "1e-4",
                 *extra])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_logits_match_transformers_and_a_changed_weight_fails(tmp_path, capsys):
    # fp32 throughout (transformers computes in the weights' dtype here)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in transformers_state(seed=3).items()}
    cfg = tiny_v4_config()
    hf = write_hf(tmp_path / "hf", sd, cfg)
    mc = str(tmp_path / "mc")
    assert main(["hf2mcore", "--load-dir", hf, "--save-dir", mc, "--no-progress"]
                + LAYOUTS["dualpipev_pp2_ep2"]) == 0
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(token_ids(cfg["vocab_size"], batch=2, seq=20).tolist()))
    code, stats = _verify(hf, mc, str(tokens), capsys)
    assert code == 0 and stats["shape"] == [2, 20, cfg["vocab_size"]], stats
    assert stats["relative"] < 1e-5 and stats["max_abs"] < 1e-4, stats
    (mtp,) = stats["mtp"]  # the source's MTP depth against the release MTPBlock math around transformers' modules
    assert mtp["relative"] < 1e-5 and mtp["max_abs"] < 1e-4, stats

    def bump_mtp(state):  # the MTP layer: chunk 1 of pipeline rank 0 (dualpipev)
        state["model1"]["mtp.layers.0.e_proj.weight"] += 0.5
    edit_rank_file(str(tmp_path / "mc" / "iter_0000001" / "mp_rank_00_000_000" / "model_optim_rng.pt"), bump_mtp)
    code, stats = _verify(hf, mc, str(tokens), capsys)
    assert code == 1 and stats["max_abs"] < 1e-4 and stats["mtp"][0]["max_abs"] > 1e-3, stats

    rank = tmp_path / "mc" / "iter_0000001" / "mp_rank_00_001_001" / "model_optim_rng.pt"

    def bump(state):
        w = state["model1"]["layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]
        w += 0.5
    edit_rank_file(str(rank), bump)
    rerecord_checksum(str(rank))
    code, stats = _verify(hf, mc, str(tokens), capsys)
    assert code == 1 and stats["max_abs"] > 1e-3, stats


def test_official_spelling(tmp_path, capsys):
    """The release's spelling on --hf-dir: transformers reads it through its own conversion mapping, the MTP
    reference through our reader (`mtp.0.*`)."""
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import transformers_to_official

    sd = {k: v.float() if v.is_floating_point() else v for k, v in transformers_state(seed=4).items()}
    cfg = tiny_v4_config()
    hf = write_hf(tmp_path / "hf", transformers_to_official(sd, DeepSeekV4Config.from_hf(cfg)), cfg)
    mc = str(tmp_path / "mc")
    assert main(["hf2mcore", "--load-dir", hf, "--save-dir", mc, "--no-progress"] + LAYOUTS["pp2_vpp"]) == 0
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(token_ids(cfg["vocab_size"], batch=1, seq=16).tolist()))
    code, stats = _verify(hf, mc, str(tokens), capsys)
    assert code == 0 and stats["relative"] < 1e-5 and stats["mtp"][0]["relative"] < 1e-5, stats
