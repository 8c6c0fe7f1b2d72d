"""The whole trainer on the emulated NPU: MINDSPEED_DSV_DEVICE=npu-emulated with the fake torch_npu installed in
every rank (tests/ops/fake_torch_npu.py: schema-checked operators, torch.npu type names, HCCL's dtype rules).
Each run loads the same converted tiny checkpoint as a 1-rank cpu reference run with every kernel flag off and
must log the same losses, while the fake's counters show which NPU operator each kernel flag reached."""

import pytest

from tests.dist_utils import run_distributed
from tests.training.conftest import hf2mcore

# The kernel flags of the A2/A3 templates (examples/mcore/deepseek3/*_A2.sh, *_A3.sh) and the torch_npu operator
# each one selects on npu (mindspeed_dsv/ops/config.py).
FLAG_OPS = {
    "--use-flash-attn": "npu_fusion_attention",
    "--use-fused-rmsnorm": "npu_rms_norm",
    "--use-fused-rotary-pos-emb": "npu_rotary_mul",
    "--use-fused-swiglu": "npu_swiglu",
    "--moe-grouped-gemm": "npu_grouped_matmul",
    "--use-fused-moe-token-permute-and-unpermute": "npu_moe_token_permute",
}


def _train_on_emulated_npu(argv):
    """One rank: install the fake torch_npu before megatron is imported, train, return what the test checks."""
    from tests.ops import fake_torch_npu

    fake = fake_torch_npu.install()
    from mindspeed_dsv.platform import current_platform
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    platform = current_platform()
    assert (platform.device_type, platform.emulated, platform.backend) == ("npu", True, "gloo")
    state = train(build_parser().parse_args(argv))
    first = next(p for m in state.models for p in m.parameters())
    return dict(
        history=[{k: r[k] for k in ("iteration", "lm loss", "grad norm")} for r in state.history],
        ops=dict(fake.counts()),
        collectives=dict(fake.collectives),
        param_type=first.type(),
    )


def _train_on_cpu(argv):
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.loop import train

    state = train(build_parser().parse_args(argv))
    return [{k: r[k] for k in ("iteration", "lm loss", "grad norm")} for r in state.history]


# Flags whose NPU operator a layout does not reach yet (asserted NOT called, so the change that wires one fails here
# and deletes its entry). Empty since MLA's rotary goes through ops.apply_rotary and our all-to-all dispatcher runs
# at EP>1 (issue 11 item 4).
NOT_REACHED_YET: dict[str, tuple[str, ...]] = {}

KERNEL_FLAGS = [*FLAG_OPS, "--cross-entropy-loss-fusion"]
# fp32 runs: the fused permute takes bf16 tokens only (torch_npu 2.13.0), so it joins the bf16 run
FP32_FLAGS = [f for f in KERNEL_FLAGS if f != "--use-fused-moe-token-permute-and-unpermute"]
RUNS = {
    # name: (conversion flags, training flags, kernel flags, loss rel. tolerance, grad-norm rel. tolerance)
    "tp2_sp": (["--target-tensor-parallel-size", "2"], ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               FP32_FLAGS, 1e-5, 1e-4),
    # bf16, so that the fused permute (bf16 only) runs in our all-to-all dispatcher at EP2
    "ep2_bf16": (["--target-expert-parallel-size", "2"], ["--expert-model-parallel-size", "2", "--bf16"],
                 KERNEL_FLAGS, 5e-3, 3e-2),
    # bf16 with the A2/A3 templates' optimizer flags against the fp32 reference: bf16 rounding only
    "pp2_bf16": (["--target-pipeline-parallel-size", "2"],
                 ["--pipeline-model-parallel-size", "2", "--bf16", "--use-distributed-optimizer", "--clip-grad", "1.0"],
                 KERNEL_FLAGS, 5e-3, 3e-2),
}


def _common(data):
    return ["--data-path", data["sft"], "--is-instruction-dataset", "--seq-length", "128", "--micro-batch-size", "2",
            "--lr", "2e-3", "--min-lr", "2e-4", "--seed", "5", "--log-interval", "1000", "--train-iters", "3",
            "--global-batch-size", "4", "--finetune", "--no-shuffle", "--moe-grouped-gemm"]


@pytest.fixture(scope="module")
def cpu_reference(tiny_data, tiny_hf_dir, tmp_path_factory):
    """The 1-rank cpu run, every kernel flag off but --moe-grouped-gemm (part of the converted layout)."""
    one = hf2mcore(tiny_hf_dir, str(tmp_path_factory.mktemp("npu_ref")), "--moe-grouped-gemm")
    (history,) = run_distributed(_train_on_cpu, 1, [*_common(tiny_data), "--load", one])
    return history


@pytest.mark.parametrize("name", list(RUNS))
def test_npu_emulated_training_matches_cpu(name, tiny_data, tiny_hf_dir, tmp_path, cpu_reference, monkeypatch):
    conv, layout, flags, loss_tol, norm_tol = RUNS[name]
    ckpt = hf2mcore(tiny_hf_dir, str(tmp_path / name), "--moe-grouped-gemm", *conv)
    monkeypatch.setenv("MINDSPEED_DSV_DEVICE", "npu-emulated")
    ranks = run_distributed(_train_on_emulated_npu, 2, [*_common(tiny_data), "--load", ckpt, *layout, *flags])
    for rank in ranks:  # every rank logs the loss of the ranks that computed it (with PP2, rank 0 computed none)
        assert len(rank["history"]) == len(cpu_reference) == 3
        for ref, got in zip(cpu_reference, rank["history"]):
            assert got["lm loss"] == pytest.approx(ref["lm loss"], rel=loss_tol), (name, cpu_reference, rank)
            assert got["grad norm"] == pytest.approx(ref["grad norm"], rel=norm_tol), (name, cpu_reference, rank)
    assert ranks[0]["param_type"] == ("torch.npu.BFloat16Tensor" if "--bf16" in layout else "torch.npu.FloatTensor")
    called = [sum(rank["ops"].get(op, 0) for rank in ranks) for op in FLAG_OPS.values()]
    for (flag, op), count in zip(FLAG_OPS.items(), called):
        if flag not in flags:
            assert count == 0, (flag, op)
        elif name in NOT_REACHED_YET.get(flag, ()):
            assert count == 0, f"{flag} now reaches {op} in {name}: delete it from NOT_REACHED_YET"
        else:
            assert count > 0, f"{flag} is on but {op} was never called ({name})"
    collectives = ranks[0]["collectives"]
    assert collectives.get("all_reduce", 0) > 0  # the emulated HCCL saw them all (and refused none: no float64)


def test_emulated_hccl_refuses_float64():
    import collections

    import torch

    from tests.ops.fake_torch_npu import HcclDtypeError, _hccl_checked

    counter = collections.Counter()
    reduce = _hccl_checked("all_reduce", lambda t, **kw: t, counter)
    assert reduce(torch.zeros(2, dtype=torch.float32)).dtype == torch.float32
    with pytest.raises(HcclDtypeError, match="float64"):
        reduce(torch.zeros(2, dtype=torch.float64))
    assert counter == {"all_reduce": 1}
