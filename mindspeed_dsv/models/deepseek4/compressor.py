"""V4's long-range KV branches: the compressors of CSA and HCA layers and CSA's lightning indexer.

A compressor turns every window of m tokens (m = compress rate) into one entry: a per-channel softmax over the
window's gate logits (plus a learned per-position bias) weights the window's projected values; the result is
RMS-normed and rotated (compressed rope) at position window * m. HCA uses disjoint windows of m tokens. CSA
projects to two series per token (Ca, Cb) and makes entry w from window w-1's Ca and window w's Cb: windows
of 2m tokens with stride m. A trailing partial window yields no entry (inference caches it; training drops
it). Query t may see entry w only when w < (t + 1) // m (the window has closed).

CSA also runs an indexer: a smaller compressor (index_head_dim) and index_n_heads query heads score every
closed entry, sum_h w_h * relu(q_h . k) / sqrt(c), and each query keeps its index_topk best entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mindspeed_dsv.platform.megatron_compat import replicated_linear_class

from .config import CSA, DeepSeekV4Config
from .norm import V4RMSNorm
from .rope import cos_sin, rotate_trailing


def linear(config, in_features: int, out_features: int):
    """megatron's TP-replicated Linear (V4's attention is never split over TP); call it as `lin(x)[0]`."""
    return replicated_linear_class()(in_features, out_features, config=config, init_method=config.init_method,
                                     bias=False)


class WindowCompressor(torch.nn.Module):
    """kv_proj / gate_proj / position_bias / kv_norm of one compressor (transformers' names).
    overlap=True is CSA's two-series layout (projections to 2 * head_dim)."""

    def __init__(self, config, cfg: DeepSeekV4Config, rate: int, head_dim: int, overlap: bool):
        super().__init__()
        self.rate, self.head_dim, self.overlap = rate, head_dim, overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = linear(config, cfg.hidden_size, width)
        self.gate_proj = linear(config, cfg.hidden_size, width)
        self.position_bias = torch.nn.Parameter(torch.zeros(rate, width, dtype=torch.float32))
        self.kv_norm = V4RMSNorm(head_dim, cfg.rms_norm_eps)
        self.rope = cfg.compress_rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] -> entries [B, S // rate, head_dim], rotated at positions window * rate."""
        b, s, _ = x.shape
        m, d = self.rate, self.head_dim
        n = s // m
        if n == 0:
            return x.new_zeros((b, 0, d))
        kv = self.kv_proj(x[:, : n * m])[0].view(b, n, m, -1)
        gate = self.gate_proj(x[:, : n * m])[0].view(b, n, m, -1) + self.position_bias
        if self.overlap:
            # slots [0, m): previous window's Ca (none for window 0: value 0, gate -inf, weight 0);
            # slots [m, 2m): this window's Cb
            kv_w = kv.new_zeros((b, n, 2 * m, d))
            gate_w = gate.new_full((b, n, 2 * m, d), float("-inf"))
            kv_w[:, :, m:], gate_w[:, :, m:] = kv[..., d:], gate[..., d:]
            kv_w[:, 1:, :m], gate_w[:, 1:, :m] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
            kv, gate = kv_w, gate_w
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        entries = self.kv_norm((kv * weights).sum(dim=2))
        positions = torch.arange(n, device=x.device) * m
        cos, sin = cos_sin(self.rope, positions)
        return rotate_trailing(entries, cos, sin)


def closed_entries(seq_len: int, n_entries: int, rate: int, device) -> torch.Tensor:
    """[S, T] bool: entry w is visible to query t (its window closed at or before t)."""
    t = torch.arange(seq_len, device=device)
    return torch.arange(n_entries, device=device)[None, :] < ((t + 1) // rate)[:, None]


class Indexer(torch.nn.Module):
    """CSA's lightning indexer (transformers: compressor.indexer.{kv_proj, gate_proj, position_bias, kv_norm,
    q_b_proj, scorer.weights_proj})."""

    def __init__(self, config, cfg: DeepSeekV4Config):
        super().__init__()
        self.rate, self.n_heads, self.head_dim, self.topk = cfg.csa_rate, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.compressor = WindowCompressor(config, cfg, cfg.csa_rate, cfg.index_head_dim, overlap=True)
        self.q_b_proj = linear(config, cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.weights_proj = linear(config, cfg.hidden_size, cfg.index_n_heads)
        self.rope = cfg.compress_rope

    def forward(self, x: torch.Tensor, q_residual: torch.Tensor) -> torch.Tensor:
        """-> [B, S, k] selected entry ids, -1 where fewer than k entries are visible."""
        b, s, _ = x.shape
        keys = self.compressor(x)  # [B, T, c]
        n = keys.shape[1]
        k = min(self.topk, n)
        cos, sin = cos_sin(self.rope, torch.arange(s, device=x.device))
        q = self.q_b_proj(q_residual)[0].view(b, s, self.n_heads, self.head_dim)
        q = rotate_trailing(q, cos[:, None, :], sin[:, None, :])
        scores = F.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))) * self.head_dim**-0.5
        head_w = self.weights_proj(x)[0].float() * self.n_heads**-0.5  # [B, S, H]
        scores = (scores * head_w.unsqueeze(-1)).sum(dim=2)  # [B, S, T]
        if n == 0:
            return scores.topk(k, dim=-1).indices
        visible = closed_entries(s, n, self.rate, x.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        picked = scores.topk(k, dim=-1).indices
        # a query with fewer than k closed entries also picks closed-later ones (score -inf): drop them
        threshold = ((torch.arange(s, device=x.device) + 1) // self.rate)[None, :, None]
        return torch.where(picked >= threshold, torch.full_like(picked, -1), picked)


class CompressedKV(torch.nn.Module):
    """The compressed branch of a CSA or HCA layer: entries [B, T, d] and their additive mask [B, S, T]
    (0 where query t may attend entry w, -inf elsewhere). The module keeps transformers' layout: the
    compressor's own weights at this level, CSA's indexer below it."""

    def __init__(self, config, cfg: DeepSeekV4Config, layer_type: str):
        super().__init__()
        self.csa = layer_type == CSA
        rate = cfg.csa_rate if self.csa else cfg.hca_rate
        self.rate = rate
        self.window = WindowCompressor(config, cfg, rate, cfg.head_dim, overlap=self.csa)
        self.indexer = Indexer(config, cfg) if self.csa else None

    def forward(self, x: torch.Tensor, q_residual: torch.Tensor):
        b, s, _ = x.shape
        entries = self.window(x)
        n = entries.shape[1]
        if not self.csa:
            visible = closed_entries(s, n, self.rate, x.device).expand(b, s, n)
        else:
            picked = self.indexer(x, q_residual)  # [B, S, k]
            # scatter the valid picks into an [B, S, T + 1] map; -1 picks land in the extra column
            slots = torch.where(picked >= 0, picked, torch.full_like(picked, n))
            visible = torch.zeros((b, s, n + 1), dtype=torch.bool, device=x.device)
            visible.scatter_(-1, slots, True)
            visible = visible[..., :n]
        bias = torch.zeros(visible.shape, dtype=entries.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        return entries, bias
