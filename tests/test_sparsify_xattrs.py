"""--sparsify keeps every extended attribute and POSIX ACL, with the kernel and the file systems' own tools as
the oracle (diskimg's readers do not expose attributes).

ext4, XFS and btrfs, each made over a partition-sized file of old random bytes (so free space is not zeros) and
put on a partition of a disk sfdisk made: loop-mounted, files and folders given attributes of every kind
(small ``user.*`` values that fit in the inode; large ones that do not: ext4's external attribute block, XFS's
leaf/remote attribute blocks, btrfs's xattr items; ``security.*`` and ``trusted.*`` where the kernel allows
them; access and default ACLs), other files written and deleted so there is free space, more attributes set
after the deletes. The disk converted with --sparsify to raw must leave out some of the old data, and the
output's partition, loop-mounted read-only at the same place, must give the same ``getfattr`` and ``getfacl``
dumps and file contents as the source did; the file system's checker must find it clean. The blocks that hold
the large attributes out of the inode (``debugfs``'s File ACL, ``xfs_db``'s attribute fork map, the copies of
btrfs's fs-tree leaves holding the XATTR_ITEMs) must be byte for byte the source's, so a loss names the block.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import diskimg

from .support.disks import copy_in, prefilled, sfdisk, sfdisk_partitions
from .support.files import read_at
from .support.filesystems import can_mount
from .support.tools import run
from .support.units import MiB

SECTOR = 512
ATTR_TOOLS = ("setfattr", "getfattr", "setfacl", "getfacl")

#: file system -> (partition size, partition table, mkfs command keeping the old bytes it does not write)
FILE_SYSTEMS = {
    # 256-byte inodes: small attributes fit in the inode, large ones go to an external block (4 KiB: mke2fs
    # makes 1 KiB blocks on a file system this small)
    "ext4": (64 * MiB, "dos", ("mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-E", "nodiscard")),
    "xfs": (320 * MiB, "gpt", ("mkfs.xfs", "-q", "-f", "-K")),
    "btrfs": (160 * MiB, "dos", ("mkfs.btrfs", "-q", "-f", "-K")),
}
CHECKERS = {"ext4": ("e2fsck", "-fn"), "xfs": ("xfs_repair", "-n"), "btrfs": ("btrfs", "check", "--readonly")}
#: the old random bytes: the first part of each partition (the rest stays a hole, as the brief's sizes ask)
PREFILLED = 48 * MiB
#: large attributes per file: (count, bytes each). ext4 keeps all of a file's attributes outside the inode in one
#: block (4 KiB); XFS turns 20 values of 3 KiB into a leaf attribute fork with remote values
LARGE_ATTRS = {"ext4": (3, 1000), "xfs": (20, 3 * 1024), "btrfs": (20, 3 * 1024)}

needs_attr_tools = pytest.mark.skipif(any(shutil.which(tool) is None for tool in ATTR_TOOLS),
                                      reason="setfattr/getfattr (package attr) and setfacl/getfacl (package acl) "
                                      "are needed")
needs_mount = pytest.mark.skipif(not can_mount(), reason="loop mounts need root and mount")


@contextmanager
def mounted(source: Path, where: Path, fs_type: str, options: str, skip: bool = False) -> Iterator[Path]:
    """``source`` loop-mounted on ``where`` with ``options``. ``skip``: the test is skipped if the kernel cannot
    (the source, freshly made); otherwise it fails (the output: a mount refused is damage)."""
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", fs_type, "-o", f"loop,{options}", str(source), str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and skip:
        pytest.skip(f"cannot loop-mount {fs_type} here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"the kernel cannot mount the {fs_type} of {source}: {proc.stderr.strip()}"
    try:
        yield where
    finally:
        run("umount", where)


def setfattr(path: Path, name: str, value: bytes) -> None:
    run("setfattr", "-n", name, "-v", "0x" + value.hex(), path)


def try_setfattr(path: Path, name: str, value: bytes) -> bool:
    """Set an attribute of a namespace the kernel may refuse (security.*, trusted.*): whether it took."""
    proc = subprocess.run(["setfattr", "-n", name, "-v", "0x" + value.hex(), str(path)], capture_output=True)
    return proc.returncode == 0


def decorate(root: Path, kind: str, rng: random.Random) -> dict[str, Path]:
    """Files and folders with attributes of every kind; returns the ones whose large attributes lie outside
    the inode, by role."""
    count, size = LARGE_ATTRS[kind]
    root.mkdir(exist_ok=True)
    small = root / "small.txt"
    small.write_text("small attributes, in the inode\n")
    setfattr(small, "user.colour", b"blue")
    setfattr(small, "user.empty", b"")
    large = root / "large.bin"
    large.write_bytes(rng.randbytes(5000))
    for number in range(count):
        setfattr(large, f"user.large-{number:02}", rng.randbytes(size))
    folder = root / "folder"
    folder.mkdir()
    setfattr(folder, "user.folder", rng.randbytes(300))
    run("setfacl", "-m", "u:1000:rwx,g:100:r-x,m:rwx", folder)
    run("setfacl", "-d", "-m", "u:1001:rw-,g:101:r--", folder)  # default ACL: inherited below
    inherits = folder / "inherits.txt"
    inherits.write_text("an ACL from the folder's default\n")
    setfattr(inherits, "user.note", b"inherited ACL and an attribute")
    wide_acl = root / "wide-acl.txt"
    wide_acl.write_text("an ACL too large for the inode\n")
    run("setfacl", "-m", ",".join(f"u:{2000 + number}:r--" for number in range(30)), wide_acl)
    privileged = root / "privileged.txt"
    privileged.write_text("security.* and trusted.*\n")
    for name in ("security.diskimg-test", "trusted.diskimg-test"):
        try_setfattr(privileged, name, rng.randbytes(64))
    many = root / "many"
    many.mkdir()
    for number in range(24):  # distinct values: no shared ext4 attribute block
        path = many / f"file-{number:02}"
        path.write_bytes(rng.randbytes(rng.randrange(0, 9000)))
        setfattr(path, "user.value", rng.randbytes(rng.choice((16, 600, 2000))))
    return {"large": large, "wide-acl": wide_acl}


def churn(root: Path, rng: random.Random) -> int:
    """Files written and most of them deleted (their blocks go back to the free space); the bytes deleted."""
    scratch = root / "scratch"
    scratch.mkdir()
    paths = []
    for number in range(8):
        path = scratch / f"scratch-{number}.bin"
        path.write_bytes(rng.randbytes(MiB + rng.randrange(2 * MiB)))
        paths.append(path)
    os.sync()
    deleted = 0
    for path in paths[:6]:
        deleted += path.stat().st_size
        path.unlink()
    os.sync()
    return deleted


def attribute_dumps(mountpoint: Path) -> tuple[str, str, dict[str, str]]:
    """getfattr's and getfacl's dumps of the whole tree (every namespace, values in hex), and each file's SHA-256."""
    xattrs = run("getfattr", "-d", "-m", "-", "-e", "hex", "-R", "-P", "--absolute-names", mountpoint)
    acls = run("getfacl", "-R", "-P", "-n", "--absolute-names", mountpoint)
    contents = {}
    for folder, _, names in os.walk(mountpoint):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                contents[str(path.relative_to(mountpoint))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return xattrs.stdout.decode(), acls.stdout.decode(), contents


def out_of_line_blocks(kind: str, image: Path, inode: int) -> list[tuple[int, int]]:
    """Where the inode's attributes outside it lie in the file system (byte offset, length), as the file
    system's own tools say: debugfs's File ACL block (ext4), xfs_db's attribute fork map (XFS), the copies of
    the fs tree's leaves holding the inode's XATTR_ITEMs (btrfs: dump-tree, btrfs-map-logical)."""
    if kind == "ext4":
        text = run("debugfs", "-R", f"stat <{inode}>", image).stdout.decode()
        block = int(re.search(r"File ACL: (\d+)", text).group(1))  # type: ignore[union-attr]
        size = int(re.search(r"^Block size:\s+(\d+)", run("dumpe2fs", "-h", image).stdout.decode(),
                             re.MULTILINE).group(1))  # type: ignore[union-attr]
        return [(block * size, size)] if block else []
    if kind == "xfs":
        geometry = run("xfs_db", "-r", "-c", "sb 0", "-c", "print blocksize agblocks", image).stdout.decode()
        fields = dict(re.findall(r"^(\w+) = (\d+)$", geometry, re.MULTILINE))
        block_size, ag_blocks = int(fields["blocksize"]), int(fields["agblocks"])
        text = run("xfs_db", "-r", "-c", f"inode {inode}", "-c", "bmap -a", image).stdout.decode()
        return [((int(ag) * ag_blocks + int(block)) * block_size, int(count) * block_size)
                for ag, block, count in re.findall(r"startblock \d+ \((\d+)/(\d+)\) count (\d+)", text)]
    super_block = run("btrfs", "inspect-internal", "dump-super", image).stdout.decode()
    node_size = int(re.search(r"^nodesize\s+(\d+)", super_block, re.MULTILINE).group(1))  # type: ignore[union-attr]
    tree = run("btrfs", "inspect-internal", "dump-tree", "-t", "fs", image).stdout.decode(errors="replace")
    leaves: list[int] = []
    leaf = 0
    for line in tree.splitlines():
        if found := re.match(r"leaf (\d+) items", line):
            leaf = int(found.group(1))
        elif re.match(rf"\s+item \d+ key \({inode} XATTR_ITEM ", line) and leaf not in leaves:
            leaves.append(leaf)
    copies = []
    for logical in leaves:
        text = run("btrfs-map-logical", "-l", str(logical), "-b", str(node_size), image).stdout.decode()
        copies += [(int(physical), node_size) for physical in re.findall(r"physical (\d+)", text)]
    return copies


@needs_attr_tools
@needs_mount
@pytest.mark.parametrize("kind", list(FILE_SYSTEMS))
def test_sparsify_keeps_every_extended_attribute_and_acl(tmp_path: Path, kind: str) -> None:
    size, label, mkfs = FILE_SYSTEMS[kind]
    tools = {"ext4": ("debugfs", "dumpe2fs"), "xfs": ("xfs_db",), "btrfs": ("btrfs-map-logical",)}[kind]
    missing = [tool for tool in (mkfs[0], CHECKERS[kind][0], *tools) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    rng = random.Random(kind)
    part = prefilled(tmp_path / "part.img", PREFILLED, 17)
    os.truncate(part, size)
    run(*mkfs, part)
    mountpoint = tmp_path / "mnt"  # the same path for source and output: the dumps' absolute names agree
    with mounted(part, mountpoint, kind, "nodiscard", skip=True) as root:
        out_of_line = decorate(root / "before", kind, rng)
        deleted = churn(root, rng)
        decorate(root / "after", kind, rng)  # into blocks the deletes freed
        os.sync()
        inodes = {role: path.stat().st_ino for role, path in out_of_line.items()}
        xattrs, acls, contents = attribute_dumps(root)
    # the oracle holds what was set: the large values and the ACLs (a sanity check of the test itself)
    count, _ = LARGE_ATTRS[kind]
    assert xattrs.count("user.large-") == 2 * count and xattrs.count("system.posix_acl_default") == 2, xattrs
    assert xattrs.count("user.value=") == 48 and "user.colour=0x626c7565" in xattrs
    assert acls.count("user:2029:r--") == 2 and acls.count("default:user:1001:rw-") == 2
    blocks = {role: out_of_line_blocks(kind, part, inode) for role, inode in inodes.items()}
    assert blocks["large"], f"{kind}: the large attributes are in the inode, the test does not test them"

    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    os.truncate(disk, size + 2 * MiB)
    sfdisk(disk, f"label: {label}\nstart=2048, size={size // SECTOR}, type=L\n")
    (partition,) = sfdisk_partitions(disk)
    offset = partition["start"]
    assert partition["end"] - offset == size
    copy_in(disk, part, offset)

    out = tmp_path / "out.raw"
    result = diskimg.convert(disk, out, "raw", sparsify=True)
    assert result.sparsified is not None
    (volume,) = [volume for volume in result.sparsified if volume.name == "partition 1"]
    assert volume.sparsified and volume.file_system == kind, volume
    # the deleted files' data and mkfs's leftovers were free space: much of it left out
    assert volume.sparsified_bytes >= deleted // 2, (volume, deleted)

    for role, extents in blocks.items():  # the blocks outside the inodes, byte for byte
        for start, length in extents:
            assert read_at(out, offset + start, length) == read_at(disk, offset + start, length), \
                f"{kind}: the attribute block of {role} at byte {start} of the file system was zeroed"

    with mounted(out, mountpoint, kind, f"ro,offset={offset},sizelimit={size}") as root:
        after = attribute_dumps(root)
    assert after[0] == xattrs
    assert after[1] == acls
    assert after[2] == contents

    extracted = tmp_path / "out-part.img"
    run("dd", f"if={out}", f"of={extracted}", "bs=1M", "iflag=skip_bytes,count_bytes", f"skip={offset}",
        f"count={size}", "conv=sparse", "status=none")
    run(*CHECKERS[kind], extracted)
