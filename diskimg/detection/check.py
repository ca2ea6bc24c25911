"""Structural checks of an image file, like ``qemu-img check``: ``check(path) -> CheckResult``.

qcow2: every reference of every host cluster counted and compared with the stored refcounts, as
``qemu-img check`` does (``formats/qcow2/check.py``).

VHD (which qemu-img cannot check): the footer and its copy at offset 0, their checksums, the
dynamic header's checksum, the BAT inside the file, every allocated block inside the file,
no block used twice, no block overlapping another or the metadata.

VDI: the rules of ``formats/vdi/structures.py`` over the header and the whole block map, and the
header's allocated count (``formats/vdi/check.py``).

RAW has no metadata: it is always clean.

Only metadata is read (tables, refcount blocks), never guest data. The structures are parsed with
the pure functions of each format (``formats/qcow2/structures.py``, ``vhd.py``: footer, dynamic
header); this module only counts and compares.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .probe import check_forced, detect
from ..errors import DiskImageError, UnsupportedFormat
from ..formats import canonical_format
from ..formats import vhd as v
from ..formats.qcow2.check import check_qcow2
from ..formats.vdi.check import check_vdi
from ..formats.vmdk.check import check_vmdk
from ..host.files import HostFile
from .image import source_name

#: problems kept in a result (the counts go on)
MAX_PROBLEMS = 200


@dataclass
class CheckProblem:
    """One thing found wrong. ``kind``: corruption, leak, truncated, warning or error (the check
    itself could not go on)."""

    kind: str
    message: str
    offset: int | None = None
    structure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.offset is not None:
            entry["offset"] = self.offset
        if self.structure is not None:
            entry["structure"] = self.structure
        return entry


@dataclass
class CheckResult:
    """What ``check`` found. ``clean`` means nothing but warnings."""

    filename: str
    format: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    warnings: int = 0
    truncated: bool = False
    #: header flags that say the image needs attention ("dirty", "corrupt")
    flags: list[str] = field(default_factory=list)
    problems: list[CheckProblem] = field(default_factory=list)
    problems_omitted: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    #: guest offset of the first compressed cluster (qcow2, active layer)
    first_compressed_offset: int | None = None
    leaked_clusters: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors or self.truncated or self.flags)

    def add(self, kind: str, message: str, offset: int | None = None, structure: str | None = None,
            times: int = 1) -> None:
        """Record a problem; ``times``: how often it counts (a table referenced that many times)."""
        if kind == "corruption":
            self.corruptions += times
        elif kind == "leak":
            self.leaks += times
        elif kind == "error":
            self.check_errors += times
        elif kind == "warning":
            self.warnings += 1
        elif kind == "truncated":
            self.truncated = True
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(CheckProblem(kind, message, offset, structure))
        else:
            self.problems_omitted += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "format": self.format,
            "clean": self.clean,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "check_errors": self.check_errors,
            "warnings": self.warnings,
            "truncated": self.truncated,
            "flags": list(self.flags),
            "image_end_offset": self.image_end_offset,
            "total_clusters": self.total_clusters,
            "allocated_clusters": self.allocated_clusters,
            "fragmented_clusters": self.fragmented_clusters,
            "compressed_clusters": self.compressed_clusters,
            "first_compressed_offset": self.first_compressed_offset,
            "problems": [p.to_dict() for p in self.problems],
            "problems_omitted": self.problems_omitted,
        }

    def render_text(self) -> str:
        lines = []
        for problem in self.problems:
            where = ""
            if problem.structure or problem.offset is not None:
                parts = [p for p in (problem.structure, None if problem.offset is None else f"offset {problem.offset}") if p]
                where = f" ({', '.join(parts)})"
            lines.append(f"{problem.kind.upper()}: {problem.message}{where}")
        if self.problems_omitted:
            lines.append(f"... and {self.problems_omitted} more problems")
        if self.clean:
            lines.append("No errors were found on the image.")
        else:
            summary = []
            if self.corruptions:
                summary.append(f"{self.corruptions} errors were found on the image (corruptions)")
            if self.leaks:
                summary.append(f"{self.leaks} leaked clusters were found on the image")
            if self.truncated:
                summary.append("the image is truncated")
            if self.check_errors:
                summary.append(f"{self.check_errors} internal errors occurred during the check")
            if self.flags:
                summary.append(f"header flags set: {', '.join(self.flags)}")
            lines.append("; ".join(summary) + ".")
        if self.allocated_clusters is not None and self.total_clusters:
            share = 100.0 * self.allocated_clusters / self.total_clusters
            lines.append(f"{self.allocated_clusters}/{self.total_clusters} = {share:.2f}% allocated"
                         + (f", {self.compressed_clusters} compressed" if self.compressed_clusters else ""))
        if self.image_end_offset is not None:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)


def check(source: str | os.PathLike[str] | BinaryIO, format: str | None = None) -> CheckResult:
    """Check the structure of a RAW, VHD, VHDX or qcow2 image (``format`` forces one).

    Problems in the image are in the result; DiskImageError is raised only when the file cannot
    be opened (ImageNotFound), is not one of the three formats or uses a feature diskimg does not
    take (UnsupportedFormat), or contradicts the forced format (FormatMismatch, as ``open_image``).
    """
    detection = detect(source)
    name = canonical_format(format) if format else detection.format
    unread_vmdk = name == "vmdk" and not format and not detection.readable  # seSparse, COWD, a lone extent
    if format:
        check_forced(detection, name, source_name(source))
    if name not in ("raw", "vhd", "qcow2", "vmdk", "vhdx", "vdi") or unread_vmdk:
        raise UnsupportedFormat(
            f"{detection.description}: diskimg checks VHD, VHDX, qcow2, VMDK, VDI and RAW images",
            path=source_name(source), format=detection.format, hint=detection.hint,
        )
    host = HostFile(source)
    try:
        result = CheckResult(filename=host.name, format=name)
        try:
            if name == "qcow2":
                check_qcow2(host, result)
            elif name == "vhd":
                _VhdCheck(host, result).run()
            elif name == "vdi":
                check_vdi(host, result)
            elif name == "vhdx":
                from ..formats.vhdx.check import check_vhdx

                check_vhdx(host, result)
            elif name == "vmdk":
                counts = check_vmdk(host, result.add)
                result.total_clusters = counts.total_grains
                result.allocated_clusters = counts.allocated_grains
                result.compressed_clusters = counts.compressed_grains
                result.image_end_offset = host.size
            else:
                result.image_end_offset = host.size
        except UnsupportedFormat as exc:
            exc.path = exc.path or host.name
            raise
        except DiskImageError as exc:
            result.add("error", f"the check could not go on: {exc.message if hasattr(exc, 'message') else exc}",
                       getattr(exc, "offset", None), getattr(exc, "structure", None))
        except (struct.error, ValueError, IndexError, OverflowError, MemoryError) as exc:
            result.add("error", f"malformed metadata: {exc}")
        return result
    finally:
        host.close()


# -- VHD ----------------------------------------------------------------------------------------------


class _VhdCheck:
    def __init__(self, host: HostFile, result: CheckResult) -> None:
        self.host = host
        self.result = result
        self.size = host.size

    def run(self) -> None:
        result = self.result
        size = self.size
        if size < v.FOOTER_SIZE:
            result.add("truncated", f"a file of {size} bytes cannot hold a VHD footer", 0, "footer")
            return
        tail = self.host.pread(v.FOOTER_SIZE, size - v.FOOTER_SIZE)
        head = self.host.pread(v.FOOTER_SIZE, 0) if size >= 2 * v.FOOTER_SIZE else b""
        tail_problem = v.footer_problem(tail)
        head_problem = v.footer_problem(head) if head[:8] == v.FOOTER_COOKIE else "absent"
        footer_end = size - v.FOOTER_SIZE
        if tail_problem is not None:
            old = self.host.pread(v.OLD_FOOTER_SIZE, size - v.OLD_FOOTER_SIZE)
            if v.footer_problem(old) is None:
                tail, tail_problem, footer_end = old + b"\0", None, size - v.OLD_FOOTER_SIZE
        if tail_problem is None:
            footer = v.parse_footer(tail)
        elif head_problem is None and v.parse_footer(head).disk_type in (v.DISK_DYNAMIC, v.DISK_DIFFERENCING):
            footer = v.parse_footer(head)
            kind = "truncated" if tail[:8] != v.FOOTER_COOKIE else "corruption"
            result.add(kind, f"the footer at the end of the file is {'missing' if kind == 'truncated' else 'damaged'}"
                       f" ({tail_problem}); the copy at offset 0 is intact", size - v.FOOTER_SIZE, "footer")
            footer_end = size
        else:
            result.add("corruption", f"no valid footer: {tail_problem}"
                       + (f"; copy at offset 0: {head_problem}" if head_problem != "absent" else ""),
                       size - v.FOOTER_SIZE, "footer")
            return
        self.footer = footer
        self.footer_end = footer_end
        if footer.disk_type == v.DISK_FIXED:
            data = footer_end
            if data < footer.current_size:
                result.add("truncated", f"the fixed disk holds {data} bytes of data but its footer says "
                           f"{footer.current_size}", footer_end, "fixed disk data")
            result.image_end_offset = size
            return
        if footer.disk_type not in (v.DISK_DYNAMIC, v.DISK_DIFFERENCING):
            result.add("corruption", f"disk type {footer.disk_type} is not fixed, dynamic or differencing",
                       footer_end + 60, "footer")
            return
        if head_problem == "absent":
            result.add("corruption", "the copy of the footer at offset 0 is missing", 0, "footer copy")
        elif head_problem is not None:
            result.add("corruption", f"the copy of the footer at offset 0 is damaged: {head_problem}", 0,
                       "footer copy")
        elif tail_problem is None and head != tail:
            result.add("warning", "the copy of the footer at offset 0 differs from the footer at the end", 0,
                       "footer copy")
        self.check_dynamic(footer)

    def check_dynamic(self, footer: v.VhdFooter) -> None:
        result = self.result
        size = self.size
        offset = footer.data_offset
        if offset == v.NO_DATA_OFFSET or offset + v.DYNAMIC_HEADER_SIZE > size:
            result.add("truncated" if offset < size + (1 << 40) else "corruption",
                       f"the dynamic header at offset {offset} lies outside the file", 16, "footer")
            return
        raw = self.host.pread(v.DYNAMIC_HEADER_SIZE, offset)
        header = v.parse_dynamic_header(raw)
        if header.cookie != v.DYNAMIC_COOKIE:
            result.add("corruption", "the dynamic header has no 'cxsparse' cookie", offset, "dynamic header")
            return
        problem = v.dynamic_header_problem(raw)
        if problem is not None:  # the cookie is there: the checksum
            result.add("corruption", problem, offset + v.DYNAMIC_HEADER_CHECKSUM_OFFSET, "dynamic header")
        block = header.block_size
        if block < v.SECTOR or block > v.MAX_BLOCK_SIZE or block & (block - 1):
            result.add("corruption", f"block size {block} is not a power of two between 512 and 256 MiB",
                       offset + 32, "dynamic header")
            return
        virtual = max(footer.current_size, 0)
        needed = -(-virtual // block)
        entries = header.max_table_entries
        if entries < needed:
            result.add("corruption", f"max_table_entries {entries} covers less than the disk's {virtual} bytes",
                       offset + 28, "dynamic header")
        table = header.table_offset
        table_bytes = entries * 4
        if table_bytes > v.MAX_BAT_BYTES:
            result.add("corruption", f"a BAT of {entries} entries is too large", offset + 28, "dynamic header")
            return
        if table + table_bytes > size:
            result.add("truncated", f"the BAT ({table_bytes} bytes at offset {table}) lies past the end of the file",
                       table, "block allocation table")
            return
        bat = v.parse_bat(self.host.pread(table_bytes, table))
        span = v.bitmap_size(block) + block
        result.total_clusters = needed
        allocated = [(bat[i] * v.SECTOR, i) for i in range(len(bat)) if bat[i] != v.UNALLOCATED]
        result.allocated_clusters = len(allocated)
        allocated.sort()
        metadata = [(0, v.FOOTER_SIZE, "footer copy"), (offset, v.DYNAMIC_HEADER_SIZE, "dynamic header"),
                    (table, table_bytes, "block allocation table")]
        for locator_index, locator in enumerate(header.parent_locators if footer.disk_type == v.DISK_DIFFERENCING
                                                else []):
            if locator.used and locator.data_space:
                length = locator.data_space if locator.data_space >= v.SECTOR else locator.data_space * v.SECTOR
                if locator.data_offset + length > size:
                    result.add("corruption", f"parent locator {locator_index} lies past the end of the file",
                               offset + 576 + 24 * locator_index, "parent locator")
                metadata.append((locator.data_offset, length, f"parent locator {locator_index}"))
        end_of_data = self.footer_end
        previous: tuple[int, int] | None = None
        highest_end = max(start + length for start, length, _ in metadata)
        for start, index in allocated:
            if index >= needed:
                result.add("warning", f"block {index} lies past the end of the disk and is allocated", table + 4 * index,
                           "block allocation table")
            end = start + span
            if previous is not None and start < previous[0] + span:
                same = start == previous[0]
                result.add("corruption", f"blocks {previous[1]} and {index} "
                           + ("point at the same sector" if same else "overlap"), table + 4 * index,
                           "block allocation table")
            for meta_start, meta_length, name in metadata:
                if start < meta_start + meta_length and meta_start < end:
                    result.add("corruption", f"block {index} at offset {start} overlaps the {name}",
                               table + 4 * index, "block allocation table")
            if end > end_of_data:
                data_needed = start + v.bitmap_size(block) + min(block, max(0, virtual - index * block))
                if data_needed > end_of_data:
                    result.add("truncated", f"block {index} at offset {start} ends at {end}, past the data area "
                               f"({end_of_data} bytes): the image is truncated", table + 4 * index, "data block")
            previous = (start, index)
            highest_end = max(highest_end, end)
        result.image_end_offset = highest_end + v.FOOTER_SIZE
