"""The DeepSeek-V4 model: megatron's vocab-parallel embedding and output layer around V4 decoder layers
(hyper-connected attention and MoE sub-blocks), the final stream collapse and norm.

Hidden streams are [B, S, hc_mult, D] throughout (transformers' layout); one pipeline stage, TP 1.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from mindspeed_dsv.models.layers import RMSNorm

from .attention import V4Attention
from .config import DeepSeekV4Config, transformer_config
from .hyper_connection import HyperConnection, HyperHead
from .moe import build_moe


class V4DecoderLayer(MegatronModule):
    def __init__(self, config, cfg: DeepSeekV4Config, layer: int):
        super().__init__(config=config)
        hc = (cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(*hc)
        self.input_layernorm = RMSNorm(config, cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attention = V4Attention(config, cfg, layer)
        self.ffn_hc = HyperConnection(*hc)
        self.pre_mlp_layernorm = RMSNorm(config, cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = build_moe(config, cfg, layer)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        post, comb, x = self.attn_hc(streams)
        streams = HyperConnection.merge(streams, self.self_attention(self.input_layernorm(x)), post, comb)
        post, comb, x = self.ffn_hc(streams)
        return HyperConnection.merge(streams, self.mlp(self.pre_mlp_layernorm(x), input_ids), post, comb)


class DeepSeekV4Model(MegatronModule):
    def __init__(self, cfg: DeepSeekV4Config, config=None):
        config = config if config is not None else transformer_config(cfg)
        super().__init__(config=config)
        self.cfg = cfg
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config
        )
        self.layers = torch.nn.ModuleList(V4DecoderLayer(config, cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)
        self.final_layernorm = RMSNorm(config, cfg.hidden_size, eps=cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            raise NotImplementedError("DeepSeek-V4 with tie_word_embeddings=true is not supported")
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=True,
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids (positions 0..S-1) -> logits [B, S, V]."""
        x = self.embedding(input_ids)
        streams = x.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, input_ids)
        h = self.final_layernorm(self.hc_head(streams))
        return self.output_layer(h)[0]
