"""Writing VDI 1.1 images, dynamic (default) or static (``-o static=on``), in one forward pass.

Layout, as qemu-img writes it: the header at 0 (VirtualBox's 400-byte version 1.1 header), the
block map at 512, the data area at the next multiple of 512 after the map, blocks of 1 MiB (the
only block size qemu reads). The pre-header text is VirtualBox's own, which every VDI reader
knows; the image and modification UUIDs are fresh random ones.

* static: every block allocated, block ``i`` at index ``i``: the disk at its own offsets after
  the data offset (holes where no data comes). Metadata is known up front: the same on pipes
  and files.
* dynamic: allocated blocks follow each other in guest order. On a streaming target (a pipe, or
  while the output is hashed) the exact plan decides which blocks exist (a planned DATA extent
  overlaps them) and the map is written before them; on a seekable file only blocks that receive
  data are allocated and the header and map are written last.
"""

from __future__ import annotations

import re
import uuid
from array import array
from collections.abc import Iterable, Mapping

from ...errors import OutputError, UsageError
from ...units import format_size
from ..reader import Extent
from ..writer import DiskWriter, OutputTarget, option_flag, planned_blocks
from .structures import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCKS,
    NAME,
    SECTOR,
    TYPE_DYNAMIC,
    TYPE_STATIC,
    UNALLOCATED,
    VdiHeader,
    pack_block_map,
)

PRE_HEADER_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
OFFSET_BMAP = SECTOR
BLOCK_SIZE = DEFAULT_BLOCK_SIZE
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE


def _settings(options: Mapping[str, str]) -> bool:
    """Whether the image is static, from the ``-o`` options (qemu-img's names), or a UsageError."""
    preallocation = str(options.get("preallocation", "off")).lower()
    if preallocation != "off":
        raise UsageError(f"vdi preallocation={preallocation!r} is not supported (diskimg writes preallocation=off; "
                         "-o static=on gives every block its place in the file)")
    return option_flag(options, "static", NAME)


class _Layout:
    """Where things go for a disk of ``virtual_size`` bytes."""

    def __init__(self, virtual_size: int, path: str | None = None) -> None:
        if virtual_size < 0:
            raise UsageError(f"invalid virtual size {virtual_size}", path=path)
        self.disk_size = -(-virtual_size // SECTOR) * SECTOR
        if self.disk_size > MAX_DISK_SIZE:
            raise UsageError(f"a VDI written by diskimg holds at most {format_size(MAX_DISK_SIZE)} "
                             f"({MAX_BLOCKS} blocks of 1 MiB); this disk is {format_size(self.disk_size)}: use qcow2",
                             path=path)
        self.blocks = -(-self.disk_size // BLOCK_SIZE)
        self.offset_data = OFFSET_BMAP + -(-4 * self.blocks // SECTOR) * SECTOR

    def file_size(self, allocated: int) -> int:
        return self.offset_data + allocated * BLOCK_SIZE


class VdiWriter(DiskWriter):
    format = NAME
    OPTIONS: Mapping[str, str] = {
        "static": "on: every block allocated in the file (VirtualBox's fixed size); off (default): dynamic",
        "preallocation": "accepted for qemu-img command lines: off only",
    }

    def __init__(self, target: OutputTarget, virtual_size: int, options: Mapping[str, str], compress: bool) -> None:
        super().__init__(target, virtual_size, options, compress)
        self.static = _settings(self.options)
        self.layout = _Layout(virtual_size, target.name)
        blocks = self.layout.blocks
        self.table = array("I", range(blocks)) if self.static else array("I", [UNALLOCATED]) * blocks
        self.allocated = blocks if self.static else 0
        self._planned: bytearray | None = None
        self._started = False
        self._uuid_image, self._uuid_last_snap = uuid.uuid4(), uuid.uuid4()

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        """The exact size of the output for this plan (on a seekable file, an upper bound)."""
        options = dict(options or {})
        cls.check_options(options)
        layout = _Layout(virtual_size)
        if _settings(options):
            return layout.file_size(layout.blocks)
        return layout.file_size(planned_blocks(extents, BLOCK_SIZE, layout.blocks).count(1))

    @property
    def requires_exact_plan(self) -> bool:
        return not self.static and self.target.streaming

    @property
    def concurrent_writes(self) -> bool:
        return not self.target.streaming

    def _header(self) -> bytes:
        layout = self.layout
        return VdiHeader(
            text=PRE_HEADER_TEXT,
            image_type=TYPE_STATIC if self.static else TYPE_DYNAMIC,
            offset_bmap=OFFSET_BMAP,
            offset_data=layout.offset_data,
            disk_size=layout.disk_size,
            block_size=BLOCK_SIZE,
            blocks_in_image=layout.blocks,
            blocks_allocated=self.allocated,
            uuid_image=self._uuid_image,
            uuid_last_snap=self._uuid_last_snap,
            lchs=(0, 0, 0, SECTOR),
        ).pack()

    def plan(self, extents: Iterable[Extent]) -> None:
        if self.requires_exact_plan:
            self._planned = planned_blocks(extents, BLOCK_SIZE, self.layout.blocks)
            index = 0
            for run in re.finditer(rb"\x01+", self._planned):  # runs of planned blocks, numbered in guest order
                first, last = run.span()
                self.table[first:last] = array("I", range(index, index + last - first))
                index += last - first
            self.allocated = index
        else:
            for _ in extents:  # the plan is only an upper bound here; consumed for the caller's count
                pass
        self._start()

    def _start(self) -> None:
        """The metadata at the head of the file: written now on a stream or for a static image,
        at ``finish`` for a dynamic image on a seekable file."""
        if self._started:
            return
        self._started = True
        if self.target.streaming and self._planned is None and not self.static:
            self._planned = bytearray(self.layout.blocks)  # no plan given: nothing may be allocated
        if self.target.streaming or self.static:
            self.target.write(self._header())
            self.target.skip(OFFSET_BMAP - self.target.position)
            self.target.write(pack_block_map(self.table))
        self.target.skip(self.layout.offset_data - self.target.position)

    def reserve(self, offset: int, length: int) -> None:
        """Allocate the blocks [offset, offset + length) touches, in guest order (dynamic, seekable)."""
        if self.static or not length:
            return
        table = self.table
        for block in range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1):
            if table[block] == UNALLOCATED:
                table[block] = self.allocated
                self.allocated += 1

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.layout.disk_size)
        if not view:
            return
        self._start()
        end = offset + len(view)
        if not self.concurrent_writes:
            self._written_to = end
        table = self.table
        position = offset
        while position < end:
            block = position // BLOCK_SIZE
            piece_end = min(end, (block + 1) * BLOCK_SIZE)
            if table[block] == UNALLOCATED:
                if self.target.streaming:
                    raise OutputError(
                        f"vdi writer: data at guest offset {position} lies in block {block}, which the plan left "
                        "unallocated (the source changed during the conversion?)",
                        path=self.target.name,
                    )
                self.reserve(position, piece_end - position)
            host = self.layout.offset_data + table[block] * BLOCK_SIZE + position % BLOCK_SIZE
            piece = view[position - offset : piece_end - offset]
            if self.target.streaming:
                self.target.skip(host - self.target.position)
                self.target.write(piece)
            else:
                self.target.pwrite(piece, host)
            position = piece_end

    def finish(self) -> None:
        self._start()
        end = self.layout.file_size(self.allocated)
        if self.target.streaming:
            self.target.skip(end - self.target.position)
        elif not self.static:
            self.target.pwrite(self._header(), 0)
            self.target.pwrite(pack_block_map(self.table), OFFSET_BMAP)
        self.target.finish(end)
