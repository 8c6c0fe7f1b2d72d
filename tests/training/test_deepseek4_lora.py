"""LoRA and QLoRA (NF4) fine-tuning of the tiny DeepSeek-V4 on the trainer (cpu/gloo): the loss falls, only the
adapters move; ckpt_convert merges the adapter-only checkpoint into an HF checkpoint whose transformers logits
equal the trained model's (QLoRA: merged into hf2mcore's NF4 base), and exports a PEFT adapter that peft loads onto
transformers' V4 model with the same logits as the trained model with those adapters."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model
from tests.training.conftest import hf2mcore
from tests.training.deepseek4_fixtures import make_v4_inputs, v4_args

TARGETS = ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_proj", "linear_proj", "linear_fc1", "linear_fc2"]
R, ALPHA = 8, 16.0


def _ids():
    return torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def v4_base(tmp_path_factory):
    """The tiny V4 inputs (tokenizer, SFT data), a random transformers checkpoint of it beside the tokenizer, and
    that checkpoint converted by hf2mcore (the frozen base the adapters train on)."""
    root = tmp_path_factory.mktemp("v4lora")
    inputs = make_v4_inputs(str(root))
    with open(os.path.join(inputs["model"], "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    sd = make_hf_v4_model(cfg, seed=3).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(inputs["model"], "model.safetensors"))
    inputs["base"] = hf2mcore(inputs["model"], str(root / "base"))
    return inputs


def _train_lora(argv, base_dir):
    """Trains; returns (history, logits of the trained model on _ids() with all adapters and with the attention
    adapters alone, largest change of a base weight, number of adapter tensors, summed norm of the attention
    lora_B matrices)."""
    from ckpt_convert.mcore_io import dense, load_rank_file, rank_file, read_iteration
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.peft.qlora import dequantize_model_weights
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    model = state.models[0].module.eval()
    with torch.no_grad():
        logits = model(_ids()).float()
        for name, p in model.named_parameters():  # the model with its attention adapters alone (PEFT's export)
            if ".mlp." in name and ".lora_B." in name:
                p.zero_()
        attn_logits = model(_ids()).float()
        dequantize_model_weights(model)  # QLoRA: the NF4 bases as weights again, to compare with the checkpoint
    layout = ParallelLayout.load(base_dir)
    base = load_rank_file(rank_file(base_dir, layout, 0, 0, 0, read_iteration(base_dir)))["model"]
    now = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    drift = max((now[k].float() - dense(v).float()).abs().max().item() for k, v in base.items()
                if not k.endswith("_extra_state"))
    adapters = sorted(k for k in now if ".lora_" in k)
    b_norm = sum(now[k].norm().item() for k in adapters if ".lora_B." in k and ".self_attention." in k)
    history = [{k: r[k] for k in ("iteration", "lm loss")} for r in state.history]
    return history, (logits, attn_logits), drift, len(adapters), b_norm


def _lora_argv(inputs, save, *extra):
    return v4_args(inputs, "--train-iters", "8", "--global-batch-size", "2", "--lr", "3e-2",
                   "--load", inputs["base"], "--finetune", "--save", save, "--lora-r", str(R), "--lora-alpha",
                   str(ALPHA), "--lora-target-modules", *TARGETS, "--lora-ckpt-filter", *extra)


def _falls(history) -> bool:
    """The mean loss of the last 4 steps is below that of the first 2 by 0.1 or more (one batch's loss is noisy:
    8 steps of 2 SFT samples each)."""
    first = sum(h["lm loss"] for h in history[:2]) / 2
    last = sum(h["lm loss"] for h in history[-4:]) / 4
    return last < first - 0.1


def test_lora_trains_merges_and_exports_peft(v4_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from ckpt_convert.cli import main as convert

    save = str(tmp_path / "lora")
    ((history, (logits, attn_logits), drift, n_adapters, b_norm),) = run_distributed(
        _train_lora, 1, _lora_argv(v4_base, save), v4_base["base"])
    assert _falls(history), history  # 8.58 -> 8.16 measured
    assert drift == 0.0  # the frozen base is bit for bit the converted checkpoint
    # per layer: q_down, q_up, kv, o (4) + shared fc1/fc2 (2) + 4 experts x fc1/fc2 (8) = 14 linears, 2 matrices each
    assert n_adapters == 4 * 14 * 2 and b_norm > 0

    # merge: transformers on the merged HF checkpoint gives the trained model's logits
    merged = str(tmp_path / "merged")
    assert convert(["mcore2hf", "--load-dir", v4_base["base"], "--lora-load", save, "--save-dir", merged,
                    "--no-progress"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(_ids()).logits
    err = ((logits - ref).abs().max() / ref.abs().max()).item()
    with capsys.disabled():
        print(f"V4 LoRA: losses {[round(h['lm loss'], 3) for h in history]}; merged vs trained logits {err:.2e}")
    assert err < 1e-5, err

    # PEFT: routed experts are fused tensors in transformers, so the export refuses them by name ...
    assert convert(["mcore2hf", "--load-dir", save, "--save-dir", str(tmp_path / "refused"), "--save-lora-to-hf",
                    "--no-progress"]) == 2
    assert "adapts a DeepSeek-V4 routed expert" in capsys.readouterr().err
    # ... and the attention adapters, loaded by peft onto transformers' V4, give our model's logits with them alone
    peft = pytest.importorskip("peft")
    adapter = str(tmp_path / "peft")
    attn = ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_proj", "linear_proj"]
    assert convert(["mcore2hf", "--load-dir", save, "--save-dir", adapter, "--save-lora-to-hf",
                    "--lora-target-modules", *attn, "--no-progress"]) == 0
    base_model = AutoModelForCausalLM.from_pretrained(v4_base["model"], dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base_model, adapter).eval()
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) == 4 * 4
    with torch.no_grad():
        got = model(_ids()).logits
    assert not torch.allclose(got, ref, atol=1e-3)  # the MLP adapters are not in it
    err = ((attn_logits - got).abs().max() / got.abs().max()).item()
    print(f"V4 LoRA: peft vs trained (attention adapters) logits: {err:.2e}")
    assert err < 1e-5, err


def test_qlora_trains_and_merges_into_the_nf4_base(v4_base, tmp_path):
    """QLoRA: the loss falls over a frozen NF4 base; merged into hf2mcore's NF4 form of the same HF checkpoint
    (`--qlora-nf4`, the bytes training quantized on load), transformers gives the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from ckpt_convert.cli import main as convert

    save = str(tmp_path / "qlora")
    ((history, (logits, _), drift, n_adapters, b_norm),) = run_distributed(
        _train_lora, 1, _lora_argv(v4_base, save, "--qlora-nf4"), v4_base["base"])
    print(f"V4 QLoRA: losses {[round(h['lm loss'], 3) for h in history]}; NF4 drift {drift:.3f}")
    assert _falls(history), history  # 8.67 -> 8.31 measured
    assert n_adapters == 4 * 14 * 2 and b_norm > 0
    assert 0.0 < drift < 0.5  # NF4 rounding of the targeted bases, nothing else

    nf4_base = str(tmp_path / "nf4_base")
    assert convert(["hf2mcore", "--load-dir", v4_base["model"], "--save-dir", nf4_base, "--qlora-nf4",
                    "--lora-target-modules", *TARGETS, "--params-dtype", "fp32", "--no-progress"]) == 0
    merged = str(tmp_path / "merged")
    assert convert(["mcore2hf", "--load-dir", nf4_base, "--lora-load", save, "--save-dir", merged,
                    "--no-progress"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(_ids()).logits
    err = ((logits - ref).abs().max() / ref.abs().max()).item()
    print(f"V4 QLoRA: merged (NF4 base) vs trained logits {err:.2e}")
    assert err < 1e-5, err


def _lora_modules_per_stage(layout_dict):
    """{(pp, chunk): (LoRA modules of the stage the trainer builds, lora_module entries of the rank maps)}."""
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import family
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, transformer_config
    from mindspeed_dsv.models.deepseek4.stages import build_stage
    from mindspeed_dsv.peft.lora import LoraConfig, apply_lora, lora_state_dict
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import tiny_v4_config

    init_distributed()
    layout = ParallelLayout.from_dict(layout_dict)
    hf = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf)
    out = {}
    for pp in range(layout.pp):
        for c in range(layout.num_model_chunks):
            model = apply_lora(build_stage(cfg, layout, pp, c, transformer_config(cfg, pp=layout.pp)),
                               LoraConfig(lora_r=2, lora_target_modules=TARGETS))
            built = sorted({k.rsplit(".lora_", 1)[0] for k in lora_state_dict(model)})
            mapped = sorted(m.lora_module for m in family.rank_maps(hf, layout, 0, pp, 0, c) if m.lora_module)
            out[(pp, c)] = (built, mapped)
    return out


def test_rank_maps_name_the_adapters_of_every_stage():
    """The merge finds each adapter under the rank map's lora_module: on a dualpipev PP2 layout (two chunks per
    rank, stage-local layer numbers), the LoRA modules of every stage the trainer builds are exactly those."""
    from mindspeed_dsv.layout import ParallelLayout

    layout = ParallelLayout(pp=2, dualpipev=True, num_layers=4, num_experts=4, mtp_num_layers=0,
                            make_vocab_size_divisible_by=1)
    (stages,) = run_distributed(_lora_modules_per_stage, 1, layout.to_dict())
    assert len(stages) == 4
    for (pp, c), (built, mapped) in stages.items():
        assert built == mapped and len(built) == 14, (pp, c, built, mapped)  # one layer per stage, 14 linears
