"""VDI on-disk structures (VirtualBox Disk Image, version 1.1): the one home of every VDI rule.

Layout (all integers little-endian):

* a 64-byte *pre-header*: free text such as ``<<< Oracle VM VirtualBox Disk Image >>>\\n``, then
  the signature 0xBEDA107F (offset 64) and the version (offset 68; 0x00010001 is 1.1);
* the version 1 header at offset 72: its size (384 bytes, or 400 with the logical CHS geometry
  VirtualBox adds), image type (1 dynamic, 2 static, 3 undo, 4 differencing), flags, a 256-byte
  comment, the block map and data offsets, the legacy geometry and sector size, the disk size,
  block size, extra bytes per block, the block count, the allocated count and four UUIDs (image,
  last modification, link = parent for differencing images, parent modification);
* the *block map* at ``offset_bmap``: one u32 per guest block, the index of the block in the data
  area (data at ``offset_data + index * block_size``), 0xFFFFFFFF = never written and 0xFFFFFFFE
  = discarded (both read as zeros);
* the data area at ``offset_data``.

Rules applied by the reader, ``check`` and detection alike (from VirtualBox's VDICore.h and
qemu's block/vdi.c, read as specifications):

* only version 1.1 is read; version 0 headers (VirtualBox before 1.2) and other versions are
  refused, naming the version.
* dynamic and static (VirtualBox's "fixed") images are read; undo and differencing images are named and refused (their
  data lives partly in the parent).
* the legacy sector size must be 512, block offsets 512-aligned, the block size a power of two
  (VirtualBox and qemu write 1 MiB), no extra bytes per block (no producer writes them), the header
  ends before the block map, the map before the data, and the map covers the disk; a disk size
  that is not a multiple of 512 is rounded up, as qemu does (``VBoxManage convertfromraw`` writes
  such sizes).
* map entries point inside ``blocks_in_image``, no two at the same block, each block inside the
  file (the last guest block only as far as the disk reaches).
"""

from __future__ import annotations

import bisect
import struct
import sys
import uuid
from array import array
from dataclasses import dataclass, fields as fields_of, replace

from ..probing import Detection

NAME = "vdi"
SECTOR = 512
PREHEADER_TEXT_SIZE = 64
SIGNATURE = 0xBEDA107F
SIGNATURE_OFFSET = 64
VERSION_1_1 = 0x00010001
#: the version 1 header after the pre-header (VDIHEADER1), and with the logical CHS (VDIHEADER1PLUS)
HEADER_V1_SIZE = 384
HEADER_V1_PLUS_SIZE = 400
HEADER_START = 72
#: bytes read to parse a header: the pre-header and the largest version 1 header, padded
HEADER_READ_SIZE = 512

TYPE_DYNAMIC = 1
TYPE_STATIC = 2
TYPE_UNDO = 3
TYPE_DIFFERENCING = 4
IMAGE_TYPES = {TYPE_DYNAMIC: "dynamic", TYPE_STATIC: "fixed", TYPE_UNDO: "undo", TYPE_DIFFERENCING: "differencing"}

UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
#: the block map is loaded whole: 64 MiB at most (16 Mi blocks, 16 TiB with 1 MiB blocks)
MAX_MAP_BYTES = 64 << 20
MAX_BLOCKS = MAX_MAP_BYTES // 4
MAX_BLOCK_SIZE = 256 << 20
DEFAULT_BLOCK_SIZE = 1 << 20
NIL_UUID = uuid.UUID(int=0)
#: what to do with a VDI diskimg does not read (qemu-img reads none of those either)
CLONE_HINT = "VirtualBox can copy it to a dynamic VDI: `VBoxManage clonemedium disk SOURCE copy.vdi`"

_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s")
_LCHS = struct.Struct("<IIII")

# field offsets, for error messages
OFFSET_VERSION = 68
OFFSET_HEADER_SIZE = 72
OFFSET_IMAGE_TYPE = 76
OFFSET_BMAP = 340
OFFSET_DATA = 344
OFFSET_SECTOR_SIZE = 360
OFFSET_DISK_SIZE = 368
OFFSET_BLOCK_SIZE = 376
OFFSET_BLOCK_EXTRA = 380
OFFSET_BLOCKS = 384
OFFSET_BLOCKS_ALLOCATED = 388
OFFSET_UUID_LINK = 424
OFFSET_LCHS = 456


@dataclass(frozen=True)
class VdiHeader:
    """The pre-header and version 1 header; UUIDs as VirtualBox stores them (little-endian GUIDs)."""

    text: bytes
    signature: int = SIGNATURE
    version: int = VERSION_1_1
    header_size: int = HEADER_V1_PLUS_SIZE
    image_type: int = TYPE_DYNAMIC
    image_flags: int = 0
    comment: bytes = b""
    offset_bmap: int = 0
    offset_data: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    sector_size: int = SECTOR
    unused: int = 0
    disk_size: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    block_extra: int = 0
    blocks_in_image: int = 0
    blocks_allocated: int = 0
    uuid_image: uuid.UUID = NIL_UUID
    uuid_last_snap: uuid.UUID = NIL_UUID
    uuid_link: uuid.UUID = NIL_UUID
    uuid_parent: uuid.UUID = NIL_UUID
    #: logical CHS geometry (cylinders, heads, sectors, sector size), in 400-byte headers only
    lchs: tuple[int, int, int, int] | None = None

    @property
    def creator_text(self) -> str:
        """The pre-header text without its ``<<< >>>`` frame (it names the producer)."""
        text = self.text.split(b"\0", 1)[0].decode("latin-1").strip()
        return text.removeprefix("<<<").removesuffix(">>>").strip()

    @property
    def version_text(self) -> str:
        return f"{self.version >> 16}.{self.version & 0xFFFF}"

    @property
    def image_type_name(self) -> str:
        return IMAGE_TYPES.get(self.image_type, f"type {self.image_type}")

    @property
    def virtual_size(self) -> int:
        """The disk size rounded up to whole sectors (qemu's rule)."""
        return -(-self.disk_size // SECTOR) * SECTOR

    def pack(self) -> bytes:
        """The first 512 bytes of an image: pre-header and header, zero-padded."""
        data = _HEADER.pack(
            self.text, self.signature, self.version, self.header_size, self.image_type, self.image_flags,
            self.comment, self.offset_bmap, self.offset_data, self.cylinders, self.heads, self.sectors,
            self.sector_size, self.unused, self.disk_size, self.block_size, self.block_extra,
            self.blocks_in_image, self.blocks_allocated, self.uuid_image.bytes_le, self.uuid_last_snap.bytes_le,
            self.uuid_link.bytes_le, self.uuid_parent.bytes_le,
        )  # fmt: skip
        if self.lchs is not None:
            data += _LCHS.pack(*self.lchs)
        return data.ljust(HEADER_READ_SIZE, b"\0")

    def with_allocated(self, blocks_allocated: int) -> VdiHeader:
        return replace(self, blocks_allocated=blocks_allocated)


def has_signature(head: bytes) -> bool:
    return len(head) >= SIGNATURE_OFFSET + 4 and struct.unpack_from("<I", head, SIGNATURE_OFFSET)[0] == SIGNATURE


def parse_header(data: bytes) -> VdiHeader:
    """Decode the first 512 bytes (or fewer: missing bytes read as zeros) without judging them."""
    data = data[:HEADER_READ_SIZE].ljust(HEADER_READ_SIZE, b"\0")
    values = list(_HEADER.unpack_from(data))
    for index in range(-4, 0):
        values[index] = uuid.UUID(bytes_le=values[index])
    header_size = values[3]
    lchs = _LCHS.unpack_from(data, OFFSET_LCHS) if header_size >= HEADER_V1_PLUS_SIZE else None
    names = [item.name for item in fields_of(VdiHeader)][: len(values)]
    return VdiHeader(**dict(zip(names, values, strict=True)), lchs=lchs)


@dataclass(frozen=True)
class Finding:
    """One broken rule: ``kind`` is "unsupported" (valid VDI that diskimg does not read),
    "corrupt" or "truncated"; ``offset`` is where in the file the fault lies."""

    kind: str
    message: str
    offset: int
    structure: str = "header"


def header_findings(header: VdiHeader, file_size: int) -> list[Finding]:
    """Every rule the header breaks, most fundamental first (a later finding may follow from an
    earlier one). Empty when the image can be read."""
    if header.signature != SIGNATURE:
        return [Finding("corrupt", f"no VDI signature 0x{SIGNATURE:08x} at offset 64", SIGNATURE_OFFSET, "pre-header")]
    if header.version != VERSION_1_1:
        old = " (VirtualBox before 1.2)" if header.version >> 16 == 0 else ""
        return [Finding("unsupported", f"VDI version {header.version_text}{old} is not read: diskimg reads version "
                        "1.1, which every VirtualBox since 1.2 and qemu-img write", OFFSET_VERSION)]
    findings: list[Finding] = []

    def add(kind: str, message: str, offset: int, structure: str = "header") -> None:
        findings.append(Finding(kind, message, offset, structure))

    if header.image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
        name = IMAGE_TYPES.get(header.image_type)
        if name is None:
            add("corrupt", f"unknown image type {header.image_type} (1 dynamic, 2 static, 3 undo, 4 differencing)",
                OFFSET_IMAGE_TYPE)
        else:
            add("unsupported", f"{name} VDI images (a snapshot of parent {header.uuid_link}) are not read: their "
                "data lies partly in the parent image", OFFSET_IMAGE_TYPE)
    elif header.uuid_link.int or header.uuid_parent.int:
        add("unsupported", f"a {header.image_type_name} VDI that names a parent image ({header.uuid_link}) is not read",
            OFFSET_UUID_LINK)
    if header.header_size < HEADER_V1_SIZE:
        add("corrupt", f"header size {header.header_size} is below the version 1.1 header's {HEADER_V1_SIZE} bytes",
            OFFSET_HEADER_SIZE)
    if header.sector_size != SECTOR:
        add("unsupported", f"sector size {header.sector_size} is not 512", OFFSET_SECTOR_SIZE)
    block_size = header.block_size
    if not SECTOR <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        add("corrupt", f"block size {block_size} is not a power of two from 512 to {MAX_BLOCK_SIZE}",
            OFFSET_BLOCK_SIZE)
        return findings
    if header.block_extra:
        add("unsupported", f"{header.block_extra} extra bytes per block are not read (no known producer writes them)",
            OFFSET_BLOCK_EXTRA)
    for offset, name, value in ((OFFSET_BMAP, "block map", header.offset_bmap),
                                (OFFSET_DATA, "data", header.offset_data)):  # fmt: skip
        if value % SECTOR:
            add("corrupt", f"the {name} offset {value} is not a multiple of 512", offset)
    blocks = header.blocks_in_image
    if blocks > MAX_BLOCKS:
        add("corrupt", f"{blocks} blocks: a block map over {MAX_MAP_BYTES} bytes is refused", OFFSET_BLOCKS)
        return findings
    if header.disk_size > blocks * block_size:
        add("corrupt", f"disk size {header.disk_size} exceeds the {blocks} blocks of {block_size} bytes the block "
            "map describes", OFFSET_DISK_SIZE)
    if header.blocks_allocated > blocks:
        add("corrupt", f"{header.blocks_allocated} blocks allocated of {blocks}", OFFSET_BLOCKS_ALLOCATED)
    header_end = HEADER_START + header.header_size
    if header.offset_bmap < header_end:
        add("corrupt", f"the block map at offset {header.offset_bmap} overlaps the header (which ends at "
            f"{header_end})", OFFSET_BMAP)
    map_end = header.offset_bmap + 4 * blocks
    if header.offset_data < map_end:
        add("corrupt", f"the data area at offset {header.offset_data} overlaps the block map (offset "
            f"{header.offset_bmap}, {4 * blocks} bytes)", OFFSET_DATA)
    if map_end > file_size:
        add("truncated", f"the block map ({4 * blocks} bytes at offset {header.offset_bmap}) ends past the end of "
            f"the file ({file_size} bytes)", header.offset_bmap, "block map")
    return findings


def parse_block_map(raw: bytes) -> array[int]:
    """The block map as u32 values in host order."""
    table = array("I")
    assert table.itemsize == 4
    table.frombytes(raw[: len(raw) // 4 * 4])
    if sys.byteorder == "big":
        table.byteswap()
    return table


def pack_block_map(table: array[int]) -> bytes:
    if sys.byteorder == "big":
        table = array("I", table)
        table.byteswap()
    return table.tobytes()


def allocated_blocks(table: array[int]) -> int:
    """How many entries point at data (neither unallocated nor discarded)."""
    return len(table) - table.count(UNALLOCATED) - table.count(DISCARDED)


def block_map_findings(header: VdiHeader, table: array[int], file_size: int, limit: int = 1) -> list[Finding]:
    """What is wrong with the entries of a block map whose header passed ``header_findings``: entries
    past ``blocks_in_image``, two entries at one block, blocks past the end of the file. Stops after
    ``limit`` findings (the reader needs the first one only)."""
    findings: list[Finding] = []
    blocks = header.blocks_in_image
    block_size = header.block_size
    pointed = sorted(table)  # C-level: the usual sound map is settled without a Python loop
    pointed = pointed[: bisect.bisect_left(pointed, DISCARDED)]
    if not pointed or (
        pointed[-1] < blocks
        and len(set(pointed)) == len(pointed)
        and header.offset_data + (pointed[-1] + 1) * block_size <= file_size
    ):
        return findings
    virtual_size = header.virtual_size
    owner = array("I", [UNALLOCATED]) * blocks if len(table) else array("I")
    for guest_block, entry in enumerate(table):
        if entry >= DISCARDED:
            continue
        offset = header.offset_bmap + 4 * guest_block
        if entry >= blocks:
            findings.append(Finding("corrupt", f"block {guest_block} points at block {entry}, past the image's "
                                    f"{blocks} blocks", offset, "block map"))
        elif owner[entry] != UNALLOCATED:
            findings.append(Finding("corrupt", f"blocks {owner[entry]} and {guest_block} both point at block "
                                    f"{entry}", offset, "block map"))
        else:
            owner[entry] = guest_block
            needed = min(block_size, virtual_size - guest_block * block_size)
            start = header.offset_data + entry * block_size
            if start + needed > file_size:
                findings.append(Finding("truncated", f"block {guest_block} at offset {start} ends past the end of "
                                        f"the file ({file_size} bytes): the image is truncated", start, "data block"))
        if len(findings) >= limit:
            break
    return findings


def probe(head: bytes) -> Detection:
    """What detection reports for a file with the VDI signature (its first 512 bytes): readable
    unless its version or image type is one diskimg does not read."""
    header = parse_header(head)
    subformat = IMAGE_TYPES.get(header.image_type) if header.version == VERSION_1_1 else None
    description = f"VDI {header.version_text}"
    if subformat:
        description += f" ({subformat}), size {header.disk_size} bytes"
    if header.creator_text:
        description += f", '{header.creator_text}'"
    unsupported = [f for f in header_findings(header, 1 << 62) if f.kind == "unsupported"]
    if not unsupported:
        return Detection(format=NAME, subformat=subformat, version=header.version_text, readable=True,
                         description=description)
    return Detection(
        format=NAME, subformat=subformat, version=header.version_text, readable=False,
        description=f"{description}: {unsupported[0].message}", hint=CLONE_HINT,
    )


__all__ = [
    "CLONE_HINT",
    "DEFAULT_BLOCK_SIZE",
    "DISCARDED",
    "HEADER_READ_SIZE",
    "HEADER_V1_PLUS_SIZE",
    "HEADER_V1_SIZE",
    "IMAGE_TYPES",
    "MAX_BLOCKS",
    "NAME",
    "SECTOR",
    "SIGNATURE",
    "TYPE_DIFFERENCING",
    "TYPE_DYNAMIC",
    "TYPE_STATIC",
    "TYPE_UNDO",
    "UNALLOCATED",
    "VERSION_1_1",
    "Finding",
    "VdiHeader",
    "allocated_blocks",
    "block_map_findings",
    "has_signature",
    "header_findings",
    "pack_block_map",
    "parse_block_map",
    "parse_header",
    "probe",
]
