"""File-system volumes made by their own tools from a host tree: mkfs.fat + mtools, mkfs.xfs with a
protofile, mkntfs + ntfs-3g (FUSE)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .files import blank
from .tools import run
from .units import MiB

#: mkfs.xfs refuses much smaller file systems; the image is sparse
XFS_SIZE = 320 * MiB
#: large enough for the btrfs superblock copy at 64 MiB; the image is sparse
BTRFS_SIZE = 256 * MiB
NTFS_TOOLS = ("mkntfs", "ntfs-3g", "ntfsinfo", "fusermount")


def make_fat(image: Path, tree: Path, bits: int, size_kib: int, label: str | None = None,
             keep_times: bool = False) -> Path:
    """mkfs.fat (FAT``bits``, ``size_kib`` KiB), then ``tree`` copied in by mcopy (``keep_times``: with
    the files' modification times)."""
    run("mkfs.fat", "-F", str(bits), *(["-n", label] if label else []), "-C", image, str(size_kib))
    run("mcopy", "-s", *(["-m"] if keep_times else []), "-i", image, *sorted(tree.iterdir()), "::")
    return image


def protofile_lines(directory: Path) -> list[str]:
    """The entries of ``directory`` in mkfs.xfs's protofile syntax (see mkfs.xfs(8), -p)."""
    lines = []
    for name in sorted(os.listdir(directory)):
        path = directory / name
        info = path.lstat()
        special = ("u" if info.st_mode & stat.S_ISUID else "-") + ("g" if info.st_mode & stat.S_ISGID else "-")
        perm = f"{stat.S_IMODE(info.st_mode) & 0o777:03o}"
        if stat.S_ISLNK(info.st_mode):
            lines.append(f"{name} l--777 0 0 {os.readlink(path)}")
        elif stat.S_ISDIR(info.st_mode):
            lines.append(f"{name} d{special}{perm} 0 0")
            lines.extend(protofile_lines(path))
            lines.append("$")
        else:
            lines.append(f"{name} -{special}{perm} 0 0 {path}")
    return lines


def make_xfs(image: Path, tree: Path, *options: str, size: int = XFS_SIZE) -> Path:
    """mkfs.xfs on a sparse file of ``size`` bytes, populated from ``tree`` through a protofile."""
    proto = image.with_suffix(".proto")
    proto.write_text("\n".join(["unused", "0 0", "d--755 0 0", *protofile_lines(tree), "$", ""]))
    blank(image, size)
    run("mkfs.xfs", "-q", "-f", *options, "-p", proto, image)
    return image


def make_btrfs(image: Path, tree: Path | None, *options: str, size: int = BTRFS_SIZE) -> Path:
    """mkfs.btrfs on a sparse file of ``size`` bytes, filled from ``tree``."""
    blank(image, size)
    run("mkfs.btrfs", "-q", "-f", *(("--rootdir", tree) if tree is not None else ()), *options, image)
    return image


def need_ntfs_tools() -> None:
    """Skip the test unless mkntfs, ntfs-3g and FUSE are usable here."""
    missing = [tool for tool in NTFS_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse is not usable: ntfs-3g cannot mount here")


def mkntfs(image: Path, size: int, cluster: int, sector: int = 512) -> Path:
    blank(image, size)
    run("mkntfs", "-F", "-Q", "-s", str(sector), "-c", str(cluster), image)
    return image


@contextmanager
def ntfs3g(image: Path, where: Path) -> Iterator[Path]:
    """``image`` mounted read-write by ntfs-3g at ``where``; unmounted, and written out, on exit."""
    where.mkdir(exist_ok=True)
    proc = subprocess.Popen(["ntfs-3g", "-o", "no_detach", str(image), str(where)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.ismount(where):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            error = proc.communicate()[1].decode(errors="replace")
            pytest.skip(f"ntfs-3g cannot mount here: {error.strip()[-200:]}")
        time.sleep(0.02)
    try:
        yield where
    finally:
        for _ in range(50):
            if subprocess.run(["fusermount", "-u", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        proc.wait(timeout=60)  # the volume is closed (and flushed) when ntfs-3g exits



class Mounted:
    """A btrfs image mounted on a loop device (root only), unmounted by ``close``."""

    def __init__(self, image: Path, where: Path, options: str) -> None:
        where.mkdir()
        self.where = where
        options = f"loop,{options}" if options else "loop"
        proc = subprocess.run(["mount", "-o", options, str(image), str(where)], capture_output=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a btrfs loop device here: {proc.stderr.decode().strip()}")

    def close(self) -> None:
        run("umount", self.where)


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None




def ntfsinfo(image: Path, *args: str) -> str:
    return run("ntfsinfo", *args, image).stdout.decode(errors="replace")


def ntfsinfo_attributes(image: Path, path: str) -> dict[str, list[str]]:
    """The attribute dumps of ``ntfsinfo -v -F path``, by attribute type name (several pieces each)."""
    text = ntfsinfo(image, "-v", "-F", path)
    dumps: dict[str, list[str]] = {}
    for block in text.split("Dumping attribute ")[1:]:
        dumps.setdefault(block.split()[0], []).append(block)
    return dumps


def ntfsinfo_runs(image: Path, path: str) -> list[tuple[int, int | None, int]]:
    """(VCN, LCN or None for a hole, length) of the unnamed $DATA of ``path``, every piece's runs."""
    runs = []
    for block in ntfsinfo_attributes(image, path).get("$DATA", []):
        for vcn, lcn, length in re.findall(r"^\t\t\t0x([0-9a-f]+)\t\t(0x[0-9a-f]+|<HOLE>)\t\t0x([0-9a-f]+)$", block,
                                           re.M):
            runs.append((int(vcn, 16), None if lcn == "<HOLE>" else int(lcn, 16), int(length, 16)))
    return runs

