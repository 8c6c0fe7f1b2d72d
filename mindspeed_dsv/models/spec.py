"""Layer specs for DeepSeek-V3 on megatron-core: megatron's TransformerLayer, MLA, MoELayer and MTP, with our
RMSNorm, core attention and (optionally) grouped-GEMM experts plugged in through a spec provider."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.multi_token_prediction import get_mtp_layer_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mindspeed_dsv.platform.megatron_compat import replicated_linear_class

from .layers import CoreAttention, NoopTransformerLayer, RMSNorm, SwiGLU
from .moe_layer import DeepSeekMoELayer

ReplicatedLinear = replicated_linear_class()


class DeepSeekSpecProvider(LocalSpecProvider):
    """megatron's local (no Transformer Engine) modules, except the ones DeepSeek needs computed our way."""

    def __init__(self, grouped_experts: bool = False):
        self.grouped_experts = grouped_experts

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return CoreAttention

    def activation_func(self) -> type:
        # megatron gives this to the shared experts' and SequentialMLP's MLPs; the dense MLP's spec below too.
        return SwiGLU

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        if moe_use_grouped_gemm:
            # megatron's GroupedMLP needs the CUDA-only grouped_gemm package; ours runs on every device.
            from .experts import GroupedMLPExperts

            return GroupedMLPExperts, None
        return super().grouped_mlp_modules(False, False)


def layer_spec(provider: DeepSeekSpecProvider, moe: bool, num_experts: int | None = None) -> ModuleSpec:
    norm = provider.layer_norm(rms_norm=True)
    if moe:
        mlp = get_moe_module_spec_for_backend(
            backend=provider, num_experts=num_experts, moe_grouped_gemm=provider.grouped_experts
        )
        mlp.module = DeepSeekMoELayer  # megatron's MoELayer, with a sync-free dispatcher where it applies
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=provider.activation_func()
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=MLASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=ColumnParallelLinear,
                    # The down projections are small and replicated over TP (as with Transformer Engine); under
                    # sequence parallelism megatron then reduce-scatters the rotary key's gradient correctly.
                    linear_q_down_proj=ReplicatedLinear,
                    linear_q_up_proj=ColumnParallelLinear,
                    linear_kv_down_proj=ReplicatedLinear,
                    linear_kv_up_proj=ColumnParallelLinear,
                    core_attention=provider.core_attention(),
                    linear_proj=RowParallelLinear,
                    q_layernorm=norm,
                    kv_layernorm=norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


NOOP_LAYER_SPEC = ModuleSpec(module=NoopTransformerLayer)


def decoder_block_spec(layer_kinds: list[str], provider: DeepSeekSpecProvider, num_experts: int | None):
    """layer_kinds: 'dense' | 'moe' | 'noop' for each layer built on this (stage, chunk), in order."""
    specs = {
        "dense": layer_spec(provider, moe=False),
        "moe": layer_spec(provider, moe=True, num_experts=num_experts) if num_experts else None,
        "noop": NOOP_LAYER_SPEC,
    }
    return TransformerBlockSubmodules(layer_specs=[specs[k] for k in layer_kinds], layer_norm=RMSNorm)


def mtp_block_spec(num_mtp_layers: int, provider: DeepSeekSpecProvider, num_experts: int | None, moe: bool):
    """DeepSeek's MTP module; `moe` is DeepSeekConfig.mtp_layer_is_moe."""
    if not num_mtp_layers:
        return None
    inner = layer_spec(provider, moe=moe, num_experts=num_experts)
    one = get_mtp_layer_spec_for_backend(transformer_layer_spec=inner, backend=provider)
    return MultiTokenPredictionBlockSubmodules(layer_specs=[one] * num_mtp_layers)
