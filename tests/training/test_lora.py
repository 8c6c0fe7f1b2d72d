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


def _train_and_score(argv):
    """Train; return the loss history, the trainable names, the names of fc weights still held as parameters,
    and the trained model's logits on _ids()."""
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    model = state.models[0].module
    model.eval()
    ids = _ids()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), attention_mask=None)
    params = dict(model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    fc_weights = [n for n in params if n.replace(".base_layer", "").endswith(("linear_fc1.weight", "linear_fc2.weight"))]
    return [h["lm loss"] for h in state.history], trainable, fc_weights, logits


def _dequantized_copy(nf4_dir: str, out_dir: str) -> str:
    """The checkpoint `nf4_dir` (hf2mcore --qlora-nf4) with every NF4 entry replaced by its dequantized tensor:
    the base that plain LoRA trains on in the reference run."""
    import os
    import shutil

    from ckpt_convert.mcore_io import all_ranks, dense_state, load_rank_file, rank_file, read_iteration
    from mindspeed_dsv.layout import ParallelLayout
    from tests.ckpt.helpers import rerecord_checksum

    shutil.copytree(nf4_dir, out_dir)
    layout = ParallelLayout.load(nf4_dir)
    for tp, pp, ep in all_ranks(layout):
        path = rank_file(out_dir, layout, tp, pp, ep, read_iteration(nf4_dir))
        state = dict(load_rank_file(path))
        state = {k: (dense_state(v) if k.startswith("model") else v) for k, v in state.items()}
        torch.save(state, path + ".tmp")  # the loaded file is memory-mapped: write beside it, then swap
        os.replace(path + ".tmp", path)
        rerecord_checksum(path)
    return out_dir



QLORA_TARGETS = ["linear_q_up_proj", "linear_proj", "linear_fc1", "linear_fc2"]


def test_qlora_equals_lora_on_dequantized_base_and_merges_into_hf(tiny_data, tiny_hf_dir, tmp_path):
    """QLoRA (base quantized to NF4 on load, dequantized per matmul) trains exactly like plain LoRA on the
    dequantized base; its adapters, merged by mcore2hf into the NF4 base (r/alpha read from the checkpoint),
    give a transformers model with the trained model's logits."""
    from ckpt_convert.cli import main as convert
    from transformers import AutoModelForCausalLM

    base = hf2mcore(tiny_hf_dir, str(tmp_path / "base"))
    nf4 = hf2mcore(tiny_hf_dir, str(tmp_path / "nf4"), "--qlora-nf4", "--lora-target-modules", *QLORA_TARGETS)
    deq = _dequantized_copy(nf4, str(tmp_path / "deq"))
    common = ["--data-path", tiny_data["sft"], "--is-instruction-dataset", "--seq-length", "128",
              "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-2",
              "--finetune", "--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", *QLORA_TARGETS,
              "--no-shuffle", "--log-interval", "1000", "--lora-ckpt-filter"]
    save = str(tmp_path / "qlora")
    ((q_losses, trainable, fc_weights, q_logits),) = run_distributed(
        _train_and_score, 1, common + ["--load", base, "--qlora-nf4", "--save", save])
    ((l_losses, _, l_fc_weights, _),) = run_distributed(_train_and_score, 1, common + ["--load", deq])
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert fc_weights == [] and l_fc_weights  # QLoRA's targeted base weights are NF4 storage, not parameters
    # Same arithmetic in fp32 (the NF4 bytes quantized on load equal hf2mcore's): the losses were bit-identical
    # when this test was written; 1e-5 relative leaves room for summation order only. They move (adapters train).
    torch.testing.assert_close(torch.tensor(q_losses), torch.tensor(l_losses), rtol=1e-5, atol=0)
    assert q_losses[-1] < q_losses[0]

    out = str(tmp_path / "hf_merged")
    assert convert(["mcore2hf", "--load-dir", nf4, "--lora-load", save, "--save-dir", out, "--no-progress"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(_ids()).logits
    rel = ((q_logits - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
