"""Time each op: the plain-torch reference against every other implementation the device offers.

Shapes are DeepSeek-V2-Lite-like (hidden 2048, 16 heads, qk 192 / v 128, seq 4096, 64 experts top-6,
moe_intermediate 1408). `--small` shrinks them so the script runs on a CPU in seconds.
Each row times forward+backward (median of --iters after --warmup), in milliseconds; speedup is reference / impl.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mindspeed_dsv import ops
from mindspeed_dsv.ops import IMPL_DEVICES, OpsConfig
from mindspeed_dsv.platform import current_platform

FULL = dict(seq=4096, batch=1, hidden=2048, heads=16, qk=192, v=128, rope=64, experts=64, topk=6, ffn=1408)
SMALL = dict(seq=256, batch=1, hidden=256, heads=4, qk=48, v=32, rope=16, experts=8, topk=2, ffn=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small shapes (CPU-friendly)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on accelerators, fp32 on cpu")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (includes torch.compile)")
    p.add_argument("--ops", default=",".join(ops.OPS), help="comma-separated subset of " + ",".join(ops.OPS))
    return p.parse_args(argv)


def _time(fn, platform, iters, warmup):
    for _ in range(warmup):
        fn()
    platform.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        platform.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _inputs(name, s, device, dtype):
    """A closure running forward+backward of op `name` for a given Ops object."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=True):
        t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    tokens = s["seq"] * s["batch"]
    if name == "attention":
        q, k = rnd(s["seq"], s["batch"], s["heads"], s["qk"]), rnd(s["seq"], s["batch"], s["heads"], s["qk"])
        v = rnd(s["seq"], s["batch"], s["heads"], s["v"])
        return lambda o: o.attention(q, k, v, s["qk"] ** -0.5, causal=True).sum().backward()
    if name == "rms_norm":
        x, w = rnd(s["seq"], s["batch"], s["hidden"]), rnd(s["hidden"])
        return lambda o: o.rms_norm(x, w, 1e-6).sum().backward()
    if name == "rotary":
        x = rnd(s["seq"], s["batch"], s["heads"], s["rope"])
        cos, sin = ops.rotary_cos_sin(ops.RopeConfig(dim=s["rope"]), torch.arange(s["seq"], device=device), dtype)
        cos, sin = cos[:, None, None], sin[:, None, None]
        return lambda o: o.apply_rotary(x, cos, sin).sum().backward()
    if name == "swiglu":
        x = rnd(tokens * s["topk"], 2 * s["ffn"])
        return lambda o: o.swiglu(x).sum().backward()
    if name == "grouped_matmul":
        routed = tokens * s["topk"]
        x = rnd(routed, s["hidden"])
        w = rnd(s["experts"], s["hidden"], 2 * s["ffn"]) * 0.02
        w = w.detach().requires_grad_()
        counts = torch.bincount(torch.randint(0, s["experts"], (routed,), generator=g), minlength=s["experts"])
        counts = counts.to(device)
        return lambda o: o.grouped_matmul(x, w, counts).sum().backward()
    if name == "permute":
        x = rnd(tokens, s["hidden"])
        indices = torch.rand(tokens, s["experts"], generator=g).topk(s["topk"], dim=1).indices.to(device)
        probs = torch.rand(tokens, s["topk"], generator=g).to(device=device, dtype=torch.float32)

        def run(o):
            permuted, sorted_indices = o.permute(x, indices)
            o.unpermute(permuted, sorted_indices, probs).sum().backward()

        return run
    raise ValueError(name)


def main(argv=None):
    args = parse_args(argv)
    platform = current_platform()
    device = platform.device()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.float32 if platform.device_type == "cpu" else torch.bfloat16)
    shapes = SMALL if args.small else FULL
    chosen = ops.resolve_impls(
        OpsConfig(**{f: True for f in OpsConfig.__dataclass_fields__}), platform
    ) if platform.device_type != "cpu" else ops.resolve_impls(OpsConfig(use_flash_attn=True, moe_grouped_gemm=True), platform)
    print(f"device={platform.device_type} dtype={str(dtype).removeprefix('torch.')} shapes={shapes}")
    print(f"{'op':<16}{'impl':<14}{'ms':>10}{'speedup':>10}  note")
    for name in args.ops.split(","):
        run = _inputs(name, shapes, device, dtype)
        ref_ms = None
        for impl, devices in IMPL_DEVICES[name].items():
            if platform.device_type not in devices:
                continue
            try:
                o = ops.build_ops(platform=platform, overrides={name: impl})
                ms = _time(lambda: run(o), platform, args.iters, args.warmup)
            except Exception as e:  # noqa: BLE001 - a row that cannot run says why, the table goes on
                print(f"{name:<16}{impl:<14}{'-':>10}{'-':>10}  failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            ref_ms = ms if impl == "torch" else ref_ms
            note = "flag default" if chosen[name] == impl and impl != "torch" else ""
            speed = f"{ref_ms / ms:.2f}x" if ref_ms else "-"
            print(f"{name:<16}{impl:<14}{ms:>10.3f}{speed:>10}  {note}")


if __name__ == "__main__":
    main()
