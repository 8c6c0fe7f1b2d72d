"""Step logs: loss, lm / MTP / balance losses, grad norm, lr, tokens/s, TFLOP/s per device, MFU, memory.

tokens/s and MFU count the tokens of real samples: the padding of SFT rows is neither work worth reporting nor
what the FLOP formula describes."""

from __future__ import annotations

import torch.distributed as dist

from mindspeed_dsv.platform import current_platform


class MetricsLogger:
    def __init__(self, args, flops_per_token: float, peak_tflops: float | None, world_size: int):
        self.args = args
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops
        self.world = world_size
        self.rank0 = (not dist.is_initialized()) or dist.get_rank() == 0
        self.writer = None
        if args.tensorboard_dir and self.rank0:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(args.tensorboard_dir)

    def step(self, iteration: int, metrics: dict, seconds: float, tokens: int) -> dict:
        """``tokens``: the real (non-padding) tokens of the step's global batch; tokens/s and MFU count only these."""
        tokens_per_s = tokens / seconds
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        record = dict(metrics)
        record.update(
            iteration=iteration,
            tokens=tokens,
            step_time=seconds,
            tokens_per_s=tokens_per_s,
            tflops_per_device=tflops,
            mfu=(tflops / self.peak) if self.peak else None,
            memory_gb=current_platform().max_memory_allocated() / 2**30,
        )
        if self.rank0 and iteration % self.args.log_interval == 0:
            print(self._line(record), flush=True)
        if self.writer:  # every step, like megatron's default --tensorboard-log-interval 1
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                    self.writer.add_scalar(k.replace(" ", "_"), v, iteration)
        return record

    def _line(self, r: dict) -> str:
        parts = [f"iteration {r['iteration']:6d}/{self.args.train_iters}"]
        for key in ("lm loss", "mtp loss", "seq load balancing loss", "load balancing loss"):
            if r.get(key) is not None:
                parts.append(f"{key} {r[key]:.6f}")
        if r.get("grad norm") is not None:
            parts.append(f"grad norm {r['grad norm']:.4f}")
        parts.append(f"lr {r['lr']:.3e}")
        parts.append(f"step {r['step_time'] * 1000:.0f} ms")
        parts.append(f"tokens/s {r['tokens_per_s']:.1f}")
        parts.append(f"TFLOP/s/device {r['tflops_per_device']:.2f}")
        parts.append(f"MFU {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "MFU n/a")
        parts.append(f"peak mem {r['memory_gb']:.2f} GB")
        if r.get("skipped"):
            parts.append("(step skipped: inf/nan grads)")
        return " | ".join(parts)

    def validation(self, iteration: int, loss):
        if self.rank0 and loss is not None:
            print(f"validation at iteration {iteration} | lm loss {loss:.6f}", flush=True)
            if self.writer:
                self.writer.add_scalar("valid_lm_loss", loss, iteration)

    def close(self):
        if self.writer:
            self.writer.close()
