"""DeepSeek-V4 on megatron-core against transformers' DeepseekV4ForCausalLM on the same random weights
(fp32, cpu, TP1), one attention type at a time and then the whole tiny model."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model, single_layer_config, tiny_v4_config, token_ids


def test_tiny_config_exercises_every_path():
    """The shipped tiny config reaches every branch the equality tests are meant to cover."""
    cfg = tiny_v4_config()
    assert set(cfg["layer_types"]) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert set(cfg["mlp_layer_types"]) == {"hash_moe", "moe"} and cfg["mlp_layer_types"][0] == "hash_moe"
    ids = token_ids(cfg["vocab_size"])
    seq = ids.shape[1]
    rates = cfg["compress_rates"].values()
    assert all(seq % r for r in rates), "the sequence length must leave a partial window"
    assert seq > cfg["sliding_window"]
    assert cfg["index_topk"] < seq // cfg["compress_rates"]["compressed_sparse_attention"], "top-k must drop entries"
    assert cfg["hc_mult"] > 1
    hf = make_hf_v4_model(cfg)
    clamped, total = [0], [0]

    def count(_mod, _inp, up):  # the shared expert's up projection, clamped to +-swiglu_limit
        clamped[0] += int((up.abs() > cfg["swiglu_limit"]).sum())
        total[0] += up.numel()

    for layer in hf.model.layers:
        layer.mlp.shared_experts.up_proj.register_forward_hook(count)
    with torch.no_grad():
        hf(ids)
    assert 0 < clamped[0] < total[0], (clamped, total)


LAYER_CONFIGS = {
    "sliding": single_layer_config("sliding_attention"),
    "csa": single_layer_config("compressed_sparse_attention"),
    "hca": single_layer_config("heavily_compressed_attention"),
    "hash_routing": single_layer_config("sliding_attention", mlp_type="hash_moe"),
    "tiny": tiny_v4_config(),
}


def _compare_on_rank(cases):
    """All cases in one spawned rank (the imports dominate a case's cost)."""
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours

    init_distributed()
    errors = {}
    for name, seq in cases:
        hf_cfg = LAYER_CONFIGS[name]
        cfg = DeepSeekV4Config.from_hf(hf_cfg)
        hf = make_hf_v4_model(hf_cfg)
        model = DeepSeekV4Model(cfg).eval()
        hf_v4_to_ours(hf, model, cfg.n_routed_experts)
        ids = token_ids(cfg.vocab_size, seq=seq)
        with torch.no_grad():
            ref = hf(ids).logits
            got = model(ids)
        errors[(name, seq)] = ((got - ref).norm() / ref.norm()).item()
    return errors


# 30: a partial last window for both rates; 32: whole windows only; 7: shorter than one HCA window
CASES = [(name, 30) for name in LAYER_CONFIGS] + [("tiny", 32), ("tiny", 7)]


def _single_rank_checks():
    """Every single-rank check in one spawned process (imports dominate each spawn's cost)."""
    return {"logits": _compare_on_rank(CASES), "hash_table": _hash_table_on_rank(), "gradients": _gradients_on_rank()}


@pytest.fixture(scope="module")
def single_rank():
    (result,) = run_distributed(_single_rank_checks, 1)
    return result


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-s{s}" for n, s in CASES])
def test_logits_match_transformers(single_rank, case):
    rel = single_rank["logits"][case]
    assert rel < 1e-5, f"{case}: relative logit error {rel:.3e}"


def test_unsupported_settings_are_refused_by_name():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4ConfigError, transformer_config

    for field, value in (("scoring_func", "softmax"), ("num_key_value_heads", 2), ("n_shared_experts", 2)):
        with pytest.raises(DeepSeekV4ConfigError, match=f"{field}={value!r}"):
            DeepSeekV4Config.from_hf(tiny_v4_config(**{field: value}))
    with pytest.raises(DeepSeekV4ConfigError, match="tensor parallel size 2"):
        transformer_config(DeepSeekV4Config.from_hf(tiny_v4_config()), tp=2)

    import dataclasses

    from mindspeed_dsv.models.deepseek4.moe import V4Router

    config = dataclasses.replace(transformer_config(DeepSeekV4Config.from_hf(tiny_v4_config())), moe_z_loss_coeff=1e-3)
    with pytest.raises(ValueError, match="does not support {'moe_z_loss_coeff': 0.001}"):
        V4Router(config)


def _hash_table_on_rank():
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    cfg = DeepSeekV4Config.from_hf(single_layer_config("sliding_attention", mlp_type="hash_moe"))
    model = DeepSeekV4Model(cfg)
    model.layers[0].mlp.router.tid2eid.zero_()  # transformers' initial table: expert 0 twice per token
    try:
        model(token_ids(cfg.vocab_size, seq=5))
    except ValueError as e:
        return str(e)
    return None


def test_hash_table_with_repeated_experts_is_refused(single_rank):
    msg = single_rank["hash_table"]
    assert msg and "mlp.router.tid2eid: token 0 maps to experts [0, 0]" in msg, msg


def _gradients_on_rank():
    """Mean cross entropy of next-token prediction backpropagated through both models: every parameter's
    gradient (mapped to transformers' names by the V4 name map), worst relative error."""
    import torch.nn.functional as F

    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.models.deepseek4.names import mcore_to_hf
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours

    init_distributed()
    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    hf = make_hf_v4_model(hf_cfg)
    model = DeepSeekV4Model(cfg)
    hf_v4_to_ours(hf, model, cfg.n_routed_experts)
    ids = token_ids(cfg.vocab_size, seq=30)

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))

    loss(hf(ids).logits).backward()
    loss(model(ids)).backward()
    ours = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    # buffers (expert bias, tid2eid) take no gradient; give the map zeros of their shape
    ours.update({k: torch.zeros_like(b) for k, b in model.named_buffers() if k not in ours and "tokens_per_expert" not in k})
    ours = mcore_to_hf(ours, cfg)
    worst, no_grad = {}, []
    for k, p in hf.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        denom = ref.norm().item()
        if denom == 0:  # the indexer: top-k passes no gradient and transformers has no indexer loss
            no_grad.append(k)
            worst[k] = ours[k].abs().max().item()
        else:
            worst[k] = (ours[k] - ref).norm().item() / denom
    return max(worst.items(), key=lambda kv: kv[1]), len(worst), sorted(no_grad)


def test_gradients_match_transformers(single_rank):
    (name, rel), n, no_grad = single_rank["gradients"]
    assert n > 100
    assert rel < 1e-5, f"worst gradient {name}: relative error {rel:.3e}"
    # exactly the indexer's weights receive no gradient from the language-model loss
    assert no_grad and all(".compressor.indexer." in k for k in no_grad), no_grad


def test_config_reads_transformers_saved_form_and_release_keys():
    """The same model from our tiny config, from transformers' saved form of it (nested main/compress rope
    parameters) and from the release's legacy keys (compress_ratios, num_hash_layers, qk_rope_head_dim)."""
    from transformers import DeepseekV4Config as HFConfig

    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config

    tiny = tiny_v4_config()
    ours = DeepSeekV4Config.from_hf(tiny)
    saved = HFConfig(**{k: v for k, v in tiny.items() if k not in ("architectures", "torch_dtype")}).to_dict()
    assert isinstance(saved["rope_parameters"].get("compress"), dict)
    assert DeepSeekV4Config.from_hf(saved) == ours
    legacy = {k: v for k, v in tiny.items() if k not in ("layer_types", "mlp_layer_types", "compress_rates",
                                                          "partial_rotary_factor")}
    legacy.update(compress_ratios=[0, 4, 128, 4, 0], compress_rate_hca=8, num_hash_layers=2, qk_rope_head_dim=8)
    # the release's ratios name the HCA layer by 128; its rate comes from compress_rate_hca
    assert DeepSeekV4Config.from_hf(legacy) == ours
    assert ours.compress_rope.rope_type == "yarn" and ours.main_rope.rope_type == "default"
