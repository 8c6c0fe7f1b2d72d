"""The routed experts' weight gradient into DDP's fp32 main_grad: Triton grouped GEMM (ops/triton_wgrad.py) against
what runs without it (torch._grouped_mm writes a bf16 [E, K, N] gradient, DDP's hook adds it into fp32).

Numbers: both results against an fp32 per-expert reference (‖Δ‖/‖ref‖ of the added gradient). Speed: median of
CUDA-event timings. Shapes: the v2lite proxy's fc1 and fc2 (64 experts, top-6, mbs 2 × seq 4096) and the real
widths' (32 experts, top-8).

    python benchmarks/bench_wgrad.py
"""

from __future__ import annotations

import torch

from mindspeed_dsv.ops.moe import count_tokens_per_expert
from mindspeed_dsv.ops.triton_wgrad import grouped_wgrad_accumulate

# name -> (experts, top-k, tokens, K, N)
SHAPES = {
    "v2lite fc1": (64, 6, 8192, 2048, 2 * 1408),
    "v2lite fc2": (64, 6, 8192, 1408, 2048),
    "real fc1": (32, 8, 8192, 7168, 2 * 2048),
    "real fc2": (32, 8, 8192, 2048, 7168),
}


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print("| shape | rows | torch grouped_mm + add ms | triton ms | speed-up | rel err torch | rel err triton |")
    print("|---|---|---|---|---|---|---|")
    for name, (e, topk, tokens, k, n) in SHAPES.items():
        idx = torch.rand(tokens, e, device=dev, generator=g).topk(topk, dim=1).indices
        counts = count_tokens_per_expert(idx, e)
        offs = counts.to(torch.int32).cumsum(0, dtype=torch.int32)
        rows = tokens * topk
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=g)
        dy = torch.randn(rows, n, device=dev, dtype=torch.bfloat16, generator=g)
        base = torch.randn(e, k, n, device=dev, generator=g)

        ref = torch.zeros_like(base)
        for i, (xe, ge) in enumerate(zip(torch.split(x, counts.tolist()), torch.split(dy, counts.tolist()))):
            ref[i] = xe.float().t() @ ge.float()

        def torch_path(buf):
            buf.add_(torch._grouped_mm(x.t(), dy, offs=offs))  # [E, K, N] bf16, as autograd writes it

        def triton_path(buf):
            grouped_wgrad_accumulate(x, dy, offs, buf)

        errs = []
        for fn in (torch_path, triton_path):
            buf = base.clone()
            fn(buf)
            errs.append(((buf - base) - ref).norm().item() / ref.norm().item())
        buf = base.clone()
        t_torch = _time(lambda: torch_path(buf))
        t_triton = _time(lambda: triton_path(buf))
        print(f"| {name} (E={e}, K={k}, N={n}) | {rows} | {t_torch:.3f} | {t_triton:.3f} | {t_torch / t_triton:.2f}x "
              f"| {errs[0]:.2e} | {errs[1]:.2e} |", flush=True)
        assert errs[1] <= max(errs[0], 1e-5), f"{name}: triton {errs[1]:.2e} less exact than torch {errs[0]:.2e}"


if __name__ == "__main__":
    main()
