"""The one place that knows which device we run on: cpu, cuda or npu.

Everything else asks `current_platform()` instead of calling `torch.cuda` / `torch.npu`.
The choice is made once per process: `MINDSPEED_DSV_DEVICE` (cpu|cuda|npu) if set, else npu when
`torch_npu` imports and a device is visible, else cuda when available, else cpu.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def _import_torch_npu():
    """torch_npu registers `torch.npu`; imported lazily so CPU/GPU installs never need it."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


@dataclass(frozen=True)
class Platform:
    device_type: str  # 'cpu' | 'cuda' | 'npu'

    @property
    def backend(self) -> str:
        return _BACKENDS[self.device_type]

    @property
    def is_accelerator(self) -> bool:
        return self.device_type != "cpu"

    def _module(self):
        # torch.cuda or torch.npu; None on cpu.
        return getattr(torch, self.device_type) if self.is_accelerator else None

    def device(self, index: int | None = None) -> torch.device:
        if not self.is_accelerator:
            return torch.device("cpu")
        if index is None:
            index = self._module().current_device()
        return torch.device(self.device_type, index)

    def set_device(self, local_rank: int) -> None:
        if self.is_accelerator:
            self._module().set_device(local_rank)

    def device_count(self) -> int:
        return self._module().device_count() if self.is_accelerator else 1

    def synchronize(self) -> None:
        if self.is_accelerator:
            self._module().synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if self.is_accelerator:
            self._module().manual_seed_all(seed)

    def max_memory_allocated(self) -> int:
        """Peak bytes held by the device allocator; on cpu the process peak RSS."""
        if self.is_accelerator:
            return int(self._module().max_memory_allocated())
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def reset_peak_memory_stats(self) -> None:
        if self.is_accelerator:
            self._module().reset_peak_memory_stats()

    def memory_allocated(self) -> int:
        return int(self._module().memory_allocated()) if self.is_accelerator else 0

    def device_name(self) -> str:
        return self._module().get_device_name() if self.is_accelerator else "cpu"

    def stream(self):
        """A side stream, or None where the device has no streams (cpu)."""
        return self._module().Stream() if self.is_accelerator else None

    def autocast_device_type(self) -> str:
        return self.device_type


def _detect() -> str:
    forced = os.environ.get("MINDSPEED_DSV_DEVICE")
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"MINDSPEED_DSV_DEVICE={forced!r}: expected one of {sorted(_BACKENDS)}")
        if forced == "npu" and _import_torch_npu() is None:
            raise RuntimeError("MINDSPEED_DSV_DEVICE=npu but torch_npu is not installed")
        return forced
    if _import_torch_npu() is not None and hasattr(torch, "npu") and torch.npu.is_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@lru_cache(maxsize=1)
def current_platform() -> Platform:
    return Platform(_detect())
