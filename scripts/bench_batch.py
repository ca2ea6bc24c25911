#!/usr/bin/env python3
"""Jobs per second of ``diskimg batch`` against a shell loop of single ``diskimg`` calls, same plan.

    python scripts/bench_batch.py [--disks 8] [--size 256M] [--data 48M] [--runs 7] [--jobs 1,2,4]
                                  [--mix validate,convert,export] [--dir DIR] [--keep]

Builds DISKS qcow2 disks of SIZE (qemu-img convert of a RAW file holding DATA of random bytes in 4
places), then a plan of one job per disk and operation of MIX (default: the mix of a migration,
``validate`` it, ``convert`` it to a dynamic VHD, ``export`` it as a raw tar.gz archive). Then, alternating, RUNS
times each (outputs removed and the page cache left warm, the same for both):

* the shell loop: ``bash`` running one ``python -m diskimg`` command per job, one after the other
  (what a team's script does today);
* ``diskimg batch PLAN --jobs J`` for each J of --jobs.

Prints the median wall time, jobs per second, jobs per hour and bytes moved per second of each, and
the batch's speed-up over the loop. Where more jobs at a time stop helping, the machine's cores or
its disk are saturated: the bytes per second column says which (compare with ``dd`` on the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from diskimg.units import format_size, parse_size  # noqa: E402  (the checkout's, after the path is set)

ENV = {**os.environ, "PYTHONPATH": ROOT}
DISKIMG = [sys.executable, "-m", "diskimg"]


def sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}: {proc.stderr.decode(errors='replace')}")


def build(directory: str, disks: int, size: int, data: int) -> list[str]:
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    sources = []
    piece = data // 4
    for number in range(disks):
        image = os.path.join(directory, f"disk{number}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", image, str(size))
        random_file = os.path.join(directory, "random.bin")
        with open(random_file, "wb") as f:
            f.write(os.urandom(piece))
        # 4 runs of data spread over the disk, from a file of random bytes (incompressible)
        raw = os.path.join(directory, "fill.raw")
        with open(raw, "wb") as f:
            f.truncate(size)
            for index in range(4):
                f.seek(index * (size // 4))
                with open(random_file, "rb") as r:
                    f.write(r.read())
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
        os.unlink(raw)
        os.unlink(random_file)
        sources.append(image)
    return sources


def plan_jobs(sources: list[str], out: str, mix: list[str]) -> list[tuple[dict, list[str]]]:
    """Each job as a plan line and as the single command that does the same: per disk, one job of
    each operation of ``mix``."""
    jobs = []
    for number, source in enumerate(sources):
        target = os.path.join(out, f"disk{number}.vhd")
        export_out = os.path.join(out, f"m{number}")
        per_disk = {
            "validate": ({"id": f"validate-{number}", "op": "validate", "image": source}, ["validate", source]),
            "convert": ({"id": f"convert-{number}", "op": "convert", "source": source, "target": target,
                         "output_format": "vhd"}, ["convert", source, target, "-O", "vhd"]),
            "export": ({"id": f"export-{number}", "op": "export", "name": f"m{number}", "system": source,
                        "out": export_out},
                       ["export", "--name", f"m{number}", "--system", source, "--out", export_out]),
        }
        jobs += [per_disk[op] for op in mix]
    return jobs


def clean(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)


def timed(argv: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1):  # validate says "no" for these bare disks: that is an answer
        sys.exit(f"failed: {' '.join(argv)}: {proc.stderr}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--disks", type=int, default=8)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--data", default="48M")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--jobs", default="1,2,4", help="parallel jobs of the batch runs, comma-separated")
    parser.add_argument("--mix", default="validate,convert,export",
                        help="the operations run on each disk, comma-separated (validate, convert, export)")
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="bench_batch.")
    os.makedirs(work, exist_ok=True)
    try:
        sources = build(work, args.disks, parse_size(args.size), parse_size(args.data))
        out = os.path.join(work, "out")
        mix = args.mix.split(",")
        jobs = plan_jobs(sources, out, mix)
        plan = os.path.join(work, "plan.jsonl")
        with open(plan, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line, _ in jobs)
        loop = os.path.join(work, "loop.sh")
        with open(loop, "w") as f:
            f.write("".join(shlex.join(DISKIMG + command) + " >/dev/null\n" for _, command in jobs))
        parallel = [int(j) for j in args.jobs.split(",")]
        times: dict[str, list[float]] = {"shell loop": []}
        moved: dict[str, list[int]] = {}
        per_op: dict[str, list[tuple[float, int]]] = {}  # op -> (seconds, bytes moved) of each job, one at a time
        journal = os.path.join(work, "journal.jsonl")
        for _ in range(args.runs):
            clean(out)
            times["shell loop"].append(timed(["bash", loop])[0])
            for j in parallel:
                clean(out)
                if os.path.exists(journal):
                    os.unlink(journal)
                seconds, stdout = timed([*DISKIMG, "batch", plan, "--jobs", str(j), "--json", "--progress", "none",
                                                "--journal", journal])
                summary = json.loads(stdout)
                times.setdefault(f"batch --jobs {j}", []).append(seconds)
                moved.setdefault(f"batch --jobs {j}", []).append(summary["read_bytes"] + summary["written_bytes"])
                if j == 1:
                    with open(journal) as f:
                        for entry in map(json.loads, f):
                            per_op.setdefault(entry["op"], []).append(
                                (entry["seconds"], entry["read_bytes"] + entry["written_bytes"]))
        print(f"{len(jobs)} jobs ({args.disks} disks of {args.size}, {args.data} data each: {', '.join(mix)}); "
              f"median of {args.runs} runs; {os.cpu_count()} cores")
        print(f"{'runner':<18}{'seconds':>9}{'jobs/s':>9}{'jobs/hour':>11}{'moved/s':>12}{'vs loop':>9}")
        loop_median = statistics.median(times["shell loop"])
        for name, values in times.items():
            median = statistics.median(values)
            rate = f"{format_size(int(statistics.median(moved[name]) / median))}" if name in moved else "-"
            print(f"{name:<18}{median:>9.2f}{len(jobs) / median:>9.2f}{3600 * len(jobs) / median:>11.0f}"
                  f"{rate:>12}{loop_median / median:>8.2f}x")
        if per_op:
            print("one job at a time (batch --jobs 1), per job: median seconds, median bytes moved (read + written)")
            for op, figures in per_op.items():
                print(f"  {op:<10}{statistics.median(f[0] for f in figures):>8.2f} s"
                      f"{format_size(int(statistics.median(f[1] for f in figures))):>12}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
