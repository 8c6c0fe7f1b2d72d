"""Documented compatibility shims that let megatron-core 0.16.1 run without Transformer Engine and off CUDA.

This is the MindSpeed way of adapting Megatron: the engine's code stays as shipped and a short, named list of
module attributes is replaced once at start-up. Each shim says why it exists, on which devices it applies and,
for shims that stand in for a Transformer Engine / Apex kernel, which installed kernel makes it unnecessary
(`unless`: then megatron's own kernel is left in place). tests/platform/test_megatron_compat.py checks, for every
shim, that the installed megatron-core still has the reason the shim exists (and names each shim an upgrade made
unnecessary); a small run that fails without the shim backs the behavioural ones (SHIM_CASES there).

- On cuda nothing CUDA-related is replaced; only the Transformer-Engine-absent shims apply.
- On npu torch_npu alone is enough: its ``transfer_to_npu`` routes ``torch.cuda`` and ``device="cuda"`` to the
  npu, and the shims marked "npu" handle what it does not (megatron's ``param.type()`` checks against
  ``torch.cuda.*Tensor`` names, the all-to-all split sizes). MindSpeed's ``megatron_adaptor`` is never imported:
  it targets megatron-core 0.12.x and, next to 0.16.1, fails on a missing module or swaps in a rotary function
  with the wrong signature (docs/en/ascend.md). A process that imported it anyway is refused at start-up.
- Where tensors live in host memory (cpu, and the emulated npu of the tests) the modules below see a stand-in for
  ``torch`` whose ``cuda`` namespace and ``device="cuda"`` arguments resolve to the cpu (shims marked "host").
  Nothing outside those modules is touched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..ops.adam import FusedAdam
from .device import Platform, current_platform


@dataclass(frozen=True)
class Shim:
    target: str  # "package.module:attribute"
    why: str
    devices: tuple[str, ...]  # 'cpu' | 'cuda' | 'npu', or 'host': wherever tensors live in host memory
    make: Callable[[], Any]  # builds the replacement value
    unless: str | None = None  # a key of KERNELS_PRESENT: the shim is skipped where that kernel is installed

    def module_and_attr(self):
        """The object that owns the attribute (a module, or a class inside it) and the attribute's name."""
        mod_name, path = self.target.split(":")
        owner = importlib.import_module(mod_name)
        *outer, attr = path.split(".")
        for name in outer:
            owner = getattr(owner, name)
        return owner, attr


# ---------------------------------------------------------------------------------------------------------------
# A torch stand-in for cpu: device="cuda" becomes cpu, torch.cuda.* becomes cpu equivalents.


def _cpu_device(device):
    if device is None:
        return None
    text = str(device)
    return "cpu" if text.startswith("cuda") or isinstance(device, int) else device


class _NullEvent:
    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass


class _NullStream:
    """The cpu has one implicit stream: every Stream() is it, so 'am I on a side stream?' answers no."""

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()


_THE_CPU_STREAM = _NullStream()


class _CudaOnCpu(types.SimpleNamespace):
    """What megatron calls under ``torch.cuda``, answered for the cpu."""

    def current_device(self):
        return "cpu"

    def is_available(self):
        return False

    def Stream(self, *args, **kwargs):  # noqa: N802 (mirrors torch.cuda.Stream)
        return _THE_CPU_STREAM

    def current_stream(self, *args, **kwargs):
        return _THE_CPU_STREAM

    def stream(self, stream):
        return contextlib.nullcontext()

    def synchronize(self, *args, **kwargs):
        pass

    def get_rng_state(self, *args, **kwargs):
        return torch.get_rng_state()

    def set_rng_state(self, state, *args, **kwargs):
        torch.set_rng_state(state)

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    @property
    def random(self):
        return self


class _TorchOnCpu(types.ModuleType):
    """Forwards everything to ``torch`` except the cuda-only spellings megatron uses."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)

    def _with_cpu(fn):  # noqa: N805
        def call(self, *args, device=None, **kwargs):
            return getattr(torch, fn)(*args, device=_cpu_device(device), **kwargs)

        return call

    zeros = _with_cpu("zeros")
    ones = _with_cpu("ones")
    empty = _with_cpu("empty")
    full = _with_cpu("full")
    arange = _with_cpu("arange")
    tensor = _with_cpu("tensor")


_TORCH_ON_CPU = _TorchOnCpu()


def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's maybe_move_tensor_to_cpu converts only `tensor.is_cuda` tensors, so on cpu (and npu, whose
    tensors are not is_cuda) the all-to-all split sizes stay tensors and all_to_all_single rejects them."""
    if torch.is_tensor(tensor):
        tensor = tensor.to("cpu")
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _npu_type_as_cuda(name: str) -> str:
    return "torch.cuda." + name[len("torch.npu."):] if name.startswith("torch.npu.") else name


@contextlib.contextmanager
def _npu_types_read_as_cuda():
    """`tensor.type()` of an npu tensor says 'torch.npu.BFloat16Tensor' where megatron expects
    'torch.cuda.BFloat16Tensor'. Inside this block only, the npu names read as the cuda ones."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return _npu_type_as_cuda(original(self))
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _init_with_npu_types_as_cuda(target: str):
    """A constructor run inside _npu_types_read_as_cuda: megatron's mixed-precision and distributed optimizers
    sort parameters into fp16/bf16/fp32 groups by `param.type()` in their constructors (and raise TypeError on
    any other name); nothing after construction looks at the names."""

    def make():
        owner, attr = Shim(target, "", (), lambda: None).module_and_attr()
        original = getattr(owner, attr)

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            with _npu_types_read_as_cuda():
                original(self, *args, **kwargs)

        return __init__

    return make


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's arithmetic without its grad.type() == 'torch.cuda.FloatTensor' assertion. Where our FusedAdam
    updates the parameters (cuda), the coefficient goes to it and is applied inside its update: the same fp32
    product, without a pass that writes every gradient."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if not clip_coeff < 1.0:
        return
    owner = None if use_decoupled_grad else FusedAdam.owning(parameters)
    if owner is not None:
        owner.scale_grads(clip_coeff)
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        # megatron's assertion without the device in the name: clipping scales the fp32 main grads
        if not use_decoupled_grad and g.dtype != torch.float32:
            raise TypeError(f"gradient clipping expects fp32 main grads, got {g.dtype} of shape {tuple(g.shape)}")
    torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _embedding_setup_on_cpu():
    """With pipeline stages and MTP (or tied embeddings) the last stage keeps a copy of the word embeddings that
    setup_embeddings_and_output_layer syncs from the first stage after `weight.data = weight.data.cuda()`.
    On cpu that call is made an identity for the duration of the setup only."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        with _tensor_cuda_is_identity():
            return original(self)

    return setup_embeddings_and_output_layer


def replicated_linear_class():
    """megatron's TP-replicated `Linear` (modelopt's) with megatron's init_method applied: the class itself
    keeps torch.nn.Linear's kaiming init, which would make MLA's down projections start at another scale."""
    global _REPLICATED_LINEAR
    if _REPLICATED_LINEAR is None:
        from megatron.core.post_training.modelopt.layers import Linear

        class ReplicatedLinear(Linear):
            def __init__(self, input_size, output_size, *, config, init_method, **kwargs):
                super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
                if config.perform_initialization:
                    with torch.no_grad():
                        init_method(self.weight)

        _REPLICATED_LINEAR = ReplicatedLinear
    return _REPLICATED_LINEAR


_REPLICATED_LINEAR = None


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract from torch's for-each norm: the l2 norm of all tensors as a [1] fp32
    tensor on their device, no host sync (megatron's local stand-in reads every tensor's norm on the host)."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    norms = torch._foreach_norm(tensors, 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1)
    return total, (torch.stack(norms) if per_tensor else None)


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract (dst = src * scale, dtype converted) in for-each kernels; megatron's
    local stand-in runs two kernels and an allocation per tensor."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def foreach_copy_this_to_that(this, that, overflow_buf=None):
    """megatron's _multi_tensor_copy_this_to_that for every dtype: with bf16 it passes no overflow buffer and
    copies tensor by tensor (the master→model weight copy after each step); one for-each copy does the same."""
    torch._foreach_copy_(list(that), list(this))


def _wgrad_gemm_accumulate(total_input, grad_output, main_grad):
    """main_grad += grad_outputᵀ · total_input inside the GEMM (beta=1): no bf16 weight gradient is written and
    then added. bf16 inputs into an fp32 buffer use addmm's out_dtype (CUDA: fp32 output from fp16/bf16)."""
    if main_grad.dtype == grad_output.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)


# apex's fused_weight_gradient_mlp_cuda, the module megatron's linears call when gradient_accumulation_fusion is on
FUSED_WGRAD = types.SimpleNamespace(
    wgrad_gemm_accum_fp32=_wgrad_gemm_accumulate, wgrad_gemm_accum_fp16=_wgrad_gemm_accumulate
)
# Where the shims below provide it. Not on npu: torch.addmm(..., out_dtype=fp32) into main_grad is unverified
# there, so megatron's linears write a weight gradient and DDP adds it (correct, one extra add per weight).
GRAD_ACCUM_FUSION_DEVICES = ("cpu", "cuda")
# Where torch's for-each kernels stand in for Apex's multi-tensor ones (grad norm, clipping, master→model copy).
# Not on npu: unverified there; megatron's own per-tensor fallbacks run.
MULTI_TENSOR_DEVICES = ("cpu", "cuda")


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


# Modules of megatron-core 0.16.1 that spell the device as CUDA in code we run (the reason for each). Where tensors
# live in host memory each sees _TORCH_ON_CPU as its `torch` (on a real npu, transfer_to_npu does this job). tests/platform checks that every one still contains a CUDA-only spelling.
CPU_TORCH_MODULES: dict[str, str] = {
    "megatron.core.pipeline_parallel.schedules": "every schedule allocates total_num_tokens with device='cuda'",
    "megatron.core.transformer.moe.token_dispatcher": "the alltoall dispatcher creates torch.cuda.Stream()",
    "megatron.core.transformer.moe.router": "the router allocates expert_bias / tokens_per_expert on the cuda device",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": (
        "YaRN rotary places inv_freq with torch.cuda.current_device() (MLA does not pass use_cpu_initialization)"
    ),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "plain rotary does the same as YaRN's",
    "megatron.core.transformer.multi_token_prediction": "MTP allocates its loss tracker on the cuda device",
    "megatron.core.tensor_parallel.random": "the RNG tracker saves and restores torch.cuda RNG states",
    "megatron.core.distributed.param_and_grad_buffer": "DDP's grad buffers are allocated on torch.cuda.current_device()",
    "megatron.core.distributed.distributed_data_parallel": "DDP makes a torch.cuda.Stream() for communication",
    "megatron.core.optimizer.optimizer": "the optimizers keep found_inf / scale tensors with device='cuda'",
    "megatron.core.optimizer.clip_grads": "the grad-norm reduction allocates with device='cuda'",
    "megatron.core.tensor_parallel.mappings": "TP/SP all-gather and reduce-scatter outputs are allocated on the cuda device",
    "megatron.core.tensor_parallel.layers": "the sequence-parallel backward all-gathers into a buffer on the cuda device",
    "megatron.core.pipeline_parallel.p2p_communication": "pipeline receive buffers are allocated on the cuda device",
    "megatron.core.utils": "the local (no-Apex) multi-tensor l2 norm returns its result with device='cuda'",
}


def _original(target: str) -> Any:
    """The attribute as megatron set it at import, also after a shim replaced it."""
    if target in _applied:
        return _applied[target]
    module, attr = Shim(target, "", (), lambda: None).module_and_attr()
    return getattr(module, attr, _ABSENT)


# Transformer Engine / Apex kernels a shim stands in for, asked the way megatron itself decided at import.
KERNELS_PRESENT: dict[str, Callable[[], bool]] = {
    # megatron.core.extensions.transformer_engine imports even without TE (MagicMock stand-ins), so megatron's
    # own HAVE_TE flags cannot tell; the package itself can.
    "transformer_engine": lambda: importlib.util.find_spec("transformer_engine") is not None,
    # TE's or Apex's FusedAdam imported into megatron.core.optimizer (else it falls back to torch's AdamW).
    "fused_adam": lambda: _original("megatron.core.optimizer:USING_PYTORCH_OPTIMIZER") is False,
    # Apex's fused_weight_gradient_mlp_cuda imported into megatron.core.tensor_parallel.layers.
    "apex_wgrad": lambda: _original("megatron.core.tensor_parallel.layers:_grad_accum_fusion_available") is True,
    # TE's / Apex's multi_tensor_l2norm and multi_tensor_scale imported into megatron.core.optimizer.clip_grads.
    "multi_tensor": lambda: _original("megatron.core.optimizer.clip_grads:l2_norm_impl").__name__
    != "local_multi_tensor_l2_norm",
}


def _cpu_torch_shim(module: str, why: str) -> "Shim":
    return Shim(f"{module}:torch", why, ("host",), lambda: _TORCH_ON_CPU)


SHIMS: tuple[Shim, ...] = (
    Shim(
        "megatron.core.transformer.multi_latent_attention:HAVE_TE",
        "0.16.1 checks isinstance(linear, TELinear) where TELinear is a MagicMock when TE is absent; "
        "isinstance against a mock raises TypeError.",
        ("cpu", "cuda", "npu"),
        lambda: False,
        unless="transformer_engine",
    ),
    Shim(
        "megatron.core.transformer.multi_latent_attention:Linear",
        "MLA accepts a replicated (TP-duplicated) Linear for its down projections only if it is the very class it "
        "imported as `Linear` (megatron's modelopt Linear, or None if that import failed); ours applies megatron's "
        "init_method, so the name must point at it, with or without TE. The ColumnParallelLinear alternative "
        "gathers k_pos_emb without reducing its gradient over TP, which loses the other ranks' heads' share of "
        "the rotary-key gradient.",
        ("cpu", "cuda", "npu"),
        lambda: replicated_linear_class(),
    ),
    Shim(
        "megatron.core.transformer.moe.moe_utils:te_general_gemm",
        "0.16.1 references te_general_gemm in the fp32 router GEMM although its import failed without TE "
        "(NameError); None selects the torch.mm path.",
        ("cpu", "cuda", "npu"),
        lambda: None,
        unless="transformer_engine",
    ),
    Shim(
        "megatron.core.optimizer:Adam",
        "without Transformer Engine or Apex, megatron builds torch's AdamW with its default for-each kernels "
        "(H200, 2.26 B params: 66 ms/step vs 34 ms fused); TE/Apex would give a fused Adam here. Ours (ops/adam.py) "
        "is one pass per tensor that also applies the clipping coefficient (the clip shim below hands it over).",
        ("cuda",),
        lambda: FusedAdam,
        unless="fused_adam",
    ),
    Shim(
        "megatron.core.optimizer:USING_PYTORCH_OPTIMIZER",
        "while True, megatron ignores its `Adam` name and calls torch.optim.AdamW itself (the shim above).",
        ("cuda",),
        lambda: False,
        unless="fused_adam",
    ),
    Shim(
        "megatron.core.tensor_parallel.layers:fused_weight_gradient_mlp_cuda",
        "gradient-accumulation fusion (the wgrad GEMM accumulates into DDP's fp32 main_grad) calls Apex's CUDA "
        "extension; torch's addmm (out_dtype=fp32 on CUDA) does the same job.",
        GRAD_ACCUM_FUSION_DEVICES,
        lambda: FUSED_WGRAD,
        unless="apex_wgrad",
    ),
    Shim(
        "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available",
        "megatron refuses gradient_accumulation_fusion when Apex's extension failed to import (the shim above).",
        GRAD_ACCUM_FUSION_DEVICES,
        lambda: True,
        unless="apex_wgrad",
    ),
    Shim(
        "megatron.core.optimizer.clip_grads:l2_norm_impl",
        "without TE/Apex the grad norm is megatron's local stand-in: torch.norm per tensor, each read on the host "
        "(one host sync per parameter tensor every step).",
        MULTI_TENSOR_DEVICES,
        lambda: foreach_l2_norm,
        unless="multi_tensor",
    ),
    Shim(
        "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl",
        "without TE/Apex gradient clipping scales tensor by tensor (megatron's local stand-in).",
        MULTI_TENSOR_DEVICES,
        lambda: foreach_scale,
        unless="multi_tensor",
    ),
    Shim(
        "megatron.core.optimizer.optimizer:_multi_tensor_copy_this_to_that",
        "with bf16 megatron passes no overflow buffer and copies master weights to the model tensor by tensor "
        "(with TE/Apex too: their multi_tensor_scale is skipped for bf16).",
        MULTI_TENSOR_DEVICES,
        lambda: foreach_copy_this_to_that,
    ),
    *(_cpu_torch_shim(m, why) for m, why in CPU_TORCH_MODULES.items()),
    Shim(
        "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",
        "the all-to-all split sizes must become host numbers; megatron converts only CUDA tensors.",
        ("cpu", "npu"),
        lambda: _move_to_host,
    ),
    Shim(
        "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer",
        "the pipeline embedding sync moves the shared weight with weight.data.cuda().",
        ("host",),
        _embedding_setup_on_cpu,
    ),
    Shim(
        "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
        "gradient clipping asserts param.grad.type() == 'torch.cuda.FloatTensor'; cpu and npu grads have "
        "other type names. On cuda it hands the coefficient to our FusedAdam (the Adam shim) instead of scaling "
        "every fp32 gradient in a pass of its own (H200, 2.26 B params: 4.9 ms per step).",
        ("cpu", "cuda", "npu"),
        lambda: _clip_grad_by_total_norm,
    ),
    Shim(
        "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
        "--bf16: the constructor groups parameters by param.type() in ['torch.cuda.HalfTensor', "
        "'torch.cuda.BFloat16Tensor'] / 'torch.cuda.FloatTensor' and raises TypeError on 'torch.npu.*'.",
        ("npu",),
        _init_with_npu_types_as_cuda("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__"),
    ),
    Shim(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
        "--use-distributed-optimizer: the constructor groups parameters by the same torch.cuda type names.",
        ("npu",),
        _init_with_npu_types_as_cuda("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__"),
    ),
    Shim(
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        "the RNG tracker's fork() reads the CUDA generator; on cpu the default generator is the one in use.",
        ("host",),
        lambda: _cpu_rng_get,
    ),
    Shim(
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        "the RNG tracker's fork() writes the CUDA generator; on cpu the default generator is the one in use.",
        ("host",),
        lambda: _cpu_rng_set,
    ),
)

_applied: dict[str, Any] = {}
_ABSENT = object()  # the replaced attribute did not exist (te_general_gemm: its import failed without TE)


# MindSpeed's adaptor supports megatron-core 0.12.x only (see the module docstring).
MINDSPEED_ADAPTOR = "mindspeed.megatron_adaptor"


class IncompatibleAdaptorError(RuntimeError):
    """Something patched megatron for another megatron-core version before our shims ran."""


def _import_torch_npu() -> None:
    """torch_npu registers torch.npu; its transfer_to_npu (the documented entry point) routes torch.cuda and
    device='cuda' to the npu. Imported only here, only on npu. MindSpeed is not imported: not needed, not
    compatible (module docstring)."""
    if MINDSPEED_ADAPTOR in sys.modules:
        raise IncompatibleAdaptorError(
            f"{MINDSPEED_ADAPTOR} is imported in this process: it patches megatron-core 0.12.x and breaks 0.16.1 "
            "(a missing legacy_a2a_token_dispatcher module, a rotary function without cp_group). mindspeed_dsv "
            "runs on torch_npu alone; remove the import (or the PYTHONPATH entry that imports it)"
        )
    importlib.import_module("torch_npu")
    importlib.import_module("torch_npu.contrib.transfer_to_npu")


def shim_keys(platform: Platform) -> tuple[str, ...]:
    """The `Shim.devices` entries that apply to this platform."""
    return (platform.device_type, "host") if platform.tensors_on_host else (platform.device_type,)


def apply_megatron_compat(platform: Platform | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """Apply the shims for this platform once; returns the targets replaced. `skip` is for tests."""
    platform = platform or current_platform()
    if platform.device_type == "npu" and "torch-npu" not in _applied:
        _import_torch_npu()
        _applied["torch-npu"] = True
    keys = shim_keys(platform)
    done = []
    for shim in SHIMS:
        if not set(keys) & set(shim.devices) or shim.target in skip:
            continue
        if shim.target not in _applied and shim.unless and KERNELS_PRESENT[shim.unless]():
            continue  # the real TE / Apex kernel is installed: megatron uses it as shipped
        if shim.target not in _applied:
            module, attr = shim.module_and_attr()
            _applied[shim.target] = getattr(module, attr, _ABSENT)
            setattr(module, attr, shim.make())
        done.append(shim.target)
    return done


def undo_megatron_compat() -> None:
    """Restore what apply_megatron_compat replaced (tests use this to prove each shim is needed)."""
    for target, original in list(_applied.items()):
        if target == "torch-npu":
            continue
        module, attr = Shim(target, "", (), lambda: None).module_and_attr()
        if original is _ABSENT:
            delattr(module, attr)
        else:
            setattr(module, attr, original)
        del _applied[target]
