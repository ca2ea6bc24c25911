"""What ``--sparsify`` may leave out of NTFS, FAT, btrfs, swap areas and LVM2 volume groups.

Oracles, each file system's own tools: for NTFS the $Bitmap as ntfs-3g's ``ntfscat`` dumps it and
``ntfscluster``'s free count, ntfs-3g's refusals to mount (dirty, hibernated, an unclean $LogFile);
for FAT the clusters mtools' ``mshowfat`` gives every file and directory, fsck.fat's cluster count
and its "Dirty bit" reports; for btrfs the chunk, extent and device trees as ``btrfs inspect-internal
dump-tree`` prints them and ``dump-super``'s log root and flags; for swap what ``mkswap`` says it set
up; for LVM2 ``pvs --segments``.

And safety: every range called unused is filled with a pattern in a copy of the image (a pattern,
not zeros, so that a used block called free cannot hide behind the zeros it already held); the file
system's checker must find the copy clean (``ntfsfix -n``, ``fsck.fat -n``, ``btrfs check --readonly
--check-data-csum``), and every file, directory and link must read as before: through diskimg's
reader, and through the file system's own (ntfs-3g, mtools) against the host tree they were written from.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastcrc import crc32
from hypothesis import example, given, settings, strategies as st

from diskimg import open_image
from diskimg.inspection.fs import GuestFileSystem, open_filesystem
from diskimg.inspection.fs.base import NotSparsifiable
from diskimg.inspection.fs.ntfs import parse_restart_page
from diskimg.inspection.signatures import HEAD_SIZE, swap_unused_ranges
from diskimg.inspection.volumes.lvm import LvmVolume, VolumeGroup, find_volume_groups

from .support.files import blank, read_at, write_at
from .support.filesystems import mkntfs, need_ntfs_tools, ntfs3g, ntfsinfo, ntfsinfo_runs
from .support.fs_compare import assert_tree_equal
from .support.lvm import EXTENT, LoopLvm, assemble as lvm_assemble, needs_lvm, unique_vg
from .support.tools import run
from .support.units import MiB

#: the LVM2 fixtures of test_lvm: loop devices under LVM2's tools, and its two disks' volume group

#: what unused ranges are filled with in the copies checked
PATTERN = bytes([0xA5]) * MiB


# -- helpers -------------------------------------------------------------------------------------------


def normalized(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, touching ones joined, empty ones dropped."""
    joined: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if length <= 0:
            continue
        if joined and joined[-1][0] + joined[-1][1] >= start:
            end = max(joined[-1][0] + joined[-1][1], start + length)
            joined[-1] = (joined[-1][0], end - joined[-1][0])
        else:
            joined.append((start, length))
    return joined


def unused(image: Path, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
    """The unused ranges diskimg finds in the file system of ``image``, checked to be in increasing
    order, disjoint and inside the volume."""
    with open_image(image, "raw") as reader:
        size = reader.virtual_size - offset if length is None else length
        fs = open_filesystem(reader, offset, size)
        assert fs is not None
        ranges = list(fs.unused_ranges())
    position = 0
    for start, count in ranges:
        assert start >= position and count > 0 and start + count <= size, ranges[:10]
        position = start + count
    return ranges


def refusal(image: Path) -> str:
    """Why diskimg refuses to sparsify the file system of ``image``."""
    with open_image(image, "raw") as reader:
        fs = open_filesystem(reader, 0, reader.virtual_size)
        assert fs is not None
        with pytest.raises(NotSparsifiable) as raised:
            fs.unused_ranges()
    return str(raised.value)


def fill(image: Path, ranges: Iterable[tuple[int, int]], base: int = 0) -> int:
    """Overwrite each (offset, length) range (from ``base``) of ``image`` with PATTERN; the bytes written."""
    written = 0
    with open(image, "r+b") as f:
        for start, length in ranges:
            position, end = base + start, base + start + length
            while position < end:
                step = min(len(PATTERN), end - position)
                os.pwrite(f.fileno(), PATTERN[:step], position)
                position += step
            written += length
    return written


def snapshot(fs: GuestFileSystem) -> dict[str, tuple[object, ...]]:
    """Every path of ``fs`` with its type and size, a file's SHA-256, a link's target."""
    found: dict[str, tuple[object, ...]] = {}
    for path, info in fs.walk("/"):
        if info.is_file:
            digest = hashlib.sha256()
            for piece in fs.iter_file(path):
                digest.update(piece)
            found[path] = ("file", info.size, digest.hexdigest())
        elif info.is_symlink:
            found[path] = ("link", fs.readlink(path))
        else:
            found[path] = (info.type.value,)
    return found


def image_snapshot(image: Path, offset: int = 0, length: int | None = None) -> dict[str, tuple[object, ...]]:
    with open_image(image, "raw") as reader:
        fs = open_filesystem(reader, offset, reader.virtual_size - offset if length is None else length)
        assert fs is not None
        return snapshot(fs)


def filled_copy(image: Path, ranges: list[tuple[int, int]]) -> Path:
    """A copy of ``image`` with its unused ranges filled: the tree must read as before."""
    copy = image.with_name(image.stem + "-filled" + image.suffix)
    run("cp", "--sparse=always", image, copy)
    before = image_snapshot(image)
    assert fill(copy, ranges) > 0
    assert image_snapshot(copy) == before
    return copy


def random_files(rng: random.Random, root: Path, count: int, largest: int, prefix: str) -> list[Path]:
    """``count`` files of random sizes (up to ``largest``) and random bytes under ``root``, some in a subdirectory."""
    made = []
    for index in range(count):
        folder = root / ("sub" if index % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}{index:03d}.bin"
        path.write_bytes(rng.randbytes(rng.randrange(0, largest)))
        made.append(path)
    return made


# -- NTFS ----------------------------------------------------------------------------------------------

NTFS_SIZE = 48 * MiB
NTFS_CLUSTER = 4096


def ntfs_with_deletions(tmp_path: Path) -> tuple[Path, Path]:
    """An NTFS that ntfs-3g filled, emptied in part and filled again (the same files in a host tree)."""
    need_ntfs_tools()
    image = mkntfs(tmp_path / "ntfs.img", NTFS_SIZE, NTFS_CLUSTER)
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(1717)
    with ntfs3g(image, tmp_path / "mnt") as where:
        first = random_files(rng, tree, 40, 600_000, "first")
        shutil.copytree(tree, where, dirs_exist_ok=True)
        for path in first[::2]:
            (where / path.relative_to(tree)).unlink()
            path.unlink()
        second = tmp_path / "second"
        random_files(rng, second, 20, 300_000, "second")
        shutil.copytree(second, where, dirs_exist_ok=True)
        shutil.copytree(second, tree, dirs_exist_ok=True)
        (where / "small.txt").write_text("resident in its MFT record\n")
        (tree / "small.txt").write_text("resident in its MFT record\n")
    return image, tree


def ntfs_free_clusters(image: Path) -> list[tuple[int, int]]:
    """The clear bits of $Bitmap as ntfscat dumps it, below the cluster count ntfsinfo gives, as byte ranges."""
    bitmap = run("ntfscat", "-i", "6", image).stdout
    clusters = int(re.search(r"Volume Size in Clusters:\s+(\d+)", ntfsinfo(image, "-m")).group(1))
    free = [(cluster * NTFS_CLUSTER, NTFS_CLUSTER) for cluster in range(clusters)
            if not bitmap[cluster >> 3] >> (cluster & 7) & 1]
    return normalized(free)


def ntfs3g_refusal(image: Path, where: Path) -> str | None:
    """ntfs-3g's messages when it refuses to mount ``image`` read-write (it exits, or falls back to a
    read-only mount), None when it mounts it read-write. Unmounted afterwards. With ``norecover``: by
    default ntfs-3g empties an unclean $LogFile and mounts anyway."""
    where.mkdir(exist_ok=True)
    proc = subprocess.Popen(["ntfs-3g", "-o", "no_detach,norecover", str(image), str(where)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.ismount(where):
        if proc.poll() is not None:
            return proc.communicate()[1].decode(errors="replace")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("ntfs-3g neither mounted nor refused")
        time.sleep(0.02)
    for _ in range(50):
        if subprocess.run(["fusermount", "-u", str(where)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    messages = proc.communicate(timeout=60)[1].decode(errors="replace")
    return None if "(Read-Write" in messages else messages


def test_ntfs_unused_clusters_are_the_clear_bits_of_its_bitmap(tmp_path):
    image, _tree = ntfs_with_deletions(tmp_path)
    ranges = unused(image)
    assert ranges == ntfs_free_clusters(image)
    free = int(re.search(r"clusters of free space\s*:\s*(\d+)", run("ntfscluster", "-i", image).stdout.decode())
               .group(1))
    assert sum(length for _, length in ranges) == free * NTFS_CLUSTER
    assert len(ranges) > 3  # the deleted files left holes between the kept ones


def test_ntfs_with_its_unused_clusters_overwritten_is_clean_and_reads_the_same(tmp_path):
    image, tree = ntfs_with_deletions(tmp_path)
    copy = filled_copy(image, unused(image))
    check = run("ntfsfix", "-n", copy).stdout.decode()
    assert "processed successfully" in check, check
    with open_image(copy, "raw") as reader:
        fs = open_filesystem(reader, 0, reader.virtual_size)
        assert assert_tree_equal(fs, tree, check_mode=False) > 40
    with ntfs3g(copy, tmp_path / "check") as where:  # ntfs-3g reads every file as it was written
        for path in tree.rglob("*"):
            if path.is_file():
                assert (where / path.relative_to(tree)).read_bytes() == path.read_bytes(), path


def test_ntfs_marked_dirty_is_refused(tmp_path):
    image, _tree = ntfs_with_deletions(tmp_path)
    run("ntfsfix", image)  # it leaves the volume marked dirty, for Windows' chkdsk
    info = subprocess.run(["ntfsinfo", "-m", str(image)], capture_output=True, text=True)
    assert "scheduled for check" in info.stdout + info.stderr  # ntfs-3g's tools see it dirty
    assert "dirty" in refusal(image)
    run("ntfsfix", "-d", image)  # the flag cleared: sparsifiable again
    assert unused(image) == ntfs_free_clusters(image)


@pytest.mark.parametrize("header, hibernated", [(b"HIBR", True), (b"hibr", True), (b"wake", True),
                                                 (b"\0\0\0\0", False)])
def test_ntfs_hibernated_is_refused(tmp_path, header, hibernated):
    image, _tree = ntfs_with_deletions(tmp_path)
    with ntfs3g(image, tmp_path / "mnt") as where:
        (where / "hiberfil.sys").write_bytes(header + bytes(3 * 4096))
    if header != b"wake":  # the signatures ntfs-3g looks for
        run("cp", image, tmp_path / "probe.img")
        refused = ntfs3g_refusal(tmp_path / "probe.img", tmp_path / "probe")
        assert (refused is not None and "hibernated" in refused) == hibernated, refused
    if hibernated:
        assert "hibernated" in refusal(image)
    else:
        assert unused(image) == ntfs_free_clusters(image)


def test_ntfs_short_hiberfil_is_refused_as_ntfs3g_refuses_it(tmp_path):
    image, _tree = ntfs_with_deletions(tmp_path)
    with ntfs3g(image, tmp_path / "mnt") as where:
        (where / "hiberfil.sys").write_bytes(b"HIB")
    run("cp", image, tmp_path / "probe.img")
    refused = ntfs3g_refusal(tmp_path / "probe.img", tmp_path / "probe")
    assert refused is not None and "refused to mount" in refused
    assert "hiberfil.sys" in refusal(image)


# $LogFile restart pages written by hand, as the NTFS journal's layout has them (ntfs-3g's layout.h)
LOG_PAGE = 4096
RESTART_AREA_OFFSET = 48  # after the 30-byte header and the update sequence array of 9 entries
CLIENT_ARRAY_OFFSET = 64  # from the restart area
NO_CLIENT = 0xFFFF
VOLUME_IS_CLEAN = 0x2


def restart_page(log_size: int, version: tuple[int, int], in_use: int, flags: int, lsn: int) -> bytes:
    """A restart page with one log client, protected by its update sequence array."""
    page = bytearray(LOG_PAGE)
    usa_count = 1 + LOG_PAGE // 512
    struct.pack_into("<4sHHqIIHhh", page, 0, b"RSTR", 30, usa_count, 0, LOG_PAGE, LOG_PAGE, RESTART_AREA_OFFSET,
                     version[1], version[0])
    area_length = CLIENT_ARRAY_OFFSET + 0xA0
    struct.pack_into("<qHHHHIHHqIHH", page, RESTART_AREA_OFFSET, lsn, 1, NO_CLIENT if in_use == 0 else 0, in_use,
                     flags, 67 - log_size.bit_length(), area_length, CLIENT_ARRAY_OFFSET, log_size, 0x28, 0x30,
                     0x40)
    struct.pack_into("<qqHH", page, RESTART_AREA_OFFSET + CLIENT_ARRAY_OFFSET, lsn, lsn, NO_CLIENT, NO_CLIENT)
    usn = b"\x01\x00"
    page[30:32] = usn
    for block in range(LOG_PAGE // 512):  # each block's last two bytes go to the array, the usn replaces them
        end = block * 512 + 510
        page[32 + 2 * block : 34 + 2 * block] = page[end : end + 2]
        page[end : end + 2] = usn
    return bytes(page)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([512, 1024, 4096]), st.sampled_from([b"RSTR", b"CHKD"]), st.integers(0, 1),
       st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12),
       st.integers(0, 63).map(lambda n: 8 * n))
@example(512, b"RSTR", 0, [], 480)  # the restart area's fields after file_size past a 512-byte page
def test_ntfs_restart_page_parser_takes_any_bytes(size, magic, second, changes, area):
    """A consistent page damaged anywhere, its restart area moved anywhere: a state or None, never an error."""
    page = bytearray(restart_page(1 << 21, (1, 1), 0, 0, 5)[:size])
    struct.pack_into("<4sHHqII", page, 0, magic, 30, 1 + size // 512, 0, size, size)
    struct.pack_into("<H", page, 24, area)
    for position, value in changes:
        page[position % size] = value
    found = parse_restart_page(bytes(page), second * size)
    if not changes and area == RESTART_AREA_OFFSET and size == LOG_PAGE and not second and magic == b"RSTR":
        assert found is not None and not found.clean  # the page as written: one client, not marked clean


@pytest.mark.parametrize("version, in_use, flags, clean", [
    ((1, 1), 0, 0, False),  # a client has the journal open and the volume is not marked clean
    ((1, 1), 0, VOLUME_IS_CLEAN, True),
    ((1, 1), NO_CLIENT, 0, True),  # no client
    ((2, 0), NO_CLIENT, 0, False),  # Windows 8 and later: metadata kept in its cache
    ((1, 2), NO_CLIENT, 0, False),  # no version ntfs-3g knows: no valid restart page in a journal not empty
])
def test_ntfs_logfile_state_decides_as_ntfs3g(tmp_path, version, in_use, flags, clean):
    image, _tree = ntfs_with_deletions(tmp_path)
    ((_vcn, lcn, clusters),) = ntfsinfo_runs(image, "$LogFile")
    size = clusters * NTFS_CLUSTER
    for copy, lsn in ((0, 100), (1, 50)):  # both restart pages: the first is the newer
        write_at(image, lcn * NTFS_CLUSTER + copy * LOG_PAGE, restart_page(size, version, in_use, flags, lsn))
    run("cp", image, tmp_path / "probe.img")
    refused = ntfs3g_refusal(tmp_path / "probe.img", tmp_path / "probe")
    assert (refused is None) == clean, refused
    if clean:
        assert unused(image) == ntfs_free_clusters(image)
    else:
        assert "$LogFile" in refusal(image)


# -- FAT -----------------------------------------------------------------------------------------------

FAT_VOLUMES = {"fat12": (12, 3000), "fat16": (16, 20000), "fat32": (32, 40000)}  # bits, KiB


def fat_with_deletions(tmp_path: Path, kind: str, kib: int | None = None) -> tuple[Path, Path]:
    """A FAT volume mtools filled, emptied in part, filled again (so files are fragmented) and emptied in part."""
    if shutil.which("mkfs.fat") is None or shutil.which("mcopy") is None:
        pytest.skip("dosfstools and mtools are needed")
    bits, default_kib = FAT_VOLUMES[kind]
    kib = kib or default_kib
    image = tmp_path / f"{kind}.img"
    run("mkfs.fat", "-F", str(bits), "-C", image, str(kib))
    tree = tmp_path / "tree"
    rng = random.Random(kind)
    first = random_files(rng, tree, 24, kib * 1024 // 40, "first")
    run("mcopy", "-s", "-i", image, *sorted(tree.iterdir()), "::")
    for path in first[1::2]:
        run("mdel", "-i", image, f"::/{path.relative_to(tree)}")
        path.unlink()
    second = random_files(rng, tmp_path / "second", 10, kib * 1024 // 20, "second")
    for path in second:
        target = tree / path.relative_to(tmp_path / "second")
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
        run("mcopy", "-i", image, path, f"::/{target.relative_to(tree)}")
    for path in first[0::4]:  # holes among the files written last
        run("mdel", "-i", image, f"::/{path.relative_to(tree)}")
        path.unlink()
    return image, tree


def mtools_geometry(image: Path) -> tuple[int, int, int]:
    """(data area offset, cluster size, clusters counted by fsck.fat) from minfo's boot sector dump."""
    text = run("minfo", "-i", image, "::").stdout.decode()

    def number(name: str) -> int:
        return int(re.search(rf"^{re.escape(name)}[:=]\s*(\d+)", text, re.M).group(1))

    sector = number("sector size")
    fat_sectors = number("sectors per fat") or number("Big fatlen")
    root_sectors = -(-number("max available root directory slots") * 32 // sector)
    data = (number("reserved (boot) sectors") + number("fats") * fat_sectors + root_sectors) * sector
    total = int(re.search(r"(\d+)/(\d+) clusters", run("fsck.fat", "-n", "-v", image).stdout.decode()).group(2))
    return data, number("cluster size") * sector, total


def mtools_used_clusters(image: Path) -> set[int]:
    """The clusters of every file and directory (the root's too, on FAT32), as mshowfat lists their chains."""
    listing = run("mdir", "-/", "-a", "-b", "-i", image, "::/").stdout.decode().split("\n")
    paths = ["::/"] + ["::/" + line.strip().removeprefix("::/").rstrip("/") for line in listing if line.strip()]
    used: set[int] = set()
    for path in paths:
        for first, last in re.findall(r"<(\d+)(?:-(\d+))?>", run("mshowfat", "-i", image, path).stdout.decode()):
            used.update(range(int(first), int(last or first) + 1))
    return used


@pytest.mark.parametrize("kind", sorted(FAT_VOLUMES))
def test_fat_unused_clusters_are_those_no_chain_holds(tmp_path, kind):
    image, _tree = fat_with_deletions(tmp_path, kind)
    data, cluster, total = mtools_geometry(image)
    used = mtools_used_clusters(image)
    expected = normalized((data + (number - 2) * cluster, cluster) for number in range(2, total + 2)
                          if number not in used)
    ranges = unused(image)
    assert ranges == expected
    check = run("fsck.fat", "-n", "-v", image).stdout.decode()
    files_used = int(re.search(r"(\d+)/(\d+) clusters", check).group(1))
    assert sum(length for _, length in ranges) == (total - files_used) * cluster
    assert len(ranges) > 1


@pytest.mark.parametrize("kind", sorted(FAT_VOLUMES))
def test_fat_with_its_unused_clusters_overwritten_is_clean_and_reads_the_same(tmp_path, kind):
    image, tree = fat_with_deletions(tmp_path, kind)
    copy = filled_copy(image, unused(image))
    check = subprocess.run(["fsck.fat", "-n", str(copy)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "out"
    out.mkdir()
    run("mcopy", "-s", "-i", copy, "::/*", out)  # mtools reads every file back
    for path in tree.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(tree)).read_bytes() == path.read_bytes(), path
    with open_image(copy, "raw") as reader:
        assert assert_tree_equal(open_filesystem(reader, 0, reader.virtual_size), tree, check_mode=False) > 10


def test_fat_cluster_free_in_one_copy_only_is_kept(tmp_path):
    image, _tree = fat_with_deletions(tmp_path, "fat16")
    data, cluster, total = mtools_geometry(image)
    used = mtools_used_clusters(image)
    free = next(number for number in range(total + 1, 2, -1) if number not in used)
    text = run("minfo", "-i", image, "::").stdout.decode()
    reserved = int(re.search(r"reserved \(boot\) sectors:\s*(\d+)", text).group(1))
    fat_sectors = int(re.search(r"sectors per fat:\s*(\d+)", text).group(1))
    write_at(image, (reserved + fat_sectors) * 512 + free * 2, b"\xff\xff")  # the second FAT calls it used
    check = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True).stdout
    assert "FATs differ" in check
    position = data + (free - 2) * cluster
    assert all(not start <= position < start + length for start, length in unused(image))


@pytest.mark.parametrize("kind, where", [
    ("fat12", "boot"), ("fat16", "boot"), ("fat32", "boot"), ("fat16", "fat1"), ("fat32", "fat1")])
def test_fat_dirty_bit_is_refused(tmp_path, kind, where):
    image, _tree = fat_with_deletions(tmp_path, kind)
    if where == "boot":  # the state byte the kernel and Windows NT set while mounted
        offset = 0x41 if kind == "fat32" else 0x25
        write_at(image, offset, bytes([read_at(image, offset, 1)[0] | 0x01]))
    else:  # the clean shutdown bit of FAT[1] (Microsoft's FAT specification), in every FAT
        text = run("minfo", "-i", image, "::").stdout.decode()
        reserved = int(re.search(r"reserved \(boot\) sectors:\s*(\d+)", text).group(1))
        fat_sectors = int(re.search(r"(?:sectors per fat|Big fatlen)[:=]\s*([1-9]\d*)", text).group(1))
        width, bit = (2, 0x8000) if kind == "fat16" else (4, 0x08000000)
        for copy in range(2):
            position = (reserved + copy * fat_sectors) * 512 + width
            value = int.from_bytes(read_at(image, position, width), "little") & ~bit
            write_at(image, position, value.to_bytes(width, "little"))
    check = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True).stdout
    assert "Dirty bit is set" in check
    assert "dirty bit" in refusal(image)


def test_fat_disk_error_bit_is_refused(tmp_path):
    image, _tree = fat_with_deletions(tmp_path, "fat32")
    text = run("minfo", "-i", image, "::").stdout.decode()
    reserved = int(re.search(r"reserved \(boot\) sectors:\s*(\d+)", text).group(1))
    position = reserved * 512 + 4
    value = int.from_bytes(read_at(image, position, 4), "little") & ~0x04000000  # HrdErrBitMask
    write_at(image, position, value.to_bytes(4, "little"))
    assert "disk error" in refusal(image)


# -- btrfs ---------------------------------------------------------------------------------------------

BTRFS_SIZE = 300 * MiB
needs_btrfs_mount = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None,
                                       reason="needs root (a loop mount) and btrfs-progs")


def mount_btrfs(image: Path, where: Path, options: str = "") -> None:
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-o", "loop" + ("," + options if options else ""), str(image), str(where)],
                          capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a btrfs loop device here: {proc.stderr.decode().strip()}")


def btrfs_with_deletions(tmp_path: Path, mkfs_options: tuple[str, ...], mount_options: str = "") -> tuple[Path, Path]:
    """A btrfs the kernel filled, emptied in part (a whole data chunk's worth) and filled again."""
    image = blank(tmp_path / "btrfs.img", BTRFS_SIZE)
    run("mkfs.btrfs", "-q", "-f", *mkfs_options, image)
    tree = tmp_path / "tree"
    rng = random.Random(" ".join(mkfs_options))
    where = tmp_path / "mnt"
    mount_btrfs(image, where, mount_options)
    try:
        first = random_files(rng, tree, 30, 4 * MiB, "first")
        (tree / "link").symlink_to("sub/first000.bin")
        shutil.copytree(tree, where, symlinks=True, dirs_exist_ok=True)
        run("sync")
        for path in first[1::2]:
            (where / path.relative_to(tree)).unlink()
            path.unlink()
        run("sync")
        random_files(rng, tmp_path / "second", 10, 2 * MiB, "second")
        shutil.copytree(tmp_path / "second", where, dirs_exist_ok=True)
        shutil.copytree(tmp_path / "second", tree, dirs_exist_ok=True)
    finally:
        run("umount", where)
    return image, tree


def dump_tree(image: Path, tree: str) -> str:
    return run("btrfs", "inspect-internal", "dump-tree", "-t", tree, image).stdout.decode()


def dump_super(image: Path) -> str:
    return run("btrfs", "inspect-internal", "dump-super", image).stdout.decode()


def btrfs_expected_unused(image: Path) -> list[tuple[int, int]]:
    """The device ranges btrfs-progs' dump of the trees leaves free: outside every chunk stripe (the chunk
    tree's, which the device tree's extents must match), and inside the stripes of data chunks where no
    extent item lies; the first MiB and the superblock copies kept."""
    super_text = dump_super(image)
    device_size = int(re.search(r"dev_item.total_bytes\s+(\d+)", super_text).group(1))
    node_size = int(re.search(r"^nodesize\s+(\d+)", super_text, re.M).group(1))
    chunks = []
    for logical, length, kind, body in re.findall(
            r"key \(FIRST_CHUNK_TREE CHUNK_ITEM (\d+)\).*?\n\s+length (\d+) owner \d+ stripe_len \d+ type (\S+)"
            r"(.*?)(?=\n\titem|\Z)", dump_tree(image, "chunk"), re.S):
        offsets = [int(value) for value in re.findall(r"stripe \d+ devid 1 offset (\d+)", body)]
        chunks.append((int(logical), int(length), kind, offsets))
    stripes = sorted((offset, length) for _, length, _, offsets in chunks for offset in offsets)
    dev_extents = sorted((int(physical), int(length)) for physical, length in re.findall(
        r"key \(1 DEV_EXTENT (\d+)\).*?length (\d+)", dump_tree(image, "dev"), re.S))
    assert dev_extents == stripes
    extents = [(int(start), int(size) if kind == "EXTENT_ITEM" else node_size) for start, kind, size in re.findall(
        r"key \((\d+) (EXTENT_ITEM|METADATA_ITEM) (\d+)\)", dump_tree(image, "extent"))]
    free = []
    position = 0
    for offset, length in [*stripes, (device_size, 0)]:
        free.append((position, offset - position))
        position = offset + length
    for logical, length, kind, offsets in chunks:
        if set(kind.split("|")) & {"METADATA", "SYSTEM"}:  # mixed chunks too: never free inside
            continue
        taken = normalized((start, size) for start, size in extents if logical <= start < logical + length)
        holes, at = [], logical
        for start, size in [*taken, (logical + length, 0)]:
            holes.append((at, start - at))
            at = start + size
        free += [(offset + start - logical, size) for offset in offsets for start, size in holes]
    kept = [(0, MiB)] + [(copy, 4096) for copy in (64 * 1024, 64 * MiB) if copy + 4096 <= device_size]
    ranges = normalized(free)
    for hole_start, hole_length in kept:  # cut what is kept out
        cut = []
        for start, length in ranges:
            end, hole_end = start + length, hole_start + hole_length
            cut += [(start, min(end, hole_start) - start), (max(start, hole_end), end - max(start, hole_end))]
        ranges = normalized((start, length) for start, length in cut if length > 0)
    return ranges


BTRFS_VARIANTS = {
    "default": ((), ""),  # DUP metadata, single data
    "dup-data": (("-d", "dup", "-m", "dup"), ""),  # both copies of a data chunk's free space
    "single": (("-m", "single"), "compress-force=zstd"),  # compressed extents: fewer disk bytes than file bytes
    "mixed": (("-M",), ""),  # data and metadata share chunks: nothing free inside them
}


@needs_btrfs_mount
@pytest.mark.parametrize("variant", sorted(BTRFS_VARIANTS))
def test_btrfs_unused_ranges_are_what_its_trees_leave_free(tmp_path, variant):
    mkfs_options, mount_options = BTRFS_VARIANTS[variant]
    image, _tree = btrfs_with_deletions(tmp_path, mkfs_options, mount_options)
    ranges = unused(image)
    assert ranges == btrfs_expected_unused(image)
    assert sum(length for _, length in ranges) > 40 * MiB


@needs_btrfs_mount
@pytest.mark.parametrize("variant", ["default", "dup-data"])
def test_btrfs_with_its_unused_ranges_overwritten_is_clean_and_reads_the_same(tmp_path, variant):
    mkfs_options, mount_options = BTRFS_VARIANTS[variant]
    image, tree = btrfs_with_deletions(tmp_path, mkfs_options, mount_options)
    copy = filled_copy(image, unused(image))
    check = subprocess.run(["btrfs", "check", "--readonly", "--check-data-csum", str(copy)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with open_image(copy, "raw") as reader:
        assert assert_tree_equal(open_filesystem(reader, 0, reader.virtual_size), tree, check_mode=False) > 10
    where = tmp_path / "check"
    mount_btrfs(copy, where, "ro")
    try:  # the kernel reads every file as it was written (and checks the data checksums)
        for path in tree.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert (where / path.relative_to(tree)).read_bytes() == path.read_bytes(), path
    finally:
        run("umount", where)


@needs_btrfs_mount
def test_btrfs_with_a_pending_log_tree_is_refused(tmp_path):
    image = blank(tmp_path / "btrfs.img", BTRFS_SIZE)
    run("mkfs.btrfs", "-q", "-f", image)
    where = tmp_path / "mnt"
    mount_btrfs(image, where, "commit=600")
    try:
        with open(where / "fsynced", "wb") as f:  # fsync writes the log tree, not a transaction
            f.write(os.urandom(100_000))
            f.flush()
            os.fsync(f.fileno())
        run("cp", "--sparse=always", image, tmp_path / "crashed.img")  # what a power cut leaves
    finally:
        run("umount", where)
    assert int(re.search(r"^log_root\s+(\d+)", dump_super(tmp_path / "crashed.img"), re.M).group(1)) != 0
    assert "log tree" in refusal(tmp_path / "crashed.img")
    assert int(re.search(r"^log_root\s+(\d+)", dump_super(image), re.M).group(1)) == 0
    assert unused(image) == btrfs_expected_unused(image)  # unmounted cleanly: the log is gone


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs not installed")
@pytest.mark.parametrize("bit, name", [(33, "METADUMP"), (35, "CHANGING_FSID")])
def test_btrfs_superblock_flagged_half_way_or_as_a_dump_is_refused(tmp_path, bit, name):
    image = blank(tmp_path / "btrfs.img", 160 * MiB)
    run("mkfs.btrfs", "-q", "-f", image)
    superblock = bytearray(read_at(image, 0x10000, 4096))
    flags = struct.unpack_from("<Q", superblock, 0x38)[0]
    struct.pack_into("<Q", superblock, 0x38, flags | 1 << bit)
    superblock[0:4] = crc32.iscsi(bytes(superblock[32:])).to_bytes(4, "little")
    write_at(image, 0x10000, bytes(superblock))
    assert re.search(rf"^flags\s+0x[0-9a-f]+\s+\( WRITTEN \|\s+{name} \)", dump_super(image), re.M)
    assert name.lower() in refusal(image)


# -- swap ----------------------------------------------------------------------------------------------


def mkswap(image: Path, page: int) -> int:
    """mkswap with pages of ``page`` bytes; the bytes of swap space it says it set up."""
    out = run("mkswap", "-p", str(page), "-L", "guest-swap", image).stdout.decode()
    return int(re.search(r"size = .*\((\d+) bytes\)", out).group(1))


@pytest.mark.skipif(shutil.which("mkswap") is None, reason="util-linux's mkswap is needed")
@pytest.mark.parametrize("page", [4096, 16384, 65536])
def test_swap_is_unused_after_its_header_page(tmp_path, page):
    image = blank(tmp_path / "swap.img", 20 * MiB + 5000)  # not a whole number of pages
    space = mkswap(image, page)
    head = read_at(image, 0, HEAD_SIZE)
    assert swap_unused_ranges(head, image.stat().st_size) == [(page, space)]
    fill(image, [(page, space)])
    found = run("swaplabel", image).stdout.decode()  # the header page is intact
    assert "guest-swap" in found


@pytest.mark.skipif(shutil.which("mkswap") is None, reason="util-linux's mkswap is needed")
def test_swap_holding_a_hibernation_image_is_refused(tmp_path):
    image = blank(tmp_path / "swap.img", 8 * MiB)
    mkswap(image, 4096)
    write_at(image, 4096 - 10, b"S1SUSPEND\0")  # what the kernel writes over the signature when it hibernates
    blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(image)], capture_output=True, text=True)
    assert blkid.stdout.strip() == "swsuspend"
    with pytest.raises(NotSparsifiable, match="hibernation"):
        swap_unused_ranges(read_at(image, 0, HEAD_SIZE), 8 * MiB)


# -- LVM2 ----------------------------------------------------------------------------------------------


def expected_free_extents(tools: LoopLvm, *devices: str) -> list[tuple[str, int, int]]:
    """(PV UUID, byte offset from the PV's start, length) of the segments ``pvs --segments`` lists without an LV."""
    free = []
    for segment in tools.report("pvs", "pv_uuid,pe_start,pvseg_start,pvseg_size,lv_name", "--segments", *devices):
        if not segment["lv_name"]:
            start = int(segment["pe_start"]) + int(segment["pvseg_start"]) * EXTENT
            free.append((segment["pv_uuid"], start, int(segment["pvseg_size"]) * EXTENT))
    return sorted(free)


def found_free_extents(group: VolumeGroup) -> list[tuple[str, int, int]]:
    return sorted((pv.uuid, start, length) for pv, start, length in group.free_extent_ranges())


def lv_pieces(tools: LoopLvm, lv: str, pe_starts: dict[str, int]) -> list[tuple[Path, int, int]]:
    """(image, byte offset, length) of each PV range ``lvs`` reports for ``lv`` (VG/LV), in LV order."""
    pieces = []
    for segment in tools.report("lvs", "seg_pe_ranges", "--segments", lv):
        for item in segment["seg_pe_ranges"].split():
            device, span = item.split(":")
            first, last = (int(value) for value in span.split("-"))
            image, offset = tools.where(device)
            pieces.append((image, offset + pe_starts[device] + first * EXTENT, (last - first + 1) * EXTENT))
    return pieces


@dataclass
class SparseGroup:
    tools: LoopLvm
    vg: str
    devices: list[str]
    images: list[Path]
    pe_starts: dict[str, int]

    def assemble(self) -> tuple[VolumeGroup, dict[object, Path]]:
        """The volume group as diskimg finds it on the images, and the image behind each disk it reads."""
        readers = {open_image(image): image for image in self.images}
        return lvm_assemble([(reader, 0, reader.virtual_size) for reader in readers], self.vg), readers


@pytest.fixture
def sparse_group(lvm_tools: LoopLvm, tmp_path: Path) -> SparseGroup:
    """Two PVs (a whole disk each) and LVs ``a``, ``fat`` (two segments, one on each disk) and ``swap``,
    and the extents of a removed LV between them: free extents between and after the LVs."""
    images = [blank(tmp_path / f"pv{index}.img", 64 * MiB) for index in range(2)]
    one, two = devices = [lvm_tools.attach(image) for image in images]
    vg = unique_vg("sparse-vg")
    lvm_tools("pvcreate", "-q", one, two)
    lvm_tools("vgcreate", "-q", vg, one, two)
    create = ("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn")
    lvm_tools(*create, "-l", "2", "-n", "a", vg, f"{one}:0-1")
    lvm_tools(*create, "-l", "3", "-n", "gone", vg, f"{one}:2-4")
    lvm_tools(*create, "-l", "4", "-n", "fat", vg, f"{one}:6-7", f"{two}:3-4")
    lvm_tools(*create, "-l", "2", "-n", "swap", vg, f"{two}:8-9")
    lvm_tools("lvremove", "-q", "-f", "--driverloaded", "n", f"{vg}/gone")
    pe_starts = {pv["pv_name"]: int(pv["pe_start"]) for pv in lvm_tools.report("pvs", "pv_name,pe_start", one, two)}
    return SparseGroup(lvm_tools, vg, devices, images, pe_starts)


def place(pieces: list[tuple[Path, int, int]], content: bytes) -> None:
    """Write an LV's content where its extents lie."""
    position = 0
    for image, offset, length in pieces:
        write_at(image, offset, content[position : position + length])
        position += length


def fill_through(volume: LvmVolume, readers: dict[object, Path], ranges: list[tuple[int, int]]) -> None:
    """Fill ranges of an LV on the disks, where the LV maps them."""
    for start, length in ranges:
        for disk, offset, size in volume.locate(start, length):
            fill(readers[disk], [(offset, size)])


@needs_lvm
def test_lvm_free_extents_are_those_pvs_reports_free(sparse_group):
    group, _readers = sparse_group.assemble()
    found = found_free_extents(group)
    assert found == expected_free_extents(sparse_group.tools, *sparse_group.devices)
    assert len(found) == 5  # on the first PV, the removed LV's with the one after and the end; on the second, around
    # "fat"'s second segment and after "swap"


@needs_lvm
def test_lvm_free_extents_beside_raid_thin_and_snapshot_volumes(two_disks):
    group = lvm_assemble(two_disks.areas(), two_disks.vg)
    found = found_free_extents(group)
    assert found == expected_free_extents(two_disks.tools, two_disks.system_pv, two_disks.data_pv)
    assert found


@needs_lvm
def test_lvm_free_extents_refused_with_a_missing_pv(two_disks):
    scan = find_volume_groups(two_disks.areas(data=False))  # type: ignore[arg-type]
    (group,) = scan.volume_groups
    with pytest.raises(NotSparsifiable, match="on none of the disks"):
        group.free_extent_ranges()


@needs_lvm
@pytest.mark.parametrize("name, legs", [("mirrored", ("mirrored_rimage_0", "mirrored_rimage_1")),
                                        ("legacy", ("legacy_mimage_0", "legacy_mimage_1"))])
def test_lvm_mirrored_lv_maps_onto_every_leg(two_disks, name, legs):
    areas = two_disks.areas()
    images = {areas[0][0]: two_disks.system, areas[-1][0]: two_disks.data}
    volume = lvm_assemble(areas, two_disks.vg).open(name)
    every = [(images[disk], offset, length) for disk, offset, length in volume.locate(EXTENT, 5000, every_copy=True)]
    assert every == [(image, start + EXTENT, 5000) for image, start in (two_disks.starts[leg] for leg in legs)]
    one = [(images[disk], offset, length) for disk, offset, length in volume.locate(EXTENT, 5000)]
    assert one == every[:1]  # what reads use: the first leg
    with pytest.raises(ValueError):
        list(volume.locate(volume.size - 10, 11))


@needs_lvm
def test_lvm_fat_lv_unused_ranges_map_onto_the_disks(sparse_group, tmp_path):
    """A FAT in a two-segment LV: its unused clusters, mapped through the LV onto the PVs' disks and filled
    there, leave a FAT that fsck.fat finds clean and mtools reads as written."""
    fat, tree = fat_with_deletions(tmp_path, "fat16", 12000)
    place(lv_pieces(sparse_group.tools, f"{sparse_group.vg}/fat", sparse_group.pe_starts),
          fat.read_bytes().ljust(4 * EXTENT, b"\0"))
    group, readers = sparse_group.assemble()
    volume = group.open("fat")
    fs = open_filesystem(volume, 0, volume.size)
    assert fs is not None and fs.type == "fat16"
    ranges = list(fs.unused_ranges())
    assert ranges == unused(fat)  # as read straight from its image
    fill_through(volume, readers, ranges)
    extracted = tmp_path / "extracted.img"
    group, _readers = sparse_group.assemble()
    extracted.write_bytes(group.open("fat").read_at(0, volume.size))
    for start, length in ranges:  # every unused range was reached through the mapping
        assert read_at(extracted, start, length) == (PATTERN * (length // len(PATTERN) + 1))[:length]
    check = subprocess.run(["fsck.fat", "-n", str(extracted)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    out = tmp_path / "out"
    out.mkdir()
    run("mcopy", "-s", "-i", extracted, "::/*", out)
    for path in tree.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(tree)).read_bytes() == path.read_bytes(), path


@needs_lvm
@pytest.mark.skipif(shutil.which("mkswap") is None, reason="util-linux's mkswap is needed")
def test_lvm_swap_lv_is_unused_after_its_header(sparse_group, tmp_path):
    swap = blank(tmp_path / "swap.img", 2 * EXTENT)
    space = mkswap(swap, 4096)
    uuid = run("blkid", "-p", "-o", "value", "-s", "UUID", swap).stdout.decode().strip()
    place(lv_pieces(sparse_group.tools, f"{sparse_group.vg}/swap", sparse_group.pe_starts), swap.read_bytes())
    group, readers = sparse_group.assemble()
    volume = group.open("swap")
    ranges = swap_unused_ranges(volume.read_at(0, HEAD_SIZE), volume.size)
    assert ranges == [(4096, space)]
    fill_through(volume, readers, ranges)
    extracted = tmp_path / "extracted.img"
    group, _readers = sparse_group.assemble()
    extracted.write_bytes(group.open("swap").read_at(0, volume.size))
    assert read_at(extracted, 4096, 4096) == PATTERN[:4096]
    found = run("blkid", "-p", "-o", "export", extracted).stdout.decode()
    assert f"UUID={uuid}" in found and "TYPE=swap" in found and "LABEL=guest-swap" in found
