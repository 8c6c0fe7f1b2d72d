"""megatron's GPTModel with its token loss computed by the ops layer's cross entropy."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from mindspeed_dsv.ops import get_ops


class DeepSeekGPTModel(GPTModel):
    """GPTModel whose per-token losses (main head and MTP heads) come from `ops.cross_entropy`: megatron's own
    vocab-parallel cross entropy by default, the fused two-pass one with --cross-entropy-loss-fusion (megatron's
    fused 'native' version returns bf16 gradients even for fp32 logits, and its 'te' one needs Transformer
    Engine)."""

    def compute_language_model_loss(self, labels, logits):
        # labels [b, s], logits [s, b, V/tp] -> loss [b, s], as GPTModel's
        loss = get_ops().cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
