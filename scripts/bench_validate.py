#!/usr/bin/env python3
"""How long ``diskimg validate`` takes on a large disk, and ``diskimg check`` beside ``qemu-img check``.

    python scripts/bench_validate.py [--size 40G] [--runs 7] [--dir DIR] [--keep] [--stack]

Builds the disk the way a user's would be made: a sparse RAW file of SIZE with a GPT (sgdisk), a
100 MiB ESP (FAT32, EFI/BOOT/BOOTX64.EFI copied in with mtools) and an ext4 root file system on the
rest (mkfs.ext4 -E offset=...), plus 256 MiB of data written into the root partition, converted
with ``qemu-img convert -O qcow2 -o cluster_size=64k``. Then times, median of RUNS runs each:

* ``diskimg validate disk.qcow2`` as a command (Python start-up included),
* ``diskimg.validate()`` in-process,
* ``diskimg check disk.qcow2`` against ``qemu-img check disk.qcow2`` (alternating, as a ratio).

Validation reads metadata, tables and superblocks only, so its time should not grow with SIZE.

With ``--stack`` (root, LVM2 and btrfs-progs needed: the volumes are made on loop devices) it builds
instead the same CentOS guest (the tests' builder tree) as the root of three sparse disks of SIZE: on
a partition (mkfs.ext4 -d), on an LVM2 logical volume filling a physical volume (pvcreate/vgcreate/
lvcreate on a loop device, the ext4 written at the LV's extents), and on btrfs as snapper lays it out
(the root in the default subvolume @/.snapshots/1/snapshot beside SNAPSHOTS read-only snapshots, made
by the kernel on a loop mount), each converted to qcow2. It reports, per disk, ``diskimg.validate()``
in-process and ``diskimg validate`` as a command (median of RUNS runs each), what the stack adds to
the partition's time, and the peak memory of one validation in a child process: getrusage's
ru_maxrss (which counts the parent's peak too when that is higher) and the child's own VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _loop(image: Path, offset: int) -> str:
    proc = subprocess.run(["losetup", "-f", "--show", "-o", str(offset), str(image)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"losetup: {proc.stderr}")
    return proc.stdout.strip()


def _partitioned(path: Path, size: int, kind: str) -> Path:
    """A sparse RAW disk of ``size`` with one MBR partition of ``kind`` from 1 MiB to the end, and GRUB's boot code."""
    from tests.support.disks import write_boot_code

    with open(path, "wb") as f:
        f.truncate(size)
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path),
       input=f"label: dos\nstart=2048, type={kind}, bootable\n".encode())
    write_boot_code(path)
    return path


def build_stacks(directory: Path, size: int, snapshots: int) -> dict[str, str]:
    """The CentOS guest as the root of three disks of ``size``: on a partition, on LVM2, on btrfs (snapper's
    layout); name -> the qcow2 image."""
    for tool in ("sfdisk", "mkfs.ext4", "mkfs.btrfs", "btrfs", "losetup", "mount", "pvcreate", "qemu-img", "cpio"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    from tests.support.guests import new_uuid, rhel_tree, write_tree
    from tests.support.lvm import EXTENT, LoopLvm

    uuid = new_uuid()
    tree = rhel_tree(directory, uuid)
    tree_dir = write_tree(directory / "tree", tree)
    start = MiB
    raws = {"partition": _partitioned(directory / "partition.raw", size, "83")}
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-U", uuid, "-d", str(tree_dir), "-E",
       f"offset={start},lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(raws["partition"]),
       str((size - start) // 4096))

    raws["lvm"] = _partitioned(directory / "lvm.raw", size, "8e")
    tools = LoopLvm(directory)
    try:
        device = tools.attach(raws["lvm"], start)
        vg = f"bench-{os.getpid()}"
        tools("pvcreate", "-q", device)
        tools("vgcreate", "-q", vg, device)
        tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-l", "100%FREE", "-n", "root", vg)
        (pv,) = tools.report("pvs", "pe_start", device)
        (lv,) = tools.report("lvs", "lv_size,seg_pe_ranges", f"{vg}/root")
        first = int(lv["seg_pe_ranges"].split(":")[1].split("-")[0])
        at = start + int(pv["pe_start"]) + first * EXTENT
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-U", uuid, "-d", str(tree_dir), "-E",
           f"offset={at},lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(raws["lvm"]),
           str(int(lv["lv_size"]) // 4096))
    finally:
        tools.close()

    raws["btrfs"] = _partitioned(directory / "btrfs.raw", size, "83")
    tree["/etc/fstab"] = str(tree["/etc/fstab"]).replace(" ext4 ", " btrfs ")
    device = _loop(raws["btrfs"], start)
    mount = directory / "mnt"
    mount.mkdir()
    try:
        sh("mkfs.btrfs", "-q", "-f", "-U", uuid, device)
        sh("mount", device, str(mount))
        try:
            for name in ("@", "@/.snapshots", "@/home", "@/var"):
                sh("btrfs", "subvolume", "create", str(mount / name))
            root = mount / "@/.snapshots/1/snapshot"
            (mount / "@/.snapshots/1").mkdir()
            sh("btrfs", "subvolume", "create", str(root))
            write_tree(root, tree)
            for number in range(2, snapshots + 2):
                (mount / f"@/.snapshots/{number}").mkdir()
                sh("btrfs", "subvolume", "snapshot", "-r", str(root), str(mount / f"@/.snapshots/{number}/snapshot"))
            sh("btrfs", "subvolume", "set-default", str(root))
        finally:
            sh("umount", str(mount))
    finally:
        sh("losetup", "-d", device)
    images = {}
    for name, raw in raws.items():
        images[name] = str(directory / f"{name}.qcow2")
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", str(raw), images[name])
        raw.unlink()
    shutil.rmtree(tree_dir)
    return images


_PEAK = """import json, re, resource, sys, diskimg
report = diskimg.validate(sys.argv[1])
status = open("/proc/self/status").read()
print(json.dumps({"root": (report.facts.guest or {}).get("root"), "findings": [f.code for f in report.findings],
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "vmhwm_kib": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))}))"""


def peak_memory(image: str) -> dict[str, Any]:
    """One validation in a child process: its root, findings and peak memory."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _PEAK, image], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"validate {image}: {proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def stack_main(size: int, runs: int, directory: Path, snapshots: int) -> None:
    started = time.perf_counter()
    images = build_stacks(directory, size, snapshots)
    print(f"built {', '.join(images)}: virtual {size / (1 << 30):.0f} GiB each, files "
          + ", ".join(f"{os.path.getsize(path) / MiB:.1f} MiB" for path in images.values())
          + f", in {time.perf_counter() - started:.1f} s")
    medians: dict[str, tuple[float, float]] = {}
    for name, image in images.items():
        peak = peak_memory(image)
        cli, api = time_validate(image, runs)
        medians[name] = statistics.median(api), statistics.median(cli)
        plain = medians["partition"]
        api_text, cli_text = (f"{ours:.3f} s" + ("" if name == "partition" else f" ({ours - base:+.3f} s)")
                              for ours, base in zip(medians[name], plain, strict=True))
        print(f"root on {name:<9}: diskimg.validate() {api_text}, command {cli_text} (medians of {runs}); peak "
              f"memory ru_maxrss {peak['ru_maxrss_kib'] / 1024:.1f} MiB, VmHWM {peak['vmhwm_kib'] / 1024:.1f} MiB; "
              f"root {(peak['root'] or {}).get('stack')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="40G")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to build the image (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the image")
    parser.add_argument("--stack", action="store_true", help="time the root on a partition, on LVM2 and on btrfs")
    parser.add_argument("--snapshots", type=int, default=10, help="read-only snapshots beside the btrfs root")
    args = parser.parse_args()
    size = parse_size(args.size)
    directory = args.dir or tempfile.mkdtemp(prefix="bench-validate-")
    os.makedirs(directory, exist_ok=True)
    try:
        if args.stack:
            stack_main(size, args.runs, Path(directory), args.snapshots)
            return
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
