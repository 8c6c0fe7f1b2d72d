"""Vocabulary padding as Megatron does it (--make-vocab-size-divisible-by): conversion pads the embedding and
output rows with zeros, training never predicts the padded ids, export strips them, and HF -> Megatron -> HF is
bit-identical. The HF tensors (read with safetensors) and an unpadded model are the references."""

import os

import pytest
import torch

from ckpt_convert.cli import main
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import make_hf_dir
from tests.dist_utils import run_distributed

V = 509  # prime: no TP > 1 divides it


@pytest.fixture(scope="module")
def hf509(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "v509"), mtp=True, config_overrides={"vocab_size": V})


def convert(src, dst, *flags):
    assert main(["hf2mcore", "--load-dir", src, "--save-dir", str(dst), "--no-progress", *flags]) == 0


def rank(dst, name):
    return torch.load(os.path.join(dst, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)["model"]


@pytest.mark.parametrize("tp,divisible_by,padded", [(2, 1, 510), (2, 64, 512), (1, 128, 512)])
def test_padded_rows_and_bit_identical_round_trip(hf509, tmp_path, tp, divisible_by, padded):
    mc = tmp_path / "mc"
    convert(hf509, mc, "--target-tensor-parallel-size", str(tp), "--make-vocab-size-divisible-by", str(divisible_by))
    hf = read_all(hf509)
    per = padded // tp
    for name, key in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                      ("output_layer.weight", "lm_head.weight")):
        shards = [rank(str(mc), f"mp_rank_{k:02d}")[name] for k in range(tp)]
        assert all(s.shape == (per, hf[key].shape[1]) for s in shards)
        full = torch.cat(shards)
        assert torch.equal(full[:V], hf[key]) and not full[V:].any()  # HF rows, then zero rows
    assert main(["mcore2hf", "--load-dir", str(mc), "--save-dir", str(tmp_path / "back"), "--no-progress"]) == 0
    back = read_all(str(tmp_path / "back"))
    assert set(back) == set(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k], hf[k]), k


def test_reshard_between_paddings_equals_direct(hf509, tmp_path):
    convert(hf509, tmp_path / "a", "--target-tensor-parallel-size", "2", "--make-vocab-size-divisible-by", "64")
    convert(hf509, tmp_path / "direct")  # TP1, divisible by 1: no padding at all
    assert main(["reshard", "--load-dir", str(tmp_path / "a"), "--save-dir", str(tmp_path / "b"), "--no-progress"]) == 0
    x, y = rank(str(tmp_path / "direct"), "mp_rank_00"), rank(str(tmp_path / "b"), "mp_rank_00")
    assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert x["embedding.word_embeddings.weight"].shape[0] == V


def test_layout_mismatch_is_refused(hf509, tmp_path, capsys):
    convert(hf509, tmp_path / "mc", "--target-tensor-parallel-size", "2", "--make-vocab-size-divisible-by", "64")
    code = main(["mcore2hf", "--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"),
                 "--make-vocab-size-divisible-by", "1", "--no-progress"])
    assert code == 2 and "make_vocab_size_divisible_by" in capsys.readouterr().err


def _losses_with_and_without_padding(vocab, divisible_by):
    """One rank: per-token losses of the tiny model with an unpadded vocabulary and of the same weights with the
    vocabulary padded (the padded output rows set to large values, so an unmasked softmax would see them);
    plus the padded output rows' gradient."""
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed
    from tests.model.hf_reference import tiny_hf_config

    init_distributed()
    cfg = DeepSeekConfig.from_hf(tiny_hf_config(vocab_size=vocab, num_nextn_predict_layers=1))
    plain_layout = ParallelLayout().with_model_defaults(cfg)
    padded_layout = ParallelLayout(make_vocab_size_divisible_by=divisible_by).with_model_defaults(cfg)
    torch.manual_seed(0)
    plain = build_model(cfg, plain_layout)
    padded = build_model(cfg, padded_layout)
    rows = padded_layout.padded_vocab_size(vocab)
    sd = plain.state_dict()
    with torch.no_grad():
        for k, v in padded.state_dict().items():
            if k.endswith("_extra_state"):
                continue
            if v.shape != sd[k].shape:  # embedding / output layer: HF rows, then the padded ones
                assert v.shape[0] == rows and k in ("embedding.word_embeddings.weight", "output_layer.weight"), k
                v[:vocab] = sd[k]
                v[vocab:] = 0 if k.startswith("embedding") else 5.0
            else:
                v.copy_(sd[k])
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16)[None].expand(2, -1)
    ref = plain(ids, pos, attention_mask=None, labels=ids)
    out = padded(ids, pos, attention_mask=None, labels=ids)
    out.sum().backward()
    grad = padded.output_layer.weight.grad
    return ref.detach().numpy(), out.detach().numpy(), float(grad[vocab:].abs().max()), float(grad[:vocab].abs().max()), rows


def test_training_never_predicts_padded_ids():
    (ref, out, pad_grad, real_grad, rows), = run_distributed(_losses_with_and_without_padding, 1, 4000, 128)
    assert rows == 4096
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    assert pad_grad == 0.0 and real_grad > 0
