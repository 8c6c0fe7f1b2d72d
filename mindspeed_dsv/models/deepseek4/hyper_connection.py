"""Manifold-constrained hyper-connections (mHC): V4 keeps hc_mult residual streams per token. Before each
sub-block (attention, MoE) a learned projection of all streams gives the weights that collapse them into the
block's input (pre), spread the block's output back over the streams (post), and mix the streams among
themselves (comb, made doubly stochastic by Sinkhorn iterations). Computed in fp32, as transformers keeps
these modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import unweighted_rms_norm


def _mix_inputs(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., N, D] streams -> [..., out] = rms-normalised flattened streams @ fn^T, in fp32."""
    flat = unweighted_rms_norm(streams.flatten(-2).float(), eps)
    return F.linear(flat, fn.float())


class HyperConnection(torch.nn.Module):
    """One sub-block's mHC weights. Parameter names are transformers' (fn, base, scale)."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        width = (2 + hc_mult) * hc_mult  # pre (N), post (N), comb (N*N)
        self.fn = torch.nn.Parameter(torch.empty(width, hc_mult * hidden_size, dtype=torch.float32))
        self.base = torch.nn.Parameter(torch.zeros(width, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
        torch.nn.init.normal_(self.fn, std=0.02)

    def forward(self, streams: torch.Tensor):
        """streams [..., N, D] -> (post [..., N], comb [..., N, N], collapsed block input [..., D]); post and
        comb in fp32."""
        n = self.hc_mult
        mixes = _mix_inputs(streams, self.fn, self.norm_eps)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(streams: torch.Tensor, block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
        """New streams: post spreads the block output, comb^T mixes the old streams (sum over comb's first
        axis: Sinkhorn's result is not symmetric, so the direction matters)."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + torch.matmul(
            comb.to(dtype).transpose(-1, -2), streams
        )


class HyperHead(torch.nn.Module):
    """The final collapse of the streams before the last norm (transformers' hc_head: hc_fn, hc_base, hc_scale)."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = torch.nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.hc_base = torch.nn.Parameter(torch.zeros(hc_mult, dtype=torch.float32))
        self.hc_scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float32))
        torch.nn.init.normal_(self.hc_fn, std=0.02)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = _mix_inputs(streams, self.hc_fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)
