"""Train one DeepSeek-V3-shaped proxy with three stacks on the same tokens and print one throughput table.

Stacks (same HF config, same token batches, same micro-batch / global batch / sequence length, bf16):
  ours   mindspeed_dsv's trainer (its `setup` and `train_step`: megatron-core schedules, DDP, mixed-precision
         Adam with fp32 master weights), one row per named variant (kernel flags, recompute, EP=2, TP=2)
  titan  torchtitan 0.2.2's DeepSeekV3Model (PyPI; sdpa, grouped_mm), bf16 parameters, fused torch AdamW, eager
  titan-compile  the same, compiled as torchtitan's trainer does with `compile.enable` (its own apply_compile:
         torch.compile per transformer block, per MoE sub-module, and of the grouped-experts function) and a
         compiled loss: torchtitan as its users run it
  hf     transformers' DeepseekV3ForCausalLM (sdpa attention, grouped_mm experts), bf16 parameters,
         fused torch AdamW: the plain loop FSDP/DeepSpeed recipes wrap

--proxy v4 (DeepSeek-V4-Flash widths, 16 experts, one sliding, CSA and HCA layer; the comment above V4 says why
these sizes) has two rows: ours (the V4 trainer) and hf (transformers' DeepseekV4ForCausalLM, eager attention).

Both baselines train bf16 parameters without fp32 master weights: less memory traffic and memory than ours,
so the comparison favours them. Every row: median step time over the timed steps (warm-up steps excluded),
tokens/s over all GPUs of the run, TFLOP/s per GPU from mindspeed_dsv.training.flops (the same count for
every stack; recompute not counted), MFU against the bf16 matmul rate measured at the start of the same run,
peak memory (torch max_memory_allocated, rank 0), and the first losses (random tokens: each starts near
ln(vocab) = 11.54; they must agree roughly).

    python benchmarks/train_mfu.py                                     # all rows the GPUs allow (not exp:)
    python benchmarks/train_mfu.py --rows ours titan hf                # a subset
    python benchmarks/train_mfu.py --rows ours titan-compile hf --layers 8
    python benchmarks/train_mfu.py --proxy real --rows ours titan-compile hf   # DeepSeek-V3's real widths
    MFU_PROFILE=1 python benchmarks/train_mfu.py --rows ours hf        # + a torch.profiler table per row (logs)
    MFU_PROFILE=stack python benchmarks/train_mfu.py --rows ours       # ... with Python frames in the gap report
    MFU_PROFILE=1 MFU_TRACE=ours.json.gz python benchmarks/train_mfu.py --rows ours  # ... and keep the trace
    python benchmarks/train_mfu.py --tiny --rows ours-unfused hf titan # a seconds-long smoke run (cpu too)
    python benchmarks/train_mfu.py --proxy v4 --mbs 1 --gbs 4          # DeepSeek-V4-shaped: ours vs transformers
    python benchmarks/train_mfu.py --proxy v4 --tiny --seq 64          # its smoke run (cpu too)

Each row runs in its own process (torchrun for ours), so one failing stack leaves a row saying why. torchtitan
is 0.2.2 (0.3.0 needs a newer torch than 2.11); the transformers baseline needs transformers >= 5 for grouped_mm
experts. Results and commands: docs/en/performance.md; predictions and outcomes: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import socket
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

# DeepSeek-V3's real widths (hidden 7168, 128 heads, q/kv LoRA 1536/512, dense 18432, expert 2048, vocab 129280)
# with fewer experts (32, top-8 from 4 of 8 groups, 1 shared) and, by default, 2 layers (1 dense + 1 MoE), so a
# step fits one GPU. Its GEMMs have the real shapes: it measures the kernels a 671B run spends its time in.
REAL = dict(PROXY, vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            n_routed_experts=32, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1)

# DeepSeek-V4-Flash's real widths (assets/deepseek4_flash: hidden 4096, 64 query heads of 512 with one shared
# K=V head, q LoRA 1024, 8 output groups of LoRA 1024, expert 2048, vocab 129280, 4 hyper-connection streams,
# sliding window 128, CSA rate 4 with a 64x128 indexer keeping 512, HCA rate 128, sqrt-softplus top-6, clamp 10)
# with 16 instead of 256 experts and 3 layers: one of each attention type (sliding, CSA, HCA), hash routing in
# the first, learned routing in the others, as V4-Flash's first layers hash and the rest learn. Why these sizes:
# one 4096x2048 expert is 25 M parameters, so 256 of them are 6.4 B per layer; with 16, a layer is ~0.56 B and
# the model 2.7 B, whose bf16 weights + fp32 grads + fp32 master + Adam (18 B/parameter, ~49 GB) leave room for
# the dense [64 heads, S, S] attention scores both stacks hold per layer at S = 4096. 4096 x top-6 / 16 = 1536
# tokens per expert per micro-batch: the expert GEMMs have the real shapes and the token counts of an EP run of
# the 256-expert model. S = 4096 gives CSA 1024 compressed entries, so its top-512 drops half, as in training.
# No MTP (num_nextn_predict_layers 0): transformers builds none, and the V4 trainer refuses MTP > 0 for now.
V4 = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 3,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "partial_rotary_factor": 0.125,  # 64 rotary dims of 512
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    "sliding_window": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "mlp_layer_types": ["hash_moe", "moe", "moe"],
    "n_routed_experts": 16,
    "num_experts_per_tok": 6,
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-06,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 1048576,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                        "beta_fast": 32.0, "beta_slow": 1.0},
    "num_nextn_predict_layers": 0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}
PROXIES = {"v2lite": (PROXY, 4), "real": (REAL, 2), "v4": (V4, 3)}  # name -> (config, default layers)

TINY = dict(PROXY, vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2,
            num_experts_per_tok=4, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
            n_shared_experts=1, max_position_embeddings=512)

# the tiny V4 (assets/tiny_deepseek4's widths) with the proxy's layer pattern
TINY_V4 = dict(V4, vocab_size=4096, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
               partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
               index_n_heads=2, index_head_dim=16, index_topk=3, n_routed_experts=4, num_experts_per_tok=2,
               swiglu_limit=1.0, max_position_embeddings=512,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32.0, "beta_slow": 1.0})

FAST = ["--use-flash-attn", "--moe-grouped-gemm"]
FUSED = FAST + ["--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-moe-token-permute-and-unpermute",
                "--cross-entropy-loss-fusion", "--use-fused-rotary-pos-emb"]
RC = ["--recompute-granularity", "selective", "--recompute-modules"]
# name -> (GPUs, trainer flags). 'ours' is the recommended setting (the GPU templates' kernel flags); the others
# take one thing away or add one option, so each row measures one change.
OURS_ROWS = {
    "ours-ref": (1, []),
    "ours-unfused": (1, FAST),
    "ours": (1, FUSED),
    "ours-no-ce-fusion": (1, [f for f in FUSED if f != "--cross-entropy-loss-fusion"]),
    "ours-no-grad-accum-fusion": (1, FUSED + ["--no-gradient-accumulation-fusion"]),
    "ours-no-rope-fusion": (1, [f for f in FUSED if f != "--use-fused-rotary-pos-emb"]),
    "ours+rc-mla_up_proj": (1, FUSED + RC + ["mla_up_proj"]),
    "ours+rc-moe_act": (1, FUSED + RC + ["moe_act"]),
    "ours+rc-mla_up_proj,moe_act": (1, FUSED + RC + ["mla_up_proj", "moe_act"]),
    "ours+rc-full": (1, FUSED + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                 "--recompute-num-layers", "1"]),
    # experiments (benchmark-side patches, not the trainer as shipped; see NOTES.md): megatron's own token
    # dispatcher instead of LocalTokenDispatcher; megatron's for-each torch AdamW instead of the fused one;
    # gradients accumulated in bf16 (DDP grad_reduce_in_fp32=False) as the baselines do; megatron's routing
    # function compiled
    "exp:ours+megatron-dispatcher": (1, FUSED),
    "exp:ours+foreach-adam": (1, FUSED),
    "exp:ours+bf16-grads": (1, FUSED),
    "exp:ours+router-compile": (1, FUSED),
    "ours-ep2": (2, FUSED + ["--expert-model-parallel-size", "2"]),
    "ours-tp2": (2, FUSED + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}
BASELINES = ("titan", "titan-compile", "hf")
# DeepSeek-V4 (--proxy v4): our trainer with the kernel flags that act on V4 (its attention, hyper-connections
# and MoE are other modules, so the V3 kernel flags are refused for it) against transformers.
V4_ROWS = {"ours": ["--mtp-num-layers", "0", "--cross-entropy-loss-fusion"], "hf": None}


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


class _StageTimer:
    """Times one stage of a step without making the host wait for the GPU (a sync there would idle the GPU
    while the host prepares the stage, which no training run does): on cuda a pair of CUDA events around the
    stage, read once the run is over; elsewhere wall time."""

    def __init__(self, device):
        self.device = device
        self.marks = []

    def __call__(self, fn):
        import torch

        if self.device.type != "cuda":
            t0 = time.perf_counter()
            out = fn()
            self.marks.append(time.perf_counter() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        self.marks.append((start, end))
        return out

    def median_s(self, skip: int) -> float:
        _sync(self.device)
        times = sorted(m if isinstance(m, float) else m[0].elapsed_time(m[1]) / 1e3 for m in self.marks[skip:])
        return times[len(times) // 2]


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
    if a.proxy == "v4":
        argv += V4_ROWS[a.worker]
    args = build_parser().parse_args(argv)
    if a.worker.startswith("exp:"):
        _experiment_patches(a.worker)
    state = setup(args, own_batches=True)
    opt_timer = _StageTimer(device)
    real_step = state.optimizer.step
    state.optimizer.step = lambda: opt_timer(real_step)
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
    params = sum(p.numel() for m in state.models for p in m.parameters())  # this rank's share
    opt_s = opt_timer.median_s(a.warmup)
    if os.environ.get("MFU_PROFILE"):
        _profile(lambda: step(0), device)
    if dist.get_rank() == 0:
        _write(a, dict(losses=losses, step_s=sec, opt_s=opt_s, world=dist.get_world_size(), peak_mem_gb=mem,
                       params=params))
    from mindspeed_dsv.platform import destroy_distributed

    destroy_distributed()


def _experiment_patches(name: str):
    """What the exp: rows change, applied before the trainer's setup builds the model, DDP and the optimizer."""
    if "megatron-dispatcher" in name:
        from mindspeed_dsv.models import moe_layer

        moe_layer.LocalTokenDispatcher.applies = staticmethod(lambda *args: False)
    if "foreach-adam" in name:
        from mindspeed_dsv.platform import megatron_compat

        megatron_compat.SHIMS = tuple(s for s in megatron_compat.SHIMS if not s.target.startswith("megatron.core.optimizer:"))
    if "router-compile" in name:
        # megatron's top-k routing (score function, expert bias, group-limited top-k, normalisation, scatter into
        # [tokens, experts]) as one torch.compile'd graph: ~25 small kernels per MoE layer and micro-batch fewer
        import torch
        from megatron.core.transformer.moe import router

        router.topk_routing_with_score_function = torch.compile(router.topk_routing_with_score_function,
                                                                 dynamic=False)
    if "bf16-grads" in name:
        import megatron.core.distributed as mdist

        real_cfg = mdist.DistributedDataParallelConfig

        def ddp_config(**kwargs):
            kwargs["grad_reduce_in_fp32"] = False
            return real_cfg(**kwargs)

        mdist.DistributedDataParallelConfig = ddp_config


def _cross_entropy(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def _baseline_loop(a, model, forward_logits, device, vocab, loss_fn=_cross_entropy):
    """Plain loop: gradient accumulation over the global batch's micro-batches, clip 1.0, fused AdamW."""
    import torch

    tokens = make_tokens(vocab, a.gbs // a.mbs, a.mbs, a.seq).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8,
                            fused=device.type == "cuda")
    model.train()

    opt_timer = _StageTimer(device)

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def step(_):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for t in tokens:
            logits = forward_logits(t[:, :-1])
            loss = loss_fn(logits, t[:, 1:])
            (loss / len(tokens)).backward()
            total += loss.detach() / len(tokens)
        opt_timer(clip_and_step)
        return total.item()

    losses, sec = _timed_loop(step, a.steps, a.warmup, device)
    opt_s = opt_timer.median_s(a.warmup)
    if os.environ.get("MFU_PROFILE"):
        _profile(lambda: step(0), device)
    _write(a, dict(losses=losses, step_s=sec, opt_s=opt_s, world=1, peak_mem_gb=_peak_mem_gb(device),
                   params=sum(p.numel() for p in params)))


def worker_hf(a, hf_cfg):
    import torch

    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.proxy == "v4":
        from transformers import DeepseekV4Config as Config, DeepseekV4ForCausalLM as Model
    else:
        from transformers import DeepseekV3Config as Config, DeepseekV3ForCausalLM as Model
    config = Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "eager" if a.proxy == "v4" else "sdpa"  # V4 ships eager attention only
    experts = "grouped_mm" if device.type == "cuda" else "eager"
    try:
        config._experts_implementation = experts
    except Exception as err:  # older transformers: one experts implementation only
        print(f"hf: cannot select experts implementation {experts}: {err}", flush=True)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Model(config)  # V4: norms, hyper-connections, sinks stay fp32 (transformers builds them so)
    torch.set_default_dtype(torch.float32)
    if a.proxy == "v4":
        _hash_tables(model, hf_cfg)
    print(f"hf: attn={config._attn_implementation} experts={getattr(config, '_experts_implementation', None)}",
          flush=True)
    _baseline_loop(a, model, lambda x: model(input_ids=x, use_cache=False).logits, device, hf_cfg["vocab_size"])


def _hash_tables(model, hf_cfg):
    """transformers initialises tid2eid to zeros (every token to expert 0; the values come from a checkpoint):
    give it k distinct experts per token, the table our trainer draws for a model trained from scratch."""
    import torch

    g = torch.Generator().manual_seed(0)
    table = torch.rand(hf_cfg["vocab_size"], hf_cfg["n_routed_experts"], generator=g).argsort(dim=-1)
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            buf.copy_(table[:, : buf.shape[1]])


def _import_titan():
    """torchtitan 0.2.2's DeepSeek-V3 model. 0.3.0 needs a newer torch than the GPU image's 2.11
    (torch.distributed.fsdp.DataParallelMeshDims). Its package __init__ pulls in the HF `datasets` data loader,
    which the model does not use: a stub module stands in for it."""
    import types

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for mod in ("datasets", "datasets.distributed"):
        sys.modules.setdefault(mod, _Stub(mod))
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.moe import MoEArgs

    return DeepSeekV3ModelArgs, DeepSeekV3Model, MoEArgs


def titan_model(hf_cfg, device):
    """torchtitan's DeepSeekV3Model with the proxy's shapes (its 16B flavour with our widths and V3 routing)."""
    import torch

    Args, Model, MoEArgs = _import_titan()
    c = hf_cfg
    moe = MoEArgs(num_experts=c["n_routed_experts"], num_shared_experts=c["n_shared_experts"], score_func="sigmoid",
                  route_norm=c["norm_topk_prob"], route_scale=c["routed_scaling_factor"], top_k=c["num_experts_per_tok"],
                  num_expert_groups=c["n_group"], num_limited_groups=c["topk_group"], use_grouped_mm=device.type == "cuda")
    args = Args(vocab_size=c["vocab_size"], dim=c["hidden_size"], inter_dim=c["intermediate_size"],
                moe_inter_dim=c["moe_intermediate_size"], n_layers=c["num_hidden_layers"],
                n_dense_layers=c["first_k_dense_replace"], n_heads=c["num_attention_heads"], norm_eps=c["rms_norm_eps"],
                moe_args=moe, q_lora_rank=c["q_lora_rank"] or 0, kv_lora_rank=c["kv_lora_rank"],
                qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
                v_head_dim=c["v_head_dim"], max_seq_len=c["max_position_embeddings"],
                original_seq_len=c["max_position_embeddings"], rope_theta=c["rope_parameters"]["rope_theta"],
                rope_factor=1.0)
    args.moe_impl = "standard"  # set from the job config in torchtitan's trainer
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Model(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if device.type == "cuda":
        # parameters only: Module.to(bf16) would also cast the complex rotary table
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return model


def worker_titan(a, hf_cfg, compile_model: bool = False):
    device = _device()
    model = titan_model(hf_cfg, device)
    loss_fn = _cross_entropy
    if compile_model:
        import torch
        from torchtitan.config.job_config import Compile
        from torchtitan.models.llama4.infra.parallelize import apply_compile

        # torchtitan's own recipe (its DeepSeek-V3 parallelize_fn calls this apply_compile when compile.enable
        # is set; components default to model and loss): per-block / per-MoE-submodule torch.compile.
        apply_compile(model, Compile(enable=True), ep_enabled=False)
        loss_fn = torch.compile(_cross_entropy)
    print(f"titan: torchtitan 0.2.2 DeepSeekV3Model, sdpa attention, grouped_mm experts, "
          f"{'compiled (apply_compile + compiled loss)' if compile_model else 'eager'}", flush=True)
    _baseline_loop(a, model, lambda x: model(x), device, hf_cfg["vocab_size"], loss_fn)


def _profile(step, device, top: int = 45):
    """One more step under torch.profiler: the kernels that take the GPU's time (set MFU_PROFILE=1), and where the
    GPU waited for the host (`_host_gaps`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # MFU_PROFILE=stack also records Python frames for the gap report: more exact places, but its host overhead
    # inflates every gap (~3x at 4 layers); MFU_PROFILE=1 names the aten ops only
    stack = os.environ.get("MFU_PROFILE") == "stack"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stack) as prof:
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    if int(os.environ.get("RANK", "0")) == 0:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70),
              flush=True)
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        print(f"profile: GPU busy (sum of self device time) {busy:.1f} ms in one step of {wall:.1f} ms wall "
              f"(profiler overhead included)", flush=True)
        if device.type == "cuda":
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "trace.json")
                prof.export_chrome_trace(path)
                if os.environ.get("MFU_TRACE"):  # keep the trace (gzip) for chrome://tracing / perfetto
                    with open(path, "rb") as f, gzip.open(os.environ["MFU_TRACE"], "wb") as out:
                        shutil.copyfileobj(f, out)
                with open(path, encoding="utf-8") as f:
                    print(_host_gaps(json.load(f)["traceEvents"]), flush=True)
            print(_sync_points(step), flush=True)


def _sync_points(step) -> str:
    """One more step with torch's CUDA sync debug mode on: each place that made the host wait for the GPU
    (`.item()`, a host copy, a data-dependent shape), as the innermost frames outside torch, with a count."""
    import traceback
    import warnings

    import torch

    seen: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        key = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        seen[key] = seen.get(key, 0) + 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning on the way out
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lines = [f"sync points in one step ({sum(seen.values())}):"]
    lines += [f"{n:6d}  {key}" for key, n in sorted(seen.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _host_gaps(events, min_us: float = 5.0, top: int = 25) -> str:
    """Where the GPU sat idle in a profiled step, and what the host was doing: every idle interval between kernels
    longer than min_us is charged to the code that launched the kernel after it (its innermost Python frame
    outside torch, and the innermost aten op). A gap whose next kernel was launched after the previous one
    ended is host-bound (launch overhead, Python, a sync before it); the table sums them per place."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    # kernels launched through the runtime (cudaLaunchKernel) or the driver (Triton, inductor: cuLaunchKernel)
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    host = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function")),
                  key=lambda e: e["ts"])
    starts = [e["ts"] for e in host]

    def place(t, tid):
        py, op = None, None
        # enclosing host events: start <= t <= end, same thread; the innermost has the latest start
        i = bisect.bisect_right(starts, t)
        for e in reversed(host[max(0, i - 4000):i]):
            if e.get("tid") != tid or e["ts"] + e["dur"] < t:
                continue
            name = e["name"]
            if e["cat"] == "cpu_op" and op is None:
                op = name
            if e["cat"] == "python_function" and py is None and ".py(" in name and "/torch/" not in name:
                py = name
            if py and op:
                break
        return f"{(py or '?')[-70:]} | {op or '?'}"

    def launch_place(kernel):
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        return place(launch["ts"], launch["tid"]) if launch else f"(no launch record: {kernel['name'][:40]})"

    total, per_place, per_prev, end, prev = 0.0, {}, {}, None, None
    for k in gpu:
        if end is not None and k["ts"] - end > min_us:
            gap = k["ts"] - end
            total += gap
            for table, key in ((per_place, launch_place(k)), (per_prev, launch_place(prev))):
                n, t = table.get(key, (0, 0.0))
                table[key] = (n + 1, t + gap)
        end = max(end or 0.0, k["ts"] + k["dur"])
        prev = k
    syncs = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and e.get("name", "").startswith(_SYNC_CALLS) and e.get("dur", 0) > 20:
            key = place(e["ts"], e["tid"])
            n, t = syncs.get(key, (0, 0.0))
            syncs[key] = (n + 1, t + e["dur"])
    lines = [f"host gaps: GPU idle {total / 1e3:.1f} ms between kernels (gaps > {min_us:g} us), by the place that "
             f"launched the next kernel:", f"{'ms':>8} {'gaps':>6}  place (python frame | aten op)"]
    for key, (n, t) in sorted(per_place.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{t / 1e3:8.2f} {n:6d}  {key}")
    lines.append("the same gaps by the place that launched the kernel before the gap:")
    for key, (n, t) in sorted(per_prev.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{t / 1e3:8.2f} {n:6d}  {key}")
    lines.append("host waits on the GPU (synchronising CUDA calls > 20 us), by place:")
    for key, (n, t) in sorted(syncs.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{t / 1e3:8.2f} {n:6d}  {key}")
    return "\n".join(lines)


def _write(a, record):
    with open(a.result, "w", encoding="utf-8") as f:
        json.dump(record, f)


# ---------------------------------------------------------------------------------------------- driver
def _flops_per_token(hf_cfg, seq):
    from mindspeed_dsv.models.family import model_config
    from mindspeed_dsv.training.flops import train_flops_per_token

    return train_flops_per_token(model_config(hf_cfg), seq, 0)


def v4_config(base: dict, layers: int) -> dict:
    """The V4 proxy with `layers` layers: attention types cycle sliding, CSA, HCA; the first layer hashes."""
    kinds = base["layer_types"]
    return dict(base, num_hidden_layers=layers, layer_types=[kinds[i % len(kinds)] for i in range(layers)],
                mlp_layer_types=["hash_moe"] + ["moe"] * (layers - 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_params(hf_cfg) -> int:
    """Trainable parameters of the configured shape, counted from the planner's tensor inventory (no MTP)."""
    from mindspeed_dsv import plan
    from mindspeed_dsv.models import DeepSeekConfig
    from mindspeed_dsv.models.family import DEEPSEEK4, family_of, model_config

    if family_of(hf_cfg) == DEEPSEEK4:
        from mindspeed_dsv import plan_deepseek4 as p4

        c = model_config(hf_cfg)
        tensors = p4.embedding_tensors(c) + p4.output_tensors(c)
        for i in range(c.num_hidden_layers):
            tensors += p4.hf_layer_tensors(c, i)
        # the CSA indexer is frozen in our trainer and gets no gradient in transformers: counted, as built
        return sum(t.numel for t in tensors if t.trainable)
    m = DeepSeekConfig.from_hf(hf_cfg)
    tensors = plan.embedding_tensors(m) + plan.output_tensors(m)
    for i in range(m.num_hidden_layers):
        tensors += plan.decoder_layer_tensors(m, dense=i < m.first_k_dense_replace)
    return sum(t.numel for t in tensors if t.trainable)


def _run_row(name, a, workdir, env):
    result = os.path.join(workdir, f"{name}.json")
    if os.path.exists(result):
        os.remove(result)
    # Every model-shape option goes to every row: a worker builds its model from exactly these.
    common = ["--worker", name, "--workdir", workdir, "--result", result, "--seq", str(a.seq), "--mbs", str(a.mbs),
              "--gbs", str(a.gbs), "--steps", str(a.steps), "--warmup", str(a.warmup), "--proxy", a.proxy,
              "--layers", str(a.layers)]
    if a.tiny:
        common.append("--tiny")
    me = os.path.abspath(__file__)
    if name in OURS_ROWS:
        gpus = OURS_ROWS[name][0]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
               "--master-port", str(_free_port()), me, *common]
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
                   help=f"Rows to run, in order; known: {', '.join([*OURS_ROWS, *BASELINES])}. Default: all but the "
                   "exp: rows that fit the visible GPUs.")
    p.add_argument("--proxy", choices=sorted(PROXIES), default="v2lite",
                   help="Model widths: v2lite (DeepSeek-V2-Lite widths, V3 routing; 4 layers by default), real "
                   "(DeepSeek-V3's real widths, 32 experts; 2 layers by default) or v4 (DeepSeek-V4-Flash's widths, "
                   "16 experts, sliding/CSA/HCA layers; 3 by default; rows ours and hf).")
    p.add_argument("--layers", type=int, default=None, help="Decoder layers of the proxy (first one dense); "
                   "default: the proxy's own (4 for v2lite, 2 for real).")
    p.add_argument("--seq", type=int, default=4096, help="Sequence length.")
    p.add_argument("--mbs", type=int, default=2, help="Micro-batch size.")
    p.add_argument("--gbs", type=int, default=8, help="Global batch size (samples per optimizer step).")
    p.add_argument("--steps", type=int, default=4, help="Timed steps (after warm-up).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed warm-up steps.")
    p.add_argument("--tiny", action="store_true", help="A tiny model of the same architecture (smoke test).")
    p.add_argument("--row-timeout", type=float, default=600, help="Seconds before a row is killed.")
    p.add_argument("--log-dir", default=None, help="Where each row's log goes (default: a temporary directory).")
    p.add_argument("--json", default=None, help="Also write the table's numbers here.")
    # internal: one row in this process
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    base, default_layers = PROXIES[a.proxy]
    a.layers = a.layers or default_layers
    if a.proxy == "v4":
        hf_cfg = v4_config(TINY_V4 if a.tiny else base, a.layers)
    else:
        hf_cfg = dict(TINY if a.tiny else base, num_hidden_layers=a.layers)
    if a.worker:
        if a.worker in OURS_ROWS:
            worker_ours(a, hf_cfg, [] if a.proxy == "v4" else OURS_ROWS[a.worker][1])  # v4: V4_ROWS' flags
        elif a.worker == "hf":
            worker_hf(a, hf_cfg)
        elif a.worker in ("titan", "titan-compile"):
            worker_titan(a, hf_cfg, compile_model=a.worker == "titan-compile")
        else:
            raise SystemExit(f"unknown worker {a.worker}")
        return 0

    import torch

    gpus = torch.cuda.device_count()
    if a.proxy == "v4":
        rows = a.rows or list(V4_ROWS)
        unknown = [r for r in rows if r not in V4_ROWS]
    else:
        rows = a.rows or [r for r in [*OURS_ROWS, *BASELINES]
                          if OURS_ROWS.get(r, (1,))[0] <= max(gpus, 1) and not r.startswith("exp:")]
        unknown = [r for r in rows if r not in OURS_ROWS and r not in BASELINES]
    if unknown:
        p.error(f"unknown rows {unknown}")
    device = _device()
    peak = measure_matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fpt = _flops_per_token(hf_cfg, a.seq)
    tokens_per_step = a.gbs * a.seq
    want_params = expected_params(hf_cfg)
    print(f"device: {gpus} x {name}; measured bf16 matmul peak: {peak and round(peak, 1)} TFLOP/s; "
          f"proxy: {a.proxy}{' (tiny)' if a.tiny else ''}, {a.layers} layers, {want_params / 1e9:.3f} B parameters, "
          f"seq {a.seq}, mbs {a.mbs}, gbs {a.gbs} ({tokens_per_step} tokens/step); "
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
        # A row whose model is not the configured shape measures something else: fail it. Multi-GPU rows hold a
        # share of the parameters per rank and are not compared.
        if "error" not in rec and rec["world"] == 1 and rec.get("params") != want_params:
            rec = {"error": f"built {rec.get('params')} parameters, the configured shape has {want_params}",
                   "wall_s": rec["wall_s"]}
        if "error" not in rec:
            tps = tokens_per_step / rec["step_s"]
            rec["tokens_per_s"] = tps
            rec["tflops_per_gpu"] = tps * fpt / rec["world"] / 1e12
            rec["mfu"] = rec["tflops_per_gpu"] / peak if peak else None
        results[r] = rec
        print(f"{r}: {json.dumps(rec)}", flush=True)
    one = results.get("ours", {}).get("tokens_per_s")
    print()
    print(f"| row | GPUs | parameters | step s | of which optimizer s | tokens/s | TFLOP/s/GPU | MFU | peak mem GB | losses (steps 1-3) | scaling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r, rec in results.items():
        if "error" in rec:
            print(f"| {r} | | | | | | | | | failed: {rec['error']} | |")
            continue
        scale = f"{rec['tokens_per_s'] / (rec['world'] * one) * 100:.0f}%" if (one and rec["world"] > 1) else ""
        mfu = f"{rec['mfu'] * 100:.1f}%" if rec["mfu"] is not None else "n/a"
        mem = f"{rec['peak_mem_gb']:.1f}" if rec["peak_mem_gb"] is not None else "n/a"
        losses = ", ".join(f"{x:.3f}" for x in rec["losses"][:3])
        params = f"{rec['params'] / 1e9:.3f} B" + (" (rank 0)" if rec["world"] > 1 else "")
        print(f"| {r} | {rec['world']} | {params} | {rec['step_s']:.3f} | {rec.get('opt_s', float('nan')):.3f} | {rec['tokens_per_s']:.0f} | {rec['tflops_per_gpu']:.1f} "
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
