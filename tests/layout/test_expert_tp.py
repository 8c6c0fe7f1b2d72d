"""--expert-tensor-parallel-size: which rank files exist, checked against the rank groups megatron-core 0.16.1 builds
(its own RankGenerator, with the sizes and order initialize_model_parallel gives it), and the rules of the flag.
The trainer's side (each rank saves the file of its (tp, pp, ep), the lowest rank of a position writes it, and the
set equals the converter's) is checked end to end by tests/training/test_train.py's expert-TP cases."""

import pytest
from megatron.core.parallel_state import RankGenerator

from mindspeed_dsv.layout import LayoutError, ParallelLayout

ORDER = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default order
CASES = {  # name -> (layout fields, world size)
    "tp2_etp1_ep2": (dict(tp=2, ep=2, expert_tensor_parallel_size=1), 4),
    "tp2_etp1_ep4": (dict(tp=2, ep=4, expert_tensor_parallel_size=1), 8),
    "tp4_etp1_ep2": (dict(tp=4, ep=2, expert_tensor_parallel_size=1), 8),
    "tp2_etp1_ep1_pp2": (dict(tp=2, pp=2, expert_tensor_parallel_size=1), 8),
    "tp4_etp1_ep32_pp2_a2": (dict(tp=4, pp=2, ep=32, expert_tensor_parallel_size=1), 128),
    "tp2_ep2": (dict(tp=2, ep=2), 8),
    "tp2_ep2_extend": (dict(tp=2, ep=2, moe_tp_extend_ep=True), 8),
}


def _index_in_group(groups, rank):
    return next(g.index(rank) for g in groups if rank in g)


def megatron_files(layout: ParallelLayout, world: int) -> list[tuple[int, int, int]]:
    """(tp, pp, ep) file of every global rank, from megatron's generators (parallel_state.initialize_model_parallel:
    the decoder grid tp x cp x dp x pp, the expert grid expert-tp x ep x expert-dp x pp)."""
    ep, etp = layout.megatron_expert_sizes()
    dense = RankGenerator(tp=layout.tp, ep=1, dp=world // (layout.tp * layout.pp), pp=layout.pp, cp=1, order=ORDER)
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * layout.pp), pp=layout.pp, cp=1, order=ORDER)
    tp_groups, pp_groups, ep_groups = dense.get_ranks("tp"), dense.get_ranks("pp"), expert.get_ranks("ep")
    return [(_index_in_group(tp_groups, r), _index_in_group(pp_groups, r),
             layout.file_ep_rank(_index_in_group(ep_groups, r))) for r in range(world)]


@pytest.mark.parametrize("name", list(CASES))
def test_rank_files_are_megatrons(name):
    fields, world = CASES[name]
    layout = ParallelLayout(num_layers=4, num_experts=256, **fields)
    assert world % layout.min_world_size() == 0
    files = megatron_files(layout, world)
    assert sorted(set(files)) == sorted(layout.rank_files())
    assert len(layout.rank_files()) == len(set(layout.rank_files()))
    # the smallest world megatron accepts already holds every file
    assert sorted(set(megatron_files(layout, layout.min_world_size()))) == sorted(layout.rank_files())


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
    assert ParallelLayout(tp=2, ep=2, num_layers=4, moe_tp_extend_ep=True).megatron_expert_sizes() == (4, 1)
    with pytest.raises(LayoutError, match="expert-TP"):
        ParallelLayout(tp=2, ep=4, num_layers=4, expert_tensor_parallel_size=1).data_parallel_size(2)
