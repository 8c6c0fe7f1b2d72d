"""Train one DeepSeek-V3-shaped proxy with three stacks on the same tokens and print one throughput table.

Stacks (same HF config, same token batches, same micro-batch / global batch / sequence length, bf16):
  ours   mindspeed_dsv's trainer (its `setup` and `train_step`: megatron-core schedules, DDP, mixed-precision
         Adam with fp32 master weights), one row per named variant (kernel flags, recompute, EP=2, TP=2)
  titan  torchtitan's DeepSeekV3Model (from PyPI), bf16 parameters, fused torch AdamW, eager
  hf     transformers' DeepseekV3ForCausalLM (sdpa attention, grouped_mm experts), bf16 parameters,
         fused torch AdamW: the plain loop FSDP/DeepSpeed recipes wrap

Both baselines train bf16 parameters without fp32 master weights: less memory traffic and memory than ours,
so the comparison favours them. Every row: median step time over the timed steps (warm-up steps excluded),
tokens/s over all GPUs of the run, TFLOP/s per GPU from mindspeed_dsv.training.flops (the same count for
every stack; recompute not counted), MFU against the bf16 matmul rate measured at the start of the same run,
peak memory (torch max_memory_allocated, rank 0), and the first losses (random tokens: each starts near
ln(vocab) = 11.54; they must agree roughly).

    python benchmarks/train_mfu.py                                     # all rows the GPUs allow
    python benchmarks/train_mfu.py --rows ours ours-ref hf titan       # a subset
    python benchmarks/train_mfu.py --tiny --rows ours hf titan         # a seconds-long smoke run (cpu too)

Each row runs in its own process (torchrun for ours), so one failing stack leaves a row saying why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# DeepSeek-V2-Lite widths with DeepSeek-V3 routing (sigmoid scores, 8 groups of which 3 are kept, expert bias).
# megatron scores a group by its top (k / topk_group) experts, DeepSeek-V3 by its top 2: they agree when
# num_experts_per_tok == 2 * topk_group, hence top-6 with 3 groups.
PROXY = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 3,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}

TINY = dict(PROXY, vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2,
            num_experts_per_tok=4, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
            n_shared_experts=1, max_position_embeddings=512)

FAST = ["--use-flash-attn", "--moe-grouped-gemm"]
# name -> (GPUs, trainer flags). 'ours' is the recommended setting; the others measure one change each.
OURS_ROWS = {
    "ours-ref": (1, []),
    "ours": (1, FAST),
    "ours+fused": (1, FAST + ["--use-fused-rmsnorm", "--use-fused-swiglu"]),
    "ours+rc-mla_up_proj": (1, FAST + ["--recompute-granularity", "selective", "--recompute-modules", "mla_up_proj"]),
    "ours+rc-moe_act": (1, FAST + ["--recompute-granularity", "selective", "--recompute-modules", "moe_act"]),
    "ours+rc-mla_up_proj,moe_act": (1, FAST + ["--recompute-granularity", "selective", "--recompute-modules",
                                                "mla_up_proj", "moe_act"]),
    "ours+rc-full": (1, FAST + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                "--recompute-num-layers", "1"]),
    "ours-ep2": (2, FAST + ["--expert-model-parallel-size", "2"]),
    "ours-tp2": (2, FAST + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}
BASELINES = ("titan", "hf")


# ---------------------------------------------------------------------------------------------- shared bits
def make_tokens(vocab: int, n_micro: int, mbs: int, seq: int, seed: int = 0):
    """[n_micro, mbs, seq + 1] int64 on cpu, the same for every stack: input = [..., :-1], labels = [..., 1:]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_micro, mbs, seq + 1), generator=g)


def measure_matmul_peak(device) -> float | None:
    """bf16 8192^3 matmul TFLOP/s on random data, median of 20 timed runs after warm-up."""
    import torch

    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def _device():
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gb(device):
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _timed_loop(step_fn, steps: int, warmup: int, device):
    """Runs warmup + steps; returns (losses of every step, median seconds of the timed steps)."""
    losses, times = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = step_fn(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    times.sort()
    return losses, times[len(times) // 2]


# ---------------------------------------------------------------------------------------------- workers
def worker_ours(a, hf_cfg, flags):
    import torch
    import torch.distributed as dist

    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import setup, train_step

    device = _device()
    cfg_path = os.path.join(a.workdir, "config.json")
    n_steps = a.warmup + a.steps
    argv = ["--model-config", cfg_path, "--data-path", "synthetic", "--seq-length", str(a.seq),
            "--micro-batch-size", str(a.mbs), "--global-batch-size", str(a.gbs), "--train-iters", str(n_steps),
            "--lr", "1e-4", "--clip-grad", "1.0", "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
            *flags]
    if device.type == "cuda":
        argv.append("--bf16")
    args = build_parser().parse_args(argv)
    state = setup(args)
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n_micro = a.gbs // (a.mbs * dp)
    tokens = make_tokens(hf_cfg["vocab_size"], a.gbs // a.mbs, a.mbs, a.seq).to(device)
    pos = torch.arange(a.seq, device=device).unsqueeze(0).expand(a.mbs, -1)
    ones = torch.ones(a.mbs, a.seq, device=device)
    # data-parallel rank r takes micro-batches r, r + dp, ... of the global batch (the baselines take them all)
    mine = [tokens[i] for i in range(dp_rank, a.gbs // a.mbs, dp)]

    def batches():
        while True:
            for t in mine:
                yield {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": ones, "position_ids": pos,
                       "attention_mask": None}

    it = batches()
    for m in state.models:
        m.train()

    def step(_):
        metrics, _ok = train_step(state, [it], n_micro)
        return metrics["lm loss"]

    losses, sec = _timed_loop(step, a.steps, a.warmup, device)
    mem = _peak_mem_gb(device)
    if dist.get_rank() == 0:
        _write(a, dict(losses=losses, step_s=sec, world=dist.get_world_size(), peak_mem_gb=mem))
    from mindspeed_dsv.platform import destroy_distributed

    destroy_distributed()


def _baseline_loop(a, model, forward_logits, device, vocab):
    """Plain loop: gradient accumulation over the global batch's micro-batches, clip 1.0, fused AdamW."""
    import torch
    import torch.nn.functional as F

    tokens = make_tokens(vocab, a.gbs // a.mbs, a.mbs, a.seq).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8,
                            fused=device.type == "cuda")
    model.train()

    def step(_):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for t in tokens:
            logits = forward_logits(t[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
            (loss / len(tokens)).backward()
            total += loss.detach() / len(tokens)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return total.item()

    losses, sec = _timed_loop(step, a.steps, a.warmup, device)
    _write(a, dict(losses=losses, step_s=sec, world=1, peak_mem_gb=_peak_mem_gb(device)))


def worker_hf(a, hf_cfg):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = DeepseekV3Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    experts = "grouped_mm" if device.type == "cuda" else "eager"
    try:
        config._experts_implementation = experts
    except Exception as err:  # older transformers: one experts implementation only
        print(f"hf: cannot select experts implementation {experts}: {err}", flush=True)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    print(f"hf: attn={config._attn_implementation} experts={getattr(config, '_experts_implementation', None)}",
          flush=True)
    _baseline_loop(a, model, lambda x: model(input_ids=x, use_cache=False).logits, device, hf_cfg["vocab_size"])


def titan_model_config(hf_cfg, attn_backend: str):
    """torchtitan's DeepSeekV3Model.Config with the proxy's shapes (its 16B flavour's builder, our widths)."""
    from torchtitan.models import deepseek_v3 as tt
    from torchtitan.models.common import Embedding, Linear, RMSNorm, RoPE

    c = hf_cfg
    rope_dim = c["qk_rope_head_dim"]
    layers = tt._build_dsv3_layers(
        n_layers=c["num_hidden_layers"], n_dense_layers=c["first_k_dense_replace"], dim=c["hidden_size"],
        n_heads=c["num_attention_heads"], q_lora_rank=c["q_lora_rank"] or 0, kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=rope_dim, v_head_dim=c["v_head_dim"],
        mscale=1.0, dense_hidden_dim=c["intermediate_size"], moe_hidden_dim=c["moe_intermediate_size"],
        num_experts=c["n_routed_experts"], num_shared_experts=c["n_shared_experts"],
        router_top_k=c["num_experts_per_tok"], router_score_func="sigmoid",
        router_num_expert_groups=c["n_group"], router_num_limited_groups=c["topk_group"],
        router_route_scale=c["routed_scaling_factor"], router_route_norm=c["norm_topk_prob"],
        attn_backend=attn_backend, moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=_titan_rope(tt, rope_dim, c),
    )
    dim, vocab = c["hidden_size"], c["vocab_size"]
    return tt.DeepSeekV3Model.Config(
        vocab_size=vocab, dim=dim,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=tt._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=tt._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=tt._output_linear_init(dim)),
        layers=layers,
    )


def _titan_rope(tt, rope_dim, c):
    import inspect

    rope_cls = tt.ComplexRoPE
    kwargs = dict(dim=rope_dim, max_seq_len=c["max_position_embeddings"], theta=c["rope_parameters"]["rope_theta"])
    params = inspect.signature(rope_cls.Config).parameters
    if "scaling" in params:
        kwargs["scaling"] = "none"
    return rope_cls.Config(**kwargs)


def worker_titan(a, hf_cfg):
    import torch

    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = a.titan_attn
    cfg = titan_model_config(hf_cfg, backend)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=device)
    model.to(dtype)
    pos = torch.arange(a.seq, device=device).unsqueeze(0).expand(a.mbs, -1)
    masks = model.get_attention_masks(positions=pos)
    print(f"titan: attention backend {backend}", flush=True)
    _baseline_loop(a, model, lambda x: model(x, pos, masks), device, hf_cfg["vocab_size"])


def _write(a, record):
    with open(a.result, "w", encoding="utf-8") as f:
        json.dump(record, f)


# ---------------------------------------------------------------------------------------------- driver
def _flops_per_token(hf_cfg, seq):
    from mindspeed_dsv.models import DeepSeekConfig
    from mindspeed_dsv.training.flops import train_flops_per_token

    return train_flops_per_token(DeepSeekConfig.from_hf(hf_cfg), seq, 0)


def _run_row(name, a, workdir, env):
    result = os.path.join(workdir, f"{name}.json")
    if os.path.exists(result):
        os.remove(result)
    common = ["--worker", name, "--workdir", workdir, "--result", result, "--seq", str(a.seq), "--mbs", str(a.mbs),
              "--gbs", str(a.gbs), "--steps", str(a.steps), "--warmup", str(a.warmup), "--titan-attn", a.titan_attn]
    if a.tiny:
        common.append("--tiny")
    me = os.path.abspath(__file__)
    if name in OURS_ROWS:
        gpus = OURS_ROWS[name][0]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
               "--master-port", str(29500 + (abs(hash(name)) % 1000)), me, *common]
    else:
        cmd = [sys.executable, me, *common]
    log = os.path.join(a.log_dir or workdir, f"{name}.log")
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=a.row_timeout)
    wall = time.time() - t0
    if proc.returncode != 0 or not os.path.exists(result):
        with open(log, encoding="utf-8", errors="replace") as f:
            tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail)[-300:], "wall_s": wall}
    with open(result, encoding="utf-8") as f:
        rec = json.load(f)
    rec["wall_s"] = wall
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", default=None,
                   help=f"Rows to run, in order; known: {', '.join([*OURS_ROWS, *BASELINES])}. Default: all that "
                   "fit the visible GPUs.")
    p.add_argument("--layers", type=int, default=4, help="Decoder layers of the proxy (first one dense).")
    p.add_argument("--seq", type=int, default=4096, help="Sequence length.")
    p.add_argument("--mbs", type=int, default=1, help="Micro-batch size.")
    p.add_argument("--gbs", type=int, default=8, help="Global batch size (samples per optimizer step).")
    p.add_argument("--steps", type=int, default=6, help="Timed steps (after warm-up).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed warm-up steps.")
    p.add_argument("--titan-attn", default="flex", choices=["flex", "varlen", "flex_flash"],
                   help="torchtitan's attention backend.")
    p.add_argument("--tiny", action="store_true", help="A tiny model of the same architecture (smoke test).")
    p.add_argument("--row-timeout", type=float, default=600, help="Seconds before a row is killed.")
    p.add_argument("--log-dir", default=None, help="Where each row's log goes (default: a temporary directory).")
    p.add_argument("--json", default=None, help="Also write the table's numbers here.")
    # internal: one row in this process
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    hf_cfg = dict(TINY if a.tiny else PROXY, num_hidden_layers=a.layers)
    if a.worker:
        if a.worker in OURS_ROWS:
            worker_ours(a, hf_cfg, OURS_ROWS[a.worker][1])
        elif a.worker == "hf":
            worker_hf(a, hf_cfg)
        elif a.worker == "titan":
            worker_titan(a, hf_cfg)
        else:
            raise SystemExit(f"unknown worker {a.worker}")
        return 0

    import torch

    gpus = torch.cuda.device_count()
    rows = a.rows or [r for r in [*OURS_ROWS, *BASELINES] if OURS_ROWS.get(r, (1,))[0] <= max(gpus, 1)]
    unknown = [r for r in rows if r not in OURS_ROWS and r not in BASELINES]
    if unknown:
        p.error(f"unknown rows {unknown}")
    device = _device()
    peak = measure_matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fpt = _flops_per_token(hf_cfg, a.seq)
    tokens_per_step = a.gbs * a.seq
    print(f"device: {gpus} x {name}; measured bf16 matmul peak: {peak and round(peak, 1)} TFLOP/s; "
          f"proxy: {a.layers} layers, seq {a.seq}, mbs {a.mbs}, gbs {a.gbs} ({tokens_per_step} tokens/step); "
          f"train FLOPs/token {fpt / 1e9:.3f} G", flush=True)
    workdir = tempfile.mkdtemp(prefix="train_mfu_")
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f)
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    results = {}
    for r in rows:
        rec = _run_row(r, a, workdir, env)
        if "error" not in rec:
            tps = tokens_per_step / rec["step_s"]
            rec["tokens_per_s"] = tps
            rec["tflops_per_gpu"] = tps * fpt / rec["world"] / 1e12
            rec["mfu"] = rec["tflops_per_gpu"] / peak if peak else None
        results[r] = rec
        print(f"{r}: {json.dumps(rec)}", flush=True)
    one = results.get("ours", {}).get("tokens_per_s")
    print()
    print(f"| row | GPUs | step s | tokens/s | TFLOP/s/GPU | MFU | peak mem GB | losses (steps 1-3) | scaling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, rec in results.items():
        if "error" in rec:
            print(f"| {r} | | | | | | | failed: {rec['error']} | |")
            continue
        scale = f"{rec['tokens_per_s'] / (rec['world'] * one) * 100:.0f}%" if (one and rec["world"] > 1) else ""
        mfu = f"{rec['mfu'] * 100:.1f}%" if rec["mfu"] is not None else "n/a"
        mem = f"{rec['peak_mem_gb']:.1f}" if rec["peak_mem_gb"] is not None else "n/a"
        losses = ", ".join(f"{x:.3f}" for x in rec["losses"][:3])
        print(f"| {r} | {rec['world']} | {rec['step_s']:.3f} | {rec['tokens_per_s']:.0f} | {rec['tflops_per_gpu']:.1f} "
              f"| {mfu} | {mem} | {losses} | {scale} |")
    print(f"\n{gpus} x {name}; bf16 matmul peak measured {peak and round(peak, 1)} TFLOP/s; scaling = tokens/s over "
          f"(GPUs x tokens/s of 'ours' on 1 GPU)")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(dict(device=name, gpus=gpus, peak_tflops=peak, flops_per_token=fpt, rows=results,
                           args=vars(a)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
