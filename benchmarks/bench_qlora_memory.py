"""Memory of a frozen QLoRA base (NF4) vs bf16, on DeepSeek-V3-shaped linears.

Each mode runs in a fresh subprocess that builds the linears one by one (bf16: keeps the bf16 weight; nf4:
quantizes it and frees the bf16 copy) and reports the bytes held by the base weights, the process RSS after
building, and the process peak RSS (ru_maxrss, which includes the transient bf16 weight being quantized).

    python benchmarks/bench_qlora_memory.py [--double-quant] [--experts N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

# (name, out_features, in_features) of DeepSeek-V3 (hidden 7168, MLA q_lora_rank 1536, kv_lora_rank 512,
# 128 heads, moe_intermediate 2048).
SHAPES = [
    ("linear_q_down_proj", 1536, 7168),
    ("linear_kv_down_proj", 576, 7168),
    ("linear_q_up_proj", 128 * 192, 1536),
    ("linear_kv_up_proj", 128 * 256, 512),
    ("linear_proj", 7168, 128 * 128),
    ("expert.linear_fc1", 2 * 2048, 7168),
    ("expert.linear_fc2", 7168, 2048),
]


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _child(mode: str, double_quant: bool, experts: int) -> dict:
    import torch

    from mindspeed_dsv.peft.nf4 import quantize_nf4

    torch.manual_seed(0)
    start_rss = _rss_bytes()
    held, per_layer = [], []
    for name, out_f, in_f in SHAPES:
        for _ in range(experts if name.startswith("expert.") else 1):
            w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
            if mode == "nf4":
                q = quantize_nf4(w, blocksize=64, double_quant=double_quant, backend="torch")
                nbytes = q.nbytes()
                held.append(q)
                del w
            else:
                nbytes = w.numel() * w.element_size()
                held.append(w)
            per_layer.append((name, out_f * in_f, nbytes))
    return dict(
        mode=mode,
        per_layer=per_layer,
        weight_bytes=sum(b for _, _, b in per_layer),
        rss_delta=_rss_bytes() - start_rss,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--double-quant", action="store_true", help="quantize the NF4 block absmax to 8 bits too")
    p.add_argument("--experts", type=int, default=2, help="number of experts' fc1/fc2 to include (default 2)")
    p.add_argument("--child", choices=["bf16", "nf4"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.double_quant, args.experts)))
        return

    results = {}
    for mode in ("bf16", "nf4"):
        cmd = [sys.executable, __file__, "--child", mode, "--experts", str(args.experts)]
        if args.double_quant:
            cmd.append("--double-quant")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])

    mib = 1 / 2**20
    bf, nf = results["bf16"], results["nf4"]
    print(f"NF4 blocksize 64, double quant {'on' if args.double_quant else 'off'}, {args.experts} experts")
    print(f"| linear | shape | bf16 MiB | NF4 MiB | ratio |")
    print(f"|---|---|---:|---:|---:|")
    for (name, n, b), (_, _, q) in zip(bf["per_layer"], nf["per_layer"]):
        shape = next(f"{o}x{i}" for s, o, i in SHAPES if s == name)
        print(f"| {name} | {shape} | {b * mib:.1f} | {q * mib:.1f} | {b / q:.2f}x |")
    print(f"| **all base weights** | | {bf['weight_bytes'] * mib:.1f} | {nf['weight_bytes'] * mib:.1f} | "
          f"{bf['weight_bytes'] / nf['weight_bytes']:.2f}x |")
    print(f"| process RSS growth | | {bf['rss_delta'] * mib:.1f} | {nf['rss_delta'] * mib:.1f} | "
          f"{bf['rss_delta'] / max(nf['rss_delta'], 1):.2f}x |")
    print(f"| process peak RSS | | {bf['peak_rss'] * mib:.1f} | {nf['peak_rss'] * mib:.1f} | "
          f"{bf['peak_rss'] / nf['peak_rss']:.2f}x |")


if __name__ == "__main__":
    main()
