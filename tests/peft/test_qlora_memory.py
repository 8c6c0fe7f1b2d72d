"""QLoRA keeps no dequantized weight from a layer's forward to its backward: Megatron's frozen-weight linear
saves its weight for the input gradient, and the QLoRA layer hands autograd the NF4 storage instead, which
the backward dequantizes again. Gradients equal autograd on y = x W_nf4^T + b + (alpha/r) x A^T B^T."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.peft import _workers as w


@pytest.fixture(scope="module")
def res():
    return run_distributed(w.qlora_saved_tensors, 1)[0]


def test_quantizing_releases_the_full_precision_weights(res):
    assert res["originals_released"] == [True, True]


@pytest.mark.parametrize("which", ["column", "row"])
def test_no_dequantized_weight_lives_until_backward(res, which):
    r = res[which]
    assert r["made_forward"] == 1  # the forward dequantized once ...
    assert r["alive"] == 0  # ... and nothing holds that copy while the graph waits for its backward
    assert r["made_total"] == 2  # the backward dequantized again for the input gradient


@pytest.mark.parametrize("which", ["column", "row"])
def test_outputs_and_gradients_equal_reference(res, which):
    r = res[which]
    for key in ("out", "dx", "dA", "dB"):
        got, want = r[key]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=key)
