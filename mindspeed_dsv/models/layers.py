"""The modules our DeepSeek layer spec plugs into megatron's TransformerLayer, MLA and MoE.

Each one is here because megatron-core 0.16.1 has no non-Transformer-Engine module that computes what
DeepSeek-V3 computes: the local DotProductAttention rejects MLA's differing q/k and v head dims, and
torch's RMSNorm multiplies by the weight before casting back (DeepSeek casts first) and refuses sequence
parallelism.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from mindspeed_dsv.ops import get_ops


class RMSNorm(torch.nn.Module):
    """DeepSeek's RMSNorm with megatron's norm constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees a slice of the sequence, so the norm weight's grads
        # are partial sums that megatron all-reduces across TP for params tagged this way.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        return get_ops().rms_norm(x, self.weight, self.eps)


class SwiGLU(MegatronModule):
    """silu(gate) * up on megatron's fused [gate | up] fc1 output, via `ops.swiglu`: the activation module of the dense
    MLP, the shared experts and SequentialMLP's experts (megatron builds `submodules.activation_func` when
    `use_te_activation_func` is set; without it MLP calls its own torch glu). GroupedMLPExperts calls ops.swiglu
    itself."""

    def __init__(self, config, **_unused):
        super().__init__(config=config)
        # megatron's glu also knows other activations, a clamp and an offset; DeepSeek uses none of them.
        if not config.gated_linear_unit or config.activation_func is not torch.nn.functional.silu:
            raise ValueError("SwiGLU needs gated_linear_unit=True and activation_func=silu")
        if config.activation_func_clamp_value is not None or config.glu_linear_offset:
            raise ValueError(
                f"SwiGLU has no clamp or offset: activation_func_clamp_value={config.activation_func_clamp_value}, "
                f"glu_linear_offset={config.glu_linear_offset}"
            )

    def forward(self, x):
        return get_ops().swiglu(x)


class CoreAttention(MegatronModule):
    """softmax(q kᵀ · scale) v for MLA, via the ops layer. q/k: [s, b, h, d_qk], v: [s, b, h, d_v]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError("context parallelism is not supported by CoreAttention yet")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError("attention dropout is not supported (DeepSeek-V3 uses none)")
        # megatron's Attention base builds this once with default channels before MLA rebuilds it with
        # k_channels/v_channels and its YaRN softmax scale; the first instance is discarded.
        if softmax_scale is None:
            softmax_scale = (k_channels or config.kv_channels) ** -0.5
        self.softmax_scale = softmax_scale
        self.attn_mask_type = attn_mask_type

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported")
        cu_seqlens = None
        if packed_seq_params is not None:
            # Packed sequences ('thd'): megatron hands q/k/v over as [t, h, d]; attention stays inside each
            # sample given by the cumulative lengths.
            cu_seqlens = packed_seq_params.cu_seqlens_q
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        out = get_ops().attention(
            query, key, value, self.softmax_scale, causal=True, attention_mask=attention_mask, cu_seqlens=cu_seqlens
        )
        return out.squeeze(1) if cu_seqlens is not None else out


class NoopTransformerLayer(MegatronModule):
    """A placeholder layer (MindSpeed's --noop-layers): passes hidden states through, owns no weights.

    It pads the layer count so that pipeline stages divide evenly (e.g. 61 real layers + 3 noop = 64).
    """

    def __init__(self, config, submodules=None, layer_number: int = 1, vp_stage=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        # Global 1-based number, as TransformerLayer computes it: megatron places the final norm after the
        # layer numbered num_layers, which may be a noop layer.
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)

    def forward(self, hidden_states, *args, context=None, **kwargs):
        return hidden_states, context

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}
