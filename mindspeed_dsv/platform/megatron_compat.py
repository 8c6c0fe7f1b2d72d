"""Documented compatibility shims that let megatron-core 0.16.1 run without Transformer Engine and off CUDA.

This is the MindSpeed way of adapting Megatron: the engine's code stays as shipped and a short, named list of
module attributes is replaced once at start-up. Each shim says why it exists, on which devices it applies and,
for shims that stand in for a Transformer Engine / Apex kernel, which installed kernel makes it unnecessary
(`unless`: then megatron's own kernel is left in place). tests/platform/test_megatron_compat.py checks, for every
shim, that the installed megatron-core still has the reason the shim exists (and names each shim an upgrade made
unnecessary); a small run that fails without the shim backs the behavioural ones (SHIM_CASES there).

- On cuda nothing CUDA-related is replaced; only the Transformer-Engine-absent shims apply.
- On npu MindSpeed's adaptor (``mindspeed.megatron_adaptor``) and torch_npu's ``transfer_to_npu`` already route
  ``torch.cuda`` to ``torch.npu``; we import them (lazily) and add only the TE-absent shims.
- On cpu the modules below see a stand-in for ``torch`` whose ``cuda`` namespace and ``device="cuda"``
  arguments resolve to the cpu. Nothing outside those modules is touched.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .device import Platform, current_platform


@dataclass(frozen=True)
class Shim:
    target: str  # "package.module:attribute"
    why: str
    devices: tuple[str, ...]
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


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's version asserts grad.type() == 'torch.cuda.FloatTensor'; the arithmetic is the same."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
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


def fused_torch_adam(params, adam_w_mode: bool = True, **kwargs):
    """Fills megatron's `Adam` slot, which takes Transformer Engine's / Apex's FusedAdam signature (adam_w_mode
    selects decoupled weight decay), with torch's fused Adam / AdamW: one multi-tensor kernel per step."""
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return cls(params, fused=True, **kwargs)


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
# Where the shims below provide it; on npu MindSpeed's adaptor owns gradient-accumulation fusion.
GRAD_ACCUM_FUSION_DEVICES = ("cpu", "cuda")


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


# Modules of megatron-core 0.16.1 that spell the device as CUDA in code we run (the reason for each). On cpu each
# sees _TORCH_ON_CPU as its `torch`. tests/platform checks that every one still contains a CUDA-only spelling.
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
}


def _cpu_torch_shim(module: str, why: str) -> "Shim":
    return Shim(f"{module}:torch", why, ("cpu",), lambda: _TORCH_ON_CPU)


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
        "(H200, 2.26 B params: 66 ms/step vs 34 ms fused); TE/Apex would give a fused Adam here.",
        ("cuda",),
        lambda: fused_torch_adam,
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
        ("cpu",),
        _embedding_setup_on_cpu,
    ),
    Shim(
        "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
        "gradient clipping asserts param.grad.type() == 'torch.cuda.FloatTensor'.",
        ("cpu",),
        lambda: _clip_grad_by_total_norm,
    ),
    Shim(
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        "the RNG tracker's fork() reads the CUDA generator; on cpu the default generator is the one in use.",
        ("cpu",),
        lambda: _cpu_rng_get,
    ),
    Shim(
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        "the RNG tracker's fork() writes the CUDA generator; on cpu the default generator is the one in use.",
        ("cpu",),
        lambda: _cpu_rng_set,
    ),
)

_applied: dict[str, Any] = {}
_ABSENT = object()  # the replaced attribute did not exist (te_general_gemm: its import failed without TE)


def _import_npu_adaptor():
    """On NPU, torch_npu's transfer_to_npu maps torch.cuda to torch.npu, and MindSpeed's adaptor patches
    Megatron for Ascend. Both are documented entry points; imported only here, only on npu."""
    importlib.import_module("torch_npu")
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    try:
        importlib.import_module("mindspeed.megatron_adaptor")
    except ImportError:
        # MindSpeed is optional: without it our own ops layer still reaches the fused NPU kernels.
        pass


def apply_megatron_compat(platform: Platform | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """Apply the shims for this platform once; returns the targets replaced. `skip` is for tests."""
    platform = platform or current_platform()
    if platform.device_type == "npu" and "npu-adaptor" not in _applied:
        _import_npu_adaptor()
        _applied["npu-adaptor"] = True
    done = []
    for shim in SHIMS:
        if platform.device_type not in shim.devices or shim.target in skip:
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
        if target == "npu-adaptor":
            continue
        module, attr = Shim(target, "", (), lambda: None).module_and_attr()
        if original is _ABSENT:
            delattr(module, attr)
        else:
            setattr(module, attr, original)
        del _applied[target]
