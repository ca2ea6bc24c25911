"""Every file system driver in diskimg/fs against its own images with broken metadata.

Each volume is built by the real tools (mkfs.fat + mtools, mkfs.ext4 -d, mkfs.xfs -p, mkntfs +
ntfs-3g, mkfs.btrfs --rootdir) from a small tree of random files. A first, pristine walk records
which sectors the driver reads (the tree's and the free-space maps' that ``unused_ranges`` reads);
those that hold neither file data (recognised by content: the files are random bytes) nor only
zeros are its metadata. Each variant then overlays a few seeded mutations on them (bit flips,
bytes or fields set to 0x00, 0xFF or random values), opens the volume through ``open_filesystem``,
reads its free space (each range checked to lie in the volume, after the one before) and walks the
whole tree reading every file. A variant must end, within a few seconds, either normally or with a
DiskImageError; anything else is reported with the mutation that caused it (rerun one with
``DISKIMG_FUZZ_ONLY=type:variant``; ``DISKIMG_FUZZ_VARIANTS`` sets the count).
"""

from __future__ import annotations

import importlib.util
import os
import random
import resource
import shutil
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import DiskImageError
from diskimg.inspection.fs import DRIVERS, GuestFileSystem, open_filesystem
from diskimg.inspection.fs.base import NotSparsifiable

from .support.files import blank
from .support.filesystems import make_btrfs, make_fat, make_xfs, mkntfs, ntfs3g
from .support.tools import run
from .support.units import MiB

SECTOR = 512
#: variants per volume; the seed of variant i of a volume is "<volume>:<i>"
VARIANTS = int(os.environ.get("DISKIMG_FUZZ_VARIANTS", "80"))
#: seconds one variant may take (open, walk, reads)
VARIANT_SECONDS = 5.0
#: what one walk reads at most: entries listed, bytes of each file
WALK_ENTRIES = 5000
READ_PER_FILE = 1 * MiB
#: how much the process's peak memory may grow over all variants of one volume
MEMORY_GROWTH = 256 * MiB
#: free ranges one variant may yield (a damaged map yields at most one per block)
MAX_RANGES = 1 << 20
#: the volumes that must report free space when pristine
SPARSIFIABLE = {"ext2", "ext4", "xfs", "xfs-v4"}


class VariantTimeout(Exception):
    """Raised by the alarm: a variant ran past VARIANT_SECONDS (not a DiskImageError on purpose)."""


# -- the volumes ---------------------------------------------------------------------------------------


def build_tree(root: Path, rng: random.Random, symlinks: bool) -> Path:
    """A few files (of sizes around block boundaries), nested and larger directories, a link."""
    (root / "etc" / "default").mkdir(parents=True)
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "many").mkdir()
    for path, size in (("etc/os-release", 120), ("etc/fstab", 700), ("etc/default/grub", 1), ("empty", 0),
                       ("boot/vmlinuz", 40_000), ("boot/grub/grub.cfg", 4097), ("block", 4096)):
        (root / path).write_bytes(rng.randbytes(size))
    for i in range(120):
        (root / "many" / f"file{i:03d}").write_bytes(rng.randbytes(rng.randrange(1, 300)))
    if symlinks:
        (root / "etc" / "link").symlink_to("../boot/grub/grub.cfg")
        (root / "abs").symlink_to("/etc/os-release")
    return root


def make_ext(image: Path, tree: Path, kind: str = "ext4") -> None:
    blank(image, 8 * MiB)
    run(f"mkfs.{kind}", "-q", "-F", "-b", "1024", "-d", tree, image)


def make_ntfs(image: Path, tree: Path) -> None:
    """mkntfs, then the tree copied in through ntfs-3g."""
    mkntfs(image, 8 * MiB, 1024)
    if not shutil.which("fusermount") or not os.access("/dev/fuse", os.W_OK):
        pytest.skip("FUSE is not usable here: ntfs-3g cannot fill the volume")
    with ntfs3g(image, image.with_suffix(".mnt")) as where:
        shutil.copytree(tree, where, symlinks=True, dirs_exist_ok=True)


#: volume -> (tools needed, builder, symlinks in the tree); the volume's name up to a dash is its
#: file system type (ext2 and XFS v4 keep no checksums: their mutations reach the parsers behind)
VOLUMES = {
    "fat12": (("mkfs.fat", "mcopy"), lambda image, tree: make_fat(image, tree, 12, 4096), False),
    "fat16": (("mkfs.fat", "mcopy"), lambda image, tree: make_fat(image, tree, 16, 16384), False),
    "fat32": (("mkfs.fat", "mcopy"), lambda image, tree: make_fat(image, tree, 32, 36000), False),
    "ext2": (("mkfs.ext2",), lambda image, tree: make_ext(image, tree, "ext2"), True),
    "ext4": (("mkfs.ext4",), make_ext, True),
    "xfs": (("mkfs.xfs",), make_xfs, True),
    "xfs-v4": (("mkfs.xfs",), lambda image, tree: make_xfs(image, tree, "-m", "crc=0"), True),
    "ntfs": (("mkntfs", "ntfs-3g"), make_ntfs, True),
    # mkfs.btrfs's defaults (DUP metadata: a broken node is read from its mirror), past the superblock copy at 64 MiB
    "btrfs": (("mkfs.btrfs",), lambda image, tree: make_btrfs(image, tree, size=160 * MiB), True),
}


# -- the disk the drivers read: the image, with mutations laid over it --------------------------------


class OverlayDisk:
    """A DiskReader's ``read_at(offset, length)`` with bytes replaced at some offsets; records what is read."""

    def __init__(self, reader, patches: dict[int, int] | None = None, record: bool = False) -> None:
        self.reader = reader
        self.virtual_size = reader.virtual_size
        self.patches = patches or {}
        self.reads: list[tuple[int, int]] | None = [] if record else None

    def read_at(self, offset: int, length: int) -> bytes:
        data = self.reader.read_at(offset, length)
        if self.reads is not None:
            self.reads.append((offset, len(data)))
        hits = [p for p in self.patches if offset <= p < offset + len(data)]
        if not hits:
            return data
        patched = bytearray(data)
        for position in hits:
            patched[position - offset] = self.patches[position]
        return bytes(patched)


def walk_everything(fs: GuestFileSystem) -> int:
    """List every directory, stat every entry, read every file (up to a cap), read every link."""
    listed = 0
    for path, info in fs.walk("/"):
        listed += 1
        if listed > WALK_ENTRIES:
            break
        try:
            if info.is_file:
                done = 0
                for piece in fs.iter_file(path):
                    done += len(piece)
                    if done >= READ_PER_FILE:
                        break
            elif info.is_symlink:
                fs.readlink(path)
        except DiskImageError:
            continue  # this file is broken; the others are still read
    return listed


def read_unused(fs: GuestFileSystem, size: int) -> int | None:
    """How many ranges ``unused_ranges`` yields, each checked to be inside the volume of ``size``
    bytes and after the one before; None where the driver declines (NotSparsifiable)."""
    count = end = 0
    try:
        for offset, length in fs.unused_ranges():
            count += 1
            assert count <= MAX_RANGES, f"more than {MAX_RANGES} free ranges"
            assert length > 0 and end <= offset and offset + length <= size, f"free range {offset}+{length}"
            end = offset + length
    except NotSparsifiable:
        return None
    return count


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expired(signum, frame):
        raise VariantTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- mutations -----------------------------------------------------------------------------------------


def metadata_sectors(image: Path, reads: list[tuple[int, int]], tree: Path) -> list[int]:
    """Sectors the driver read that hold neither file data nor only zeros."""
    data_sectors = set()
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            for start in range(0, len(content), SECTOR):
                data_sectors.add(content[start : start + SECTOR].ljust(SECTOR, b"\0"))
    touched = sorted({s for offset, length in reads for s in range(offset // SECTOR, -(-(offset + length) // SECTOR))})
    found = []
    with open(image, "rb") as f:
        for sector in touched:
            content = os.pread(f.fileno(), SECTOR, sector * SECTOR)
            if any(content) and content not in data_sectors:
                found.append(sector)
    return found


def mutate(rng: random.Random, image: Path, sectors: list[int]) -> dict[int, int]:
    """1 to 4 changes, each in a random metadata sector: a bit flip, a byte or a 2/4/8-byte field
    set to 0x00.., 0xFF.. or random bytes (fields aligned, as on-disk fields are)."""
    patches: dict[int, int] = {}
    with open(image, "rb") as f:
        for _ in range(rng.randint(1, 4)):
            sector = rng.choice(sectors)
            content = os.pread(f.fileno(), SECTOR, sector * SECTOR)
            nonzero = [i for i, b in enumerate(content) if b]
            width = rng.choice((1, 1, 2, 4, 8))
            inner = rng.choice(nonzero) if nonzero and rng.random() < 0.7 else rng.randrange(SECTOR)
            inner -= inner % width
            base = sector * SECTOR + inner
            kind = rng.choice(("flip", "zero", "ones", "random"))
            if kind == "flip":
                patches[base] = content[inner] ^ (1 << rng.randrange(8))
                continue
            for k in range(width):
                patches[base + k] = {"zero": 0, "ones": 0xFF}.get(kind, rng.randrange(256))
    return patches


def describe(patches: dict[int, int], image: Path) -> str:
    with open(image, "rb") as f:
        return ", ".join(f"{p}: {os.pread(f.fileno(), 1, p)[0]:02x}->{v:02x}" for p, v in sorted(patches.items()))


# -- the test ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("volume", sorted(VOLUMES))
def test_broken_metadata_raises_only_disk_image_errors(tmp_path, volume):
    fs_type = volume.split("-")[0]
    module = DRIVERS[fs_type].split(":")[0]
    if importlib.util.find_spec(f"diskimg.inspection.fs.{module}") is None:
        pytest.skip(f"no {module} driver yet")
    tools, build, symlinks = VOLUMES[volume]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}")
    tree = build_tree(tmp_path / "tree", random.Random(volume), symlinks)
    image = tmp_path / f"{volume}.img"
    build(image, tree)
    only = os.environ.get("DISKIMG_FUZZ_ONLY", "")
    with diskimg.open_image(image, "raw") as reader:
        pristine = OverlayDisk(reader, record=True)
        fs = open_filesystem(pristine, 0, reader.virtual_size, fs_type)
        assert fs is not None
        assert walk_everything(fs) > 120  # the pristine volume reads whole
        free = read_unused(fs, reader.virtual_size)
        assert free if volume in SPARSIFIABLE else free is None or free >= 0
        sectors = metadata_sectors(image, pristine.reads, tree)
        assert len(sectors) > 4
        failures = []
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        for variant in range(VARIANTS):
            seed = f"{volume}:{variant}"
            if only and only != seed:
                continue
            patches = mutate(random.Random(seed), image, sectors)
            started = time.monotonic()
            try:
                with time_limit(VARIANT_SECONDS):
                    fs = open_filesystem(OverlayDisk(reader, patches), 0, reader.virtual_size, fs_type)
                    if fs is not None:
                        try:
                            read_unused(fs, reader.virtual_size)
                        except DiskImageError:
                            pass
                        walk_everything(fs)
            except DiskImageError:
                pass
            except BaseException as exc:  # anything else is what this test looks for
                if isinstance(exc, KeyboardInterrupt):
                    raise
                where = "".join(traceback.format_exception(exc)[-3:]).strip()
                failures.append(f"{seed} [{describe(patches, image)}]: {type(exc).__name__}: {exc}\n{where}")
                continue
            elapsed = time.monotonic() - started
            if elapsed > VARIANT_SECONDS:
                failures.append(f"{seed} [{describe(patches, image)}]: took {elapsed:.1f} s")
    assert not failures, f"{len(failures)} of {VARIANTS} variants failed:\n" + "\n\n".join(failures[:8])
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - peak
    assert growth < MEMORY_GROWTH, f"peak memory grew by {growth >> 20} MiB over the variants"
