"""Every compatibility shim is still needed, and it does what it says.

For every shim the installed megatron-core still has the reason it exists (its import-time flags and its own
source; test_every_shim_is_still_needed_by_the_installed_megatron names each one an upgrade made unnecessary).
For the behavioural shims a small run also fails without the shim and passes with it (SHIM_CASES, gradient
fusion); the kernel shims step aside where Transformer Engine / Apex are installed.
"""

import inspect
import re

import pytest
import torch

from tests.dist_utils import run_distributed

CUDA_SPELLING = re.compile(r"torch\.cuda\.|device=['\"]cuda['\"]")


def test_every_cpu_torch_module_still_spells_cuda():
    import importlib

    from mindspeed_dsv.platform.megatron_compat import CPU_TORCH_MODULES

    for name in CPU_TORCH_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        assert CUDA_SPELLING.search(source), f"{name} no longer uses CUDA spellings: drop its shim"


def _source(obj) -> str:
    return inspect.getsource(obj)


def _reasons():
    """For every shim: does the installed megatron-core still have the reason the shim exists? Read from the
    attributes megatron set at import (before any shim), so the answer is about megatron, not about us."""
    import importlib

    from mindspeed_dsv.platform import megatron_compat as mc

    def mod(name):
        return importlib.import_module(name)

    orig = mc._original
    reasons = {
        # TELinear is a MagicMock while HAVE_TE says True: isinstance against it raises.
        "megatron.core.transformer.multi_latent_attention:HAVE_TE": lambda: (
            orig("megatron.core.transformer.multi_latent_attention:HAVE_TE") is True
            and not isinstance(mod("megatron.core.transformer.multi_latent_attention").TELinear, type)),
        # MLA accepts a down projection only by identity with the classes it imported.
        "megatron.core.transformer.multi_latent_attention:Linear": lambda: (
            "linear_q_down_proj in [" in _source(mod("megatron.core.transformer.multi_latent_attention"))
            and orig("megatron.core.transformer.multi_latent_attention:Linear") is not mc.replicated_linear_class()),
        # referenced after its import failed
        "megatron.core.transformer.moe.moe_utils:te_general_gemm": lambda: (
            orig("megatron.core.transformer.moe.moe_utils:te_general_gemm") is mc._ABSENT
            and _source(mod("megatron.core.transformer.moe.moe_utils")).count("te_general_gemm") > 1),
        # no TE/Apex FusedAdam: megatron falls back to torch's for-each AdamW
        "megatron.core.optimizer:Adam": lambda: orig("megatron.core.optimizer:USING_PYTORCH_OPTIMIZER") is True,
        "megatron.core.optimizer:USING_PYTORCH_OPTIMIZER": lambda: (
            orig("megatron.core.optimizer:USING_PYTORCH_OPTIMIZER") is True
            and _source(mod("megatron.core.optimizer")).count("USING_PYTORCH_OPTIMIZER") > 1),
        # Apex's wgrad extension absent, and megatron's linears still call it
        "megatron.core.tensor_parallel.layers:fused_weight_gradient_mlp_cuda": lambda: (
            orig("megatron.core.tensor_parallel.layers:_grad_accum_fusion_available") is False
            and "fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32" in _source(
                mod("megatron.core.tensor_parallel.layers"))),
        "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available": lambda: (
            orig("megatron.core.tensor_parallel.layers:_grad_accum_fusion_available") is False),
        "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu": lambda: "is_cuda" in _source(
            orig("megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu")),
        "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer":
            lambda: ".cuda()" in _source(orig("megatron.core.models.common.language_module.language_module:"
                                              "LanguageModule.setup_embeddings_and_output_layer")),
        # npu: the optimizers group parameters by torch.cuda.* type names (param.type())
        "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__": lambda: (
            "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']" in _source(
                mod("megatron.core.optimizer.optimizer"))),
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__": lambda: (
            "model_param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']" in _source(
                mod("megatron.core.optimizer.distrib_optimizer"))),
        "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32": lambda: "torch.cuda.FloatTensor" in _source(
            orig("megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32")),
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state": lambda: "cuda" in _source(
            orig("megatron.core.tensor_parallel.random:_get_cuda_rng_state")),
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state": lambda: "cuda" in _source(
            orig("megatron.core.tensor_parallel.random:_set_cuda_rng_state")),
        # no TE/Apex multi-tensor kernels: megatron's local stand-ins loop per tensor (the norm reads each on the host)
        "megatron.core.optimizer.clip_grads:l2_norm_impl": lambda: (
            orig("megatron.core.optimizer.clip_grads:l2_norm_impl").__name__ == "local_multi_tensor_l2_norm"
            and "for tensor in tensor_list" in _source(orig("megatron.core.optimizer.clip_grads:l2_norm_impl"))),
        "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl": lambda: (
            orig("megatron.core.optimizer.clip_grads:multi_tensor_scale_impl").__name__ == "local_multi_tensor_scale"),
        # bf16: no overflow buffer, so the copy takes its per-tensor loop
        "megatron.core.optimizer.optimizer:_multi_tensor_copy_this_to_that": lambda: (
            "self._dummy_overflow_buf = None" in _source(mod("megatron.core.optimizer.optimizer"))
            and "for this_, that_ in zip" in _source(
                orig("megatron.core.optimizer.optimizer:_multi_tensor_copy_this_to_that"))),
    }
    for name in mc.CPU_TORCH_MODULES:  # each module still spells the device as CUDA
        reasons[f"{name}:torch"] = lambda name=name: bool(CUDA_SPELLING.search(_source(mod(name))))
    return reasons


def test_every_shim_is_still_needed_by_the_installed_megatron():
    """Run after upgrading megatron-core: names every shim whose reason the new version no longer has."""
    from mindspeed_dsv.platform.megatron_compat import SHIMS

    reasons = _reasons()
    assert set(reasons) == {s.target for s in SHIMS}, "a shim without a reason check (or a check without a shim)"
    gone = [target for target, holds in reasons.items() if not holds()]
    assert not gone, f"megatron-core no longer needs these shims (drop them): {gone}"


def test_kernel_shims_apply_only_where_te_and_apex_are_absent(monkeypatch):
    """With Transformer Engine / Apex installed megatron's own kernels stay; without them the shims apply."""
    from mindspeed_dsv.platform import megatron_compat as mc
    from mindspeed_dsv.platform.device import Platform

    kernel_shims = {s.target: s.unless for s in mc.SHIMS if s.unless}
    assert kernel_shims == {
        "megatron.core.transformer.multi_latent_attention:HAVE_TE": "transformer_engine",
        "megatron.core.transformer.moe.moe_utils:te_general_gemm": "transformer_engine",
        "megatron.core.optimizer:Adam": "fused_adam",
        "megatron.core.optimizer:USING_PYTORCH_OPTIMIZER": "fused_adam",
        "megatron.core.tensor_parallel.layers:fused_weight_gradient_mlp_cuda": "apex_wgrad",
        "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available": "apex_wgrad",
        "megatron.core.optimizer.clip_grads:l2_norm_impl": "multi_tensor",
        "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl": "multi_tensor",
    }
    # This environment has neither (what megatron itself concluded at import).
    assert not any(check() for check in mc.KERNELS_PRESENT.values())
    for present in (False, True):
        monkeypatch.setattr(mc, "_applied", {})
        monkeypatch.setattr(mc, "KERNELS_PRESENT", {k: (lambda p=present: p) for k in mc.KERNELS_PRESENT})
        try:
            applied = set(mc.apply_megatron_compat(Platform("cuda")))
        finally:
            mc.undo_megatron_compat()
        if present:
            assert not applied & set(kernel_shims), applied & set(kernel_shims)
        else:
            assert set(kernel_shims) <= applied
        assert "megatron.core.transformer.multi_latent_attention:Linear" in applied  # needed with TE too


def test_every_shim_target_exists_and_is_replaced():
    from mindspeed_dsv.platform import current_platform
    from mindspeed_dsv.platform.megatron_compat import SHIMS, apply_megatron_compat

    applied = apply_megatron_compat(current_platform())
    for shim in SHIMS:
        owner, attr = shim.module_and_attr()
        assert shim.why and shim.devices
        if shim.target in applied:
            assert getattr(owner, attr, "missing") is not None or attr in ("te_general_gemm",), shim.target


def test_torch_stand_in_maps_cuda_to_cpu():
    from mindspeed_dsv.platform.megatron_compat import _TORCH_ON_CPU as t

    assert t.zeros(3, device="cuda").device.type == "cpu"
    assert t.tensor([1.0], device="cuda").device.type == "cpu"
    assert t.cuda.current_device() == "cpu"
    assert t.cuda.Stream() is t.cuda.current_stream()  # one implicit stream: never "on a side stream"
    state = t.cuda.get_rng_state()
    a = torch.rand(2)
    t.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(2))
    assert t.float32 is torch.float32 and t.nn is torch.nn  # everything else is torch itself


def test_clip_grad_matches_formula():
    from mindspeed_dsv.platform.megatron_compat import _clip_grad_by_total_norm

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    _clip_grad_by_total_norm([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    p.grad = torch.full((4,), 3.0)
    _clip_grad_by_total_norm([p], max_norm=10.0, total_norm=6.0)  # under the limit: untouched
    assert torch.equal(p.grad, torch.full((4,), 3.0))


def test_move_to_host_turns_split_sizes_into_numbers():
    from mindspeed_dsv.platform.megatron_compat import _move_to_host

    out = _move_to_host(torch.tensor([3, 1]), as_numpy=True)
    assert out.tolist() == [3, 1] and not torch.is_tensor(out)


def _build_and_step(skip):
    """One forward+backward of a 2-rank TP+SP / EP / PP model with some shims withheld."""
    import os

    from mindspeed_dsv.models import DeepSeekConfig, build_model, default_layout
    from mindspeed_dsv.platform import init_distributed
    from mindspeed_dsv.platform.megatron_compat import apply_megatron_compat, undo_megatron_compat
    from tests.model.hf_reference import tiny_hf_config

    undo_megatron_compat()
    apply_megatron_compat(skip=tuple(skip))
    sizes = dict(tp=1, pp=1, ep=1)
    kind = os.environ["LAYOUT_KIND"]
    sizes[kind.split("-")[0]] = 2
    if kind == "ep-megatron-dispatcher":  # our AllToAllTokenDispatcher stands aside: megatron's runs
        from mindspeed_dsv.models import moe_layer

        moe_layer.AllToAllTokenDispatcher.applies = staticmethod(lambda *args: False)
    import mindspeed_dsv.platform.distributed as d

    original = d.apply_megatron_compat
    d.apply_megatron_compat = lambda *a, **k: None  # keep the shims chosen above
    try:
        init_distributed(**sizes)
    finally:
        d.apply_megatron_compat = original
    # With pipeline stages, MTP makes the last stage hold a copy of the embedding that megatron syncs.
    cfg = DeepSeekConfig.from_hf(tiny_hf_config(num_nextn_predict_layers=1 if sizes["pp"] > 1 else 0))
    layout = default_layout(cfg, sequence_parallel=sizes["tp"] > 1)
    model = build_model(cfg, layout)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    pos = torch.arange(16)[None].expand(2, -1)
    if sizes["pp"] == 1:
        model(ids, pos, attention_mask=None, labels=ids).sum().backward()
    return True


NO_CUDA = "Torch not compiled with CUDA enabled"
SHIM_CASES = [
    ("tp", "megatron.core.tensor_parallel.mappings:torch", NO_CUDA),
    # megatron's own alltoall dispatcher (where ours does not apply; the reference of test_alltoall_dispatcher)
    ("ep-megatron-dispatcher", "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",
     "all_to_all_single(): incompatible"),
    ("ep", "megatron.core.transformer.moe.router:torch", NO_CUDA),
    ("tp", "megatron.core.transformer.multi_latent_attention:Linear", "Unsupported linear_q_down_proj"),
    ("pp", "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer",
     NO_CUDA),
]


@pytest.mark.parametrize("kind,target,reason", SHIM_CASES,
                         ids=[t.rsplit(":", 1)[-1] + "-" + k for k, t, _ in SHIM_CASES])
def test_shim_is_needed(kind, target, reason, monkeypatch):
    """Without the shim a 2-rank build/step fails for the shim's reason (tests/training runs the same layouts
    with every shim in place)."""
    monkeypatch.setenv("LAYOUT_KIND", kind)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        run_distributed(_build_and_step, 2, [target])


def _optimizer_step_on_rank(fused: bool):
    """One megatron optimizer step on the tiny model, clipped (clip_grad 0.05 cuts: the tiny model's gradient norm
    is larger); with fused=True through the cuda shims: our FusedAdam, which takes the clipping coefficient."""
    import megatron.core.optimizer as mopt
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed
    from mindspeed_dsv.ops.adam import FusedAdam
    from mindspeed_dsv.platform.megatron_compat import SHIMS
    from tests.model.hf_reference import tiny_hf_config

    init_distributed()
    if fused:  # what apply_megatron_compat does on cuda
        targets = {s.target for s in SHIMS if s.devices == ("cuda",)}
        assert targets == {"megatron.core.optimizer:Adam", "megatron.core.optimizer:USING_PYTORCH_OPTIMIZER"}
        mopt.Adam, mopt.USING_PYTORCH_OPTIMIZER = FusedAdam, False
    cfg = DeepSeekConfig.from_hf(tiny_hf_config(num_nextn_predict_layers=0))
    torch.manual_seed(0)
    model = build_model(cfg)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.05), [ddp])
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ddp(ids, torch.arange(16)[None].expand(2, -1), attention_mask=None, labels=ids).mean().backward()
    _, grad_norm, _ = opt.step()
    assert grad_norm > 0.05 * 2  # clipping acted
    # expert weights have their own optimizer (megatron's expert-data-parallel group; we mark them
    # allreduce=False at every EP size): the same kind for each
    inners = {(type(o.optimizer).__name__, o.optimizer.defaults["decoupled_weight_decay"])
              for o in opt.chained_optimizers}
    assert len(opt.chained_optimizers) == 2 and len(inners) == 1, inners
    (name, decoupled), = inners
    # numpy: pickled whole (many tensors through the rank queue would be shared by file descriptors)
    # Adam's step barely depends on the gradient's scale; its first moment does (clipped or not)
    moments = sorted(s["exp_avg"].norm().item() for o in opt.chained_optimizers for s in o.optimizer.state.values())
    return name, decoupled, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}, moments


def test_fused_adam_shim_gives_our_fused_adamw_with_the_same_clipped_step():
    (name, decoupled, params, moments), = run_distributed(_optimizer_step_on_rank, 1, True)
    (ref_name, ref_decoupled, ref_params, ref_moments), = run_distributed(_optimizer_step_on_rank, 1, False)
    assert (name, decoupled) == ("FusedAdam", True) and (ref_name, ref_decoupled) == ("AdamW", True)
    torch.testing.assert_close(torch.tensor(moments), torch.tensor(ref_moments), rtol=1e-5, atol=0)
    assert set(params) == set(ref_params)
    for n, p in params.items():
        torch.testing.assert_close(torch.from_numpy(p), torch.from_numpy(ref_params[n]), rtol=1e-5, atol=1e-6,
                                   msg=n)


def _main_grads_on_rank(fusion: bool, grouped: bool = False):
    """Two micro-batches through megatron DDP; the fp32 main_grad of every parameter afterwards. grouped: routed
    experts as GroupedMLPExperts through torch._grouped_mm (whose weight gradient fusion adds into main_grad)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mindspeed_dsv.models import DeepSeekConfig, build_model, default_layout
    from mindspeed_dsv.ops import OpsConfig, configure_ops
    from mindspeed_dsv.platform import current_platform, init_distributed
    from tests.model.hf_reference import tiny_hf_config

    init_distributed()
    configure_ops(OpsConfig(moe_grouped_gemm=grouped), current_platform())
    cfg = DeepSeekConfig.from_hf(tiny_hf_config(num_nextn_predict_layers=0))
    torch.manual_seed(0)
    model = build_model(cfg, default_layout(cfg, moe_grouped_gemm=grouped), gradient_accumulation_fusion=fusion)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    ddp.zero_grad_buffer()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        ddp(ids, torch.arange(16)[None].expand(2, -1), attention_mask=None, labels=ids).mean().backward()
    fused = sorted(n for n, p in model.named_parameters() if getattr(p, "grad_added_to_main_grad", False))
    return fused, {n: p.main_grad.numpy().copy() for n, p in model.named_parameters()}


def test_gradient_accumulation_fusion_accumulates_the_same_gradients():
    (fused, grads), = run_distributed(_main_grads_on_rank, 1, True)
    (none, ref), = run_distributed(_main_grads_on_rank, 1, False)
    assert none == [] and "output_layer.weight" in fused and "decoder.layers.0.mlp.linear_fc1.weight" in fused
    assert set(grads) == set(ref)
    for n, gr in grads.items():
        torch.testing.assert_close(torch.from_numpy(gr), torch.from_numpy(ref[n]), rtol=1e-5, atol=1e-7, msg=n)


def test_grouped_experts_add_their_weight_gradient_into_main_grad():
    """With fusion the grouped experts' wgrad goes into main_grad inside the backward (DDP adds nothing); the
    buffer equals the unfused run's (autograd's gradient added by DDP's hook) after two micro-batches."""
    (fused, grads), = run_distributed(_main_grads_on_rank, 1, True, True)
    (none, ref), = run_distributed(_main_grads_on_rank, 1, False, True)
    experts = [n for n in grads if n.endswith(("experts.weight1", "experts.weight2"))]
    assert none == [] and experts and set(experts) <= set(fused)
    for n, gr in grads.items():
        torch.testing.assert_close(torch.from_numpy(gr), torch.from_numpy(ref[n]), rtol=1e-5, atol=1e-7, msg=n)


def test_foreach_multi_tensor_shims_match_the_formulas():
    from mindspeed_dsv.platform.megatron_compat import foreach_copy_this_to_that, foreach_l2_norm, foreach_scale

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g) for n in (3, 17, 1)] + [torch.randn(4, 5, generator=g)]
    norm, per = foreach_l2_norm(0, None, [ts], False)
    assert norm.shape == (1,) and per is None
    torch.testing.assert_close(norm[0], torch.cat([t.reshape(-1) for t in ts]).norm(), rtol=1e-6, atol=0)
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    foreach_scale(0, None, [ts, dst], 0.5)
    for t, d in zip(ts, dst):
        assert torch.equal(d, (t * 0.5).bfloat16())
    same = [t.clone() for t in ts]
    foreach_scale(0, None, [same, same], 0.25)  # in place: gradient clipping passes [grads, grads]
    for t, d in zip(ts, same):
        assert torch.equal(d, t * 0.25)
    foreach_copy_this_to_that(ts, dst)  # fp32 master weights -> bf16 model weights
    for t, d in zip(ts, dst):
        assert torch.equal(d, t.bfloat16())


def test_grouped_wgrad_kernel_choice_and_reference_math(monkeypatch):
    """cpu tensors take the per-expert fp32 reference (Triton only for CUDA tensors, whatever is installed); its
    sum equals an independent per-expert formula, empty experts included."""
    from mindspeed_dsv.ops import moe

    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    x = torch.randn(9, 6, generator=g).bfloat16()
    dy = torch.randn(9, 4, generator=g).bfloat16()
    main_grad = torch.randn(4, 6, 4, generator=g)
    for triton_installed in (False, True):
        monkeypatch.setattr(moe, "_triton_available", lambda t=triton_installed: t)
        assert moe.grouped_wgrad_kernel(main_grad) == "torch"
    expected = main_grad.clone()
    start = 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            expected[e] += torch.outer(x[r].float(), dy[r].float())
        start += n
    moe.grouped_wgrad_accumulate(x, dy, torch.tensor(counts), main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_fusion_needs_its_shim():
    """Without the shim megatron refuses the flag at the first linear, naming Apex's extension."""
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        run_distributed(_build_with_fusion_without_shim, 1)


def _build_with_fusion_without_shim():
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed
    from mindspeed_dsv.platform.megatron_compat import undo_megatron_compat, apply_megatron_compat
    from tests.model.hf_reference import tiny_hf_config

    init_distributed()
    undo_megatron_compat()
    apply_megatron_compat(skip=("megatron.core.tensor_parallel.layers:fused_weight_gradient_mlp_cuda",
                                "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available"))
    build_model(DeepSeekConfig.from_hf(tiny_hf_config(num_nextn_predict_layers=0)), gradient_accumulation_fusion=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_wgrad_accumulate_bf16_into_fp32_on_cuda():
    from mindspeed_dsv.platform.megatron_compat import FUSED_WGRAD

    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16)
    main_grad = torch.randn(384, 256, device="cuda")
    expected = main_grad + dy.float().t() @ x.float()
    FUSED_WGRAD.wgrad_gemm_accum_fp32(x, dy, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-3, atol=1e-3)


def test_npu_type_names_pass_megatrons_optimizer_checks_only_with_the_shims(monkeypatch):
    """On an NPU parameters say 'torch.npu.BFloat16Tensor'; megatron's bf16 optimizer constructor and its grad
    clipping accept only torch.cuda names. The npu shims let both through; without them both refuse."""
    from megatron.core.optimizer import OptimizerConfig, clip_grads
    from megatron.core.optimizer import optimizer as opt_mod

    from mindspeed_dsv.platform.megatron_compat import (
        _TORCH_ON_CPU,
        _clip_grad_by_total_norm,
        _init_with_npu_types_as_cuda,
    )
    from tests.ops.fake_torch_npu import npu_type_names

    monkeypatch.setattr(opt_mod, "torch", _TORCH_ON_CPU)  # tensors in host memory, as on the emulated npu

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    main = torch.nn.Parameter(torch.ones(4))
    main.grad = torch.full((4,), 3.0)
    cfg = OptimizerConfig(bf16=True, params_dtype=torch.bfloat16)
    cls = opt_mod.Float16OptimizerWithFloat16Params

    def build():
        return cls(torch.optim.SGD([p], lr=0.1), cfg, None, lambda: None)

    with npu_type_names():
        assert p.type() == "torch.npu.BFloat16Tensor"
        with pytest.raises(TypeError, match="torch.npu.BFloat16Tensor"):
            build()
        with pytest.raises(AssertionError):
            clip_grads.clip_grad_by_total_norm_fp32([main], max_norm=1.0, total_norm=6.0)  # megatron's own
        original = cls.__init__
        cls.__init__ = _init_with_npu_types_as_cuda(
            "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__")()
        try:
            optimizer = build()
        finally:
            cls.__init__ = original
        assert optimizer.float16_groups[0] == [p] and optimizer.fp32_from_float16_groups[0][0].dtype == torch.float32
        assert p.type() == "torch.npu.BFloat16Tensor"  # the cuda reading ends with the constructor
        _clip_grad_by_total_norm([main], max_norm=1.0, total_norm=6.0)
        assert torch.allclose(main.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
