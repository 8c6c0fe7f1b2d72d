"""hf2mcore throughput and peak RSS on a synthetic checkpoint with real DeepSeek-V3 tensor shapes, against a plain
safetensors read + write of the same bytes.

Every tensor has its DeepSeek-V3 shape: hidden 7168, MLA (q_lora 1536, kv_lora 512, 128 heads of 128+64 / v 128),
routed experts of moe_intermediate 2048, one shared expert, dense MLP of 18432. What is scaled down is how many
tensors there are: `--dense-layers` dense layers and `--moe-layers` MoE layers with `--experts` routed experts each
(the real model: 3 dense + 58 MoE layers of 256 experts), and the vocabulary (32768 instead of 129280) so the
layers dominate. bf16, random values. Each measurement runs in its own process so peak RSS (ru_maxrss of that
child) is its own. The synthetic files are deleted at the end (--keep to keep them).

    python benchmarks/bench_convert.py --dense-layers 1 --moe-layers 1 --experts 32 --work /tmp/bench_convert
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
    ap.add_argument("--dense-layers", type=int, default=1, help="Dense-MLP layers (first_k_dense_replace). Default 1.")
    ap.add_argument("--moe-layers", type=int, default=1, help="MoE layers. Default 1.")
    ap.add_argument("--experts", type=int, default=32, help="Routed experts per MoE layer (real: 256). Default 32.")
    ap.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoint in --work afterwards.")
    ap.add_argument("--reuse", action="store_true", help="Reuse the synthetic checkpoint a --keep run left in --work.")
    ap.add_argument("--work", default="/tmp/bench_convert")
    ap.add_argument("--layouts", default="tp1,ep8,tp2pp2ep4", help="comma list of: tp1, ep8, tp2pp2ep4, pp2")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.mode == "plain":
        plain_copy(os.path.join(ns.work, "hf"), os.path.join(ns.work, "plain"))
        return
    t0 = time.time()
    index = os.path.join(ns.work, "hf", "model.safetensors.index.json")
    if ns.reuse and os.path.isfile(index):
        total = json.load(open(index))["metadata"]["total_size"]
    else:
        shutil.rmtree(ns.work, ignore_errors=True)
        total = make_checkpoint(os.path.join(ns.work, "hf"), ns.dense_layers, ns.moe_layers, ns.experts)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB, {ns.dense_layers} dense + {ns.moe_layers} MoE layers of "
          f"{ns.experts} experts, made in {time.time() - t0:.0f} s")
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
        # `python -m ckpt_convert` ends in sys.exit: print ru_maxrss in a finally so it is always reported.
        runner = ("runpy.run_module('ckpt_convert', run_name='__main__')" if argv[0] == "-m"
                  else "runpy.run_path(sys.argv[0], run_name='__main__')")
        wrapped = ["-c", "import resource, runpy, sys\nsys.argv = %r\ntry:\n    %s\nfinally:\n    "
                         "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)"
                   % ((["-m"] + argv[2:]) if argv[0] == "-m" else argv, runner)]
        env = dict(os.environ, PYTHONPATH=ROOT, TORCHDYNAMO_DISABLE="1")
        t1 = time.time()
        p = subprocess.run([sys.executable] + wrapped, env=env, capture_output=True, text=True)
        secs = time.time() - t1
        if p.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
        rss = int([line for line in p.stdout.splitlines() if line.startswith("MAXRSS")][-1].split()[1]) / 1024 ** 2
        rows.append((name, secs, total / secs / 1e9, rss))
        shutil.rmtree(os.path.join(ns.work, "plain" if name == "plain" else "mc_" + name), ignore_errors=True)
    print(f"\n| run | seconds | GB/s (source bytes / time) | peak RSS GiB |\n|---|---|---|---|")
    for name, secs, gbps, rss in rows:
        label = "plain safetensors read+write" if name == "plain" else f"hf2mcore {name}"
        print(f"| {label} | {secs:.1f} | {gbps:.2f} | {rss:.2f} |")
    if not ns.keep:
        shutil.rmtree(ns.work, ignore_errors=True)


if __name__ == "__main__":
    main()
