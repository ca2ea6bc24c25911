"""``diskimg batch``: a fleet of jobs from one plan, resumable through a journal, run in local worker
processes or as tasks of a Dask cluster.

``plan.py`` reads and checks the plan (JSON Lines, one job a line), ``journal.py`` appends one
durable line per finished job and reads them back, ``runner.py`` runs the jobs. This module ties
them together: the jobs the journal does not hold yet are run, and the summary covers the whole
plan, jobs journaled by an earlier run included.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UsageError
from .journal import Journal, read_journal
from .plan import OPERATIONS, Job, read_plan

__all__ = ["OPERATIONS", "BatchProgress", "BatchResult", "Job", "batch", "default_jobs", "read_plan"]

#: memory one job may take, for the default number of parallel jobs: a worker process (~30 MiB)
#: plus a conversion's or an export's buffers (README: 30-100 MiB), with room to spare
JOB_MEMORY = 192 << 20

#: ``progress(event, job_id, finished, total)``: event ``start`` (a worker took the job; on Dask: the
#: task was submitted) or the outcome of a finished job (``ok``, ``no``, ``error``); ``finished``
#: counts the whole plan
BatchProgress = Callable[[str, str, int, int], None]


@dataclass
class BatchResult:
    """The summary of a batch over its whole plan, jobs journaled by earlier runs included."""

    plan: str
    journal: str | None
    jobs: int
    #: outcome (ok, no, error) -> number of jobs
    outcomes: dict[str, int]
    #: the ids of the jobs that said no or failed, in plan order
    failed: list[str]
    #: jobs found finished in the journal and not run again
    skipped: int
    #: bytes read and written by the jobs (the worker processes' I/O counters; Linux)
    read_bytes: int
    written_bytes: int
    #: wall time of this run, and what it did per second (jobs run, bytes read + written)
    seconds: float
    jobs_per_second: float
    bytes_per_second: float
    #: every job's entry (as journaled), in plan order
    entries: list[dict[str, Any]] = field(repr=False)

    @property
    def succeeded(self) -> bool:
        return self.outcomes["ok"] == self.jobs

    def to_dict(self) -> dict[str, Any]:
        summary = asdict(self)
        del summary["entries"]  # the journal holds them: a fleet's results do not belong in a summary
        return summary


def default_jobs() -> int:
    """Jobs at a time when not told: one per core, fewer if memory is short for that many."""
    available = _available_memory()
    by_memory = available // JOB_MEMORY if available else os.cpu_count() or 1
    return max(1, min(os.cpu_count() or 1, by_memory))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def batch(
    plan: str | os.PathLike[str],
    *,
    journal: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
    progress: BatchProgress | None = None,
) -> BatchResult:
    """Run every job of the JSON Lines ``plan`` (see :mod:`diskimg.fleet.plan`), ``jobs`` at a time
    in local worker processes (default :func:`default_jobs`), or as tasks of the Dask cluster whose
    scheduler is at ``scheduler`` (``tcp://host:8786``; its workers must see the same paths, which
    must then be absolute).

    Each finished job is appended to ``journal``; the jobs it already holds (same id, same plan
    line) are not run again. The plan is checked whole before anything runs (UsageError naming the
    line). Ctrl-C raises KeyboardInterrupt once the running jobs stopped; they are not journaled.
    """
    if jobs is not None and jobs < 1:
        raise UsageError("jobs must be 1 or more")
    if jobs is not None and scheduler is not None:
        raise UsageError("--jobs is for worker processes here; on a Dask cluster its workers decide how many run")
    started = time.monotonic()
    plan_path = os.fspath(plan)
    all_jobs = read_plan(plan_path, absolute_paths=scheduler is not None)
    journal_path = os.fspath(journal) if journal is not None else None
    done = read_journal(journal_path) if journal_path else {}
    entries = {job.ref: done[job.ref] for job in all_jobs if job.ref in done}
    journaled_before = set(entries)
    to_run = [job for job in all_jobs if job.ref not in entries]
    total = len(all_jobs)

    def record(entry: dict[str, Any]) -> None:
        if journal_file:
            journal_file.record(entry)
        entries[f"{entry['id']}@{entry['key']}"] = entry
        if progress:
            progress(entry["outcome"], entry["id"], len(entries), total)

    def started_job(job_id: str) -> None:
        if progress:
            progress("start", job_id, len(entries), total)

    journal_file = Journal(journal_path) if journal_path and to_run else None
    try:
        if to_run and scheduler is not None:
            from .runner import run_dask

            run_dask(to_run, scheduler, record, started_job)
        elif to_run:
            from .runner import run_local

            run_local(to_run, jobs or default_jobs(), record, started_job)
    finally:
        if journal_file:
            journal_file.close()
    return _summary(plan_path, journal_path, all_jobs, entries, journaled_before, time.monotonic() - started)


def _summary(plan: str, journal: str | None, jobs: list[Job], entries: dict[str, dict[str, Any]],
             journaled_before: set[str], seconds: float) -> BatchResult:
    """Counts and totals over the whole plan; the rates over what this run did."""
    ordered = [entries[job.ref] for job in jobs]
    outcomes = {"ok": 0, "no": 0, "error": 0}
    for entry in ordered:
        outcomes[entry["outcome"]] += 1
    ran = [entries[job.ref] for job in jobs if job.ref not in journaled_before]
    moved = sum((entry.get("read_bytes") or 0) + (entry.get("written_bytes") or 0) for entry in ran)
    return BatchResult(
        plan=plan, journal=journal, jobs=len(jobs), outcomes=outcomes,
        failed=[entry["id"] for entry in ordered if entry["outcome"] != "ok"], skipped=len(journaled_before),
        read_bytes=sum(entry.get("read_bytes") or 0 for entry in ordered),
        written_bytes=sum(entry.get("written_bytes") or 0 for entry in ordered),
        seconds=round(seconds, 3), jobs_per_second=round(len(ran) / seconds, 3) if seconds else 0.0,
        bytes_per_second=round(moved / seconds) if seconds else 0.0, entries=ordered)
