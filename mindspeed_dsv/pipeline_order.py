"""The order in which each pipeline rank runs its forward and backward chunks, and a simulation of it.

One generator per schedule: 1F1B and interleaved 1F1B (the order megatron-core 0.16.1's schedules run) and
dualpipev (the order our ``mindspeed_dsv.training.dualpipev`` runs: the trainer executes exactly the list
``dualpipev_order`` returns). ``simulate`` plays the per-rank lists against their data dependencies, so the
planner's bubble fraction and peak in-flight activations come from the same op order the trainer runs, not from a
formula. Pure Python: the planner imports it without torch or megatron.

An op is (kind, chunk, micro-batch): kind 'F' (forward) or 'B' (backward, weight gradients included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence


class Op(NamedTuple):
    kind: str  # 'F' or 'B'
    chunk: int  # model chunk on this rank
    microbatch: int


class ScheduleError(ValueError):
    """A schedule that cannot run these sizes; the message names the flag."""


def one_f_one_b_order(pp: int, rank: int, num_microbatches: int) -> list[Op]:
    """megatron's forward_backward_pipelining_without_interleaving: pp-rank-1 warm-up forwards, then one
    forward and one backward alternately, then the remaining backwards."""
    m = num_microbatches
    warmup = min(pp - rank - 1, m)
    ops = [Op("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    ops += [Op("B", 0, i) for i in range(m - warmup, m)]
    return ops


def interleaved_order(pp: int, rank: int, num_microbatches: int, chunks: int) -> list[Op]:
    """megatron's forward_backward_pipelining_with_interleaving (micro-batch groups of pp per chunk):
    (pp-rank-1)*2 + (chunks-1)*pp warm-up forwards, then 1F1B over virtual micro-batches, then the rest."""
    m = num_microbatches
    if m % pp:
        raise ScheduleError(f"interleaved pipeline needs the number of micro-batches ({m}) divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    total = m * chunks
    group = pp * chunks

    def fwd(k):
        return Op("F", (k % group) // pp, (k // group) * pp + k % pp)

    def bwd(k):
        return Op("B", chunks - 1 - (k % group) // pp, (k // group) * pp + k % pp)

    warmup = min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)
    ops = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [fwd(warmup + k), bwd(k)]
    ops += [bwd(k) for k in range(total - warmup, total)]
    return ops


def dualpipev_order(pp: int, rank: int, num_microbatches: int, forward_only: bool = False) -> list[Op]:
    """DualPipeV (deepseek-ai/DualPipe dualpipev.py, its eight phases) for rank `rank` of `pp`; chunk 0 is
    virtual stage rank, chunk 1 is virtual stage 2*pp-1-rank. Where DualPipe overlaps a forward with a
    backward ("F&B") we run the forward then the backward, and a backward includes its weight gradients (no
    zero-bubble W split); the order of the ops is DualPipe's."""
    m = num_microbatches
    if pp < 2:
        raise ScheduleError("--schedules-method dualpipev needs --pipeline-model-parallel-size > 1")
    if m < 2 * pp:
        raise ScheduleError(f"--schedules-method dualpipev needs at least 2 * --pipeline-model-parallel-size = "
                            f"{2 * pp} micro-batches per step, got {m} (--global-batch-size / "
                            "(--micro-batch-size * data-parallel size))")
    nxt = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0}
    ops: list[Op] = []

    def run(kind, chunk):
        ops.append(Op(kind, chunk, nxt[(kind, chunk)]))
        nxt[(kind, chunk)] += 1

    r = rank
    for _ in range((pp - r - 1) * 2):  # 1. nF0
        run("F", 0)
    for _ in range(r + 1):  # 2. nF0F1
        run("F", 0)
        run("F", 1)
    for _ in range(pp - r - 1):  # 3. nB1W1F1
        run("B", 1)
        run("F", 1)
    for _ in range(m - 2 * pp + r + 1):  # 4. main: F0&B1, F1&B0
        run("F", 0)
        run("B", 1)
        run("F", 1)
        run("B", 0)
    for _ in range(pp - r - 1):  # 5. nB1F1B0
        run("B", 1)
        run("F", 1)
        run("B", 0)
    for _ in range(r + 1):  # 6. nB1B0
        run("B", 1)
        run("B", 0)
    for _ in range(pp - r - 1):  # 7. nWB0
        run("B", 0)
    assert all(v == m for v in nxt.values()), nxt
    return [op for op in ops if op.kind == "F"] if forward_only else ops


def dualpipev_stage(pp: int, rank: int, chunk: int) -> int:
    """Virtual stage of (rank, chunk) under dualpipev: the V."""
    return rank if chunk == 0 else 2 * pp - 1 - rank


@dataclass
class Simulation:
    makespan: float
    busy: list[float]  # per rank
    peak_in_flight: list[float]  # per rank, chunk-micro-batch activations held at the peak, divided by chunks
    bubble: float  # 1 - sum(busy) / (ranks * makespan)


def simulate(orders: Sequence[Sequence[Op]], stage_of: Callable[[int, int], int], num_stages: int,
             cost: Callable[[str, int], float] | None = None) -> Simulation:
    """Run each rank's op list in order, each op starting when its rank is free and its input exists:
    F of virtual stage v needs F of v-1 (same micro-batch), B of v needs B of v+1, the last stage's B its own
    F. Communication is free. cost(kind, virtual stage) defaults to F = 1, B = 2. Raises ScheduleError on a
    deadlock (an order no pipeline could run)."""
    cost = cost or (lambda kind, v: 1.0 if kind == "F" else 2.0)
    ranks = len(orders)
    chunks = 1 + max((op.chunk for order in orders for op in order), default=0)
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * ranks
    free = [0.0] * ranks
    busy = [0.0] * ranks
    live = [0] * ranks
    peak = [0] * ranks
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(ranks):
            while pos[r] < len(orders[r]):
                op = orders[r][pos[r]]
                v = stage_of(r, op.chunk)
                if op.kind == "F":
                    dep = ("F", v - 1, op.microbatch) if v > 0 else None
                else:
                    dep = ("B", v + 1, op.microbatch) if v < num_stages - 1 else ("F", v, op.microbatch)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] if dep is not None else 0.0)
                t = cost(op.kind, v)
                free[r] = start + t
                busy[r] += t
                done[(op.kind, v, op.microbatch)] = free[r]
                live[r] += 1 if op.kind == "F" else -1
                peak[r] = max(peak[r], live[r])
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][pos[r]] for r in range(ranks) if pos[r] < len(orders[r])}
            raise ScheduleError(f"pipeline order deadlocks; ranks wait at {stuck}")
    makespan = max(free)
    return Simulation(makespan=makespan, busy=busy, peak_in_flight=[p / chunks for p in peak],
                      bubble=1.0 - sum(busy) / (ranks * makespan) if makespan else 0.0)


__all__ = ["Op", "ScheduleError", "Simulation", "dualpipev_order", "dualpipev_stage", "interleaved_order",
           "one_f_one_b_order", "simulate"]
