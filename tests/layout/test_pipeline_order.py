"""The per-rank op orders (shared by the trainer and the planner) and their simulation, against the closed-form
bubbles of 1F1B and interleaved 1F1B and a hand transcription of DualPipeV's phases."""

import pytest

from mindspeed_dsv.pipeline_order import (
    Op, ScheduleError, dualpipev_order, dualpipev_stage, interleaved_order, one_f_one_b_order, simulate,
)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (8, 16), (8, 64), (4, 3)])
def test_1f1b_bubble_and_memory_match_the_closed_form(pp, m):
    sim = simulate([one_f_one_b_order(pp, r, m) for r in range(pp)], lambda r, c: r, pp)
    assert sim.bubble == pytest.approx((pp - 1) / (m + pp - 1))  # (p-1)(F+B) idle per rank over (m+p-1)(F+B)
    assert sim.peak_in_flight == [float(min(pp - r, m)) for r in range(pp)]


@pytest.mark.parametrize("pp,m,chunks", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (8, 64, 2)])
def test_interleaved_bubble_is_one_over_chunks(pp, m, chunks):
    orders = [interleaved_order(pp, r, m, chunks) for r in range(pp)]
    cost = lambda kind, v: (1.0 if kind == "F" else 2.0) / chunks  # noqa: E731 - each chunk is 1/chunks of a rank
    sim = simulate(orders, lambda r, c: c * pp + r, pp * chunks, cost)
    assert sim.bubble == pytest.approx((pp - 1) / (chunks * m + pp - 1))
    # megatron's warm-up depth (pp-r-1)*2 + (chunks-1)*pp, plus the micro-batch in flight, in rank units
    assert sim.peak_in_flight[0] == pytest.approx(((pp - 1) * 2 + (chunks - 1) * pp + 1) / chunks)


def test_dualpipev_order_is_dualpipes_phases():
    F0, F1, B0, B1 = (lambda i, k=k, c=c: Op(k, c, i) for k, c in (("F", 0), ("F", 1), ("B", 0), ("B", 1)))
    # pp=2, m=4, rank 0: nF0 x2, nF0F1 x1, nB1W1F1 x1, main x1, nB1F1B0 x1, nB1B0 x1, nWB0 x1
    assert dualpipev_order(2, 0, 4) == [F0(0), F0(1), F0(2), F1(0), B1(0), F1(1), F0(3), B1(1), F1(2), B0(0),
                                        B1(2), F1(3), B0(1), B1(3), B0(2), B0(3)]
    # rank 1 (last): no nF0, nF0F1 x2, main x2, nB1B0 x2
    assert dualpipev_order(2, 1, 4) == [F0(0), F1(0), F0(1), F1(1), F0(2), B1(0), F1(2), B0(0), F0(3), B1(1),
                                        F1(3), B0(1), B1(2), B0(2), B1(3), B0(3)]
    assert dualpipev_order(2, 1, 4, forward_only=True) == [F0(0), F1(0), F0(1), F1(1), F0(2), F1(2), F0(3), F1(3)]


@pytest.mark.parametrize("pp,m", [(2, 4), (2, 7), (4, 8), (8, 16), (8, 64)])
def test_dualpipev_runs_each_op_once_without_deadlock(pp, m):
    orders = [dualpipev_order(pp, r, m) for r in range(pp)]
    for order in orders:
        assert sorted(order) == sorted(Op(k, c, i) for k in "FB" for c in (0, 1) for i in range(m))
    cost = lambda kind, v: 0.5 if kind == "F" else 1.0  # noqa: E731 - two half-size chunks per rank
    sim = simulate(orders, lambda r, c: dualpipev_stage(pp, r, c), 2 * pp, cost)
    one_f_one_b = simulate([one_f_one_b_order(pp, r, m) for r in range(pp)], lambda r, c: r, pp)
    assert sim.bubble < one_f_one_b.bubble
    # DualPipe's README: PP+1 activations of one (half-size) stage on every rank -> pp + 0.5 rank units
    assert sim.peak_in_flight == [pp + 0.5] * pp


def test_refusals_name_the_flags():
    with pytest.raises(ScheduleError, match="at least 2 \\* --pipeline-model-parallel-size = 8 micro-batches"):
        dualpipev_order(4, 0, 7)
    with pytest.raises(ScheduleError, match="needs --pipeline-model-parallel-size > 1"):
        dualpipev_order(1, 0, 4)
    with pytest.raises(ScheduleError, match="divisible by --pipeline-model-parallel-size 4"):
        interleaved_order(4, 0, 6, 2)
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate([[Op("B", 0, 0), Op("F", 0, 0)], [Op("F", 0, 0), Op("B", 0, 0)]], lambda r, c: r, 2)
