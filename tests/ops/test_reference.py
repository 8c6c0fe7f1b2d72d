"""The plain-torch references against independent formulas and transformers' own DeepSeek-V3 functions."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)

from mindspeed_dsv import ops

YARN_CASES = [
    # DeepSeek-V3's own values (mscale == mscale_all_dim -> attention factor 1)
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    # mscale != mscale_all_dim -> a non-trivial attention factor on cos/sin
    dict(factor=16.0, original_max_position_embeddings=256, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=1.0),
]


def _hf_config(rope, dim=64):
    params = {"rope_type": "yarn", "rope_theta": 10000.0, **rope} if rope else {"rope_type": "default", "rope_theta": 10000.0}
    return DeepseekV3Config(qk_rope_head_dim=dim, max_position_embeddings=163840, rope_parameters=params)


@pytest.mark.parametrize("rope", YARN_CASES + [None])
def test_rotary_matches_transformers(rope):
    torch.manual_seed(0)
    hf = _hf_config(rope)
    b, h, s, d = 2, 3, 37, 64
    q, k = torch.randn(b, h, s, d, dtype=torch.float64), torch.randn(b, h, s, d, dtype=torch.float64)
    positions = torch.arange(s).expand(b, s) + torch.tensor([[0], [1000]])  # two offsets, one large
    cos_hf, sin_hf = DeepseekV3RotaryEmbedding(hf)(q.float(), positions)
    q_ref, k_ref = apply_rotary_pos_emb_interleave(q, k, cos_hf.double(), sin_hf.double())

    cfg = ops.RopeConfig.from_hf(hf.to_dict())
    cos, sin = ops.rotary_cos_sin(cfg, positions)  # [b, s, d/2]
    q_ours = ops.apply_rotary(q, cos[:, None].double(), sin[:, None].double())
    k_ours = ops.apply_rotary(k, cos[:, None].double(), sin[:, None].double())
    # angles are fp32 in both (positions up to ~1000 rad): agreement to fp32 rounding of the angle
    torch.testing.assert_close(q_ours, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_ours, k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", YARN_CASES)
def test_yarn_frequencies_match_transformers_init_function(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_config(rope)
    inv_freq_hf, attention_factor_hf = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv_freq, attention_factor = ops.rotary.inv_freq_and_attention_factor(ops.RopeConfig.from_hf(hf.to_dict()))
    torch.testing.assert_close(inv_freq, inv_freq_hf.float(), rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(attention_factor_hf, rel=1e-12)


def test_yarn_softmax_scale_formula():
    cfg = ops.RopeConfig(dim=64, rope_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert ops.yarn_softmax_scale(cfg, 192) == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert ops.yarn_softmax_scale(ops.RopeConfig(dim=64), 192) == pytest.approx(192**-0.5)


@pytest.mark.parametrize("sq,sk", [(9, 9), (4, 9)])
def test_attention_matches_sdpa_math(sq, sk):
    torch.manual_seed(1)
    b, h, dqk, dv = 2, 3, 24, 16
    q, k, v = torch.randn(sq, b, h, dqk), torch.randn(sk, b, h, dqk), torch.randn(sk, b, h, dv)
    scale = 0.17
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # bottom-right aligned causal
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3).double() for t in (q, k, v)), attn_mask=allowed, scale=scale
        )
    ref = ref.permute(2, 0, 1, 3).reshape(sq, b, h * dv).float()
    torch.testing.assert_close(ops.attention_torch(q, k, v, scale, causal=True), ref, rtol=1e-5, atol=1e-5)


def test_packed_attention_equals_each_sequence_alone():
    torch.manual_seed(2)
    lens = [5, 1, 7]
    s, h, dqk, dv = sum(lens), 2, 16, 8
    q, k, v = torch.randn(s, 1, h, dqk), torch.randn(s, 1, h, dqk), torch.randn(s, 1, h, dv)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    out = ops.get_ops().attention(q, k, v, 0.3, causal=True, cu_seqlens=cu)
    parts = [ops.attention_torch(q[a:b_], k[a:b_], v[a:b_], 0.3) for a, b_ in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(out, torch.cat(parts), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens ends at 12"):
        ops.get_ops().attention(q, k, v, 0.3, cu_seqlens=torch.tensor([0, 5, 12]))


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_pad_v"])
@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_paths_on_cpu_equal_reference(impl, packed):
    torch.manual_seed(3)
    s, b, h, dqk, dv = 12, 1, 2, 24, 16
    q, k, v = (torch.randn(s, b, h, d, requires_grad=True) for d in (dqk, dqk, dv))
    cu = torch.tensor([0, 4, 12]) if packed else None
    fn = ops.build_ops(platform="cpu", overrides={"attention": impl}).attention
    out = fn(q, k, v, 0.2, causal=True, cu_seqlens=cu)
    ref = ops.get_ops().attention(q, k, v, 0.2, causal=True, cu_seqlens=cu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_transformers():
    torch.manual_seed(4)
    norm = DeepseekV3RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)


def test_swiglu_formula():
    x = torch.randn(4, 10)
    gate, up = x[:, :5], x[:, 5:]
    torch.testing.assert_close(ops.swiglu(x), gate / (1 + torch.exp(-gate)) * up, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must be even"):
        ops.swiglu(torch.randn(2, 3))


def _row_by_row(x, w, counts):
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.stack([x[i] @ w[e] for i, e in enumerate(expert_of_row.tolist())]) if len(x) else x.new_zeros(0, w.shape[-1])


@pytest.mark.parametrize("impl", ["torch", "grouped_mm"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 4], [2]])
def test_grouped_matmul_row_by_row(impl, counts):
    torch.manual_seed(5)
    k, n = 16, 8
    x = torch.randn(sum(counts), k, requires_grad=True)
    w = torch.randn(len(counts), k, n, requires_grad=True)
    fn = ops.build_ops(platform="cpu", overrides={"grouped_matmul": impl}).grouped_matmul
    out = fn(x, w, torch.tensor(counts))
    ref = _row_by_row(x, w, counts)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()  # stride-0 grad: _grouped_mm needs it made contiguous
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=1e-6)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(gw[e]) == 0


def test_grouped_matmul_list_weights_and_errors():
    x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
    torch.testing.assert_close(ops.grouped_matmul(x, list(w), torch.tensor([2, 3])), _row_by_row(x, w, [2, 3]))
    with pytest.raises(ValueError, match="sums to 4 but x has 5 rows"):
        ops.grouped_matmul(x, w, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="must be \\[2\\]"):
        ops.grouped_matmul(x, w, torch.tensor([5]))


def test_permute_unpermute_by_hand():
    torch.manual_seed(6)
    t, hdim, topk, e = 7, 4, 3, 5
    tokens = torch.randn(t, hdim, requires_grad=True)
    indices = torch.stack([torch.randperm(e)[:topk] for _ in range(t)])
    probs = torch.rand(t, topk, requires_grad=True)
    permuted, sorted_indices = ops.permute(tokens, indices)
    # independent: walk experts in order, tokens in order within an expert
    expected_rows, slot_of = [], {}
    for ex in range(e):
        for tok in range(t):
            for kk in range(topk):
                if indices[tok, kk] == ex:
                    slot_of[(tok, kk)] = len(expected_rows)
                    expected_rows.append(tokens[tok])
    torch.testing.assert_close(permuted, torch.stack(expected_rows))
    assert sorted_indices.dtype == torch.int32
    assert sorted_indices.tolist() == [slot_of[(tok, kk)] for tok in range(t) for kk in range(topk)]
    counts = ops.count_tokens_per_expert(indices, e)
    assert counts.tolist() == [int((indices == ex).sum()) for ex in range(e)]

    expert_out = permuted * 2.0 + 1.0  # any per-row function
    out = ops.unpermute(expert_out, sorted_indices, probs)
    expected = torch.stack([
        sum(probs[tok, kk] * (tokens[tok] * 2.0 + 1.0) for kk in range(topk)) for tok in range(t)
    ])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(probs.grad, ((tokens * 2 + 1).sum(-1, keepdim=True)).expand(t, topk).detach())
    # each token reaches the output through its k rows, each scaled by 2 * probs[t, k]
    torch.testing.assert_close(tokens.grad, (2 * probs.detach().sum(-1, keepdim=True)).expand(t, hdim))


def test_permute_unpermute_grads_match_autograd_of_plain_indexing():
    """The hand-written backward passes (gather-and-sum, index_copy) give autograd's gradients of the same
    math written with index_select."""
    torch.manual_seed(7)
    t, hdim, topk, e = 33, 8, 4, 9
    tokens = torch.randn(t, hdim, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(e)[:topk] for _ in range(t)])
    probs = torch.rand(t, topk, dtype=torch.float64, requires_grad=True)
    w = torch.randn(hdim, hdim, dtype=torch.float64)
    permuted, sorted_indices = ops.permute(tokens, indices)
    ops.unpermute(torch.tanh(permuted @ w), sorted_indices, probs).pow(2).sum().backward()
    order = torch.argsort(indices.reshape(-1), stable=True)
    tokens2 = tokens.detach().clone().requires_grad_()
    probs2 = probs.detach().clone().requires_grad_()
    rows = torch.tanh(tokens2.index_select(0, order // topk) @ w)
    back = rows.index_select(0, sorted_indices.long()).view(t, topk, hdim)
    (back * probs2.unsqueeze(-1)).sum(1).pow(2).sum().backward()
    torch.testing.assert_close(tokens.grad, tokens2.grad)
    torch.testing.assert_close(probs.grad, probs2.grad)


def test_permute_unpermute_with_no_tokens():
    """An EP rank that receives no tokens still runs its experts on [0, hidden] and combines back: the
    shapes survive (a `view(..., -1)` of zero rows cannot infer the hidden size), and the backward gives
    empty gradients of the right shapes."""
    hdim, topk = 8, 2
    tokens = torch.zeros(0, hdim, requires_grad=True)
    probs = torch.zeros(0, topk, requires_grad=True)
    permuted, sorted_indices = ops.permute(tokens, torch.zeros(0, topk, dtype=torch.long))
    assert permuted.shape == (0, hdim)
    out = ops.unpermute(permuted * 2.0, sorted_indices, probs)
    assert out.shape == (0, hdim)
    out.sum().backward()
    assert tokens.grad.shape == (0, hdim) and probs.grad.shape == (0, topk)


@pytest.mark.parametrize("experts,topk", [(64, 6), (8, 2), (300, 8)])
def test_routed_experts_and_narrow_sort_keys_equal_the_argsort_they_replace(experts, topk):
    """routed_experts = a stable descending argsort of the routing map (also for a row with fewer than topk set:
    it is filled with unset experts in increasing id); permute over sort_keys' narrow dtype = over int64."""
    g = torch.Generator().manual_seed(experts)
    routing_map = torch.zeros(50, experts, dtype=torch.bool)
    routing_map.scatter_(1, torch.rand(50, experts, generator=g).topk(topk, dim=1).indices, True)
    routing_map[3] = False
    routing_map[3, 5] = True
    want = torch.argsort(routing_map.to(torch.uint8), dim=1, descending=True, stable=True)[:, :topk]
    got = ops.routed_experts(routing_map, topk)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert got[3].tolist() == [5, *[e for e in range(topk) if e != 5][: topk - 1]]
    keys = ops.sort_keys(got, experts)
    assert keys.dtype == (torch.uint8 if experts <= 256 else torch.int16) and torch.equal(keys.long(), got)
    tokens = torch.randn(50, 4, generator=g)
    for a, b in zip(ops.permute(tokens, got), ops.permute(tokens, keys)):
        assert torch.equal(a, b)
    assert ops.sort_keys(got, 2**20).dtype == torch.int32 and ops.sort_keys(got, 2**40).dtype == torch.int64
