"""CUDA implementations against the references on the GPU (skipped without one).

Run on a GPU machine: `pytest tests/ops` (leave TORCHDYNAMO_DISABLE unset to exercise the torch.compile paths;
with it set they run eagerly and only the SDPA / _grouped_mm paths are new code)."""

import pytest
import torch

from mindspeed_dsv import ops
from mindspeed_dsv.ops import OpsConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ALL_ON = OpsConfig(
    use_flash_attn=True, use_fused_rmsnorm=True, use_fused_rotary_pos_emb=True, use_fused_swiglu=True,
    moe_grouped_gemm=True, use_fused_moe_token_permute_and_unpermute=True, cross_entropy_loss_fusion=True,
)  # fmt: skip
BF16 = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def cuda_ops():
    return ops.build_ops(ALL_ON, platform="cuda"), ops.build_ops(OpsConfig(), platform="cuda")


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_pad_v"])
@pytest.mark.parametrize("packed", [False, True])
def test_attention(impl, packed):
    torch.manual_seed(0)
    s, b, h, dqk, dv = 256, 1, 4, 192, 128
    q, k, v = (torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for d in (dqk, dqk, dv))
    cu = torch.tensor([0, 100, 256], device="cuda", dtype=torch.int32) if packed else None
    fn = ops.build_ops(platform="cuda", overrides={"attention": impl}).attention
    out = fn(q, k, v, dqk**-0.5, causal=True, cu_seqlens=cu)
    ref = ops.get_ops().attention(q, k, v, dqk**-0.5, causal=True, cu_seqlens=cu)
    torch.testing.assert_close(out.float(), ref.float(), **BF16)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.float(), r.float(), rtol=5e-2, atol=5e-2)


def test_elementwise_fusions(cuda_ops):
    fused, ref = cuda_ops
    x = torch.randn(64, 2, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6).float(), ref.rms_norm(x, w, 1e-6).float(), **BF16)
    torch.testing.assert_close(fused.swiglu(x).float(), ref.swiglu(x).float(), **BF16)
    cos, sin = ops.rotary_cos_sin(ops.RopeConfig(dim=64), torch.arange(64, device="cuda"))
    xr = torch.randn(64, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    args = (xr, cos[:, None, None].bfloat16(), sin[:, None, None].bfloat16())
    torch.testing.assert_close(fused.apply_rotary(*args).float(), ref.apply_rotary(*args).float(), **BF16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_matmul(cuda_ops, dtype):
    fused, ref = cuda_ops
    torch.manual_seed(1)
    counts = torch.tensor([64, 0, 33, 7], device="cuda")
    x = torch.randn(104, 256, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(4, 256, 128, device="cuda", dtype=dtype, requires_grad=True)
    out, expected = fused.grouped_matmul(x, w, counts), ref.grouped_matmul(x, w, counts)
    tol = BF16 if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(expected, (x, w), g)):
        torch.testing.assert_close(a.float(), r.float(), rtol=5e-2, atol=5e-1 if dtype == torch.bfloat16 else 1e-3)


def test_permute_unpermute(cuda_ops):
    fused, ref = cuda_ops
    t, topk, e = 128, 6, 64
    tokens = torch.randn(t, 256, device="cuda")
    indices = torch.rand(t, e, device="cuda").topk(topk, dim=1).indices
    probs = torch.rand(t, topk, device="cuda")
    p1, s1 = fused.permute(tokens, indices)
    p2, s2 = ref.permute(tokens, indices)
    assert torch.equal(p1, p2) and torch.equal(s1, s2)
    torch.testing.assert_close(fused.unpermute(p1, s1, probs), ref.unpermute(p2, s2, probs))
    # bf16 through the compiled path: gradients as the reference's (both sum the k rows in fp32)
    x = tokens.bfloat16().requires_grad_()
    pr = probs.requires_grad_()
    grads = []
    for impl in (fused, ref):
        p, s = impl.permute(x, indices)
        out = impl.unpermute(p * 1.5, s, pr)
        grads.append(torch.autograd.grad(out.float().pow(2).sum(), (x, pr)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), **BF16)


def test_cross_entropy_compiled(cuda_ops):
    """The compiled two-pass cross entropy on bf16 logits: fp32 F.cross_entropy's loss, its gradient in bf16."""
    import torch.nn.functional as F

    fused, _ = cuda_ops
    assert fused.impls["cross_entropy"] == "compile"
    torch.manual_seed(0)
    logits = 4 * torch.randn(256, 2, 32000, device="cuda")
    labels = torch.randint(0, 32000, (256, 2), device="cuda")
    dloss = torch.rand(256, 2, device="cuda")
    x = logits.bfloat16().requires_grad_()
    loss = fused.cross_entropy(x, labels, None)
    (loss * dloss).sum().backward()
    y = logits.bfloat16().float().requires_grad_()
    ref = F.cross_entropy(y.view(-1, 32000), labels.view(-1), reduction="none").view(256, 2)
    (ref * dloss).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), y.grad, rtol=1.6e-2, atol=1e-6)
