"""V4's multi-token prediction layers, computed as the release's inference/model.py MTPBlock does:

    e = enorm(embed(tokens t+k+1))                   [B, S, D]     (the main model's embedding)
    x = e_proj(e)[:, :, None] + h_proj(hnorm(x))     [B, S, N, D]  (hnorm, h_proj on every stream)
    x = V4 decoder layer n_layers + k (x)            sliding-only attention, learned routing
    logits = head(final_layernorm(hc_head(x)))       own hc_head and norm, the main model's output layer

where x is the main decoder's streams for depth 0 and the previous MTP layer's streams after it (megatron's
chaining of MTP depths; the release ships one depth). The release's split e_proj / h_proj is V3's eh_proj on
[e | h] cut in two.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from .compressor import linear
from .config import DeepSeekV4Config
from .hyper_connection import HyperHead
from .norm import V4RMSNorm


class V4MTPLayer(MegatronModule):
    def __init__(self, config, cfg: DeepSeekV4Config, transformer_layer: torch.nn.Module):
        """`transformer_layer`: the V4 decoder layer numbered num_hidden_layers + depth (built by model.py)."""
        super().__init__(config=config)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = V4RMSNorm(d, eps)
        self.hnorm = V4RMSNorm(d, eps)
        self.e_proj = linear(config, d, d)
        self.h_proj = linear(config, d, d)
        self.transformer_layer = transformer_layer
        self.hc_head = HyperHead(d, cfg.hc_mult, cfg.hc_eps, eps)
        self.final_layernorm = V4RMSNorm(d, eps)

    def forward(self, streams: torch.Tensor, embedded: torch.Tensor, input_ids: torch.Tensor):
        """streams [B, S, N, D] of the previous depth, embedded [B, S, D] = embedding of the tokens one further
        ahead, input_ids [B, S] those tokens -> (this depth's streams, the normed [B, S, D] input of the head)."""
        x = self.e_proj(self.enorm(embedded))[0].unsqueeze(2) + self.h_proj(self.hnorm(streams))[0]
        x = self.transformer_layer(x, input_ids)
        return x, self.final_layernorm(self.hc_head(x))


class V4MTPBlock(torch.nn.Module):
    """The MTP depths in order (`mtp.layers.k.*`, megatron's MultiTokenPredictionBlock names)."""

    def __init__(self, layers: list[V4MTPLayer]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor, embedding) -> list[torch.Tensor]:
        """Main streams [B, S, N, D] -> per depth k the [B, S, D] input of the output layer, which predicts
        token t + k + 2 at position t."""
        out = []
        for k, layer in enumerate(self.layers):
            ids = shift_left(input_ids, k + 1)
            streams, h = layer(streams, embedding(ids), ids)
            out.append(h)
        return out


def shift_left(t: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S] -> t[:, j + k] at j, zeros past the end (megatron's roll_tensor applied k times)."""
    out = torch.zeros_like(t)
    if k < t.shape[1]:
        out[:, : t.shape[1] - k] = t[:, k:]
    return out
