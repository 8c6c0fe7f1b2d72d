"""megatron's GPTModel with its token loss computed by the ops layer's cross entropy."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from mindspeed_dsv.ops import get_ops


class DeepSeekGPTModel(GPTModel):
    """GPTModel whose per-token losses (main head and MTP heads) come from `ops.cross_entropy`: megatron's own
    vocab-parallel cross entropy by default, the fused two-pass one with --cross-entropy-loss-fusion (megatron's
    fused 'native' version returns bf16 gradients even for fp32 logits, and its 'te' one needs Transformer
    Engine).

    With a padded vocabulary (`vocab_size` > `real_vocab_size`, --make-vocab-size-divisible-by) the padded ids
    are masked out of the softmax (the dtype's lowest logit, whose exp is 0; finite so that a TP rank holding only
    padded ids still has a finite row maximum): the model never predicts them and their output rows get no
    gradient, so they stay zero and export strips them. Megatron itself leaves them in the softmax."""

    def __init__(self, *args, real_vocab_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = self.vocab_size if real_vocab_size is None else real_vocab_size

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V_padded/tp] of this TP rank with the columns of padded ids at the dtype's lowest value."""
        if self.real_vocab_size == self.vocab_size:
            return logits
        width = logits.shape[-1]
        first_padded = self.real_vocab_size - self.pg_collection.tp.rank() * width  # local column of the first pad
        if first_padded >= width:
            return logits
        cols = torch.arange(width, device=logits.device) >= max(first_padded, 0)
        return logits.masked_fill(cols, torch.finfo(logits.dtype).min)

    def compute_language_model_loss(self, labels, logits):
        # labels [b, s], logits [s, b, V/tp] -> loss [b, s], as GPTModel's
        logits = self.mask_padded_vocab(logits)
        loss = get_ops().cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
