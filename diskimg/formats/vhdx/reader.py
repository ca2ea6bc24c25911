"""The VHDX reader: fixed, dynamic and differencing disks, 512 and 4096-byte logical sectors.

Choices made here:

* The current header is the valid one with the higher sequence number; either region table copy
  that verifies is used (the first when both do).
* A non-empty log (a non-zero log GUID and valid entries of it) is replayed in memory before the
  region table, metadata and BAT are read, so the disk reads as Hyper-V shows it after opening
  the file; the file is never written. qemu refuses such a file read-only; its reading after
  ``qemu-img check -r all`` (which replays the log into the file) is the oracle. Host offsets in
  ``map`` are then offsets of the replayed file.
* Payload blocks: fully present blocks are read from the file; not present, zero, unmapped and
  undefined blocks read as zeros (as qemu reads them), except that a differencing disk's not
  present blocks come from its parent; partially present blocks (differencing disks only) follow
  the sector bitmap of their chunk (bit ``i % 8`` of byte ``i // 8`` for sector ``i``: 1 = this
  file, 0 = the parent).
* Every present block and sector bitmap must lie in the file, past the header area, outside the
  log and metadata regions and apart from every other block.
* A differencing disk's parent is looked up through the caller's opener (``--allow-backing``,
  confined like backing files) by the locator's ``relative_path``, then ``absolute_win32_path``;
  the parent's data write GUID must equal the locator's ``parent_linkage`` (or ``parent_linkage2``).
"""

from __future__ import annotations

import itertools
import re
import struct
import uuid
from array import array
from collections.abc import Callable, Iterator
from typing import Any

from ...bitmaps import REVERSED_BITS, bitmap_runs
from ...errors import BackingFileError, CorruptImage
from ...host.files import HostFile
from ..probing import Detection, OpenOptions, ParentOpener
from ..reader import DiskReader, ImageInfo, Run, RunKind
from ..vhd import BitmapRunsCache, host_path, sector_bitmap_runs
from . import structures as s
from .log import ReplayedFile, replay

NAME = "vhdx"
#: the state (low 3 bits) of a BAT entry from its low byte
_STATE_OF_LOW_BYTE = bytes(value & s.BAT_STATE_MASK for value in range(256))
#: states whose entries need a look: undefined (counted), reserved 4 and 5, present
_NOTABLE_STATES = re.compile(rb"[\x04-\x07]")
#: the next entry read otherwise than a run of: parent blocks, zero blocks (of a disk with and without parent)
_NOT_FROM_PARENT = re.compile(rb"[^\x00]")
_NOT_ZERO_DIFFERENCING = re.compile(rb"[^\x01-\x03]")
_NOT_ZERO = re.compile(rb"[^\x00-\x03]")
#: bit-reversed bytes: VHDX bitmaps number bits from the least significant, VHD's from the most


class VhdxReader(DiskReader):
    format = NAME

    def __init__(self, layout: VhdxLayout) -> None:
        super().__init__(layout.host, layout.params.virtual_size)
        self.layout = layout
        self._bitmap_cache = BitmapRunsCache()

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> VhdxReader:
        reader = cls(VhdxLayout.read(host))
        if reader.layout.params.has_parent and open_parent is not None:
            reader._open_parent(open_parent)
        return reader

    def _open_parent(self, open_parent: ParentOpener) -> None:
        candidates = self.layout.parent_candidates
        if not candidates:
            raise BackingFileError("differencing VHDX whose parent locator names no path", path=self.path)
        parent = open_parent(list(candidates), None)
        linkage = {self.layout.locator.entries.get(key, "").strip("{}").lower()
                   for key in ("parent_linkage", "parent_linkage2")} - {"", str(uuid.UUID(int=0))}
        found = getattr(getattr(parent, "layout", None), "header", None)
        found_guid = str(found.data_write_guid) if found is not None else None
        if found_guid not in linkage:
            name = parent.path
            parent.close()
            raise BackingFileError(
                f"parent {name!r} has data write GUID {found_guid}, but this differencing disk expects "
                f"{' or '.join(sorted(linkage)) or 'none recorded'}",
                path=self.path,
            )
        self.parent = parent

    @property
    def backing_file(self) -> str | None:
        if not self.layout.params.has_parent:
            return None
        entries = self.layout.locator.entries
        return entries.get("relative_path") or entries.get("absolute_win32_path") or "<parent named nowhere>"

    @property
    def subformat(self) -> str:
        params = self.layout.params
        return "differencing" if params.has_parent else "fixed" if params.leave_blocks_allocated else "dynamic"

    def info(self) -> ImageInfo:
        layout = self.layout
        params = layout.params
        details: dict[str, Any] = {
            "logical_sector_size": params.logical_sector_size,
            "physical_sector_size": params.physical_sector_size,
            "header_sequence_number": layout.header.sequence_number,
            "current_header": layout.header_index + 1,
            "data_write_guid": str(layout.header.data_write_guid),
            "log_entries_replayed": layout.log_entries,
            "payload_states": layout.state_counts,
        }
        if params.page83 is not None:
            details["page83_data"] = str(params.page83)
        features = ["log-replayed"] if layout.log_entries else []
        if params.has_parent:
            details["parent_locator"] = dict(layout.locator.entries)
            details["parent_candidates"] = list(layout.parent_candidates)
            details["parent_opened"] = self.parent is not None
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            subformat=self.subformat,
            version="1",
            cluster_size=params.block_size,
            creator=layout.creator,
            features=features,
            backing_file=self.backing_file,
            backing_format=NAME if params.has_parent else None,
            details=details,
        )

    # -- runs ------------------------------------------------------------------------------------

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        params = self.layout.params
        block_size = params.block_size
        ratio = params.chunk_ratio
        bat = self.layout.bat
        absent = RunKind.BACKING if params.has_parent else RunKind.ZERO
        position = start
        while position < end:
            block = position // block_size
            block_start = block * block_size
            stop = min(end, block_start + block_size)
            entry = bat[s.payload_index(block, ratio)]
            state = entry & s.BAT_STATE_MASK
            if state == s.PAYLOAD_FULLY_PRESENT:
                yield Run(position, stop - position, RunKind.HOST, s.bat_offset(entry) + position - block_start)
            elif state == s.PAYLOAD_PARTIALLY_PRESENT:
                yield from self._partial_runs(block, block_start, position, stop, s.bat_offset(entry))
            else:
                kind = absent if state == s.PAYLOAD_NOT_PRESENT else RunKind.ZERO
                stop = min(end, self._next_other_block(block, kind is RunKind.BACKING) * block_size)
                yield Run(position, stop - position, kind)
            position = stop

    def _next_other_block(self, block: int, from_parent: bool) -> int:
        """The first block after ``block`` not read the way it is (zeros, or from the parent), found
        by a C scan of the entries' states; sector bitmap entries in between are stepped over."""
        params = self.layout.params
        ratio = params.chunk_ratio
        states = self.layout.states
        pattern = _NOT_FROM_PARENT if from_parent else _NOT_ZERO_DIFFERENCING if params.has_parent else _NOT_ZERO
        index = s.payload_index(block, ratio) + 1
        while (found := pattern.search(states, index)) is not None:
            index = found.start()
            if (index + 1) % (ratio + 1):
                return index - index // (ratio + 1)
            index += 1  # a sector bitmap entry
        return params.payload_blocks

    def _partial_runs(self, block: int, block_start: int, start: int, end: int, data_offset: int) -> Iterator[Run]:
        params = self.layout.params
        return sector_bitmap_runs(self._block_bitmap_runs(block), params.logical_sector_size, block_start,
                                  params.block_size, start, end, data_offset)

    def _block_bitmap_runs(self, block: int) -> tuple[list[int], list[int]]:
        """A partially present block's part of its chunk's sector bitmap, as runs (cached)."""
        cached = self._bitmap_cache.get(block)
        if cached is not None:
            return cached
        params = self.layout.params
        sectors = params.block_size // params.logical_sector_size
        entry = self.layout.bat[s.bitmap_index(block // params.chunk_ratio, params.chunk_ratio)]
        offset = s.bat_offset(entry) + (block % params.chunk_ratio) * sectors // 8
        bitmap = self.host.read_at(offset, sectors // 8)
        if len(bitmap) != sectors // 8:
            raise CorruptImage(f"the sector bitmap of block {block} lies past the end of the file",
                               path=self.path, offset=offset, structure="sector bitmap")
        return self._bitmap_cache.put(block, bitmap_runs(bitmap.translate(REVERSED_BITS), sectors))


class VhdxLayout:
    """The checked metadata of one VHDX file (shared by the reader and ``check``)."""

    host: Any  # the HostFile, or a ReplayedFile over it after a log replay
    creator: str
    header_index: int
    header: s.Header
    log_entries: int
    regions: dict[uuid.UUID, s.Region]
    params: s.DiskParameters
    locator: s.ParentLocator
    parent_candidates: list[str]
    bat: array[int]
    #: each BAT entry's state, one byte per entry
    states: bytes
    state_counts: dict[str, int]
    image_end: int

    def __init__(self, host: HostFile) -> None:
        self.host = host
        self.name = host.name

    def corrupt(self, message: str, offset: int | None = None, structure: str | None = None) -> CorruptImage:
        return CorruptImage(message, path=self.name, offset=offset, structure=structure)

    @classmethod
    def read(cls, host: HostFile) -> VhdxLayout:
        layout = cls(host)
        layout._read_headers()
        layout._replay_log()
        layout._read_regions()
        layout._read_metadata()
        layout._read_bat()
        return layout

    def _read_exact_at(self, offset: int, length: int, structure: str) -> bytes:
        data: bytes = self.host.read_at(offset, length)
        if len(data) != length:
            raise self.corrupt(f"the {structure} lies past the end of the file", offset, structure)
        return data

    def _read_headers(self) -> None:
        identifier = self._read_exact_at(0, 64 * 1024, "file identifier")
        try:
            self.creator = s.parse_creator(identifier)
        except s.VhdxError as exc:
            raise self.corrupt(str(exc), 0, "file identifier") from None
        copies = [self._read_exact_at(offset, s.HEADER_SIZE, "header") for offset in s.HEADER_OFFSETS]
        try:
            self.header_index, self.header = s.current_header(*copies)
        except s.VhdxError as exc:
            raise self.corrupt(str(exc), s.HEADER_OFFSETS[0], "header") from None

    def _replay_log(self) -> None:
        header = self.header
        self.log_entries = 0
        if not header.has_log:
            return
        offset = s.HEADER_OFFSETS[self.header_index]
        if header.log_length == 0 or header.log_offset + header.log_length > self.host.size:
            raise self.corrupt(f"the log ({header.log_length} bytes at {header.log_offset}) lies outside the file",
                               offset, "header")
        if header.log_length > s.MAX_LOG_LENGTH:
            raise self.corrupt(f"the log of {header.log_length} bytes is over diskimg's {s.MAX_LOG_LENGTH}-byte cap",
                               offset, "header")
        log = self._read_exact_at(header.log_offset, header.log_length, "log")
        try:
            writes, size, self.log_entries = replay(log, header.log_guid, self.host.size)
        except s.VhdxError as exc:
            raise self.corrupt(f"the log cannot be replayed: {exc}", header.log_offset, "log") from None
        if writes:
            self.host = ReplayedFile(self.host, writes, size)

    def _read_regions(self) -> None:
        try:
            self.regions = _first_valid_region_table(
                lambda offset, length: self._read_exact_at(offset, length, "region table"))
        except s.VhdxError as exc:
            raise self.corrupt(str(exc), s.REGION_TABLE_OFFSETS[0], "region table") from None
        for region in self.regions.values():
            if region.end > self.host.size:
                raise self.corrupt(f"region {region.guid} ({region.length} bytes at {region.file_offset}) lies "
                                   f"past the end of the file", s.REGION_TABLE_OFFSETS[0], "region table")
            if self.header.has_log and region.file_offset < self.header.log_offset + self.header.log_length \
                    and self.header.log_offset < region.end:
                raise self.corrupt(f"region {region.guid} overlaps the log", s.REGION_TABLE_OFFSETS[0], "region table")

    def _read_metadata(self) -> None:
        region = self.regions[s.METADATA_REGION]
        table = self._read_exact_at(region.file_offset, s.METADATA_TABLE_SIZE, "metadata table")
        try:
            entries = s.parse_metadata_table(table, region.length)
        except s.VhdxError as exc:
            raise self.corrupt(str(exc), region.file_offset, "metadata table") from None
        items: dict[uuid.UUID, bytes] = {}
        for item, entry in entries.items():
            if item in s.KNOWN_METADATA:
                if entry.length > s.MAX_PARENT_LOCATOR:
                    raise self.corrupt(f"the {s.KNOWN_METADATA[item]} item is {entry.length} bytes long",
                                       region.file_offset + entry.offset, "metadata")
                items[item] = self._read_exact_at(region.file_offset + entry.offset, entry.length, "metadata item")
        try:
            self.params = s.parse_disk_parameters(items)
            self.locator = s.ParentLocator(uuid.UUID(int=0))
            if self.params.has_parent:
                if s.PARENT_LOCATOR not in items:
                    raise s.VhdxError("a differencing disk without a parent locator item")
                self.locator = s.parse_parent_locator(items[s.PARENT_LOCATOR])
        except s.VhdxError as exc:
            raise self.corrupt(str(exc), region.file_offset, "metadata") from None
        candidates = []
        for key, platform in (("relative_path", b"W2ru"), ("absolute_win32_path", b"W2ku")):
            value = self.locator.entries.get(key)
            if value and host_path(value, platform) not in candidates:
                candidates.append(host_path(value, platform))
        self.parent_candidates = candidates

    def _read_bat(self) -> None:
        region = self.regions[s.BAT_REGION]
        params = self.params
        entries = params.bat_entries
        if entries * 8 > region.length:
            raise self.corrupt(f"the BAT region ({region.length} bytes) is too small for {entries} entries",
                               region.file_offset, "BAT")
        if entries * 8 > s.MAX_BAT_BYTES:
            raise self.corrupt(f"a BAT of {entries * 8} bytes is over diskimg's cap", region.file_offset, "BAT")
        raw = self._read_exact_at(region.file_offset, entries * 8, "BAT")
        self.bat = array("Q", raw)
        if array("Q", b"\1" + bytes(7))[0] != 1:
            self.bat.byteswap()
        self.states = raw[0::8].translate(_STATE_OF_LOW_BYTE)
        self._check_bat(region, self.states)

    def _check_bat(self, bat_region: s.Region, states: bytes) -> None:
        """States known, present blocks inside the file and apart from each other and the metadata.

        ``states`` holds each entry's state (one byte per entry), so that the entries that need a
        look (present, undefined, unknown, and the sector bitmap entries) are found in C: a table
        of millions of entries of an empty disk costs a scan, not a Python loop."""
        params = self.params
        ratio = params.chunk_ratio
        counts = {name: states.count(state) for state, name in s.PAYLOAD_STATES.items()}
        used: list[tuple[int, int, str]] = [(0, s.HEADER_AREA, "the header area")]
        used += [(r.file_offset, r.end, f"the {s.KNOWN_REGIONS.get(r.guid, 'unknown')} region")
                 for r in self.regions.values()]
        if self.header.has_log:
            used.append((self.header.log_offset, self.header.log_offset + self.header.log_length, "the log"))
        for index in range(ratio, len(states), ratio + 1):
            name = s.PAYLOAD_STATES.get(states[index])
            if name is not None:
                counts[name] -= 1  # counted above as if it were a payload entry
            span = self._sector_bitmap_span(index, bat_region)
            if span is not None:
                used.append(span)
        for match in _NOTABLE_STATES.finditer(states):
            index = match.start()
            if (index + 1) % (ratio + 1):
                span = self._payload_span(index, bat_region)
                if span is not None:
                    used.append(span)
        used.sort()
        for (_, end_a, what_a), (start_b, _, what_b) in itertools.pairwise(used):
            if start_b < end_a:
                raise self.corrupt(f"{what_b} at file offset {start_b} overlaps {what_a}", start_b, "BAT")
        self.state_counts = {name: count for name, count in counts.items() if count}
        # blocks take their whole size in the file, the last one too (Hyper-V and qemu write it so)
        self.image_end = max([end for _, end, _ in used]
                             + [start + self.params.block_size for start, _, what in used if what.startswith("block ")])

    def _sector_bitmap_span(self, index: int, bat_region: s.Region) -> tuple[int, int, str] | None:
        """The file range of a present sector bitmap block (a differencing disk's), checked."""
        state = self.bat[index] & s.BAT_STATE_MASK
        if state == s.SB_NOT_PRESENT or (state == s.SB_PRESENT and not self.params.has_parent):
            return None  # qemu ignores them in a disk without parent; nothing reads them
        if state != s.SB_PRESENT:
            raise self.corrupt(f"sector bitmap entry {index} has unknown state {state}",
                               bat_region.file_offset + 8 * index, "BAT")
        chunk = index // (self.params.chunk_ratio + 1)
        return self._inside_file(index, s.SECTOR_BITMAP_BLOCK, f"sector bitmap of chunk {chunk}", bat_region)

    def _payload_span(self, index: int, bat_region: s.Region) -> tuple[int, int, str] | None:
        """The file range of a present payload block, checked (None for a block not in the file)."""
        params = self.params
        ratio = params.chunk_ratio
        state = self.bat[index] & s.BAT_STATE_MASK
        block = index - index // (ratio + 1)
        where = bat_region.file_offset + 8 * index
        if state not in s.PAYLOAD_STATES:
            raise self.corrupt(f"BAT entry of block {block} has unknown state {state}", where, "BAT")
        if state == s.PAYLOAD_PARTIALLY_PRESENT:
            if not params.has_parent:
                raise self.corrupt(f"block {block} is partially present in a disk without parent", where, "BAT")
            if self.bat[s.bitmap_index(block // ratio, ratio)] & s.BAT_STATE_MASK != s.SB_PRESENT:
                raise self.corrupt(f"block {block} is partially present but its chunk has no sector bitmap", where,
                                   "BAT")
        elif state != s.PAYLOAD_FULLY_PRESENT:
            return None
        length = min(params.block_size, params.virtual_size - block * params.block_size)
        return self._inside_file(index, length, f"block {block}", bat_region)

    def _inside_file(self, index: int, length: int, what: str, bat_region: s.Region) -> tuple[int, int, str]:
        offset = s.bat_offset(self.bat[index])
        file_size = self.host.size
        if offset < s.HEADER_AREA or offset + length > file_size:
            raise self.corrupt(f"{what} at file offset {offset} lies outside the file ({file_size} bytes)",
                               bat_region.file_offset + 8 * index, "BAT")
        return offset, offset + length, what


def probe(head: bytes, read_at: Callable[[int, int], bytes], size: int | None) -> Detection:
    """Detection of a file starting with ``vhdxfile``: the creator, and the subformat from the
    file parameters as stored (before any log replay); damage is named, opening reports it."""
    creator = s.parse_creator(head)
    label = f"VHDX (creator '{creator}')" if creator else "VHDX"
    try:
        _, header = s.current_header(*(read_at(offset, s.HEADER_SIZE) for offset in s.HEADER_OFFSETS))
        regions = _first_valid_region_table(read_at)
        metadata = regions[s.METADATA_REGION]
        entries = s.parse_metadata_table(read_at(metadata.file_offset, s.METADATA_TABLE_SIZE), metadata.length)
        parameters = entries.get(s.FILE_PARAMETERS)
        if parameters is None or parameters.length < 8:
            raise s.VhdxError("no file parameters metadata item")
        flags = struct.unpack_from("<I", read_at(metadata.file_offset + parameters.offset, 8).ljust(8, b"\0"), 4)[0]
    except (s.VhdxError, struct.error) as exc:
        return Detection(format=NAME, version="1", readable=True, description=f"{label}, corrupt: {exc}")
    subformat = "differencing" if flags & 2 else "fixed" if flags & 1 else "dynamic"
    log = ", with a log to replay" if header.has_log else ""
    return Detection(format=NAME, subformat=subformat, version="1", readable=True,
                     description=f"{label}, {subformat}{log}")


def _first_valid_region_table(read_at: Callable[[int, int], bytes]) -> dict[uuid.UUID, s.Region]:
    problem = None
    for offset in s.REGION_TABLE_OFFSETS:
        try:
            return s.parse_region_table(read_at(offset, s.REGION_TABLE_SIZE))
        except s.VhdxError as exc:
            problem = exc
    raise s.VhdxError(f"no valid region table ({problem})")
