"""Dry run of a training script: check its flags without launching, then print the plan of the same flags.

    python examples/mcore/deepseek3/dry_run.py --world-size 512 [--device-memory-gb 64] \
        [--fallback-model-config assets/deepseek3_671b] -- <the training flags>

1. The training flags are parsed by the trainer's own parser (``mindspeed_dsv.training.arguments.build_parser``,
   abbreviations off), so a mistyped flag fails as it would at launch: exit 2, ``unrecognized arguments: --flag``.
2. They are checked against each other, the world size and config.json by the trainer's own ``validate``
   (layout, batch sizes, LoRA flags...), and against what is on disk by the trainer's own preflight
   (``mindspeed_dsv.training.records.resolve``): the --load/--lora-load checkpoint's layout.json (layout flags
   not given are taken from it, as in the run) and the instruction dataset's {prefix}_summary.json
   (--seq-length). Exit 2 naming the flags. A checkpoint or dataset that does not exist yet is not checked.
3. Each kernel flag is resolved for ``--device`` (the template's device: env_ascend.sh / env_gpu.sh set
   DSV_DEVICE; default the detected one) and printed with the kernel it runs there; a flag that device cannot
   honour fails the dry run (exit 2) as it would fail the launch.
4. ``python -m mindspeed_dsv.plan`` runs on the subset of the flags it models (layout, batch, precision,
   optimizer sharding, recompute, LoRA/QLoRA): per-stage layers, parameters and memory per device.

Nothing is allocated and no process group is started. ``--fallback-model-config`` is used when the flags name
no config that exists yet (the --load directory of a checkpoint that is not converted yet).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def plan_argv(ns: argparse.Namespace, model_config: str, world_size: int, device_memory_gb: float | None) -> list[str]:
    """The plan flags equal to the training flags in `ns` (same names, same values)."""
    out = ["--model-config", model_config,
           "--tensor-model-parallel-size", str(ns.tensor_model_parallel_size),
           "--pipeline-model-parallel-size", str(ns.pipeline_model_parallel_size),
           "--expert-model-parallel-size", str(ns.expert_model_parallel_size),
           "--context-parallel-size", str(ns.context_parallel_size)]
    for flag, value in (("--num-layers-per-virtual-pipeline-stage", ns.num_layers_per_virtual_pipeline_stage),
                        ("--num-layer-list", ns.num_layer_list), ("--noop-layers", ns.noop_layers),
                        ("--schedules-method", ns.schedules_method), ("--num-layers", ns.num_layers),
                        ("--mtp-num-layers", ns.mtp_num_layers), ("--first-k-dense-replace", ns.first_k_dense_replace),
                        ("--num-experts", ns.num_experts), ("--global-batch-size", ns.global_batch_size),
                        ("--recompute-granularity", ns.recompute_granularity),
                        ("--recompute-method", ns.recompute_method),
                        ("--recompute-num-layers", ns.recompute_num_layers),
                        ("--device-memory-gb", device_memory_gb)):
        if value is not None:
            out += [flag, str(value)]
    for flag, on in (("--moe-grouped-gemm", ns.moe_grouped_gemm), ("--moe-tp-extend-ep", ns.moe_tp_extend_ep),
                     ("--sequence-parallel", ns.sequence_parallel),
                     ("--use-distributed-optimizer", ns.use_distributed_optimizer), ("--qlora-nf4", ns.qlora_nf4)):
        if on:
            out.append(flag)
    out += ["--micro-batch-size", str(ns.micro_batch_size), "--seq-length", str(ns.seq_length),
            "--bf16" if ns.bf16 else "--fp32", "--world-size", str(world_size)]
    if ns.lora_r:
        out += ["--lora-r", str(ns.lora_r)]
    return out


def main(argv: list[str] | None = None) -> int:
    own, train_argv = _split(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--world-size", type=int, required=True, help="NNODES x devices per node.")
    p.add_argument("--device-memory-gb", type=float, default=None, help="Warn when a stage's estimate exceeds it.")
    p.add_argument("--fallback-model-config", default=None,
                   help="config.json (or its directory) used when the training flags name none that exists.")
    p.add_argument("--prog", default="mindspeed_dsv.train", help="Program name in error messages.")
    p.add_argument("--device", choices=("cpu", "cuda", "npu"), default=None,
                   help="Device the kernel flags are resolved for (default: the detected one).")
    args = p.parse_args(own)

    from mindspeed_dsv.layout import LayoutError
    from mindspeed_dsv.plan import main as plan_main
    from mindspeed_dsv.training.arguments import ArgumentError, build_parser
    from mindspeed_dsv.training.records import resolve

    parser = build_parser(prog=args.prog)
    ns = parser.parse_args(train_argv)  # a typo exits 2 here, naming the flag

    cfg_path = None
    for candidate in (ns.model_config, ns.load, args.fallback_model_config):
        if candidate:
            path = os.path.join(candidate, "config.json") if os.path.isdir(candidate) else candidate
            if os.path.isfile(path):
                cfg_path = path
                break
    if cfg_path is None:
        parser.error("no model config.json found: --model-config / --load name none that exists "
                     "(and no --fallback-model-config)")
    if ns.model_config is None and ns.load and cfg_path != os.path.join(ns.load, "config.json"):
        print(f"dry-run: {ns.load}/config.json does not exist yet; checking against {cfg_path}", file=sys.stderr)
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    try:
        _, notes = resolve(ns, args.world_size, cfg, dry_run=True)  # the run's own checks, records included
    except (ArgumentError, LayoutError) as err:
        parser.error(str(err))
    if notes:
        print("layout flags taken from the checkpoint: " + ", ".join(notes))

    from mindspeed_dsv.ops.config import OpsConfig, OpUnavailableError, describe_flags, resolve_impls

    ops_cfg = OpsConfig.from_args(ns)
    device = args.device
    if device is None:
        from mindspeed_dsv.platform import current_platform

        device = current_platform().device_type
    try:  # what this device can do, not what this install has (the dry run may run on another machine)
        resolve_impls(ops_cfg, device, check_install=False)
    except OpUnavailableError as err:
        parser.error(str(err))

    pargv = plan_argv(ns, cfg_path, args.world_size, args.device_memory_gb)
    print("training flags OK (" + f"{len(train_argv)} arguments, world size {args.world_size})")
    print(f"kernel flags on {device}:" + ("" if any(vars(ops_cfg).values()) else " (none on)"))
    for line in describe_flags(ops_cfg, device, check_install=False):
        print(f"  {line}")
    print("+ python -m mindspeed_dsv.plan " + " ".join(shlex.quote(a) for a in pargv))
    sys.stdout.flush()
    return plan_main(pargv)


if __name__ == "__main__":
    sys.exit(main())
