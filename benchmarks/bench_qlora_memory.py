"""Memory of a real QLoRA training step vs a LoRA step on the same model, measured and as mindspeed_dsv.plan
prices it.

Each mode (lora: frozen base in the training dtype; qlora: --qlora-nf4, every LoRA-able linear stored as NF4)
runs in a fresh single-rank process through the trainer's own `setup` and `train_step` (megatron DDP, Adam,
the QLoRA loading path), on a DeepSeek-V3-shaped model whose linear weights dominate its memory (random
init, random tokens, short sequences). Measured:

- cpu: resident memory. After imports the process's RSS is the baseline; after `setup` the peak counter
  (VmHWM) is reset (/proc/self/clear_refs), two training steps run (the first creates Adam's states), and the
  step peak is VmHWM - baseline. glibc is told to mmap every buffer above 64 KiB, so freed memory (the host
  copy QLoRA quantizes away during loading) goes back to the system instead of staying in RSS.
- cuda: torch.cuda.max_memory_allocated over the same two steps (reset after setup); "after setup" is
  memory_allocated. Training runs --bf16 there.

Planner: `make_plan` for the same model, layout (one device) and training flags; weights, grads, optimizer,
activations, and the planner's total vs the measured peak. Per-parameter bytes: the NF4 storage the QLoRA
model holds (packed codes + absmax) per quantized weight, vs the planner's NF4_BYTES_PER_PARAM.

    python benchmarks/bench_qlora_memory.py                       # cpu, fp32
    python benchmarks/bench_qlora_memory.py --hidden 2048 --experts 32   # a bigger model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
           "linear_fc1", "linear_fc2"]


def model_config(hidden: int, experts: int, layers: int, vocab: int) -> dict:
    """DeepSeek-V3 structure (MLA with q_lora, one dense layer then MoE with a shared expert) at width `hidden`."""
    heads = max(hidden // 128, 1)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "moe_intermediate_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "n_shared_experts": 1, "n_routed_experts": experts, "routed_scaling_factor": 1.0,
        "kv_lora_rank": hidden // 4, "q_lora_rank": hidden // 2, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "qk_nope_head_dim": 64, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
        "rms_norm_eps": 1e-06, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
        "rope_interleave": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 0, "torch_dtype": "float32",
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(mode: str, cfg_path: str, seq: int, lora_r: int) -> dict:
    import ctypes
    import gc

    import torch

    if not torch.cuda.is_available():
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed
    import megatron.core.distributed  # noqa: F401  (imports done before the baseline is taken)
    import megatron.core.optimizer  # noqa: F401

    from mindspeed_dsv.peft.qlora import QLoraParallelLinear
    from mindspeed_dsv.platform import current_platform
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import setup, train_step

    cuda = current_platform().device_type == "cuda"
    gc.collect()
    base = 0 if cuda else _status_kib("VmRSS") * 1024
    argv = ["--model-config", cfg_path, "--data-path", "synthetic", "--seq-length", str(seq),
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "2", "--lr", "1e-4",
            "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--lora-r", str(lora_r), "--lora-alpha", "16",
            "--lora-target-modules", *TARGETS]
    if mode == "qlora":
        argv.append("--qlora-nf4")
    if cuda:
        argv.append("--bf16")
    state = setup(build_parser().parse_args(argv), own_batches=True)
    model = state.models[0].module
    nf4_bytes = nf4_numel = 0
    for m in model.modules():
        if isinstance(m, QLoraParallelLinear) and getattr(m.base_layer, "nf4_weight", None) is not None:
            nf4_bytes += m.base_layer.nf4_weight.nbytes()
            nf4_numel += m.base_layer.nf4_weight.numel()
    gc.collect()
    device = current_platform().device()
    if cuda:
        torch.cuda.synchronize()
        after_setup = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        after_setup = _status_kib("VmRSS") * 1024 - base
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    vocab = json.load(open(cfg_path))["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(1, seq, device=device)
    pos = torch.arange(seq, device=device).unsqueeze(0)

    def batches():
        while True:
            t = torch.randint(0, vocab, (1, seq + 1), generator=g).to(device)
            yield {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": ones, "position_ids": pos,
                   "attention_mask": None}

    it = batches()
    for m in state.models:
        m.train()
    losses = []
    for _ in range(2):
        metrics, _ok = train_step(state, [it], 1)
        losses.append(metrics["lm loss"])
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    return dict(mode=mode, after_setup=after_setup, peak=peak, nf4_bytes=nf4_bytes, nf4_numel=nf4_numel,
                losses=losses, device=current_platform().device_type)


def planned(cfg: dict, seq: int, lora_r: int, qlora: bool, bf16: bool) -> dict:
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.plan import TrainArgs, make_plan

    layout = ParallelLayout(num_layers=cfg["num_hidden_layers"], mtp_num_layers=0)
    plan = make_plan(cfg, layout, TrainArgs(micro_batch_size=1, seq_length=seq, global_batch_size=1, bf16=bf16,
                                            lora_r=lora_r, qlora_nf4=qlora, world_size=1))
    mem = plan.stages[0].memory
    return dict(weights=mem.weights, grads=mem.grads, optimizer=mem.optimizer, activations=mem.activations,
                total=mem.total, params=plan.total_params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (default 16)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers, the first dense (default 4)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--seq", type=int, default=64, help="sequence length of the micro-batch (default 64)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    a = p.parse_args(argv)

    from mindspeed_dsv.plan import NF4_BYTES_PER_PARAM
    from mindspeed_dsv.platform.spawn import spawn_ranks

    cfg = model_config(a.hidden, a.experts, a.layers, a.vocab)
    with tempfile.TemporaryDirectory() as work:
        cfg_path = os.path.join(work, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        env = {"TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        runs = {mode: spawn_ranks(_worker, 1, mode, cfg_path, a.seq, a.lora_r, env=env, timeout=1800)[0]
                for mode in ("lora", "qlora")}
    bf16 = runs["lora"]["device"] == "cuda"
    plans = {mode: planned(cfg, a.seq, a.lora_r, mode == "qlora", bf16) for mode in runs}
    mib = 2**-20
    print(f"model: {plans['lora']['params'] / 1e6:.1f} M parameters (hidden {a.hidden}, {a.layers} layers, "
          f"{a.experts} experts, vocab {a.vocab}); seq {a.seq}, micro-batch 1, LoRA r {a.lora_r}; "
          f"{runs['lora']['device']}, {'bf16' if bf16 else 'fp32'}")
    q = runs["qlora"]
    print(f"NF4 bytes per quantized parameter: measured {q['nf4_bytes'] / q['nf4_numel']:.4f} "
          f"({q['nf4_numel'] / 1e6:.1f} M quantized), planner {NF4_BYTES_PER_PARAM:.4f}")
    print("| mode | planner weights | planner grads+optimizer | planner activations | planner total | "
          "measured after setup | measured step peak | planner / measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("lora", "qlora"):
        pl, r = plans[mode], runs[mode]
        print(f"| {mode} | {pl['weights'] * mib:.1f} MiB | {(pl['grads'] + pl['optimizer']) * mib:.1f} MiB | "
              f"{pl['activations'] * mib:.1f} MiB | {pl['total'] * mib:.1f} MiB | {r['after_setup'] * mib:.1f} MiB | "
              f"{r['peak'] * mib:.1f} MiB | {pl['total'] / r['peak']:.3f} |")
    ratio_m = runs["lora"]["peak"] / runs["qlora"]["peak"]
    ratio_p = plans["lora"]["total"] / plans["qlora"]["total"]
    print(f"lora / qlora step peak: measured {ratio_m:.2f}x, planner {ratio_p:.2f}x; "
          f"losses lora {runs['lora']['losses']}, qlora {runs['qlora']['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
