"""GPU correctness of the model and the trainer (issues 2 and 5), in one command, on 1 or 2 CUDA GPUs.

  parity   our model vs transformers' DeepseekV3ForCausalLM on the same random weights, bf16 on one GPU.
           Both are compared with transformers in fp32 on the same GPU (the reference); ours passes when its
           relative logit error ‖Δ‖/‖ref‖ is at most max(2e-2, 2x transformers' own bf16 error).
           Configs: the shipped tiny config (q_lora, YaRN, 2 groups) and the proxy's widths with 2 layers.
           Each with the reference kernels and with the GPU templates' kernel flags (flash attention, grouped GEMM,
           compiled RMSNorm/SwiGLU/permute: grouped experts then run through LocalTokenDispatcher).
  parity (V4) our DeepSeekV4Model vs transformers' DeepseekV4ForCausalLM the same way (bf16 vs fp32 on one GPU, same
           pass rule): the tiny V4 config (every attention type, hash routing, a clamp that cuts, a top-k that drops)
           and train_mfu's --proxy v4 widths (V4-Flash widths, 16 experts) at seq 512.
  parallel the trainer (`python -m mindspeed_dsv.train` under torchrun, NCCL, bf16, flash attention, grouped
           GEMM) from one tiny HF checkpoint converted by `ckpt_convert hf2mcore`: 1 GPU vs TP2(+SP) / EP2 / PP2
           on 2 GPUs, same data and seed; the first losses must agree within 1e-2 relative (bf16).

    python benchmarks/gpu_checks.py                  # parity, then parallel if 2 GPUs are visible
    python benchmarks/gpu_checks.py --only parity
    python benchmarks/gpu_checks.py --only parity-v4 # DeepSeek-V4 only
Exit status 1 if any check fails; a table at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable


def parity(name: str, hf_cfg: dict, fast: bool, seq: int, batch: int = 2):
    """(rel error ours-bf16 vs hf-fp32, rel error hf-bf16 vs hf-fp32, loss ours, loss hf-fp32)."""
    import torch

    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.ops import OpsConfig, configure_ops
    from mindspeed_dsv.platform import current_platform, init_distributed
    from tests.model.hf_reference import hf_to_megatron_tp1, make_hf_model

    platform = current_platform()
    device = platform.device()
    # fast: the kernel flags of the GPU templates (flash attention, grouped GEMM, compiled RMSNorm / SwiGLU /
    # permute, which routes the experts through LocalTokenDispatcher, megatron's Triton MLA rope, fused cross entropy)
    configure_ops(OpsConfig(use_flash_attn=fast, moe_grouped_gemm=fast, use_fused_rmsnorm=fast,
                            use_fused_swiglu=fast, use_fused_moe_token_permute_and_unpermute=fast,
                            use_fused_rotary_pos_emb=fast, cross_entropy_loss_fusion=fast), platform)
    init_distributed()
    cfg = DeepSeekConfig.from_hf(hf_cfg)
    hf = make_hf_model(hf_cfg, seed=0)  # fp32, random weights, random norms and router biases (cpu)
    from mindspeed_dsv.layout import ParallelLayout

    layout = ParallelLayout(num_layers=cfg.num_hidden_layers, mtp_num_layers=0,
                            first_k_dense_replace=cfg.first_k_dense_replace, num_experts=cfg.n_routed_experts,
                            moe_grouped_gemm=fast)
    model = build_model(cfg, layout, params_dtype=torch.bfloat16)
    hf_to_megatron_tp1(hf, model, cfg, grouped=fast)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    pos = torch.arange(seq, device=device)[None].expand_as(ids)
    calls = []
    model.output_layer.register_forward_hook(lambda mod, inp, out: calls.append(out[0].transpose(0, 1).float().clone()))
    with torch.no_grad():
        hf32 = hf.to(device)
        hf32.config._attn_implementation = "eager"
        ref = hf32(ids, labels=ids)
        ref_logits, ref_loss = ref.logits.float(), ref.loss.item()
        hf16 = hf32.to(torch.bfloat16)
        hf16.config._attn_implementation = "sdpa"
        hf_bf16 = hf16(ids).logits.float()
        token_loss = model(ids, pos, attention_mask=None, labels=torch.roll(ids, -1, dims=1))[:, :-1]
    ours = calls[-1]

    def rel(x):
        return ((x - ref_logits).norm() / ref_logits.norm()).item()

    result = rel(ours), rel(hf_bf16), token_loss.float().mean().item(), ref_loss
    del hf, model
    torch.cuda.empty_cache()
    return result


def parity_v4(hf_cfg: dict, seq: int, batch: int = 2, scale: float = 1.0):
    """DeepSeek-V4: (rel error ours-bf16 vs hf-fp32, rel error hf-bf16 vs hf-fp32, loss ours, loss hf-fp32).
    transformers' bf16 model keeps in fp32 what it builds in fp32 under a bf16 default dtype (norms,
    hyper-connections, sinks, compressor position biases), as from_pretrained(dtype=bfloat16) does; ours is
    built with bf16 params_dtype, which keeps the same tensors in fp32 (V4RMSNorm, HyperConnection, attn_sink)."""
    import torch
    import torch.nn.functional as F
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.models.deepseek4.config import transformer_config
    from mindspeed_dsv.ops import OpsConfig, configure_ops
    from mindspeed_dsv.platform import current_platform, init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours, make_hf_v4_model, token_ids

    platform = current_platform()
    device = platform.device()
    configure_ops(OpsConfig(), platform)  # V4 takes none of the V3 kernel flags
    init_distributed()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    hf = make_hf_v4_model(hf_cfg, seed=0, scale=scale)  # fp32, every tensor randomised (cpu)
    model = DeepSeekV4Model(cfg, transformer_config(cfg, params_dtype=torch.bfloat16))
    hf_v4_to_ours(hf, model, cfg.n_routed_experts)
    model = model.to(device).eval()
    ids = token_ids(cfg.vocab_size, batch=batch, seq=seq).to(device)
    with torch.no_grad():
        hf32 = hf.to(device)
        ref = hf32(ids, labels=ids)
        ref_logits, ref_loss = ref.logits.float(), ref.loss.item()
        # the dtype transformers gives each parameter when built under a bf16 default dtype
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("meta"):
            shape = DeepseekV4ForCausalLM(DeepseekV4Config(**{k: v for k, v in hf_cfg.items()
                                                              if k not in ("architectures", "torch_dtype")}))
        torch.set_default_dtype(torch.float32)
        want = {n: p.dtype for n, p in shape.named_parameters()}
        for n, p in hf32.named_parameters():
            p.data = p.data.to(want[n])
        hf_bf16 = hf32(ids).logits.float()
        ours = model(ids).float()
        loss = F.cross_entropy(ours[:, :-1].reshape(-1, ours.shape[-1]), ids[:, 1:].reshape(-1)).item()

    def rel(x):
        return ((x - ref_logits).norm() / ref_logits.norm()).item()

    result = rel(ours), rel(hf_bf16), loss, ref_loss
    del hf, hf32, model
    torch.cuda.empty_cache()
    return result


def run_parity_v4(rows):
    from tests.model.deepseek4_reference import tiny_v4_config

    from benchmarks.train_mfu import V4, v4_config

    configs = {  # name -> (config, seq, weight scale)
        "V4 tiny (sliding/CSA/HCA, hash, clamp, top-k drops), seq 30": (tiny_v4_config(num_nextn_predict_layers=0), 30, 1.0),
        "V4 proxy widths (train_mfu --proxy v4), seq 512": (v4_config(V4, 3), 512, 0.2),
    }
    ok = True
    for name, (cfg, seq, scale) in configs.items():
        ok &= _parity_row(rows, f"parity {name}", lambda: parity_v4(cfg, seq, scale=scale))
    return ok


def _parity_row(rows, label, measure) -> bool:
    """One parity row: ours in bf16 may be off fp32 by at most max(2e-2, twice transformers' own bf16 error)."""
    try:
        err, hf_err, loss, ref_loss = measure()
        passed = err <= max(2e-2, 2 * hf_err)
        detail = (f"ours bf16 {err:.2e} vs transformers bf16 {hf_err:.2e} (rel. to fp32); "
                  f"loss ours {loss:.4f} vs fp32 {ref_loss:.4f}")
    except Exception as exc:  # report and go on: one table at the end
        passed, detail = False, f"{type(exc).__name__}: {exc}"[:300]
    rows.append((label, "PASS" if passed else "FAIL", detail))
    print(rows[-1], flush=True)
    return passed


def run_parity(rows):
    from tests.model.hf_reference import tiny_hf_config

    from benchmarks.train_mfu import PROXY

    configs = {
        "tiny (q_lora, yarn, 2 groups)": (tiny_hf_config(num_nextn_predict_layers=0), 128),
        "proxy widths, 2 layers": (dict(PROXY, num_hidden_layers=2), 512),
    }
    ok = True
    for name, (cfg, seq) in configs.items():
        for fast in (False, True):
            label = f"parity {name}, {'fused kernels' if fast else 'reference kernels'}"
            ok &= _parity_row(rows, label, lambda: parity(name, cfg, fast, seq))
    return ok


# ------------------------------------------------------------------------------------------------ parallel
def _sh(cmd, log, env):
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=400).returncode


def _losses(log):
    with open(log, encoding="utf-8", errors="replace") as f:
        return [float(m) for m in re.findall(r"lm loss ([0-9.eE+-]+)", f.read())]


def run_parallel(rows, work, steps=4, only=None):
    from ckpt_convert.hf_io import copy_side_files
    from tests.model.hf_reference import make_hf_model, tiny_hf_config

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    log = os.path.join(work, "parallel.log")
    hf_dir = os.path.join(work, "hf")
    make_hf_model(tiny_hf_config(num_nextn_predict_layers=0), seed=7).save_pretrained(hf_dir)
    tok = os.path.join(ROOT, "assets", "tiny_deepseek3")
    copy_side_files(tok, hf_dir)
    data = os.path.join(work, "sft")
    rc = _sh([PY, "preprocess_data.py", "--input", "assets/data/alpaca_builtins.jsonl", "--output-prefix", data,
              "--tokenizer-name-or-path", tok, "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type",
              "deepseek3", "--seq-length", "128", "--pack", "--no-progress", "--overwrite"], log, env)  # reused --workdir
    if rc:
        rows.append(("parallel: preprocess", "FAIL", f"exit {rc}, see {log}"))
        return False
    layouts = {
        "1 GPU": ([], []),
        "TP2+SP": (["--target-tensor-parallel-size", "2"], ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        "EP2": (["--target-expert-parallel-size", "2"], ["--expert-model-parallel-size", "2"]),
        "PP2": (["--target-pipeline-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]),
    }
    if only:
        layouts = {k: v for k, v in layouts.items() if k == "1 GPU" or k in only}
    common = ["--data-path", data, "--is-instruction-dataset", "--seq-length", "128", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--lr", "2e-3", "--seed", "5", "--train-iters", str(steps), "--finetune",
              "--no-shuffle", "--bf16", "--use-flash-attn", "--moe-grouped-gemm", "--use-fused-rmsnorm", "--use-fused-swiglu",
              "--use-fused-moe-token-permute-and-unpermute", "--cross-entropy-loss-fusion", "--log-interval", "1"]
    ref, ok = None, True
    for name, (conv, train) in layouts.items():
        ckpt = os.path.join(work, "ckpt_" + re.sub(r"\W", "", name))
        rc = _sh([PY, "-m", "ckpt_convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", ckpt, "--no-progress",
                  "--moe-grouped-gemm", "--overwrite", *conv], log, env)
        run_log = os.path.join(work, "train_" + re.sub(r"\W", "", name) + ".log")
        n = 1 if name == "1 GPU" else 2
        if os.path.exists(run_log):  # a reused --workdir: read this run's losses only
            os.remove(run_log)
        if not rc:
            rc = _sh([PY, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", "29611",
                      "-m", "mindspeed_dsv.train", "--load", ckpt, *common, *train], run_log, env)
        losses = _losses(run_log) if os.path.exists(run_log) else []
        if rc or len(losses) < steps:
            ok = False
            rows.append((f"parallel {name}", "FAIL", f"exit {rc}; losses {losses}; log {run_log}"))
            continue
        if ref is None:
            ref = losses
            rows.append((f"parallel {name}", "ref", "losses " + ", ".join(f"{x:.4f}" for x in losses)))
            continue
        worst = max(abs(a - b) / abs(a) for a, b in zip(ref, losses))
        passed = worst < 1e-2
        ok &= passed
        rows.append((f"parallel {name}", "PASS" if passed else "FAIL",
                     "losses " + ", ".join(f"{x:.4f}" for x in losses) + f"; max rel. diff to 1 GPU {worst:.1e}"))
    for r in rows[-len(layouts):]:
        print(r, flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["parity", "parity-v4", "parallel"], default=None,
                   help="Run one group of checks (parity-v4: DeepSeek-V4 only).")
    p.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    p.add_argument("--layouts", nargs="*", default=None, choices=["TP2+SP", "EP2", "PP2"],
                   help="Parallel layouts to compare with 1 GPU (default: all three).")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    work = a.workdir or tempfile.mkdtemp(prefix="gpu_checks_")
    os.makedirs(work, exist_ok=True)
    rows, ok = [], True
    if a.only in (None, "parity"):
        ok &= run_parity(rows)
    if a.only in (None, "parity", "parity-v4"):
        ok &= run_parity_v4(rows)
    if a.only in (None, "parallel"):
        if torch.cuda.device_count() < 2:
            rows.append(("parallel", "SKIP", "needs 2 GPUs"))
        else:
            ok &= run_parallel(rows, work, only=a.layouts)
    print(f"\n{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| check | result | detail |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
