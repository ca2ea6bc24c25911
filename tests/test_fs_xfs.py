"""The XFS driver against file systems made by mkfs.xfs from a host tree (the oracle: the tree itself,
and xfs_db for what the tree cannot show: inode formats, flags, extent records)."""

from __future__ import annotations

import json
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
from diskimg.inspection.fs.xfs import XfsFileSystem

from .support.disks import FileDisk, copy_in, sfdisk
from .support.files import blank
from .support.filesystems import XFS_SIZE, make_xfs
from .support.fs_compare import assert_tree_equal
from .support.tools import qemu_img, requires_qemu, run
from .support.units import MiB

pytestmark = pytest.mark.skipif(shutil.which("mkfs.xfs") is None or shutil.which("xfs_db") is None,
                                reason="xfsprogs (mkfs.xfs, xfs_db) not installed")


#: symbolic link targets longer than the inode's literal area (v5: 336 bytes, v4 with 256-byte
#: inodes: 156) are kept in blocks
LONG_TARGET = "/".join(["a-rather-long-directory-name"] * 21)  # 608 bytes
MEDIUM_TARGET = "../" + "m" * 197  # 200 bytes

VARIANTS = {
    "v5": (),
    "v5-1k-blocks": ("-b", "size=1024"),
    "v4-ftype0-8k-dirblocks": ("-m", "crc=0", "-n", "ftype=0,size=8192"),
    "v4-ftype1": ("-m", "crc=0", "-n", "ftype=1", "-i", "size=256"),
}


def build_tree(root: Path, counts: tuple[int, ...] = (50, 500, 2000), long_link: bool = False) -> None:
    """A tree with every case the driver must handle: short-form, block, leaf and node directories
    (the largest, with long names, in many blocks: a btree block map), files around a block's size,
    inline symlinks (and with ``long_link`` one kept in blocks), modes, non-ASCII names."""
    rng = random.Random(6)
    (root / "etc").mkdir(parents=True)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/os-release").write_text('NAME="Test"\nID=test\n')
    sizes = root / "sizes"
    sizes.mkdir()
    for name, size in (("empty", 0), ("one", 1), ("b4095", 4095), ("b4096", 4096), ("b4097", 4097),
                       ("big", 3 * MiB + 123)):
        (sizes / name).write_bytes(rng.randbytes(size))
    (sizes / "setuid").write_bytes(b"#!/bin/sh\n")
    (sizes / "setuid").chmod(0o4755)
    (sizes / "private").write_bytes(b"secret\n")
    (sizes / "private").chmod(0o600)
    small = root / "small"
    small.mkdir()
    for i in range(40):
        directory = small / f"d{i:02}"
        directory.mkdir()
        (directory / "a.txt").write_text(f"{i}\n")
        (directory / "up").symlink_to("../d00")
    for count in counts:
        directory = root / f"d{count}"
        directory.mkdir()
        padding = "-" + "n" * 40 if count >= 1000 else ""
        for i in range(count):  # data in each file interleaves the directory's blocks with others
            (directory / f"entry-{i:05}{padding}").write_text(f"{i}\n")
    (root / "links").mkdir()
    (root / "links/short").symlink_to("../sizes/one")
    (root / "links/absolute").symlink_to("/etc/passwd")
    (root / "links/medium").symlink_to(MEDIUM_TARGET)
    if long_link:
        (root / "links/long").symlink_to(LONG_TARGET)
    (root / "ünïcödé.txt").write_text("ü\n")
    (root / "日本語").mkdir()
    (root / "日本語/файл").write_bytes(b"\xd1\x84\n")
    (root / "日本語").chmod(0o750)


def xfs_db(image: Path, *commands: str, expert: bool = False) -> str:
    args = ["xfs_db", *(["-x"] if expert else ["-r"])]
    for command in commands:
        args += ["-c", command]
    return run(*args, image).stdout.decode()


def db_field(output: str, name: str) -> str:
    found = re.search(rf"^{re.escape(name)} = (.*)$", output, re.M)
    assert found, f"{name} not in {output[:500]}"
    return found.group(1)


def inode_number(image: Path, path: str) -> int:
    found = re.search(r"current inode number is (\d+)", xfs_db(image, f"path {path}", "inode"))
    assert found, path
    return int(found.group(1))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xfs-tree") / "root"
    build_tree(root)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory, tree) -> dict[str, Path]:
    """One image per variant, built on first use."""
    base = tmp_path_factory.mktemp("xfs-images")

    class Lazy(dict):
        def __missing__(self, variant: str) -> Path:
            self[variant] = make_xfs(base / f"{variant}.img", tree, *VARIANTS[variant])
            return self[variant]

    return Lazy()


def version_of(variant: str) -> int:
    return int(variant[1])


def open_xfs(image: Path) -> XfsFileSystem:
    disk = FileDisk(image)
    fs = open_filesystem(disk, 0, disk.virtual_size)
    assert isinstance(fs, XfsFileSystem)
    return fs


def data_fork_format(image: Path, path: str) -> str:
    return db_field(xfs_db(image, f"path {path}", "print core.format"), "core.format")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tree_matches_source(images, tree, variant):
    image = images[variant]
    # the tree reaches every directory form and a btree block map (xfs_db says which it got)
    assert data_fork_format(image, "/small/d01") == "1 (local)"
    assert data_fork_format(image, "/d50") == "2 (extents)"
    assert data_fork_format(image, "/d2000") == "3 (btree)"
    assert data_fork_format(image, "/links/medium") == ("1 (local)" if version_of(variant) == 5 else "2 (extents)")
    fs = open_xfs(image)
    assert fs.type == "xfs"
    assert fs.geometry.version == version_of(variant)
    assert assert_tree_equal(fs, tree) > 2600
    entries = {entry.name: entry for entry in fs.scandir("/")}
    expect_types = variant != "v4-ftype0-8k-dirblocks"
    assert entries["d50"].type is (FileType.DIRECTORY if expect_types else None)
    assert fs.read_text("/links/absolute") == "root:x:0:0:root:/root:/bin/bash\n"  # resolved in the guest
    assert fs.read_file("/small/d07/up/a.txt") == b"0\n"


def test_remote_symlinks_made_by_mkfs(tmp_path):
    """Targets longer than the inode's literal area, in blocks. mkfs.xfs 6.1 writes v5 remote symlink
    blocks without their XSLM header; xfs_repair rejects such a link, and so does the driver
    (CorruptImage), where later mkfs.xfs versions write it right."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "long").symlink_to(LONG_TARGET)
    (root / "medium").symlink_to(MEDIUM_TARGET)
    v4 = open_xfs(make_xfs(tmp_path / "v4.img", root, "-m", "crc=0", "-i", "size=256"))
    assert v4.readlink("/long") == LONG_TARGET
    assert v4.readlink("/medium") == MEDIUM_TARGET
    image = make_xfs(tmp_path / "v5.img", root)
    repair = subprocess.run(["xfs_repair", "-n", image], capture_output=True) if shutil.which("xfs_repair") else None
    v5 = open_xfs(image)
    assert v5.readlink("/medium") == MEDIUM_TARGET  # inline in a 512-byte inode
    if repair is not None and repair.returncode == 0:
        assert v5.readlink("/long") == LONG_TARGET
    else:
        with pytest.raises(CorruptImage):
            v5.readlink("/long")


def test_ascii_case_insensitive_names(tmp_path):
    """``-n version=ci``: names keep their case but are looked up without it."""
    root = tmp_path / "root"
    (root / "Config").mkdir(parents=True)
    (root / "Config/README.txt").write_text("hello\n")
    fs = open_xfs(make_xfs(tmp_path / "ci.img", root, "-n", "version=ci"))
    assert fs.case_insensitive
    assert fs.listdir("/Config") == ["README.txt"]
    assert fs.read_text("/config/readme.TXT") == "hello\n"
    plain = open_xfs(make_xfs(tmp_path / "plain.img", root))
    assert not plain.exists("/config/readme.TXT") and plain.exists("/Config/README.txt")


def test_inode_numbers_above_32_bits(tmp_path):
    """Allocation groups of 2^28 blocks put inodes of the third group above 2^32: short-form
    directories then store 8-byte inode numbers (i8count). A sparse 2.1 TB image (the log is
    the only data written)."""
    root = tmp_path / "root"
    for i in range(12):  # mkfs spreads new directories over the groups
        (root / f"dir{i}/sub").mkdir(parents=True)
        (root / f"dir{i}/sub/file").write_text(f"{i}\n")
    try:
        image = make_xfs(tmp_path / "wide.img", root, "-K", "-d", "agsize=268435455b", "-l", "size=64m",
                         size=2100 << 30)
    except OSError as error:  # the host's file system cannot hold so large a sparse file
        pytest.skip(str(error))
    assert int(db_field(xfs_db(image, "path /", "print u3.sfdir3.hdr.i8count"), "u3.sfdir3.hdr.i8count")) > 0
    fs = open_xfs(image)
    assert assert_tree_equal(fs, root) == 36
    assert max(entry.node for entry in fs.scandir("/")) >= 1 << 32


def test_inode_flags_set_with_xfs_db(images, tmp_path):
    for variant in ("v5", "v4-ftype1"):
        image = tmp_path / f"{variant}.img"
        run("cp", "--sparse=always", images[variant], image)
        shadow, passwd = inode_number(image, "/etc/shadow"), inode_number(image, "/etc/passwd")
        xfs_db(image, f"inode {shadow}", "write core.immutable 1", f"inode {passwd}", "write core.append 1",
               expert=True)
        fs = open_xfs(image)
        assert "immutable" in fs.stat("/etc/shadow").flags
        assert "append" not in fs.stat("/etc/shadow").flags
        assert "append" in fs.stat("/etc/passwd").flags
        assert fs.stat("/etc/os-release").flags == frozenset()
        assert fs.stat("/etc/shadow").node == shadow


def test_unwritten_extent_and_hole(images, tree, tmp_path):
    """Extent records rewritten with xfs_db: an unwritten extent reads as zeros; moving the extent's
    logical start leaves a hole that reads as zeros before the (shifted) data."""
    for variant, fork in (("v5", "u3"), ("v4-ftype0-8k-dirblocks", "u")):
        big = (tree / "sizes/big").read_bytes()
        image = tmp_path / f"{variant}.img"
        run("cp", "--sparse=always", images[variant], image)
        fs = open_xfs(image)
        block_size = fs.geometry.block_size
        big_inode, b4097_inode = inode_number(image, "/sizes/big"), inode_number(image, "/sizes/b4097")
        xfs_db(image, f"inode {big_inode}", f"write {fork}.bmx[0].extentflag 1",
               f"inode {b4097_inode}", f"write {fork}.bmx[0].startoff 1", expert=True)
        fs = open_xfs(image)
        assert fs.read_file("/sizes/big") == bytes(len(big))
        b4097 = (tree / "sizes/b4097").read_bytes()
        assert fs.read_file("/sizes/b4097") == bytes(block_size) + b4097[: len(b4097) - block_size]


@requires_qemu
@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")
def test_through_qcow2_partition(images, tree, tmp_path):
    raw = blank(tmp_path / "disk.raw", XFS_SIZE + 2 * MiB)
    sfdisk(raw, f"label: dos\nstart=2048, size={XFS_SIZE // 512}, type=83\n")
    partitions = json.loads(run("sfdisk", "--json", raw).stdout)["partitiontable"]["partitions"]
    offset = partitions[0]["start"] * 512
    copy_in(raw, images["v4-ftype1"], offset)
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img("convert", "-O", "qcow2", raw, qcow2)
    with open_image(qcow2) as disk:
        fs = open_filesystem(disk, offset, partitions[0]["size"] * 512)
        assert isinstance(fs, XfsFileSystem)
        compared = 0
        for sub in ("sizes", "links", "small", "d500", "日本語"):
            compared += assert_tree_equal(fs, tree / sub, f"/{sub}")
        assert compared > 600


class PatchedDisk:
    """A disk file read with some bytes replaced (the file itself is left alone)."""

    def __init__(self, path: Path, patches: dict[int, int]) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.patches = patches

    def read_at(self, offset: int, length: int) -> bytes:
        data = bytearray(os.pread(self.fd, length, offset))
        for position, value in self.patches.items():
            if offset <= position < offset + len(data):
                data[position - offset] = value
        return bytes(data)

    def close(self) -> None:
        os.close(self.fd)


class RecordingDisk(PatchedDisk):
    """Remembers which byte ranges were read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, {})
        self.ranges: set[tuple[int, int]] = set()

    def read_at(self, offset: int, length: int) -> bytes:
        self.ranges.add((offset, length))
        return super().read_at(offset, length)


def read_everything(fs: XfsFileSystem, skip_data_under: str = "/wide/") -> int:
    """Walk the whole tree, read each link and the start of each file (but those under
    ``skip_data_under``, to keep the fuzz test quick); returns the entries seen."""
    seen = 0
    for path, info in fs.walk("/"):
        seen += 1
        if info.is_symlink:
            fs.readlink(path)
        elif info.is_file and not path.startswith(skip_data_under):
            for _piece in fs.iter_file(path, chunk=64 << 10):
                break
    return seen


@pytest.mark.parametrize("options, wide_entries", [(("-m", "crc=0", "-i", "size=256"), 250), ((), 400)],
                         ids=["v4", "v5"])
def test_fuzzed_metadata_raises_only_diskimage_errors(tmp_path, options, wide_entries):
    """Bytes of the metadata a walk reads (superblock, inodes, directory, btree and symlink blocks)
    flipped, zeroed or randomised: walking the tree either works or raises a DiskImageError."""
    root = tmp_path / "root"
    build_tree(root, counts=(), long_link="crc=0" in options)
    wide = root / "wide"
    wide.mkdir()
    for i in range(wide_entries):  # long names: a directory of many blocks, interleaved with file data
        (wide / f"{i:04}-{'w' * 200}").write_text(f"{i}\n")
    image = make_xfs(tmp_path / "fuzz.img", root, *options)
    assert data_fork_format(image, "/wide") == "3 (btree)"
    recorder = RecordingDisk(image)
    fs = XfsFileSystem(recorder, 0, XFS_SIZE)
    for path, info in fs.walk("/"):  # metadata only: no file data is read
        if info.is_symlink:
            fs.readlink(path)
    metadata_reads = sorted(recorder.ranges)
    recorder.close()
    assert read_everything(open_xfs(image)) > wide_entries
    rng = random.Random(20261122)
    started = time.monotonic()
    outcomes = {"ok": 0, "error": 0}
    for variant in range(150):
        patches = {}
        for _ in range(rng.randint(1, 4)):
            offset, length = rng.choice(metadata_reads)
            patches[offset + rng.randrange(length)] = rng.choice([0, 0xFF, rng.randrange(256)])
        disk = PatchedDisk(image, patches)
        one = time.monotonic()
        try:
            read_everything(XfsFileSystem(disk, 0, XFS_SIZE))
            outcomes["ok"] += 1
        except DiskImageError:
            outcomes["error"] += 1
        except Exception as error:  # the failure this test looks for
            raise AssertionError(f"variant {variant} {patches}: {error!r}") from error
        finally:
            disk.close()
        assert time.monotonic() - one < 5, f"variant {variant} {patches} took too long"
    assert outcomes["error"] > 0 and outcomes["ok"] > 0, outcomes
    assert time.monotonic() - started < 60


def test_kernel_written_file_system(tmp_path):
    """What only the kernel writes (mkfs.xfs cannot): a v5 remote symlink with its XSLM header, holes,
    unwritten (fallocated) extents, a file of hundreds of extents (a bmap btree with two leaves),
    a directory with freed entries, attributes set with chattr. The oracle is the kernel's own
    view of the mounted tree, copied out before unmounting."""
    if os.geteuid() != 0 or shutil.which("mount") is None or shutil.which("xfs_io") is None:
        pytest.skip("needs root, mount and xfs_io")
    image = blank(tmp_path / "k.img", XFS_SIZE)
    run("mkfs.xfs", "-q", image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "loop", image, mnt], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a loop device here")
    host = tmp_path / "host"
    try:
        rng = random.Random(7)
        (mnt / "remote").symlink_to(LONG_TARGET)
        (mnt / "remote1000").symlink_to("x" * 1000)
        with open(mnt / "sparse", "wb") as f:
            for offset in (0, 1 * MiB, 5 * MiB + 100):
                f.seek(offset)
                f.write(rng.randbytes(5000))
            f.truncate(8 * MiB)
        with open(mnt / "prealloc", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 2 * MiB)
            f.seek(512 * 1024)
            f.write(rng.randbytes(10000))
        (mnt / "fragmented").write_bytes(rng.randbytes(3 * MiB))
        os.sync()
        run("xfs_io", *[arg for block in range(0, 768, 2) for arg in ("-c", f"fpunch {block * 4}k 4k")],
            mnt / "fragmented")
        churn = mnt / "churn"
        churn.mkdir()
        for i in range(3000):
            (churn / f"file-{i:05}").write_bytes(b"")
        for i in range(0, 3000, 3):
            (churn / f"file-{i:05}").unlink()
        (mnt / "flags").mkdir()
        (mnt / "flags/immutable").write_text("i\n")
        (mnt / "flags/append").write_text("a\n")
        run("xfs_io", "-c", "chattr +i", mnt / "flags/immutable")
        run("xfs_io", "-c", "chattr +a", mnt / "flags/append")
        run("cp", "-a", f"{mnt}/.", host)
    finally:
        run("umount", mnt)
    assert data_fork_format(image, "/fragmented") == "3 (btree)"
    assert int(db_field(xfs_db(image, "path /fragmented", "print core.nextents"), "core.nextents")) > 300  # 2 leaves
    assert "flag 1" in xfs_db(image, "path /prealloc", "bmap")  # unwritten extents
    assert data_fork_format(image, "/remote") == "2 (extents)"
    fs = open_xfs(image)
    assert assert_tree_equal(fs, host) > 2000
    assert fs.readlink("/remote") == LONG_TARGET
    assert fs.stat("/flags/immutable").flags == {"immutable"}
    assert fs.stat("/flags/append").flags == {"append"}
    # reads that start inside the second btree leaf
    fragmented = (host / "fragmented").read_bytes()
    node = fs.resolve("/fragmented")
    for offset in (0, 4096 * 600 + 17, 3 * MiB - 5000):
        assert fs._read(node, offset, 9000) == fragmented[offset : offset + 9000]
