"""The fused vocab-parallel cross entropy against torch's F.cross_entropy and megatron's reference."""

import pytest
import torch
import torch.nn.functional as F

from mindspeed_dsv.ops import cross_entropy as ce
from tests.dist_utils import run_distributed


def _case(dtype=torch.float64, s=7, b=3, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(s, b, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (s, b), generator=g)
    dloss = torch.rand(s, b, generator=g).to(dtype)  # per-token upstream gradients (loss mask, averaging)
    return logits, labels, dloss


def test_fused_matches_torch_cross_entropy_loss_and_grad():
    logits, labels, dloss = _case()
    x = logits.clone().requires_grad_()
    loss = ce.fused_cross_entropy(x, labels)
    (loss * dloss).sum().backward()
    y = logits.clone().requires_grad_()
    ref = F.cross_entropy(y.view(-1, y.shape[-1]), labels.view(-1), reduction="none").view(labels.shape)
    (ref * dloss).sum().backward()
    assert loss.shape == labels.shape
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)  # fp32 math inside
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


def test_fused_bf16_grad_is_the_rounded_fp32_grad():
    logits, labels, dloss = _case(torch.float32, v=300)
    x = logits.bfloat16().requires_grad_()
    (ce.fused_cross_entropy(x, labels) * dloss).sum().backward()
    y = logits.bfloat16().float().requires_grad_()
    ref = F.cross_entropy(y.view(-1, 300), labels.view(-1), reduction="none").view(labels.shape)
    (ref * dloss).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), y.grad, rtol=1.6e-2, atol=1e-5)


def _tp_on_rank(logits, labels, dloss):
    from megatron.core import parallel_state

    from mindspeed_dsv.platform import init_distributed

    init_distributed(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    v = logits.shape[-1] // 2
    out = []
    for fn in (ce.fused_cross_entropy, ce.cross_entropy):  # ours, megatron's
        x = logits[..., rank * v:(rank + 1) * v].clone().requires_grad_()
        loss = fn(x, labels, group)
        (loss * dloss).sum().backward()
        out.append((loss.detach().numpy().copy(), x.grad.numpy().copy()))
    return out


def test_fused_over_two_tensor_parallel_ranks_matches_megatron_and_one_rank():
    logits, labels, dloss = _case(torch.float32, v=64, seed=3)
    labels[0, 0], labels[1, 1] = 0, 63  # a label at each end of the vocab, one on each rank
    results = run_distributed(_tp_on_rank, 2, logits, labels, dloss)
    x = logits.clone().requires_grad_()
    full = ce.fused_cross_entropy(x, labels)
    (full * dloss).sum().backward()
    for rank, ((loss, grad), (ref_loss, ref_grad)) in enumerate(results):
        torch.testing.assert_close(torch.from_numpy(loss), full.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(loss), torch.from_numpy(ref_loss), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(grad), x.grad[..., rank * 32:(rank + 1) * 32], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(ref_grad), rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and labels \(3, 2\) differ"):
        ce.fused_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(3, 2, dtype=torch.long))
