"""Our megatron DeepSeek model against transformers' DeepseekV3ForCausalLM on the same random weights (fp32, cpu)."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model.hf_reference import hf_to_megatron_tp1, make_hf_model, tiny_hf_config

CONFIGS = {
    # The shipped tiny config: q_lora, YaRN, 2 expert groups, 1 dense layer, MTP.
    "tiny_yarn_groups_mtp": tiny_hf_config(),
    # DeepSeek-V2-Lite shape: no q_lora (linear_q_proj), one group, plain rope.
    "no_q_lora": tiny_hf_config(
        q_lora_rank=None, n_group=1, topk_group=1, num_nextn_predict_layers=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    # Several expert groups, wider top-k, two dense layers, other head dims.
    "groups4_top4": tiny_hf_config(
        hidden_size=96, num_attention_heads=3, num_key_value_heads=3, n_routed_experts=16, n_group=4, topk_group=2,
        num_experts_per_tok=4, first_k_dense_replace=2, num_hidden_layers=5, qk_nope_head_dim=24, qk_rope_head_dim=8,
        v_head_dim=20, kv_lora_rank=24, q_lora_rank=40, n_shared_experts=2, routed_scaling_factor=1.5,
        num_nextn_predict_layers=0,
    ),
}


def _ids(vocab, b=2, s=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g)


def _compare_on_rank(name, grouped=False):
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.models.builder import default_layout
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    hf_cfg = CONFIGS[name]
    cfg = DeepSeekConfig.from_hf(hf_cfg)
    hf = make_hf_model(hf_cfg)
    model = build_model(cfg, default_layout(cfg, moe_grouped_gemm=grouped))
    hf_to_megatron_tp1(hf, model, cfg, grouped=grouped)
    model.eval()
    ids = _ids(cfg.vocab_size)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    # megatron 0.16.1 cannot run an MTP model without labels, so take the main logits from the output layer's
    # last call (MTP heads call it first); cloned because the cross-entropy works on them in place.
    calls = []
    model.output_layer.register_forward_hook(lambda mod, inp, out: calls.append(out[0].transpose(0, 1).clone()))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        labels = torch.roll(ids, -1, dims=1)  # megatron takes labels already shifted
        token_loss = model(ids, pos, attention_mask=None, labels=labels)[:, :-1]
    logits = calls[-1]
    rel = ((logits - ref.logits).norm() / ref.logits.norm()).item()
    return rel, token_loss.mean().item(), ref.loss.item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_transformers(name):
    (rel, loss, ref_loss), = run_distributed(_compare_on_rank, 1, name)
    assert rel < 1e-5, f"{name}: relative logit error {rel:.3e}"
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss), (loss, ref_loss)


@pytest.mark.parametrize("name", ["tiny_yarn_groups_mtp", "groups4_top4"])
def test_grouped_experts_with_local_dispatcher_match_transformers(name):
    """Grouped experts at EP=1 run through LocalTokenDispatcher (sort-based permute, probabilities applied at
    the fp32 unpermute): the same logits as transformers."""
    (rel, loss, ref_loss), = run_distributed(_compare_on_rank, 1, name, True)
    assert rel < 1e-5, f"{name}: relative logit error {rel:.3e}"
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss), (loss, ref_loss)


def _mtp_on_rank():
    """MTP against DeepSeek-V3's MTP module written out from transformers' own decoder layer."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.platform import init_distributed
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    init_distributed()
    hf_cfg = CONFIGS["tiny_yarn_groups_mtp"]
    cfg = DeepSeekConfig.from_hf(hf_cfg)
    hf = make_hf_model(hf_cfg)
    model = build_model(cfg)
    hf_to_megatron_tp1(hf, model, cfg)
    torch.manual_seed(3)
    H = cfg.hidden_size
    c = hf.config
    mtp_layer = DeepseekV3DecoderLayer(c, layer_idx=cfg.num_hidden_layers).float()
    enorm, hnorm, final = (DeepseekV3RMSNorm(H, cfg.rms_norm_eps) for _ in range(3))
    eh_proj = torch.nn.Linear(2 * H, H, bias=False)
    with torch.no_grad():
        for mod in (mtp_layer, enorm, hnorm, final, eh_proj):
            for n, p in mod.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n or mod in (enorm, hnorm, final) else 0.05 * torch.randn_like(p))
        for n, b in mtp_layer.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    # Copy the reference MTP weights into megatron's mtp.layers.0.*
    from tests.model.hf_reference import _layer

    sd = {f"model.layers.X.{k}": v for k, v in mtp_layer.state_dict().items()}
    mapped = _layer(sd, "model.layers.X.", "mtp.layers.0.transformer_layer.", cfg, moe=True)
    mapped["mtp.layers.0.enorm.weight"] = enorm.weight
    mapped["mtp.layers.0.hnorm.weight"] = hnorm.weight
    mapped["mtp.layers.0.eh_proj.weight"] = eh_proj.weight
    mapped["mtp.layers.0.final_layernorm.weight"] = final.weight
    target = model.state_dict()
    mtp_keys = {k for k in target if k.startswith("mtp.") and not k.endswith("_extra_state")}
    assert mtp_keys == set(mapped), sorted(mtp_keys ^ set(mapped))
    with torch.no_grad():
        for k, v in mapped.items():
            target[k].copy_(v)

    ids = _ids(cfg.vocab_size, s=16, seed=5)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        # Reference: h = main model's final-normed hidden; MTP predicts token t+2 from (h_t, emb(x_{t+1})).
        out = hf.model(ids)
        h = out.last_hidden_state[:, :-1]
        emb = hf.model.embed_tokens(ids[:, 1:])
        x = eh_proj(torch.cat([enorm(emb), hnorm(h)], -1))
        s = x.shape[1]
        p_ids = torch.arange(s)[None]
        cos_sin = hf.model.rotary_emb(x, p_ids)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        x = mtp_layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=p_ids)
        x = x[0] if isinstance(x, tuple) else x
        mtp_logits = hf.lm_head(final(x))  # [b, s-1, V] predicting ids[:, t+2]
        ref = torch.nn.functional.cross_entropy(mtp_logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 2:].reshape(-1))

    model.train()
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones_like(ids, dtype=torch.float)
    loss_mask[:, -1] = 0  # the rolled-in label of the last position is not a real token
    model(ids, pos, attention_mask=None, labels=labels, loss_mask=loss_mask)
    got = MTPLossLoggingHelper.tracker["values"][0].item()
    return got, ref.item()


def test_mtp_loss_matches_reference():
    (got, ref), = run_distributed(_mtp_on_rank, 1)
    assert abs(got - ref) < 1e-5 * abs(ref), (got, ref)
