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


def dualpipev_slots(pp: int, rank: int, num_microbatches: int, forward_only: bool = False,
                    overlap: bool = False) -> list[tuple[Op, ...]]:
    """DualPipeV (deepseek-ai/DualPipe dualpipev.py, its eight phases) for rank `rank` of `pp`; chunk 0 is
    virtual stage rank, chunk 1 is virtual stage 2*pp-1-rank. A slot is one op, or with `overlap`
    (--moe-fb-overlap) a forward and a backward that run together (DualPipe's "F&B": the main phase's F0&B1 and
    F1&B0, and phase 5's F1&B0; like DualPipe, not the last rank's first F0&B1, whose forward output another rank
    waits for). Without overlap the pairs are run forward first, then backward; a backward includes its weight
    gradients (no zero-bubble W split); the order of the ops is DualPipe's either way."""
    m = num_microbatches
    if pp < 2:
        raise ScheduleError("--schedules-method dualpipev needs --pipeline-model-parallel-size > 1")
    if m < 2 * pp:
        raise ScheduleError(f"--schedules-method dualpipev needs at least 2 * --pipeline-model-parallel-size = "
                            f"{2 * pp} micro-batches per step, got {m} (--global-batch-size / "
                            "(--micro-batch-size * data-parallel size))")
    nxt = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0}
    slots: list[tuple[Op, ...]] = []

    def op(kind, chunk):
        o = Op(kind, chunk, nxt[(kind, chunk)])
        nxt[(kind, chunk)] += 1
        return o

    def run(kind, chunk):
        slots.append((op(kind, chunk),))

    def run_pair(fchunk, bchunk, paired=True):
        f, b = op("F", fchunk), op("B", bchunk)
        slots.extend([(f, b)] if paired and overlap and not forward_only else [(f,), (b,)])

    r = rank
    for _ in range((pp - r - 1) * 2):  # 1. nF0
        run("F", 0)
    for _ in range(r + 1):  # 2. nF0F1
        run("F", 0)
        run("F", 1)
    for _ in range(pp - r - 1):  # 3. nB1W1F1
        run("B", 1)
        run("F", 1)
    for i in range(m - 2 * pp + r + 1):  # 4. main: F0&B1, F1&B0
        run_pair(0, 1, paired=not (i == 0 and r == pp - 1))
        run_pair(1, 0)
    for _ in range(pp - r - 1):  # 5. nB1F1B0
        run("B", 1)
        run_pair(1, 0)
    for _ in range(r + 1):  # 6. nB1B0
        run("B", 1)
        run("B", 0)
    for _ in range(pp - r - 1):  # 7. nWB0
        run("B", 0)
    assert all(v == m for v in nxt.values()), nxt
    if forward_only:
        return [s for s in slots if s[0].kind == "F"]
    return slots


def dualpipev_order(pp: int, rank: int, num_microbatches: int, forward_only: bool = False) -> list[Op]:
    """The ops of `dualpipev_slots` one after the other: the order the schedule runs them without overlap."""
    return [o for slot in dualpipev_slots(pp, rank, num_microbatches, forward_only) for o in slot]


def dualpipev_stage(pp: int, rank: int, chunk: int) -> int:
    """Virtual stage of (rank, chunk) under dualpipev: the V."""
    return rank if chunk == 0 else 2 * pp - 1 - rank


@dataclass
class Simulation:
    makespan: float
    busy: list[float]  # per rank
    peak_in_flight: list[float]  # per rank, chunk-micro-batch activations held at the peak, divided by chunks
    bubble: float  # 1 - sum(busy) / (ranks * makespan)


def simulate(orders: Sequence[Sequence[Op | tuple[Op, ...]]], stage_of: Callable[[int, int], int], num_stages: int,
             cost: Callable[[str, int], float] | None = None) -> Simulation:
    """Run each rank's op list in order, each op starting when its rank is free and its input exists:
    F of virtual stage v needs F of v-1 (same micro-batch), B of v needs B of v+1, the last stage's B its own
    F. Communication is free. cost(kind, virtual stage) defaults to F = 1, B = 2. An item of an order may be a
    slot (a tuple of ops, `dualpipev_slots`): its ops start together once all their inputs exist and take their
    summed time (compute is not faster for being overlapped; what overlap hides is communication, which is free
    here). Raises ScheduleError on a deadlock (an order no pipeline could run)."""
    cost = cost or (lambda kind, v: 1.0 if kind == "F" else 2.0)
    orders = [[(item,) if isinstance(item, Op) else tuple(item) for item in order] for order in orders]
    ranks = len(orders)
    chunks = 1 + max((op.chunk for order in orders for slot in order for op in slot), default=0)
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * ranks
    free = [0.0] * ranks
    busy = [0.0] * ranks
    live = [0] * ranks
    peak = [0] * ranks
    remaining = sum(len(o) for o in orders)

    def dep_of(r, op):
        v = stage_of(r, op.chunk)
        if op.kind == "F":
            return ("F", v - 1, op.microbatch) if v > 0 else None
        return ("B", v + 1, op.microbatch) if v < num_stages - 1 else ("F", v, op.microbatch)

    while remaining:
        progressed = False
        for r in range(ranks):
            while pos[r] < len(orders[r]):
                slot = orders[r][pos[r]]
                deps = [d for d in (dep_of(r, op) for op in slot) if d is not None]
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                t = sum(cost(op.kind, stage_of(r, op.chunk)) for op in slot)
                free[r] = start + t
                busy[r] += t
                for op in slot:  # in a pair the forward's activations exist before the backward frees its own
                    done[(op.kind, stage_of(r, op.chunk), op.microbatch)] = free[r]
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


__all__ = ["Op", "ScheduleError", "Simulation", "dualpipev_order", "dualpipev_slots", "dualpipev_stage", "interleaved_order",
           "one_f_one_b_order", "simulate"]
