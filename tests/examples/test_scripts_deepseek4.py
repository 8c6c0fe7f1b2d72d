"""The DeepSeek-V4 example scripts (examples/mcore/deepseek4): syntax, the dry run of every V4-Flash template
(the trainer's parser and validation, then the planner: per-stage layers and memory per device), conversion and
training reading one layout file, and the tiny quickstart end to end.

The dry runs are the templates' own: bash builds the flags exactly as at launch and calls dry_run.py; the
interpreter is swapped for a recorder so that the checks of all templates run in this one process (one import of
the trainer instead of one per template)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "mcore", "deepseek4")
SCRIPTS = sorted(glob.glob(os.path.join(EXAMPLES, "*.sh")) + glob.glob(os.path.join(EXAMPLES, "layouts", "*.sh")))
TRAIN_FLASH = sorted(glob.glob(os.path.join(EXAMPLES, "pretrain_deepseek4_flash_*.sh"))
                     + glob.glob(os.path.join(EXAMPLES, "tune_deepseek4_flash_*.sh")))
ENV = {k: v for k, v in os.environ.items()
       if k not in ("LAYOUT", "NNODES", "NPUS_PER_NODE", "GPUS_PER_NODE", "DRY_RUN", "FINETUNE_MODE", "MODE")}
ENV.update(PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1")


def record(tmp_path, script, env=None, args=("--dry-run",)):
    """Run `script` with PYTHON replaced by a recorder; return (bash result, [argv of each python call])."""
    log = tmp_path / "calls"
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n\\0" >> {log}\n')
    shim.chmod(0o755)
    if log.exists():
        log.unlink()
    r = subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**ENV, "PYTHON": str(shim), **(env or {})})
    calls = []
    if log.exists():
        cur = []
        for a in log.read_text().split("\0")[:-1]:
            if a == "\n":
                calls.append(cur)
                cur = []
            else:
                cur.append(a)
    return r, calls


def test_expected_scripts_exist():
    names = {os.path.basename(p) for p in SCRIPTS}
    for n in ["common.sh", "model_flash.sh", "data_convert_deepseek4_pretrain.sh",
              "data_convert_deepseek4_instruction.sh", "ckpt_convert_deepseek4_hf2mcore.sh",
              "ckpt_convert_deepseek4_mcore2hf.sh", "ckpt_convert_deepseek4_merge_lora2hf.sh",
              "pretrain_deepseek4_flash_4k_A2.sh", "pretrain_deepseek4_flash_4k_A3.sh",
              "pretrain_deepseek4_flash_4k_gpu.sh", "tune_deepseek4_flash_4k_full_A2.sh",
              "tune_deepseek4_flash_4k_full_A3.sh", "tune_deepseek4_flash_4k_full_gpu.sh",
              "tune_deepseek4_flash_4k_xlora_A2.sh", "tune_deepseek4_flash_4k_xlora_A3.sh",
              "tune_deepseek4_flash_4k_xlora_gpu.sh", "tune_deepseek4_tiny_full_cpu.sh",
              "tune_deepseek4_tiny_xlora_cpu.sh", "quickstart_tiny.sh"]:
        assert n in names, n
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", p], capture_output=True, text=True)
        assert r.returncode == 0, (p, r.stderr)


CASES = [(p, {}) for p in TRAIN_FLASH if "xlora" not in p] + \
        [(p, {"FINETUNE_MODE": m}) for p in TRAIN_FLASH if "xlora" in p for m in ("lora", "qlora")]


def test_flash_template_dry_runs(tmp_path, capsys):
    """Every V4-Flash template: its flags pass the trainer's parser and validation against the V4-Flash
    config.json, and the plan of the same flags has 43 layers over PP stages that fit the devices."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "mcore", "deepseek3"))
    try:
        import dry_run
    finally:
        sys.path.pop(0)
    assert len(CASES) == 12  # 3 pretrain, 3 full, 3 x (LoRA, QLoRA)
    for path, env in CASES:
        name = os.path.basename(path) + str(env)
        r, calls = record(tmp_path, path, env)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert len(calls) == 1 and calls[0][0].endswith("dry_run.py"), (name, calls)
        capsys.readouterr()
        assert dry_run.main(calls[0][1:]) == 0, name
        out = capsys.readouterr().out
        assert "training flags OK" in out and "layers: 43 decoder (noop none), first 0 dense" in out, name
        assert "284,332,240,471" in out, name
        pp = int(re.search(r"PP (\d+)", out).group(1))
        stages = re.findall(r"^  stage (\d+) per device: .* total ([\d.]+)$", out, re.M)
        assert [int(s) for s, _ in stages] == list(range(pp)), name
        budget = 80 if "_gpu" in path else 64
        peak = float(re.search(r"peak estimated memory per device: ([\d.]+) GiB", out).group(1))
        assert 0 < peak < budget and "exceeds" not in out, (name, peak)
        if env.get("FINETUNE_MODE"):
            assert "MTP 0" in out and "--lora-r 8" in out, name


def test_conversion_and_training_read_one_layout(tmp_path):
    conv, calls = record(tmp_path, os.path.join(EXAMPLES, "ckpt_convert_deepseek4_hf2mcore.sh"),
                         {"LAYOUT": "flash_4k_A3_pretrain"})
    assert conv.returncode == 0, conv.stderr
    hf2 = next(line for line in conv.stdout.splitlines() if "ckpt_convert hf2mcore" in line)
    for flag, value in [("--target-tensor-parallel-size", "1"), ("--target-pipeline-parallel-size", "4"),
                        ("--target-expert-parallel-size", "64"), ("--num-layer-list", "11,11,11,10"),
                        ("--num-layers", "43"), ("--mtp-num-layers", "1"), ("--params-dtype", "bf16")]:
        assert f"{flag} {value}" in hf2, (flag, hf2)
    assert "--allow-unused-weights" not in hf2
    assert calls[0][:3] == ["-m", "mindspeed_dsv.plan", "--model-config"]  # the dry run plans the layout too
    assert calls[0][3].endswith(os.path.join("assets", "deepseek4_flash"))
    train, calls = record(tmp_path, os.path.join(EXAMPLES, "pretrain_deepseek4_flash_4k_A3.sh"))
    argv = " ".join(calls[0])
    for flag, value in [("--tensor-model-parallel-size", "1"), ("--pipeline-model-parallel-size", "4"),
                        ("--expert-model-parallel-size", "64"), ("--num-layer-list", "11,11,11,10")]:
        assert f"{flag} {value}" in argv
    assert "--world-size 256" in argv  # 16 nodes x 16 dies


def test_lora_layout_leaves_mtp_out_and_merge_reads_its_lora_flags(tmp_path):
    conv, _ = record(tmp_path, os.path.join(EXAMPLES, "ckpt_convert_deepseek4_hf2mcore.sh"),
                     {"LAYOUT": "flash_4k_gpu_qlora"})
    hf2 = next(line for line in conv.stdout.splitlines() if "ckpt_convert hf2mcore" in line)
    assert "--mtp-num-layers 0" in hf2 and "--allow-unused-weights" in hf2
    merge, _ = record(tmp_path, os.path.join(EXAMPLES, "ckpt_convert_deepseek4_merge_lora2hf.sh"),
                      {"LAYOUT": "flash_4k_gpu_lora"})
    line = next(x for x in merge.stdout.splitlines() if "ckpt_convert mcore2hf" in x)
    assert "--lora-r 8 --lora-alpha 16 --lora-target-modules linear_q_down_proj" in line
    bad, _ = record(tmp_path, os.path.join(EXAMPLES, "ckpt_convert_deepseek4_merge_lora2hf.sh"),
                    {"LAYOUT": "flash_4k_A3_pretrain"})
    assert bad.returncode == 2 and "defines no LORA_ARGS" in bad.stderr


def test_instruction_data_uses_the_v4_template(tmp_path):
    r, _ = record(tmp_path, os.path.join(EXAMPLES, "data_convert_deepseek4_instruction.sh"))
    assert r.returncode == 0 and "--prompt-type deepseek4" in r.stdout


def test_quickstart_tiny_end_to_end(tmp_path):
    """The whole tour on CPU with LoRA (the longest path: hf2mcore, adapter training, merge): the merged model,
    written as HF, loads in transformers and answers; the merge changed the weights the adapters target."""
    from ckpt_convert.hf_io import read_all

    r = subprocess.run(["bash", os.path.join(EXAMPLES, "quickstart_tiny.sh")], capture_output=True, text=True,
                       cwd=ROOT, timeout=1500,
                       env={**ENV, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / "qs"), "TRAIN_ITERS": "6",
                            "FINETUNE": "lora"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "qs"
    assert (out / "hf_out" / "config.json").is_file() and list((out / "hf_out").glob("*.safetensors"))
    for stage in range(1, 7):
        assert f"stage {stage}/6" in r.stdout
    assert "mean reproduced:" in r.stdout  # generate_check loaded hf_out in transformers and generated
    base, merged = read_all(str(out / "hf")), read_all(str(out / "hf_out"))
    assert set(base) == set(merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert {"model.layers.0.self_attn.q_b_proj.weight", "model.layers.3.mlp.experts.gate_up_proj"} <= changed
    targeted = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a|q_b|kv|o_b)_proj\.weight|"
                          r"mlp\.shared_experts\.(gate|up|down)_proj\.weight|mlp\.experts\.(gate_up|down)_proj)$")
    assert all(targeted.match(k) for k in changed), sorted(k for k in changed if not targeted.match(k))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf_out")
    assert model.config.model_type == "deepseek_v4" and model.config.vocab_size == 4096
