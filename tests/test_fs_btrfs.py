"""The btrfs driver against file systems made by btrfs-progs and by the kernel.

Oracles: the host tree ``mkfs.btrfs --rootdir`` was given; for what only the kernel writes
(subvolumes, snapshots, the default subvolume, zlib/LZO/zstd extents, holes, prealloc extents,
inode flags) the kernel's own view of the mounted file system, copied out with ``cp -a`` before
unmounting, and ``btrfs subvolume list``/``get-default``; ``btrfs inspect-internal dump-super`` and
``dump-tree`` for superblock fields and what the trees hold; ``btrfs-map-logical`` for the chunk map.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
from fastcrc import crc32
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg import open_image
from diskimg.errors import CorruptImage, DiskImageError, UnsupportedFormat
from diskimg.inspection.fs import FileType, GuestPathError, open_filesystem
from diskimg.inspection.fs.btrfs import BtrfsFileSystem
from diskimg.inspection.fs.lzo import LzoError, decompress
from diskimg.inspection.signatures import probe

from .support.disks import FileDisk, copy_in, sfdisk
from .support.files import blank, write_at
from .support.filesystems import BTRFS_SIZE, Mounted, can_mount, make_btrfs
from .support.fs_compare import assert_tree_equal
from .support.tools import qemu_img, requires_qemu, run
from .support.units import MiB

pytestmark = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None,
                                reason="btrfs-progs (mkfs.btrfs, btrfs) not installed")

SUPERBLOCK = 0x10000
COPY = 64 * MiB

VARIANTS = {
    "default": (),  # DUP metadata, no-holes, 16 KiB nodes, crc32c
    "single-4k-nodes": ("-m", "single", "-n", "4096"),
    "mixed": ("-M", "-n", "4096"),
    "sha256": ("--csum", "sha256"),
    "blake2": ("--csum", "blake2"),
    "xxhash": ("--csum", "xxhash"),
    "shrink": ("--shrink",),  # the image cut to what the tree needs
}


def build_tree(root: Path, wide: int = 1500) -> Path:
    """Files around the inline limit (2048) and the sector size, a large file, a sparse file, modes,
    symbolic links (relative, absolute, long), a hard link, a wide directory (many leaves), nesting,
    names that are not ASCII."""
    rng = random.Random(16)
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="openSUSE Leap"\nID="opensuse-leap"\n')
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o640)
    sizes = root / "sizes"
    sizes.mkdir()
    for name, size in (("empty", 0), ("one", 1), ("b2047", 2047), ("b2048", 2048), ("b2049", 2049),
                       ("b4095", 4095), ("b4096", 4096), ("b4097", 4097), ("big", 3 * MiB + 123)):
        (sizes / name).write_bytes(rng.randbytes(size))
    (sizes / "setuid").write_bytes(b"#!/bin/sh\n")
    (sizes / "setuid").chmod(0o4755)
    with open(sizes / "sparse", "wb") as f:
        f.seek(2 * MiB)
        f.write(rng.randbytes(5000))
        f.truncate(5 * MiB)
    os.link(sizes / "b4097", sizes / "hardlink")
    (root / "links").mkdir()
    (root / "links/relative").symlink_to("../sizes/one")
    (root / "links/absolute").symlink_to("/etc/os-release")
    (root / "links/long").symlink_to("/".join(["a-long-directory-name"] * 40))
    deep = root / "deep"
    for level in range(12):
        deep = deep / f"level{level}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("bottom\n")
    directory = root / "wide"
    directory.mkdir()
    for i in range(wide):
        (directory / f"entry-{i:05}-{'n' * 30}").write_text(f"{i}\n")
    (root / "ünïcödé.txt").write_text("ü\n")
    (root / "日本語").mkdir()
    (root / "日本語/файл").write_bytes(b"\xd1\x84\n")
    return root


def dump_super(image: Path, copy: int = 0) -> dict[str, str]:
    """``btrfs inspect-internal dump-super`` as field -> value (first word)."""
    out = run("btrfs", "inspect-internal", "dump-super", "-s", str(copy), image).stdout.decode()
    fields = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"[a-z_.]+", parts[0]):
            fields.setdefault(parts[0], parts[1])
    return fields


def dump_tree(image: Path, *args: str) -> str:
    return run("btrfs", "inspect-internal", "dump-tree", *args, image).stdout.decode()


def open_btrfs(image: Path, **kwargs) -> BtrfsFileSystem:
    disk = FileDisk(image)
    if kwargs:
        return BtrfsFileSystem(disk, 0, disk.virtual_size, **kwargs)
    fs = open_filesystem(disk, 0, disk.virtual_size)
    assert isinstance(fs, BtrfsFileSystem)
    return fs


def rechecksum(image: Path, position: int, size: int) -> None:
    """Store the CRC-32C of the block at ``position`` (a superblock or a crc32c tree node) in its
    first 4 bytes, as btrfs does."""
    with open(image, "r+b") as f:
        f.seek(position)
        block = f.read(size)
        f.seek(position)
        f.write(struct.pack("<I", crc32.iscsi(block[32:])))


def physical(image: Path, logical: int) -> list[int]:
    """Where btrfs-map-logical puts each mirror of ``logical``."""
    out = run("btrfs-map-logical", "-l", str(logical), "-b", "4096", image).stdout.decode()
    return [int(m) for m in re.findall(r"^mirror \d+ logical \d+ physical (\d+)", out, re.M)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("btrfs-tree") / "root")


@pytest.fixture(scope="module")
def images(tmp_path_factory, tree) -> dict[str, Path]:
    """One image per variant, built on first use."""
    base = tmp_path_factory.mktemp("btrfs-images")

    class Lazy(dict):
        def __missing__(self, variant: str) -> Path:
            self[variant] = make_btrfs(base / f"{variant}.img", tree, *VARIANTS[variant])
            return self[variant]

    return Lazy()


# -- file systems made by mkfs.btrfs --rootdir ---------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tree_matches_source(images, tree, variant):
    image = images[variant]
    sb = dump_super(image)
    fs = open_btrfs(image)
    assert fs.type == "btrfs"
    volume = fs.volume.superblock
    assert volume.fsid.hex() == sb["fsid"].replace("-", "")
    assert (volume.generation, volume.root, volume.chunk_root) == (int(sb["generation"]), int(sb["root"]),
                                                                   int(sb["chunk_root"]))
    assert (volume.node_size, volume.sector_size) == (int(sb["nodesize"]), int(sb["sectorsize"]))
    assert fs.volume.superblock_offset == SUPERBLOCK
    assert fs.default_subvolume_id == fs.subvolume_id == 5 and fs.list_subvolumes() == []
    assert assert_tree_equal(fs, tree) > 1530
    entries = {entry.name: entry for entry in fs.scandir("/")}
    assert entries["wide"].type is FileType.DIRECTORY
    assert fs.read_text("/links/absolute").startswith('NAME="openSUSE Leap"')  # resolved in the guest
    assert fs.stat("/sizes/hardlink").node == fs.stat("/sizes/b4097").node
    assert fs.stat("/sizes/hardlink").nlink == 2
    # the node is (tree, inode number), the inode number dump-tree shows for the name
    listing = dump_tree(image, "-t", "fs")
    found = re.search(r"location key \((\d+) INODE_ITEM 0\) type FILE\n.*\n\s+name: os-release", listing)
    assert found and fs.stat("/etc/os-release").node == (5, int(found.group(1)))


def test_deep_trees_with_small_nodes(images, tree):
    """4 KiB nodes: the file tree has internal nodes (dump-tree says so), read through every level."""
    image = images["single-4k-nodes"]
    listing = dump_tree(image, "-t", "fs")
    levels = {int(level) for level in re.findall(r"^node \d+ level (\d+)", listing, re.M)}
    assert levels and max(levels) >= 1
    fs = open_btrfs(image)
    assert sorted(fs.listdir("/wide")) == sorted(os.listdir(tree / "wide"))
    assert fs.read_file("/wide/entry-01234-" + "n" * 30) == b"1234\n"


@pytest.mark.parametrize("variant", ["default", "single-4k-nodes"])
def test_chunk_map_matches_btrfs_map_logical(images, variant):
    """Each tree root and a data extent map where btrfs-map-logical maps them (both DUP mirrors)."""
    image = images[variant]
    fs = open_btrfs(image)
    sb = fs.volume.superblock
    big = re.search(r"extent data disk byte (\d+) nr \d+", dump_tree(image, "-t", "fs"))
    assert big
    for logical in (sb.root, sb.chunk_root, int(big.group(1))):
        _chunk, copies = fs.volume._chunks.locate(logical, 4096, "test")
        assert list(copies) == physical(image, logical)
    assert any(len(chunk.copies) == 2 for chunk in fs.volume._chunks.chunks) == (variant == "default")


def test_dup_metadata_read_from_its_second_copy(images, tree, tmp_path):
    """DUP metadata: the file tree's root broken in the first copy btrfs-map-logical names is read from
    the second; broken in both, it is refused."""
    image = tmp_path / "dup.img"
    run("cp", "--sparse=always", images["default"], image)
    logical = int(re.search(r"^(?:leaf|node) (\d+) ", dump_tree(image, "-t", "fs"), re.M).group(1))
    first, second = physical(image, logical)
    write_at(image, first + 200, b"\xee")
    assert assert_tree_equal(open_btrfs(image), tree) > 1530
    write_at(image, second + 200, b"\xee")
    with pytest.raises(CorruptImage, match="checksum mismatch"):
        open_btrfs(image)


def test_probe_reads_the_same_superblock(images, tmp_path):
    image = images["default"]
    found = probe(FileDisk(image), 0, image.stat().st_size)
    sb = dump_super(image)
    assert found is not None and found.type == "btrfs"
    assert found.uuid == sb["fsid"] and found.details["num_devices"] == 1
    assert "no_holes" in found.features and "skinny_metadata" in found.features
    assert found.state is None and sb["log_root"] == "0"
    # a log tree left to replay (its address set, the checksum made right): the log is not read
    logged = tmp_path / "logged.img"
    run("cp", "--sparse=always", image, logged)
    write_at(logged, SUPERBLOCK + 0x60, struct.pack("<Q", int(sb["root"])))
    rechecksum(logged, SUPERBLOCK, 4096)
    assert dump_super(logged)["log_root"] == sb["root"]
    found = probe(FileDisk(logged), 0, image.stat().st_size)
    assert found is not None and found.state == "needs_recovery"
    assert open_btrfs(logged).read_text("/etc/os-release").startswith("NAME=")


def test_damaged_primary_superblock_read_from_its_copy(images, tree, tmp_path):
    """The primary's magic, then a byte under its checksum, broken: the copy at 64 MiB is used (it
    is what dump-super -s 1 shows); with both broken, the volume is refused."""
    image = tmp_path / "damaged.img"
    run("cp", "--sparse=always", images["default"], image)
    copy = dump_super(image, 1)
    assert int(copy["bytenr"]) == COPY
    for position, value in ((SUPERBLOCK + 0x40, b"XXXXXXXX"), (SUPERBLOCK + 0x200, b"\x77")):
        run("cp", "--sparse=always", images["default"], image)
        write_at(image, position, value)
        found = probe(FileDisk(image), 0, BTRFS_SIZE)
        assert found is not None and found.type == "btrfs" and found.uuid == copy["fsid"]
        assert found.state == ("needs_repair" if position == SUPERBLOCK + 0x40 else None)
        fs = open_btrfs(image)
        assert fs.volume.superblock_offset == COPY
        assert fs.volume.superblock.generation == int(copy["generation"])
        assert assert_tree_equal(fs, tree) > 1530
    write_at(image, COPY + 0x300, b"\x77")
    with pytest.raises(CorruptImage, match="no sound superblock"):
        open_btrfs(image)


def test_volume_shorter_than_its_device_refused(images):
    """A volume cut before the end of the device its superblock describes (as the kernel refuses it)."""
    image = images["default"]
    disk = FileDisk(image)
    with pytest.raises(CorruptImage, match="device of .* bytes in a volume of"):
        BtrfsFileSystem(disk, 0, COPY)


def test_two_device_file_system_refused(tmp_path):
    """Metadata mirrored over two devices (RAID1): each device is refused as one of several; a device
    whose superblock is made to claim it is alone is refused for its RAID1 chunks."""
    first, second = blank(tmp_path / "a.img", 160 * MiB), blank(tmp_path / "b.img", 160 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-d", "single", "-m", "raid1", first, second)
    assert dump_super(first)["num_devices"] == "2"
    found = probe(FileDisk(first), 0, 160 * MiB)
    assert found is not None and found.details["num_devices"] == 2
    with pytest.raises(UnsupportedFormat, match="2 devices"):
        open_btrfs(first)
    assert "RAID1" in run("btrfs", "inspect-internal", "dump-super", "-f", first).stdout.decode()
    write_at(first, SUPERBLOCK + 0x88, struct.pack("<Q", 1))
    rechecksum(first, SUPERBLOCK, 4096)
    with pytest.raises(UnsupportedFormat, match="RAID1 profile"):
        open_btrfs(first)


def test_unknown_and_unread_features_refused(images, tmp_path):
    """Incompat features that change the layout (zoned; a bit no btrfs-progs knows) are named and
    refused, after the superblock's checksum is made right (dump-super then reads them too)."""
    image = tmp_path / "features.img"
    for bit, message in ((0x1000, "zoned"), (1 << 40, "unknown features")):
        run("cp", "--sparse=always", images["default"], image)
        incompat = int(dump_super(image)["incompat_flags"], 16)
        write_at(image, SUPERBLOCK + 0xBC, struct.pack("<Q", incompat | bit))
        rechecksum(image, SUPERBLOCK, 4096)
        assert int(dump_super(image)["incompat_flags"], 16) == incompat | bit
        with pytest.raises(UnsupportedFormat, match=message):
            open_btrfs(image)


@requires_qemu
@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")
def test_through_qcow2_partition(images, tree, tmp_path):
    raw = blank(tmp_path / "disk.raw", BTRFS_SIZE + 2 * MiB)
    sfdisk(raw, f"label: gpt\nstart=2048, size={BTRFS_SIZE // 512}\n")
    start = json.loads(run("sfdisk", "--json", raw).stdout)["partitiontable"]["partitions"][0]["start"] * 512
    copy_in(raw, images["default"], start)
    qcow2 = tmp_path / "disk.qcow2"
    qemu_img("convert", "-O", "qcow2", raw, qcow2)
    with open_image(qcow2) as disk:
        fs = open_filesystem(disk, start, BTRFS_SIZE)
        assert isinstance(fs, BtrfsFileSystem)
        assert assert_tree_equal(fs, tree / "sizes", "/sizes") + assert_tree_equal(fs, tree / "links", "/links") > 10


# -- what only the kernel writes -----------------------------------------------------------------------






def write_text_file(path: Path, rng: random.Random, size: int) -> None:
    """Compressible text of ``size`` bytes."""
    words = ("alpha ", "beta ", "gamma\n", "delta ", "epsilon ", "zeta\n")
    path.write_text("".join(rng.choice(words) for _ in range(size // 5))[:size])


@pytest.fixture(scope="module")
def kernel_volume(tmp_path_factory):
    """A SUSE-like layout written by the kernel: subvolumes @, @/home, @/var, @/.snapshots and a
    read-only snapper snapshot @/.snapshots/1/snapshot of @ (taken before @ changed again), the
    default subvolume set to @; files compressed with zlib, LZO and zstd (compress-force, the
    algorithm chosen per directory), compressed inline files, holes, prealloc extents, flags."""
    if not can_mount():
        pytest.skip("needs root and mount")
    base = tmp_path_factory.mktemp("btrfs-kernel")
    image = make_btrfs(base / "k.img", None, size=512 * MiB)
    mount = Mounted(image, base / "mnt", "compress-force=zstd")
    m = mount.where
    rng = random.Random(5)
    oracle: dict[str, object] = {}
    try:
        for name in ("@", "@/home", "@/var", "@/.snapshots"):
            run("btrfs", "subvolume", "create", m / name)
        root = m / "@"
        (root / "etc").mkdir()
        (root / "etc/os-release").write_text('NAME="openSUSE Tumbleweed"\nID="opensuse-tumbleweed"\n')
        (root / "etc/fstab").write_text("UUID=x / btrfs defaults 0 0\nUUID=x /home btrfs subvol=/@/home 0 0\n")
        for algorithm in ("zlib", "lzo", "zstd"):
            directory = root / algorithm
            directory.mkdir()
            run("btrfs", "property", "set", directory, "compression", algorithm)
            write_text_file(directory / "text", rng, 900_000)  # several 128 KiB compressed extents
            write_text_file(directory / "inline", rng, 1800)  # compressed inline
            (directory / "random").write_bytes(rng.randbytes(200_000))  # does not compress: plain extents
            with open(directory / "sparse", "wb") as f:
                for offset in (0, 1 * MiB + 100, 3 * MiB):
                    f.seek(offset)
                    f.write(("hello " * 3000).encode())
                f.truncate(6 * MiB)
        with open(root / "prealloc", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 2 * MiB)
            f.seek(512 * 1024)
            f.write(rng.randbytes(10000))
        (root / "punched").write_bytes(rng.randbytes(1 * MiB))
        run("fallocate", "--punch-hole", "--offset", "65536", "--length", "131072", root / "punched")
        (root / "home/user").mkdir()
        (root / "home/user/.bashrc").write_text("export PS1='$ '\n")
        (root / "var/log").mkdir()
        (root / "var/log/messages").write_text("boot\n")
        os.mkfifo(root / "fifo")
        (root / "link").symlink_to("etc/os-release")
        os.link(root / "etc/fstab", root / "fstab-link")
        (root / "flags").mkdir()
        (root / "flags/immutable").write_text("i\n")
        (root / "flags/append").write_text("a\n")
        os.sync()
        (root / ".snapshots/1").mkdir()
        run("btrfs", "subvolume", "snapshot", "-r", root, root / ".snapshots/1/snapshot")
        (root / "etc/os-release").write_text('NAME="openSUSE Tumbleweed"\nVERSION_ID="20260101"\n')
        (root / "after-snapshot").write_text("new\n")
        run("btrfs", "subvolume", "set-default", root)
        run("chattr", "+i", root / "flags/immutable")
        run("chattr", "+a", root / "flags/append")
        os.sync()
        oracle["list"] = run("btrfs", "subvolume", "list", "-p", "-u", "-q", m).stdout.decode()
        oracle["readonly"] = run("btrfs", "subvolume", "list", "-r", m).stdout.decode()
        oracle["default"] = run("btrfs", "subvolume", "get-default", m).stdout.decode()
        run("cp", "-a", f"{m}/.", base / "host")
    finally:
        mount.close()
    return image, base / "host", oracle


def parse_subvolume_list(text: str) -> dict[int, dict[str, str]]:
    """``btrfs subvolume list -p -u -q`` lines as id -> fields."""
    found = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(ID|parent|parent_uuid|uuid|path) (\S+)", line))
        found[int(fields["ID"])] = fields
    return found


def test_kernel_tree_matches_the_kernels_view(kernel_volume):
    """The top level (subvolid=5) against what the kernel showed: every subvolume entered through
    its directory, the snapshot's nested subvolumes as the empty directories the kernel shows."""
    image, host, _oracle = kernel_volume
    top = open_btrfs(image, subvolid=5)
    assert assert_tree_equal(top, host) > 40
    assert top.listdir("/@/.snapshots/1/snapshot/home") == []  # a nested subvolume is not in the snapshot
    assert top.stat("/@/.snapshots/1/snapshot/home").is_dir
    assert top.read_text("/@/.snapshots/1/snapshot/etc/os-release").startswith('NAME="openSUSE Tumbleweed"\nID=')
    assert "VERSION_ID" in top.read_text("/@/etc/os-release")
    assert not top.exists("/@/.snapshots/1/snapshot/after-snapshot")


def test_kernel_default_subvolume_and_subvolume_list(kernel_volume):
    image, host, oracle = kernel_volume
    fs = open_btrfs(image)
    default = int(re.match(r"ID (\d+)", oracle["default"]).group(1))
    entry = re.search(r"location key \((\d+) ROOT_ITEM \d+\) type DIR\n.*\n\s+name: default",
                      dump_tree(image, "-t", "root"))
    assert entry and int(entry.group(1)) == default
    assert fs.default_subvolume_id == fs.subvolume_id == default
    assert fs.root == (default, 256)
    assert assert_tree_equal(fs, host / "@") > 30
    listed = parse_subvolume_list(oracle["list"])
    readonly = set(parse_subvolume_list(oracle["readonly"].replace("top level", "parent")))
    subvolumes = fs.list_subvolumes()
    assert {s.id for s in subvolumes} == set(listed)
    for subvolume in subvolumes:
        expected = listed[subvolume.id]
        assert subvolume.path == expected["path"]
        assert subvolume.parent_id == int(expected["parent"])
        assert subvolume.uuid == expected["uuid"]
        assert subvolume.parent_uuid == (None if expected["parent_uuid"] == "-" else expected["parent_uuid"])
        assert subvolume.readonly == (subvolume.id in readonly)
    snapshot = next(s for s in subvolumes if s.path == "@/.snapshots/1/snapshot")
    assert snapshot.readonly and snapshot.parent_uuid == next(s.uuid for s in subvolumes if s.path == "@")


def test_kernel_subvolumes_opened_by_path_and_id(kernel_volume):
    image, host, _oracle = kernel_volume
    fs = open_btrfs(image)
    snapshot_id = next(s.id for s in fs.list_subvolumes() if s.path == "@/.snapshots/1/snapshot")
    for view in (fs.open_subvolume(subvol="@/.snapshots/1/snapshot"),
                 fs.open_subvolume(subvol="/@/.snapshots/1/snapshot/"),
                 fs.open_subvolume(subvolid=snapshot_id),
                 open_btrfs(image, subvol="@/.snapshots/1/snapshot", subvolid=snapshot_id)):
        assert view.subvolume_id == snapshot_id
        assert assert_tree_equal(view, host / "@/.snapshots/1/snapshot") > 25
    home = fs.open_subvolume(subvol="@/home")
    assert home.read_text("/user/.bashrc") == "export PS1='$ '\n"
    assert fs.open_subvolume(subvol="/").subvolume_id == 5
    with pytest.raises(GuestPathError, match="not a subvolume"):
        fs.open_subvolume(subvol="@/etc")
    with pytest.raises(GuestPathError):
        fs.open_subvolume(subvol="@/nowhere")
    with pytest.raises(GuestPathError, match="not subvolid"):
        fs.open_subvolume(subvol="@/home", subvolid=snapshot_id)
    with pytest.raises(GuestPathError, match="no subvolume"):
        fs.open_subvolume(subvolid=9999)


def test_kernel_extents_compression_holes_prealloc(kernel_volume):
    """dump-tree shows what the files hold (each compression, also inline; prealloc extents);
    their data reads as the kernel read it."""
    image, host, _oracle = kernel_volume
    fs = open_btrfs(image)
    listing = dump_tree(image, "-t", str(fs.subvolume_id))
    for number, name in ((1, "zlib"), (2, "lzo"), (3, "zstd")):
        assert f"compression {number} ({name})" in listing
        assert re.search(rf"type 0 \(inline\)\n\s+inline extent data size \d+ ram_bytes \d+ compression {number}",
                         listing), name
        for file in ("text", "inline", "random", "sparse"):
            assert fs.read_file(f"/{name}/{file}") == (host / "@" / name / file).read_bytes(), (name, file)
    assert "type 2 (prealloc)" in listing
    assert fs.read_file("/prealloc") == (host / "@/prealloc").read_bytes()
    assert fs.read_file("/punched")[65536:196608] == bytes(131072)
    text = (host / "@/lzo/text").read_bytes()
    node = fs.resolve("/lzo/text")
    for offset in (0, 131072 - 7, 400_000):  # pieces that start inside compressed extents
        assert fs._read(node, offset, 70_000) == text[offset : offset + 70_000]
    assert fs.stat("/flags/immutable").flags >= {"immutable"}
    assert "append" in fs.stat("/flags/append").flags
    assert fs.stat("/fifo").type is FileType.OTHER


def test_kernel_explicit_hole_extents(tmp_path):
    """Without the no-holes feature the kernel writes holes as extents pointing at address 0."""
    if not can_mount():
        pytest.skip("needs root and mount")
    image = make_btrfs(tmp_path / "holes.img", None, "-O", "^no-holes")
    mount = Mounted(image, tmp_path / "mnt", "")
    try:
        with open(mount.where / "sparse", "wb") as f:
            for offset in (0, 1 * MiB, 5 * MiB + 100):
                f.seek(offset)
                f.write(b"data" * 1000)
            f.truncate(8 * MiB)
        expected = (mount.where / "sparse").read_bytes()
    finally:
        mount.close()
    assert "extent data disk byte 0 nr 0" in dump_tree(image, "-t", "fs")
    assert open_btrfs(image).read_file("/sparse") == expected


# -- hostile metadata ----------------------------------------------------------------------------------


def test_tree_cycle_refused(images, tmp_path):
    """A root tree internal node made to point at itself (checksum made right): a cycle the driver
    refuses (the child is not of the level below) instead of looping."""
    image = tmp_path / "cycle.img"
    run("cp", "--sparse=always", images["single-4k-nodes"], image)
    fs_root = re.search(r"^node (\d+) level (\d+)", dump_tree(image, "-t", "fs"), re.M)
    assert fs_root, "the file tree of 4 KiB nodes has an internal root"
    logical = int(fs_root.group(1))
    (position,) = physical(image, logical)
    write_at(image, position + 101 + 17, struct.pack("<Q", logical))  # first pointer -> the node itself
    rechecksum(image, position, 4096)
    with pytest.raises(CorruptImage, match="level"):
        walk_everything(open_btrfs(image))


def test_chunk_past_the_device_refused(images, tmp_path):
    """The system chunk's stripe moved past the device's end (superblock checksum made right)."""
    image = tmp_path / "chunk.img"
    run("cp", "--sparse=always", images["single-4k-nodes"], image)
    # sys_chunk_array: key (17 bytes), chunk item (48 bytes), then the first stripe: devid, offset
    write_at(image, SUPERBLOCK + 0x32B + 17 + 48 + 8, struct.pack("<Q", BTRFS_SIZE - 4096))
    rechecksum(image, SUPERBLOCK, 4096)
    with pytest.raises(CorruptImage, match="past the device"):
        open_btrfs(image)


def walk_everything(fs: BtrfsFileSystem, read_cap: int = 256 << 10) -> int:
    """List every directory, stat every entry, read the start of every file, every link."""
    seen = 0
    for path, info in fs.walk("/"):
        seen += 1
        if info.is_file:
            for _piece in fs.iter_file(path, chunk=read_cap):
                break
        elif info.is_symlink:
            fs.readlink(path)
    return seen


class RecordingDisk:
    """Remembers which ranges were read (the metadata a walk needs)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.virtual_size = path.stat().st_size
        self.reads: set[tuple[int, int]] = set()

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.add((offset, length))
        return os.pread(self.fd, length, offset)


class PatchedDisk:
    """The image with some bytes replaced, and, when ``rechecksum`` says so, the checksums of the
    4 KiB blocks (nodes of 4 KiB, or the superblock) they fall in made right again: what is then
    read gets past the checksum to the parsers."""

    def __init__(self, fd: int, size: int, patches: dict[int, int], blocks: list[int]) -> None:
        self.fd, self.virtual_size, self.patches = fd, size, patches
        self.blocks = {}
        for block in blocks:
            data = bytearray(os.pread(fd, 4096, block))
            for position, value in patches.items():
                if block <= position < block + 4096:
                    data[position - block] = value
            data[:4] = struct.pack("<I", crc32.iscsi(bytes(data[32:])))
            self.blocks[block] = bytes(data)

    def read_at(self, offset: int, length: int) -> bytes:
        data = bytearray(os.pread(self.fd, length, offset))
        for position, value in self.patches.items():
            if offset <= position < offset + len(data):
                data[position - offset] = value
        for block, content in self.blocks.items():
            low, high = max(offset, block), min(offset + len(data), block + 4096)
            if low < high:
                data[low - offset : high - offset] = content[low - block : high - block]
        return bytes(data)


@pytest.fixture(scope="module")
def fuzz_image(tmp_path_factory):
    """A small volume of 4 KiB nodes, single metadata (no mirror to fall back on), and the 4 KiB
    metadata blocks a walk reads."""
    base = tmp_path_factory.mktemp("btrfs-fuzz")
    root = build_tree(base / "root", wide=300)
    shutil.rmtree(root / "deep")
    (root / "sizes/big").unlink()
    image = make_btrfs(base / "fuzz.img", root, "-m", "single", "-n", "4096", size=160 * MiB)
    recorder = RecordingDisk(image)
    assert walk_everything(BtrfsFileSystem(recorder, 0, recorder.virtual_size)) > 300
    os.close(recorder.fd)
    data_blocks = {(root / "sizes" / name).read_bytes()[:4096] for name in os.listdir(root / "sizes")}
    blocks = []
    fd = os.open(image, os.O_RDONLY)
    for offset, length in sorted(recorder.reads):
        if length == 4096 and os.pread(fd, 4096, offset)[:4096] not in data_blocks:
            blocks.append(offset)
    os.close(fd)
    assert len(blocks) > 5 and SUPERBLOCK in blocks
    return image, blocks


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                     HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_metadata_ends_in_corrupt_image_or_a_value(fuzz_image, data):
    """1-4 bytes of the metadata blocks a walk reads set to other values, the blocks' checksums made
    right (or not): opening and walking either works or raises a DiskImageError, in bounded time."""
    image, blocks = fuzz_image
    rechecksummed = data.draw(st.booleans(), label="rechecksum")
    patches = {}
    touched = []
    for _ in range(data.draw(st.integers(1, 4), label="changes")):
        block = data.draw(st.sampled_from(blocks), label="block")
        inner = data.draw(st.integers(32 if rechecksummed else 0, 4095), label="offset")
        patches[block + inner] = data.draw(st.integers(0, 255), label="value")
        touched.append(block)
    fd = os.open(image, os.O_RDONLY)
    try:
        disk = PatchedDisk(fd, image.stat().st_size, patches, touched if rechecksummed else [])
        started = time.monotonic()
        try:
            walk_everything(BtrfsFileSystem(disk, 0, disk.virtual_size))
        except DiskImageError:
            pass
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)


# -- LZO1X, from the bitstream's description -----------------------------------------------------------


def test_lzo_literal_runs_and_matches():
    """Hand-assembled streams (Documentation/staging/lzo.rst): a first literal run, a match of
    3-4 bytes within 2 KiB that overlaps its output, a long literal run, a 16 KiB-range match
    with an extended length, the end marker."""
    # 20 = 17 + 3 literals "abc"; 0x68 = 011 01 0 00: length 4, D = 2 -> distance (0 << 3) + 2 + 1 = 3
    assert decompress(b"\x14abc\x68\x00\x11\x00\x00", 100) == b"abcabca"
    # 17 + 5 literals; 0x50 = 010 10 0 00: length 3, distance 4 + 1 = 5, no literals after it; then
    # (state 0) 0x00: a literal run of extended length, 3 + 15 + the byte 1 = 19 literals
    stream = b"\x16hello\x50\x00" + b"\x00\x01" + b"0123456789abcdefghi" + b"\x11\x00\x00"
    assert decompress(stream, 100) == b"hellohel0123456789abcdefghi"
    # 0x20 (32..63) with L = 0: length 2 + 31 + 10 = 43, distance (word >> 2) + 1 = 1: a run of 'z'
    assert decompress(b"\x12z\x20\x0a\x00\x00\x11\x00\x00", 100) == b"z" * 44


@pytest.mark.parametrize("stream, message", [
    (b"", "empty"),
    (b"\x14abc", "past the input"),
    (b"\x14abc\x68\x10\x11\x00\x00", "back"),  # distance (0x10 << 3) + 3 beyond the 3 bytes produced
    (b"\x14abc\x11\x00\x00junk", "after the end"),
    (b"\x14abc\x12\x00\x00", "end marker"),
    (b"\xffabc", "past the input"),
])
def test_lzo_bad_streams_raise_lzo_error(stream, message):
    with pytest.raises(LzoError, match=message):
        decompress(stream, 1 << 20)


def test_lzo_output_capped():
    with pytest.raises(LzoError, match="exceeds"):
        decompress(b"\x12z\x20\x0a\x00\x00\x11\x00\x00", 20)
