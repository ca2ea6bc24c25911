#!/usr/bin/env python3
"""Benchmarks ``diskimg export`` beside the usual pipeline, in one run, as ratios.

    python scripts/bench_export.py [--size 2G] [--files 512M] [--pairs 7] [--dir DIR]

Builds a RAW system disk of SIZE (sparse) holding an ext4 file system made by ``mkfs.ext4 -d`` from
a copy of FILES of regular files taken from /usr, then times, alternately,

    diskimg export --name bench --system disk.raw --out OUT --force     (NAME_system.raw.tar.gz)
    tar -S -cf - disk.raw | pigz > disk.raw.tar.gz

and prints the median time ratio (below 1: diskimg faster), the size ratio of the two archives and
the peak RSS of each. Targets (issue 5): time at most 0.8x, size at most 1.10x.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import compile_package, make_ext4_disk, parse_size, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="virtual size of the RAW disk")
    parser.add_argument("--files", type=parse_size, default=512 << 20, help="bytes of files from /usr in it")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--dir", default=None, help="work directory")
    args = parser.parse_args()
    for tool in ("mkfs.ext4", "pigz", "tar"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    compile_package()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        raw = os.path.join(work, "disk.raw")
        copied = make_ext4_disk(raw, args.size, args.files)
        allocated = os.stat(raw).st_blocks * 512
        print(f"source: {args.size / (1 << 30):.1f} GiB RAW with ext4 holding {copied / (1 << 20):.0f} MiB of files "
              f"from /usr ({allocated / (1 << 20):.0f} MiB allocated); {args.pairs} alternating pairs", flush=True)
        out = os.path.join(work, "out")
        os.mkdir(out)
        ours = [sys.executable, "-m", "diskimg", "export", "--name", "bench", "--system", raw, "--out", out,
                "--force", "--progress", "none"]
        pipeline_archive = os.path.join(work, "disk.raw.tar.gz")
        theirs = ["bash", "-o", "pipefail", "-c",
                  f"tar -S -cf - -C {shlex.quote(work)} disk.raw | pigz > {shlex.quote(pipeline_archive)}"]
        ratios, our_times, their_times, our_rss, their_rss = [], [], [], [], []
        for _ in range(args.pairs):
            a, a_rss = timed(ours)
            b, b_rss = timed(theirs)
            ratios.append(a / b)
            our_times.append(a)
            their_times.append(b)
            our_rss.append(a_rss)
            their_rss.append(b_rss)
        our_size = os.path.getsize(os.path.join(out, "bench_system.raw.tar.gz"))
        their_size = os.path.getsize(pipeline_archive)
        print(f"diskimg export      median {statistics.median(our_times):6.2f} s  {our_size:>12} bytes  "
              f"peak RSS {max(our_rss) / 1024:6.1f} MiB")
        print(f"tar -S | pigz       median {statistics.median(their_times):6.2f} s  {their_size:>12} bytes  "
              f"peak RSS {max(their_rss) / 1024:6.1f} MiB")
        print(f"time ratio {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
              f"size ratio {our_size / their_size:.3f}")


if __name__ == "__main__":
    main()
