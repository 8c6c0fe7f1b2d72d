"""MLA's rotary through the ops layer (models/rotary.py) computes what megatron's own `apply_rotary_pos_emb` computes
for MLA, in the [s, b, h, d] layout and for packed sequences (cu_seqlens: each sample from position 0)."""

from types import SimpleNamespace

import pytest
import torch

from mindspeed_dsv.models import rotary

CONFIG = SimpleNamespace(multi_latent_attention=True, rotary_interleaved=False, apply_rope_fusion=False)
ONE_RANK = SimpleNamespace(size=lambda: 1, rank=lambda: 0)


def _freqs(max_s: int, dim: int) -> torch.Tensor:
    """megatron's layout: [max_s, 1, 1, dim], the dim/2 angles repeated."""
    angles = torch.arange(max_s, dtype=torch.float32)[:, None] * (0.7 ** torch.arange(dim // 2, dtype=torch.float32))
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


@pytest.mark.parametrize("mscale", [1.0, 1.3])
def test_sbhd_equals_megatrons(mscale):
    t = torch.randn(9, 2, 3, 16, generator=torch.Generator().manual_seed(0))
    freqs = _freqs(9, 16)
    ours = rotary.mla_apply_rotary_pos_emb(t, freqs, CONFIG, mscale=mscale, cp_group=ONE_RANK)
    ref = rotary._MEGATRONS(t, freqs, config=CONFIG, mscale=mscale, cp_group=ONE_RANK)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_packed_sequences_equal_megatrons_and_restart_per_sample():
    cu_seqlens = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    t = torch.randn(20, 3, 16, generator=torch.Generator().manual_seed(1))  # [tokens, heads, dim]
    freqs = _freqs(8, 16)  # max sample length
    ours = rotary.mla_apply_rotary_pos_emb(t, freqs, CONFIG, cu_seqlens=cu_seqlens, mscale=1.3, cp_group=ONE_RANK)
    ref = rotary._MEGATRONS(t, freqs, config=CONFIG, cu_seqlens=cu_seqlens, mscale=1.3, cp_group=ONE_RANK)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # the second sample alone, unpacked, rotates the same
    alone = rotary.mla_apply_rotary_pos_emb(t[5:12, None], freqs[:7], CONFIG, mscale=1.3, cp_group=ONE_RANK)
    torch.testing.assert_close(ours[5:12], alone[:, 0], rtol=1e-6, atol=1e-6)


def test_model_builder_routes_mlas_rotary_through_ops():
    from megatron.core.transformer import multi_latent_attention

    from mindspeed_dsv.models.builder import use_ops_rotary_in_mla

    use_ops_rotary_in_mla()
    assert multi_latent_attention.apply_rotary_pos_emb is rotary.mla_apply_rotary_pos_emb


def test_other_rotary_settings_are_refused():
    t, freqs = torch.randn(4, 1, 1, 8), _freqs(4, 8)
    with pytest.raises(ValueError, match="rotary_interleaved"):
        rotary.mla_apply_rotary_pos_emb(t, freqs, SimpleNamespace(**{**vars(CONFIG), "rotary_interleaved": True}))
