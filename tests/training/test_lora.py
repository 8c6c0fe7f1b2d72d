"""LoRA fine-tuning on the trainer: only adapters change, and the adapter-only checkpoint merged by ckpt_convert
gives a transformers model whose logits equal the trained megatron model's."""

import torch

from tests.dist_utils import run_distributed
from tests.training.conftest import hf2mcore

TARGETS = ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
           "linear_fc1", "linear_fc2"]


def _ids():
    return torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(11))


def _train_lora(argv, base_dir):
    from ckpt_convert.mcore_io import load_rank_file, rank_file, read_iteration
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    model = state.models[0].module
    model.eval()
    ids = _ids()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), attention_mask=None)
    layout = ParallelLayout.load(base_dir)
    base = load_rank_file(rank_file(base_dir, layout, 0, 0, 0, read_iteration(base_dir)))["model"]
    now = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    base_drift = max((now[k].float() - v.float()).abs().max().item() for k, v in base.items())
    adapters = sorted(k for k in now if ".lora_" in k)
    b_norm = sum(now[k].norm().item() for k in adapters if ".lora_B." in k)
    return logits, base_drift, len(adapters), b_norm


def test_lora_trains_adapters_only_and_merges_into_hf(tiny_data, tiny_hf_dir, tmp_path):
    from ckpt_convert.cli import main as convert
    from transformers import AutoModelForCausalLM

    base = hf2mcore(tiny_hf_dir, str(tmp_path / "base"))
    save = str(tmp_path / "lora")
    argv = ["--data-path", tiny_data["sft"], "--is-instruction-dataset", "--seq-length", "128",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-2",
            "--load", base, "--finetune", "--save", save, "--lora-r", "8", "--lora-alpha", "16",
            "--lora-target-modules", *TARGETS, "--lora-ckpt-filter", "--log-interval", "1000"]
    ((logits, drift, n_adapters, b_norm),) = run_distributed(_train_lora, 1, argv, base)
    assert drift == 0.0  # frozen base unchanged, bit for bit
    assert n_adapters > 2 * len(TARGETS) and b_norm > 0  # adapters everywhere (experts too), and they moved

    out = str(tmp_path / "hf_merged")
    assert convert(["mcore2hf", "--load-dir", base, "--lora-load", save, "--lora-r", "8", "--lora-alpha", "16",
                    "--lora-target-modules", *TARGETS, "--save-dir", out, "--no-progress"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(_ids()).logits
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel


def _train_qlora(argv):
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    model = state.models[0].module
    params = dict(model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    # The targeted base weights live as NF4 storage, not as parameters the optimizer could see.
    fc2_weights = [n for n in params if n.endswith("linear_fc2.weight") or n.endswith("linear_fc2.base_layer.weight")]
    return [h["lm loss"] for h in state.history], trainable, fc2_weights


def test_qlora_trains_adapters_over_nf4_base(tiny_data, tiny_hf_dir, tmp_path):
    base = hf2mcore(tiny_hf_dir, str(tmp_path / "base"))
    argv = ["--data-path", tiny_data["sft"], "--is-instruction-dataset", "--seq-length", "128",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "6", "--lr", "1e-2",
            "--load", base, "--finetune", "--lora-r", "8", "--lora-alpha", "16", "--qlora-nf4",
            "--lora-target-modules", "linear_fc1", "linear_fc2", "--no-shuffle", "--log-interval", "1000"]
    ((losses, trainable, fc2_weights),) = run_distributed(_train_qlora, 1, argv)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert fc2_weights == []
    assert losses[-1] < losses[0]
