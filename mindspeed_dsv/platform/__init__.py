"""Device layer: which device, its backend, RNG, memory, streams, and the megatron compatibility shims."""

from .device import Platform, current_platform
from .distributed import destroy_distributed, init_distributed
from .megatron_compat import SHIMS, apply_megatron_compat

__all__ = [
    "Platform",
    "current_platform",
    "init_distributed",
    "destroy_distributed",
    "apply_megatron_compat",
    "SHIMS",
]
