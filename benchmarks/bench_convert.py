"""hf2mcore throughput and peak RSS on a synthetic checkpoint with real DeepSeek-V3 tensor shapes, against a plain
safetensors read + write of the same bytes.

Shapes: hidden 7168, 256 routed experts of moe_intermediate 2048, one shared expert, MLA (q_lora 1536,
kv_lora 512, 128 heads of 128+64 / v 128), vocab shrunk to 32768 so the layers dominate; `--layers` MoE layers
(first_k_dense_replace 0), bf16, random values. Each measurement runs in its own process so peak RSS
(ru_maxrss of that child) is its own.

    python benchmarks/bench_convert.py --layers 2 --work /tmp/bench_convert
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(path: str, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 32768,
           "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
           "num_hidden_layers": layers, "num_attention_heads": 128, "num_key_value_heads": 128,
           "n_shared_experts": 1, "n_routed_experts": 256, "kv_lora_rank": 512, "q_lora_rank": 1536,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "first_k_dense_replace": 0,
           "num_nextn_predict_layers": 0, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    os.makedirs(path, exist_ok=True)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    from mindspeed_dsv.models.names import expected_hf_shape

    H, E = 7168, 256
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)

    def rnd(shape, dtype=torch.bfloat16):
        return (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5).to(dtype)

    other = {n: rnd(expected_hf_shape(cfg, n)) for n in ("model.embed_tokens.weight", "lm_head.weight",
                                                           "model.norm.weight")}
    files = [("model-00000.safetensors", other)]
    for i in range(layers):
        p = f"model.layers.{i}."
        names = [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_a_proj.weight",
                                 "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight",
                                 "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                                 "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "mlp.gate.weight",
                                 "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
                                 "mlp.shared_experts.down_proj.weight")]
        t = {n: rnd(expected_hf_shape(cfg, n)) for n in names}
        t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(E, dtype=torch.float32)
        files.append((f"model-{i + 1:05d}-attn.safetensors", t))
        # routed experts in 8 files of 32 experts (~2.8 GB each), generated lazily when written
        for part in range(8):
            files.append((f"model-{i + 1:05d}-experts{part}.safetensors",
                          [p + f"mlp.experts.{e}.{w}_proj.weight" for e in range(part * 32, part * 32 + 32)
                           for w in ("gate", "up", "down")]))
    for fname, t in files:
        if isinstance(t, list):
            t = {n: rnd(expected_hf_shape(cfg, n)) for n in t}
        save_file(t, os.path.join(path, fname))
        for n, v in t.items():
            weight_map[n] = fname
            total += v.numel() * v.element_size()
        t.clear()
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return total


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench_convert")
    ap.add_argument("--layouts", default="tp1,ep8,tp2pp2ep4", help="comma list of: tp1, ep8, tp2pp2ep4, pp2")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.mode == "plain":
        plain_copy(os.path.join(ns.work, "hf"), os.path.join(ns.work, "plain"))
        return
    shutil.rmtree(ns.work, ignore_errors=True)
    t0 = time.time()
    total = make_checkpoint(os.path.join(ns.work, "hf"), ns.layers)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB, {ns.layers} MoE layers, made in {time.time() - t0:.0f} s")
    layouts = {"tp1": [], "ep8": ["--target-expert-parallel-size", "8"], "pp2": ["--target-pipeline-parallel-size", "2"],
               "tp2pp2ep4": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                             "--target-expert-parallel-size", "4"]}
    rows = []
    # One fresh interpreter per measurement; it prints its own ru_maxrss at exit.
    for name in ["plain"] + [x for x in ns.layouts.split(",") if x]:
        if name == "plain":
            argv = [os.path.abspath(__file__), "--mode", "plain", "--work", ns.work]
        else:
            out = os.path.join(ns.work, "mc_" + name)
            argv = ["-m", "ckpt_convert", "hf2mcore", "--load-dir", os.path.join(ns.work, "hf"), "--save-dir", out,
                    "--no-progress"] + layouts[name]
        wrapped = ["-c", "import resource, runpy, sys; sys.argv = %r; "
                         "(runpy.run_module('ckpt_convert', run_name='__main__') if sys.argv[0] == '-m' "
                         "else runpy.run_path(sys.argv[0], run_name='__main__'))" % (
                             (["-m"] + argv[2:]) if argv[0] == "-m" else argv)]
        wrapped[1] += ("; print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        env = dict(os.environ, PYTHONPATH=ROOT, TORCHDYNAMO_DISABLE="1")
        t1 = time.time()
        p = subprocess.run([sys.executable] + wrapped, env=env, capture_output=True, text=True)
        secs = time.time() - t1
        if p.returncode not in (0, None) and "MAXRSS" not in p.stdout:
            raise RuntimeError(p.stderr[-3000:])
        rss = int([line for line in p.stdout.splitlines() if line.startswith("MAXRSS")][-1].split()[1]) / 1024 ** 2
        rows.append((name, secs, total / secs / 1e9, rss))
        shutil.rmtree(os.path.join(ns.work, "plain" if name == "plain" else "mc_" + name), ignore_errors=True)
    print(f"\n| run | seconds | GB/s (source bytes / time) | peak RSS GiB |\n|---|---|---|---|")
    for name, secs, gbps, rss in rows:
        label = "plain safetensors read+write" if name == "plain" else f"hf2mcore {name}"
        print(f"| {label} | {secs:.1f} | {gbps:.2f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
