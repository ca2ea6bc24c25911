#!/usr/bin/env python3
"""Benchmarks diskimg side by side with qemu-img, in one run, as ratios.

    python scripts/bench.py read [--size 4G] [--pairs 7] [--dir DIR]
    python scripts/bench.py convert [--size 4G] [--pairs 7] [--dir DIR] [--only NAME]
                                    [--disk synthetic|ext4] [--image PATH] [--target fresh|existing]

`read` builds a RAW disk of SIZE holding half random data in 1-4 MiB runs (half zeros), converts it
with qemu-img to qcow2, a dynamic VHD, VMDK (monolithicSparse, streamOptimized), VHDX and a dynamic
VDI, then times ``diskimg convert IMG out.raw`` against ``qemu-img convert -f FMT -O raw IMG out.raw``
alternately (median of PAIRS pairs: these machines are noisy) and prints the median time ratio and each
tool's peak RSS.

`convert` times the conversions of CONVERSIONS the same way, on the synthetic disk and on an ext4
filled with files from /usr (or on the images given with --image), each into a fresh path and over
an existing output (replacing a file has costs of its own: see diskimg/outputs.py).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].lower() in units else int(text)


def make_half_random_raw(path: str, size: int, seed: int = 1234) -> int:
    """A fully written file (no holes): runs of 1-4 MiB at MiB offsets, half random, half zeros."""
    rng = random.Random(seed)
    data_bytes = 0
    with open(path, "wb") as f:
        position = 0
        while position < size:
            run = min(rng.randint(1, 4) * MiB, size - position)
            if rng.random() < 0.5:
                f.write(rng.randbytes(run))
                data_bytes += run
            else:
                f.write(bytes(run))
            position += run
    return data_bytes


def copy_files(target: str, budget: int) -> int:
    """Copy regular files from /usr into ``target`` until ``budget`` bytes; returns the bytes copied."""
    copied = 0
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if copied + size > budget:
                continue
            destination = os.path.join(target, os.path.relpath(path, "/usr"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            try:
                shutil.copyfile(path, destination)
            except OSError:
                continue
            copied += size
            if copied >= budget * 0.99:
                return copied
    return copied


def make_ext4_disk(path: str, size: int, files: int) -> int:
    """A sparse RAW disk of ``size`` holding an ext4 made by ``mkfs.ext4 -d`` from ``files`` bytes of
    regular files copied from /usr (a system disk's mix of small and large files); returns the bytes copied."""
    staging = path + ".files"
    os.mkdir(staging)
    try:
        copied = copy_files(staging, files)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", staging, path, str(size // 1024) + "k"], check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(staging)
    return copied


def prime_memory(directory: str, size: int) -> None:
    """Write and delete ``size`` bytes, so that the next command writes into memory just used.

    On these virtual machines memory the guest frees goes back to the host within seconds, and the
    first touch of it costs a host page fault: without this, whichever tool starts later after the
    previous output was deleted (a Python program starts later than a C one) writes into cold memory
    and runs up to 5x slower, which measures the host rather than the tools. Both tools get the same.
    """
    path = os.path.join(directory, "prime.tmp")
    block = bytes(4 * MiB)
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(block))):
            f.write(block)
    os.unlink(path)


def timed(argv: list[str], prime: tuple[str, int] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run of a command.

    Memory is primed (see ``prime_memory``), then dirty pages are flushed, so that no run pays for
    another's writeback (the largest source of noise when converting gigabytes through the page cache).
    """
    if prime is not None:
        prime_memory(*prime)
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}: {proc.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss


def pair(name: str, ours: list[str], theirs: list[str], pairs: int, cleanup: list[str],
         prime: tuple[str, int] | None = None, existing: bool = False) -> None:
    """Time ``ours`` and ``theirs`` alternately, ``pairs`` times each. The outputs in ``cleanup``
    are deleted before each run (a fresh target), or with ``existing`` left in place, so that each
    run replaces the other tool's finished output (``ours`` must then be allowed to replace it)."""
    ratios, our_times, their_times, our_rss, their_rss = [], [], [], [], []
    if existing:
        timed(theirs)  # the first target to replace
    for _ in range(pairs):
        for path in cleanup:
            if os.path.exists(path) and not existing:
                os.unlink(path)
        a, a_rss = timed(ours, prime)
        for path in cleanup:
            if not existing:
                os.unlink(path)
        b, b_rss = timed(theirs, prime)
        ratios.append(a / b)
        our_times.append(a)
        their_times.append(b)
        our_rss.append(a_rss)
        their_rss.append(b_rss)
    for path in cleanup:
        if os.path.exists(path):
            os.unlink(path)
    print(
        f"{name:<28} diskimg {statistics.median(our_times):6.2f} s  qemu-img {statistics.median(their_times):6.2f} s  "
        f"ratio {statistics.median(ratios):4.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})  "
        f"peak RSS diskimg {max(our_rss) / 1024:5.1f} MiB, qemu-img {max(their_rss) / 1024:5.1f} MiB",
        flush=True,
    )


def compile_package() -> None:
    """Byte-compile diskimg as ``pip install`` does: where PYTHONDONTWRITEBYTECODE is set (as on
    these machines) every run would otherwise compile its sources again, about 0.15 s."""
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diskimg")
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)


def bench_read(args: argparse.Namespace) -> None:
    diskimg = [sys.executable, "-m", "diskimg"]
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        raw = os.path.join(work, "disk.raw")
        data = make_half_random_raw(raw, args.size)
        print(f"source: {args.size / (1 << 30):.1f} GiB RAW, {data / (1 << 30):.2f} GiB random data; "
              f"{args.pairs} alternating pairs, median ratio diskimg/qemu-img (below 1: diskimg faster)")
        images = {"qcow2": os.path.join(work, "disk.qcow2"), "vpc": os.path.join(work, "disk.vhd"),
                  "vdi": os.path.join(work, "disk.vdi")}
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, images["qcow2"]], check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vdi", raw, images["vdi"]], check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, images["vpc"]],
                       check=True)
        images["vhdx"] = os.path.join(work, "disk.vhdx")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", raw, images["vhdx"]], check=True)
        vmdk = {"monolithicSparse": os.path.join(work, "sparse.vmdk"), "streamOptimized": os.path.join(work, "s.vmdk")}
        for subformat, image in vmdk.items():
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw,
                            image], check=True)
        os.unlink(raw)
        out = os.path.join(work, "out.raw")
        for name, image in [*images.items(), *vmdk.items()]:
            fmt = "vmdk" if name in vmdk else name
            pair(f"{name} -> raw", [*diskimg, "convert", "-f", fmt, "-O", "raw", image, out],
                 ["qemu-img", "convert", "-f", fmt, "-O", "raw", image, out], args.pairs, [out], (work, args.size))


CONVERSIONS = {
    # name: (source, diskimg arguments, qemu-img arguments), the output file last in both
    "raw->qcow2": ("raw", ["-f", "raw", "-O", "qcow2"], ["-f", "raw", "-O", "qcow2"]),
    "qcow2->raw": ("qcow2", ["-f", "qcow2", "-O", "raw"], ["-f", "qcow2", "-O", "raw"]),
    "qcow2->vhd": ("qcow2", ["-f", "qcow2", "-O", "vhd"], ["-f", "qcow2", "-O", "vpc", "-o", "force_size=on"]),
    "vhd->qcow2": ("vhd", ["-f", "vhd", "-O", "qcow2"], ["-f", "vpc", "-O", "qcow2"]),
    "raw->fixed vhd": ("raw", ["-f", "raw", "-O", "vhd", "-o", "subformat=fixed"],
                       ["-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
    "raw->qcow2 -c": ("raw", ["-f", "raw", "-O", "qcow2", "-c"], ["-f", "raw", "-O", "qcow2", "-c"]),
    "vdi->qcow2": ("vdi", ["-f", "vdi", "-O", "qcow2"], ["-f", "vdi", "-O", "qcow2"]),
    "raw->vdi": ("raw", ["-f", "raw", "-O", "vdi"], ["-f", "raw", "-O", "vdi"]),
    "vhdx->qcow2": ("vhdx", ["-f", "vhdx", "-O", "qcow2"], ["-f", "vhdx", "-O", "qcow2"]),
    "raw->vhdx": ("raw", ["-f", "raw", "-O", "vhdx"], ["-f", "raw", "-O", "vhdx"]),
    "raw->vmdk streamOptimized": ("raw", ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"],
                                  ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]),
}


def build_disks(work: str, args: argparse.Namespace) -> Iterator[tuple[str, dict[str, str], int]]:
    """For each disk asked for, in turn: (its description, the same disk as RAW, qcow2, dynamic VHD,
    VDI and VHDX made by qemu-img, the bytes it holds); each is deleted before the next is built."""
    kinds = [("image", path) for path in args.image or []] + [(kind, None) for kind in args.disk or []]
    for kind, image in kinds or [("synthetic", None), ("ext4", None)]:
        sources = {"raw": os.path.join(work, "disk.raw"), "qcow2": os.path.join(work, "disk.qcow2"),
                   "vhd": os.path.join(work, "disk.vhd"), "vdi": os.path.join(work, "disk.vdi"),
                   "vhdx": os.path.join(work, "disk.vhdx")}
        if kind == "synthetic":
            data = make_half_random_raw(sources["raw"], args.size)
            description = (f"synthetic: {args.size / (1 << 30):.1f} GiB RAW (fully written), "
                           f"{data / (1 << 30):.2f} GiB random data in 1-4 MiB runs")
        elif kind == "ext4":
            copied = make_ext4_disk(sources["raw"], args.size, args.files)
            data = os.stat(sources["raw"]).st_blocks * 512
            description = (f"ext4: {args.size / (1 << 30):.1f} GiB RAW, an ext4 holding {copied / (1 << 20):.0f} MiB "
                           f"of files from /usr ({data / (1 << 20):.0f} MiB allocated)")
        else:
            subprocess.run(["qemu-img", "convert", "-O", "raw", image, sources["raw"]], check=True)
            data = os.stat(sources["raw"]).st_blocks * 512
            description = (f"{image}: {os.path.getsize(sources['raw']) / (1 << 30):.1f} GiB, "
                           f"{data / (1 << 20):.0f} MiB allocated")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", sources["raw"], sources["qcow2"]],
                       check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", sources["raw"],
                        sources["vhd"]], check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vdi", sources["raw"], sources["vdi"]], check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", sources["raw"], sources["vhdx"]], check=True)
        try:
            yield description, sources, data
        finally:
            for path in sources.values():
                os.unlink(path)


def bench_convert(args: argparse.Namespace) -> None:
    diskimg = [sys.executable, "-m", "diskimg", "convert", "--no-progress", "--force"]
    targets = args.target or ["fresh", "existing"]
    print(f"{args.pairs} alternating pairs, median ratio diskimg/qemu-img (below 1: diskimg faster); targets: "
          + ", ".join(targets) + " (existing: each run replaces the other tool's finished output)")
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        for description, sources, data in build_disks(work, args):
            print(f"source {description}", flush=True)
            out = os.path.join(work, "out.img")
            for name, (source, ours, theirs) in CONVERSIONS.items():
                if args.only and name not in args.only:
                    continue
                for target in targets:
                    pair(f"{name} ({target})", [*diskimg, *ours, sources[source], out],
                         ["qemu-img", "convert", *theirs, sources[source], out], args.pairs, [out],
                         (work, data), existing=target == "existing")
            if os.path.exists(out):
                os.unlink(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    read = sub.add_parser("read", help="read qcow2, dynamic VHD and VDI (convert to raw) vs qemu-img")
    read.add_argument("--size", type=parse_size, default=4 << 30)
    read.add_argument("--pairs", type=int, default=7)
    read.add_argument("--dir", default=None, help="work directory (needs about 3x SIZE free)")
    read.set_defaults(run=bench_read)
    convert = sub.add_parser("convert", help="the conversions of the converter issue vs qemu-img convert")
    convert.add_argument("--size", type=parse_size, default=4 << 30)
    convert.add_argument("--pairs", type=int, default=7)
    convert.add_argument("--dir", default=None, help="work directory (needs about 4x SIZE free)")
    convert.add_argument("--only", action="append", help="run only this conversion (repeatable)")
    convert.add_argument("--disk", action="append", choices=["synthetic", "ext4"],
                         help="a disk to build (repeatable; default: both, unless --image is given): half random "
                              "data, or an ext4 of files copied from /usr (a system disk's layout)")
    convert.add_argument("--image", action="append", metavar="PATH",
                         help="also bench this image (any format qemu-img reads, e.g. a real system disk; repeatable)")
    convert.add_argument("--files", type=parse_size, default=1200 << 20, help="bytes of files in the ext4 disk")
    convert.add_argument("--target", action="append", choices=["fresh", "existing"],
                         help="output path absent before each run, or holding the previous output (default: both)")
    convert.set_defaults(run=bench_convert)
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img is needed (apt-get install qemu-utils)")
    compile_package()
    args.run(args)


if __name__ == "__main__":
    main()
