"""NPU implementations with torch_npu faked at its API boundary: the documented arguments are passed and the
results (and grads) equal the plain-torch references."""

import sys

import pytest
import torch

from mindspeed_dsv import ops
from mindspeed_dsv.ops import OpsConfig

from .fake_torch_npu import COMPRESSED, make_fake_torch_npu

ALL_ON = OpsConfig(
    use_flash_attn=True,
    use_fused_rmsnorm=True,
    use_fused_rotary_pos_emb=True,
    use_fused_swiglu=True,
    moe_grouped_gemm=True,
    use_fused_moe_token_permute_and_unpermute=True,
)


@pytest.fixture
def npu(monkeypatch):
    fake = make_fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake, ops.build_ops(ALL_ON, platform="npu"), ops.build_ops(OpsConfig(), platform="npu")


def _calls(fake, name):
    return [kw for n, kw in fake.calls if n == name]


def test_everything_resolves_to_npu():
    impls = ops.resolve_impls(OpsConfig(**{f: True for f in ALL_ON.__dataclass_fields__}), "npu")
    # the fused cross entropy is plain torch math on every device (ops/cross_entropy.py)
    assert impls.pop("cross_entropy") == "fused"
    assert set(impls.values()) == {"npu"}


def test_npu_module_does_not_import_torch_npu_at_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` would raise
    import importlib

    importlib.reload(importlib.import_module("mindspeed_dsv.ops.npu"))
    with pytest.raises(RuntimeError, match="torch_npu cannot be imported"):
        ops.build_ops(ALL_ON, platform="npu").swiglu(torch.randn(2, 4))


@pytest.mark.parametrize("sq,b", [(10, 2), (7, 1)])
def test_attention_sbh_causal(npu, sq, b):
    fake, fused, ref = npu
    torch.manual_seed(0)
    h, dqk, dv = 3, 24, 16
    q, k, v = (torch.randn(sq, b, h, d, requires_grad=True) for d in (dqk, dqk, dv))
    out = fused.attention(q, k, v, 0.21, causal=True)
    expected = ref.attention(q, k, v, 0.21, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (call,) = _calls(fake, "npu_fusion_attention")
    assert call["input_layout"] == "SBH" and call["head_num"] == h and call["sparse_mode"] == 3
    assert call["scale"] == pytest.approx(0.21) and call["keep_prob"] == 1.0
    assert call["atten_mask"].shape == (COMPRESSED, COMPRESSED)
    assert call["shapes"][2] == (sq, b, h * dqk), "V padded to the q/k head dim"
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_attention_explicit_mask_uses_sparse_mode_0(npu):
    fake, fused, ref = npu
    sq, b, h, dqk, dv = 6, 2, 2, 16, 8
    q, k, v = (torch.randn(sq, b, h, d) for d in (dqk, dqk, dv))
    mask = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    mask[1, ..., 0] = True  # batch 1 may not look at position 0
    mask[1, 0, 0, 0] = False
    out = fused.attention(q, k, v, 0.3, causal=True, attention_mask=mask)
    torch.testing.assert_close(out, ref.attention(q, k, v, 0.3, causal=True, attention_mask=mask), rtol=1e-5, atol=1e-5)
    (call,) = _calls(fake, "npu_fusion_attention")
    assert call["sparse_mode"] == 0 and call["atten_mask"].shape == (b, 1, sq, sq)


def test_attention_packed_tnd(npu):
    fake, fused, ref = npu
    torch.manual_seed(1)
    h, dqk, dv = 2, 16, 8
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    q, k, v = (torch.randn(11, 1, h, d, requires_grad=True) for d in (dqk, dqk, dv))
    out = fused.attention(q, k, v, 0.25, causal=True, cu_seqlens=cu)
    expected = ref.attention(q, k, v, 0.25, causal=True, cu_seqlens=cu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (call,) = _calls(fake, "npu_fusion_attention")
    assert call["input_layout"] == "TND" and call["sparse_mode"] == 3
    assert call["actual_seq_qlen"] == [3, 4, 11] and call["actual_seq_kvlen"] == [3, 4, 11]
    assert call["shapes"][0] == (11, h, dqk)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_rms_norm(npu):
    fake, fused, ref = npu
    x, w = torch.randn(4, 3, 32), torch.randn(32)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    assert _calls(fake, "npu_rms_norm") == [dict(epsilon=1e-5)]


def test_rotary_deinterleaves_and_matches_reference(npu):
    fake, fused, ref = npu
    torch.manual_seed(2)
    cfg = ops.RopeConfig(dim=16, rope_type="yarn", factor=8.0, original_max_position_embeddings=32,
                         mscale=0.707, mscale_all_dim=1.0)
    s, b, h = 9, 2, 3
    cos, sin = ops.rotary_cos_sin(cfg, torch.arange(s))
    cos, sin = cos[:, None, None], sin[:, None, None]  # [s, 1, 1, d/2] against x [s, b, h, d]
    x = torch.randn(s, b, h, 16)
    torch.testing.assert_close(fused.apply_rotary(x, cos, sin), ref.apply_rotary(x, cos, sin), rtol=1e-6, atol=1e-6)
    (call,) = _calls(fake, "npu_rotary_mul")
    assert call["r1_shape"] == (s, 1, 1, 16)
    # non-interleaved (rotate_half) layout goes straight through
    torch.testing.assert_close(
        fused.apply_rotary(x, cos, sin, interleaved=False), ref.apply_rotary(x, cos, sin, interleaved=False)
    )
    with pytest.raises(ValueError, match="4-D"):
        fused.apply_rotary(x[0], cos[0], sin[0])


def test_swiglu(npu):
    fake, fused, ref = npu
    x = torch.randn(5, 12)
    torch.testing.assert_close(fused.swiglu(x), ref.swiglu(x))
    assert _calls(fake, "npu_swiglu") == [dict(dim=-1)]


def test_grouped_matmul_counts_and_grads(npu):
    fake, fused, ref = npu
    torch.manual_seed(3)
    counts = torch.tensor([3, 0, 4, 2])
    x = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(4, 8, 6, requires_grad=True)
    out = fused.grouped_matmul(x, w, counts)
    expected = ref.grouped_matmul(x, w, counts)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(expected, (x, w), g)
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-6)
    fwd, dgrad, wgrad = _calls(fake, "npu_grouped_matmul")
    for call in (fwd, dgrad, wgrad):
        assert call["group_list_type"] == 1 and call["split_item"] == 3  # counts, single in/out tensor
        assert call["group_list"].tolist() == [3, 0, 4, 2] and call["group_list"].dtype == torch.int64
    assert (fwd["group_type"], dgrad["group_type"], wgrad["group_type"]) == (0, 0, 2)
    # one 3-D weight (not a list of 4): the form that allows 1024 groups and a transposed weight for dgrad
    assert (fwd["n_weight"], fwd["weight_dims"], dgrad["weight_dims"]) == (1, [3], [3])


def test_grouped_matmul_past_the_list_cap_of_128(npu):
    """200 experts on one rank: a weight list would be refused by the kernel (128 max); one 3-D weight is not."""
    fake, fused, ref = npu
    torch.manual_seed(5)
    e = 200
    counts = torch.randint(0, 3, (e,))
    x = torch.randn(int(counts.sum()), 4, requires_grad=True)
    w = torch.randn(e, 4, 3, requires_grad=True)
    out = fused.grouped_matmul(x, w, counts)
    torch.testing.assert_close(out, ref.grouped_matmul(x, w, counts), rtol=1e-6, atol=1e-6)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.grouped_matmul(x, w, counts).sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-6)
    # the fake keeps the documented cap for the list form, so the old call would fail here
    with pytest.raises(AssertionError, match="128"):
        fake.npu_grouped_matmul([x.detach()], list(w.detach().unbind(0)), group_list=counts, split_item=3,
                                group_type=0, group_list_type=1)
    with pytest.raises(ValueError, match="at most 1024 groups"):
        fused.grouped_matmul(torch.randn(0, 4), torch.randn(1025, 4, 3), torch.zeros(1025, dtype=torch.int64))


def test_permute_unpermute(npu):
    fake, fused, ref = npu
    torch.manual_seed(4)
    t, topk, e = 6, 2, 4
    tokens = torch.randn(t, 8).bfloat16().requires_grad_()  # the kernel takes bf16 tokens and probs only
    indices = torch.stack([torch.randperm(e)[:topk] for _ in range(t)])
    probs = torch.rand(t, topk).bfloat16()
    p_fused, s_fused = fused.permute(tokens, indices)
    p_ref, s_ref = ref.permute(tokens, indices)
    torch.testing.assert_close(p_fused, p_ref)
    assert torch.equal(s_fused, s_ref) and s_fused.dtype == torch.int32
    out = fused.unpermute(p_fused * 3.0, s_fused, probs)
    torch.testing.assert_close(out, ref.unpermute(p_ref * 3.0, s_ref, probs))
    assert _calls(fake, "npu_moe_token_unpermute")[0]["probs_dtype"] == torch.bfloat16
    (g_fused,) = torch.autograd.grad(out.float().sum(), tokens)
    torch.testing.assert_close(g_fused.float(), 3.0 * probs.float().sum(1, keepdim=True).expand(t, 8),
                               rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="needs --bf16 on npu"):
        fused.permute(tokens.float(), indices)
