"""The VHDX writer: dynamic and fixed disks, to a file or, forward only, to a pipe.

Layout (every region 1 MiB-aligned, as Hyper-V and qemu lay them out): the file identifier, two
headers (sequence numbers 1 and 2, an empty log: log GUID zero) and two identical region tables in
the first MiB; the log (``log_size``, zeros) at 1 MiB; the metadata region (1 MiB: the table, then
file parameters, virtual disk size, page 83 data, 512-byte logical and 4096-byte physical
sectors); the BAT (rounded up to whole MiB); then the payload blocks in guest order.

* fixed (``subformat=fixed``): every block fully present, block ``i`` at ``data_start + i *
  block_size``, holes where no data comes; "leave blocks allocated" set.
* dynamic: a block is allocated (fully present) when it receives data; other blocks are in the
  *zero* state with ``block_state_zero=on`` (the default, as qemu) or *not present* with ``off``
  (both read as zeros). On a streaming target (a pipe, or while the output is hashed) the exact
  plan decides which blocks exist and the BAT is written before them; on a seekable file blocks
  are allocated as data arrives (``reserve``) and the BAT is written last into its room.
* The virtual size is rounded up to whole 512-byte sectors and may be at most 64 TiB.
"""

from __future__ import annotations

import re
import threading
import uuid
from array import array
from collections.abc import Iterable, Mapping

from ...errors import OutputError, UsageError
from ...units import parse_size
from ...version import __version__
from ..reader import Extent, ExtentKind
from ..writer import DiskWriter, OutputTarget, option_flag
from . import structures as s

NAME = "vhdx"
DEFAULT_BLOCK_SIZE = 32 * s.MIB  # Hyper-V's default
DEFAULT_LOG_SIZE = 1 * s.MIB
METADATA_REGION_SIZE = 1 * s.MIB
LOGICAL_SECTOR = 512
PHYSICAL_SECTOR = 4096


class VhdxLayoutPlan:
    """Where everything goes for one set of options and virtual size (shared by measure and write)."""

    def __init__(self, virtual_size: int, options: Mapping[str, str], path: str | None = None) -> None:
        self.subformat = str(options.get("subformat", "dynamic")).lower()
        if self.subformat not in ("dynamic", "fixed"):
            raise UsageError(f"vhdx subformat must be 'dynamic' or 'fixed', not {options['subformat']!r}")
        self.block_size = _size_option(options, "block_size", DEFAULT_BLOCK_SIZE, s.MIN_BLOCK_SIZE, s.MAX_BLOCK_SIZE)
        if self.block_size & (self.block_size - 1):
            raise UsageError(f"vhdx block_size must be a power of two from 1M to 256M, not {options['block_size']!r}")
        self.log_size = _size_option(options, "log_size", DEFAULT_LOG_SIZE, s.MIB, s.MAX_LOG_LENGTH)
        if self.log_size % s.MIB:
            raise UsageError(f"vhdx log_size must be a multiple of 1M, not {options['log_size']!r}")
        self.block_state_zero = option_flag(options, "block_state_zero", NAME, default=True)
        if virtual_size < 0:
            raise UsageError(f"invalid virtual size {virtual_size}", path=path)
        self.disk_size = max(LOGICAL_SECTOR, -(-virtual_size // LOGICAL_SECTOR) * LOGICAL_SECTOR)
        if self.disk_size > s.MAX_VIRTUAL_SIZE:
            raise UsageError(f"a VHDX holds at most 64 TiB; this disk is {self.disk_size} bytes", path=path)
        self.params = s.DiskParameters(
            block_size=self.block_size, leave_blocks_allocated=self.subformat == "fixed", has_parent=False,
            virtual_size=self.disk_size, logical_sector_size=LOGICAL_SECTOR, physical_sector_size=PHYSICAL_SECTOR,
            page83=uuid.uuid4(),
        )
        self.blocks = self.params.payload_blocks
        self.ratio = self.params.chunk_ratio
        self.log_offset = s.HEADER_AREA
        self.metadata_offset = self.log_offset + self.log_size
        self.bat_offset = self.metadata_offset + METADATA_REGION_SIZE
        self.bat_bytes = -(-self.params.bat_entries * 8 // s.MIB) * s.MIB
        self.data_start = self.bat_offset + self.bat_bytes

    @property
    def fixed(self) -> bool:
        return self.subformat == "fixed"

    def planned_blocks(self, extents: Iterable[Extent]) -> bytearray:
        """One byte per block, 1 where a DATA extent overlaps it."""
        planned = bytearray(self.blocks)
        for extent in extents:
            if extent.kind is not ExtentKind.DATA or extent.length <= 0:
                continue
            start, end = max(0, extent.start), min(extent.end, self.disk_size)
            if start < end:
                first, last = start // self.block_size, (end - 1) // self.block_size
                planned[first : last + 1] = b"\x01" * (last - first + 1)
        return planned

    def header_area(self) -> bytes:
        """The first MiB: identifier, both headers, both region tables."""
        area = bytearray(s.HEADER_AREA)
        area[: 520] = s.pack_file_identifier(f"diskimg {__version__}")
        file_write, data_write = uuid.uuid4(), uuid.uuid4()
        for sequence, offset in enumerate(s.HEADER_OFFSETS, start=1):
            header = s.Header(sequence, file_write, data_write, uuid.UUID(int=0), 0, 1, self.log_size, self.log_offset)
            area[offset : offset + s.HEADER_SIZE] = header.pack()
        table = s.pack_region_table([
            s.Region(s.BAT_REGION, self.bat_offset, self.bat_bytes, True),
            s.Region(s.METADATA_REGION, self.metadata_offset, METADATA_REGION_SIZE, True),
        ])
        for offset in s.REGION_TABLE_OFFSETS:
            area[offset : offset + s.REGION_TABLE_SIZE] = table
        return bytes(area)

    def bat(self, block_offsets: array[int]) -> bytes:
        """The BAT for ``block_offsets`` (file offset per block, 0 = not allocated), padded to its room."""
        absent = s.PAYLOAD_ZERO if self.block_state_zero else s.PAYLOAD_NOT_PRESENT
        entries = array("Q", bytes(8 * self.params.bat_entries))
        for block, offset in enumerate(block_offsets):
            state = s.PAYLOAD_FULLY_PRESENT if offset else absent
            entries[s.payload_index(block, self.ratio)] = s.bat_entry(state, offset)
        if array("Q", b"\1" + bytes(7))[0] != 1:
            entries.byteswap()
        raw = entries.tobytes()
        return raw + bytes(self.bat_bytes - len(raw))

    def file_size(self, allocated_blocks: int) -> int:
        return self.data_start + allocated_blocks * self.block_size


def _size_option(options: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    if key not in options:
        return default
    text = str(options[key])
    value = parse_size(text)
    if not low <= value <= high:
        raise UsageError(f"vhdx {key} must be from {low >> 20}M to {high >> 20}M, not {text!r}")
    return value


class VhdxWriter(DiskWriter):
    """Writes dynamic or fixed VHDX (see the module docstring for the layout)."""

    format = NAME
    OPTIONS: Mapping[str, str] = {
        "subformat": "dynamic (default) or fixed",
        "block_size": "payload block size: a power of two from 1M to 256M (default 32M, as Hyper-V)",
        "log_size": "log size, a multiple of 1M (default 1M)",
        "block_state_zero": "on (default): blocks without data are marked zero; off: not present",
    }

    def __init__(self, target: OutputTarget, virtual_size: int, options: Mapping[str, str], compress: bool) -> None:
        super().__init__(target, virtual_size, options, compress)
        self.layout = VhdxLayoutPlan(virtual_size, self.options, target.name)
        self.disk_size = self.layout.disk_size
        layout = self.layout
        self.offsets = array("Q", bytes(8 * layout.blocks))  # file offset of each block, 0 = none
        if layout.fixed:
            self.offsets = array("Q", range(layout.data_start, layout.data_start + layout.blocks * layout.block_size,
                                            layout.block_size))
        self._planned: bytearray | None = None
        self._next_free = layout.data_start
        self._started = False
        self._lock = threading.Lock()

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        options = dict(options or {})
        cls.check_options(options)
        layout = VhdxLayoutPlan(virtual_size, options)
        if layout.fixed:
            return layout.file_size(layout.blocks)
        return layout.file_size(layout.planned_blocks(extents).count(1))

    @property
    def requires_exact_plan(self) -> bool:
        return not self.layout.fixed and self.target.streaming

    @property
    def concurrent_writes(self) -> bool:
        return not self.target.streaming

    def plan(self, extents: Iterable[Extent]) -> None:
        layout = self.layout
        if not layout.fixed and self.target.streaming:
            planned = layout.planned_blocks(extents)
            offset = layout.data_start
            for run in re.finditer(rb"\x01+", planned):
                first, last = run.span()
                self.offsets[first:last] = array("Q", range(offset, offset + (last - first) * layout.block_size,
                                                            layout.block_size))
                offset += (last - first) * layout.block_size
            self._planned = planned
        else:
            for _ in extents:  # an upper bound only: blocks are allocated as data arrives
                pass
        self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        layout = self.layout
        target = self.target
        if target.streaming and self._planned is None and not layout.fixed:
            self._planned = bytearray(layout.blocks)  # no plan given: nothing may be allocated
        target.write(layout.header_area())
        target.skip(layout.log_size)
        target.write(s.pack_metadata(layout.params))
        target.skip(layout.bat_offset - target.position)
        if target.streaming or layout.fixed:
            target.write(layout.bat(self.offsets))
        else:
            target.skip(layout.bat_bytes)  # written by finish() once blocks are allocated

    def reserve(self, offset: int, length: int) -> None:
        """Allocate the blocks [offset, offset + length) touches, in the order data arrives."""
        if self.layout.fixed or not length:
            return
        bs = self.layout.block_size
        with self._lock:
            for block in range(offset // bs, (offset + length - 1) // bs + 1):
                if not self.offsets[block]:
                    self.offsets[block] = self._next_free
                    self._next_free += bs

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.disk_size)
        if not view:
            return
        self._start()
        bs = self.layout.block_size
        end = offset + len(view)
        if not self.concurrent_writes:
            self._written_to = end
        position = offset
        while position < end:
            block = position // bs
            piece_end = min(end, (block + 1) * bs)
            if not self.offsets[block]:
                if self._planned is not None:
                    raise OutputError(
                        f"vhdx writer: data at guest offset {position} lies in block {block}, which the plan left "
                        "unallocated (the source changed during the conversion?)", path=self.target.name)
                self.reserve(position, piece_end - position)
            host = self.offsets[block] + position - block * bs
            piece = view[position - offset : piece_end - offset]
            if self.concurrent_writes:
                self.target.pwrite(piece, host)
            else:
                self.target.skip(host - self.target.position)
                self.target.write(piece)
            position = piece_end

    def finish(self) -> None:
        self._start()
        layout = self.layout
        target = self.target
        if layout.fixed:
            end = layout.file_size(layout.blocks)
        elif self._planned is not None:
            end = layout.file_size(self._planned.count(1))
        else:
            end = self._next_free
            target.pwrite(layout.bat(self.offsets), layout.bat_offset)
        if target.streaming:
            target.skip(end - target.position)
        target.finish(end)
