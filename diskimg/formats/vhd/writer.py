"""VHD writing: :class:`VhdWriter` (``-O vhd``, options ``subformat``, ``block_size``, ``force_size``).

* Size: the virtual size is kept exactly, rounded up to whole 512-byte sectors (the converter
  passes the source's size, already rounded up by ``--align`` if given; Azure wants a multiple of
  1 MiB). ``current_size`` and ``original_size`` both hold it. qemu-img instead rounds the size up
  to a CHS-representable one unless ``-o force_size`` is given; diskimg behaves as qemu's
  ``force_size=on`` always, so ``force_size=on`` is accepted (for command lines written for
  qemu-img) and ``force_size=off`` is refused rather than silently ignored.
* Geometry: the specification's CHS when C*H*S*512 equals the size exactly, otherwise the maximum
  65535/16/255. Readers that take the size from the geometry see the exact size in the first case,
  and every reader that sees the saturated geometry takes ``current_size`` (qemu 7.2 included,
  whatever the creator; qemu >= 10 takes current_size for every creator but ``vpc ``/``qemu``;
  Hyper-V, Azure and VirtualBox always do). So all of them read exactly the size written.
* Creator application ``dimg`` (diskimg), version = diskimg's major.minor, host OS ``Wi2k``, a
  fresh random unique id, timestamp = now; features 0x2, format version 1.0, saved state 0.
* Limits: a dynamic VHD holds at most 2040 GiB (0xFF000000 sectors: qemu's and Hyper-V's limit;
  the BAT's 32-bit sector offsets cannot reach much further). A fixed VHD may be up to 32 TiB, the
  largest disk Azure takes as an upload (20 MiB + 512 ... 32 TiB + 512 bytes); note that qemu-img
  (every version) and Hyper-V refuse to open VHDs above 2040 GiB, so such a file is for Azure.
* fixed: the guest bytes (holes where no data comes), then the footer: one forward pass, the same
  for pipes and files.
* dynamic: footer copy at 0, dynamic header at 512 (data_offset all ones, table at 1536), the BAT
  (padded to 512 bytes with 0xFFFFFFFF), the blocks in guest order (an all-ones sector bitmap, then
  the block's data; a partly written block keeps holes), and the footer at the end. Blocks are
  always ``block_size`` long in the file, the last one included. On a streaming target (a pipe,
  or while the output is hashed) the exact plan decides which blocks exist (a block is allocated
  when a planned DATA extent overlaps it) and the BAT is written before them; on a seekable file
  only blocks that receive non-zero data are allocated, and the BAT is written last into the
  space left for it.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from array import array
from collections.abc import Iterable, Mapping

from ...errors import OutputError, UsageError
from ...units import format_size, parse_size
from ..reader import Extent
from ..writer import DiskWriter, OutputTarget, planned_blocks
from .structures import (
    DISK_DYNAMIC,
    DISK_FIXED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_SIZE,
    MAX_BLOCK_SIZE,
    MAX_GEOMETRY,
    NAME,
    NO_DATA_OFFSET,
    SECTOR,
    UNALLOCATED,
    DynamicHeader,
    VhdFooter,
    bitmap_size,
    chs_geometry,
)

WRITER_CREATOR_APP = b"dimg"
WRITER_HOST_OS = b"Wi2k"
#: the largest dynamic VHD: 0xFF000000 sectors (qemu's VHD_MAX_SECTORS; Hyper-V's 2040 GB)
MAX_DYNAMIC_SIZE = 0xFF000000 * SECTOR
#: the largest fixed VHD: Azure's upload limit (qemu and Hyper-V stop at 2040 GiB)
MAX_FIXED_SIZE = 32 << 40
DEFAULT_BLOCK_SIZE = 2 << 20
MIN_WRITER_BLOCK_SIZE = 512 << 10
TABLE_OFFSET = FOOTER_SIZE + DYNAMIC_HEADER_SIZE  # 1536: footer copy, then the header, then the BAT
_UNIX_AT_VHD_EPOCH = 946684800
_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")


def writer_geometry(total_sectors: int) -> tuple[int, int, int]:
    """The geometry diskimg writes: the specification's CHS when it describes exactly
    ``total_sectors``, else the saturated 65535/16/255 (readers then take current_size)."""
    cylinders, heads, sectors_per_track = chs_geometry(total_sectors)
    if cylinders * heads * sectors_per_track == total_sectors:
        return cylinders, heads, sectors_per_track
    return MAX_GEOMETRY


def _writer_settings(options: Mapping[str, str]) -> tuple[str, int]:
    """(subformat, block_size) from the ``-o`` options, or a UsageError naming the bad value."""
    subformat = str(options.get("subformat", "dynamic")).lower()
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"vhd subformat must be 'dynamic' or 'fixed', not {options['subformat']!r}")
    force = options.get("force_size")
    if force is not None:
        value = str(force).lower()
        if value in _FALSE:
            raise UsageError(
                "vhd force_size=off (qemu's rounding of the size up to a CHS geometry) is not supported: diskimg "
                "always stores the exact size (pick the size with --align)"
            )
        if value not in _TRUE:
            raise UsageError(f"vhd force_size takes on or off, not {force!r}")
    block_size = DEFAULT_BLOCK_SIZE
    if "block_size" in options:
        if subformat != "dynamic":
            raise UsageError("vhd block_size applies to subformat=dynamic only")
        text = str(options["block_size"])
        block_size = parse_size(text)
        if block_size & (block_size - 1) or not MIN_WRITER_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise UsageError(f"vhd block_size must be a power of two from 512K to 256M, not {text!r}")
    return subformat, block_size


def _writer_disk_size(virtual_size: int, subformat: str, path: str | None = None) -> int:
    """The size written: ``virtual_size`` rounded up to 512, checked against the subformat's limit
    (an error names ``path``, the file being written)."""
    if virtual_size < 0:
        raise UsageError(f"invalid virtual size {virtual_size}", path=path)
    size = -(-virtual_size // SECTOR) * SECTOR
    if subformat == "dynamic" and size > MAX_DYNAMIC_SIZE:
        raise UsageError(
            f"a dynamic VHD holds at most 2040 GiB ({MAX_DYNAMIC_SIZE} bytes, the limit of qemu and Hyper-V); this "
            f"disk is {format_size(size)} ({size} bytes): use -o subformat=fixed (up to 32 TiB, for Azure) or qcow2",
            path=path,
        )
    if subformat == "fixed" and size > MAX_FIXED_SIZE:
        raise UsageError(
            f"a fixed VHD holds at most 32 TiB ({MAX_FIXED_SIZE} bytes, the largest disk Azure accepts); this disk "
            f"is {format_size(size)} ({size} bytes): use qcow2",
            path=path,
        )
    return size


def _creator_version() -> int:
    from ...version import __version__

    parts = [int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", __version__)[:2]] + [0, 0]
    return (min(parts[0], 0xFFFF) << 16) | min(parts[1], 0xFFFF)


class VhdWriter(DiskWriter):
    """Writes fixed or dynamic VHDs in one forward pass (see the module docstring for the layout,
    sizes, geometry and limits)."""

    format = NAME
    OPTIONS: Mapping[str, str] = {
        "subformat": "dynamic (default) or fixed (Azure takes fixed VHDs only)",
        "block_size": "dynamic block size: a power of two from 512K to 256M (default 2M, as Hyper-V and qemu)",
        "force_size": "accepted for qemu-img command lines (on): diskimg always stores the exact size",
    }

    def __init__(self, target: OutputTarget, virtual_size: int, options: Mapping[str, str], compress: bool) -> None:
        super().__init__(target, virtual_size, options, compress)
        self.subformat, self.block_size = _writer_settings(self.options)
        self.disk_size = _writer_disk_size(virtual_size, self.subformat, target.name)
        self.dynamic = self.subformat == "dynamic"
        cylinders, heads, sectors_per_track = writer_geometry(self.disk_size // SECTOR)
        self.footer = VhdFooter(
            data_offset=FOOTER_SIZE if self.dynamic else NO_DATA_OFFSET,
            timestamp=max(0, min(int(time.time()) - _UNIX_AT_VHD_EPOCH, 0xFFFFFFFF)),
            creator_app=WRITER_CREATOR_APP,
            creator_version=_creator_version(),
            creator_host_os=WRITER_HOST_OS,
            original_size=self.disk_size,
            current_size=self.disk_size,
            cylinders=cylinders,
            heads=heads,
            sectors_per_track=sectors_per_track,
            disk_type=DISK_DYNAMIC if self.dynamic else DISK_FIXED,
            unique_id=uuid.uuid4(),
        )
        self._footer = self.footer.pack()
        self._started = False
        if self.dynamic:
            bs = self.block_size
            self.entries = -(-self.disk_size // bs)
            self.table_bytes = -(-self.entries * 4 // SECTOR) * SECTOR
            self.data_start = TABLE_OFFSET + self.table_bytes
            self._bitmap = b"\xff" * bitmap_size(bs)
            self._span = len(self._bitmap) + bs  # bytes one block takes in the file
            self.header = DynamicHeader(table_offset=TABLE_OFFSET, max_table_entries=self.entries, block_size=bs)
            self.bat = array("I", [UNALLOCATED]) * self.entries
            assert self.bat.itemsize == 4
            self._planned: bytearray | None = None
            self._current = -1  # the block being written
            self._next_free = self.data_start  # file offset of the next block (seekable mode)

    # -- sizes -----------------------------------------------------------------------------------

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        """The exact size of the output file for this plan (on a seekable file, where only blocks
        that receive non-zero data are allocated, an upper bound)."""
        options = dict(options or {})
        cls.check_options(options)
        subformat, block_size = _writer_settings(options)
        size = _writer_disk_size(virtual_size, subformat)
        if subformat == "fixed":
            return size + FOOTER_SIZE
        entries = -(-size // block_size)
        blocks = planned_blocks(extents, block_size, entries).count(1)
        table_bytes = -(-entries * 4 // SECTOR) * SECTOR
        return TABLE_OFFSET + table_bytes + blocks * (bitmap_size(block_size) + block_size) + FOOTER_SIZE

    @property
    def requires_exact_plan(self) -> bool:
        return self.dynamic and self.target.streaming

    @property
    def concurrent_writes(self) -> bool:
        """On a file (not streaming) data is written at computed offsets, from several threads: a fixed
        VHD is the disk at its own offsets; a dynamic VHD's blocks are allocated by ``reserve``, which
        the converter calls for every range before writing it, in offset order and one call at a
        time (the DiskWriter contract). No lock is needed: the writing threads only read BAT entries
        that ``reserve`` set before their data was handed to them."""
        return not self.target.streaming

    # -- the stream ------------------------------------------------------------------------------

    def plan(self, extents: Iterable[Extent]) -> None:
        if self.dynamic and self.target.streaming:
            planned = planned_blocks(extents, self.block_size, self.entries)
            span_sectors = self._span // SECTOR
            sector = self.data_start // SECTOR
            for run in re.finditer(rb"\x01+", planned):
                first, last = run.span()
                self.bat[first:last] = array("I", range(sector, sector + (last - first) * span_sectors, span_sectors))
                sector += (last - first) * span_sectors
            self._planned = planned
        else:
            for _ in extents:  # the plan is only an upper bound here; consumed for the caller's count
                pass
        self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.dynamic:
            return
        target = self.target
        if target.streaming and self._planned is None:
            self._planned = bytearray(self.entries)  # no plan given: nothing may be allocated
        target.write(self._footer)
        target.write(self.header.pack())
        if target.streaming:
            target.write(self._table())
        else:
            target.skip(self.table_bytes)  # filled in by finish()

    def _table(self) -> bytes:
        table = array("I", self.bat)
        if sys.byteorder == "little":
            table.byteswap()
        raw = table.tobytes()
        return raw + b"\xff" * (self.table_bytes - len(raw))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.disk_size)
        end = offset + len(view)
        if not view:
            return
        target = self.target
        if self.concurrent_writes:
            self._write_at_offsets(offset, view)
            return
        self._start()
        self._written_to = end
        if not self.dynamic:
            target.skip(offset - target.position)
            target.write(view)
            return
        bs = self.block_size
        position = offset
        while position < end:
            block = position // bs
            piece_end = min(end, (block + 1) * bs)
            if block != self._current:
                self._enter(block, position)
            target.skip(self.bat[block] * SECTOR + len(self._bitmap) + (position - block * bs) - target.position)
            target.write(view[position - offset : piece_end - offset])
            position = piece_end

    def reserve(self, offset: int, length: int) -> None:
        """Allocate the blocks [offset, offset + length) touches, in the order data arrives (which
        the converter keeps to guest order), each with its bitmap. Never called concurrently (see
        ``concurrent_writes``), so the allocation needs no lock."""
        if not self.dynamic or not length:
            return
        bs = self.block_size
        for block in range(offset // bs, (offset + length - 1) // bs + 1):
            if self.bat[block] == UNALLOCATED:
                self.bat[block] = self._next_free // SECTOR
                self._next_free += self._span
                self.target.pwrite(self._bitmap, self.bat[block] * SECTOR)

    def _write_at_offsets(self, offset: int, view: memoryview) -> None:
        """Positional writes (``concurrent_writes``) into blocks that ``reserve`` allocated. A block
        nobody reserved is allocated here: right only for a caller writing from one thread (the
        converter always reserves first)."""
        if not self.dynamic:
            self.target.pwrite(view, offset)
            return
        bs = self.block_size
        position, end = offset, offset + len(view)
        while position < end:
            block = position // bs
            piece_end = min(end, (block + 1) * bs)
            if self.bat[block] == UNALLOCATED:
                self.reserve(position, piece_end - position)
            host = self.bat[block] * SECTOR + len(self._bitmap) + position - block * bs
            self.target.pwrite(view[position - offset : piece_end - offset], host)
            position = piece_end

    def _enter(self, block: int, position: int) -> None:
        """Close the block being written and start ``block`` (its bitmap written)."""
        target = self.target
        self._close_block()
        if self._planned is not None:
            if not self._planned[block]:
                raise OutputError(
                    f"vhd writer: data at guest offset {position} lies in block {block}, which the plan left "
                    "unallocated (the source changed during the conversion?)",
                    path=target.name,
                )
            self._emit_planned(self._current + 1, block)
        else:
            self.bat[block] = self._next_free // SECTOR
            self._next_free += self._span
        if target.position != self.bat[block] * SECTOR:
            raise AssertionError(f"vhd writer: block {block} at {target.position}, expected {self.bat[block] * SECTOR}")
        target.write(self._bitmap)
        self._current = block

    def _close_block(self) -> None:
        if self._current >= 0:
            self.target.skip(self.bat[self._current] * SECTOR + self._span - self.target.position)

    def _emit_planned(self, start: int, stop: int) -> None:
        """Write the planned blocks in [start, stop) that received no data: bitmap, then zeros."""
        assert self._planned is not None
        target = self.target
        block = self._planned.find(1, start, stop)
        while block >= 0:
            target.write(self._bitmap)
            target.skip(self.block_size)
            block = self._planned.find(1, block + 1, stop)

    def finish(self) -> None:
        self._start()
        target = self.target
        if self.concurrent_writes:
            end = self._next_free if self.dynamic else self.disk_size
            if self.dynamic:
                target.pwrite(self._table(), TABLE_OFFSET)
            target.pwrite(self._footer, end)
            target.finish(end + len(self._footer))
            return
        if not self.dynamic:
            target.skip(self.disk_size - target.position)
        else:
            self._close_block()
            if self._planned is not None:
                self._emit_planned(self._current + 1, self.entries)
            else:
                target.pwrite(self._table(), TABLE_OFFSET)
        target.write(self._footer)
        target.finish()
