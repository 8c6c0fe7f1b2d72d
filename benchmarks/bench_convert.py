"""hf2mcore throughput and peak RSS on a synthetic checkpoint with real DeepSeek-V3 tensor shapes, against a plain
safetensors read + write of the same bytes.

Every tensor has its DeepSeek-V3 shape: hidden 7168, MLA (q_lora 1536, kv_lora 512, 128 heads of 128+64 / v 128),
routed experts of moe_intermediate 2048, one shared expert, dense MLP of 18432. What is scaled down is how many
tensors there are: `--dense-layers` dense layers and `--moe-layers` MoE layers with `--experts` routed experts each
(the real model: 3 dense + 58 MoE layers of 256 experts), and the vocabulary (32768 instead of 129280) so the
layers dominate. bf16, random values. Each measurement runs in its own process so peak RSS (ru_maxrss of that
child) is its own. The synthetic files are deleted at the end (--keep to keep them).

    python benchmarks/bench_convert.py --dense-layers 1 --moe-layers 1 --experts 32 --work /tmp/bench_convert

`--family deepseek4`: the same harness on DeepSeek-V4-Flash shapes (assets/deepseek4_flash/config.json: hidden 4096,
64 heads of 512, q_lora 1024, o_lora 1024 in 8 groups, moe_intermediate 2048, one shared expert, hyper-connections
of 4 streams), scaled down to `--moe-layers` layers (every V4 layer is MoE; layer 0 is hash-routed, then the
release's compress ratios 0 (sliding), 4 (CSA, with the indexer), 128 (HCA) in turn), `--experts` routed experts
and vocabulary 32768, no MTP. `--spelling official` (default) writes the release's spelling as users download it:
per-expert `ffn.experts.E.w1/w2/w3` in FP4 e2m1 (int8, two per byte) with 1x32 ue8m0 `.scale`s, the other 2-D
projections of at least 128x128 in FP8 e4m3 with 128x128 ue8m0 `.scale`s, embedding/head/norms/hyper-connections
unquantized; `--spelling transformers` writes transformers' bf16 names with experts stacked per layer
([E, 2I, D] / [E, D, I], served per expert through safetensors slices).

    python benchmarks/bench_convert.py --family deepseek4 --moe-layers 3 --experts 32 --work /tmp/bench_convert_v4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(path: str, dense_layers: int, moe_layers: int, experts: int) -> int:
    import torch
    from safetensors.torch import save_file

    layers = dense_layers + moe_layers
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 32768,
           "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
           "num_hidden_layers": layers, "num_attention_heads": 128, "num_key_value_heads": 128,
           "n_shared_experts": 1, "n_routed_experts": experts, "kv_lora_rank": 512, "q_lora_rank": 1536,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "first_k_dense_replace": dense_layers,
           "num_nextn_predict_layers": 0, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    os.makedirs(path, exist_ok=True)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    from mindspeed_dsv.models.names import expected_hf_shape

    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)

    def rnd(shape, dtype=torch.bfloat16):
        return (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5).to(dtype)

    files = [("model-00000.safetensors", ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"])]
    attn = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_a_proj.weight",
            "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
            "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        if i < dense_layers:
            mlp = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
        else:
            mlp = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "mlp.shared_experts.gate_proj.weight",
                   "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight")
        files.append((f"model-{i + 1:05d}-main.safetensors", [p + s for s in attn + mlp]))
        # routed experts in files of 32 experts (~2.8 GB each), generated when written
        for part in range(0, experts if i >= dense_layers else 0, 32):
            files.append((f"model-{i + 1:05d}-experts{part // 32}.safetensors",
                          [p + f"mlp.experts.{e}.{w}_proj.weight" for e in range(part, min(experts, part + 32))
                           for w in ("gate", "up", "down")]))
    for fname, names in files:
        t = {}
        for n in names:
            t[n] = rnd(expected_hf_shape(cfg, n), torch.float32 if n.endswith("correction_bias") else torch.bfloat16)
        save_file(t, os.path.join(path, fname))
        for n, v in t.items():
            weight_map[n] = fname
            total += v.numel() * v.element_size()
        t.clear()
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return total


V4_RATIOS = (0, 4, 128)  # sliding, CSA, HCA: the release's compress_ratios cycle after its first two layers


def make_checkpoint_v4(path: str, layers: int, experts: int, spelling: str) -> int:
    import torch
    from safetensors.torch import save_file

    from ckpt_convert.deepseek4 import _hf_shapes
    from ckpt_convert.fp8 import BLOCK, FP4_BLOCK
    from mindspeed_dsv.models.deepseek4.names import transformers_to_official

    cfg = json.load(open(os.path.join(ROOT, "assets", "deepseek4_flash", "config.json")))
    cfg.update(num_hidden_layers=layers, n_routed_experts=experts, vocab_size=32768, num_hash_layers=1,
               num_nextn_predict_layers=0, compress_ratios=[V4_RATIOS[i % 3] for i in range(layers)] + [0])
    os.makedirs(path, exist_ok=True)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    shapes = _hf_shapes(json.dumps(cfg, sort_keys=True))  # transformers' names, routed experts per expert
    g = torch.Generator().manual_seed(0)

    def rnd(shape, dtype=torch.bfloat16):
        return (torch.rand(shape, generator=g, dtype=torch.bfloat16) - 0.5).to(dtype)

    def ue8m0(shape, low, high):  # the release's power-of-two scales
        return torch.pow(2.0, torch.randint(low, high, shape, generator=g).float()).to(torch.float8_e8m0fnu)

    def dense(name):
        """A non-expert tensor with the dtype transformers_state gives it (fp32 norms and hc scales, int64
        tid2eid); in the official spelling a 2-D projection of >= 128x128 becomes FP8 + its .scale."""
        shape = shapes[name]
        if name.endswith("tid2eid"):
            return {name: torch.randint(0, experts, shape, generator=g)}
        if name.endswith(("norm.weight", "layernorm.weight", "hc_scale", ".scale", "correction_bias")):
            return {name: rnd(shape, torch.float32)}
        big = len(shape) == 2 and min(shape) >= BLOCK and name not in ("model.embed_tokens.weight", "lm_head.weight")
        if spelling == "official" and big and name.endswith(".weight"):
            q = ((torch.rand(shape, generator=g) - 0.5) * 800).to(torch.float8_e4m3fn)
            return {name: q, name[:-len("weight")] + "scale": ue8m0((-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)),
                                                                   -14, -8)}
        return {name: rnd(shape)}

    def official(t: dict) -> dict:  # transformers' names -> the release's, a `.scale` following its weight
        scales = {k: v for k, v in t.items() if k.endswith(".scale") and k[:-len("scale")] + "weight" in t}
        out = transformers_to_official({k: v for k, v in t.items() if k not in scales}, None)
        inv = transformers_to_official({k[:-len("scale")] + "weight": k for k in scales}, None)
        return dict(out, **{k[:-len("weight")] + "scale": scales[v] for k, v in inv.items()})

    weight_map, total = {}, 0

    def write(fname, t):
        nonlocal total
        save_file(t, os.path.join(path, fname))
        for n, v in t.items():
            weight_map[n] = fname
            total += v.numel() * v.element_size()

    glob = {}
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.hc_head.hc_fn",
              "model.hc_head.hc_base", "model.hc_head.hc_scale"):
        glob.update(dense(n))
    write("model-00000.safetensors", official(glob) if spelling == "official" else glob)
    for i in range(layers):
        p = f"model.layers.{i}."
        main = {}
        for n in shapes:
            if n.startswith(p) and ".mlp.experts." not in n:
                main.update(dense(n))
        write(f"model-{i + 1:05d}-main.safetensors", official(main) if spelling == "official" else main)
        inter, hidden = shapes[p + "mlp.experts.0.gate_proj.weight"]
        for part in range(0, experts, 32):  # routed experts in files of 32, generated when written
            es = range(part, min(experts, part + 32))
            fname = f"model-{i + 1:05d}-experts{part // 32}.safetensors"
            if spelling == "official":
                t = {}
                for e in es:
                    for w, (rows, cols) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                        name = f"layers.{i}.ffn.experts.{e}.{w}."
                        t[name + "weight"] = torch.randint(-128, 128, (rows, cols // 2), generator=g, dtype=torch.int8)
                        t[name + "scale"] = ue8m0((rows, cols // FP4_BLOCK), -10, -6)
            else:  # transformers stacks all experts of a layer in two tensors: one file per layer
                if part:
                    break
                t = {p + "mlp.experts.gate_up_proj": rnd((experts, 2 * inter, hidden)),
                     p + "mlp.experts.down_proj": rnd((experts, hidden, inter))}
            write(fname, t)
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return total


def largest_hf_tensor(hf_dir: str) -> tuple[str, int]:
    """The largest tensor hf2mcore reads whole, in bytes as read (FP8/FP4 dequantized to bf16); stacked experts
    are served one expert at a time, so they count per expert."""
    import math

    import torch

    from ckpt_convert import hf_io
    from ckpt_convert.deepseek4 import hf_reader, is_v4

    cfg = hf_io.read_config(hf_dir)
    reader = hf_reader(hf_dir, torch.bfloat16, False) if is_v4(cfg) else hf_io.HFReader(hf_dir, verify_checksums=False)
    raw = getattr(reader, "raw", reader)  # OfficialV4Reader wraps an HFReader
    width = {"F32": 4, "I64": 8, "BF16": 2, "F8_E4M3": 2, "I8": 2}  # quantized ones are read as bf16
    best = ("", 0)
    for n in reader.names():
        src = reader._src_of(n) if hasattr(reader, "_src_of") else n
        if src not in raw.file_of or src.endswith(("_scale_inv", ".scale")):
            continue  # a served per-expert slice of a stacked tensor (counted below) or a scale
        best = max(best, (n, width[raw._raw_dtype(src)] * math.prod(reader.shape(n))), key=lambda x: x[1])
    for n in getattr(raw, "_virtual", {}):
        best = max(best, (n, 2 * math.prod(reader.shape(n))), key=lambda x: x[1])
    reader.close()
    return best


def largest_file(directory: str) -> int:
    return max((os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs), default=0)


def plain_copy(src: str, dst: str) -> None:
    """The baseline: read every tensor with safetensors and write it back, in output files of at most 1/8 of a
    layer (the size of an EP=8 rank file), so both sides hold about the same amount in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    limit = 3 * 2**30
    n = 0
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(src, f), "pt") as h:
                t, size = {}, 0
                for k in h.keys():
                    t[k] = h.get_tensor(k)
                    size += t[k].numel() * t[k].element_size()
                    if size >= limit:
                        save_file(t, os.path.join(dst, f"{n:05d}.safetensors"))
                        n, t, size = n + 1, {}, 0
                if t:
                    save_file(t, os.path.join(dst, f"{n:05d}.safetensors"))
                    n += 1


_CHILD = """import resource, runpy, sys, threading, time
peak = [0]
def poll():
    while True:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('RssAnon:'):
                    peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=poll, daemon=True).start()
sys.argv = %r
try:
    %s
finally:
    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    print('ANON', peak[0], flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("deepseek3", "deepseek4"), default="deepseek3",
                    help="Tensor shapes of DeepSeek-V3 or DeepSeek-V4-Flash. Default deepseek3.")
    ap.add_argument("--spelling", choices=("official", "transformers"), default="official",
                    help="deepseek4 only: the release's names with FP8/FP4 weights, or transformers' bf16 names "
                         "with stacked experts. Default official.")
    ap.add_argument("--dense-layers", type=int, default=1,
                    help="Dense-MLP layers (first_k_dense_replace); deepseek3 only (V4 has none). Default 1.")
    ap.add_argument("--moe-layers", type=int, default=1, help="MoE layers. Default 1.")
    ap.add_argument("--experts", type=int, default=32, help="Routed experts per MoE layer (real: 256). Default 32.")
    ap.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoint in --work afterwards.")
    ap.add_argument("--reuse", action="store_true", help="Reuse the synthetic checkpoint a --keep run left in --work.")
    ap.add_argument("--work", default="/tmp/bench_convert")
    ap.add_argument("--layouts", default=None, help="comma list of: tp1, ep8, tp2pp2ep4, pp2, pp2ep4. Default "
                    "tp1,ep8,tp2pp2ep4 (deepseek4: tp1,ep8,pp2ep4; V4 converts TP 1 only).")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    v4 = ns.family == "deepseek4"
    if v4 and ns.dense_layers != ap.get_default("dense_layers"):
        ap.error("--dense-layers: DeepSeek-V4 has no dense layers (every layer is MoE); give --moe-layers")
    if not v4 and ns.spelling != ap.get_default("spelling"):
        ap.error("--spelling is for --family deepseek4 (the V3 checkpoint is transformers-spelled bf16)")
    ns.layouts = ns.layouts or ("tp1,ep8,pp2ep4" if v4 else "tp1,ep8,tp2pp2ep4")
    if ns.mode == "plain":
        plain_copy(os.path.join(ns.work, "hf"), os.path.join(ns.work, "plain"))
        return
    t0 = time.time()
    index = os.path.join(ns.work, "hf", "model.safetensors.index.json")
    if ns.reuse and os.path.isfile(index):
        total = json.load(open(index))["metadata"]["total_size"]
    else:
        shutil.rmtree(ns.work, ignore_errors=True)
        total = (make_checkpoint_v4(os.path.join(ns.work, "hf"), ns.moe_layers, ns.experts, ns.spelling) if v4 else
                 make_checkpoint(os.path.join(ns.work, "hf"), ns.dense_layers, ns.moe_layers, ns.experts))
    what = (f"DeepSeek-V4-Flash shapes, {ns.spelling} spelling, {ns.moe_layers} MoE layers" if v4 else
            f"DeepSeek-V3 shapes, {ns.dense_layers} dense + {ns.moe_layers} MoE layers")
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB on disk, {what} of {ns.experts} experts, made in "
          f"{time.time() - t0:.0f} s")
    big_name, big = largest_hf_tensor(os.path.join(ns.work, "hf"))
    print(f"largest HF tensor as read: {big_name} {big / 2**30:.3f} GiB")
    layouts = {"tp1": [], "ep8": ["--target-expert-parallel-size", "8"], "pp2": ["--target-pipeline-parallel-size", "2"],
               "pp2ep4": ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "4"],
               "tp2pp2ep4": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                             "--target-expert-parallel-size", "4"]}
    layers = ns.moe_layers + (0 if v4 else ns.dense_layers)
    for name in ("pp2", "pp2ep4", "tp2pp2ep4"):
        if layers % 2:  # uneven stages, the first one longer
            layouts[name] += ["--num-layer-list", f"{(layers + 1) // 2},{layers // 2}"]
    rows = []
    # One fresh interpreter per measurement; it prints its own ru_maxrss at exit.
    for name in ["plain"] + [x for x in ns.layouts.split(",") if x]:
        if name == "plain":
            argv = [os.path.abspath(__file__), "--mode", "plain", "--work", ns.work]
        else:
            out = os.path.join(ns.work, "mc_" + name)
            argv = ["-m", "ckpt_convert", "hf2mcore", "--load-dir", os.path.join(ns.work, "hf"), "--save-dir", out,
                    "--no-progress"] + layouts[name]
        # `python -m ckpt_convert` ends in sys.exit: print ru_maxrss in a finally so it is always reported.
        # ru_maxrss counts the memory-mapped source pages the process touched (clean page cache the kernel can
        # drop); a thread also samples RssAnon (heap: the tensors themselves) every 20 ms.
        runner = ("runpy.run_module('ckpt_convert', run_name='__main__')" if argv[0] == "-m"
                  else "runpy.run_path(sys.argv[0], run_name='__main__')")
        wrapped = ["-c", _CHILD % ((["-m"] + argv[2:]) if argv[0] == "-m" else argv, runner)]
        env = dict(os.environ, PYTHONPATH=ROOT, TORCHDYNAMO_DISABLE="1")
        t1 = time.time()
        p = subprocess.run([sys.executable] + wrapped, env=env, capture_output=True, text=True)
        secs = time.time() - t1
        if p.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
        rss = int([line for line in p.stdout.splitlines() if line.startswith("MAXRSS")][-1].split()[1]) / 1024 ** 2
        anon = int([line for line in p.stdout.splitlines() if line.startswith("ANON")][-1].split()[1]) / 1024 ** 2
        rank_file = largest_file(os.path.join(ns.work, "plain" if name == "plain" else "mc_" + name)) / 2**30
        rows.append((name, secs, total / secs / 1e9, rss, anon, rank_file))
        print(f"{name}: {rows[-1][1:]}", flush=True)  # kept even if a later run fails
        shutil.rmtree(os.path.join(ns.work, "plain" if name == "plain" else "mc_" + name), ignore_errors=True)
    print(f"\n| run | seconds | GB/s (source bytes / time) | peak RSS GiB | peak anon RSS GiB | largest output file "
          f"GiB | anon - file - HF tensor GiB |\n|---|---|---|---|---|---|---|")
    for name, secs, gbps, rss, anon, rank_file in rows:
        label = "plain safetensors read+write" if name == "plain" else f"hf2mcore {name}"
        print(f"| {label} | {secs:.1f} | {gbps:.3f} | {rss:.2f} | {anon:.2f} | {rank_file:.2f} | "
              f"{anon - rank_file - big / 2**30:.2f} |")
    if not ns.keep:
        shutil.rmtree(ns.work, ignore_errors=True)


if __name__ == "__main__":
    main()
