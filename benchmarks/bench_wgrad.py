"""The routed experts' weight gradient into DDP's fp32 main_grad: Triton grouped GEMM (ops/triton_wgrad.py) against
what runs without it (torch._grouped_mm writes a bf16 [E, K, N] gradient, DDP's hook adds it into fp32).

Numbers: both results against an fp32 per-expert reference (‖Δ‖/‖ref‖ of the added gradient). Speed: median of
CUDA-event timings. Shapes: the v2lite proxy's fc1 and fc2 (64 experts, top-6, mbs 2 × seq 4096) and the real
widths' (32 experts, top-8).

    python benchmarks/bench_wgrad.py            # shipped kernel
    python benchmarks/bench_wgrad.py --sweep    # + the same kernel autotuned over a wider set of tile shapes

Besides the two paths: `grouped_mm bf16` is torch._grouped_mm alone (the same FLOPs, bf16 out, no fp32 buffer: what
a tile-efficient kernel could approach), and `floor` the larger of FLOPs / measured matmul rate and the fewest bytes
(x, dy read once; the fp32 buffer read and written once) / 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from mindspeed_dsv.ops.moe import count_tokens_per_expert
from mindspeed_dsv.ops.triton_wgrad import grouped_wgrad_accumulate
from train_mfu import measure_matmul_peak  # the same 8192^3 bf16 rate train_mfu's MFU uses (benchmarks/ on sys.path)

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


def _sweep_kernel():
    """ops/triton_wgrad's kernel autotuned over a wider set of tiles, stages and warps (an experiment)."""
    import triton

    from mindspeed_dsv.ops import triton_wgrad

    configs = [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_T": bt}, num_warps=w, num_stages=st)
               for bk, bn, bt, w, st in itertools.product((64, 128, 256), (128, 256), (32, 64, 128), (4, 8), (3, 4))
               if bk * bn <= 128 * 256 and (bk + bn) * bt * 2 * st <= 200 * 1024]
    kernel = triton.autotune(configs=configs, key=["K", "N"], restore_value=["C"])(triton_wgrad._grouped_wgrad_kernel.fn)

    def run(x, dy, offs, buf):
        e, k, n = buf.shape
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), e)  # noqa: E731
        kernel[grid](x, dy, buf, offs, k, n, x.stride(0), dy.stride(0), buf.stride(0), buf.stride(1))

    return run, kernel


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="Also time the kernel autotuned over a wider config set.")
    a = p.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    tflops = measure_matmul_peak(dev)
    sweep, sweep_kernel = _sweep_kernel() if a.sweep else (None, None)
    print(f"bf16 matmul rate measured: {tflops:.0f} TFLOP/s")
    print("| shape | rows | floor ms | grouped_mm bf16 ms | torch grouped_mm + add ms | triton ms | speed-up "
          "| triton sweep ms (config) | rel err torch | rel err triton |")
    print("|---|---|---|---|---|---|---|---|---|---|")
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
        floor = max(2 * rows * k * n / tflops / 1e9, (2 * rows * (k + n) + 8 * e * k * n) / 4.8e9)  # ms
        t_mm = _time(lambda: torch._grouped_mm(x.t(), dy, offs=offs))
        t_torch = _time(lambda: torch_path(buf))
        t_triton = _time(lambda: triton_path(buf))
        swept = "—"
        if sweep is not None:
            check = base.clone()
            sweep(x, dy, offs, check)
            err = ((check - base) - ref).norm().item() / ref.norm().item()
            assert err <= max(errs[0], 1e-5), f"{name}: swept kernel error {err:.2e}"
            swept = f"{_time(lambda: sweep(x, dy, offs, buf)):.3f} ({sweep_kernel.best_config})"
        print(f"| {name} (E={e}, K={k}, N={n}) | {rows} | {floor:.3f} | {t_mm:.3f} | {t_torch:.3f} | {t_triton:.3f} "
              f"| {t_torch / t_triton:.2f}x | {swept} | {errs[0]:.2e} | {errs[1]:.2e} |", flush=True)
        assert errs[1] <= max(errs[0], 1e-5), f"{name}: triton {errs[1]:.2e} less exact than torch {errs[0]:.2e}"


if __name__ == "__main__":
    main()
