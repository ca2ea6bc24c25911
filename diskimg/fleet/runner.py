"""Running the jobs of a batch: one job in one worker process at a time, locally or on Dask.

``run_job`` is what a worker does with one job: call the public API function the job names and turn
its result (or its error) into a journal entry. Everything that can go wrong with one image is
caught there, so one bad image never stops the batch; only Ctrl-C (KeyboardInterrupt) goes through,
and a job cut off that way gives no entry.

The local runner keeps its own small pool of spawned processes rather than a
``ProcessPoolExecutor``: it must know which job each process runs, so that a process that dies
(killed, out of memory) costs only that job, which runs again in a fresh process (up to
``ATTEMPTS`` times, as a Dask scheduler does for a lost worker; each attempt first removes the
temporaries a killed one left), and so that Ctrl-C reaches each
busy worker exactly once, letting its job remove its temporary output.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from ..errors import EXIT_INTERNAL, EXIT_NO, DiskImageError, error_line, internal_error_line
from .plan import OPERATIONS, Job

#: times a job is started when the process running it dies
ATTEMPTS = 3

#: called with each finished job's entry
EntrySink = Callable[[dict[str, Any]], None]
#: called with a job's id when a worker starts it
StartSink = Callable[[str], None]


def run_job(job: Job) -> dict[str, Any]:
    """Run ``job`` and return its journal entry: the command's --json result, or its error line
    and the exit code the command would have given."""
    remove_leftovers(job)
    started, io_before = time.monotonic(), _io_counters()
    entry: dict[str, Any] = {"id": job.id, "key": job.key, "op": job.op}
    try:
        result = operation(job.op)(**job.arguments)
    except DiskImageError as exc:
        entry.update(outcome="error", exit_code=exc.exit_code, error=error_line(exc))
    except Exception as exc:  # a bug, or the machine (MemoryError): this job's failure, not the batch's
        entry.update(outcome="error", exit_code=EXIT_INTERNAL, error=internal_error_line(exc))
    else:
        answer = OPERATIONS[job.op].answer
        yes = getattr(result, answer) if answer else True
        entry.update(outcome="ok" if yes else "no", exit_code=0 if yes else EXIT_NO, result=result.to_dict())
    io_after = _io_counters()
    entry["read_bytes"], entry["written_bytes"] = (
        (io_after[0] - io_before[0], io_after[1] - io_before[1]) if io_before and io_after else (None, None))
    entry["seconds"] = round(time.monotonic() - started, 3)
    entry["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return entry


def operation(name: str) -> Callable[..., Any]:
    """The function of the API that runs operation ``name`` of a plan, imported when a job needs it
    (a worker loads only what its jobs use)."""
    if name == "convert":
        from ..conversion.pipeline import convert

        return convert
    if name == "validate":
        from ..validation import validate

        return validate
    if name == "export":
        from ..archives.export import export

        return export
    if name == "verify":
        from ..archives.export import verify

        return verify
    if name == "unpack":
        from ..archives.unpack import unpack

        return unpack
    raise AssertionError(f"operation {name!r} is not in the plan's OPERATIONS")


def remove_leftovers(job: Job) -> None:
    """Remove the temporaries an earlier attempt at ``job`` left when its process was killed (a
    lost worker, a machine that went down): no partial file stays behind a job that ran again. The
    plan gives each output to one job, so no other job's temporary matches."""
    from ..conversion.outputs import leftover_temporaries

    for name in OPERATIONS[job.op].outputs:
        for leftover in leftover_temporaries(job.arguments[name]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _io_counters() -> tuple[int, int] | None:
    """Bytes this process read and wrote through system calls so far (Linux), else None."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":") for line in f)
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def died_entry(job: Job, how: str) -> dict[str, Any]:
    """The entry of a job whose worker died on every attempt (``how``): most likely the job kills it."""
    return {"id": job.id, "key": job.key, "op": job.op, "outcome": "error", "exit_code": EXIT_INTERNAL,
            "error": f"diskimg: error: the worker process running job {job.id!r} died {how}",
            "read_bytes": None, "written_bytes": None, "seconds": None,
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


# -- the local runner ---------------------------------------------------------------------------------


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A worker process: jobs in, entries out, until told to stop (None) or interrupted."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # a terminal's Ctrl-C reaches the runner only, which passes it on exactly once
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _sigint_blocked(False)  # blocked since the runner started us: a Ctrl-C during start-up waited till here
    while True:
        try:
            job = conn.recv()
            if job is None:
                return
            entry = run_job(job)
        except (KeyboardInterrupt, EOFError):
            return  # the job in hand is not journaled; its output was removed on the way out
        _sigint_blocked(True)  # an entry is sent whole
        conn.send(entry)
        _sigint_blocked(False)


def _sigint_blocked(blocked: bool) -> None:
    """Hold SIGINT back (or let it through) in this thread, where signal masks exist (POSIX)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, {signal.SIGINT})


class _Worker:
    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True)
        _sigint_blocked(True)  # inherited: the worker takes no Ctrl-C before it leaves our process group
        try:
            self.process.start()
        finally:
            _sigint_blocked(False)
        child.close()
        self.job: Job | None = None

    def start(self, job: Job) -> None:
        self.job = job
        self.conn.send(job)


def run_local(jobs: Iterable[Job], workers: int, record: EntrySink, started: StartSink) -> None:
    """Run ``jobs`` in ``workers`` spawned processes, ``record``-ing each entry as it arrives. On
    Ctrl-C, each busy worker is interrupted, the entries of jobs that still finish are recorded,
    and KeyboardInterrupt is raised."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
    queue = deque(jobs)
    attempts: dict[str, int] = {}
    pool = [_Worker(context) for _ in range(min(workers, len(queue)))]
    try:
        while queue or any(w.job for w in pool):
            for worker in pool:
                if worker.job is None and queue:
                    job = queue.popleft()
                    attempts[job.ref] = attempts.get(job.ref, 0) + 1
                    worker.start(job)
                    started(job.id)
            busy = [w for w in pool if w.job]
            ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for index, worker in enumerate(pool):
                if worker.job is None or (worker.conn not in ready and worker.process.sentinel not in ready):
                    continue
                entry = _receive(worker)
                if entry is not None:
                    worker.job = None
                    record(entry)
                    continue
                job, how = worker.job, _death(worker.process)
                if attempts[job.ref] < ATTEMPTS:
                    queue.appendleft(job)  # its next attempt removes what this one left
                else:
                    remove_leftovers(job)
                    record(died_entry(job, f"{ATTEMPTS} times ({how})"))
                pool[index] = _Worker(context)
    except KeyboardInterrupt:
        _interrupt(pool, record)
        raise
    finally:
        for worker in pool:
            if worker.process.is_alive() and worker.job is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
        for worker in pool:
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def _receive(worker: _Worker) -> dict[str, Any] | None:
    """The entry the worker sent, or None if it died before sending one."""
    try:
        if worker.conn.poll():
            entry: dict[str, Any] = worker.conn.recv()
            return entry
    except (EOFError, OSError):
        pass
    return None


def _death(process: Any) -> str:
    process.join()
    code = process.exitcode
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"


def _interrupt(pool: list[_Worker], record: EntrySink) -> None:
    """Pass Ctrl-C on to each busy worker once; record what finished anyway. A second Ctrl-C
    stops waiting (the workers are then killed, their temporaries left for a rerun to remove)."""
    busy = [w for w in pool if w.job]
    for worker in busy:
        os.kill(worker.process.pid, signal.SIGINT)
    try:
        for worker in busy:
            entry = None
            while entry is None and (worker.process.is_alive() or worker.conn.poll()):
                if worker.conn.poll(0.1):  # read while it sends: a large entry does not fit a pipe
                    try:
                        entry = worker.conn.recv()
                    except (EOFError, OSError):
                        break
            worker.process.join()
            worker.job = None
            if entry is not None:
                record(entry)
    except KeyboardInterrupt:
        pass


# -- on a Dask cluster ------------------------------------------------------------------------------


def run_dask(jobs: Iterable[Job], scheduler: str, record: EntrySink, started: StartSink) -> None:
    """Run each job as one task of the Dask cluster at ``scheduler`` (``tcp://host:8786``), whose
    workers see the same paths. A lost worker's task is run again by the scheduler, as often as its
    ``distributed.scheduler.allowed-failures`` allows (3 by default; run_job itself never raises). On
    Ctrl-C the tasks not yet finished are cancelled; a task already running on a worker thread
    cannot be stopped there and finishes unjournaled."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        from ..errors import UsageError

        raise UsageError("--scheduler needs the 'distributed' package: pip install 'diskimg[dask]'") from None
    jobs = list(jobs)
    try:
        client = Client(scheduler, timeout="30s")
    except (OSError, TimeoutError) as exc:
        from ..errors import UsageError

        raise UsageError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    with client:
        futures = {}
        for job in jobs:
            future = client.submit(run_job, job, key=f"diskimg-{job.op}-{job.id}-{job.key}-{time.time_ns()}",
                                   pure=False)
            futures[future] = job
            started(job.id)
        try:
            for future in as_completed(futures):
                job = futures[future]
                if future.status == "finished":
                    record(future.result())
                else:
                    error = future.exception()
                    record(died_entry(job, f"on every attempt the cluster allows ({type(error).__name__}: {error})"))
        except KeyboardInterrupt:
            client.cancel(list(futures))
            raise
