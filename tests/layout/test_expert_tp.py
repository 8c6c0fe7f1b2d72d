"""--expert-tensor-parallel-size: which rank files exist and who writes them, checked against the groups megatron-core
0.16.1 itself builds (a gloo world of 4), and the layout rules of the flag."""

import pytest

from mindspeed_dsv.layout import LayoutError, ParallelLayout
from tests.dist_utils import run_distributed

CASES = {  # name -> layout fields; every case fits a world of 4
    "tp2_etp1_ep2": dict(tp=2, ep=2, expert_tensor_parallel_size=1),
    "tp2_etp1_ep4": dict(tp=2, ep=4, expert_tensor_parallel_size=1),
    "tp4_etp1_ep2": dict(tp=4, ep=2, expert_tensor_parallel_size=1),
    "tp2_etp1_ep1_pp2": dict(tp=2, pp=2, expert_tensor_parallel_size=1),
    "tp2_ep2_extend": dict(tp=2, ep=2, moe_tp_extend_ep=True),
}


def _file_of_each_rank(cases):
    """On one rank: for every case, megatron's groups are built and this rank's (tp, pp, ep) file and
    whether it writes it are reported (the trainer's own functions)."""
    from mindspeed_dsv.platform import init_distributed
    from mindspeed_dsv.training.checkpointing import _ranks, _writes_its_file

    out = {}
    for name, fields in cases.items():
        layout = ParallelLayout(num_layers=4, num_experts=8, **fields)
        ep, etp = layout.megatron_expert_sizes()
        init_distributed(tp=layout.tp, pp=layout.pp, ep=ep, etp=etp)
        out[name] = (_ranks(layout), _writes_its_file(layout))
    return out


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_file_of_each_rank, 4, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_rank_files_are_megatrons(name, per_rank):
    layout = ParallelLayout(num_layers=4, num_experts=8, **CASES[name])
    files = [r[name][0] for r in per_rank]
    assert sorted(set(files)) == sorted(layout.rank_files())
    assert len(layout.rank_files()) == len(set(layout.rank_files()))
    # the writer of each file is the lowest rank holding it
    writers = [files[rank] for rank, r in enumerate(per_rank) if r[name][1]]
    assert writers == [f for i, f in enumerate(files) if f not in files[:i]]


def test_rank_files_at_expert_tp_1():
    # lcm(TP, EP) files per stage: (r % TP, r % EP)
    assert ParallelLayout(tp=2, ep=2, num_layers=4, expert_tensor_parallel_size=1).rank_files() == [
        (0, 0, 0), (1, 0, 1)]
    assert ParallelLayout(tp=4, ep=32, num_layers=4, expert_tensor_parallel_size=1).rank_files() == [
        (r % 4, 0, r) for r in range(32)]
    assert len(ParallelLayout(tp=2, ep=1, num_layers=4, expert_tensor_parallel_size=1).rank_files()) == 2
    assert len(ParallelLayout(tp=2, ep=2, num_layers=4).rank_files()) == 4
    assert ParallelLayout(tp=4, ep=32, pp=8, num_layers=64, expert_tensor_parallel_size=1).min_world_size() == 256


def test_expert_tp_flag_rules():
    with pytest.raises(LayoutError, match="--expert-tensor-parallel-size must be 1 or"):
        ParallelLayout(tp=4, num_layers=4, expert_tensor_parallel_size=2).validate()
    with pytest.raises(LayoutError, match="contradicts"):
        ParallelLayout(tp=2, ep=2, num_layers=4, moe_tp_extend_ep=True, expert_tensor_parallel_size=2).validate()
    a = ParallelLayout(tp=2, num_layers=4)
    assert a.expert_tp == 2 and not a.diff(ParallelLayout(tp=2, num_layers=4, expert_tensor_parallel_size=2))
    assert a.diff(ParallelLayout(tp=2, num_layers=4, expert_tensor_parallel_size=1)) == [
        "--expert-tensor-parallel-size (expert_tensor_parallel_size): 'TP' != 1"]
    assert len(a.diff(ParallelLayout(tp=4, num_layers=4))) == 1  # only TP differs
