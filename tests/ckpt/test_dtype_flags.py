"""Contradictory dtype flags of the converters are refused before anything is written; one flag still works."""

import pytest

from ckpt_convert.cli import build_parser, main
from tests.ckpt.helpers import make_hf_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "tiny"), mtp=False)


@pytest.mark.parametrize("flags,named", [
    (["--bf16", "--fp16"], "--bf16 and --fp16"),
    (["--params-dtype", "fp32", "--bf16"], "--params-dtype fp32 and --bf16"),
    (["--params-dtype", "bf16", "--fp16"], "--params-dtype bf16 and --fp16"),
])
def test_contradictory_dtype_flags_are_refused(hf_dir, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    code = main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert f"contradictory dtype flags {named}" in err
    assert not out.exists()


def test_agreeing_dtype_flags_write_that_dtype(hf_dir, tmp_path, capsys):
    import torch

    out = tmp_path / "out"
    assert main(["hf2mcore", "--load-dir", hf_dir, "--save-dir", str(out), "--no-progress",
                 "--params-dtype", "bf16", "--bf16"]) == 0
    sd = torch.load(out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    assert sd["embedding.word_embeddings.weight"].dtype == torch.bfloat16


def test_help_names_no_training_fp16():
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "hf2mcore" in a.choices)
    text = sub.choices["hf2mcore"].format_help()
    assert "training's --bf16/--fp16" not in text and "training has no fp16" in " ".join(text.split())
