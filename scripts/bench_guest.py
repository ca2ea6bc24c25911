#!/usr/bin/env python3
"""How long ``diskimg validate`` takes with guest inspection on a large Linux system disk.

    python scripts/bench_guest.py [--size 40G] [--runs 7] [--files 20000] [--dir DIR] [--keep]

Builds a CentOS 8-shaped system disk the way an installer leaves one: a sparse RAW file of SIZE with
an MBR (sfdisk), GRUB boot code, and an ext4 root file system on the whole partition made by
``mkfs.ext4 -d`` from a tree holding the BLS boot entries, grubenv, kernel config, modules, a
dracut-style initramfs (early microcode cpio + gzip'ed main cpio of about 60 MiB, made with cpio and
gzip), cloud-init and FILES more files under /usr/share/doc; then ``qemu-img convert -O qcow2``.
Times, median of RUNS runs each: ``diskimg validate disk.qcow2`` as a command (Python start-up
included) and ``diskimg.validate()`` in-process. The target (issue 6) is under 10 seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_validate import sh, time_validate  # noqa: E402  (the helpers of the validate benchmark)

from diskimg.units import parse_size  # noqa: E402
from tests.support.disks import write_boot_code  # noqa: E402
from tests.support.guests import RHEL_KERNEL, initramfs, new_uuid, rhel_tree, write_tree  # noqa: E402

MiB = 1 << 20


def populate(tree_dir: Path, files: int, seed: int = 7) -> None:
    """FILES documentation-like files, 50 to a directory, so the root has a real system's bulk."""
    rng = random.Random(seed)
    for index in range(files):
        directory = tree_dir / "usr/share/doc" / f"package-{index // 50:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"file-{index}.txt").write_bytes(b"documentation line\n" * rng.randint(1, 200))


def build(directory: Path, size: int, files: int) -> Path:
    for tool in ("sfdisk", "mkfs.ext4", "qemu-img", "cpio", "gzip"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    root_uuid = new_uuid()
    tree = rhel_tree(directory, root_uuid)
    # 60 MiB of modules (half random, half zeros), as big as a real dracut image
    big = {f"/usr/lib/modules/{RHEL_KERNEL}/kernel/drivers/misc/big{i}.ko": os.urandom(MiB) + bytes(MiB)
           for i in range(30)}
    tree[f"/boot/initramfs-{RHEL_KERNEL}.img"] = initramfs(directory, {
        **big, f"/usr/lib/modules/{RHEL_KERNEL}/kernel/drivers/block/virtio_blk.ko.xz": b"m",
        f"/usr/lib/modules/{RHEL_KERNEL}/kernel/drivers/virtio/virtio_pci.ko.xz": b"m",
        f"/usr/lib/modules/{RHEL_KERNEL}/kernel/drivers/net/virtio_net.ko.xz": b"m"}, "gzip", early=True)
    tree_dir = write_tree(directory / "tree", tree)
    populate(tree_dir, files)
    raw = directory / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(raw), input=b"label: dos\nstart=2048, type=83, bootable\n")
    write_boot_code(raw)  # GRUB's BIOS chain, as the test disks have it
    root_start = MiB
    blocks = (size - root_start) // 4096
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-U", root_uuid, "-d", str(tree_dir), "-E",
       f"offset={root_start},lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(raw), str(blocks))
    image = directory / "disk.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", str(raw), str(image))
    raw.unlink()
    shutil.rmtree(tree_dir)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="40G")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--dir", default=None, help="where to build the image (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the image")
    args = parser.parse_args()
    size = parse_size(args.size)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench-guest-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        image = build(directory, size, args.files)
        print(f"built {image}: virtual {size / (1 << 30):.0f} GiB, file {image.stat().st_size / MiB:.1f} MiB "
              f"in {time.perf_counter() - started:.1f} s")

        import diskimg

        report = diskimg.validate(image)
        guest = report.facts.guest or {}
        details = guest.get("details") or {}
        print(f"guest: {guest.get('product')} ({guest.get('architecture')}), kernel {details.get('default_kernel')}, "
              f"initramfs entries {(details.get('initramfs') or {}).get('entries')}, "
              f"boot drivers {details.get('boot_drivers')}")
        print(f"verdict: {'importable' if report.importable else 'NOT importable'}; findings: "
              + ", ".join(f"{f.code} ({f.severity.value})" for f in report.findings))
        cli, api = time_validate(str(image), args.runs)
        print(f"diskimg validate with guest inspection (command, median of {args.runs}): "
              f"{statistics.median(cli):.3f} s (min {min(cli):.3f}, max {max(cli):.3f}; target < 10 s)")
        print(f"diskimg.validate() (in-process, median of {args.runs}): {statistics.median(api):.3f} s")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
