"""The shipped example scripts: syntax, dry runs of every 671B/GPU template, and a flag typo named by the dry run.

Dry runs parse the training flags with the trainer's own parser and run the planner; nothing is launched, so
each takes about a second on CPU."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "mcore", "deepseek3")
SCRIPTS = sorted(glob.glob(os.path.join(EXAMPLES, "*.sh")) + glob.glob(os.path.join(EXAMPLES, "layouts", "*.sh")))
TRAIN_671B = sorted(glob.glob(os.path.join(EXAMPLES, "pretrain_deepseek3_671b_*.sh"))
                    + glob.glob(os.path.join(EXAMPLES, "tune_deepseek3_671b_*.sh")))
ENV = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1")
# Dry runs must not depend on the caller's shell settings.
for k in ("LAYOUT", "NNODES", "NPUS_PER_NODE", "GPUS_PER_NODE", "DRY_RUN", "FINETUNE_MODE", "MODE"):
    ENV.pop(k, None)


def run(args, env=None, cwd=None):
    return subprocess.run(["bash", *args], capture_output=True, text=True, env={**ENV, **(env or {})},
                          cwd=cwd or ROOT, timeout=120)


def test_expected_scripts_exist():
    names = {os.path.basename(p) for p in SCRIPTS}
    for n in ["data_convert_deepseek3_pretrain.sh", "data_convert_deepseek3_instruction.sh",
              "ckpt_convert_deepseek3_hf2mcore.sh", "pretrain_deepseek3_671b_4k_A2.sh",
              "pretrain_deepseek3_671b_4k_A3.sh", "tune_deepseek3_671b_4k_full_A2.sh",
              "tune_deepseek3_671b_4k_full_A3.sh", "tune_deepseek3_671b_4k_xlora_A2.sh",
              "tune_deepseek3_671b_4k_xlora_A3.sh", "ckpt_convert_deepseek3_mcore2hf.sh",
              "ckpt_convert_deepseek3_merge_lora2hf.sh", "pretrain_deepseek3_671b_4k_gpu.sh",
              "tune_deepseek3_671b_4k_full_gpu.sh", "tune_deepseek3_671b_4k_xlora_gpu.sh",
              "quickstart_tiny.sh", "pretrain_deepseek3_tiny_cpu.sh", "tune_deepseek3_tiny_full_cpu.sh",
              "tune_deepseek3_tiny_xlora_cpu.sh"]:
        assert n in names, n


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, EXAMPLES))
def test_bash_syntax(path):
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _peak(out: str) -> float:
    m = re.search(r"peak estimated memory per device: ([\d.]+) GiB", out)
    assert m, out[-2000:]
    return float(m.group(1))


CASES = [(p, {}) for p in TRAIN_671B if "xlora" not in p] + \
        [(p, {"FINETUNE_MODE": m}) for p in TRAIN_671B if "xlora" in p for m in ("lora", "qlora")]


@pytest.fixture(scope="module")
def dry_run():
    """examples/mcore/deepseek3/dry_run.py as a module: the 671B dry runs below call its main in this process."""
    sys.path.insert(0, EXAMPLES)
    try:
        import dry_run
    finally:
        sys.path.pop(0)
    return dry_run


@pytest.mark.parametrize("path,env", CASES, ids=lambda x: os.path.basename(x) if isinstance(x, str) else str(x))
def test_671b_dry_run_plans(path, env, dry_run, tmp_path, capsys):
    """bash builds the flags exactly as at launch and calls dry_run.py (the interpreter swapped for a recorder, as
    in test_scripts_deepseek4); that call's argv then runs through dry_run.main here: one import of the trainer
    for all templates instead of one per template."""
    from tests.examples.test_scripts_deepseek4 import record

    r, calls = record(tmp_path, path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(calls) == 1 and calls[0][0].endswith("dry_run.py"), calls
    capsys.readouterr()
    assert dry_run.main(calls[0][1:]) == 0
    out = capsys.readouterr().out
    assert "training flags OK" in out
    stages = re.findall(r"^  stage (\d+) per device: .* total ([\d.]+)$", out, re.M)
    pp = int(re.search(r"PP (\d+)", out).group(1))
    assert [int(s) for s, _ in stages] == list(range(pp)), "one memory line per pipeline stage"
    budget = 80 if path.endswith("_gpu.sh") else 64
    peak = _peak(out)
    assert 0 < peak < budget, f"{os.path.basename(path)}: plan {peak} GiB does not fit {budget} GB devices"
    assert "exceeds" not in out


def test_conversion_dry_runs_share_the_layout_of_training():
    """hf2mcore for a template's layout prints the same layout flags the training script passes."""
    conv = run([os.path.join(EXAMPLES, "ckpt_convert_deepseek3_hf2mcore.sh"), "--dry-run"],
               {"LAYOUT": "671b_4k_A3_full"})
    train = run([os.path.join(EXAMPLES, "tune_deepseek3_671b_4k_full_A3.sh"), "--dry-run"])
    assert conv.returncode == 0 and train.returncode == 0, conv.stderr + train.stderr
    hf2 = next(line for line in conv.stdout.splitlines() if "ckpt_convert hf2mcore" in line)
    for flag, value in [("--target-tensor-parallel-size", "2"), ("--target-pipeline-parallel-size", "16"),
                        ("--target-expert-parallel-size", "8"), ("--noop-layers", "47,62,63"), ("--num-layers", "64")]:
        assert f"{flag} {value}" in hf2, (flag, hf2)
    plan = next(line for line in train.stdout.splitlines() if line.startswith("+ python -m mindspeed_dsv.plan"))
    for flag, value in [("--tensor-model-parallel-size", "2"), ("--pipeline-model-parallel-size", "16"),
                        ("--expert-model-parallel-size", "8"), ("--noop-layers", "47,62,63"), ("--num-layers", "64")]:
        assert f"{flag} {value}" in plan, (flag, plan)
    for flag in ("--moe-tp-extend-ep", "--moe-grouped-gemm"):
        assert flag in hf2 and flag in plan
    assert "--allow-unused-weights" not in hf2  # A3 full keeps MTP: nothing of the HF checkpoint is left out


def test_layout_without_mtp_lets_hf2mcore_leave_it_out():
    conv = run([os.path.join(EXAMPLES, "ckpt_convert_deepseek3_hf2mcore.sh"), "--dry-run"],
               {"LAYOUT": "671b_4k_A2_full"})
    assert conv.returncode == 0, conv.stderr
    hf2 = next(line for line in conv.stdout.splitlines() if "ckpt_convert hf2mcore" in line)
    assert "--mtp-num-layers 0" in hf2 and "--allow-unused-weights" in hf2, hf2


@pytest.mark.parametrize("name,env", [("ckpt_convert_deepseek3_mcore2hf.sh", {}),
                                      ("ckpt_convert_deepseek3_merge_lora2hf.sh", {}),
                                      ("ckpt_convert_deepseek3_merge_lora2hf.sh", {"MODE": "peft"}),
                                      ("data_convert_deepseek3_pretrain.sh", {}),
                                      ("data_convert_deepseek3_instruction.sh", {}),
                                      ("tune_deepseek3_tiny_full_cpu.sh", {}),
                                      ("tune_deepseek3_tiny_xlora_cpu.sh", {"FINETUNE_MODE": "qlora"}),
                                      ("pretrain_deepseek3_tiny_cpu.sh", {})])
def test_other_dry_runs(name, env):
    r = run([os.path.join(EXAMPLES, name), "--dry-run"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "+ " in r.stdout  # the command it would run


def test_typo_in_template_is_named(tmp_path):
    """A copy of a template with one flag misspelt fails its dry run, and the message names that flag."""
    copy = tmp_path / "examples" / "mcore" / "deepseek3"
    shutil.copytree(EXAMPLES, copy)
    os.symlink(os.path.join(ROOT, "assets"), tmp_path / "assets")
    script = copy / "tune_deepseek3_671b_4k_full_A2.sh"
    text = script.read_text()
    assert "    --lr-decay-style cosine\n" in text
    script.write_text(text.replace("    --lr-decay-style cosine\n", "    --lr-decay-styel cosine\n"))
    r = run([str(script), "--dry-run"], {"PYTHONPATH": ROOT})
    assert r.returncode == 2
    assert "unrecognized arguments: --lr-decay-styel" in r.stderr


def test_typo_in_layout_file_is_named(tmp_path):
    """The same for a layout flag in a layout file (shared by conversion and training): both dry runs fail."""
    copy = tmp_path / "examples" / "mcore" / "deepseek3"
    shutil.copytree(EXAMPLES, copy)
    os.symlink(os.path.join(ROOT, "assets"), tmp_path / "assets")
    layout = copy / "layouts" / "671b_4k_A2_full.sh"
    layout.write_text(layout.read_text().replace("--num-layer-list", "--num-layers-list"))
    for name in ("tune_deepseek3_671b_4k_full_A2.sh", "ckpt_convert_deepseek3_hf2mcore.sh"):
        r = run([str(copy / name), "--dry-run"], {"PYTHONPATH": ROOT})
        assert r.returncode == 2, (name, r.stdout[-1000:])
        assert "--num-layers-list" in r.stderr, (name, r.stderr[-1000:])


def test_inconsistent_value_is_named():
    """A value the layout cannot take (61 layers over PP 8 without a list) fails naming both flags."""
    r = run([os.path.join(EXAMPLES, "tune_deepseek3_671b_4k_full_A2.sh"), "--dry-run", "--global-batch-size", "100"])
    assert r.returncode == 2
    assert "--global-batch-size 100" in r.stderr


def test_real_run_stops_on_missing_inputs(tmp_path):
    """Without --dry-run a template refuses to start when its checkpoint has no layout.json."""
    r = run([os.path.join(EXAMPLES, "tune_deepseek3_671b_4k_full_A2.sh")],
            {"CKPT_LOAD_DIR": str(tmp_path / "nothing")})
    assert r.returncode == 2
    assert "layout.json" in r.stderr


@pytest.mark.parametrize("name", ["pretrain_deepseek3_671b_4k_A3.sh", "tune_deepseek3_671b_4k_full_A2.sh"])
def test_npu_template_dry_run_prints_kernel_resolution(name):
    """The A2/A3 dry runs resolve every kernel flag for the npu (env_ascend.sh sets DSV_DEVICE) and print the
    torch_npu operator each one runs."""
    r = run([os.path.join(EXAMPLES, name), "--dry-run"])
    assert r.returncode == 0, r.stderr[-3000:]
    block = r.stdout.split("kernel flags on npu:\n")[1].split("\n+ ")[0].splitlines()
    assert [line.split(":")[0].strip() for line in block] == [
        "--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-rotary-pos-emb", "--use-fused-swiglu",
        "--moe-grouped-gemm", "--use-fused-moe-token-permute-and-unpermute"]
    assert "grouped_matmul -> npu: torch_npu.npu_grouped_matmul" in r.stdout
