"""LoRA on Megatron parallel linears: direct-formula output, frozen base, TP=2 == TP=1, EP-local experts."""

import pytest
import torch

from mindspeed_dsv.peft.lora import LoraConfig, merge_lora
from tests.dist_utils import run_distributed
from tests.peft import _workers as w


@pytest.fixture(scope="module")
def single():
    return run_distributed(w.single_rank_checks, 1)[0]


def test_output_equals_direct_formula(single):
    t = w._full_tensors()
    s = w.ALPHA / w.R
    x, A, B = t["x"], t["A"], t["B"]
    want_col = x @ t["W_col"].t() + t["b_col"] + s * (x @ A.t() @ B.t())
    want_row = x @ t["W_row"].t() + s * (x @ A.t() @ B.t())  # row layer: skip_bias_add=True
    torch.testing.assert_close(single["out_col"], want_col, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single["out_row"], want_row, rtol=1e-5, atol=1e-5)
    assert single["col_bias_none"]
    torch.testing.assert_close(single["row_bias"], t["b_row"])


def test_init_follows_peft(single):
    assert single["init_B_zero"]
    a_max, bound = single["init_A_bound"]
    assert 0 < a_max <= bound


def test_only_adapters_train(single):
    lora = sorted(
        f"{m}.lora_{ab}.weight" for m in ("linear_proj", "linear_qkv") for ab in "AB"
    )
    assert single["trainable"] == lora
    assert single["has_grad"] == lora
    assert single["changed"] == lora


def test_state_dict_names(single):
    assert single["lora_keys"] == sorted(
        ["linear_qkv.lora_A.weight", "linear_qkv.lora_B.weight", "linear_proj.lora_A.weight", "linear_proj.lora_B.weight"]
    )
    # Base parameters keep their Megatron names; the adapter adds exactly the lora keys.
    assert sorted(set(single["state_keys"]) - set(single["lora_keys"])) == single["base_keys"]
    assert single["load_missing"] == single["lora_keys"]
    assert single["load_unexpected"] == []
    assert single["loaded_weight_equal"]


def _check_tp(results, mode, sp=False, gather_output=False):
    t = w._full_tensors()
    y, dx, dA, dB = w._reference(t, mode)
    tp = len(results)
    o_n, i_n, s_n = w.OUT // tp, w.IN // tp, w.SEQ // tp
    for r in results:
        k = r["rank"]
        if mode == "column":
            want_y = y if gather_output else y[..., k * o_n:(k + 1) * o_n]
            want_dx = dx[k * s_n:(k + 1) * s_n] if sp else dx
            want_dA, want_dB = dA, dB[k * o_n:(k + 1) * o_n]
        else:
            want_y = y[k * s_n:(k + 1) * s_n] if sp else y
            want_dx = dx[..., k * i_n:(k + 1) * i_n]
            want_dA, want_dB = dA[:, k * i_n:(k + 1) * i_n], dB
        torch.testing.assert_close(r["out"], want_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dx"], want_dx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dA"], want_dA, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["dB"], want_dB, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mode,sp,gather",
    # gather_output=True and sequence parallel are not covered here: megatron 0.16.1's all-gather /
    # reduce-scatter helpers allocate on torch.cuda and fail on CPU in the base layer itself.
    [("column", False, False), ("row", False, False)],
    ids=["column", "row"],
)
def test_tp2_equals_tp1(mode, sp, gather):
    results = run_distributed(w.tp_case, 2, mode, sp, gather)
    _check_tp(results, mode, sp, gather)
    # The split matrix carries Megatron's TP attribute; only the replicated one is tagged for SP reduction.
    split = [False, True] if mode == "column" else [True, False]
    assert results[0]["tp_attr"] == split
    assert results[0]["sp_tags"] == ([not s and sp for s in split])


def test_tp1_same_as_reference():
    _check_tp(run_distributed(w.tp_case, 1, "row"), "row")


def test_expert_adapters_are_ep_local():
    full = run_distributed(w.expert_adapters, 1, 1)[0]
    ep2 = run_distributed(w.expert_adapters, 2, 2)
    prefix = "experts.local_experts"
    assert full["keys"] == sorted(f"{prefix}.{e}.{fc}.lora_{ab}.weight" for e in range(4) for fc in ("linear_fc1", "linear_fc2") for ab in "AB")
    for r in ep2:
        assert r["keys"] == sorted(f"{prefix}.{e}.{fc}.lora_{ab}.weight" for e in range(2) for fc in ("linear_fc1", "linear_fc2") for ab in "AB")
        # Expert params reduce over the expert-data-parallel group, adapters included.
        assert set(r["allreduce"]) == {False}
        # Local expert e on EP rank k is global expert 2k+e: same initial adapter as in the EP=1 model.
        for e in range(2):
            g = 2 * r["ep_rank"] + e
            for fc in ("linear_fc1", "linear_fc2"):
                torch.testing.assert_close(
                    r["A"][f"{prefix}.{e}.{fc}.lora_A.weight"], full["A"][f"{prefix}.{g}.{fc}.lora_A.weight"], rtol=0, atol=0
                )
    a0 = full["A"][f"{prefix}.0.linear_fc1.lora_A.weight"]
    a1 = full["A"][f"{prefix}.1.linear_fc1.lora_A.weight"]
    assert not torch.equal(a0, a1)
    assert full["shapes"][f"{prefix}.0.linear_fc1.lora_A.weight"] == (w.R, w.IN)


def test_merge_lora_formula():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    A = torch.randn(2, 7, generator=g)
    B = torch.randn(5, 2, generator=g)
    merged = merge_lora(W, A, B, alpha=6.0, r=2)
    assert merged.dtype == torch.bfloat16
    # Elementwise sum over the rank, written out independently of the matmul in merge_lora.
    want = W.double() + 3.0 * sum(B[:, k : k + 1].double() * A[k : k + 1, :].double() for k in range(2))
    torch.testing.assert_close(merged, want.to(torch.bfloat16), rtol=0, atol=0)
    x = torch.randn(3, 7, generator=g)
    torch.testing.assert_close(
        x @ merge_lora(W.float(), A, B, 6.0, 2).t(), x @ W.float().t() + 3.0 * (x @ A.t() @ B.t()), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        merge_lora(W, A, B.t(), 6.0, 2)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown lora_target_modules"):
        LoraConfig(lora_target_modules=["linear_qkvv"])
    with pytest.raises(ValueError, match="empty"):
        LoraConfig()
    assert LoraConfig(lora_r=8, lora_alpha=16, lora_target_modules=["linear_fc1"]).scaling == 2.0
