"""The one place that knows which device we run on: cpu, cuda or npu.

Everything else asks `current_platform()` instead of calling `torch.cuda` / `torch.npu`.
The choice is made once per process: `MINDSPEED_DSV_DEVICE` (cpu|cuda|npu|npu-emulated) if set, else npu when
`torch_npu` imports and a device is visible, else cuda when available, else cpu.

`npu-emulated` is the npu path without an NPU: kernels resolve to torch_npu's operators, the npu shims and
rules apply, but tensors live in host memory and ranks talk over gloo. It is how the test suite runs the whole
trainer against a `torch_npu` written in torch (tests/ops/fake_torch_npu.py); on a real machine use `npu`.
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
    # npu only: npu kernels, shims and collective rules, but tensors in host memory and gloo between ranks
    emulated: bool = False

    def __post_init__(self):
        if self.emulated and self.device_type != "npu":
            raise ValueError(f"only the npu can be emulated, not {self.device_type!r}")

    @property
    def backend(self) -> str:
        return "gloo" if self.emulated else _BACKENDS[self.device_type]

    @property
    def tensors_on_host(self) -> bool:
        """Tensors live in host memory: the cpu, and the emulated npu."""
        return self.device_type == "cpu" or self.emulated

    @property
    def is_accelerator(self) -> bool:
        return self.device_type != "cpu"

    def _module(self):
        # torch.cuda or torch.npu; None on cpu.
        return getattr(torch, self.device_type) if self.is_accelerator else None

    def device(self, index: int | None = None) -> torch.device:
        if self.tensors_on_host:
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
        return None if self.tensors_on_host else self._module().Stream()

    def autocast_device_type(self) -> str:
        return self.device_type


_EMULATED_NPU = "npu-emulated"


def _detect() -> Platform:
    forced = os.environ.get("MINDSPEED_DSV_DEVICE")
    if forced:
        choices = [*sorted(_BACKENDS), _EMULATED_NPU]
        if forced not in choices:
            raise ValueError(f"MINDSPEED_DSV_DEVICE={forced!r}: expected one of {choices}")
        if forced in ("npu", _EMULATED_NPU) and _import_torch_npu() is None:
            raise RuntimeError(f"MINDSPEED_DSV_DEVICE={forced} but torch_npu is not installed")
        return Platform("npu", emulated=True) if forced == _EMULATED_NPU else Platform(forced)
    if _import_torch_npu() is not None and hasattr(torch, "npu") and torch.npu.is_available():
        return Platform("npu")
    if torch.cuda.is_available():
        return Platform("cuda")
    return Platform("cpu")


@lru_cache(maxsize=1)
def current_platform() -> Platform:
    return _detect()
