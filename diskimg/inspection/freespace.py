"""What ``--sparsify`` leaves out of a disk: the byte ranges that no file system on it uses.

:func:`plan_sparsify` reads the disk's partition table, then each volume: a partition (or the whole
disk when it has no table) holding a file system is opened by its driver (``fs/``), whose
``unused_ranges`` come from the file system's own allocation maps; a swap area is unused after its
header page; an LVM2 physical volume gives its free extents, and each of its logical volumes' file
systems is read through the volume and its unused ranges mapped through the LV's segments onto the
disk. Everything else is kept byte for byte, and the plan says why for each volume:

- the area before the first partition, the gaps between partitions and after the last (boot loaders
  live there: GRUB's core image after the MBR), the partition tables and their backups, the extended
  boot records: never inside a volume, and cut out of any range that would reach them;
- a partition that lies past the disk, overlaps another or the tables, or that a hybrid MBR describes
  otherwise than the GPT: its bounds cannot be trusted;
- a partition of unknown content, or a file system diskimg has no reader for;
- a file system whose state is not clean (a journal to replay, a dirty flag, a hibernated system):
  its maps may call free the blocks whose files live only in the journal;
- md RAID members: each member of an array must stay as the others are (RAID1 legs identical, the
  other levels' parity matching), and free space would have to be found through the array;
- LUKS and BitLocker volumes: which of their blocks hold data cannot be seen without the key;
- a volume group with a physical volume on another disk (its newest metadata may be there), thin,
  snapshot, cached, RAID and mirrored logical volumes, and the origin of a snapshot (the snapshot
  reads its unchanged blocks from it).

The ranges are whole sectors, sorted and disjoint, each inside the volume it came from, and held in
arrays (``UnusedRanges``): memory stays bounded by :data:`MAX_RANGES`, past which the shortest ranges
are given up (kept as data: never unsafe).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CorruptImage, DiskImageError
from ..units import SECTOR_SIZE
from .fs import open_filesystem
from .fs.base import NotSparsifiable
from .partitions import MBR_EXTENDED_TYPES, MBR_PROTECTIVE_TYPE, Partition, PartitionTable, read_partition_table
from .signatures import HEAD_SIZE, Disk, FileSystem, SizedDisk, md_file_system, probe, swap_unused_ranges
from .volumes import md
from .volumes.lvm import LvmVolume, VolumeGroup, find_volume_groups

#: turns a range of a volume, (start, end) from its start, into the disk ranges holding it
Mapper = Callable[[int, int], Iterable[tuple[int, int]]]

#: ranges held at most: past this many, the shortest are given up (each costs 20 bytes in the arrays)
MAX_RANGES = 1 << 20

#: why a file system in each state is kept whole (the states ``signatures.probe`` reports)
_STATE_REASONS = {
    "needs_recovery": "it was not cleanly unmounted: its journal holds changes not yet written back, and its maps "
                      "may call free the blocks of files that live only in the journal",
    "not_clean": "it is marked not clean: its maps may be out of date",
    "errors": "it is marked as having errors: its maps cannot be trusted",
    "needs_repair": "it is marked as needing repair: its maps cannot be trusted",
    "hibernated": "it holds a hibernated system, whose memory image is written there",
}

_ENCRYPTED = ("it is encrypted ({what}): which of its blocks hold data cannot be seen without the key")
#: LVs that hold other LVs, never a file system
_POOL_KINDS = ("thin-pool", "cache-pool", "vdo-pool")
#: LV kinds read through their segments, whose free space can be cleared (RAID1 and mirrored LVs are
#: kept: every leg would have to be cleared alike)
_MAPPED_LV_KINDS = ("linear", "striped")


@dataclass
class VolumePlan:
    """One volume of the disk and what ``--sparsify`` does to it.

    ``offset`` is where the volume starts on the disk (None for a logical volume, whose extents lie
    where its segments map them); ``unused_bytes`` the bytes of it the output reads as zeros."""

    name: str
    offset: int | None
    length: int
    file_system: str | None
    sparsified: bool
    reason: str | None = None
    unused_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnusedRanges:
    """Disk byte ranges in whole sectors, sorted and disjoint, each with the index of its volume in
    the plan: three arrays (start, end, volume), searched by bisection."""

    def __init__(self) -> None:
        self.starts = array("Q")
        self.ends = array("Q")
        self.volumes = array("L")

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.starts, self.ends, self.volumes, strict=True)

    @property
    def total(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def first_after(self, offset: int) -> int:
        """The index of the first range ending after ``offset`` (``len(self)`` when none does)."""
        return bisect.bisect_right(self.ends, offset)


@dataclass
class SparsifyPlan:
    """The sparsify plan of one disk: its volumes (in the order found) and the ranges left out."""

    disk_size: int
    volumes: list[VolumePlan]
    ranges: UnusedRanges = field(repr=False)

    @property
    def unused_bytes(self) -> int:
        return sum(volume.unused_bytes for volume in self.volumes)


class _Collector:
    """Ranges gathered volume by volume: aligned to whole sectors, cut around the tables' own
    structures, the shortest given up past MAX_RANGES. A volume's ranges are committed only when its
    file system has yielded them all: one that fails half way leaves none."""

    def __init__(self, disk_size: int, protected: Iterable[tuple[int, int]]) -> None:
        self.disk_size = disk_size
        merged: list[tuple[int, int]] = []
        for start, end in sorted(protected):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self.protected = merged
        self.protected_starts = [start for start, _ in merged]
        self.limit = MAX_RANGES
        self.least = SECTOR_SIZE  # ranges shorter than this are given up
        self.ranges = UnusedRanges()
        self.mark = 0  # where the volume being gathered began

    def begin(self) -> None:
        self.mark = len(self.ranges)

    def abandon(self) -> None:
        """Forget what the volume being gathered added."""
        for column in (self.ranges.starts, self.ranges.ends, self.ranges.volumes):
            del column[self.mark:]

    def add(self, start: int, end: int, volume: int) -> None:
        """The disk range [start, end) of ``volume``: its whole sectors outside the protected structures."""
        start = -(-max(start, 0) // SECTOR_SIZE) * SECTOR_SIZE
        end = min(end, self.disk_size) // SECTOR_SIZE * SECTOR_SIZE
        if end - start < self.least:
            return
        index = max(0, bisect.bisect_right(self.protected_starts, start) - 1)
        for guard_start, guard_end in self.protected[index:]:
            if guard_start >= end:
                break
            if guard_end <= start:
                continue
            self._append(start, guard_start // SECTOR_SIZE * SECTOR_SIZE, volume)
            start = -(-guard_end // SECTOR_SIZE) * SECTOR_SIZE
        self._append(start, end, volume)

    def _append(self, start: int, end: int, volume: int) -> None:
        if end - start < self.least:
            return
        ranges = self.ranges
        if len(ranges) > self.mark and ranges.volumes[-1] == volume and ranges.ends[-1] == start:
            ranges.ends[-1] = end
            return
        ranges.starts.append(start)
        ranges.ends.append(end)
        ranges.volumes.append(volume)
        if len(ranges) > self.limit:
            self._thin()

    def _thin(self) -> None:
        """Give up the shortest ranges (they stay data, as if in use), keeping the ``limit // 2`` longest (the
        first of those as long as the last kept, where several are): no range as short is taken from now on."""
        old = self.ranges
        keep = max(1, self.limit // 2)
        threshold = sorted((end - start for end, start in zip(old.ends, old.starts, strict=True)),
                           reverse=True)[keep - 1]
        room = keep - sum(1 for end, start in zip(old.ends, old.starts, strict=True) if end - start > threshold)
        self.least = max(self.least, threshold + SECTOR_SIZE)
        new = UnusedRanges()
        mark = 0
        for index, (start, end, volume) in enumerate(old):
            if end - start < threshold or (end - start == threshold and room <= 0):
                continue
            room -= end - start == threshold
            new.starts.append(start)
            new.ends.append(end)
            new.volumes.append(volume)
            mark += index < self.mark
        self.ranges, self.mark = new, mark

    def finish(self) -> UnusedRanges:
        """The ranges sorted by start (a striped or multi-segment LV maps out of order); disjoint, since
        the volumes are."""
        ranges = self.ranges
        starts = ranges.starts
        if all(starts[i] <= starts[i + 1] for i in range(len(starts) - 1)):
            return ranges
        order = sorted(range(len(starts)), key=starts.__getitem__)
        result = UnusedRanges()
        result.starts = array("Q", (starts[i] for i in order))
        result.ends = array("Q", (ranges.ends[i] for i in order))
        result.volumes = array("L", (ranges.volumes[i] for i in order))
        return result


class _Planner:
    def __init__(self, disk: Disk, table: PartitionTable) -> None:
        self.disk = disk
        self.table = table
        self.volumes: list[VolumePlan] = []
        self.collector = _Collector(table.disk_size, ((offset, offset + length)
                                                      for offset, length, _ in table.structures))
        #: (volume index, offset, length) of the LVM2 physical volumes found, for the LVM pass
        self.physical_volumes: list[tuple[int, int, int]] = []

    def keep(self, name: str, offset: int | None, length: int, file_system: str | None, reason: str | None) -> int:
        self.volumes.append(VolumePlan(name, offset, length, file_system, False, reason))
        return len(self.volumes) - 1

    # -- a volume on the disk itself (a partition or the whole disk) --

    def disk_volume(self, name: str, offset: int, length: int, kind_name: str | None) -> None:
        found, reason = identify(self.disk, offset, length)
        if reason is not None:
            self.keep(name, offset, length, found.type if found else None, reason)
            return
        if found is not None and found.type == "lvm2":
            # an LVM2 PV: sparsified (its free extents) or not, with why, once its volume group is read
            index = self.keep(name, offset, length, "lvm2", None)
            self.physical_volumes.append((index, offset, length))
            return
        self.file_system_volume(name, offset, length, found, self.disk, offset, kind_name,
                                lambda start, end: ((offset + start, offset + end),))

    def file_system_volume(self, name: str, offset: int | None, length: int, found: FileSystem | None, source: Disk,
                           source_offset: int, kind_name: str | None, to_disk: Mapper) -> None:
        """The volume of ``length`` bytes at ``source_offset`` of ``source`` holding ``found``: its unused
        ranges, each turned into disk ranges by ``to_disk``."""
        fs_type = found.type if found is not None else None
        reason = _kept_because(found, length, kind_name)
        if reason is not None:
            self.keep(name, offset, length, fs_type, reason)
            return
        assert found is not None
        index = len(self.volumes)
        self.volumes.append(VolumePlan(name, offset, length, fs_type, True))
        limit = min(length, found.size) if found.size else length
        self.collector.begin()
        try:
            for start, end in _volume_ranges(source, source_offset, length, found, limit):
                for disk_start, disk_end in to_disk(start, end):
                    self.collector.add(disk_start, disk_end, index)
        except NotSparsifiable as exc:
            self._give_up(index, exc.message)
        except DiskImageError as exc:
            self._give_up(index, f"its allocation maps cannot be read: {exc}")

    def _give_up(self, index: int, reason: str) -> None:
        self.collector.abandon()
        self.volumes[index].sparsified = False
        self.volumes[index].reason = reason

    # -- LVM2 --

    def logical_volumes(self) -> None:
        """The free extents of the physical volumes found, and the file systems of their logical volumes."""
        if not self.physical_volumes:
            return
        scan = find_volume_groups((self.disk, offset, length) for _, offset, length in self.physical_volumes)
        problems = {problem.source: problem.message for problem in scan.problems if problem.source is not None}
        grouped: dict[int, VolumeGroup] = {}
        for group in scan.volume_groups:
            for pv in group.physical_volumes.values():
                grouped[pv.source] = group
        for source, (index, _, _) in enumerate(self.physical_volumes):
            if source not in grouped:
                detail = problems.get(source)
                self.volumes[index].reason = "an LVM2 physical volume in no volume group that can be read" + (
                    f" ({detail})" if detail else "")
        for group in scan.volume_groups:
            self.volume_group(group)

    def volume_group(self, group: VolumeGroup) -> None:
        pvs = sorted(group.physical_volumes.values(), key=lambda pv: pv.source)
        pv_indexes = {pv.source: self.physical_volumes[pv.source][0] for pv in pvs}
        lvs = [lv for lv in group.logical_volumes if lv.visible and lv.kind not in _POOL_KINDS]
        try:
            free = group.free_extent_ranges()
        except DiskImageError as exc:  # a PV elsewhere, segments of unknown use, an extent used twice
            why = f"its volume group {group.name} cannot say which extents are free: {exc.message}"
            for index in pv_indexes.values():
                self.volumes[index].reason = why
            for lv in lvs:
                self.keep(f"LV {lv.path}", None, lv.size, None, why)
            return
        for index in pv_indexes.values():
            self.volumes[index].sparsified = True
        self.collector.begin()
        for pv, start, length in free:
            self.collector.add(pv.offset + start, pv.offset + start + length, pv_indexes[pv.source])
        read_by_others = _read_by_others(group)
        for lv in lvs:
            name = f"LV {lv.path}"
            if lv.unreadable_reason is not None:
                self.keep(name, None, lv.size, None, lv.unreadable_reason)
                continue
            if lv.kind not in _MAPPED_LV_KINDS:
                self.keep(name, None, lv.size, None, f"a {lv.kind} logical volume: each of its legs would have to "
                          "be cleared alike, which diskimg does not do")
                continue
            if lv.name in read_by_others:
                self.keep(name, None, lv.size, None, f"{read_by_others[lv.name]} reads its blocks")
                continue
            volume = group.open(lv.name)
            found, reason = identify(volume, 0, lv.size)
            if reason is not None:
                self.keep(name, None, lv.size, found.type if found else None, reason)
                continue
            self.file_system_volume(name, None, lv.size, found, volume, 0, None, _lv_mapper(volume))


def _lv_mapper(volume: LvmVolume) -> Mapper:
    """A linear or striped LV's ranges as the pieces of the disk holding them."""
    def to_disk(start: int, end: int) -> Iterator[tuple[int, int]]:
        for _, offset, length in volume.locate(start, end - start):
            yield offset, offset + length
    return to_disk


def _read_by_others(group: VolumeGroup) -> dict[str, str]:
    """LVs whose blocks another LV reads (a snapshot's origin, an external origin, an LV stacked under
    another): clearing their free space would change what that LV sees."""
    readers: dict[str, str] = {}
    for lv in group.metadata.logical_volumes.values():
        for segment in lv.segments:
            for _, name in segment.references:
                readers.setdefault(name, f"LV {group.name}/{lv.name} ({segment.type})")
            for area in segment.areas:
                if not area.on_pv:
                    readers.setdefault(area.name, f"LV {group.name}/{lv.name}")
    return readers


def identify(source: Disk, offset: int, length: int) -> tuple[FileSystem | None, str | None]:
    """What the volume of ``length`` bytes at ``offset`` of ``source`` holds (None: nothing recognised),
    and why it is kept whole already when it is: an md member (whose superblock may lie at its end,
    behind the array's own file system), or a signature that cannot be read."""
    try:
        member = md.find_superblock(source, offset, length)
        if member is None:
            return probe(source, offset, length), None
    except CorruptImage as exc:
        return None, f"its signature cannot be read: {exc.message}"
    return md_file_system(member), _md_reason(member)


def _md_reason(member: md.MdSuperblock) -> str:
    array = member.name or member.uuid
    if member.level == 1:
        return (f"a member of md RAID1 array {array}: every member must stay identical to the others, and free "
                "space would have to be found through the array")
    return f"a member of md {member.level_name} array {array}, whose data and parity diskimg does not read"


def _kept_because(found: FileSystem | None, length: int, kind_name: str | None) -> str | None:
    """Why the volume holding ``found`` is kept whole before its maps are read, or None."""
    if found is None:
        shown = f" (partition type: {kind_name})" if kind_name else ""
        return f"no file system diskimg recognises{shown}"
    if found.type in ("luks", "bitlocker"):
        return _ENCRYPTED.format(what="LUKS" if found.type == "luks" else "BitLocker")
    if found.type == "md":
        return "a member of an md RAID array whose superblock cannot be read"
    if found.state in _STATE_REASONS:
        return _STATE_REASONS[found.state]
    if found.size is not None and found.size > length:
        return f"{found.description} of {found.size} bytes in a volume of {length}: its bounds cannot be trusted"
    return None


def _volume_ranges(source: Disk, offset: int, length: int, found: FileSystem, limit: int
                   ) -> Iterator[tuple[int, int]]:
    """The unused ranges of the volume as (start, end) from its start, checked: in order, disjoint, inside
    the file system (``limit`` bytes)."""
    if found.type == "swap":
        for start, size in swap_unused_ranges(source.read_at(offset, min(length, HEAD_SIZE)), limit):
            yield start, start + size
        return
    driver = open_filesystem(source, offset, length, found.type)
    if driver is None:
        raise NotSparsifiable(f"diskimg has no reader for {found.description}")
    position = 0
    for start, size in driver.unused_ranges():
        if start < position or size < 0 or start + size > limit:
            raise NotSparsifiable(f"the free-space map of {found.description} gives a range ({size} bytes at "
                                  f"{start}) out of order or outside it: its blocks are all kept")
        position = start + size
        if size:
            yield start, start + size


def plan_sparsify(disk: SizedDisk) -> SparsifyPlan:
    """The sparsify plan of ``disk``: see the module docstring."""
    disk_size = disk.virtual_size
    table = read_partition_table(disk, disk_size)
    planner = _Planner(disk, table)
    if table.scheme is None:
        planner.disk_volume("disk", 0, disk_size, None)
    else:
        distrusted = _distrusted_partitions(table)
        for part in table.partitions:
            name = f"partition {part.number}"
            if part.number in distrusted:
                planner.keep(name, part.start, part.size, None, distrusted[part.number])
            else:
                planner.disk_volume(name, part.start, part.size, part.type_name)
    planner.logical_volumes()
    ranges = planner.collector.finish()
    for volume in planner.volumes:
        volume.unused_bytes = 0
    for start, end, index in ranges:
        planner.volumes[index].unused_bytes += end - start
    return SparsifyPlan(disk_size, planner.volumes, ranges)


def _distrusted_partitions(table: PartitionTable) -> dict[int, str]:
    """The partitions whose bounds cannot be trusted, with why: past the disk, over another partition
    or the tables (the findings of ``read_partition_table`` and an overlap sweep of every pair, which
    the findings cap), or described otherwise by a hybrid MBR."""
    distrusted: dict[int, str] = {}
    for issue in table.issues:
        named = issue.evidence.get("partition")
        for number in named if isinstance(named, list) else [named]:
            if isinstance(number, int):
                distrusted.setdefault(number, issue.message)
    ordered = sorted(table.partitions, key=lambda part: (part.start, part.end))
    widest: Partition | None = None
    for part in ordered:
        if widest is not None and part.start < widest.end:
            message = f"partitions {widest.number} and {part.number} overlap"
            distrusted.setdefault(widest.number, message)
            distrusted.setdefault(part.number, message)
        if part.end > table.disk_size:
            distrusted.setdefault(part.number, f"partition {part.number} ends past the end of the disk")
        if widest is None or part.end > widest.end:
            widest = part
    if table.hybrid_mbr and table.mbr is not None:
        bounds = {(part.first_lba, part.last_lba + 1) for part in table.partitions}
        for entry in table.mbr.entries:
            if not entry.used or entry.type == MBR_PROTECTIVE_TYPE or entry.type in MBR_EXTENDED_TYPES:
                continue
            span = (entry.start_lba, entry.start_lba + entry.sectors)
            if span in bounds:
                continue
            for part in table.partitions:
                if part.first_lba < span[1] and span[0] <= part.last_lba:
                    distrusted.setdefault(part.number, "the hybrid MBR describes this area otherwise than the GPT")
    return distrusted
