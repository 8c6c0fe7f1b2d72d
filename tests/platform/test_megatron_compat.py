"""Every compatibility shim is still needed, and it does what it says.

For the CUDA-spelling shims the evidence is megatron's own source: each patched module still spells the device
as CUDA. For the behavioural shims a small run fails without the shim and passes with it.
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
    sizes[os.environ["LAYOUT_KIND"]] = 2
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
    ("ep", "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu", "all_to_all_single(): incompatible"),
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
