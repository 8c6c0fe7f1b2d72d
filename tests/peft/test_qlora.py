"""QLoRA linear: NF4 base dequantized per matmul plus LoRA; frozen; dequantized save keeps Megatron names."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.peft import _workers as w


@pytest.fixture(scope="module")
def res():
    return run_distributed(w.qlora_checks, 1)[0]


def test_output_is_nf4_base_plus_lora(res):
    t = w._full_tensors()
    x, A, B = t["x"], t["A"], t["B"]
    want = x @ res["W_deq"].t() + t["b_col"] + (w.ALPHA / w.R) * (x @ A.t() @ B.t())
    torch.testing.assert_close(res["out"], want, rtol=1e-5, atol=1e-5)
    # NF4 really changed the weight (the test would pass trivially otherwise).
    assert not torch.equal(res["W_deq"], t["W_col"])


def test_base_weight_is_not_a_parameter(res):
    assert "linear_qkv.weight" not in res["params"]
    assert res["trainable"] == ["linear_qkv.lora_A.weight", "linear_qkv.lora_B.weight"]
    assert res["grads"] == res["trainable"]
    assert res["x_grad"]
    assert res["nf4_keys"] == ["linear_qkv.weight"]
    assert res["lora_keys"] == res["trainable"]


def test_dequantize_for_save(res):
    assert "linear_qkv.weight" in res["dequant_keys"]
    assert "linear_qkv.lora_A.weight" in res["dequant_keys"]
    torch.testing.assert_close(res["dequant_weight"], res["W_deq"], rtol=0, atol=0)
    torch.testing.assert_close(res["out_after_dequant"], res["out"], rtol=0, atol=0)
