"""The ext2/3/4 reader against images made by mke2fs -d, debugfs and e2fsck from host trees (the oracle)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from diskimg import open_image
from diskimg.errors import CorruptImage, DiskImageError
from diskimg.inspection.fs import FileType, open_filesystem
from diskimg.inspection.fs.ext import ExtFileSystem

from .support.disks import BytesDisk, mkfs_into, sfdisk
from .support.files import blank, read_at, write_at
from .support.fs_compare import assert_tree_equal
from .support.tools import qemu_img, run
from .support.units import MiB

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mkfs.ext4", "debugfs", "e2fsck", "dumpe2fs")),
    reason="e2fsprogs not installed",
)

SLOW_TARGET = "../" + "a-rather-long-directory-name/" * 4 + "target"  # > 60 bytes: stored in a block


def make_tree(root: Path, seed: int = 1, big: int = 3 * MiB) -> Path:
    """A tree with what the reader must get right: sizes around a block, a multi-MiB file, holes,
    fast and slow symbolic links, hard links, modes, non-ASCII names, empty files and directories."""
    rng = random.Random(seed)
    (root / "etc").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a/b/c").mkdir(parents=True)
    for size in (0, 1, 4095, 4096, 4097):
        (root / f"size-{size}").write_bytes(rng.randbytes(size))
    (root / "big").write_bytes(rng.randbytes(big))
    with open(root / "sparse", "wb") as f:  # data, a hole, data, a hole, data
        f.write(rng.randbytes(5000))
        f.seek(1 * MiB + 123)
        f.write(rng.randbytes(70000))
        f.seek(5 * MiB)
        f.write(rng.randbytes(100))
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "a/b/c/deep.txt").write_text("deep\n")
    (root / "héllo wörld.txt").write_text("non-ASCII name\n")
    (root / "日本語").mkdir()
    (root / "日本語/ファイル").write_bytes(b"\xe3\x81\x82" * 100)
    os.link(root / "size-4097", root / "hard-link")
    os.symlink("etc/passwd", root / "fast-link")
    os.symlink("/etc/shadow", root / "absolute-link")
    os.symlink("nowhere", root / "dangling-link")
    os.symlink(SLOW_TARGET, root / "slow-link")
    os.chmod(root / "etc/shadow", 0o600)
    os.chmod(root / "a/b", 0o1777)
    os.chmod(root / "size-1", 0o4755)
    os.chmod(root / "size-0", 0o640)
    os.mkfifo(root / "fifo")
    return root


def mkfs(image: Path, tree: Path, size: int, kind: str = "ext4", *options: str) -> Path:
    blank(image, size)
    run(f"mkfs.{kind}", "-q", "-F", *options, "-d", tree, image)
    return image


def open_ext(image: Path) -> ExtFileSystem:
    """The driver over diskimg's own RAW reader of the image file."""
    disk = open_image(image, "raw")
    return ExtFileSystem(disk, 0, disk.virtual_size)


def debugfs(image: Path, *requests: str, write: bool = False) -> str:
    """debugfs' output for each request (read from standard input, one a line)."""
    args = ["debugfs"] + (["-w"] if write else []) + ["-f", "-"]
    out = run(*args, image, input="".join(f"{request}\n" for request in requests).encode()).stdout.decode()
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("debugfs: "))


def features(image: Path) -> set[str]:
    out = run("dumpe2fs", "-h", image).stdout.decode()
    return set(re.search(r"Filesystem features:\s*(.*)", out).group(1).split())


def inode_of(image: Path, path: str) -> tuple[int, int]:
    """(block, byte offset in it) of ``path``'s inode, from debugfs imap."""
    out = debugfs(image, f"imap {path}")
    found = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", out)
    return int(found.group(1)), int(found.group(2), 16)


def block_size(image: Path) -> int:
    out = run("dumpe2fs", "-h", image).stdout.decode()
    return int(re.search(r"Block size:\s*(\d+)", out).group(1))


def assert_links_and_owners(fs: ExtFileSystem, tree: Path) -> None:
    for path in ("etc/shadow", "size-4097", "big", "a/b"):
        host = os.lstat(tree / path)
        guest = fs.stat("/" + path, follow_symlinks=False)
        assert (guest.uid, guest.gid, guest.nlink) == (host.st_uid, host.st_gid, host.st_nlink), path
        assert int(guest.mtime) == int(host.st_mtime), path
    assert fs.stat("/hard-link").node == fs.stat("/size-4097").node
    assert fs.stat("/fifo", follow_symlinks=False).type is FileType.OTHER
    assert fs.read_file("/fast-link") == (tree / "etc/passwd").read_bytes()  # resolved inside the guest
    assert fs.read_file("/absolute-link") == (tree / "etc/shadow").read_bytes()


VARIANTS = {
    "ext4": ("ext4", ()),
    "ext4-1k": ("ext4", ("-b", "1024")),
    "ext4-32bit-descriptors": ("ext4", ("-O", "^64bit,^metadata_csum")),
    "ext4-no-flex_bg-128-byte-inodes": ("ext4", ("-O", "^flex_bg", "-I", "128")),
    "ext4-block-map": ("ext4", ("-O", "^extent,^64bit", "-b", "1024")),
    "ext4-bigalloc-1k": ("ext4", ("-O", "bigalloc", "-b", "1024", "-C", "4096")),
    "ext4-64k-blocks": ("ext4", ("-b", "65536")),
    "ext4-sparse_super2-large_dir": ("ext4", ("-O", "^has_journal,sparse_super2,large_dir")),
    "ext4-inline_data": ("ext4", ("-O", "inline_data")),
    "ext4-inline_data-1k": ("ext4", ("-O", "inline_data", "-b", "1024", "-I", "512")),
    "ext3": ("ext3", ()),
    "ext2-1k": ("ext2", ("-b", "1024")),
    "ext2-2k": ("ext2", ("-b", "2048")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tree_reads_back(tmp_path: Path, variant: str) -> None:
    kind, options = VARIANTS[variant]
    tree = make_tree(tmp_path / "tree")
    image = mkfs(tmp_path / "fs.img", tree, 48 * MiB, kind, *options)
    fs = open_ext(image)
    assert fs.type == kind
    assert assert_tree_equal(fs, tree) == 24
    assert_links_and_owners(fs, tree)
    assert fs.readlink("/slow-link") == SLOW_TARGET
    assert fs.stat("/etc/shadow").flags == frozenset()


def test_inline_data_is_used(tmp_path: Path) -> None:
    """Small files and directories really are inline (debugfs says so) and read back; records that
    continue a directory in "system.data" (set with debugfs ea_set) are listed as debugfs lists them."""
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    for index in range(3):
        (tree / "dir" / f"n{index}").write_bytes(bytes([65 + index]) * (40 * index))
    os.symlink(SLOW_TARGET, tree / "slow-link")
    image = mkfs(tmp_path / "fs.img", tree, 16 * MiB, "ext4", "-O", "inline_data", "-I", "1024")
    assert "Size of inline data: 60" in debugfs(image, "stat /dir")
    assert "Size of inline data: 80" in debugfs(image, "stat /dir/n2")  # 60 in i_block + 20 in the xattr
    assert "Flags: 0x10000000" in debugfs(image, "stat /slow-link")  # a slow symbolic link, inline
    fs = open_ext(image)
    assert assert_tree_equal(fs, tree) == 5

    target = int(debugfs(image, "stat /dir/n1").split()[1])
    more = (target.to_bytes(4, "little") + (12).to_bytes(2, "little") + bytes([2, 1]) + b"x1\0\0"
            + target.to_bytes(4, "little") + (24).to_bytes(2, "little") + bytes([5, 1]) + b"extra" + bytes(11))
    (tmp_path / "records").write_bytes(more)
    debugfs(image, f"ea_set -f {tmp_path / 'records'} /dir system.data", write=True)
    listed = re.findall(r"\(\d+\) (\S+)", debugfs(image, "ls /dir"))
    assert "extra" in listed
    fs = open_ext(image)
    assert fs.listdir("/dir") == [name for name in listed if name not in (".", "..")]
    assert fs.read_file("/dir/extra") == (tree / "dir/n1").read_bytes()


def test_meta_bg_64bit_inodes_in_late_groups(tmp_path: Path) -> None:
    """64bit descriptors placed by meta_bg, with inodes spread over 64 groups (4 descriptor blocks)."""
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for index in range(300):
        (tree / "many" / f"file{index}").write_text(f"file {index}\n" * index)
    image = mkfs(tmp_path / "fs.img", tree, 64 * MiB, "ext4", "-b", "1024", "-g", "1024", "-N", "256",
                 "-O", "64bit,meta_bg,^resize_inode")
    assert {"64bit", "meta_bg"} <= features(image)
    inodes_per_group = int(re.search(r"Inodes per group:\s*(\d+)", run("dumpe2fs", "-h", image).stdout.decode())[1])
    numbers = [int(line.split()[0]) for line in debugfs(image, "ls -l /many").splitlines() if line.strip()]
    assert max(numbers) > 16 * inodes_per_group  # beyond the first block of descriptors
    assert assert_tree_equal(open_ext(image), tree) == 301


@pytest.mark.parametrize("block_size_option", ["1024", "4096"])
def test_htree_directory(tmp_path: Path, block_size_option: str) -> None:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    for index in range(1500):
        (tree / "dir" / f"entry-with-a-longer-name-{index:05d}").write_bytes(b"x" * (index % 3))
    image = mkfs(tmp_path / "fs.img", tree, 32 * MiB, "ext4", "-b", block_size_option)
    subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True)  # index the directories
    assert "Root node dump" in debugfs(image, "htree /dir")
    fs = open_ext(image)
    assert assert_tree_equal(fs, tree) == 1501
    for index in (0, 1000, 1499):
        name = f"/dir/entry-with-a-longer-name-{index:05d}"
        assert fs.read_file(name) == (tree / name[1:]).read_bytes()
    assert not fs.exists("/dir/entry-with-a-longer-name-01500")


@pytest.mark.parametrize("options", [("-O", "^extent,^64bit"), ()], ids=["block-map", "extents"])
def test_sparse_file_through_triple_indirection(tmp_path: Path, options: tuple[str, ...]) -> None:
    """With 1 KiB blocks the block map's single, double and triple indirect ranges start at 12 KiB,
    268 KiB and 64.3 MiB: data in each, holes between."""
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(7)
    pieces = {0: rng.randbytes(3000), 12 * 1024 + 17: rng.randbytes(2000), 300 * 1024: rng.randbytes(5000),
              70 * MiB + 5: rng.randbytes(9000)}
    with open(tree / "holes", "wb") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
        f.truncate(72 * MiB)
    image = mkfs(tmp_path / "fs.img", tree, 16 * MiB, "ext4", "-b", "1024", *options)
    fs = open_ext(image)
    digest = hashlib.sha256()
    for piece in fs.iter_file("/holes"):
        digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256((tree / "holes").read_bytes()).hexdigest()
    assert fs._read(fs.resolve("/holes"), 70 * MiB, 9005) == bytes(5) + pieces[70 * MiB + 5]


def test_fragmented_file_with_deep_extent_tree(tmp_path: Path) -> None:
    """A file written by debugfs into the one-block gaps of a full file system: an extent tree of depth 2."""
    tree = tmp_path / "tree"
    (tree / "f").mkdir(parents=True)
    rng = random.Random(3)
    for index in range(1500):
        (tree / "f" / str(index)).write_bytes(rng.randbytes(1024))
    image = mkfs(tmp_path / "fs.img", tree, 2 * MiB, "ext4", "-b", "1024", "-N", "1600", "-O", "^has_journal")
    script = tmp_path / "script"
    script.write_text("".join(f"rm /f/{index}\n" for index in range(1, 1500, 2)))
    run("debugfs", "-w", "-f", script, image)
    for index in range(1, 1500, 2):
        (tree / "f" / str(index)).unlink()
    (tree / "frag").write_bytes(rng.randbytes(600_000))
    run("debugfs", "-w", "-R", f"write {tree / 'frag'} frag", image)
    assert re.search(r"^\s*2/\s*2\s", debugfs(image, "ex /frag"), re.M)  # a leaf two levels down
    assert assert_tree_equal(open_ext(image), tree) == 752


def test_uninitialized_extents_read_as_zeros(tmp_path: Path) -> None:
    """Blocks fallocated over the stale data of a deleted file read as zeros (as debugfs cat says)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "old").write_bytes(random.Random(5).randbytes(64 * 1024))
    image = mkfs(tmp_path / "fs.img", tree, 8 * MiB, "ext4", "-O", "^has_journal")
    bs = block_size(image)
    debugfs(image, "rm /old", "write /dev/null new", "fallocate /new 0 15", f"sif /new size {16 * bs}", write=True)
    assert "Uninit" in debugfs(image, "ex /new")
    physical = int(debugfs(image, "bmap /new 0").split()[0])
    assert any(read_at(image, physical * bs, bs))  # the deleted file's data is still there
    expected = run("debugfs", "-R", "cat /new", image).stdout
    assert len(expected) == 16 * bs and not any(expected)
    assert open_ext(image).read_file("/new") == expected


def test_inode_flags_ids_and_large_sizes(tmp_path: Path) -> None:
    """Flags, 32-bit uid/gid (16-bit halves in two places) and a size above 4 GiB (i_size_high), set with debugfs."""
    tree = make_tree(tmp_path / "tree", big=4096)
    image = mkfs(tmp_path / "fs.img", tree, 16 * MiB)
    large = (5 << 32) + 4097
    debugfs(image, "set_inode_field /etc/shadow flags 0x80010", "set_inode_field /etc/passwd flags 0x80020",
            "sif /etc/passwd uid 123456", "sif /etc/passwd gid 654321", f"sif /big size {large}", write=True)
    assert "User: 123456 Group: 654321" in " ".join(debugfs(image, "stat /etc/passwd").split())
    fs = open_ext(image)
    assert "immutable" in fs.stat("/etc/shadow").flags
    assert "append" not in fs.stat("/etc/shadow").flags
    assert "append" in fs.stat("/etc/passwd").flags
    assert fs.stat("/big").flags == frozenset()
    assert fs.read_file("/etc/shadow") == (tree / "etc/shadow").read_bytes()
    assert (fs.stat("/etc/passwd").uid, fs.stat("/etc/passwd").gid) == (123456, 654321)
    big = fs.stat("/big")
    assert big.size == large
    assert fs._read(big.node, 0, 4096) == (tree / "big").read_bytes()
    assert fs._read(big.node, large - 10, 100) == bytes(10)  # a hole up to the size


def test_mtime_nanoseconds_and_epoch(tmp_path: Path) -> None:
    """i_mtime_extra: nanoseconds in the upper 30 bits, two bits extending the seconds past 2038."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "recent").write_text("a")
    (tree / "future").write_text("b")
    image = mkfs(tmp_path / "fs.img", tree, 8 * MiB, "ext4", "-I", "256")
    debugfs(image, "sif /recent mtime 0x3a7b8372", f"sif /recent mtime_extra {123456789 << 2}",
            "sif /future mtime 0x10", f"sif /future mtime_extra {(5 << 2) | 1}", write=True)
    assert "0x3a7b8372:1d6f3454" in debugfs(image, "stat /recent")  # debugfs wrote what was asked
    fs = open_ext(image)
    assert fs.stat("/recent").mtime == pytest.approx(0x3A7B8372 + 0.123456789, abs=1e-6)
    assert fs.stat("/future").mtime == pytest.approx((1 << 32) + 0x10 + 5e-9, abs=1e-6)


@pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("sfdisk")), reason="qemu-img/sfdisk missing")
def test_qcow2_partition_through_open_filesystem(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    disk = blank(tmp_path / "disk.raw", 80 * MiB)
    sfdisk(disk, "label: dos\nstart=2048, size=120832, type=83\n")
    start, size = 2048 * 512, 120832 * 512
    mkfs_into(disk, start, size, "mkfs.ext4", "-q", "-F", "-d", str(tree), tmp=tmp_path)
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, qcow2)
    with open_image(qcow2) as reader:
        fs = open_filesystem(reader, start, size)
        assert isinstance(fs, ExtFileSystem) and fs.type == "ext4"
        assert assert_tree_equal(fs, tree) == 24
        assert fs.readlink("/slow-link") == SLOW_TARGET


# -- broken structures -------------------------------------------------------------------------------


def small_image(tmp_path: Path, *options: str) -> tuple[Path, Path]:
    tree = make_tree(tmp_path / "tree", big=200 * 1024)
    return mkfs(tmp_path / "fs.img", tree, 8 * MiB, "ext4", "-b", "1024", *options), tree


def test_bad_extent_header_refused(tmp_path: Path) -> None:
    image, _ = small_image(tmp_path)
    block, offset = inode_of(image, "/big")
    i_block = 1024 * block + offset + 0x28
    assert read_at(image, i_block, 2) == b"\x0a\xf3"  # the extent magic, says debugfs' inode address
    write_at(image, i_block + 6, (6).to_bytes(2, "little"))  # eh_depth 6: deeper than the kernel allows
    with pytest.raises(CorruptImage, match="depth"):
        open_ext(image).read_file("/big")
    write_at(image, i_block, b"\0\0")
    with pytest.raises(CorruptImage, match="magic"):
        open_ext(image).read_file("/big")


def test_bad_directory_record_refused(tmp_path: Path) -> None:
    image, _ = small_image(tmp_path)
    first = int(debugfs(image, "blocks /a/b/c").split()[0])
    record = 1024 * first
    assert read_at(image, record + 8, 1) == b"."
    write_at(image, record + 4, (2000).to_bytes(2, "little"))  # rec_len past the 1 KiB block
    with pytest.raises(CorruptImage, match="rec_len"):
        open_ext(image).listdir("/a/b/c")
    write_at(image, record + 4, (12).to_bytes(2, "little") + b"\x20")  # name_len 32 in a 12-byte record
    with pytest.raises(CorruptImage, match="name_len"):
        open_ext(image).listdir("/a/b/c")


def test_block_past_the_file_system_refused(tmp_path: Path) -> None:
    image, _ = small_image(tmp_path, "-O", "^extent,^64bit")
    block, offset = inode_of(image, "/big")
    write_at(image, 1024 * block + offset + 0x28, (10**9).to_bytes(4, "little"))  # first direct block
    with pytest.raises(CorruptImage, match="outside the file system"):
        open_ext(image).read_file("/big")


def walk_everything(fs: ExtFileSystem) -> None:
    for path, info in fs.walk("/"):
        if info.is_symlink:
            fs.readlink(path)
        elif info.is_file:
            for count, _ in enumerate(fs.iter_file(path)):
                if count:
                    break


@pytest.mark.parametrize("options", [("-O", "inline_data"), ("-O", "^extent,^64bit,^has_journal"),
                                     ("-O", "^has_journal")], ids=["inline", "block-map", "extents"])
def test_fuzzed_metadata_raises_only_diskimg_errors(tmp_path: Path, options: tuple[str, ...]) -> None:
    """Random bytes of the superblock, descriptors, inode table and directories flipped or zeroed:
    the walk works or raises a DiskImageError, in bounded time."""
    tree = make_tree(tmp_path / "tree", big=20 * 1024)
    image = mkfs(tmp_path / "fs.img", tree, 2 * MiB, "ext4", "-b", "1024", "-N", "64", *options)
    pristine = image.read_bytes()
    walk_everything(ExtFileSystem(BytesDisk(pristine), 0, len(pristine)))
    out = run("dumpe2fs", image).stdout.decode()
    table = re.search(r"Inode table at (\d+)-(\d+)", out)
    regions = [(1024, 2048), (2048, 3072), (int(table[1]) * 1024, (int(table[2]) + 1) * 1024)]
    for directory in ("/", "/a/b/c", "/etc", "/日本語"):
        for block in debugfs(image, f"blocks {directory}").split():
            regions.append((int(block) * 1024, int(block) * 1024 + 1024))
    rng = random.Random(11)
    deadline = time.monotonic() + 25
    failures = 0
    for _ in range(150):  # each of the three layouts: 450 variants in all
        data = bytearray(pristine)
        for _ in range(rng.randint(1, 8)):
            start, end = rng.choice(regions)
            where = rng.randrange(start, end)
            data[where] = 0 if rng.random() < 0.3 else data[where] ^ (1 << rng.randrange(8))
        try:
            walk_everything(ExtFileSystem(BytesDisk(bytes(data)), 0, len(data)))
        except DiskImageError:
            failures += 1
        assert time.monotonic() < deadline, "fuzzing took too long"
    assert failures  # some mutations must have been caught
