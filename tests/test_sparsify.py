"""--sparsify: what the guest's file systems do not use reads as zeros in the output, and nothing else changes.

The engine (``inspection/freespace.py``, ``conversion/sparsify.py``) is tested first with a stand-in file
system whose ``unused_ranges`` the test chooses (``fake_fs``), on disks made by sfdisk, mkfs, mkswap, LVM2's
tools, cryptsetup and GRUB's images: where the ranges land on the disk, that everything outside the volumes
(tables, boot loaders in the gaps, unknown partitions, extended boot records) and every volume that cannot be
read safely is kept byte for byte, and that the reader, the converter, measure and export report it. Then the
real drivers: files written and deleted on a loop-mounted file system, the disk converted with --sparsify to
raw and qcow2, checked against the source byte for byte outside the ranges, by the file system's own checker,
and by reading every file before and after.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import itertools
import json
import os
import random
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import diskimg
from diskimg.archives.manifest import parse_manifest
from diskimg.conversion.sparsify import SparsifiedReader, carve, sparsified_bytes
from diskimg.errors import ArchiveError, UsageError
from diskimg.formats.reader import Extent, ExtentKind
from diskimg.inspection import freespace
from diskimg.inspection.freespace import SparsifyPlan, UnusedRanges, plan_sparsify
from diskimg.inspection.fs import open_filesystem
from diskimg.inspection.fs.base import GuestFileSystem, NotSparsifiable

from .support.disks import SECTOR, copy_in, prefilled, sfdisk, sfdisk_partitions, write_boot_code
from .support.files import blank, read_at, write_at
from .support.filesystems import can_mount, need_ntfs_tools, ntfs3g, protofile_lines
from .support.fs_compare import assert_tree_equal
from .support.lvm import EXTENT, LoopLvm, TwoDisks, needs_lvm, place_striped, unique_vg
from .support.tools import diskimg_cli, diskimg_to_pipe, qemu_img, requires_qemu, run
from .support.units import MiB

# -- helpers ----------------------------------------------------------------------------------------------------


def ranges_of(pairs: list[tuple[int, int]], volume: int = 0) -> UnusedRanges:
    ranges = UnusedRanges()
    for start, end in pairs:
        ranges.starts.append(start)
        ranges.ends.append(end)
        ranges.volumes.append(volume)
    return ranges


def plan_of(path: Path) -> SparsifyPlan:
    with diskimg.open_image(path) as reader:
        return plan_sparsify(reader)


def volume_named(plan: SparsifyPlan, name: str) -> freespace.VolumePlan:
    (found,) = [volume for volume in plan.volumes if volume.name == name]
    return found




def ext4_file(path: Path, size: int, *extra: str) -> Path:
    blank(path, size)
    run("mkfs.ext4", "-q", "-F", *extra, path)
    return path


def assert_same_outside(source: Path, output: Path, ranges: list[tuple[int, int]]) -> None:
    """``output`` (RAW) equals ``source`` byte for byte outside ``ranges`` and holds zeros inside them."""
    size = source.stat().st_size
    assert output.stat().st_size == size
    position = 0
    with open(source, "rb") as a, open(output, "rb") as b:
        for start, end in [*ranges, (size, size)]:
            a.seek(position)
            b.seek(position)
            while position < start:
                step = min(4 * MiB, start - position)
                assert a.read(step) == b.read(step), f"differs in [{position}, {position + step})"
                position += step
            b.seek(start)
            while position < end:
                step = min(4 * MiB, end - position)
                assert b.read(step) == bytes(step), f"not zero in [{position}, {position + step})"
                position += step


class FakeFs:
    """A stand-in for a file system driver: its ``unused_ranges`` are the test's."""

    def __init__(self, ranges: list[tuple[int, int]], fail_after: int | None = None) -> None:
        self.ranges = ranges
        self.fail_after = fail_after

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        for index, found in enumerate(self.ranges):
            if index == self.fail_after:
                raise NotSparsifiable("the journal needs recovery")
            yield found


#: file system type -> (volume length -> the stand-in driver)
FakeDrivers = dict[str, Callable[[int], FakeFs]]


@pytest.fixture
def fake_fs(monkeypatch: pytest.MonkeyPatch) -> FakeDrivers:
    """File systems are probed from their real superblocks; those of the types set here are then read by a
    stand-in driver (the others as having no driver)."""
    drivers: FakeDrivers = {}

    def open_fake(disk: object, offset: int, length: int, fs_type: str | None = None) -> FakeFs | None:
        return drivers[fs_type](length) if fs_type in drivers else None

    monkeypatch.setattr(freespace, "open_filesystem", open_fake)
    return drivers


def everything(length: int) -> FakeFs:
    """A file system that says none of its bytes are in use."""
    return FakeFs([(0, length)])


# -- the reader ------------------------------------------------------------------------------------------------


#: a disk's size, its data runs (offset, bytes) and ranges (start, end)
DiskCase = tuple[int, list[tuple[int, bytes]], list[tuple[int, int]]]


@st.composite
def disk_and_ranges(draw: st.DrawFn) -> DiskCase:
    """A disk of some sectors with data runs (holes between), and sorted disjoint ranges in whole sectors."""
    sectors = draw(st.integers(16, 512))
    cuts = sorted(draw(st.sets(st.integers(0, sectors), min_size=2, max_size=20)))
    runs = [(a * SECTOR, random.Random(a).randbytes((b - a) * SECTOR))
            for a, b in zip(cuts[0::2], cuts[1::2], strict=False) if b > a]
    bounds = sorted(draw(st.sets(st.integers(0, sectors), max_size=20)))
    ranges = [(a * SECTOR, b * SECTOR) for a, b in zip(bounds[0::2], bounds[1::2], strict=False) if b > a]
    return sectors * SECTOR, runs, ranges


@settings(max_examples=60, deadline=None)
@given(disk_and_ranges())
def test_reader_reads_zeros_in_the_ranges_and_the_source_elsewhere(tmp_path_factory: pytest.TempPathFactory,
                                                                   case: DiskCase) -> None:
    size, runs, pairs = case
    path = tmp_path_factory.mktemp("reader") / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    expected = bytearray(path.read_bytes())
    for start, end in pairs:
        expected[start:end] = bytes(end - start)
    rng = random.Random(size)
    with diskimg.open_image(path, "raw") as source:
        reader = SparsifiedReader(source, ranges_of(pairs))
        assert reader.read_at(0, size) == expected
        for _ in range(20):
            offset = rng.randrange(size)
            length = rng.randrange(size - offset + 1)
            assert reader.read_at(offset, length) == expected[offset : offset + length]
            buffer = bytearray(length)
            assert reader.readinto_at(offset, buffer) == length and buffer == expected[offset : offset + length]
        extents = list(reader.extents())
        source_data = [(e.start, e.end) for e in source.extents() if e.kind is ExtentKind.DATA]
        reader.close()
        assert not source.closed  # the source is its opener's to close
    assert extents[0].start == 0 and extents[-1].end == size
    assert all(a.end == b.start for a, b in itertools.pairwise(extents))
    in_data = bytearray(size)  # 1 where the wrapper's map says DATA
    for extent in extents:
        if extent.kind is ExtentKind.DATA:
            in_data[extent.start : extent.end] = b"\1" * extent.length
            assert extent.host_offset == extent.start  # RAW: the data where it lies
    for start, end in pairs:
        assert not any(in_data[start:end])
    was_data = bytearray(size)
    for start, end in source_data:
        was_data[start:end] = b"\1" * (end - start)
    for start, end in pairs:
        was_data[start:end] = bytes(end - start)
    assert in_data == was_data  # the source's map less the ranges, nothing else


def test_sparsified_bytes_count_the_data_inside_each_volume_s_ranges() -> None:
    extents = [Extent(0, 4096, ExtentKind.DATA), Extent(4096, 4096, ExtentKind.ZERO),
               Extent(8192, 8192, ExtentKind.DATA)]
    ranges = UnusedRanges()
    for start, end, volume in ((1024, 6144, 0), (7168, 9216, 1), (12288, 20480, 1)):
        ranges.starts.append(start)
        ranges.ends.append(end)
        ranges.volumes.append(volume)
    # volume 0: 1024-4096 of data (the rest is a hole); volume 1: 8192-9216 and 12288-16384
    assert sparsified_bytes(extents, ranges, 2) == [3072, 1024 + 4096]
    carved = list(carve(extents, ranges))
    assert sum(e.length for e in carved if e.kind is ExtentKind.DATA) == 1024 + (12288 - 9216)


def test_a_disk_in_a_compressed_stream_is_refused(tmp_path: Path) -> None:
    raw = blank(tmp_path / "disk.raw", 4 * MiB)
    run("gzip", "-k", raw)
    with pytest.raises(UsageError, match="compressed"):
        diskimg.convert(str(raw) + ".gz", tmp_path / "out.raw", "raw", sparsify=True)


def test_the_qemu_img_backend_cannot_sparsify(tmp_path: Path) -> None:
    raw = blank(tmp_path / "disk.raw", 4 * MiB)
    with pytest.raises(UsageError, match="qemu-img backend cannot sparsify"):
        diskimg.convert(raw, tmp_path / "out.raw", "raw", backend="qemu-img", sparsify=True)
    assert not (tmp_path / "out.raw").exists()
    proc = diskimg_cli("convert", raw, tmp_path / "out.raw", "--backend", "qemu-img", "--sparsify")
    assert proc.returncode == 2 and b"cannot sparsify" in proc.stderr


# -- the plan, with a stand-in driver -------------------------------------------------------------------------


def gpt_disk_with_ext4(tmp_path: Path, *mkfs: str) -> Path:
    disk = blank(tmp_path / "disk.raw", 16 * MiB)
    sfdisk(disk, "label: gpt\nstart=2048, size=16384, type=linux\n")
    copy_in(disk, ext4_file(tmp_path / "p1.img", 8 * MiB, *mkfs), MiB)
    return disk


def test_ranges_land_on_the_disk_in_whole_sectors(tmp_path: Path, fake_fs: FakeDrivers) -> None:
    disk = gpt_disk_with_ext4(tmp_path)
    fake_fs["ext4"] = lambda length: FakeFs([(1000, 5000), (8192, 4096), (12288, 100)])
    plan = plan_of(disk)
    (start,) = [p["start"] for p in sfdisk_partitions(disk)]
    # a range's partial sectors are kept: 1000 rounds up to 1024, 6000 down to 5632; 100 bytes make no sector
    assert list(plan.ranges) == [(start + 1024, start + 5632, 0), (start + 8192, start + 12288, 0)]
    volume = volume_named(plan, "partition 1")
    assert volume.sparsified and volume.file_system == "ext4" and volume.reason is None
    assert volume.unused_bytes == plan.unused_bytes == (5632 - 1024) + 4096


def test_a_file_system_failing_half_way_leaves_nothing_out(tmp_path: Path, fake_fs: FakeDrivers) -> None:
    disk = gpt_disk_with_ext4(tmp_path)
    fake_fs["ext4"] = lambda length: FakeFs([(4096, 4096), (16384, 4096), (65536, 4096)], fail_after=2)
    plan = plan_of(disk)
    volume = volume_named(plan, "partition 1")
    assert not volume.sparsified and volume.reason == "the journal needs recovery"
    assert len(plan.ranges) == 0 and volume.unused_bytes == 0


@pytest.mark.parametrize("ranges", [[(8192, 4096), (4096, 4096)], [(4096, 8192), (8192, 4096)],
                                    [(4096, 8 * MiB)]], ids=["out-of-order", "overlapping", "past-the-end"])
def test_ranges_out_of_order_or_outside_keep_the_volume_whole(tmp_path: Path, fake_fs: FakeDrivers,
                                                              ranges: list[tuple[int, int]]) -> None:
    disk = gpt_disk_with_ext4(tmp_path)
    fake_fs["ext4"] = lambda length: FakeFs(ranges)
    plan = plan_of(disk)
    volume = volume_named(plan, "partition 1")
    assert not volume.sparsified and "out of order or outside" in (volume.reason or "")
    assert len(plan.ranges) == 0


def test_past_the_limit_the_shortest_ranges_are_given_up(tmp_path: Path, fake_fs: FakeDrivers,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    disk = gpt_disk_with_ext4(tmp_path)
    rng = random.Random(7)
    given_ranges = []
    position = 0
    for _ in range(1000):
        position += SECTOR * rng.randrange(1, 4)
        length = SECTOR * rng.choice((1, 1, 1, 2, 2, 4, 8, 16))
        given_ranges.append((position, length))
        position += length
    fake_fs["ext4"] = lambda length: FakeFs(given_ranges)
    monkeypatch.setattr(freespace, "MAX_RANGES", 64)
    plan = plan_of(disk)
    kept = [(start - MiB, end - start) for start, end, _ in plan.ranges]
    assert 0 < len(kept) <= 64, plan.volumes
    assert set(kept) <= set(given_ranges)
    shortest_kept = min(length for _, length in kept)
    assert all((start, length) in kept for start, length in given_ranges if length > shortest_kept)
    assert volume_named(plan, "partition 1").unused_bytes == sum(length for _, length in kept)


def test_everything_outside_the_file_systems_is_kept(tmp_path: Path, fake_fs: FakeDrivers) -> None:
    """An MBR disk as a BIOS machine has it: GRUB's boot.img and core image in the gap after the MBR, an ext4
    partition, a partition of a type nobody knows full of data, an extended partition of two ext4 logical
    partitions (their boot records in between). Every ext4 says all of its bytes are free: only they go."""
    disk = blank(tmp_path / "disk.raw", 64 * MiB)
    sfdisk(disk, "label: dos\ndisk.raw1 : start=2048, size=16M, type=83\ndisk.raw2 : size=8M, type=da\n"
                 "disk.raw3 : size=30M, type=5\ndisk.raw5 : size=10M, type=83\ndisk.raw6 : size=10M, type=83\n")
    gap = random.Random(1).randbytes(2047 * SECTOR)
    write_at(disk, SECTOR, gap)  # "a boot loader in the gap"
    write_at(disk, 0, random.Random(2).randbytes(440))  # boot code
    parts = sfdisk_partitions(disk)
    by_type = {p["type"] for p in parts}
    assert by_type == {"83", "da", "5"}
    for index, part in enumerate(parts):
        if part["type"] == "83":
            copy_in(disk, ext4_file(tmp_path / f"p{index}.img", part["end"] - part["start"]), part["start"])
        elif part["type"] == "da":
            write_at(disk, part["start"], random.Random(3).randbytes(part["end"] - part["start"]))
    fake_fs["ext4"] = everything
    out = tmp_path / "out.raw"
    result = diskimg.convert(disk, out, "raw", sparsify=True)
    ext4 = [(p["start"], p["end"]) for p in parts if p["type"] == "83"]
    assert_same_outside(disk, out, ext4)
    assert read_at(out, SECTOR, len(gap)) == gap
    assert sfdisk_partitions(out) == parts  # the extended boot records intact
    assert result.sparsified is not None
    kept = {v.name: v.reason for v in result.sparsified if not v.sparsified}
    assert kept == {"partition 2": "no file system diskimg recognises (partition type: Unknown)"} or \
        list(kept) == ["partition 2"]
    assert [v.name for v in result.sparsified if v.sparsified] == ["partition 1", "partition 5", "partition 6"]
    assert all(v.unused_bytes == v.length for v in result.sparsified if v.sparsified)


def test_the_gpt_and_its_backup_are_kept(tmp_path: Path, fake_fs: FakeDrivers) -> None:
    disk = blank(tmp_path / "disk.raw", 32 * MiB)
    sfdisk(disk, "label: gpt\nfirst-lba: 34\nstart=34, size=4062, type=21686148-6449-6E6F-744E-656564454649\n"
                 "start=4096, type=linux\n")
    parts = sfdisk_partitions(disk)
    write_at(disk, parts[0]["start"], random.Random(4).randbytes(parts[0]["end"] - parts[0]["start"]))
    copy_in(disk, ext4_file(tmp_path / "p2.img", parts[1]["end"] - parts[1]["start"]), parts[1]["start"])
    fake_fs["ext4"] = everything
    out = tmp_path / "out.raw"
    result = diskimg.convert(disk, out, "raw", sparsify=True)
    assert_same_outside(disk, out, [(parts[1]["start"], parts[1]["end"])])
    run("sgdisk", "-v", out)  # both GPT headers and arrays intact
    assert result.sparsified is not None
    assert [(v.name, v.sparsified) for v in result.sparsified] == [("partition 1", False), ("partition 2", True)]
    assert "BIOS boot" in (result.sparsified[0].reason or "")


def mbr_entry(status: int, kind: int, start_lba: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", status, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", start_lba, sectors)


@pytest.mark.parametrize("second", [(8192, 16384), (30720, 8192)], ids=["overlapping", "past-the-disk"])
def test_partitions_whose_bounds_cannot_be_trusted_are_kept(tmp_path: Path, fake_fs: FakeDrivers,
                                                           second: tuple[int, int]) -> None:
    """Hand-written MBR entries (no partitioning tool writes them): partition 2 over partition 1, or past the
    end of the disk. Neither is touched."""
    disk = blank(tmp_path / "disk.raw", 16 * MiB)
    entries = mbr_entry(0, 0x83, 2048, 16384) + mbr_entry(0, 0x83, *second) + bytes(32)
    write_at(disk, 446, entries + b"\x55\xaa")
    copy_in(disk, ext4_file(tmp_path / "p1.img", 8 * MiB), MiB)
    copy_in(disk, ext4_file(tmp_path / "p2.img", MiB), second[0] * SECTOR)
    assert disk.stat().st_size == 16 * MiB
    fake_fs["ext4"] = everything
    plan = plan_of(disk)
    if second[0] < 2048 + 16384:
        assert {v.name for v in plan.volumes if not v.sparsified} == {"partition 1", "partition 2"}
    else:
        assert [v.name for v in plan.volumes if not v.sparsified] == ["partition 2"]
    for volume in plan.volumes:
        if volume.name == "partition 2":
            assert not volume.sparsified and volume.reason
    assert all(start >= MiB and end <= 9 * MiB for start, end, _ in plan.ranges)


def test_an_md_member_with_its_superblock_at_the_end_is_kept(tmp_path: Path, fake_fs: FakeDrivers) -> None:
    """An md 1.0 RAID1 member: its data starts at the member's start, so the array's ext4 is probed there; the
    superblock at the end says what it is."""
    from .support.volumes import MEMBER_SIZE, md_member

    member, data_offset = md_member(tmp_path / "member.img", "1.0")
    assert data_offset == 0
    write_at(member, 0, ext4_file(tmp_path / "fs.img", 8 * MiB).read_bytes())
    run("mdadm", "--examine", member)  # mdadm agrees it is a member
    disk = blank(tmp_path / "disk.raw", MEMBER_SIZE + 2 * MiB)
    sfdisk(disk, f"label: gpt\nstart=2048, size={MEMBER_SIZE // SECTOR}, type=R\n")
    copy_in(disk, member, MiB)
    fake_fs["ext4"] = everything
    plan = plan_of(disk)
    volume = volume_named(plan, "partition 1")
    assert not volume.sparsified and volume.file_system == "md"
    assert "RAID1" in (volume.reason or "") and "identical" in (volume.reason or "")
    assert len(plan.ranges) == 0


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed")
def test_an_encrypted_volume_is_kept(tmp_path: Path) -> None:
    from .support.volumes import luks_format

    disk = blank(tmp_path / "disk.raw", 24 * MiB)
    sfdisk(disk, "label: gpt\nstart=2048, size=16M, type=linux\n")
    copy_in(disk, luks_format(tmp_path / "luks.img", 16 * MiB), MiB)
    plan = plan_of(disk)
    volume = volume_named(plan, "partition 1")
    assert not volume.sparsified and volume.file_system == "luks" and "encrypted" in (volume.reason or "")


def swap_disk(tmp_path: Path, hibernated: bool = False) -> tuple[Path, int, int]:
    disk = blank(tmp_path / "disk.raw", 24 * MiB)
    sfdisk(disk, "label: gpt\nstart=2048, size=16M, type=swap\n")
    swap = blank(tmp_path / "swap.img", 16 * MiB)
    run("mkswap", "-p", "4096", swap)
    write_at(swap, 4096, random.Random(5).randbytes(16 * MiB - 4096))  # what the kernel swapped out
    if hibernated:
        write_at(swap, 4096 - 10, b"S1SUSPEND\0")
    copy_in(disk, swap, MiB)
    return disk, MiB, 16 * MiB


def test_swap_is_unused_after_its_header_page(tmp_path: Path) -> None:
    disk, start, size = swap_disk(tmp_path)
    out = tmp_path / "out.qcow2"
    result = diskimg.convert(disk, out, "qcow2", sparsify=True)
    raw = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", out, raw)
    assert_same_outside(disk, raw, [(start + 4096, start + size)])
    assert result.sparsified is not None
    (volume,) = result.sparsified
    assert volume.file_system == "swap" and volume.unused_bytes == size - 4096
    assert volume.sparsified_bytes == size - 4096  # all of it was data in the source
    assert result.sparsified_bytes == volume.sparsified_bytes
    if shutil.which("swaplabel"):  # util-linux still finds the swap area's header
        partition = tmp_path / "swap-out.img"
        partition.write_bytes(read_at(raw, start, size))
        run("swaplabel", partition)


def test_a_hibernated_swap_is_kept(tmp_path: Path) -> None:
    disk, _, _ = swap_disk(tmp_path, hibernated=True)
    plan = plan_of(disk)
    volume = volume_named(plan, "partition 1")
    assert not volume.sparsified and "hibernated" in (volume.reason or "") and len(plan.ranges) == 0


@pytest.mark.parametrize("edit,words", [("feature needs_recovery", "not cleanly unmounted"),
                                        ("ssv state 0", "not clean"), ("ssv state 3", "errors")])
def test_a_file_system_whose_state_is_not_clean_is_kept(tmp_path: Path, fake_fs: FakeDrivers, edit: str,
                                                        words: str) -> None:
    """Whatever its driver would say: the superblock's state is enough (debugfs sets it as a crash leaves it)."""
    disk = blank(tmp_path / "disk.raw", 16 * MiB)
    sfdisk(disk, "label: gpt\nstart=2048, size=16384, type=linux\n")
    part = ext4_file(tmp_path / "p1.img", 8 * MiB)
    run("debugfs", "-w", "-R", edit, part)
    copy_in(disk, part, MiB)
    fake_fs["ext4"] = everything
    out = tmp_path / "out.raw"
    result = diskimg.convert(disk, out, "raw", sparsify=True)
    assert result.sparsified is not None
    (volume,) = result.sparsified
    assert not volume.sparsified and words in (volume.reason or "")
    assert out.read_bytes() == disk.read_bytes()


# -- reporting: convert, measure and export, on a disk whose swap area is all the unused space --------------


def qemu_data_bytes_inside(image: Path, fmt: str, ranges: list[tuple[int, int]]) -> int:
    """The bytes ``qemu-img map`` calls data inside ``ranges`` (the oracle of ``sparsified_bytes``)."""
    total = 0
    for entry in json.loads(qemu_img("map", "--output=json", "-f", fmt, image)):
        if entry["data"]:
            start, end = entry["start"], entry["start"] + entry["length"]
            total += sum(max(0, min(end, b) - max(start, a)) for a, b in ranges)
    return total


@requires_qemu
def test_convert_json_reports_each_volume_and_the_bytes_left_out(tmp_path: Path) -> None:
    disk, start, size = swap_disk(tmp_path)
    qcow2 = tmp_path / "src.qcow2"
    qemu_img("convert", "-O", "qcow2", disk, qcow2)  # zero clusters of the swap's header page left out
    proc = diskimg_cli("convert", qcow2, tmp_path / "out.qcow2", "--sparsify", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    (volume,) = result["sparsified"]
    assert volume == {"name": "partition 1", "offset": start, "length": size, "file_system": "swap",
                      "sparsified": True, "reason": None, "unused_bytes": size - 4096,
                      "sparsified_bytes": qemu_data_bytes_inside(qcow2, "qcow2", [(start + 4096, start + size)])}
    assert result["sparsified_bytes"] == volume["sparsified_bytes"] > 0
    # the source's map is reported as it is; what was carried is less by what sparsify left out
    plain = json.loads(diskimg_cli("convert", qcow2, tmp_path / "plain.qcow2", "--json").stdout)
    assert result["allocated_bytes"] == plain["allocated_bytes"]
    assert result["bytes_read"] == plain["bytes_read"] - volume["sparsified_bytes"]
    assert "sparsified" in plain and plain["sparsified"] is None
    run("qemu-img", "check", tmp_path / "out.qcow2")
    assert (tmp_path / "out.qcow2").stat().st_size < (tmp_path / "plain.qcow2").stat().st_size - size // 2


def test_convert_says_in_words_what_it_kept_and_why(tmp_path: Path) -> None:
    disk, _, _ = swap_disk(tmp_path, hibernated=True)
    proc = diskimg_cli("convert", disk, tmp_path / "out.raw", "--sparsify", text=True)
    assert proc.returncode == 0, proc.stderr
    assert "sparsify: partition 1 (swap): kept byte for byte: it holds a hibernated system" in proc.stderr
    assert "None" not in proc.stderr and "True" not in proc.stderr


@requires_qemu
@pytest.mark.parametrize("fmt", ["qcow2", "vhd", "raw"])
def test_measure_gives_the_size_with_and_without(tmp_path: Path, fmt: str) -> None:
    disk, _, size = swap_disk(tmp_path)
    measured = json.loads(diskimg_cli("measure", disk, "-O", fmt, "--sparsify", "--json").stdout)
    plain = json.loads(diskimg_cli("measure", disk, "-O", fmt, "--json").stdout)
    assert measured["required_unsparsified"] == plain["required"]
    (volume,) = measured["sparsified"]
    assert volume["sparsified_bytes"] == plain["data_bytes"] - measured["data_bytes"] == size - 4096
    # the figure is the size of what convert --sparsify streams (the exact plan: -S 0 on both sides)
    streamed = tmp_path / f"streamed.{fmt}"
    diskimg_to_pipe(streamed, "convert", "-S", "0", "--sparsify", disk, "-", "-O", fmt, check=True)
    assert measured["required"] == streamed.stat().st_size
    if fmt == "qcow2":
        qemu_measured = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-f", "qcow2",
                                            tmp_path / f"streamed.{fmt}"))
        assert measured["required"] >= qemu_measured["required"]
    text = diskimg_cli("measure", disk, "-O", fmt, "--sparsify", text=True).stdout
    saved = plain["required"] - measured["required"]
    assert f"required size without --sparsify: {plain['required']}" in text
    assert "sparsify: partition 1 (swap): 16 MiB unused, 16 MiB of data freed" in text
    assert saved > 0 if fmt != "raw" else saved == 0  # a RAW file is as large as the disk either way


@requires_qemu
@pytest.mark.parametrize("archive", ["tar.gz", "none"])
def test_export_records_it_in_the_manifest(tmp_path: Path, archive: str) -> None:
    disk, start, size = swap_disk(tmp_path)
    data = blank(tmp_path / "data.raw", 8 * MiB)  # no partition table: nothing to sparsify, said so
    out = tmp_path / "export"
    proc = diskimg_cli("export", "--name", "m", "--system", disk, "--data", data, "--out", out, "--format", "qcow2",
                       "--archive", archive, "--sparsify", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    system, data_disk = result["sparsified"]
    assert system["volumes"][0]["unused_bytes"] == size - 4096 and system["sparsified_bytes"] == size - 4096
    assert data_disk["volumes"][0]["name"] == "disk" and not data_disk["volumes"][0]["sparsified"]
    manifest = json.loads((out / "m.manifest.json").read_text())
    assert [d["sparsified"] for d in manifest["disks"]] == [True, False]
    assert diskimg_cli("verify", out, "--deep", cwd="/tmp").returncode == 0
    restored = tmp_path / "restored"
    unpacked = diskimg_cli("unpack", out / "m.manifest.json", "--out", restored, "-O", "raw", "--json")
    assert unpacked.returncode == 0, unpacked.stderr
    (system_raw,) = restored.glob("m_system*")
    assert_same_outside(disk, system_raw, [(start + 4096, start + size)])


def test_manifests_without_the_key_still_read(tmp_path: Path) -> None:
    disk = {"file": "a.qcow2", "sha256": "0" * 64, "format": "qcow2", "size": 1, "virtual_size": 512}
    old = parse_manifest(json.dumps({"disks": [disk]}).encode(), "old.manifest.json")
    assert old.disks[0].sparsified is False
    new = parse_manifest(json.dumps({"disks": [{**disk, "sparsified": True}]}).encode(), "new.manifest.json")
    assert new.disks[0].sparsified is True
    with pytest.raises(ArchiveError, match="'sparsified' must be a bool"):
        parse_manifest(json.dumps({"disks": [{**disk, "sparsified": "yes"}]}).encode(), "bad.manifest.json")


def test_batch_plans_take_sparsify(tmp_path: Path) -> None:
    disk, start, size = swap_disk(tmp_path)
    plan = tmp_path / "plan.jsonl"
    plan.write_text(json.dumps({"id": "a", "op": "convert", "source": str(disk), "target": str(tmp_path / "o.raw"),
                                "sparsify": True}) + "\n")
    proc = diskimg_cli("batch", plan, "--jobs", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert_same_outside(disk, tmp_path / "o.raw", [(start + 4096, start + size)])


# -- LVM2 ------------------------------------------------------------------------------------------------------


def union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


@needs_lvm
def test_free_extents_and_the_logical_volumes_file_systems_go(
        lvm_tools: LoopLvm, tmp_path: Path, fake_fs: FakeDrivers) -> None:
    """Two PVs on one disk: a linear LV, a striped LV over both, free extents between and after. With every
    ext4 saying it uses nothing, what goes is exactly the free extents and the LVs' extents as LVM2's own
    reports place them; the PVs' labels and metadata areas stay."""
    disk = blank(tmp_path / "disk.raw", 64 * MiB)
    sfdisk(disk, "label: gpt\nstart=2048, size=28M, type=lvm\nsize=28M, type=lvm\n")
    parts = sfdisk_partitions(disk)
    devices = [lvm_tools.attach(disk, part["start"], part["end"] - part["start"]) for part in parts]
    vg = unique_vg("sparsify")
    lvm_tools("pvcreate", "-q", *devices)
    lvm_tools("vgcreate", "-q", vg, *devices)
    lvm_tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-l", "2", "-n", "root", vg,
              f"{devices[0]}:0-1")
    lvm_tools("lvcreate", "-q", "--driverloaded", "n", "-an", "-Zn", "-Wn", "-i", "2", "-I", "64k", "-l", "2", "-n",
              "stripes", vg, f"{devices[0]}:3-3", f"{devices[1]}:1-1")
    pe_starts = {pv["pv_name"]: int(pv["pe_start"]) for pv in lvm_tools.report("pvs", "pv_name,pe_start", *devices)}

    def on_disk(device: str, first: int, count: int) -> tuple[int, int]:
        _, offset = lvm_tools.where(device)
        start = offset + pe_starts[device] + first * EXTENT
        return start, start + count * EXTENT

    segments = lvm_tools.report("pvs", "pv_name,pvseg_start,pvseg_size,lv_name", "--segments", *devices)
    free = [on_disk(s["pv_name"], int(s["pvseg_start"]), int(s["pvseg_size"])) for s in segments if not s["lv_name"]]
    used = [on_disk(s["pv_name"], int(s["pvseg_start"]), int(s["pvseg_size"])) for s in segments if s["lv_name"]]
    assert len(free) >= 3 and len(used) == 3
    write_at(disk, used[0][0], ext4_file(tmp_path / "root.img", 2 * EXTENT).read_bytes())
    (stripes,) = lvm_tools.report("lvs", "seg_pe_ranges,stripe_size", f"{vg}/stripes")
    place_striped(lvm_tools, stripes["seg_pe_ranges"], int(stripes["stripe_size"]),
                  ext4_file(tmp_path / "stripes.img", 2 * EXTENT), pe_starts)
    fake_fs["ext4"] = everything
    plan = plan_of(disk)
    by_name = {volume.name: volume for volume in plan.volumes}
    assert set(by_name) == {"partition 1", "partition 2", f"LV {vg}/root", f"LV {vg}/stripes"}
    assert all(volume.sparsified for volume in plan.volumes), plan.volumes
    assert by_name[f"LV {vg}/root"].unused_bytes == by_name[f"LV {vg}/stripes"].unused_bytes == 2 * EXTENT
    assert union([(start, end) for start, end, _ in plan.ranges]) == union(free + used)
    out = tmp_path / "out.raw"
    diskimg.convert(disk, out, "raw", sparsify=True)
    assert_same_outside(disk, out, union(free + used))
    lvm_tools.attach(out, parts[0]["start"], parts[0]["end"] - parts[0]["start"])
    assert "root" in lvm_tools("lvs", vg)  # LVM2 still reads its metadata on the output


@needs_lvm
def test_a_volume_group_with_a_physical_volume_elsewhere_is_kept(two_disks: TwoDisks) -> None:
    """The system disk of a machine whose volume group spans its data disk too: converted alone, nothing of
    the group is touched (the data disk may hold newer metadata)."""
    plan = plan_of(two_disks.system)
    lvm = [volume for volume in plan.volumes if volume.file_system == "lvm2" or volume.name.startswith("LV ")]
    assert lvm and all(not volume.sparsified for volume in lvm)
    assert all("none of the disks given" in (volume.reason or "") for volume in lvm), lvm
    assert len(plan.ranges) == 0


# -- the real drivers: files written and deleted, the disk converted, everything checked --------------------


def reads_free_space(driver: str) -> bool:
    """Whether the driver ``module:Class`` of ``fs/`` reads its file system's free-space maps yet."""
    module, name = driver.split(":")
    cls = getattr(importlib.import_module(f"diskimg.inspection.fs.{module}"), name)
    return bool(cls.unused_ranges is not GuestFileSystem.unused_ranges)


needs_mount = pytest.mark.skipif(not can_mount() or shutil.which("mmd") is None,
                                 reason="files are written and deleted on a loop-mounted ext4 (root only) and with "
                                 "mtools")
needs_ext_driver = pytest.mark.skipif(not reads_free_space("ext:ExtFileSystem"),
                                      reason="the ext driver does not read its block bitmaps yet")
needs_fat_driver = pytest.mark.skipif(not reads_free_space("fat:FatFileSystem"),
                                      reason="the FAT driver does not read its allocation table yet")


def guest_use(seed: int) -> Iterator[tuple[str, str, bytes]]:
    """What a guest does to its file system, as ("write" | "delete", path, data) steps: files and folders
    written, large files deleted, more files written into the freed space."""
    rng = random.Random(seed)
    yield "write", "etc/hostname", f"guest-{seed}\n".encode()
    big = [f"var/cache-{number}.bin" for number in range(6)]
    for path in big:
        yield "write", path, rng.randbytes(rng.randrange(1, 4) * MiB + rng.randrange(4096))
    for number in range(40):
        yield "write", f"var/log/log-{number}.txt", rng.randbytes(rng.randrange(20000))
    for path in big[::2]:
        yield "delete", path, b""
    yield "write", "home/after-delete.bin", rng.randbytes(MiB + 123)


def churn_mounted(image: Path, mirror: Path, seed: int) -> int:
    """Loop-mount ``image`` and use it (``guest_use``), with a symbolic link too; the final tree copied to
    ``mirror``. Returns the bytes of the files deleted (their data stays in the freed blocks)."""
    mount = image.parent / f"mnt-{image.stem}"
    mount.mkdir()
    run("mount", "-o", "loop", image, mount)
    deleted = 0
    try:
        for step, path, data in guest_use(seed):
            target = mount / path
            if step == "write":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                os.sync()
            else:
                deleted += target.stat().st_size
                target.unlink()
        os.symlink("../etc/hostname", mount / "home" / "hostname-link")
        os.sync()
        shutil.copytree(mount, mirror, symlinks=True, ignore=shutil.ignore_patterns("lost+found"))
    finally:
        run("umount", mount)
    return deleted


def churn_fat(image: Path, mirror: Path, seed: int) -> int:
    """The same use of a FAT image through mtools (no vfat driver needed); ``mirror`` holds the final tree."""
    deleted = 0
    folders: set[str] = set()
    for step, path, data in guest_use(seed):
        target = mirror / path
        if step == "write":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            for depth in range(1, path.count("/") + 1):
                folder = "/".join(path.split("/")[:depth])
                if folder not in folders:
                    run("mmd", "-i", image, f"::/{folder}")
                    folders.add(folder)
            run("mcopy", "-o", "-i", image, target, f"::/{path}")
        else:
            deleted += target.stat().st_size
            target.unlink()
            run("mdel", "-i", image, f"::/{path}")
    return deleted


def guest_tree(disk: object, offset: int, length: int) -> dict[str, tuple[str, int, str]]:
    """Every file, folder and link of the file system as diskimg's reader sees it: type, size, SHA-256 of the
    data or the link's target."""
    fs = open_filesystem(disk, offset, length)  # type: ignore[arg-type]
    assert fs is not None
    tree = {}
    for path, info in fs.walk("/"):
        if info.is_file:
            digest = hashlib.sha256(b"".join(fs.iter_file(path))).hexdigest()
        elif info.is_symlink:
            digest = fs.readlink(path)
        else:
            digest = ""
        tree[path] = (info.type.value, info.size if not info.is_dir else 0, digest)
    return tree


def dumpe2fs_free(image: Path) -> list[tuple[int, int]]:
    """The free blocks ``dumpe2fs`` lists, as byte ranges of the file system (the oracle of its free space)."""
    text = run("dumpe2fs", image).stdout.decode()
    block = int(re.search(r"^Block size:\s+(\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    free = []
    for line in re.findall(r"^\s+Free blocks: (.*)$", text, re.MULTILINE):
        for item in filter(None, (part.strip() for part in line.split(","))):
            first, _, last = item.partition("-")
            free.append((int(first) * block, (int(last or first) + 1) * block))
    return union(free)


def inside(ranges: list[tuple[int, int]], allowed: list[tuple[int, int]]) -> bool:
    """Whether every range lies within the union ``allowed`` (sorted, merged)."""
    starts = [start for start, _ in allowed]
    for start, end in ranges:
        index = bisect.bisect_right(starts, start) - 1
        if index < 0 or allowed[index][1] < end:
            return False
    return True


@needs_mount
@needs_ext_driver
@needs_fat_driver
@requires_qemu
@pytest.mark.parametrize("layout", ["gpt", "mbr"])
def test_a_used_disk_sparsified_reads_the_same_files(tmp_path: Path, layout: str) -> None:
    """A BIOS machine's disk after some use: GRUB (boot.img in the MBR, its core image in the gap after it or in
    a BIOS boot partition), an ESP (FAT16), an ext4 root, swap, a partition of unknown type; files written and
    deleted on the ESP and the root. Converted with --sparsify to qcow2 and raw: byte for byte the source
    outside the ranges diskimg reports and zeros inside them; the ext4's ranges among the blocks dumpe2fs calls
    free; e2fsck and fsck.fat find nothing wrong; every file, folder and link reads the same."""
    rng = random.Random(layout)
    disk = blank(tmp_path / "disk.raw", 96 * MiB)
    unknown = "3E1E8B1B-7A54-4C6F-9B2E-6B1F0C9D2A10"
    if layout == "gpt":
        sfdisk(disk, "label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"
                     "size=16M, type=U\nsize=48M, type=linux\nsize=8M, type=swap\n"
                     f"size=4M, type={unknown}\n")
        roles = {1: "bios", 2: "fat", 3: "ext4", 4: "swap", 5: "unknown"}
    else:
        sfdisk(disk, "label: dos\ndisk.raw1 : start=2048, size=48M, type=83, bootable\n"
                     "disk.raw2 : size=8M, type=82\ndisk.raw3 : size=30M, type=5\n"
                     "disk.raw5 : size=16M, type=e\ndisk.raw6 : size=4M, type=da\n")
        roles = {1: "ext4", 2: "swap", 5: "fat", 6: "unknown"}
    numbered = [p for p in sfdisk_partitions(disk) if p["type"] not in ("5",)]
    parts = {number: numbered[index] for index, number in enumerate(sorted(roles))}
    write_boot_code(disk, core_lba=parts[1]["start"] // SECTOR if layout == "gpt" else None)
    deleted = {}
    for number, role in roles.items():
        start, length = parts[number]["start"], parts[number]["end"] - parts[number]["start"]
        image = tmp_path / f"p{number}.img"
        if role == "ext4":
            tree = tmp_path / "base"
            (tree / "etc").mkdir(parents=True)
            (tree / "etc" / "fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
            ext4_file(image, length, "-d", str(tree))
            deleted[number] = churn_mounted(image, tmp_path / f"mirror-{number}", 1)
        elif role == "fat":
            blank(image, length)
            run("mkfs.fat", "-F", "16", image)
            deleted[number] = churn_fat(image, tmp_path / f"mirror-{number}", 2)
        elif role == "swap":
            blank(image, length)
            run("mkswap", image)
            write_at(image, 4096, rng.randbytes(length - 4096))
        elif role == "unknown":
            image.write_bytes(rng.randbytes(length))
        if role != "bios":
            copy_in(disk, image, start)
    plan = plan_of(disk)
    ranges = union([(start, end) for start, end, _ in plan.ranges])
    by_name = {volume.name: volume for volume in plan.volumes}
    ext4_number = next(number for number, role in roles.items() if role == "ext4")
    ext4_start = parts[ext4_number]["start"]
    ext4_ranges = [(start - ext4_start, end - ext4_start) for start, end, index in plan.ranges
                   if plan.volumes[index].name == f"partition {ext4_number}"]
    free = dumpe2fs_free(tmp_path / f"p{ext4_number}.img")
    assert inside(ext4_ranges, free)  # nothing ext4 uses is left out
    assert sum(end - start for start, end in ext4_ranges) >= 0.9 * sum(end - start for start, end in free)
    for number, role in roles.items():
        volume = by_name[f"partition {number}"]
        assert volume.sparsified == (role in ("ext4", "fat", "swap")), volume
        if role in ("ext4", "fat"):
            assert volume.unused_bytes >= deleted[number]
    if layout == "gpt":
        assert "BIOS boot" in (by_name["partition 1"].reason or "")

    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"out.{fmt}"
        proc = diskimg_cli("convert", disk, out, "-O", fmt, "--sparsify", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert [v["name"] for v in result["sparsified"]] == [v.name for v in plan.volumes]
        assert result["sparsified_bytes"] == sum(v["sparsified_bytes"] for v in result["sparsified"])
        assert result["sparsified_bytes"] == qemu_data_bytes_inside(disk, "raw", ranges)
        raw = out if fmt == "raw" else tmp_path / "qcow2-as.raw"
        if fmt == "qcow2":
            run("qemu-img", "check", out)
            qemu_img("convert", "-O", "raw", out, raw)
        assert_same_outside(disk, raw, ranges)
        for number, role in roles.items():
            start, length = parts[number]["start"], parts[number]["end"] - parts[number]["start"]
            if role not in ("ext4", "fat"):
                continue
            extracted = tmp_path / f"out-p{number}.img"
            extracted.write_bytes(read_at(raw, start, length))
            run("e2fsck", "-fn", extracted) if role == "ext4" else run("fsck.fat", "-n", extracted)
            with diskimg.open_image(disk) as before, diskimg.open_image(out) as after:
                assert guest_tree(after, start, length) == guest_tree(before, start, length)
            with diskimg.open_image(out) as after:
                fs = open_filesystem(after, start, length)
                assert fs is not None
                assert assert_tree_equal(fs, tmp_path / f"mirror-{number}", check_mode=role == "ext4") > 40
    plain = tmp_path / "plain.qcow2"
    qemu_img("convert", "-O", "qcow2", disk, plain)
    assert (tmp_path / "out.qcow2").stat().st_size < plain.stat().st_size - sum(deleted.values()) // 2




def small_tree(root: Path) -> Path:
    rng = random.Random(str(root))
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("guest\n")
    (root / "data").mkdir()
    for size in (0, 700, 70000, 1 << 20):
        (root / "data" / f"size-{size}").write_bytes(rng.randbytes(size))
    os.symlink("etc/hostname", root / "name-link")
    return root


def build_file_system(kind: str, image: Path, size: int, tree: Path) -> None:
    """``kind`` made on a prefilled image and filled from ``tree`` with the file system's own tools."""
    prefilled(image, size, 9)
    if kind == "xfs":
        proto = image.with_suffix(".proto")
        proto.write_text("\n".join(["unused", "0 0", "d--755 0 0", *protofile_lines(tree), "$", ""]))
        run("mkfs.xfs", "-q", "-f", "-K", "-p", proto, image)
    elif kind == "btrfs":
        run("mkfs.btrfs", "-q", "-f", "-K", "--rootdir", tree, image)
    else:
        need_ntfs_tools()
        run("mkntfs", "-F", "-Q", image)
        with ntfs3g(image, image.parent / "ntfs-mount") as where:
            shutil.copytree(tree, where, symlinks=False, dirs_exist_ok=True)


CHECKERS = {"xfs": ("xfs_repair", "-n"), "btrfs": ("btrfs", "check", "--readonly"), "ntfs": ("ntfsfix", "-n")}


@requires_qemu
@pytest.mark.parametrize("kind", ["xfs", "btrfs", "ntfs"])
def test_each_file_system_sparsified_passes_its_checker(tmp_path: Path, kind: str) -> None:
    """XFS, btrfs and NTFS made over old data: converted with --sparsify, each is clean for its own checker and
    reads the same; only its free space went (the old data), everything else is byte for byte."""
    size = 320 * MiB
    disk = blank(tmp_path / "disk.raw", size + 2 * MiB)
    sfdisk(disk, f"label: gpt\nstart=2048, size={size // SECTOR}, type=linux\n")
    tree = small_tree(tmp_path / "tree")
    part = tmp_path / "part.img"
    build_file_system(kind, part, size, tree)
    copy_in(disk, part, MiB)
    out = tmp_path / "out.qcow2"
    proc = diskimg_cli("convert", disk, out, "-O", "qcow2", "--sparsify", "--json")
    assert proc.returncode == 0, proc.stderr
    (volume,) = json.loads(proc.stdout)["sparsified"]
    assert volume["sparsified"] and volume["file_system"] == kind, volume
    assert volume["sparsified_bytes"] > size // 2  # the old data under the free space
    plan = plan_of(disk)
    raw = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", out, raw)
    assert_same_outside(disk, raw, union([(start, end) for start, end, _ in plan.ranges]))
    extracted = tmp_path / "out-part.img"
    extracted.write_bytes(read_at(raw, MiB, size))
    run(*CHECKERS[kind], extracted)
    with diskimg.open_image(disk) as before, diskimg.open_image(out) as after:
        assert guest_tree(after, MiB, size) == guest_tree(before, MiB, size)
    plain = tmp_path / "plain.qcow2"
    qemu_img("convert", "-O", "qcow2", disk, plain)
    assert out.stat().st_size < plain.stat().st_size // 2
