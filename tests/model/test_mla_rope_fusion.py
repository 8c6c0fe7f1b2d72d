"""--use-fused-rotary-pos-emb on cuda puts MLA's rotary into megatron-core's Triton kernels (models/rotary.py).

On any machine: the flag reaches megatron's config (apply_rope_fusion, and plain RoPE expressed as YaRN with factor
1), and YaRN with factor 1 gives plain RoPE's angles and attention factor 1. On a CUDA GPU: the whole model with
the fused kernels equals transformers and the unfused model in fp32 (logits, loss, every gradient), and the query
kernel rotates packed samples ('thd') from position 0 as our unfused path does.
"""

import pytest
import torch

from mindspeed_dsv import ops
from mindspeed_dsv.models import DeepSeekConfig, transformer_config
from mindspeed_dsv.models.builder import default_layout
from mindspeed_dsv.ops import OpsConfig
from tests.dist_utils import run_distributed
from tests.model.hf_reference import hf_to_megatron_tp1, make_hf_model, tiny_hf_config

PLAIN_ROPE = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@pytest.fixture
def any_device_ops(monkeypatch):
    """configure_ops for any device on this machine (triton "installed": this patches importlib's own find_spec, so
    everything is imported above); the plain-torch kernels again afterwards."""
    monkeypatch.setattr(ops.config.importlib.util, "find_spec", lambda name: object())
    yield ops.configure_ops
    ops.configure_ops()


def _tconfig(hf_cfg, tp=1):
    return transformer_config(DeepSeekConfig.from_hf(hf_cfg), tp=tp)


@pytest.mark.parametrize("hf_overrides,rope_type", [({}, "yarn"), (PLAIN_ROPE, "rope")])
def test_flag_reaches_megatrons_config(hf_overrides, rope_type, any_device_ops):
    hf_cfg = tiny_hf_config(**hf_overrides)
    any_device_ops(OpsConfig(), "cuda")
    off = _tconfig(hf_cfg)
    any_device_ops(OpsConfig(use_fused_rotary_pos_emb=True), "cuda")
    on = _tconfig(hf_cfg)
    any_device_ops(OpsConfig(use_fused_rotary_pos_emb=True), "npu")  # npu: npu_rotary_mul, not megatron's
    npu = _tconfig(hf_cfg)
    assert (off.apply_rope_fusion, off.rope_type) == (False, rope_type)
    assert (on.apply_rope_fusion, on.rope_type) == (True, "yarn")
    assert (npu.apply_rope_fusion, npu.rope_type) == (False, rope_type)
    assert on.rotary_scaling_factor == off.rotary_scaling_factor


@pytest.mark.parametrize("overrides,tp,named", [
    (dict(qk_nope_head_dim=24), 1, "qk_nope_head_dim 24"),
    (dict(v_head_dim=20), 1, "v_head_dim 20"),
    (dict(num_attention_heads=12, num_key_value_heads=12), 1, "attention heads per TP rank 12"),
    (dict(num_attention_heads=12, num_key_value_heads=12), 4, "attention heads per TP rank 3"),
])
def test_shapes_the_kernels_cannot_take_are_refused(overrides, tp, named, any_device_ops):
    """megatron's kernels need power-of-2 dims (tl.arange) and a power-of-2 head count per rank (their head-block mask
    ignores the block offset): anything else is an error at model build naming the flag, never a corrupt run."""
    hf_cfg = tiny_hf_config(**overrides)
    any_device_ops(OpsConfig(use_fused_rotary_pos_emb=True), "cuda")
    with pytest.raises(ops.OpUnavailableError, match=f"--use-fused-rotary-pos-emb.*{named}"):
        _tconfig(hf_cfg, tp)
    any_device_ops(OpsConfig(), "cuda")
    _tconfig(hf_cfg, tp)  # flag off: the same model builds


def test_yarn_with_factor_one_is_plain_rope(monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    if not torch.cuda.is_available():  # YaRN's get_emb moves its frequencies to torch.cuda.current_device()
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    dim, seq = 64, 4096
    plain = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    yarn = YarnRotaryEmbedding(kv_channels=dim, rotary_base=10000, scaling_factor=1.0,
                               original_max_position_embeddings=4096, use_cpu_initialization=True)
    want = plain(seq)
    got, mscale = yarn.get_emb(seq)
    assert mscale == 1.0
    assert got.shape == want.shape
    # the same frequencies up to the fp32 rounding of YaRN's ramp blend a*(1-m) + a*m: a few ulps of the angle
    assert ((got - want).abs() / want.abs().clamp(min=1.0)).max().item() < 1e-6


def _fused_vs_unfused_on_rank(hf_overrides):
    from mindspeed_dsv.models import build_model
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    # No MTP head here: hf_to_megatron_tp1 copies the main model only, so two builds' MTP heads keep different
    # random weights; the MTP layer's attention is the same MLASelfAttention under the same config.
    hf_cfg = tiny_hf_config(num_nextn_predict_layers=0, **hf_overrides)
    cfg = DeepSeekConfig.from_hf(hf_cfg)
    hf = make_hf_model(hf_cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    results = []
    for flag in (False, True):
        ops.configure_ops(OpsConfig(use_fused_rotary_pos_emb=flag), "cuda")
        model = build_model(cfg, default_layout(cfg))
        hf_to_megatron_tp1(hf, model, cfg)
        model = model.cuda()
        calls = []
        model.output_layer.register_forward_hook(lambda m, i, out: calls.append(out[0].transpose(0, 1).clone()))
        x = ids.cuda()
        pos = torch.arange(x.shape[1], device="cuda")[None].expand_as(x)
        loss = model(x, pos, attention_mask=None, labels=torch.roll(x, -1, dims=1)).float().mean()
        loss.backward()
        grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((calls[-1].detach().cpu(), loss.item(), grads, model.config.apply_rope_fusion))
    ops.configure_ops()
    return ref, results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hf_overrides", [{}, PLAIN_ROPE], ids=["yarn", "plain_rope"])
def test_fused_model_equals_unfused_and_transformers_fp32(hf_overrides, monkeypatch):
    monkeypatch.setenv("MINDSPEED_DSV_DEVICE", "cuda")
    (ref, ((plain, plain_loss, plain_grads, off), (fused, fused_loss, fused_grads, on))), = run_distributed(
        _fused_vs_unfused_on_rank, 1, hf_overrides)
    assert (off, on) == (False, True)
    assert ((fused - plain).norm() / plain.norm()).item() < 1e-5
    assert ((fused - ref).norm() / ref.norm()).item() < 1e-4  # transformers on the cpu, ours on the GPU
    assert abs(fused_loss - plain_loss) < 1e-5 * abs(plain_loss)
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name, g in plain_grads.items():
        assert ((fused_grads[name] - g).norm() / g.norm().clamp(min=1e-12)).item() < 1e-4, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_query_kernel_restarts_per_sample():
    from types import SimpleNamespace

    from megatron.core.fusions.fused_mla_yarn_rope_apply import fused_apply_mla_rope_for_q

    from mindspeed_dsv.models import rotary

    torch.manual_seed(0)
    nope, dim, heads, max_s = 32, 16, 4, 16
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32, device="cuda")
    q = torch.randn(20, heads, nope + dim, device="cuda", requires_grad=True)
    angles = torch.arange(max_s, dtype=torch.float32, device="cuda")[:, None] * (0.7 ** torch.arange(dim // 2, device="cuda"))
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # megatron's [max_s, 1, 1, dim]
    config = SimpleNamespace(multi_latent_attention=True, rotary_interleaved=False, apply_rope_fusion=False)
    ref = torch.cat([q[..., :nope], rotary.mla_apply_rotary_pos_emb(q[..., nope:], freqs, config, cu_seqlens=cu)], -1)
    fused = fused_apply_mla_rope_for_q(q.clone(), freqs.cos(), freqs.sin(), nope, dim, cu_seqlens_q=cu)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (want,), (got,) = torch.autograd.grad(ref, q, g), torch.autograd.grad(fused, q, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
