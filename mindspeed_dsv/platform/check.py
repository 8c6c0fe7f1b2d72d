"""Print what this machine is to the trainer: device, versions, device count, backend, and what each kernel flag
of a set of training flags resolves to.

    python -m mindspeed_dsv.platform.check                          # the machine
    python -m mindspeed_dsv.platform.check -- --use-flash-attn --use-fused-rmsnorm ...   # plus those flags
    python -m mindspeed_dsv.platform.check --device npu -- <flags>  # what they would run on an npu

A command, not a library module: it reads the trainer's parser and the ops resolution, which the device layer
itself never imports.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import sys


def cann_version() -> str | None:
    """The CANN toolkit version from its install record (set_env.sh exports ASCEND_TOOLKIT_HOME)."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
    for path in sorted(glob.glob(os.path.join(home, "*", "ascend_toolkit_install.info"))) + [
            os.path.join(home, "version.cfg")]:
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    if key in ("version", "Version", "toolkit_installed_version"):
                        return value.strip("[]\"' ")
    return None


def _version(distribution: str) -> str | None:
    """The installed version, read from package metadata: nothing is imported (importing mindspeed could patch)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def report(device: str | None, train_argv: list[str]) -> list[str]:
    import torch

    from mindspeed_dsv.platform import current_platform

    platform = current_platform()
    lines = [
        f"device: {platform.device_type}" + (" (emulated: tensors on the host, gloo)" if platform.emulated else ""),
        f"device name: {platform.device_name()}",
        f"device count: {platform.device_count()}",
        f"backend: {platform.backend}",
        f"torch: {torch.__version__}",
        f"torch_npu: {_version('torch-npu') or 'not installed'}",
        f"CANN: {cann_version() or 'not found'}",
        f"megatron-core: {_version('megatron-core') or 'not installed'}",
        f"mindspeed (not used; refused if imported): {_version('mindspeed') or 'not installed'}",
    ]
    if train_argv:
        from mindspeed_dsv.ops.config import OpsConfig, describe_flags
        from mindspeed_dsv.training.arguments import build_parser

        ns = build_parser().parse_args(train_argv)  # a typo exits 2 here, naming the flag
        target = device or platform.device_type
        # this install's runtime (triton, torch._grouped_mm) only matters for this machine's own device
        flags = describe_flags(OpsConfig.from_args(ns), target, check_install=target == platform.device_type)
        lines.append(f"kernel flags on {target}:" + ("" if flags else " (none on)"))
        lines += [f"  {line}" for line in flags]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mindspeed_dsv.platform.check",
                                description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--device", choices=("cpu", "cuda", "npu"), default=None,
                   help="Resolve the kernel flags for this device instead of the detected one (default: detected). "
                        "Training flags follow `--`.")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    print("\n".join(report(args.device, train_argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
