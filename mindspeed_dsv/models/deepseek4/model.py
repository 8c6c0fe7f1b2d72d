"""The DeepSeek-V4 model: megatron's vocab-parallel embedding and output layer around V4 decoder layers
(hyper-connected attention and MoE sub-blocks), the final stream collapse and norm.

Hidden streams are [B, S, hc_mult, D] inside a stage (transformers' layout); between pipeline stages they
travel as [S * hc_mult, B, D] (row s * hc_mult + k: stream k of token s), megatron's [seq, batch, hidden] with
hidden = D, so every pipeline schedule (1F1B, interleaved, dualpipev) carries them when given
seq_length * hc_mult (`stage_tensor_shape`). TP 1.
"""

from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

from mindspeed_dsv.ops import get_ops

from .attention import V4Attention
from .config import DeepSeekV4Config, transformer_config
from .hyper_connection import HyperConnection, HyperHead
from .moe import build_moe
from .mtp import V4MTPBlock, V4MTPLayer, shift_left
from .norm import V4RMSNorm


class V4DecoderLayer(MegatronModule):
    def __init__(self, config, cfg: DeepSeekV4Config, layer: int):
        super().__init__(config=config)
        hc = (cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(*hc)
        self.input_layernorm = V4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attention = V4Attention(config, cfg, layer)
        self.ffn_hc = HyperConnection(*hc)
        self.pre_mlp_layernorm = V4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_moe(config, cfg, layer)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        post, comb, x = self.attn_hc(streams)
        streams = HyperConnection.merge(streams, self.self_attention(self.input_layernorm(x)), post, comb)
        post, comb, x = self.ffn_hc(streams)
        return HyperConnection.merge(streams, self.mlp(self.pre_mlp_layernorm(x), input_ids), post, comb)


def stage_tensor_shape(cfg: DeepSeekV4Config, seq_length: int, micro_batch_size: int) -> tuple[int, int, int]:
    """The [S * hc_mult, B, D] shape of the streams sent between pipeline stages: megatron's schedules build
    [seq_length, micro_batch_size, config.hidden_size], so they carry it when given seq_length * hc_mult."""
    return (seq_length * cfg.hc_mult, micro_batch_size, cfg.hidden_size)


class DeepSeekV4Model(MegatronModule):
    """One pipeline stage: `layers` are the global decoder-layer ids it holds (state-dict names count from 0
    on every stage, as megatron's TransformerBlock does); the first stage embeds, the last one has the head
    and the `mtp_num_layers` MTP layers (`mtp.layers.k.*`), with its own copy of the embedding when it is not
    also the first stage (megatron's GPTModel layout; finalize_model_grads sums the two copies' grads)."""

    def __init__(self, cfg: DeepSeekV4Config, config=None, *, pre_process: bool = True, post_process: bool = True,
                 layers: range | None = None, mtp_num_layers: int = 0):
        config = config if config is not None else transformer_config(cfg, mtp_num_layers=mtp_num_layers)
        if (config.mtp_num_layers or 0) != mtp_num_layers:
            raise ValueError(f"DeepSeekV4Model: mtp_num_layers={mtp_num_layers} but the TransformerConfig has "
                             f"mtp_num_layers={config.mtp_num_layers} (pass the same to transformer_config)")
        super().__init__(config=config)
        self.mtp_num_layers = mtp_num_layers
        # what megatron's finalize_model_grads and the dualpipev schedule ask of a model chunk
        self.mtp_process = post_process and mtp_num_layers > 0
        self.share_embeddings_and_output_weights = False
        self.cfg, self.pre_process, self.post_process = cfg, pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask of a model
        self.layer_ids = range(cfg.num_hidden_layers) if layers is None else layers
        self.input_tensor = None
        if cfg.tie_word_embeddings:
            raise NotImplementedError("DeepSeek-V4 with tie_word_embeddings=true is not supported")
        if pre_process or self.mtp_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config
            )
        self.layers = torch.nn.ModuleList(V4DecoderLayer(config, cfg, i) for i in self.layer_ids)
        if post_process:
            self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)
            self.final_layernorm = V4RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
                gather_output=True,
            )
        if self.mtp_process:
            self.mtp = V4MTPBlock([V4MTPLayer(config, cfg, V4DecoderLayer(config, cfg, cfg.num_hidden_layers + k))
                                   for k in range(mtp_num_layers)])

    def shared_embedding_or_output_weight(self):
        """The embedding copy that megatron's finalize_model_grads keeps equal on the first and the MTP stage."""
        return self.embedding.weight if hasattr(self, "embedding") else None

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules with the previous stage's output ([S, B, hc_mult * D])."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask=None,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] token ids (every stage needs them for hash routing) -> on the last stage the logits [B, S, V],
        or with `labels` [B, S] the per-token loss [B, S] (megatron's GPTModel contract: the caller applies
        loss_mask; the MTP loss rides on the backward through MTPLossAutoScaler); the streams as
        [S * hc_mult, B, D] on the other stages.

        position_ids and attention_mask are taken for megatron's calling convention and not read: V4 always
        attends causally over positions 0..S-1 (sliding window, compressed entries). That equals the trainer's
        SFT masks for rows of one sample then padding; packed rows and reset position ids are refused before
        training (training/records.py, training/arguments.py)."""
        streams = self.decode(input_ids)
        if not self.post_process:
            return streams
        h = self.final_layernorm(self.hc_head(streams))
        if labels is None:
            return self.output_layer(h)[0]
        if self.mtp_process:
            h = self._attach_mtp_loss(h, streams, input_ids, labels, loss_mask)
        return self._token_loss(self.output_layer(h)[0], labels)

    @staticmethod
    def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, S] cross entropy through ops.cross_entropy: megatron's vocab-parallel one, or the fused one
        (--cross-entropy-loss-fusion). The logits go in as a copy: megatron's cross entropy works on them in
        place, and with micro-batch 1 `.contiguous()` would hand over the transposed view itself (autograd
        forbids the in-place change)."""
        logits = logits.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        loss = get_ops().cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                       parallel_state.get_tensor_model_parallel_group())
        return loss.transpose(0, 1).contiguous()

    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This stage's decoder layers: streams [B, S, N, D] on the last stage, [S * N, B, D] on the others."""
        b, s = input_ids.shape
        n, d = self.cfg.hc_mult, self.cfg.hidden_size
        if self.pre_process:
            streams = self.embedding(input_ids).unsqueeze(2).expand(-1, -1, n, -1).contiguous()
        else:
            streams = self.input_tensor.view(s, n, b, d).permute(2, 0, 1, 3)
        for start, stop, recompute in self._layer_groups():
            if recompute:  # keep only the group's input; run its layers again in the backward
                run = functools.partial(self._run_layers, start=start, stop=stop)  # checkpoint saves tensors only
                streams = tensor_parallel.checkpoint(run, False, streams, input_ids)
            else:
                streams = self._run_layers(streams, input_ids, start, stop)
        if not self.post_process:
            return streams.permute(1, 2, 0, 3).reshape(s * n, b, d).contiguous()
        return streams

    def _run_layers(self, streams, input_ids, start: int, stop: int):
        for layer in self.layers[start:stop]:
            streams = layer(streams, input_ids)
        return streams

    def _layer_groups(self) -> list[tuple[int, int, bool]]:
        """(start, stop, recompute) over this stage's layers, as megatron's TransformerBlock reads
        --recompute-granularity full: 'uniform' recomputes every group of recompute_num_layers layers, 'block'
        the first recompute_num_layers layers one by one and runs the rest plainly. Only the training forward
        recomputes (no backward otherwise)."""
        c, n = self.config, len(self.layers)
        if c.recompute_granularity != "full" or not self.training:
            return [(0, n, False)]
        k = c.recompute_num_layers
        if c.recompute_method == "uniform":
            return [(i, min(i + k, n), True) for i in range(0, n, k)]
        if c.recompute_method == "block":
            return [(i, i + 1, True) for i in range(min(k, n))] + ([(k, n, False)] if k < n else [])
        raise ValueError(f"--recompute-method {c.recompute_method!r}: expected uniform or block")

    def _attach_mtp_loss(self, h, streams, input_ids, labels, loss_mask):
        """megatron's GPTModel MTP loss: per depth k the labels and loss mask shifted k + 1 further, the masked
        mean cross entropy scaled by mtp_loss_scaling_factor / mtp_num_layers and attached to h."""
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        scale = self.config.mtp_loss_scaling_factor / self.mtp_num_layers
        for k, mtp_h in enumerate(self.mtp(streams, input_ids, self.embedding)):
            logits = self.output_layer(mtp_h)[0]
            mask_k = shift_left(mask, k + 1)
            loss = mask_k * self._token_loss(logits, shift_left(labels, k + 1))
            num_tokens = mask_k.sum()
            if self.training:
                MTPLossLoggingHelper.save_loss_to_tracker(
                    loss.sum() / num_tokens, k, self.mtp_num_layers,
                    avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
                )
            per_token = self.config.calculate_per_token_loss
            h = MTPLossAutoScaler.apply(h, scale * loss if per_token else scale * loss / num_tokens)
        return h
