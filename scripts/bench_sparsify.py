#!/usr/bin/env python3
"""Benchmarks ``diskimg convert --sparsify -O qcow2`` against ``qemu-img convert -O qcow2``: time and size.

    sudo python scripts/bench_sparsify.py [--size 1G] [--pairs 7] [--dir DIR] [--keep]

Builds a GPT disk of SIZE whose one ext4 partition had files written and then deleted, as a used disk
has: mkfs.ext4, loop-mounted (root is needed), filled with files copied from /usr and with random data
(incompressible, as media and archives are) to about 80 % of the file system, then most of the random
files deleted, unmounted, and the partition placed in the disk. The deleted files' blocks still hold
their data: qemu-img copies them, ``--sparsify`` leaves them out.

Then, alternately (median of PAIRS pairs: these machines are noisy), it times
``diskimg convert --sparsify -O qcow2``, ``qemu-img convert -O qcow2`` and ``diskimg convert -O qcow2``
(without --sparsify), and prints each one's time and output size (file size and blocks allocated) side
by side, with the file system's used blocks from ``dumpe2fs`` (block count less free blocks: data and
metadata, journal included) times the block size. The claim checked: the sparsified qcow2 is no larger
than the used blocks plus the qcow2's own metadata, within 2 %. ``virt-sparsify --convert qcow2`` is
timed too when it is installed (libguestfs boots an appliance: it needs KVM or is very slow).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import copy_files  # scripts/ is on the path when a script runs

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].lower() in units else int(text)


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), check=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def build_disk(work: str, size: int) -> tuple[str, int, int]:
    """The disk (a RAW file), its partition's offset and length."""
    disk = os.path.join(work, "used.raw")
    with open(disk, "wb") as f:
        f.truncate(size)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk, input=b"label: gpt\nstart=2048, type=linux\n")
    (partition_entry,) = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]["partitions"]
    offset, length = partition_entry["start"] * 512, partition_entry["size"] * 512
    partition = os.path.join(work, "root.ext4")
    with open(partition, "wb") as f:
        f.truncate(length)
    run("mkfs.ext4", "-q", "-F", partition)
    mount = os.path.join(work, "mnt")
    os.mkdir(mount)
    run("mount", "-o", "loop", partition, mount)
    try:
        copied = copy_files(os.path.join(mount, "usr"), length // 8)
        rng = random.Random(17)
        budget = int(length * 0.8) - copied
        written = []
        number = 0
        while budget > 0:
            piece = min(budget, rng.randint(4, 64) * MiB)
            name = os.path.join(mount, f"media-{number:04d}.bin")
            with open(name, "wb") as f:
                for _ in range(0, piece, MiB):
                    f.write(os.urandom(MiB))
            written.append(name)
            budget -= piece
            number += 1
        os.sync()
        for name in written[: len(written) * 3 // 4]:  # most of it deleted, as a used disk has it
            os.unlink(name)
        os.sync()
    finally:
        run("umount", mount)
    run("dd", f"if={partition}", f"of={disk}", "bs=4M", "oflag=seek_bytes", f"seek={offset}", "conv=notrunc",
        "status=none")
    os.unlink(partition)
    return disk, offset, length


def used_bytes(disk: str, offset: int, length: int, work: str) -> tuple[int, int]:
    """(used blocks x block size, free blocks x block size) as dumpe2fs reads the partition."""
    partition = os.path.join(work, "copy.ext4")
    run("dd", f"if={disk}", f"of={partition}", "bs=4M", "iflag=skip_bytes,count_bytes", f"skip={offset}",
        f"count={length}", "conv=sparse", "status=none")
    header = run("dumpe2fs", "-h", partition).stdout.decode()
    os.unlink(partition)
    fields = dict(re.findall(r"^([^:\n]+):\s+(.*)$", header, re.MULTILINE))
    block = int(fields["Block size"])
    total, free = int(fields["Block count"]), int(fields["Free blocks"])
    return (total - free) * block, free * block


def timed(command: list[str], target: str) -> tuple[float, int, int]:
    """Seconds, file size and bytes allocated of one run writing ``target``."""
    if os.path.exists(target):
        os.unlink(target)
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    info = os.stat(target)
    return seconds, info.st_size, info.st_blocks * 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--dir", help="Where the disk and outputs go (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the folder.")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the disk is built on a loop-mounted ext4: run as root")
    work = tempfile.mkdtemp(prefix="bench-sparsify-", dir=args.dir)
    try:
        size = parse_size(args.size)
        started = time.monotonic()
        disk, offset, length = build_disk(work, size)
        used, free = used_bytes(disk, offset, length, work)
        print(f"disk: {size / MiB:.0f} MiB GPT, ext4 of {length / MiB:.0f} MiB with files written then mostly "
              f"deleted (built in {time.monotonic() - started:.1f} s)")
        print(f"dumpe2fs: used blocks x block size = {used / MiB:.1f} MiB (data and metadata), free "
              f"{free / MiB:.1f} MiB")
        env_python = [sys.executable, "-m", "diskimg"]
        os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        commands = {
            "diskimg --sparsify": ([*env_python, "convert", "--sparsify", "-O", "qcow2", disk, "OUT"], "sparse.qcow2"),
            "qemu-img convert": (["qemu-img", "convert", "-O", "qcow2", disk, "OUT"], "qemu.qcow2"),
            "diskimg (no --sparsify)": ([*env_python, "convert", "-O", "qcow2", disk, "OUT"], "plain.qcow2"),
        }
        if shutil.which("virt-sparsify"):
            commands["virt-sparsify --convert qcow2"] = (
                ["virt-sparsify", "--quiet", "--convert", "qcow2", disk, "OUT"], "virt.qcow2")
        results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in commands}
        for _ in range(args.pairs):
            for name, (command, output) in commands.items():
                target = os.path.join(work, output)
                results[name].append(timed([target if part == "OUT" else part for part in command], target))
        print(f"\nmedian of {args.pairs} alternating runs:")
        print(f"{'':32} {'seconds':>8} {'file MiB':>9} {'allocated MiB':>14} {'vs used blocks':>15}")
        for name, runs in results.items():
            seconds = statistics.median(r[0] for r in runs)
            file_size, allocated = runs[-1][1], runs[-1][2]
            print(f"{name:32} {seconds:8.2f} {file_size / MiB:9.1f} {allocated / MiB:14.1f} "
                  f"{file_size / used:14.3f}x")
        if "virt-sparsify --convert qcow2" not in results:
            print("virt-sparsify: not installed here (libguestfs absent): not compared")
        # the qcow2's own metadata for the used blocks: what qemu-img measure says a qcow2 of a disk holding only
        # those blocks takes beyond them (L1, L2 and refcount tables, the header)
        measured = run("qemu-img", "measure", "-O", "qcow2", "--size", str(size)).stdout.decode()
        fully = int(re.search(r"fully allocated size: (\d+)", measured).group(1))  # type: ignore[union-attr]
        metadata = fully - size
        sparse_size = results["diskimg --sparsify"][-1][1]
        limit = (used + metadata) * 1.02
        verdict = "holds" if sparse_size <= limit else "does NOT hold"
        print(f"\nclaim: sparsified qcow2 {sparse_size / MiB:.1f} MiB <= (used blocks {used / MiB:.1f} MiB + qcow2 "
              f"metadata at most {metadata / MiB:.1f} MiB) x 1.02 = {limit / MiB:.1f} MiB: {verdict}")
        sparse_time = statistics.median(r[0] for r in results["diskimg --sparsify"])
        plain_time = statistics.median(r[0] for r in results["diskimg (no --sparsify)"])
        qemu_time = statistics.median(r[0] for r in results["qemu-img convert"])
        print(f"time: --sparsify / without = {sparse_time / plain_time:.2f}; --sparsify / qemu-img = "
              f"{sparse_time / qemu_time:.2f}")
    finally:
        if args.keep:
            print(f"kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
