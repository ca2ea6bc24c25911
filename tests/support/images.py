"""Images at the level of their format: plans and data for driving writers directly, and the
structures of qcow2 and VHD files read or patched in place (through diskimg's own parsers, only to
find where a field lies)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from diskimg.formats.qcow2.structures import Qcow2Header
from diskimg.formats.reader import Extent, ExtentKind
from diskimg.formats.vhd.structures import VhdFooter, parse_footer

from .files import read_at, read_u64, write_at
from .tools import qemu_img, qemu_io
from .units import MiB

# -- plans and data for driving writers directly ------------------------------------------------------


def scan_plan(reader) -> list[Extent]:
    """The exact plan the converter computes for a streaming target (4 KiB zero granularity)."""
    from diskimg.conversion.pipeline import scan_for_zeroes

    return list(scan_for_zeroes(reader, 4096, None))


def random_plan(rng: random.Random, size: int, compressible: bytes | None = None
                ) -> tuple[list[Extent], list[tuple[int, bytes]]]:
    """An exact plan (DATA extents at sector granularity) and the data filling it, cut anywhere into
    pieces of at most 4 MiB; with ``compressible``, about half the pieces are cut from it."""
    sectors = size // 512
    marks = sorted(rng.sample(range(1, sectors), min(sectors - 1, 2 * rng.randint(1, 8))))
    plan: list[Extent] = []
    pieces: list[tuple[int, bytes]] = []
    position = 0
    for index, mark in enumerate([*marks, sectors]):
        start, end = position, mark * 512
        if end > start:
            kind = ExtentKind.DATA if index % 2 else ExtentKind.ZERO
            plan.append(Extent(start, end - start, kind))
            while kind is ExtentKind.DATA and start < end:
                step = min(end - start, rng.randint(1, 4 * MiB))
                if compressible is None or rng.random() < 0.5:
                    data = bytearray(rng.randbytes(step))
                else:
                    data = bytearray((compressible * 2)[:step])
                data[0] = data[-1] = 0x99  # non-zero at both ends: the plan is exact
                pieces.append((start, bytes(data)))
                start += step
        position = end
    return plan, pieces


def feed_writer(writer, plan: list[Extent], pieces: list[tuple[int, bytes]], reserve: bool = False) -> None:
    """Drive a DiskWriter as the converter does: the plan, each (offset, data) piece in order (with
    ``reserve``, reserved first, as on a seekable target), then finish()."""
    writer.plan(iter(plan))
    for offset, data in pieces:
        if reserve:
            writer.reserve(offset, len(data))
        writer.write(offset, memoryview(data))
    writer.finish()


def pieces_content(size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """The disk of ``size`` bytes that writing each (offset, data) piece makes (zeros elsewhere)."""
    image = bytearray(size)
    for offset, data in pieces:
        image[offset : offset + len(data)] = data
    return bytes(image)


# -- qcow2 files --------------------------------------------------------------------------------------


def qcow2_header(path: Path) -> Qcow2Header:
    with open(path, "rb") as f:
        return Qcow2Header.parse(f.read(65536))


def first_refcount_block(path: Path) -> int:
    """The offset of refcount block 0 (from the first refcount table entry)."""
    return read_u64(path, qcow2_header(path).refcount_table_offset) & ~0x1FF


def first_l2_table(path: Path) -> int:
    """The offset of the L2 table of the first L1 entry."""
    return read_u64(path, qcow2_header(path).l1_table_offset) & 0x00FFFFFFFFFFFE00


def l1_entries_all_pointing_at_the_first_l2_table(tmp_path: Path, virtual_size: str) -> Path:
    """A qcow2 made by qemu-img with 1 MiB of data, whose every L1 entry (16384 of them for 8 TiB
    with 64 KiB clusters) then points at the one L2 table: a 1.5 MiB file that describes the same
    table 16384 times (a hostile file: walking each entry's table costs minutes)."""
    path = tmp_path / "shared-l2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, virtual_size)
    qemu_io(path, "qcow2", "write -P 1 0 1M")
    h = qcow2_header(path)
    write_at(path, h.l1_table_offset, read_at(path, h.l1_table_offset, 8) * h.l1_size)
    return path


# -- VHD files ----------------------------------------------------------------------------------------


def rewrite_footers(path: Path, **changes) -> VhdFooter:
    """Change footer fields (and the copy at offset 0, if any), checksum recomputed by pack()."""
    data = bytearray(path.read_bytes())
    footer = dataclasses.replace(parse_footer(bytes(data[-512:])), **changes)
    packed = footer.pack()
    data[-512:] = packed
    if data[:8] == b"conectix":
        data[:512] = packed
    path.write_bytes(bytes(data))
    return footer
