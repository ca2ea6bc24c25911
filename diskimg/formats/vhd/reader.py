"""VHD reading: :class:`VhdReader` and detection's :func:`probe`, over the structures and rules
of structures.py (see there for the layout and the rules).

Choices made here:

* Sector bitmaps of *dynamic* disks are not consulted: an allocated block reads as its stored
  data, as qemu reads it (the project's oracle). Every dynamic block in our corpus (Hyper-V,
  Disk2vhd, qemu, vhd-tool) carries a full bitmap, so the spec's "0 = never written, reads as
  zeros" would change nothing there; elsewhere, reading the stored bytes never hides data. For
  differencing disks the bitmap is honoured, as it must be (bitmaps are read lazily, a bounded
  number of blocks cached).
* Virtual size: :func:`~.structures.choose_size`; ``OpenOptions.vhd_size`` forces "chs" or
  "current_size". A fixed disk's bytes past its data area, and a dynamic disk's bytes past what
  its BAT describes, read as zeros.
* A differencing disk's parent is looked up, through the caller's opener, by the relative
  locators (W2ru, Wi2r), then the absolute ones (W2ku, Wi2k, MacX), then the parent name and its
  base name; the parent's unique id must match the one the child records.
* Every offset, length and count read from the file is checked against the file size and caps
  before use; a malformed image raises :class:`CorruptImage` (the first finding of the rules).
"""

from __future__ import annotations

import bisect
import posixpath
import re
import threading
import uuid
from array import array
from collections.abc import Iterator
from typing import Any

from ...bitmaps import bitmap_runs
from ...errors import BackingFileError, CorruptImage, UsageError
from ...host.files import HostFile
from ..probing import Detection, OpenOptions, ParentOpener
from ..reader import DiskReader, Extent, ImageInfo, Run, RunKind
from .structures import (
    ABSOLUTE_PLATFORMS,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_FIXED,
    DYNAMIC_HEADER_SIZE,
    FEATURE_TEMPORARY,
    FOOTER_SIZE,
    NAME,
    OLD_FOOTER_SIZE,
    RELATIVE_PLATFORMS,
    SECTOR,
    SUBFORMATS,
    DynamicHeader,
    Finding,
    VhdFooter,
    allocated_indices,
    bitmap_size,
    block_findings,
    choose_footer,
    choose_size,
    decode_locator_path,
    dynamic_header_findings,
    footer_findings,
    fourcc_text,
    has_footer_cookie,
    header_place_finding,
    host_path,
    locator_findings,
    metadata_regions,
    parse_bat,
    parse_dynamic_header,
    version_text,
    vhd_timestamp_iso,
)

#: sector bitmaps of a differencing disk kept as runs, per reader
BITMAP_CACHE_BLOCKS = 256


def probe(head: bytes, tail: bytes, file_size: int | None) -> Detection | None:
    """What detection reports for a file with a ``conectix`` cookie at its end or at offset 0 (None
    without one): the VHD its footer describes, or a corrupt VHD (readable: opening it says what is
    wrong). ``head``: the first bytes (up to 128 KiB), ``tail``: the last (up to 1 KiB);
    ``file_size`` None: the end is unknown (a peek into a compressed stream)."""
    if not has_footer_cookie(head, tail if file_size is not None else b""):
        return None
    choice = choose_footer(head, tail, file_size)
    footer = choice.footer
    if footer is None and file_size is None and choice.head_copy_problem is None:
        return None  # a valid fixed-disk footer at offset 0 and the end unseen: guest data, not a copy
    if footer is None:
        claimed = choice.unverified
        return Detection(
            format=NAME,
            subformat=None if claimed is None else SUBFORMATS.get(claimed.disk_type),
            version=None if claimed is None else version_text(claimed.format_version),
            readable=True,
            description=f"VHD, corrupt: {choice.problem}",
        )
    subformat = SUBFORMATS.get(footer.disk_type)
    kind = subformat or f"disk type {footer.disk_type}"
    note = ""
    if choice.source == "head_copy" and file_size is not None:
        note = ", footer at end of file damaged (using the copy at offset 0)"
    if file_size == FOOTER_SIZE and footer.disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
        note += " - footer only: a 512-byte file is not a complete image"
    return Detection(
        format=NAME,
        subformat=subformat,
        version=version_text(footer.format_version),
        readable=True,
        description=f"VHD ({kind}), creator {footer.creator}, size {footer.current_size} bytes{note}",
    )


class VhdReader(DiskReader):
    format = NAME

    # Set by open(); listed for readers of the code.
    footer: VhdFooter
    header: DynamicHeader | None
    subformat: str
    footer_source: str

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> VhdReader:
        size_rule = getattr(options, "vhd_size", "auto")
        if size_rule not in ("auto", "chs", "current_size"):
            raise UsageError(f"vhd_size must be 'auto', 'chs' or 'current_size', not {size_rule!r}")
        parser = _Opener(host, size_rule)
        parser.parse()
        reader = cls(host, parser.virtual_size)
        reader._adopt(parser)
        if reader.subformat == "differencing" and open_parent is not None:
            reader._open_parent(open_parent)
        return reader

    # -- set-up ----------------------------------------------------------------------------------

    def _adopt(self, parsed: _Opener) -> None:
        self.footer = parsed.footer
        self.header = parsed.header
        self.subformat = SUBFORMATS[parsed.footer.disk_type]
        self.footer_source = parsed.footer_source
        self.footer_length = parsed.footer_length
        self.size_source = parsed.size_source
        self._facts = parsed.facts
        self._locators = parsed.locators
        self.parent_candidates = parsed.parent_candidates
        self._data_area = parsed.data_area
        self._bat = parsed.bat
        self._allocated = parsed.allocated
        self._entries = len(parsed.bat)
        self._block_size = parsed.header.block_size if parsed.header else 0
        self._bitmap_size = bitmap_size(self._block_size) if parsed.header else 0
        self._covered = self._entries * self._block_size
        self._differencing = self.subformat == "differencing"
        self._bitmap_runs_cache = BitmapRunsCache()

    def _open_parent(self, open_parent: ParentOpener) -> None:
        assert self.header is not None
        if not self.parent_candidates:
            raise BackingFileError(
                "differencing VHD records neither a parent name nor a parent locator", path=self.path
            )
        parent = open_parent(list(self.parent_candidates), NAME)
        expected = self.header.parent_unique_id
        found = getattr(getattr(parent, "footer", None), "unique_id", None)
        if found != expected:
            name = getattr(parent, "path", "?")
            parent.close()
            raise BackingFileError(
                f"parent {name!r} has unique id {found}, but this differencing disk expects {expected}",
                path=self.path,
            )
        self.parent = parent

    # -- metadata ------------------------------------------------------------------------------

    @property
    def unique_id(self) -> uuid.UUID:
        return self.footer.unique_id

    @property
    def block_size(self) -> int | None:
        return self._block_size or None

    @property
    def backing_file(self) -> str | None:
        if not self._differencing or self.header is None:
            return None
        name = self.header.parent_name
        if name:
            return name
        if self.parent_candidates:
            return self.parent_candidates[0]
        return f"<parent {self.header.parent_unique_id}>"  # named nowhere: the id is all there is

    def info(self) -> ImageInfo:
        footer = self.footer
        details: dict[str, Any] = dict(self._facts)
        features = []
        if self.footer_source != "tail":
            features.append("footer-from-head-copy")
        if self.footer_length == OLD_FOOTER_SIZE:
            features.append("511-byte-footer")
        if footer.features & FEATURE_TEMPORARY:
            features.append("temporary")
        if footer.saved_state:
            features.append("saved-state")
        if self.size_source == "chs":
            features.append("chs-size")
        if self._differencing:
            details["parent_locators"] = [dict(locator) for locator in self._locators]
            details["parent_candidates"] = list(self.parent_candidates)
            details["parent_opened"] = self.parent is not None
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            subformat=self.subformat,
            version=version_text(footer.format_version),
            cluster_size=self.block_size,
            creator=footer.creator,
            features=features,
            backing_file=self.backing_file,
            backing_format=NAME if self._differencing else None,
            details=details,
        )

    # -- runs ------------------------------------------------------------------------------------

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        if self.header is None:  # fixed: a sparse file's holes are zeros known without reading
            return self._identity_extents(start, end, self._data_area)
        return super()._unmerged_extents(start, end)

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        if self.header is None:
            split = min(max(start, self._data_area), end)
            if split > start:
                yield Run(start, split - start, RunKind.HOST, start)
            if end > split:
                yield Run(split, end - split, RunKind.ZERO)
            return
        hole = RunKind.BACKING if self._differencing else RunKind.ZERO
        block_size = self._block_size
        allocated = self._allocated
        bat = self._bat
        covered = self._covered
        position = start
        index = bisect.bisect_left(allocated, position // block_size)
        while position < end:
            if position >= covered:
                yield Run(position, end - position, hole)
                return
            block = position // block_size
            while index < len(allocated) and allocated[index] < block:
                index += 1
            next_allocated = allocated[index] if index < len(allocated) else self._entries
            if next_allocated > block:  # a range of unallocated blocks
                stop = min(end, next_allocated * block_size)
                yield Run(position, stop - position, hole)
                position = stop
                continue
            block_start = block * block_size
            stop = min(end, block_start + block_size)
            data_offset = bat[block] * SECTOR + self._bitmap_size
            if self._differencing:
                yield from self._differencing_runs(block, block_start, position, stop, data_offset)
            else:
                yield Run(position, stop - position, RunKind.HOST, data_offset + position - block_start)
            position = stop

    def _differencing_runs(self, block: int, block_start: int, start: int, end: int, data_offset: int) -> Iterator[Run]:
        return sector_bitmap_runs(self._block_bitmap_runs(block), SECTOR, block_start, self._block_size, start, end,
                                  data_offset)

    def _block_bitmap_runs(self, block: int) -> tuple[list[int], list[int]]:
        """The sector bitmap of an allocated block as runs: (first sectors, bits), read lazily and
        kept in a small cache."""
        cached = self._bitmap_runs_cache.get(block)
        if cached is not None:
            return cached
        offset = self._bat[block] * SECTOR
        sectors = self._block_size // SECTOR
        used = (sectors + 7) // 8
        bitmap = self.host.read_at(offset, used)
        if len(bitmap) != used:
            raise CorruptImage(
                f"image is truncated: the sector bitmap of block {block} lies past the end of the file",
                path=self.path,
                offset=offset,
                structure="sector bitmap",
            )
        return self._bitmap_runs_cache.put(block, bitmap_runs(bitmap, sectors))


class BitmapRunsCache:
    """The sector bitmaps of recently read blocks as runs: at most BITMAP_CACHE_BLOCKS of them,
    shared by the threads that read one image."""

    def __init__(self) -> None:
        self._runs: dict[int, tuple[list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, block: int) -> tuple[list[int], list[int]] | None:
        return self._runs.get(block)

    def put(self, block: int, runs: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        with self._lock:
            if len(self._runs) >= BITMAP_CACHE_BLOCKS:
                self._runs.clear()
            self._runs[block] = runs
        return runs


def sector_bitmap_runs(bitmap: tuple[list[int], list[int]], sector: int, block_start: int, block_size: int,
                       start: int, end: int, data_offset: int) -> Iterator[Run]:
    """Runs of [start, end) inside a block whose data lies at ``data_offset``, split by the block's
    sector bitmap (``bitmap_runs`` output): set sectors from this file, clear ones from the parent
    (the rule of differencing VHD and VHDX alike)."""
    starts, bits = bitmap
    i = bisect.bisect_right(starts, (start - block_start) // sector) - 1
    position = start
    while position < end:
        run_end = block_start + (starts[i + 1] * sector if i + 1 < len(starts) else block_size)
        stop = min(end, run_end)
        if bits[i]:
            yield Run(position, stop - position, RunKind.HOST, data_offset + position - block_start)
        else:
            yield Run(position, stop - position, RunKind.BACKING)
        position = stop
        i += 1


class _Opener:
    """Reads the metadata of one VHD file and applies the rules of structures.py to it (the first
    finding raised); the values end up on the VhdReader."""

    def __init__(self, host: HostFile, size_rule: str) -> None:
        self.host = host
        self.path = host.name
        self.size_rule = size_rule
        self.header: DynamicHeader | None = None
        self.bat: array[int] = array("I")
        self.allocated: array[int] = array("I")
        self.locators: list[dict[str, Any]] = []
        self.parent_candidates: list[str] = []
        self.data_area = 0
        self.facts: dict[str, Any] = {}

    def corrupt(self, message: str, offset: int | None, structure: str) -> CorruptImage:
        return CorruptImage(message, path=self.path, offset=offset, structure=structure)

    def refuse(self, findings: list[Finding]) -> None:
        """Raise the first finding that is not a warning."""
        for finding in findings:
            if finding.kind != "warning":
                raise self.corrupt(finding.message, finding.offset, finding.structure)

    def parse(self) -> None:
        self._read_footer()
        footer = self.footer
        self.virtual_size, self.size_source = choose_size(footer, self.size_rule)
        self.refuse(footer_findings(footer, self.footer_offset, self.choice.data_end, self.virtual_size))
        if footer.disk_type == DISK_FIXED:
            self.data_area = self.choice.data_end
        else:
            self._read_dynamic_header()
            self._read_bat()
            if footer.disk_type == DISK_DIFFERENCING:
                self._read_locators()
        self._collect_facts()

    # footer -------------------------------------------------------------------------------------

    def _read_footer(self) -> None:
        size = self.host.size
        tail_length = min(FOOTER_SIZE, size)
        tail = self.host.read_at(size - tail_length, tail_length)
        head = self.host.read_at(0, FOOTER_SIZE) if size >= 2 * FOOTER_SIZE else b""
        choice = choose_footer(head, tail, size)
        if choice.footer is None:
            assert choice.problem is not None
            raise self.corrupt(choice.problem, choice.problem_offset, "footer")
        self.choice = choice
        self.footer = choice.footer
        self.footer_source = choice.source
        self.footer_offset = choice.offset
        self.footer_length = choice.length
        self.tail_problem = choice.tail_problem
        self.head_copy_problem = choice.head_copy_problem

    # dynamic header and BAT ----------------------------------------------------------------------

    def _read_dynamic_header(self) -> None:
        footer = self.footer
        place = header_place_finding(footer, self.footer_offset, self.host.size)
        if place is not None:
            self.refuse([place])
        offset = footer.data_offset
        raw = self.host.read_at(offset, DYNAMIC_HEADER_SIZE)
        self.refuse(dynamic_header_findings(raw, offset, footer, self.virtual_size, self.host.size))
        self.header = parse_dynamic_header(raw)

    def _read_bat(self) -> None:
        header = self.header
        assert header is not None
        # Only the entries the disk needs are read: a bigger table is allowed (blktap reserves room to grow)
        used_entries = min(header.max_table_entries, -(-self.virtual_size // header.block_size))
        table = header.table_offset
        raw = self.host.read_at(table, used_entries * 4)
        if len(raw) != used_entries * 4:
            raise self.corrupt("the table lies past the end of the file", table, "block allocation table")
        self.bat = parse_bat(raw)
        self.allocated = allocated_indices(raw)
        if self.allocated:
            regions = metadata_regions(header, self.footer.data_offset, self.footer.disk_type == DISK_DIFFERENCING)
            self.refuse(block_findings(self.bat, header, self.virtual_size, regions, self.choice.data_end, limit=1))

    # parent locators ---------------------------------------------------------------------------

    def _read_locators(self) -> None:
        header = self.header
        assert header is not None
        self.refuse(locator_findings(header, self.footer.data_offset, self.host.size))
        relative: list[str] = []
        absolute: list[str] = []
        for locator in header.parent_locators:
            if not locator.used:
                continue
            entry: dict[str, Any] = {
                "platform_code": fourcc_text(locator.platform_code),
                "data_space": locator.data_space,
                "data_length": locator.data_length,
                "data_offset": locator.data_offset,
            }
            self.locators.append(entry)
            if locator.platform_code not in RELATIVE_PLATFORMS + ABSOLUTE_PLATFORMS:
                entry["path"] = None
                continue
            data = self.host.read_at(locator.data_offset, locator.read_length)
            try:
                recorded = decode_locator_path(locator.platform_code, data)
            except UnicodeDecodeError:
                entry["path"] = None
                entry["problem"] = "undecodable path"
                continue
            entry["path"] = recorded
            if recorded:
                target = relative if locator.platform_code in RELATIVE_PLATFORMS else absolute
                target.append(host_path(recorded, locator.platform_code))
        name = header.parent_name
        names = []
        if name:
            converted = host_path(name, b"W2ku" if re.match(r"^([A-Za-z]:|\\\\)", name) else b"W2ru")
            names.append(converted)
            base = posixpath.basename(converted)
            if base and base != converted:
                names.append(base)
        candidates: list[str] = []
        for candidate in relative + absolute + names:
            if candidate and candidate not in candidates:
                candidates.append(candidate)
        self.parent_candidates = candidates

    # facts -------------------------------------------------------------------------------------

    def _collect_facts(self) -> None:
        footer = self.footer
        facts: dict[str, Any] = {
            "disk_type": footer.disk_type_name,
            "current_size": footer.current_size,
            "original_size": footer.original_size,
            "chs_size": footer.chs_size,
            "geometry": {
                "cylinders": footer.cylinders,
                "heads": footer.heads,
                "sectors_per_track": footer.sectors_per_track,
            },
            "size_source": self.size_source,
            "creator_app": fourcc_text(footer.creator_app),
            "creator_version": version_text(footer.creator_version),
            "creator_host_os": fourcc_text(footer.creator_host_os),
            "unique_id": str(footer.unique_id),
            "timestamp": vhd_timestamp_iso(footer.timestamp),
            "saved_state": bool(footer.saved_state),
            "features_flags": footer.features,
            "format_version": version_text(footer.format_version),
            "footer_source": self.footer_source,
            "footer_length": self.footer_length,
            "footer_checksum": f"0x{footer.checksum:08x}",
            "footer_checksum_valid": True,
            "tail_footer_problem": self.tail_problem,
        }
        if footer.disk_type != DISK_FIXED:
            facts["head_copy_problem"] = self.head_copy_problem
            if self.footer_source == "tail" and self.head_copy_problem is None:
                facts["footer_copy_matches"] = self.choice.copy_matches
        else:
            facts["data_area"] = self.data_area
        header = self.header
        if header is not None:
            facts.update(
                {
                    "header_offset": footer.data_offset,
                    "header_version": version_text(header.header_version),
                    "header_checksum": f"0x{header.checksum:08x}",
                    "header_checksum_valid": True,
                    "block_size": header.block_size,
                    "max_table_entries": header.max_table_entries,
                    "table_offset": header.table_offset,
                    "table_entries_used": len(self.bat),
                    "allocated_blocks": len(self.allocated),
                    "sector_bitmap_honoured": footer.disk_type == DISK_DIFFERENCING,
                }
            )
            if footer.disk_type == DISK_DIFFERENCING:
                facts.update(
                    {
                        "parent_unique_id": str(header.parent_unique_id),
                        "parent_timestamp": vhd_timestamp_iso(header.parent_timestamp),
                        "parent_name": header.parent_name,
                    }
                )
        self.facts = facts
