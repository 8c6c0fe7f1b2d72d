"""ops/adam.py: FusedAdam against torch's own Adam / AdamW, megatron's clipping folded into its update, its state
in torch's format; on a GPU the Triton kernel against the torch math it stands for."""

import pytest
import torch

from mindspeed_dsv.ops.adam import FusedAdam, adam_update_
from mindspeed_dsv.platform.megatron_compat import _clip_grad_by_total_norm


def _params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(3)]
    return params, grads


def _run(opt_cls, adam_w, steps_grads, params, clip=None, **kw):
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-2}]
    if opt_cls is FusedAdam:
        opt = FusedAdam(groups, adam_w_mode=adam_w, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    else:
        opt = (torch.optim.AdamW if adam_w else torch.optim.Adam)(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                                                   foreach=False)
    for grads in steps_grads:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        if clip is not None:
            clip(params)
        opt.step()
    return opt


@pytest.mark.parametrize("adam_w", [True, False], ids=["adamw", "adam"])
def test_fused_adam_equals_torch_adam(adam_w):
    ours, grads = _params()
    ref, _ = _params()
    _run(FusedAdam, adam_w, grads, ours)
    _run(torch.optim.Adam, adam_w, grads, ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(a, b) for a, b in zip(ours, _params()[0]))  # every tensor moved


def test_clipping_is_folded_into_the_update():
    """megatron's clip with our Adam: the gradients are left alone and the update equals torch's Adam on the
    clipped gradients (the same fp32 product, so bit for bit equal to scaling the gradients first)."""
    ours, grads = _params()
    ref, _ = _params()
    seen = []

    def clip_ours(params):
        before = [p.grad.clone() for p in params]
        _clip_grad_by_total_norm(params, max_norm=1.0, total_norm=6.0)
        seen.append(all(torch.equal(a, p.grad) for a, p in zip(before, params)))

    def clip_ref(params):
        torch._foreach_mul_([p.grad for p in params], 1.0 / (6.0 + 1e-6))

    opt = _run(FusedAdam, True, grads, ours, clip=clip_ours)
    ref_opt = _run(FusedAdam, True, grads, ref, clip=clip_ref)
    assert seen == [True, True, True]  # no pass over the gradients
    assert opt._grad_scale == 1.0  # consumed by the step
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), ref_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_clip_scales_the_grads_of_parameters_no_fused_adam_owns():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    FusedAdam([torch.nn.Parameter(torch.ones(2))], lr=1.0)  # owns another parameter
    _clip_grad_by_total_norm([p], max_norm=1.0, total_norm=6.0)
    assert torch.equal(p.grad, torch.full((4,), 3.0) * (1.0 / (6.0 + 1e-6)))


def test_state_is_torchs_and_resumes_exactly():
    """step a float32 cpu tensor (as torch's non-fused Adam keeps it), the moments shaped like the parameter; a
    state dict saved after step 2 and loaded into a new optimizer continues as the uninterrupted run, also when
    one step tensor is shared by every parameter's state (megatron's distributed optimizer restores it so) or
    missing (megatron's init_state_fn)."""
    straight, grads = _params()
    _run(FusedAdam, True, grads, straight)
    resumed, _ = _params()
    opt = _run(FusedAdam, True, grads[:2], resumed)
    st = opt.state[resumed[0]]
    assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu" and st["step"].item() == 2.0
    assert st["exp_avg"].shape == resumed[0].shape
    saved = opt.state_dict()
    fresh = _run(FusedAdam, True, [], resumed)
    fresh.load_state_dict(saved)
    for p, gr in zip(resumed, grads[2]):
        p.grad = gr.clone()
    fresh.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)

    # megatron's distributed optimizer (without TE / Apex) restores one step tensor shared by every state
    shared, _ = _params()
    opt = _run(FusedAdam, True, grads[:2], shared)
    one_step = torch.tensor(2.0)
    for st in opt.state.values():
        st["step"] = one_step
    for p, gr in zip(shared, grads[2]):
        p.grad = gr.clone()
    opt.step()
    assert one_step.item() == 2.0 and all(st["step"].item() == 3.0 for st in opt.state.values())
    for a, b in zip(shared, straight):
        assert torch.equal(a, b)

    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdam([p], lr=0.1)
    opt.state[p]["exp_avg"] = torch.zeros(3)  # what megatron's init_state_fn leaves: no "step"
    opt.state[p]["exp_avg_sq"] = torch.zeros(3)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].item() == 1.0
    # first step, no weight decay: m̂ = g, v̂ = g², so p -= lr · g / (|g| + eps)
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.0 - 0.1 / (1.0 + 1e-8)), rtol=1e-6, atol=1e-7)


def test_fused_adam_refuses_what_it_does_not_implement():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdam([p], lr=0.1, amsgrad=True).step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_triton_kernel_equals_the_torch_math(decoupled):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 2048 * 3 + 17  # a partial last block
    kw = dict(step=3, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, decoupled=decoupled,
              grad_scale=0.37)
    p, gr, m = (torch.randn(n, device="cuda", generator=g) for _ in range(3))
    v = torch.rand(n, device="cuda", generator=g)
    ours = [t.clone() for t in (p, gr, m, v)]
    ref = [t.cpu() for t in (p, gr, m, v)]
    adam_update_(*ours, **kw)  # Triton
    adam_update_(*ref, **kw)  # the torch math on the cpu
    assert torch.equal(ours[1].cpu(), ref[1])  # the gradient is read, not written
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=1e-7)


def test_the_owner_registry_keeps_no_optimizer_alive():
    import gc
    import weakref

    p = torch.nn.Parameter(torch.ones(2))
    opt = FusedAdam([p], lr=0.1)
    assert FusedAdam.owning([p]) is opt
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None and FusedAdam.owning([p]) is None  # its moments are freed with it
