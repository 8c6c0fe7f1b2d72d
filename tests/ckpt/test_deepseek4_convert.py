"""DeepSeek-V4 HF -> Megatron -> HF is bit-identical (names, dtypes, values) from both key spellings over PP/VPP/EP/
dualpipev layouts; rank files hold exactly the state-dict keys of the DeepSeekV4Model stages the trainer builds;
what V4 cannot do yet is refused with a clear message."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all
from tests.model.deepseek4_reference import make_hf_v4_model, tiny_v4_config

LAYOUTS = {
    "pp1": [],
    "pp2_vpp": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "ep2": ["--target-expert-parallel-size", "2"],
    "dualpipev_pp2_ep2": ["--target-pipeline-parallel-size", "2", "--schedules-method", "dualpipev",
                          "--target-expert-parallel-size", "2"],
}


def transformers_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The random tiny model's state dict (transformers' names, stacked experts); the norm weights and the
    hyper-connection scales kept float32 while the rest is bf16, and tid2eid int64, so dtypes are checked."""
    sd = make_hf_v4_model(tiny_v4_config(), seed).state_dict()
    out = {}
    for k, v in sd.items():
        keep = not v.is_floating_point() or k.endswith(("norm.weight", "layernorm.weight", "hc_scale", ".scale"))
        out[k] = v.clone() if keep else v.to(torch.bfloat16)
    return out


def write_hf(path, sd: dict[str, torch.Tensor], cfg: dict | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg or tiny_v4_config(), f)
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config
    from mindspeed_dsv.models.deepseek4.names import transformers_to_official

    root = tmp_path_factory.mktemp("v4hf")
    sd = transformers_state()
    official = transformers_to_official(sd, DeepSeekV4Config.from_hf(tiny_v4_config()))
    return {"transformers": write_hf(root / "tf", sd), "official": write_hf(root / "off", official)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("spelling", ["transformers", "official"])
def test_roundtrip_bit_identical(spelling, layout, sources, tmp_path):
    if spelling == "official" and layout not in ("pp1", "dualpipev_pp2_ep2"):
        pytest.skip("one plain and one full layout cover the official spelling")
    src = sources[spelling]
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "mc"), "--no-progress"]
                + LAYOUTS[layout]) == 0
    assert main(["mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    a, b = read_all(src), read_all(str(tmp_path / "hf"))
    assert set(a) == set(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def test_reshard_equals_direct(sources, tmp_path):
    src = sources["transformers"]
    dual = LAYOUTS["dualpipev_pp2_ep2"]
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "a"), "--no-progress"]
                + LAYOUTS["pp2_vpp"]) == 0
    assert main(["reshard", "--load-dir", str(tmp_path / "a"), "--save-dir", str(tmp_path / "b"), "--no-progress"]
                + dual) == 0
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "c"), "--no-progress"] + dual) == 0
    for f in sorted(glob.glob(str(tmp_path / "c" / "iter_0000001" / "*" / "model_optim_rng.pt"))):
        direct = torch.load(f, weights_only=False)
        resharded = torch.load(f.replace(str(tmp_path / "c"), str(tmp_path / "b")), weights_only=False)
        for ck in ("model0", "model1"):
            assert direct[ck].keys() == resharded[ck].keys()
            assert all(torch.equal(direct[ck][k], resharded[ck][k]) for k in direct[ck])


def _stage_keys_on_rank(save_dir):
    """Build every stage of the checkpoint's layout as the trainer does (stages.build_stage) and load the rank
    file's chunk into it strictly: keys exactly the model's, shapes equal."""
    from ckpt_convert.mcore_io import rank_file
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, transformer_config
    from mindspeed_dsv.models.deepseek4.stages import build_stage
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    layout = ParallelLayout.load(save_dir)
    cfg = DeepSeekV4Config.from_hf(tiny_v4_config())
    checked = 0
    for pp in range(layout.pp):
        state = torch.load(rank_file(save_dir, layout, 0, pp, 0), weights_only=False)
        for c in range(layout.num_model_chunks):
            model = build_stage(cfg, layout, pp, c, transformer_config(cfg, pp=layout.pp))
            model.load_state_dict(state[f"model{c}"], strict=True)
            checked += 1
    return checked


def test_rank_files_are_the_trainer_stages(sources, tmp_path):
    """dualpipev PP2 rank files load strictly into the trainer's stages; the EP2 files of the same layout hold
    the same tensors with each rank's half of the experts renumbered from 0 (megatron's local experts)."""
    from tests.dist_utils import run_distributed

    one, two = str(tmp_path / "ep1"), str(tmp_path / "ep2")
    dual = ["--target-pipeline-parallel-size", "2", "--schedules-method", "dualpipev"]
    assert main(["hf2mcore", "--load-dir", sources["official"], "--save-dir", one, "--no-progress"] + dual) == 0
    assert main(["hf2mcore", "--load-dir", sources["official"], "--save-dir", two, "--no-progress"] + dual
                + ["--target-expert-parallel-size", "2"]) == 0
    assert run_distributed(_stage_keys_on_rank, 1, one) == [4]
    for pp in range(2):
        full = torch.load(f"{one}/iter_0000001/mp_rank_00_{pp:03d}/model_optim_rng.pt", weights_only=False)
        for ep in range(2):
            part = torch.load(f"{two}/iter_0000001/mp_rank_00_{pp:03d}_{ep:03d}/model_optim_rng.pt",
                              weights_only=False)
            for ck in ("model0", "model1"):
                want = {}
                for k, v in full[ck].items():
                    if ".local_experts." in k:
                        head, rest = k.split(".local_experts.")
                        e, tail = rest.split(".", 1)
                        if int(e) // 2 != ep:
                            continue
                        k = f"{head}.local_experts.{int(e) - 2 * ep}.{tail}"
                    want[k] = v
                assert part[ck].keys() == want.keys()
                assert all(torch.equal(part[ck][k], want[k]) for k in want)


@pytest.mark.parametrize("flags,message", [
    (["--target-tensor-parallel-size", "2"], "tensor parallel size 2 is not supported"),
    # the trainer places MTP now (stages.rank_maps); a source without MTP weights cannot fill it
    (["--mtp-num-layers", "1"], r"missing tensor\(s\):\s+model\.mtp\.0\."),
    (["--mla-mm-split"], "--mla-mm-split does not apply"),
])
def test_refusals(flags, message, sources, tmp_path, capsys):
    assert main(["hf2mcore", "--load-dir", sources["transformers"], "--save-dir", str(tmp_path / "mc"),
                 "--no-progress"] + flags) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "mc" / "latest_checkpointed_iteration.txt")


def test_mtp_weights_in_source_are_refused(sources, tmp_path, capsys):
    sd = read_all(sources["official"])
    sd["mtp.0.enorm.weight"] = torch.ones(64)
    src = write_hf(tmp_path / "with_mtp", sd)
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "mc"), "--no-progress"]) == 2
    assert "MTP weights (mtp.*), which are not converted yet" in capsys.readouterr().err
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(tmp_path / "mc"), "--no-progress",
                 "--mtp-num-layers", "0", "--allow-unused-weights"]) == 0
