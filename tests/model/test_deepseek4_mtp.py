"""DeepSeek-V4 MTP against an independent plain-torch reference of the release's MTPBlock
(inference/model.py) built around transformers' decoder layer, hc_head and norm (fp32, cpu):

    e = enorm(embed(tokens shifted k + 1)); x = e_proj(e)[:, :, None] + h_proj(hnorm(streams))
    streams = layer(x); logits = lm_head(norm(hc_head(streams)))

with streams = the main model's last decoder-layer output for depth 0 and the previous depth's after it.
Also the per-token loss with the MTP loss (megatron's GPTModel rule) and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model, make_hf_v4_mtp, tiny_v4_config, token_ids

DEPTHS = 2
SCALE = 0.3  # transformer_config's default mtp_loss_scaling_factor


def _shift(t, k):
    """t[:, j + k] at j, zeros past the end."""
    return torch.cat([t[:, k:], torch.zeros_like(t[:, :k])], dim=1)


def _rms(x, w, eps):
    x32 = x.float()
    return (w * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps))).to(x.dtype)


def reference_logits(hf, mtps, ids, eps):
    """[main logits, MTP depth 0 logits, ...] from transformers' modules and the MTP tensors."""
    captured = {}
    last = hf.model.layers[-1]
    handle = last.register_forward_hook(lambda _m, _i, out: captured.__setitem__("streams", out))
    outs = [hf(ids).logits]
    handle.remove()
    streams = captured["streams"]
    for k, (block, sd) in enumerate(mtps):
        p = f"model.mtp.{k}."
        ids_k = _shift(ids, k + 1)
        e = _rms(hf.model.embed_tokens(ids_k), sd[p + "enorm.weight"], eps)
        x = F.linear(e, sd[p + "e_proj.weight"]).unsqueeze(2) + F.linear(
            _rms(streams, sd[p + "hnorm.weight"], eps), sd[p + "h_proj.weight"])
        layer = block.model.layers[0]
        swap = layer.register_forward_pre_hook(lambda _m, args, kw, x=x: ((x,) + args[1:], kw), with_kwargs=True)
        keep = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("streams", out))
        h = block.model(inputs_embeds=e).last_hidden_state  # norm(hc_head(layer(x))); learned routing
        swap.remove()
        keep.remove()
        streams = captured["streams"]
        outs.append(hf.lm_head(h))
    return outs


def _setup(hf_cfg):
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from tests.model.deepseek4_reference import hf_v4_to_ours

    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    hf = make_hf_v4_model(hf_cfg)
    mtps = [make_hf_v4_mtp(hf_cfg, k) for k in range(DEPTHS)]
    # the depth's own tensors are plain tensors the reference uses directly: let them take gradients
    for _, sd in mtps:
        for name, t in sd.items():
            if name.endswith(("enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight")):
                t.requires_grad_()
    model = DeepSeekV4Model(cfg, mtp_num_layers=DEPTHS)
    mtp_sd = {k: v.detach() for _, sd in mtps for k, v in sd.items()}
    hf_v4_to_ours(hf, model, cfg.n_routed_experts, mtp_sd=mtp_sd)
    return cfg, hf, mtps, model


def _mtp_checks():
    from mindspeed_dsv.models.deepseek4.names import mcore_to_hf
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    hf_cfg = tiny_v4_config()
    cfg, hf, mtps, model = _setup(hf_cfg)
    ids = token_ids(cfg.vocab_size, seq=30)
    result = {}
    with torch.no_grad():
        refs = reference_logits(hf, mtps, ids, cfg.rms_norm_eps)
        streams = model.decode(ids)
        got = [model(ids)] + [model.output_layer(h)[0] for h in model.mtp(streams, ids, model.embedding)]
    result["logits"] = [((g - r).norm() / r.norm()).item() for g, r in zip(got, refs)]
    result["depth_differs"] = ((refs[1] - refs[2]).norm() / refs[1].norm()).item()

    # loss: next-token labels, the last position masked; megatron's MTP rule on top of the mean main loss
    labels = _shift(ids, 1)
    mask = torch.ones_like(ids, dtype=torch.float32)
    mask[:, -1] = 0
    mask[0, 5] = 0  # a masked position inside the sequence moves with the shifts
    refs = reference_logits(hf, mtps, ids, cfg.rms_norm_eps)

    def masked_mean(logits, lab, m):
        return (m * F.cross_entropy(logits.transpose(1, 2), lab, reduction="none")).sum() / m.sum()

    ref_loss = masked_mean(refs[0], labels, mask) + SCALE / DEPTHS * sum(
        masked_mean(refs[k + 1], _shift(labels, k + 1), _shift(mask, k + 1)) for k in range(DEPTHS))
    ref_loss.backward()
    per_token = model(ids, labels=labels, loss_mask=mask)
    result["main_loss"] = abs((per_token * mask).sum().item() / mask.sum().item()
                              - masked_mean(refs[0], labels, mask).item())
    ((per_token * mask).sum() / mask.sum()).backward()

    ours = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    ours.update({k: torch.zeros_like(b) for k, b in model.named_buffers()
                 if k not in ours and "tokens_per_expert" not in k})
    ours = mcore_to_hf(ours, cfg, mtp_num_layers=DEPTHS)
    ref_grads = {k: p.grad for k, p in hf.named_parameters()}
    for k, (block, sd) in enumerate(mtps):
        ref_grads.update({n: t.grad for n, t in sd.items() if isinstance(t, torch.nn.Parameter) or t.requires_grad})
    worst, no_grad = {}, []
    for k, ref in ref_grads.items():
        ref = torch.zeros_like(ours[k]) if ref is None else ref
        denom = ref.norm().item()
        if denom == 0:  # the indexer (top-k passes no gradient)
            no_grad.append(k)
            worst[k] = ours[k].abs().max().item()
        else:
            worst[k] = (ours[k] - ref).norm().item() / denom
    result["grads"] = (max(worst.items(), key=lambda kv: kv[1]), len(worst),
                       sum(k.startswith("model.mtp.") for k in worst), sorted(no_grad))
    return result


# transformers' _keep_in_fp32_modules_strict: these modules stay fp32 in a bf16 model
KEEP_FP32 = ("attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias", "e_score_correction_bias", "q_a_norm", "kv_norm",
             "input_layernorm", "post_attention_layernorm", "norm")


def _bf16_errors():
    """One layer of each attention type in bf16, ours against transformers' bf16 model (fp32 where it keeps
    fp32) and that against fp32. One layer each: in the whole tiny model bf16 noise flips routing choices."""
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model, transformer_config
    from tests.model.deepseek4_reference import hf_v4_to_ours, single_layer_config

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    out = {}
    for layer_type in ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"):
        hf_cfg = single_layer_config(layer_type)
        cfg = DeepSeekV4Config.from_hf(hf_cfg)
        hf = make_hf_v4_model(hf_cfg)
        model = DeepSeekV4Model(cfg, transformer_config(cfg, params_dtype=torch.bfloat16)).eval()
        hf_v4_to_ours(hf, model, cfg.n_routed_experts)  # copy_ keeps each of our tensors' dtype
        ids = token_ids(cfg.vocab_size, seq=30)
        with torch.no_grad():
            fp32 = hf(ids).logits
            for n, t in [*hf.named_parameters(), *hf.named_buffers()]:
                if t.is_floating_point() and "inv_freq" not in n and not set(n.split(".")) & set(KEEP_FP32):
                    t.data = t.data.bfloat16()
            bf16 = hf(ids).logits
            ours = model(ids)
        fp32_kept = {n: str(p.dtype) for n, p in model.named_parameters() if p.dtype == torch.float32}
        out[layer_type] = (rel(ours, bf16), rel(bf16, fp32), ours.dtype, len(fp32_kept))
    return out


def _checks():
    return {**_mtp_checks(), "bf16": _bf16_errors()}


@pytest.fixture(scope="module")
def checks():
    (result,) = run_distributed(_checks, 1)
    return result


def test_mtp_logits_match_the_release_math(checks):
    main, *depths = checks["logits"]
    assert main < 1e-5 and len(depths) == DEPTHS, checks["logits"]
    assert max(depths) < 1e-5, checks["logits"]
    assert checks["depth_differs"] > 0.1  # the two depths are different computations


def test_mtp_loss_and_gradients_match(checks):
    assert checks["main_loss"] < 1e-5  # the returned per-token loss is the main model's alone
    (name, rel), n, n_mtp, no_grad = checks["grads"]
    assert n > 150 and n_mtp > 2 * 20, (n, n_mtp)
    assert rel < 1e-5, f"worst gradient {name}: relative error {rel:.3e}"
    assert all(".compressor.indexer." in k for k in no_grad), no_grad


def test_bf16_matches_transformers_bf16(checks):
    """fp32 norm weights multiplied before the cast and the sink softmax in fp32, as transformers computes:
    ours stays closer to transformers' bf16 than that is to fp32 (measured ~0.011 against 0.016-0.08)."""
    for layer_type, (ours_vs_hf, hf_vs_fp32, dtype, n_fp32) in checks["bf16"].items():
        assert dtype == torch.bfloat16 and n_fp32 >= 8, (layer_type, dtype, n_fp32)
        assert ours_vs_hf < 0.02 and ours_vs_hf < 0.8 * hf_vs_fp32, (layer_type, ours_vs_hf, hf_vs_fp32)
