#!/usr/bin/env python3
"""How long ``diskimg validate`` takes on a large disk, and ``diskimg check`` beside ``qemu-img check``.

    python scripts/bench_validate.py [--size 40G] [--runs 7] [--dir DIR] [--keep]

Builds the disk the way a user's would be made: a sparse RAW file of SIZE with a GPT (sgdisk), a
100 MiB ESP (FAT32, EFI/BOOT/BOOTX64.EFI copied in with mtools) and an ext4 root file system on the
rest (mkfs.ext4 -E offset=...), plus 256 MiB of data written into the root partition, converted
with ``qemu-img convert -O qcow2 -o cluster_size=64k``. Then times, median of RUNS runs each:

* ``diskimg validate disk.qcow2`` as a command (Python start-up included),
* ``diskimg.validate()`` in-process,
* ``diskimg check disk.qcow2`` against ``qemu-img check disk.qcow2`` (alternating, as a ratio).

Validation reads metadata, tables and superblocks only, so its time should not grow with SIZE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from diskimg.units import parse_size  # noqa: E402  (the checkout's, after the path is set)

MiB = 1 << 20


def sh(*argv: str, input: bytes | None = None) -> None:
    proc = subprocess.run(argv, input=input, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}: {proc.stderr.decode(errors='replace')}")


def build(directory: str, size: int) -> str:
    for tool in ("sgdisk", "mkfs.ext4", "mkfs.fat", "mcopy", "mmd", "qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    raw = os.path.join(directory, "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    sh("sgdisk", "-n1:2048:+100M", "-t1:ef00", "-n2:0:0", "-t2:8300", raw)
    esp = os.path.join(directory, "esp.img")
    with open(esp, "wb") as f:
        f.truncate(100 * MiB)
    sh("mkfs.fat", "-F", "32", "-n", "ESP", esp)
    loader = os.path.join(directory, "BOOTX64.EFI")
    with open(loader, "wb") as f:
        f.write(b"MZ" + bytes(4094))
    sh("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT")
    sh("mcopy", "-i", esp, loader, "::/EFI/BOOT/BOOTX64.EFI")
    sh("dd", f"if={esp}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    root_start = 101 * MiB
    root_blocks = (size - root_start - 34 * 512) // 4096
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "root", "-E",
       f"offset={root_start},lazy_itable_init=1,lazy_journal_init=1,nodiscard", raw, str(root_blocks))
    image = os.path.join(directory, "disk.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", raw, image)
    os.unlink(raw)
    os.unlink(esp)
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {root_start + 1024 * MiB} 256M", image)
    return image


def run_once(argv: list[str], ok: tuple[int, ...] = (0, 1)) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    elapsed = time.perf_counter() - started
    if proc.returncode not in ok:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}: {proc.stderr.decode(errors='replace')}")
    return elapsed


def time_validate(image: str, runs: int) -> tuple[list[float], list[float]]:
    """Seconds of ``runs`` runs of ``diskimg validate IMAGE`` as a command (this checkout's package),
    then of ``diskimg.validate(image)`` in this process."""
    import diskimg

    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")
    cli = [run_once([sys.executable, "-m", "diskimg", "validate", image]) for _ in range(runs)]
    api = []
    for _ in range(runs):
        started = time.perf_counter()
        diskimg.validate(image)
        api.append(time.perf_counter() - started)
    return cli, api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="40G")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to build the image (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the image")
    args = parser.parse_args()
    size = parse_size(args.size)
    directory = args.dir or tempfile.mkdtemp(prefix="bench-validate-")
    os.makedirs(directory, exist_ok=True)
    try:
        started = time.perf_counter()
        image = build(directory, size)
        print(f"built {image}: virtual {size / (1 << 30):.0f} GiB, file {os.path.getsize(image) / MiB:.1f} MiB "
              f"in {time.perf_counter() - started:.1f} s")

        import diskimg

        report = diskimg.validate(image)
        print(f"verdict: {'importable' if report.importable else 'NOT importable'}; findings: "
              + ", ".join(f"{f.code} ({f.severity.value})" for f in report.findings))

        cli, api = time_validate(image, args.runs)
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(run_once([sys.executable, "-m", "diskimg", "check", image]))
            theirs.append(run_once(["qemu-img", "check", image], ok=(0,)))
        print(f"diskimg validate (command, median of {args.runs}): {statistics.median(cli):.3f} s")
        print(f"diskimg.validate() (in-process, median of {args.runs}): {statistics.median(api):.3f} s")
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"diskimg check {statistics.median(ours):.3f} s vs qemu-img check {statistics.median(theirs):.3f} s "
              f"(median of {args.runs}; ratio {ratio:.2f})")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
