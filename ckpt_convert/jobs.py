"""Conversion work spread over processes: one call per job, in this process or in a pool (--workers)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed


def run_jobs(fn, jobs, workers: int):
    """Yields (job, fn(*job)) for every job (a tuple of arguments): here, in order, when workers <= 1; otherwise in a
    pool of `workers` processes, as each finishes. fn must be a module-level function (pickled to the workers)."""
    if workers <= 1:
        for job in jobs:
            yield job, fn(*job)
        return
    with ProcessPoolExecutor(max_workers=workers) as ex:
        futures = {ex.submit(fn, *job): job for job in jobs}
        for f in as_completed(futures):
            yield futures[f], f.result()
