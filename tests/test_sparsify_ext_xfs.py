"""Free space of ext2/3/4 and XFS (``unused_ranges``: what --sparsify leaves out) against the file
systems' own tools.

- The ranges are exactly the free blocks ``dumpe2fs`` lists for every group ("Free blocks:"), and
  the free extents ``xfs_db``'s ``freesp -d`` lists for every AG (it counts the AGFL's blocks free
  too), on images made by mke2fs -d / mkfs.xfs -p from a tree, files then deleted (debugfs rm, or
  the kernel through a loop mount), in the variants that change where metadata lies.
- States the tools call unclean (dumpe2fs: needs_recovery, "not clean", errors, an orphan; e2fsck:
  a journal with data; xfs_logprint: a DIRTY log) are refused with the reason.
- Safety: in a copy with every unused range zeroed, ``e2fsck -fn`` / ``xfs_repair -n`` find the
  file system clean and diskimg reads the same tree (types, sizes, modes, owners, file hashes,
  link targets); the ranges held the deleted files' data, so something was zeroed.
- Damaged maps: a bitmap bit or a btree record changed, a group flagged uninitialised: refused,
  where the tools report the damage.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from diskimg import open_image
from diskimg.errors import CorruptImage
from diskimg.inspection.fs.base import NotSparsifiable, join_adjacent
from diskimg.inspection.fs.ext import ExtFileSystem
from diskimg.inspection.fs.xfs import XfsFileSystem

from .support.corpus import corpus_file, corpus_manifest, corpus_params
from .support.files import blank, sparse_copy, write_at
from .support.filesystems import protofile_lines
from .support.fs_compare import tree_digest
from .support.tools import run
from .support.units import MiB

E2FSPROGS = ("mke2fs", "debugfs", "dumpe2fs", "e2fsck")
XFSPROGS = ("mkfs.xfs", "xfs_db", "xfs_repair", "xfs_logprint")
needs_e2fsprogs = pytest.mark.skipif(not all(shutil.which(t) for t in E2FSPROGS), reason="e2fsprogs not installed")
needs_xfsprogs = pytest.mark.skipif(not all(shutil.which(t) for t in XFSPROGS), reason="xfsprogs not installed")

#: files of the tree that the tests delete: their blocks become free and still hold their data
DELETED = ("big", "medium-1", "medium-3", "small/s05", "small/s17", "small/s30")


def make_tree(root: Path) -> Path:
    """Random data (so that stale blocks are told from zeros): a large file spanning groups,
    medium and small files, a directory of many names, links."""
    rng = random.Random(17)
    (root / "small").mkdir(parents=True)
    (root / "many").mkdir()
    (root / "big").write_bytes(rng.randbytes(9 * MiB))
    (root / "kept").write_bytes(rng.randbytes(3 * MiB + 5))
    for i in range(5):
        (root / f"medium-{i}").write_bytes(rng.randbytes(300_000 + i * 4097))
    for i in range(40):
        (root / "small" / f"s{i:02d}").write_bytes(rng.randbytes(rng.randrange(1, 9000)))
    for i in range(300):
        (root / "many" / f"name-{i:03d}").write_bytes(rng.randbytes(rng.randrange(0, 200)))
    os.symlink("kept", root / "link")
    os.symlink("/small/" + "../" * 30 + "small/s00", root / "long-link")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("sparsify-tree") / "tree")


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextmanager
def mounted(image: Path, where: Path, fs_type: str) -> Iterator[Path]:
    """``image`` mounted on a loop device (root only; the test is skipped where it cannot be)."""
    if not can_mount():
        pytest.skip("needs root and mount")
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", fs_type, "-o", "loop", str(image), str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot loop-mount {fs_type} here: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        run("umount", where)


def write_and_delete(root: Path, seed: int, count: int, largest: int) -> None:
    """``count`` files of random data written in directory churn-``seed``, then every other one
    deleted (fragmenting the free space)."""
    rng = random.Random(seed)
    directory = root / f"churn-{seed}"
    directory.mkdir()
    for i in range(count):
        (directory / f"c{i:05d}").write_bytes(rng.randbytes(rng.randrange(1, largest)))
    os.sync()
    for i in range(0, count, 2):
        (directory / f"c{i:05d}").unlink()
    os.sync()


def unused(image: Path, fs_class: type[ExtFileSystem] | type[XfsFileSystem]) -> list[tuple[int, int]]:
    disk = open_image(image, "raw")
    return list(fs_class(disk, 0, disk.virtual_size).unused_ranges())


def refusal(image: Path, fs_class: type[ExtFileSystem] | type[XfsFileSystem],
            error: type[Exception] = NotSparsifiable) -> str:
    """The message unused_ranges refuses ``image`` with (it must refuse it with ``error``)."""
    disk = open_image(image, "raw")
    fs = fs_class(disk, 0, disk.virtual_size)
    with pytest.raises(error) as refused:
        list(fs.unused_ranges())
    return str(refused.value)


def digest(image: Path, fs_class: type[ExtFileSystem] | type[XfsFileSystem]) -> dict[str, tuple[object, ...]]:
    disk = open_image(image, "raw")
    return tree_digest(fs_class(disk, 0, disk.virtual_size))


def zeroed_copy(image: Path, ranges: list[tuple[int, int]], target: Path) -> int:
    """A copy of ``image`` with ``ranges`` zeroed (as --sparsify leaves them); returns how many
    bytes of those ranges were not zeros before."""
    sparse_copy(image, target)
    stale = 0
    zeros = bytes(4 * MiB)
    with open(image, "rb") as source, open(target, "r+b") as out:
        for offset, length in ranges:
            for at in range(offset, offset + length, len(zeros)):
                size = min(len(zeros), offset + length - at)
                stale += size - os.pread(source.fileno(), size, at).count(0)
                os.pwrite(out.fileno(), zeros[:size], at)
    return stale


def assert_ranges_shape(ranges: list[tuple[int, int]], size: int) -> None:
    """In order, disjoint, not touching (merged), inside the volume."""
    assert ranges, "no free space found"
    assert list(join_adjacent(ranges)) == ranges
    for (offset, length), (following, _) in itertools.pairwise(ranges):
        assert length > 0 and offset + length < following
    assert ranges[-1][0] + ranges[-1][1] <= size


# -- ext2/3/4 -------------------------------------------------------------------------------------------

#: name -> (mke2fs -t, options, image size, whether groups are left BLOCK_UNINIT)
EXT_VARIANTS: dict[str, tuple[str, tuple[str, ...], int, bool]] = {
    "ext4-defaults": ("ext4", (), 640 * MiB, True),  # mke2fs.conf's defaults at this size: 4 KiB blocks, 64bit
    "ext4-1k": ("ext4", ("-b", "1024"), 96 * MiB, True),
    "ext4-4k-small-groups-nodiscard": ("ext4", ("-b", "4096", "-g", "4096", "-E", "nodiscard"), 160 * MiB, True),
    "ext4-no-flex_bg": ("ext4", ("-b", "1024", "-O", "^flex_bg"), 96 * MiB, True),
    "ext4-meta_bg-4k-128-groups": ("ext4", ("-b", "4096", "-g", "1024", "-O", "meta_bg,^resize_inode"), 512 * MiB,
                                   True),
    "ext4-meta_bg-1k-32bit": ("ext4", ("-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode,^64bit"), 96 * MiB,
                              True),
    "ext4-uninit_bg-crc16-32bit": ("ext4", ("-b", "1024", "-O", "^metadata_csum,^64bit,uninit_bg"), 96 * MiB, True),
    "ext4-64bit-2k": ("ext4", ("-b", "2048", "-g", "2048", "-O", "64bit"), 128 * MiB, True),
    "ext4-sparse_super2": ("ext4", ("-b", "1024", "-O", "sparse_super2"), 96 * MiB, True),
    "ext3-1k": ("ext3", ("-b", "1024"), 96 * MiB, False),
    "ext2-4k": ("ext2", ("-b", "4096", "-g", "8192"), 128 * MiB, False),
    "ext2-1k-no-sparse_super": ("ext2", ("-b", "1024", "-O", "^sparse_super,^resize_inode"), 64 * MiB,
                                False),
}


def debugfs(image: Path, *requests: str) -> str:
    """debugfs -w's output for the requests (one a line)."""
    return run("debugfs", "-w", "-f", "-", image, input="".join(f"{r}\n" for r in requests).encode()).stdout.decode()


def dumpe2fs(image: Path, *options: str) -> str:
    return run("dumpe2fs", *options, image).stdout.decode()


def dumpe2fs_free(image: Path) -> list[tuple[int, int]]:
    """Every group's "Free blocks:" as byte ranges, joined where they touch."""
    out = dumpe2fs(image)
    block = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    blocks = []
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            first, _, last = part.partition("-")
            blocks.append((int(first) * block, (int(last or first) - int(first) + 1) * block))
    return list(join_adjacent(sorted(blocks)))


def e2fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def make_ext(image: Path, tree: Path, kind: str, options: tuple[str, ...], size: int) -> Path:
    """mke2fs -d from ``tree``, then the DELETED files removed by debugfs."""
    blank(image, size)
    run("mke2fs", "-q", "-F", "-t", kind, *options, "-d", tree, image)
    debugfs(image, *(f"rm /{name}" for name in DELETED))
    return image


@pytest.fixture(scope="module")
def ext_images(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Iterator[dict[str, Path]]:
    """The variants' images, made on first use."""
    base = tmp_path_factory.mktemp("sparsify-ext")

    class Images(dict[str, Path]):
        def __missing__(self, variant: str) -> Path:
            kind, options, size, _ = EXT_VARIANTS[variant]
            self[variant] = make_ext(base / f"{variant}.img", tree, kind, options, size)
            return self[variant]

    yield Images()


@needs_e2fsprogs
@pytest.mark.parametrize("variant", list(EXT_VARIANTS))
def test_ext_free_space_is_what_dumpe2fs_lists(ext_images: dict[str, Path], variant: str) -> None:
    image = ext_images[variant]
    _, _, size, uninit = EXT_VARIANTS[variant]
    out = dumpe2fs(image)
    assert ("BLOCK_UNINIT" in out) == uninit  # the variant has the groups it is meant to test
    assert re.search(r"^Filesystem state:\s+clean$", out, re.M)
    ranges = unused(image, ExtFileSystem)
    assert ranges == dumpe2fs_free(image)
    assert_ranges_shape(ranges, size)


@needs_e2fsprogs
@pytest.mark.parametrize("variant", list(EXT_VARIANTS))
def test_ext_zeroing_unused_space_keeps_every_file(ext_images: dict[str, Path], variant: str,
                                                   tmp_path: Path) -> None:
    image = ext_images[variant]
    ranges = unused(image, ExtFileSystem)
    copy = tmp_path / "zeroed.img"
    stale = zeroed_copy(image, ranges, copy)
    assert stale > 9 * MiB  # the deleted files' data was there, and is gone
    e2fsck_clean(copy)
    before = digest(image, ExtFileSystem)
    assert len(before) > 340
    assert digest(copy, ExtFileSystem) == before


@needs_e2fsprogs
def test_ext_written_and_deleted_by_the_kernel(tmp_path: Path, tree: Path) -> None:
    """The kernel's own allocator (groups it initialises as it goes, its preallocations released
    at unmount): after writing and deleting files, what dumpe2fs lists, and zeroing it is safe."""
    image = blank(tmp_path / "kernel.img", 192 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-g", "4096", image)
    with mounted(image, tmp_path / "mnt", "ext4") as root:
        shutil.copytree(tree, root / "tree", symlinks=True)
        write_and_delete(root, 1, 600, 200_000)
        shutil.rmtree(root / "tree" / "small")
        (root / "tree" / "big").unlink()
    ranges = unused(image, ExtFileSystem)
    assert ranges == dumpe2fs_free(image)
    copy = tmp_path / "zeroed.img"
    assert zeroed_copy(image, ranges, copy) > 9 * MiB
    e2fsck_clean(copy)
    assert digest(copy, ExtFileSystem) == digest(image, ExtFileSystem)


EXT2_CORPUS = ("dfvfs/ext2.raw.gz", "dfvfs/ext2.qcow2", "dfvfs/ext2.vmdk", "dfvfs/ext2.vhd")


@needs_e2fsprogs
@pytest.mark.parametrize("entry", corpus_params([e for e in corpus_manifest() if e["file"] in EXT2_CORPUS]))
def test_ext2_made_elsewhere_through_each_container(entry: dict[str, object], tmp_path: Path) -> None:
    """dfvfs's ext2 (an older mke2fs), read through diskimg's raw, qcow2, VMDK and VHD readers:
    what dumpe2fs lists on the raw file system."""
    raw_entry = next(e for e in corpus_manifest() if e["file"] == "dfvfs/ext2.raw.gz")
    raw = corpus_file(raw_entry, tmp_path)
    with open_image(corpus_file(entry, tmp_path), str(entry["format"])) as reader:
        ranges = list(ExtFileSystem(reader, 0, reader.virtual_size).unused_ranges())
    assert ranges == dumpe2fs_free(raw)
    assert_ranges_shape(ranges, 4 * MiB)


#: debugfs requests that leave the file system unclean, what dumpe2fs then shows, and the reason
EXT_UNCLEAN = {
    "needs_recovery": ("feature needs_recovery", r"Filesystem features:.*needs_recovery", "needs recovery"),
    "not-clean": ("ssv state 0", r"Filesystem state:\s+not clean$", "not cleanly unmounted"),
    "errors": ("ssv state 3", r"Filesystem state:\s+clean with errors$", "errors"),
    "orphan": ("ssv last_orphan 12", r"First orphan inode:\s+12$", "orphan"),
}


@needs_e2fsprogs
@pytest.mark.parametrize("state", list(EXT_UNCLEAN))
def test_ext_unclean_states_are_refused(tmp_path: Path, tree: Path, state: str) -> None:
    request, shown, reason = EXT_UNCLEAN[state]
    image = make_ext(tmp_path / "fs.img", tree, "ext4", ("-b", "1024"), 64 * MiB)
    unused(image, ExtFileSystem)  # clean first
    debugfs(image, request)
    assert re.search(shown, dumpe2fs(image, "-h"), re.M)
    assert reason in refusal(image, ExtFileSystem)


@needs_e2fsprogs
def test_ext_copied_while_mounted_is_refused(tmp_path: Path, tree: Path) -> None:
    """A copy taken while the kernel had it mounted: needs_recovery set, the journal holding
    transactions; with the flag cleared, e2fsck still finds data in the journal, and so do we."""
    image = make_ext(tmp_path / "fs.img", tree, "ext4", ("-b", "4096"), 96 * MiB)
    copy = tmp_path / "while-mounted.img"
    with mounted(image, tmp_path / "mnt", "ext4") as root:
        write_and_delete(root, 2, 200, 100_000)
        sparse_copy(image, copy)
    assert "needs_recovery" in dumpe2fs(copy, "-h")
    assert "needs recovery" in refusal(copy, ExtFileSystem)
    debugfs(copy, "feature -needs_recovery")
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True).stdout.decode()
    assert "journal has data" in fsck
    assert "journal holds transactions" in refusal(copy, ExtFileSystem)
    assert unused(image, ExtFileSystem) == dumpe2fs_free(image)  # unmounted cleanly since


@needs_e2fsprogs
def test_ext_bigalloc_is_declined(tmp_path: Path, tree: Path) -> None:
    """bigalloc's bitmaps count clusters: not read, and said so."""
    image = make_ext(tmp_path / "fs.img", tree, "ext4", ("-b", "1024", "-O", "bigalloc", "-C", "4096"), 64 * MiB)
    assert "bigalloc" in dumpe2fs(image, "-h")
    assert "bigalloc" in refusal(image, ExtFileSystem)


def group_fields(image: Path, group: int) -> dict[str, int]:
    """dumpe2fs's numbers for ``group``: its first block, block bitmap and descriptor table block."""
    out = dumpe2fs(image)
    part = out[out.index(f"\nGroup {group}: ") :]
    part = part[: part.find("\nGroup ", 1)]
    return {
        "first": int(re.search(r"\(Blocks (\d+)-", part).group(1)),
        "bitmap": int(re.search(r"Block bitmap at (\d+)", part).group(1)),
    }


def used_block_of(image: Path, path: str) -> int:
    """The first block of ``path``'s data (debugfs blocks)."""
    return int(re.search(r"^(\d+)\s", debugfs(image, f"blocks {path}"), re.M).group(1))


@needs_e2fsprogs
@pytest.mark.parametrize(("kind", "options", "error", "reason"), [
    ("ext2", ("-b", "1024"), NotSparsifiable, "free blocks, its descriptor counts"),
    ("ext4", ("-b", "1024"), CorruptImage, "block bitmap checksum"),
], ids=["ext2-count", "ext4-checksum"])
def test_ext_a_used_block_marked_free_is_refused(tmp_path: Path, tree: Path, kind: str, options: tuple[str, ...],
                                                 error: type[Exception], reason: str) -> None:
    """One bit of a bitmap cleared under a file's block: without checksums the group's free count
    gives it away, with metadata_csum the bitmap's checksum; e2fsck reports the difference."""
    image = make_ext(tmp_path / "fs.img", tree, kind, options, 64 * MiB)
    block_size = 1024
    target = used_block_of(image, "/kept")
    group = (target - 1) // (8 * block_size)
    fields = group_fields(image, group)
    bit = target - fields["first"]
    position = fields["bitmap"] * block_size + bit // 8
    with open(image, "r+b") as f:
        value = os.pread(f.fileno(), 1, position)[0]
        assert value & 1 << bit % 8
        os.pwrite(f.fileno(), bytes([value & ~(1 << bit % 8)]), position)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True)
    assert fsck.returncode != 0
    assert reason in refusal(image, ExtFileSystem, error)


@needs_e2fsprogs
@pytest.mark.parametrize("options", [("-O", "^metadata_csum,uninit_bg"), ()], ids=["crc16", "crc32c"])
def test_ext_a_group_falsely_flagged_uninitialised_is_refused(tmp_path: Path, tree: Path,
                                                               options: tuple[str, ...]) -> None:
    """BLOCK_UNINIT set on the descriptor of a group holding data would make its blocks free: the
    descriptor's checksum refuses it (e2fsck too)."""
    image = make_ext(tmp_path / "fs.img", tree, "ext4", ("-b", "1024", *options), 64 * MiB)
    group = (used_block_of(image, "/kept") - 1) // 8192
    assert group > 0
    desc_size = 64 if "64bit" in dumpe2fs(image, "-h") else 32
    flags = 2 * 1024 + group * desc_size + 0x12  # the descriptor table is block 2 with 1 KiB blocks
    with open(image, "r+b") as f:
        value = int.from_bytes(os.pread(f.fileno(), 2, flags), "little")
        assert not value & 2
        os.pwrite(f.fileno(), (value | 2).to_bytes(2, "little"), flags)
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode != 0
    assert "descriptor checksum" in refusal(image, ExtFileSystem, CorruptImage)


# -- XFS ------------------------------------------------------------------------------------------------

XFS_SIZE = 320 * MiB
#: name -> mkfs.xfs options
XFS_VARIANTS: dict[str, tuple[str, ...]] = {
    "v5": (),
    "v5-1k-blocks": ("-b", "size=1024"),
    "v5-rmapbt-2-ags": ("-m", "rmapbt=1", "-d", "agcount=2"),
    "v5-4k-sectors": ("-s", "size=4096"),
    "v4": ("-m", "crc=0"),
    "v4-512-byte-blocks": ("-m", "crc=0", "-b", "size=512"),
}


def make_xfs(image: Path, tree: Path, *options: str) -> Path:
    proto = image.with_suffix(".proto")
    proto.write_text("\n".join(["unused", "0 0", "d--755 0 0", *protofile_lines(tree), "$", ""]))
    blank(image, XFS_SIZE)
    run("mkfs.xfs", "-q", "-f", *options, "-p", proto, image)
    return image


def xfs_db(image: Path, *commands: str) -> str:
    return run("xfs_db", "-r", *(arg for command in commands for arg in ("-c", command)), image).stdout.decode()


def xfs_freesp(image: Path) -> list[tuple[int, int]]:
    """xfs_db's freesp -d: each AG's free extents (and AGFL blocks) as byte ranges, joined where they touch."""
    out = xfs_db(image, "sb 0", "p blocksize agblocks", "freesp -d")
    block = int(re.search(r"blocksize = (\d+)", out).group(1))
    ag_blocks = int(re.search(r"agblocks = (\d+)", out).group(1))
    extents = sorted(((int(ag) * ag_blocks + int(start)) * block, int(length) * block)
                     for ag, start, length in re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)$", out, re.M))
    return list(join_adjacent(extents))


def log_state(image: Path) -> str:
    """CLEAN or DIRTY, as xfs_logprint tells."""
    return re.search(r"state: <(\w+)>", run("xfs_logprint", "-t", image).stdout.decode()).group(1)


def xfs_repair_clean(image: Path) -> None:
    proc = subprocess.run(["xfs_repair", "-n", str(image)], capture_output=True)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0 and "ALERT" not in out, out


def delete_in_xfs(image: Path, mountpoint: Path, seed: int) -> bool:
    """The DELETED files removed and others written and deleted by the kernel; False where loop
    mounts do not work (the image then keeps only mkfs.xfs's free space)."""
    if not can_mount():
        return False
    mountpoint.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "xfs", "-o", "loop", str(image), str(mountpoint)],
                      capture_output=True).returncode != 0:
        return False
    try:
        for name in DELETED:
            (mountpoint / name).unlink()
        write_and_delete(mountpoint, seed, 300, 60_000)
    finally:
        run("umount", mountpoint)
    return True


@pytest.fixture(scope="module")
def xfs_images(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Iterator[dict[str, tuple[Path, bool]]]:
    """The variants' images and whether the kernel deleted files in them, made on first use."""
    base = tmp_path_factory.mktemp("sparsify-xfs")

    class Images(dict[str, tuple[Path, bool]]):
        def __missing__(self, variant: str) -> tuple[Path, bool]:
            image = make_xfs(base / f"{variant}.img", tree, *XFS_VARIANTS[variant])
            self[variant] = image, delete_in_xfs(image, base / f"{variant}.mnt", len(self))
            return self[variant]

    yield Images()


@needs_xfsprogs
@pytest.mark.parametrize("variant", list(XFS_VARIANTS))
def test_xfs_free_space_is_what_xfs_db_lists(xfs_images: dict[str, tuple[Path, bool]], variant: str) -> None:
    image, _ = xfs_images[variant]
    assert log_state(image) == "CLEAN"
    ranges = unused(image, XfsFileSystem)
    assert ranges == xfs_freesp(image)
    assert_ranges_shape(ranges, XFS_SIZE)


@needs_xfsprogs
@pytest.mark.parametrize("variant", list(XFS_VARIANTS))
def test_xfs_zeroing_unused_space_keeps_every_file(xfs_images: dict[str, tuple[Path, bool]], variant: str,
                                                   tmp_path: Path) -> None:
    image, deleted = xfs_images[variant]
    ranges = unused(image, XfsFileSystem)
    copy = tmp_path / "zeroed.img"
    stale = zeroed_copy(image, ranges, copy)
    if deleted:
        assert stale > 9 * MiB  # the deleted files' data was there, and is gone
    xfs_repair_clean(copy)
    before = digest(image, XfsFileSystem)
    assert len(before) > 340
    assert digest(copy, XfsFileSystem) == before


@needs_xfsprogs
def test_xfs_fragmented_free_space_in_multi_level_btrees(tmp_path: Path, tree: Path) -> None:
    """Thousands of small files written by the kernel, every other one deleted: free-space btrees of
    two levels, a log that went round several times."""
    image = make_xfs(tmp_path / "fs.img", tree, "-b", "size=1024", "-d", "agcount=2")
    with mounted(image, tmp_path / "mnt", "xfs") as root:
        for seed in range(3):
            write_and_delete(root, 10 + seed, 2500, 4000)
    levels = [int(v) for v in re.findall(r"bnolevel = (\d+)", xfs_db(image, "agf 0", "p bnolevel", "agf 1",
                                                                      "p bnolevel"))]
    assert max(levels) >= 2
    ranges = unused(image, XfsFileSystem)
    assert ranges == xfs_freesp(image)
    copy = tmp_path / "zeroed.img"
    zeroed_copy(image, ranges, copy)
    xfs_repair_clean(copy)
    assert digest(copy, XfsFileSystem) == digest(image, XfsFileSystem)


@needs_xfsprogs
def test_xfs_dirty_log_is_refused(tmp_path: Path, tree: Path) -> None:
    """A copy taken while mounted, and a file system shut down before unmounting: xfs_logprint
    calls their logs DIRTY (xfs_repair -n warns of changes in the log), and they are refused; once
    mounted again (the log replayed and cleanly unmounted) the same file system is read."""
    image = make_xfs(tmp_path / "fs.img", tree)
    copy = tmp_path / "while-mounted.img"
    with mounted(image, tmp_path / "mnt", "xfs") as root:
        write_and_delete(root, 3, 200, 100_000)
        sparse_copy(image, copy)
        run("xfs_io", "-x", "-c", "shutdown -f", root)
    for dirty in (copy, image):
        assert log_state(dirty) == "DIRTY"
        assert "log is dirty" in refusal(dirty, XfsFileSystem)
    with mounted(image, tmp_path / "mnt", "xfs"):
        pass
    assert log_state(image) == "CLEAN"
    assert unused(image, XfsFileSystem) == xfs_freesp(image)


@needs_xfsprogs
def test_xfs_external_log_is_declined(tmp_path: Path, tree: Path) -> None:
    """A log on another device cannot be read from the data device: whether it is clean is unknown."""
    log = blank(tmp_path / "log.img", 64 * MiB)
    image = make_xfs(tmp_path / "fs.img", tree, "-l", f"logdev={log}")
    assert int(re.search(r"logstart = (\d+)", xfs_db(image, "sb 0", "p logstart")).group(1)) == 0
    assert "external device" in refusal(image, XfsFileSystem)


def agf_field(image: Path, name: str) -> int:
    return int(re.search(rf"^{name} = (\d+)$", xfs_db(image, "agf 0", "p"), re.M).group(1))


@needs_xfsprogs
def test_xfs_agf_counting_other_than_its_btrees_is_refused(tmp_path: Path, tree: Path) -> None:
    """v4 (no CRCs): AG 0's AGF counting one free block more than its btrees hold; xfs_repair -n
    reports it."""
    image = make_xfs(tmp_path / "fs.img", tree, "-m", "crc=0")
    free = agf_field(image, "freeblks")
    write_at(image, 512 + 52, (free + 1).to_bytes(4, "big"))  # agf_freeblks, in the AGF at sector 1
    assert subprocess.run(["xfs_repair", "-n", str(image)], capture_output=True).returncode != 0
    assert "free blocks" in refusal(image, XfsFileSystem)


@needs_xfsprogs
def test_xfs_changed_btree_record_is_refused(tmp_path: Path, tree: Path) -> None:
    """v5: the length of the first free extent in AG 0's by-block btree grown by one; its CRC no
    longer matches (xfs_repair -n reports the block)."""
    image = make_xfs(tmp_path / "fs.img", tree)
    root = agf_field(image, "bnoroot")
    block = int(re.search(r"blocksize = (\d+)", xfs_db(image, "sb 0", "p blocksize")).group(1))
    length_at = root * block + 56 + 4  # the first record's blockcount, after the 56-byte header
    with open(image, "r+b") as f:
        length = int.from_bytes(os.pread(f.fileno(), 4, length_at), "big")
        os.pwrite(f.fileno(), (length + 1).to_bytes(4, "big"), length_at)
    assert subprocess.run(["xfs_repair", "-n", str(image)], capture_output=True).returncode != 0
    assert "CRC" in refusal(image, XfsFileSystem, CorruptImage)
