"""Bad input fails before anything is written, with a message that names the tensor / flag / layout."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "tiny"), mtp=False)


def run(capsys, *args):
    code = main(list(args) + ["--no-progress"])
    return code, capsys.readouterr().err


def test_missing_tensor_is_named(hf_dir, tmp_path, capsys):
    d = tmp_path / "broken"
    d.mkdir()
    t = read_all(hf_dir)
    del t["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    shutil.copy(os.path.join(hf_dir, "config.json"), d)
    code, err = run(capsys, "hf2mcore", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"))
    assert code == 2
    assert "missing tensor" in err and "model.layers.2.mlp.experts.3.up_proj.weight" in err
    assert "mlp.experts.local_experts.3.linear_fc1.weight" in err
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()


def test_shape_that_does_not_fit_layout(tmp_path, capsys):
    # The dense MLP's gate/up rows split over TP; 250 rows do not split 4 ways. The layout check against
    # config.json catches it before any tensor is read.
    src = make_hf_dir(str(tmp_path / "odd"), mtp=False, config_overrides={"intermediate_size": 250})
    code, err = run(capsys, "hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "out"),
                    "--target-tensor-parallel-size", "4")
    assert code == 2
    assert "4 must divide intermediate_size 250" in err, err


def test_shape_that_does_not_match_config(hf_dir, tmp_path, capsys):
    d = tmp_path / "cfg"
    shutil.copytree(hf_dir, d)
    cfg = json.load(open(d / "config.json"))
    cfg["moe_intermediate_size"] = 32
    json.dump(cfg, open(d / "config.json", "w"))
    code, err = run(capsys, "hf2mcore", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"))
    assert code == 2 and "shape [64, 128] but config.json implies [32, 128]" in err, err


def test_layer_list_must_sum_to_num_layers(hf_dir, tmp_path, capsys):
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"),
                    "--target-pipeline-parallel-size", "2", "--num-layer-list", "1,2")
    assert code == 2 and "--num-layer-list 1,2 sums to 3" in err and "--num-layers is 4" in err, err


def test_ep_must_divide_experts(hf_dir, tmp_path, capsys):
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"),
                    "--target-expert-parallel-size", "3")
    assert code == 2 and "--target-expert-parallel-size 3 must divide --num-experts 8" in err, err
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"),
                    "--target-tensor-parallel-size", "3")
    assert code == 2 and "--target-tensor-parallel-size 3 must divide num_attention_heads" in err, err
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"),
                    "--target-expert-parallel-size", "0")
    assert code == 2 and "--target-expert-parallel-size must be a positive integer" in err, err
    assert "--expert-model-parallel-size" not in err


def test_model_flag_checked_against_config(hf_dir, tmp_path, capsys):
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"), "--num-layers", "5")
    assert code == 2 and "num_hidden_layers 4" in err, err
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"),
                    "--first-k-dense-replace", "0")
    assert code == 2 and "first_k_dense_replace 1" in err, err
    code, err = run(capsys, "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "out"),
                    "--mtp-num-layers", "1")
    assert code == 2 and "model.layers.4.eh_proj.weight" in err, err  # asked for MTP, the weights are not there


def test_checkpoint_layout_differs_from_flags(hf_dir, tmp_path, capsys):
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "mc"), "--target-tensor-parallel-size",
                 "2", "--no-progress"]) == 0
    code, err = run(capsys, "mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"),
                    "--source-tensor-parallel-size", "1", "--moe-grouped-gemm")
    assert code == 2
    assert "--source-tensor-parallel-size (tp): flag 1 != checkpoint 2" in err
    assert "--moe-grouped-gemm (moe_grouped_gemm): flag True != checkpoint False" in err
    # the same flags as recorded are fine
    code, err = run(capsys, "mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"),
                    "--source-tensor-parallel-size", "2")
    assert code == 0, err


def test_missing_rank_tensor_is_named(hf_dir, tmp_path, capsys):
    main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "mc"), "--target-tensor-parallel-size", "2",
          "--no-progress"])
    f = tmp_path / "mc/iter_0000001/mp_rank_01/model_optim_rng.pt"
    st = torch.load(f, weights_only=False)
    del st["model"]["decoder.layers.1.mlp.shared_experts.linear_fc2.weight"]
    st["model"]["decoder.layers.1.mlp.surprise.weight"] = torch.zeros(1)
    torch.save(st, f)  # edited on purpose: its recorded sha256 no longer matches
    code, err = run(capsys, "mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"),
                    "--no-verify-checksums")
    assert code == 2 and "mp_rank_01[model]: decoder.layers.1.mlp.surprise.weight" in err, err
    del st["model"]["decoder.layers.1.mlp.surprise.weight"]
    torch.save(st, f)  # edited on purpose: its recorded sha256 no longer matches
    code, err = run(capsys, "mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"),
                    "--no-verify-checksums")
    assert code == 2 and "missing tensor decoder.layers.1.mlp.shared_experts.linear_fc2.weight" in err, err


def test_an_edited_mtp_stage_embedding_copy_is_refused(tmp_path, capsys):
    """At PP2 with MTP the last stage holds a copy of the embedding that training keeps equal to the first
    stage's; the readers serve the first stage's, so a differing copy must stop mcore2hf and reshard, naming both
    rank files and the first differing row, instead of being dropped silently."""
    from tests.ckpt.helpers import edit_rank_file

    src = make_hf_dir(str(tmp_path / "hf"), mtp=True)
    one = str(tmp_path / "pp2")
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", one, "--target-pipeline-parallel-size", "2",
                 "--no-progress"]) == 0
    last = os.path.join(one, "iter_0000001", "mp_rank_00_001", "model_optim_rng.pt")
    key = "embedding.word_embeddings.weight"
    assert key in torch.load(last, weights_only=False)["model"]  # the copy exists on the MTP stage

    def bump(state):
        state["model"][key][5, 2] += 1.0

    edit_rank_file(last, bump)  # the checksum re-recorded too: only the copy check can see it
    for cmd in ("mcore2hf", "reshard"):
        code, err = run(capsys, cmd, "--load-dir", one, "--save-dir", str(tmp_path / cmd))
        assert code == 2
        assert "the MTP stage's copy of the embedding" in err and "first at row 5" in err, err
        assert "mp_rank_00_001" in err and "mp_rank_00_000" in err
