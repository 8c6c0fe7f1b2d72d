"""`verify` in multi-rank layouts: the Megatron checkpoint loaded in its recorded TP2 / EP2 / PP2 layout (ranks
spawned by verify itself) gives the logits transformers gives for the HF directory it was converted from, to
fp32 rounding. These runs are also the evidence that the model matches transformers under Megatron parallelism."""

import json

import pytest
import torch

from ckpt_convert.cli import main
from tests.ckpt.helpers import make_hf_dir

LAYOUTS = {
    "tp2": ["--target-tensor-parallel-size", "2"],
    "ep2": ["--target-expert-parallel-size", "2"],
    "pp2": ["--target-pipeline-parallel-size", "2"],
    # vocabulary padded to 4098 rows: verify compares the 4096 real ids (the padded ones are stripped)
    "tp2_padded_vocab": ["--target-tensor-parallel-size", "2", "--make-vocab-size-divisible-by", "3"],
    # expert-TP 1 at TP2 EP2 (MindSpeed-LLM's A2 expert layout): 2 rank files, 2 ranks, experts whole
    "tp2_etp1_ep2_grouped": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
                             "--target-expert-tensor-parallel-size", "1", "--moe-grouped-gemm"],
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    hf = make_hf_dir(str(root / "hf"), mtp=True)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(7))
    (root / "tokens.json").write_text(json.dumps(ids.tolist()))
    return hf, str(root / "tokens.json"), ids


def _stats(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_verify_multi_rank_matches_transformers(name, src, tmp_path, capsys):
    hf, tokens, ids = src
    assert main(["hf2mcore", "--load-dir", hf, "--save-dir", str(tmp_path / "mc"), "--no-progress"]
                + LAYOUTS[name]) == 0
    capsys.readouterr()
    args = ["verify", "--hf-dir", hf, "--mcore-dir", str(tmp_path / "mc"), "--tokens-file", tokens]
    if name == "tp2":
        args += ["--save-logits", str(tmp_path / "logits.pt")]
    if name == "ep2":  # a tolerance below fp32 rounding must fail, with the numbers still printed
        args += ["--tolerance", "1e-12"]
    code = main(args)
    captured = capsys.readouterr()
    stats = _stats(captured.out)
    assert stats["relative"] < 1e-5, stats
    assert stats["max_abs"] < 1e-4 and stats["mean_abs"] <= stats["max_abs"], stats
    if name == "ep2":
        assert code == 1 and "exceeds --tolerance" in captured.err
        return
    assert code == 0, captured.err
    if name == "tp2":  # the saved logits are the full (TP-gathered) vocabulary, checked against transformers here
        from transformers import AutoModelForCausalLM

        saved = torch.load(tmp_path / "logits.pt")
        assert saved.dtype == torch.float32 and saved.shape == (2, 16, 4096)
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(ids).logits
        assert ((saved - ref).norm() / ref.norm()).item() < 1e-5


def test_verify_refuses_dualpipev(src, tmp_path, capsys):
    hf, tokens, _ = src
    assert main(["hf2mcore", "--load-dir", hf, "--save-dir", str(tmp_path / "mc"), "--no-progress",
                 "--target-pipeline-parallel-size", "2", "--schedules-method", "dualpipev"]) == 0
    code = main(["verify", "--hf-dir", hf, "--mcore-dir", str(tmp_path / "mc"), "--tokens-file", tokens])
    assert code == 2 and "verify does not run the dualpipev schedule" in capsys.readouterr().err
