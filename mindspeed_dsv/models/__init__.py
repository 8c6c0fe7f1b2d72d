"""DeepSeek-V3 on megatron-core: config from HF, layer specs, model builder.

The builder (and megatron with it) is imported on first use, so config-only users (the planner, the
converter's name map) start without loading megatron."""

from .config import DeepSeekConfig, ModelConfigError, transformer_config

_BUILDER = ("build_model", "build_model_chunks", "default_layout", "layer_kinds", "model_transformer_config")


def __getattr__(name):
    if name in _BUILDER:
        from . import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DeepSeekConfig", "ModelConfigError", "transformer_config", *_BUILDER]
