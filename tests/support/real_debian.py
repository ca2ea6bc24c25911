"""Real Debian 12 system disks, the oracle of issue 13: built once by scripts/build_real_debian.sh
(mmdebstrap from Debian's archive, grub-install on a loop device, update-initramfs and update-grub in a
chroot) and cached outside the repository, keyed by the build script's hash so that a recipe change
rebuilds. Tests derive each broken copy from a cached disk by one change and never rebuild a system.

The cache is ``$DISKIMG_TEST_CACHE`` or ``~/.cache/diskimg-tests``; the mirror ``$DISKIMG_DEBIAN_MIRROR``
or Debian's. Building needs root, loop devices and the archive: without them the tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .tools import ROOT, run

SCRIPT = ROOT / "scripts" / "build_real_debian.sh"
RECIPE = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]
FIRMWARES = ("bios", "uefi")
BUILD_TIMEOUT = 1800  # s per step; a first build takes minutes
BUILD_TOOLS = ("mmdebstrap", "eatmydata", "losetup", "partx", "sfdisk", "mkfs.ext4", "mkfs.fat", "mcopy", "blkid",
               "qemu-img", "debugfs")


def cache_dir() -> Path:
    base = os.environ.get("DISKIMG_TEST_CACHE") or Path.home() / ".cache" / "diskimg-tests"
    return Path(base) / f"debian12-{RECIPE}"


def debian_mirror() -> str:
    return os.environ.get("DISKIMG_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def why_not_usable(building: bool) -> str | None:
    """Why the systems cannot be built (``building``) or changed here: a skip reason, or None."""
    if os.geteuid() != 0:
        return "real Debian systems need root (loop devices, mount, chroot)"
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"real Debian systems need {', '.join(missing)} (scripts/test.sh installs them)"
    if subprocess.run(["losetup", "-f"], check=False, capture_output=True).returncode != 0:
        return "no free loop device (losetup -f failed)"
    if building:
        try:
            urllib.request.urlopen(f"{debian_mirror()}/dists/bookworm/InRelease", timeout=15).close()
        except OSError as error:
            return f"Debian's archive {debian_mirror()} is not reachable ({error}); set DISKIMG_DEBIAN_MIRROR"
    return None


@dataclass(frozen=True)
class RealDisk:
    """A healthy system disk: the cached qcow2, its RAW conversion for this session (read only), and
    its partitions as sfdisk reads them, each (offset, size) in bytes."""

    firmware: str
    qcow2: Path
    raw: Path
    partitions: tuple[tuple[int, int], ...]

    @property
    def root(self) -> tuple[int, int]:
        return self.partitions[-1]

    @property
    def esp(self) -> tuple[int, int]:
        assert self.firmware == "uefi"
        return self.partitions[0]

    def copy(self, target: Path) -> Path:
        """A RAW copy to change one thing in (sparse)."""
        run("cp", "--sparse=always", self.raw, target)
        return target


def build_all() -> tuple[dict[str, Path], dict[str, float]]:
    """The cached disks, building what is missing (the base system once, then both disks at once);
    a lock keeps parallel sessions from building twice. Returns the disks and the build times (s)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    disks = {firmware: directory / f"{firmware}.qcow2" for firmware in FIRMWARES}
    times_file = directory / "build-times.json"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(disk.exists() for disk in disks.values()):
            return disks, json.loads(times_file.read_text()) if times_file.exists() else {}
        for old in directory.parent.glob("debian12-*"):  # systems of earlier recipes
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
        times: dict[str, float] = {}
        base = directory / "base.tar"
        started = time.monotonic()
        if not base.exists():
            _finish(_start("base", base, debian_mirror()))
        times["base"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        missing = [firmware for firmware in FIRMWARES if not disks[firmware].exists()]
        for job in [_start(firmware, base, disks[firmware]) for firmware in missing]:
            _finish(job)
        times["disks"] = round(time.monotonic() - started, 1)
        base.unlink()
        times_file.write_text(json.dumps(times))
        return disks, times


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", SCRIPT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(job: subprocess.Popen) -> None:
    """Wait for a build step; fail with the end of its output if it fails or overruns."""
    try:
        output = job.communicate(timeout=BUILD_TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)  # the script's trap unmounts and detaches its loop device
        output = job.communicate()[0]
    if job.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, job.args[1:3]))} failed ({job.returncode}):\n"
                             f"{output.decode(errors='replace')[-3000:]}")


def partition_layout(raw: Path) -> tuple[tuple[int, int], ...]:
    """(offset, size) in bytes of each partition, as sfdisk reads the table."""
    table = json.loads(run("sfdisk", "--json", raw).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return tuple((entry["start"] * sector, entry["size"] * sector) for entry in table["partitions"])


def open_session_disks(session_dir: Path) -> tuple[dict[str, RealDisk], dict[str, float]]:
    """The healthy disks converted to RAW in ``session_dir``, and the build times (s)."""
    qcow2s, times = build_all()
    disks = {}
    for firmware, qcow2 in qcow2s.items():
        raw = session_dir / f"{firmware}.raw"
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, raw)
        disks[firmware] = RealDisk(firmware, qcow2, raw, partition_layout(raw))
    return disks, times


@contextlib.contextmanager
def mounted(raw: Path, partition: tuple[int, int], mountpoint: Path):
    """The ext4 file system at ``partition`` (offset, size) of a RAW disk, loop-mounted read-write."""
    offset, size = partition
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "ext4", "-o", f"loop,offset={offset},sizelimit={size}", raw, mountpoint)
    try:
        yield mountpoint
    finally:
        run("umount", mountpoint)


@contextlib.contextmanager
def chroot_ready(root: Path):
    """``root`` with /proc and a /dev of its own holding null, zero and urandom, for package scripts."""
    dev = root / "dev"
    run("mount", "-t", "tmpfs", "-o", "mode=755", "devfs", dev)
    run("mount", "-t", "proc", "proc", root / "proc")
    try:
        for name, minor in (("null", 3), ("zero", 5), ("urandom", 9)):
            run("mknod", "-m", "666", dev / name, "c", "1", str(minor))
        yield root
    finally:
        run("umount", root / "proc")
        run("umount", dev)


def ext4_read(raw: Path, partition: tuple[int, int], guest_path: str) -> bytes:
    """A file's bytes read by debugfs from the ext4 at ``partition`` of a RAW disk (no mount)."""
    proc = run("debugfs", "-R", f"cat {guest_path}", f"{raw}?offset={partition[0]}")
    return proc.stdout


def ext4_list(raw: Path, partition: tuple[int, int], guest_dir: str) -> list[str]:
    """The names in a directory, read by debugfs."""
    proc = run("debugfs", "-R", f"ls -p {guest_dir}", f"{raw}?offset={partition[0]}")
    names = [line.split("/")[5] for line in proc.stdout.decode().splitlines() if line.startswith("/")]
    return [name for name in names if name not in (".", "..")]
