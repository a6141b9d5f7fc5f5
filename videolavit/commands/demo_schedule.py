"""Run the jobs of a dependency graph on a fixed number of lanes.

``demo`` uses it to train independent stages side by side: on 2 cores, two single-threaded stage processes
finish sooner than one after the other. Each job is a callable (the demo's launch a subprocess and wait for it),
run on a worker thread; the scheduling itself stays on the calling thread, so progress callbacks never
interleave. Ready jobs start in the order they are listed, so with one lane the graph runs in list order.
If a job fails no new job starts; the ones already running finish, then :class:`JobFailed` names the job.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence


class GraphError(ValueError):
    """The jobs do not form a runnable graph (duplicate name, unknown dependency, cycle)."""


@dataclass(frozen=True)
class Job:
    name: str
    action: Callable[[], Any]  # returns the job's result; raising means the job failed
    needs: tuple[str, ...] = ()  # names of the jobs that must have finished before this one starts


@dataclass
class Outcome:
    """What happened to one job that started; times are seconds since the graph started."""

    name: str
    lane: int  # 1..lanes
    start: float
    seconds: float = 0.0
    result: Any = None
    error: BaseException | None = None


class JobFailed(RuntimeError):
    """A job raised; ``outcomes`` holds every job that started (the failed one included)."""

    def __init__(self, name: str, error: BaseException, outcomes: dict[str, Outcome]):
        super().__init__(f"job {name!r} failed: {error}")
        self.name, self.error, self.outcomes = name, error, outcomes


def check_graph(jobs: Sequence[Job]) -> None:
    """Raise :class:`GraphError` unless names are unique, every dependency is a listed job, and there is no cycle."""
    names = [job.name for job in jobs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise GraphError(f"duplicate job names: {duplicates}")
    for job in jobs:
        unknown = [need for need in job.needs if need not in names]
        if unknown:
            raise GraphError(f"job {job.name!r} needs unknown jobs {unknown}; jobs: {names}")
    needs = {job.name: set(job.needs) for job in jobs}
    done: set[str] = set()
    while len(done) < len(names):
        ready = [name for name in names if name not in done and needs[name] <= done]
        if not ready:
            raise GraphError(f"dependency cycle among {sorted(set(names) - done)}")
        done.update(ready)


def downstream(jobs: Sequence[Job], roots: Iterable[str]) -> set[str]:
    """``roots`` and every job that needs one of them, directly or through other jobs."""
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for job in jobs:
            if job.name not in found and found.intersection(job.needs):
                found.add(job.name)
                grew = True
    return found


def upstream(jobs: Sequence[Job], names: Iterable[str]) -> set[str]:
    """Every job that one of ``names`` needs, directly or through other jobs (``names`` themselves excluded)."""
    by_name = {job.name: job for job in jobs}
    found: set[str] = set()
    stack = [need for name in names for need in by_name[name].needs]
    while stack:
        name = stack.pop()
        if name not in found:
            found.add(name)
            stack.extend(by_name[name].needs)
    return found


def run_jobs(jobs: Sequence[Job], lanes: int, on_start: Callable[[Outcome], None] | None = None,
             on_end: Callable[[Outcome], None] | None = None) -> dict[str, Outcome]:
    """Run ``jobs`` with at most ``lanes`` at once, each as soon as everything it needs has finished.

    Returns the outcomes in the order the jobs finished. ``on_start``/``on_end`` are called on this thread
    (``on_end`` also for a failed job, with ``error`` set). Raises :class:`JobFailed` for the first job that
    fails, after the jobs running alongside it have finished.
    """
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    check_graph(jobs)
    started = time.monotonic()
    pending = list(jobs)
    running: dict[Future, Outcome] = {}
    outcomes: dict[str, Outcome] = {}
    failed: Outcome | None = None

    def timed(job: Job, outcome: Outcome) -> None:
        try:
            outcome.result = job.action()
        except BaseException as error:  # a job's SystemExit is a failure of that job, not of the scheduler
            outcome.error = error
        outcome.seconds = time.monotonic() - started - outcome.start

    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane") as pool:
        while pending or running:
            if failed is None:
                for job in list(pending):
                    if len(running) >= lanes:
                        break
                    if all(need in outcomes and outcomes[need].error is None for need in job.needs):
                        pending.remove(job)
                        busy = {outcome.lane for outcome in running.values()}
                        lane = min(set(range(1, lanes + 1)) - busy)
                        outcome = Outcome(job.name, lane, time.monotonic() - started)
                        if on_start:
                            on_start(outcome)
                        running[pool.submit(timed, job, outcome)] = outcome
            if not running:
                break  # a failure left the rest unstartable
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for outcome in sorted((running.pop(future) for future in finished), key=lambda o: o.start):
                outcomes[outcome.name] = outcome
                if outcome.error is not None and failed is None:
                    failed = outcome
                if on_end:
                    on_end(outcome)
    if failed is not None:
        raise JobFailed(failed.name, failed.error, outcomes)
    return outcomes
