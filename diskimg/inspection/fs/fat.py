"""FAT12/16/32, read-only (the EFI system partition, USB sticks, old boot partitions).

On-disk layout (Microsoft's FAT specification, "FAT: General Overview of On-Disk Format"):

- the boot sector's BIOS parameter block gives the regions, in order: reserved sectors, ``num_fats``
  copies of the FAT, the fixed root directory (FAT12/16 only), then the data area of clusters
  numbered from 2 (``superblocks.parse_fat_bpb`` reads it);
- the FAT holds one entry per cluster (12, 16 or 28 bits): the next cluster of a chain, an
  end-of-chain mark (>= 0xFF8 / 0xFFF8 / 0x0FFFFFF8), 0 for free, 0xFF7... for a bad cluster;
- a directory is an array of 32-byte entries: the short 8.3 name (11 bytes), attributes, NT case
  flags (byte 12), write time (22) and date (24), first cluster (26, high half at 20 on FAT32), size
  (28). A first byte 0x00 ends the directory, 0xE5 marks a deleted entry. A long name (VFAT) is a
  run of entries with attributes 0x0F just before its short entry, numbered down to 1 (the first
  one or'ed with 0x40), each holding 13 UTF-16 characters and a checksum of the short name.

Files and directories are named by a :class:`FatNode` built from their directory entry. Every
cluster number is checked against the clusters that exist (and fit in the volume); chains are
walked with Brent's cycle detection; a directory may not exceed the format's 65536 entries.

Free space (``unused_ranges``, for ``--sparsify``) is the clusters whose entry is 0 in every FAT copy
(in the active one alone when FAT32 mirroring is off); it is not trusted while the volume is marked
dirty, in its boot sector or in FAT[1].
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from ...errors import CorruptImage, DiskImageError
from ..signatures import Disk
from ..superblocks import (
    FAT32_ACTIVE_FAT,
    FAT32_MIRRORING_OFF,
    FAT_STATE_DIRTY,
    FatBpb,
    field_offset,
    parse_fat_bpb,
)
from .base import (
    DirEntry,
    FileType,
    GuestFileSystem,
    GuestPathError,
    NotSparsifiable,
    Stat,
    join_adjacent,
    read_volume,
)

#: the FAT specification's limit: 65536 entries of 32 bytes
MAX_DIRECTORY_BYTES = 65536 * 32
#: contiguous pieces one file's cluster chain may have (its run list stays in memory while it is read)
MAX_FRAGMENTS = 1 << 16
#: FAT pages (64 KiB each) kept in memory
FAT_PAGE = 1 << 16
FAT_CACHE_PAGES = 64
#: directory entries kept in the listing cache, over all cached directories
LISTING_CACHE_ENTRIES = 1 << 16
#: files whose run lists are kept
RUN_CACHE_FILES = 16

ATTR_READONLY = 0x01
ATTR_HIDDEN = 0x02
ATTR_SYSTEM = 0x04
ATTR_VOLUME = 0x08
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LONG_NAME = 0x0F  # read-only | hidden | system | volume: a VFAT long-name piece

ATTRIBUTE_FLAGS = {ATTR_READONLY: "readonly", ATTR_HIDDEN: "hidden", ATTR_SYSTEM: "system", ATTR_ARCHIVE: "archive"}

#: NT case flags (byte 12 of a short entry): the base name / the extension is shown in lower case
NT_LOWER_BASE = 0x08
NT_LOWER_EXT = 0x10

#: pieces one long name may have (13 characters each, 255 at most)
LFN_MAX_PIECES = 20

#: the flags of FAT[1] (Microsoft's FAT specification): ClnShutBitMask, clear while the volume is
#: mounted (fsck.fat: "Dirty bit is set"), and HrdErrBitMask, clear after a disk error; FAT12 has none
FAT16_CLEAN_SHUTDOWN, FAT16_NO_DISK_ERROR = 0x8000, 0x4000
FAT32_CLEAN_SHUTDOWN, FAT32_NO_DISK_ERROR = 0x08000000, 0x04000000
#: a FAT32 entry's cluster number: its high 4 bits are reserved, and a free entry is 0 in the others
FAT32_ENTRY_MASK = 0x0FFFFFFF
#: FAT entries read at a time by ``unused_ranges`` (from each FAT copy)
FREE_SPACE_ENTRIES = 1 << 18
#: runs of zero bytes at least one FAT16 or FAT32 entry long (free entries lie in them)
_ZERO_ENTRY_RUNS = {2: re.compile(rb"\x00{2,}"), 4: re.compile(rb"\x00{4,}")}


@dataclass(frozen=True)
class FatNode:
    """A file or directory, as its directory entry describes it. ``location`` is the entry's byte
    offset in the volume (-1 for the root, which has no entry), so no two files share a node."""

    location: int
    cluster: int
    size: int
    attributes: int
    mtime: float | None

    @property
    def is_dir(self) -> bool:
        return bool(self.attributes & ATTR_DIRECTORY)


@dataclass(frozen=True)
class FatDirectoryEntry:
    """A name in a directory: the long name when a valid one precedes the short entry."""

    name: str
    short_name: str
    node: FatNode


# -- pure parsing of directory entries -------------------------------------------------------------


def lfn_checksum(short_name: bytes) -> int:
    """The checksum each long-name piece carries of the 11-byte short name it belongs to."""
    total = 0
    for byte in short_name:
        total = (((total & 1) << 7) | (total >> 1)) + byte & 0xFF
    return total


def decode_short_name(record: bytes) -> str:
    """The 8.3 name of a short entry ("NAME.EXT"), lowered where the NT case flags say so."""
    raw = bytearray(record[0:11])
    if raw[0] == 0x05:  # a name really starting with 0xE5 (a Kanji lead byte)
        raw[0] = 0xE5
    base = raw[0:8].decode("cp437").rstrip(" ")
    ext = raw[8:11].decode("cp437").rstrip(" ")
    if record[12] & NT_LOWER_BASE:
        base = base.lower()
    if record[12] & NT_LOWER_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


def fat_timestamp(date: int, time: int) -> float | None:
    """A FAT date and time (local time of the writer, taken here as UTC) as a POSIX timestamp."""
    try:
        moment = datetime(1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F,
                          time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2, tzinfo=timezone.utc)
    except ValueError:  # date 0, month 13, second 62...
        return None
    return moment.timestamp()


@lru_cache(maxsize=256)
def attribute_flags(attributes: int) -> frozenset[str]:
    """The Stat.flags of an attribute byte."""
    return frozenset(name for bit, name in ATTRIBUTE_FLAGS.items() if attributes & bit)


def _lfn_piece(record: bytes) -> str:
    """The characters of one long-name piece, up to its terminating NUL."""
    text = (record[1:11] + record[14:26] + record[28:32]).decode("utf-16-le", errors="replace")
    return text.split("\0", 1)[0]


def _usable(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def parse_directory(blocks: Iterable[tuple[int, bytes]], fat32: bool) -> Iterator[FatDirectoryEntry]:
    """The entries of a directory from its bytes, given as (volume offset, bytes) blocks in order.

    Deleted entries, volume labels, '.' and '..' are left out. A long name is used only when its
    pieces run from the 0x40-marked one down to 1 without a gap and carry the short name's checksum;
    anything else (orphans left by an old driver, a broken run) falls back to the short name.
    Stops at the first entry starting with 0 (the end of the directory).
    """
    pieces: list[str] | None = None  # the long name being collected, pieces in on-disk order
    expected = 0  # the sequence number the next piece must have
    checksum = 0
    for base, block in blocks:
        for start in range(0, len(block) - 31, 32):
            record = block[start : start + 32]
            first, attributes = record[0], record[11]
            if first == 0:
                return
            if first == 0xE5:
                pieces = None
                continue
            if attributes & 0x3F == ATTR_LONG_NAME:
                sequence = first & 0x1F
                valid = record[12] == 0 and record[26:28] == b"\0\0" and 1 <= sequence <= LFN_MAX_PIECES
                if valid and first & 0x40:
                    pieces, expected, checksum = [_lfn_piece(record)], sequence - 1, record[13]
                elif valid and pieces is not None and sequence == expected and record[13] == checksum:
                    pieces.append(_lfn_piece(record))
                    expected -= 1
                else:
                    pieces = None
                continue
            long_name = None
            if pieces is not None and expected == 0 and checksum == lfn_checksum(record[0:11]):
                long_name = "".join(reversed(pieces))
            pieces = None
            if attributes & ATTR_VOLUME or record[0:11] in (b".          ", b"..         "):
                continue
            short_name = decode_short_name(record)
            name = long_name if long_name is not None and _usable(long_name) else short_name
            if not _usable(name):
                continue
            cluster = int.from_bytes(record[26:28], "little")
            if fat32:
                cluster |= int.from_bytes(record[20:22], "little") << 16
            node = FatNode(
                location=base + start,
                cluster=cluster,
                size=0 if attributes & ATTR_DIRECTORY else int.from_bytes(record[28:32], "little"),
                attributes=attributes,
                mtime=fat_timestamp(int.from_bytes(record[24:26], "little"), int.from_bytes(record[22:24], "little")),
            )
            yield FatDirectoryEntry(name, short_name, node)


# -- the driver ----------------------------------------------------------------------------------------


@dataclass
class _Listing:
    entries: list[FatDirectoryEntry]
    index: dict[str, FatNode]  # case-folded long and short names


class FatFileSystem(GuestFileSystem["FatNode"]):
    """A FAT12, FAT16 or FAT32 volume at [offset, offset + length) of ``disk``."""

    case_insensitive = True

    def __init__(self, disk: Disk, offset: int, length: int) -> None:
        self.disk = disk
        self.offset = offset
        self.length = length
        boot = disk.read_at(offset, 512)
        bpb = parse_fat_bpb(boot)
        if bpb is None:
            raise CorruptImage("not a FAT file system", offset=offset, structure="FAT boot sector")
        self.bpb = bpb
        self.type = bpb.fat_type
        self.cluster_size = bpb.cluster_size
        self._data_offset = bpb.data_offset
        if bpb.data_offset >= length:
            raise CorruptImage("FAT layout does not fit its partition", offset=offset, structure="FAT boot sector")
        fat_bytes = bpb.fat_sectors * bpb.bytes_per_sector
        # FAT32 may keep one FAT active and the others unmirrored (extended flags, bit 7)
        active = 0
        if bpb.ext_flags & FAT32_MIRRORING_OFF:
            active = bpb.ext_flags & FAT32_ACTIVE_FAT
            if active >= bpb.num_fats:
                raise CorruptImage(f"active FAT {active} of {bpb.num_fats}",
                                   offset=offset + field_offset(FatBpb, "ext_flags_32"), structure="FAT boot sector")
        self._fat_start = bpb.fat_offset + active * fat_bytes
        #: where each FAT that must call a cluster free for it to be free lies: every copy while they are
        #: mirrored (copies that disagree are kept used), the active one alone when they are not
        self._fat_copies = ([self._fat_start] if bpb.ext_flags & FAT32_MIRRORING_OFF
                            else [bpb.fat_offset + index * fat_bytes for index in range(bpb.num_fats)])
        self._fat_end = self._fat_start + fat_bytes
        entry_bits = {"fat12": 12, "fat16": 16, "fat32": 32}[bpb.fat_type]
        in_fat = fat_bytes * 8 // entry_bits
        in_volume = (length - bpb.data_offset) // self.cluster_size
        #: cluster numbers below this exist: counted by the BPB, with a FAT entry, inside the volume
        self.cluster_limit = 2 + max(0, min(bpb.clusters, in_fat - 2, in_volume))
        root_cluster = 0
        if bpb.fat_type == "fat32":
            root_cluster = bpb.root_cluster
            self._check_cluster(root_cluster, "FAT32 root directory")
        self.root = FatNode(location=-1, cluster=root_cluster, size=0, attributes=ATTR_DIRECTORY, mtime=None)
        self._fat_pages: OrderedDict[int, bytes] = OrderedDict()
        self._listings: OrderedDict[FatNode, _Listing] = OrderedDict()
        self._listed_entries = 0
        self._runs: OrderedDict[FatNode, tuple[list[int], list[tuple[int, int]]]] = OrderedDict()

    # -- bytes of the volume -------------------------------------------------------------------------

    def _volume_bytes(self, position: int, size: int, structure: str) -> bytes:
        return read_volume(self.disk, self.offset, self.length, position, size, structure)

    def _fat_page(self, page: int) -> bytes:
        """64 KiB of the active FAT, through a small LRU cache."""
        data = self._fat_pages.get(page)
        if data is None:
            start = self._fat_start + page * FAT_PAGE
            data = self._volume_bytes(start, min(FAT_PAGE, self._fat_end - start), "FAT")
            self._fat_pages[page] = data
            if len(self._fat_pages) > FAT_CACHE_PAGES:
                self._fat_pages.popitem(last=False)
        else:
            self._fat_pages.move_to_end(page)
        return data

    def _fat_entry_bytes(self, position: int, size: int) -> bytes:
        """``size`` bytes of the active FAT at byte ``position`` within it (a FAT12 entry may
        straddle two pages)."""
        page, inner = divmod(position, FAT_PAGE)
        data = self._fat_page(page)
        if inner + size <= len(data):
            return data[inner : inner + size]
        return data[inner:] + self._fat_page(page + 1)[: inner + size - len(data)]

    # -- cluster chains ------------------------------------------------------------------------------

    def _check_cluster(self, cluster: int, structure: str) -> None:
        if not 2 <= cluster < self.cluster_limit:
            raise CorruptImage(f"cluster {cluster} is outside the {self.cluster_limit - 2} clusters of the volume",
                               offset=self.offset, structure=structure)

    def _next_cluster(self, cluster: int) -> int | None:
        """The cluster after ``cluster`` in its chain, None at the end of the chain."""
        kind = self.type
        if kind == "fat12":
            position = cluster + cluster // 2
            raw = int.from_bytes(self._fat_entry_bytes(position, 2), "little")
            value, end, bad = (raw >> 4 if cluster & 1 else raw & 0xFFF), 0xFF8, 0xFF7
        elif kind == "fat16":
            position = cluster * 2
            value, end, bad = int.from_bytes(self._fat_entry_bytes(position, 2), "little"), 0xFFF8, 0xFFF7
        else:
            position = cluster * 4
            value = int.from_bytes(self._fat_entry_bytes(position, 4), "little") & 0x0FFFFFFF
            end, bad = 0x0FFFFFF8, 0x0FFFFFF7
        if value >= end:
            return None
        if 2 <= value < self.cluster_limit:
            return value
        what = "a free cluster" if value == 0 else "a bad cluster" if value == bad else f"cluster {value}, out of range"
        raise CorruptImage(f"the chain at cluster {cluster} continues to {what}", offset=self.offset + self._fat_start
                           + position, structure="FAT")

    def _chain(self, first: int, structure: str) -> Iterator[int]:
        """The clusters of the chain starting at ``first``; a loop raises CorruptImage (Brent's
        algorithm: the tortoise jumps to the hare at powers of two, so memory stays constant)."""
        self._check_cluster(first, structure)
        cluster, tortoise, power, steps = first, first, 1, 0
        while True:
            yield cluster
            following = self._next_cluster(cluster)
            if following is None:
                return
            if following == tortoise:
                raise CorruptImage(f"the cluster chain starting at {first} loops", offset=self.offset,
                                   structure=structure)
            steps += 1
            if steps == power:
                tortoise, power, steps = following, power * 2, 0
            cluster = following

    def _cluster_position(self, cluster: int) -> int:
        return self._data_offset + (cluster - 2) * self.cluster_size

    # -- directories ---------------------------------------------------------------------------------

    def _directory_blocks(self, node: FatNode) -> Iterator[tuple[int, bytes]]:
        """The bytes of a directory, one cluster (or 64 KiB of the fixed root) at a time."""
        if node.location == -1 and self.bpb.fat_type != "fat32":
            start, end = self.bpb.root_dir_offset, self.bpb.root_dir_offset + self.bpb.root_dir_size
            for position in range(start, end, 1 << 16):
                yield position, self._volume_bytes(position, min(1 << 16, end - position), "FAT root directory")
            return
        if node.cluster < 2:
            raise CorruptImage(f"directory entry points at cluster {node.cluster}", offset=self.offset + node.location,
                               structure="FAT directory entry")
        total = 0
        for cluster in self._chain(node.cluster, "FAT directory"):
            total += self.cluster_size
            if total > MAX_DIRECTORY_BYTES:
                raise CorruptImage(f"directory longer than {MAX_DIRECTORY_BYTES} bytes", offset=self.offset
                                   + self._cluster_position(cluster), structure="FAT directory")
            position = self._cluster_position(cluster)
            yield position, self._volume_bytes(position, self.cluster_size, "FAT directory")

    def _listing(self, node: FatNode) -> _Listing:
        listing = self._listings.get(node)
        if listing is not None:
            self._listings.move_to_end(node)
            return listing
        entries = list(parse_directory(self._directory_blocks(node), self.bpb.fat_type == "fat32"))
        index: dict[str, FatNode] = {}
        for entry in entries:
            index.setdefault(entry.name.casefold(), entry.node)
            index.setdefault(entry.short_name.casefold(), entry.node)
        listing = _Listing(entries, index)
        if len(entries) <= LISTING_CACHE_ENTRIES:
            while self._listings and self._listed_entries + len(entries) > LISTING_CACHE_ENTRIES:
                _, evicted = self._listings.popitem(last=False)
                self._listed_entries -= len(evicted.entries)
            self._listings[node] = listing
            self._listed_entries += len(entries)
        return listing

    # -- files ---------------------------------------------------------------------------------------

    def _file_runs(self, node: FatNode) -> tuple[list[int], list[tuple[int, int]]]:
        """A file's chain as runs of contiguous clusters: the file's cluster index where each run
        starts, and (first cluster, count) of each. Only the clusters the size needs are followed."""
        cached = self._runs.get(node)
        if cached is not None:
            self._runs.move_to_end(node)
            return cached
        needed = -(-node.size // self.cluster_size)
        if needed > self.cluster_limit - 2:
            raise CorruptImage(f"file of {node.size} bytes is larger than the volume",
                               offset=self.offset + node.location, structure="FAT directory entry")
        starts: list[int] = []
        runs: list[tuple[int, int]] = []
        count = 0
        if needed:
            for cluster in self._chain(node.cluster, "FAT file"):
                if runs and runs[-1][0] + runs[-1][1] == cluster:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    if len(runs) >= MAX_FRAGMENTS:
                        raise CorruptImage(f"file in more than {MAX_FRAGMENTS} fragments",
                                           offset=self.offset + node.location, structure="FAT file")
                    starts.append(count)
                    runs.append((cluster, 1))
                count += 1
                if count == needed:
                    break
            if count < needed:
                raise CorruptImage(f"cluster chain ends after {count} of the file's {needed} clusters",
                                   offset=self.offset + node.location, structure="FAT file")
        self._runs[node] = (starts, runs)
        if len(self._runs) > RUN_CACHE_FILES:
            self._runs.popitem(last=False)
        return starts, runs

    # -- the GuestFileSystem contract ----------------------------------------------------------------

    def _stat(self, node: FatNode) -> Stat:
        kind = FileType.DIRECTORY if node.is_dir else FileType.FILE
        return Stat(type=kind, size=node.size, node=node, mtime=node.mtime, flags=attribute_flags(node.attributes))

    def _entries(self, node: FatNode) -> Iterator[DirEntry[FatNode]]:
        for entry in self._listing(node).entries:
            yield DirEntry(entry.name, entry.node, FileType.DIRECTORY if entry.node.is_dir else FileType.FILE)

    def _lookup(self, directory: FatNode, name: str) -> FatNode | None:
        """By long or short name, without case (as Windows and Linux's vfat do)."""
        return self._listing(directory).index.get(name.casefold())

    def _read(self, node: FatNode, offset: int, length: int) -> bytes:
        length = min(length, node.size - offset)
        if length <= 0:
            return b""
        starts, runs = self._file_runs(node)
        run = bisect_right(starts, offset // self.cluster_size) - 1
        pieces = []
        while length > 0:
            first, count = runs[run]
            inner = offset - starts[run] * self.cluster_size
            size = min(length, count * self.cluster_size - inner)
            pieces.append(self._volume_bytes(self._cluster_position(first) + inner, size, "FAT file data"))
            offset += size
            length -= size
            run += 1
        return b"".join(pieces)

    def _readlink(self, node: FatNode) -> str:
        raise GuestPathError("FAT has no symbolic links")

    # -- free space ----------------------------------------------------------------------------------

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The clusters whose entry is 0 (free) in every FAT copy, as byte ranges of the data area.
        NotSparsifiable when the volume is marked dirty (not cleanly unmounted) or met a disk error."""
        problem = self._unclean()
        if problem is not None:
            raise NotSparsifiable(problem)
        return join_adjacent(self._free_clusters())

    def _unclean(self) -> str | None:
        """Why the volume's state forbids trusting its FAT (the flags fsck.fat reports), or None."""
        if self.bpb.state & FAT_STATE_DIRTY:
            return "the FAT volume's dirty bit is set in its boot sector (it was not cleanly unmounted)"
        if self.type == "fat12":
            return None
        width, clean, no_error = ((2, FAT16_CLEAN_SHUTDOWN, FAT16_NO_DISK_ERROR) if self.type == "fat16"
                                  else (4, FAT32_CLEAN_SHUTDOWN, FAT32_NO_DISK_ERROR))
        flags = int.from_bytes(self._fat_entry_bytes(width, width), "little")  # FAT[1]
        if not flags & clean:
            return "the FAT volume's dirty bit is set in FAT[1] (it was not cleanly unmounted)"
        if not flags & no_error:
            return "the FAT volume recorded a disk error in FAT[1]"
        return None

    def _free_clusters(self) -> Iterator[tuple[int, int]]:
        """(volume offset, length) of the runs of free clusters, FREE_SPACE_ENTRIES entries at a time."""
        for first in range(0, self.cluster_limit, FREE_SPACE_ENTRIES):
            last = min(first + FREE_SPACE_ENTRIES, self.cluster_limit)
            for entry, count in self._zero_entries(first, last):
                start, end = max(entry, 2), entry + count
                if end > start:
                    yield self._cluster_position(start), (end - start) * self.cluster_size

    def _zero_entries(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """(entry, count) of the runs of entries in ``[first, last)`` that are 0 in every FAT copy
        (``first`` even, so a FAT12 chunk starts on a whole byte)."""
        if self.type == "fat12":
            start, end = first * 3 // 2, -(-last * 3 // 2)
        else:
            width = 2 if self.type == "fat16" else 4
            start, end = first * width, last * width
        combined = 0
        for copy in self._fat_copies:  # an entry is free when it is 0 in the copies OR'ed together
            combined |= int.from_bytes(self._volume_bytes(copy + start, end - start, "FAT"), "little")
        if self.type == "fat32":
            combined &= int.from_bytes(FAT32_ENTRY_MASK.to_bytes(4, "little") * (last - first), "little")
        data = combined.to_bytes(end - start, "little")
        if self.type != "fat12":
            for run in _ZERO_ENTRY_RUNS[width].finditer(data):
                low, high = -(-run.start() // width), run.end() // width
                if high > low:
                    yield first + low, high - low
            return
        for entry in range(first, last):  # FAT12: 12-bit entries, two in three bytes
            position = entry * 3 // 2 - start
            pair = data[position] | data[position + 1] << 8
            if not (pair >> 4 if entry & 1 else pair & 0xFFF):
                yield entry, 1


def find_efi_loaders(disk: Disk, offset: int, length: int) -> list[str]:
    """The ``.efi`` files in ``EFI/`` and its subdirectories on a FAT volume (an ESP), as paths.

    A subdirectory that cannot be read is skipped; raises DiskImageError when the volume or its
    ``EFI`` directory cannot be read.
    """
    fs = FatFileSystem(disk, offset, length)
    efi = fs._lookup(fs.root, "EFI")
    if efi is None or not efi.is_dir:
        return []
    found = []
    for sub in fs._listing(efi).entries[:256]:
        if sub.node.is_dir:
            try:
                children = fs._listing(sub.node).entries
            except DiskImageError:
                continue
            found += [f"EFI/{sub.name}/{child.name}" for child in children[:1024]
                      if not child.node.is_dir and child.name.upper().endswith(".EFI")]
        elif sub.name.upper().endswith(".EFI"):
            found.append(f"EFI/{sub.name}")
    return found
