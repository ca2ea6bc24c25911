"""VHDX on-disk structures (MS-VHDX v1): constants, pure parse and pack functions.

The one home of every VHDX rule: the reader, ``check``, detection and the writer call these.
All integers are little-endian; GUIDs are stored in Microsoft's mixed-endian order
(``uuid.UUID(bytes_le=...)``); every checksum is CRC-32C over the structure with its checksum
field taken as zero.

Layout: the file identifier at 0 (``vhdxfile`` and a UTF-16 creator), two headers at 64 KiB and
128 KiB (``head``; the valid one with the higher sequence number is current), two copies of the
region table at 192 KiB and 256 KiB (``regi``; entries locate the BAT and the metadata region),
the log (where the current header says), the metadata region (``metadata``: a table of items:
file parameters, virtual disk size, sector sizes, page 83 data, parent locator), and the BAT: one
u64 per payload block (state in bits 0-2, file offset in MiB in bits 20-63), with one sector
bitmap entry after every ``chunk_ratio`` payload entries.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

from fastcrc import crc32

KIB = 1024
MIB = 1024 * 1024

FILE_IDENTIFIER_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_TABLE_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_ENTRY_SIGNATURE = b"loge"
LOG_DATA_DESCRIPTOR = b"desc"
LOG_ZERO_DESCRIPTOR = b"zero"
LOG_DATA_SECTOR = b"data"

HEADER_OFFSETS = (64 * KIB, 128 * KIB)
REGION_TABLE_OFFSETS = (192 * KIB, 256 * KIB)
HEADER_SIZE = 4 * KIB
REGION_TABLE_SIZE = 64 * KIB
METADATA_TABLE_SIZE = 64 * KIB
#: the first megabyte holds the identifier, headers and region tables; nothing else may lie there
HEADER_AREA = 1 * MIB
LOG_SECTOR = 4 * KIB

MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MIN_BLOCK_SIZE = 1 * MIB
MAX_BLOCK_SIZE = 256 * MIB
MAX_VIRTUAL_SIZE = 64 * 1024**4  # 64 TiB
SECTOR_BITMAP_BLOCK = 1 * MIB
#: the log is read whole into memory to be replayed: diskimg's cap (Hyper-V and qemu make 1 MiB)
MAX_LOG_LENGTH = 256 * MIB
#: the BAT is loaded whole; 64 TiB at 1 MiB blocks with 4 KiB sectors is 512 MiB of table
MAX_BAT_BYTES = 1024 * MIB
MAX_PARENT_LOCATOR = 64 * KIB

BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
KNOWN_REGIONS = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}

FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_METADATA = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    PAGE83_DATA: "page 83 data",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
    PARENT_LOCATOR: "parent locator",
}
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

# BAT entry states
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
PAYLOAD_STATES = {
    PAYLOAD_NOT_PRESENT: "not present",
    PAYLOAD_UNDEFINED: "undefined",
    PAYLOAD_ZERO: "zero",
    PAYLOAD_UNMAPPED: "unmapped",
    PAYLOAD_FULLY_PRESENT: "fully present",
    PAYLOAD_PARTIALLY_PRESENT: "partially present",
}
SB_NOT_PRESENT = 0
SB_PRESENT = 6
BAT_STATE_MASK = 0x7
BAT_OFFSET_SHIFT = 20
BAT_RESERVED_MASK = 0xFFFF8  # bits 3-19


class VhdxError(ValueError):
    """A structure breaks a VHDX rule; the caller adds the file name and offset."""


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), the VHDX checksum (fastcrc's ``iscsi`` is that polynomial)."""
    return crc32.iscsi(bytes(data))


def checksum_ok(data: bytes, checksum_offset: int = 4) -> bool:
    """True when the u32 at ``checksum_offset`` is the CRC-32C of ``data`` with that field zeroed."""
    stored: int = struct.unpack_from("<I", data, checksum_offset)[0]
    return stored == crc32c(data[:checksum_offset] + bytes(4) + data[checksum_offset + 4 :])


def with_checksum(data: bytes | bytearray, checksum_offset: int = 4) -> bytes:
    """``data`` with its CRC-32C stored at ``checksum_offset``."""
    buffer = bytearray(data)
    buffer[checksum_offset : checksum_offset + 4] = bytes(4)
    struct.pack_into("<I", buffer, checksum_offset, crc32c(buffer))
    return bytes(buffer)


def guid(data: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(data[:16]))


# --- file identifier -------------------------------------------------------------------------


def parse_creator(data: bytes) -> str:
    """The creator string of the file identifier (UTF-16LE, NUL-terminated, 512 bytes)."""
    if data[:8] != FILE_IDENTIFIER_SIGNATURE:
        raise VhdxError("no 'vhdxfile' signature")
    text = data[8:520].decode("utf-16-le", "replace").split("\0", 1)[0]
    return "".join(c for c in text if c.isprintable()).strip()


def pack_file_identifier(creator: str) -> bytes:
    raw = creator.encode("utf-16-le")[:510]
    return FILE_IDENTIFIER_SIGNATURE + raw + bytes(512 - len(raw))


# --- headers ---------------------------------------------------------------------------------

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def pack(self) -> bytes:
        raw = _HEADER.pack(
            HEADER_SIGNATURE, 0, self.sequence_number, self.file_write_guid.bytes_le, self.data_write_guid.bytes_le,
            self.log_guid.bytes_le, self.log_version, self.version, self.log_length, self.log_offset,
        )
        return with_checksum(raw + bytes(HEADER_SIZE - len(raw)))

    @property
    def has_log(self) -> bool:
        return self.log_guid.int != 0


def parse_header(data: bytes) -> Header:
    """A header (the first 4 KiB of its 64 KiB slot), its signature, checksum and fields checked."""
    if len(data) < HEADER_SIZE:
        raise VhdxError("header is truncated")
    data = data[:HEADER_SIZE]
    signature, _, sequence, file_write, data_write, log_guid, log_version, version, log_length, log_offset = (
        _HEADER.unpack_from(data)
    )
    if signature != HEADER_SIGNATURE:
        raise VhdxError("no 'head' signature")
    if not checksum_ok(data):
        raise VhdxError("checksum mismatch")
    if version != 1:
        raise VhdxError(f"version {version} (VHDX version 1 is the only one)")
    if log_version != 0:
        raise VhdxError(f"log version {log_version} (0 is the only one)")
    if log_offset % MIB or log_length % MIB or (log_offset < HEADER_AREA and log_length):
        raise VhdxError(f"log at {log_offset} of {log_length} bytes is not aligned to 1 MiB past the header area")
    return Header(sequence, guid(file_write), guid(data_write), guid(log_guid), log_version, version,
                  log_length, log_offset)


def current_header(first: bytes, second: bytes) -> tuple[int, Header]:
    """(index, header) of the current header: of the valid ones, the higher sequence number."""
    valid: list[tuple[int, Header]] = []
    problems = []
    for index, data in enumerate((first, second)):
        try:
            valid.append((index, parse_header(data)))
        except VhdxError as exc:
            problems.append(f"header {index + 1}: {exc}")
    if not valid:
        raise VhdxError("neither header is valid (" + "; ".join(problems) + ")")
    one, other = valid[0][1], valid[-1][1]
    if len(valid) == 2 and one.sequence_number == other.sequence_number and one != other:
        raise VhdxError("both headers carry the same sequence number but differ")
    return max(valid, key=lambda item: item[1].sequence_number)


# --- region table ----------------------------------------------------------------------------

_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True)
class Region:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    @property
    def end(self) -> int:
        return self.file_offset + self.length


def parse_region_table(data: bytes) -> dict[uuid.UUID, Region]:
    """The region table (64 KiB): signature, checksum, entry count, each region 1 MiB-aligned past
    the header area, no duplicate or overlapping regions, unknown required regions refused."""
    if len(data) < REGION_TABLE_SIZE:
        raise VhdxError("region table is truncated")
    signature, _, count, _ = _REGION_HEADER.unpack_from(data)
    if signature != REGION_TABLE_SIGNATURE:
        raise VhdxError("no 'regi' signature")
    if not checksum_ok(data[:REGION_TABLE_SIZE]):
        raise VhdxError("checksum mismatch")
    if count > MAX_REGION_ENTRIES:
        raise VhdxError(f"{count} entries (at most {MAX_REGION_ENTRIES})")
    regions: dict[uuid.UUID, Region] = {}
    for index in range(count):
        raw_guid, offset, length, flags = _REGION_ENTRY.unpack_from(data, _REGION_HEADER.size + index * 32)
        region = Region(guid(raw_guid), offset, length, bool(flags & 1))
        if region.guid in regions:
            raise VhdxError(f"region {region.guid} appears twice")
        if offset % MIB or length % MIB or offset < HEADER_AREA or length == 0:
            raise VhdxError(f"region {index} at {offset} of {length} bytes is not 1 MiB-aligned past the header area")
        if region.guid not in KNOWN_REGIONS and region.required:
            raise VhdxError(f"unknown required region {region.guid}")
        for other in regions.values():
            if region.file_offset < other.end and other.file_offset < region.end:
                raise VhdxError(f"regions {other.guid} and {region.guid} overlap")
        regions[region.guid] = region
    for needed in (BAT_REGION, METADATA_REGION):
        if needed not in regions:
            raise VhdxError(f"no {KNOWN_REGIONS[needed]} region")
    return regions


def pack_region_table(regions: list[Region]) -> bytes:
    raw = bytearray(REGION_TABLE_SIZE)
    _REGION_HEADER.pack_into(raw, 0, REGION_TABLE_SIGNATURE, 0, len(regions), 0)
    for index, region in enumerate(regions):
        _REGION_ENTRY.pack_into(raw, 16 + 32 * index, region.guid.bytes_le, region.file_offset, region.length,
                                int(region.required))
    return with_checksum(raw)


# --- metadata --------------------------------------------------------------------------------

_METADATA_HEADER = struct.Struct("<8sHH20x")
_METADATA_ENTRY = struct.Struct("<16sIIII")
META_IS_USER = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4


@dataclass(frozen=True)
class MetadataEntry:
    item: uuid.UUID
    offset: int  # from the start of the metadata region
    length: int
    flags: int


def parse_metadata_table(data: bytes, region_length: int) -> dict[uuid.UUID, MetadataEntry]:
    """The metadata table (first 64 KiB of the region): entries inside the region past the table,
    not overlapping, unique; unknown required items refused."""
    if len(data) < METADATA_TABLE_SIZE:
        raise VhdxError("metadata table is truncated")
    signature, _, count = _METADATA_HEADER.unpack_from(data)
    if signature != METADATA_SIGNATURE:
        raise VhdxError("no 'metadata' signature")
    if count > MAX_METADATA_ENTRIES:
        raise VhdxError(f"{count} metadata entries (at most {MAX_METADATA_ENTRIES})")
    entries: dict[uuid.UUID, MetadataEntry] = {}
    spans: list[tuple[int, int]] = []
    for index in range(count):
        raw_guid, offset, length, flags, _ = _METADATA_ENTRY.unpack_from(data, 32 + 32 * index)
        entry = MetadataEntry(guid(raw_guid), offset, length, flags)
        if entry.item in entries:
            raise VhdxError(f"metadata item {entry.item} appears twice")
        if length and (offset < METADATA_TABLE_SIZE or offset + length > region_length):
            raise VhdxError(f"metadata item {entry.item} at {offset} of {length} bytes lies outside the region")
        if entry.item not in KNOWN_METADATA and flags & META_IS_REQUIRED:
            raise VhdxError(f"unknown required metadata item {entry.item}")
        for start, end in spans:
            if length and offset < end and start < offset + length:
                raise VhdxError(f"metadata item {entry.item} overlaps another")
        if length:
            spans.append((offset, offset + length))
        entries[entry.item] = entry
    return entries


@dataclass(frozen=True)
class DiskParameters:
    """What the metadata items say about the disk."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: uuid.UUID | None

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block."""
        return (1 << 23) * self.logical_sector_size // self.block_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bat_entries(self) -> int:
        """Entries the BAT holds: payload entries with a sector bitmap entry after each full chunk
        (a differencing disk: after every chunk, the last partial one included)."""
        blocks = self.payload_blocks
        if self.has_parent:
            return -(-blocks // self.chunk_ratio) * (self.chunk_ratio + 1)
        return blocks + (blocks - 1) // self.chunk_ratio if blocks else 0


def parse_disk_parameters(items: dict[uuid.UUID, bytes]) -> DiskParameters:
    """The required items decoded and checked (``items``: item -> its bytes)."""
    for needed in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE):
        if len(items.get(needed, b"")) < {FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8}.get(needed, 4):
            raise VhdxError(f"the {KNOWN_METADATA[needed]} metadata item is missing or short")
    block_size, flags = struct.unpack_from("<II", items[FILE_PARAMETERS])
    virtual_size = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])[0]
    logical = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])[0]
    physical = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])[0]
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise VhdxError(f"block size {block_size} (a power of two from 1 MiB to 256 MiB)")
    if logical not in (512, 4096):
        raise VhdxError(f"logical sector size {logical} (512 or 4096)")
    if physical not in (512, 4096):
        raise VhdxError(f"physical sector size {physical} (512 or 4096)")
    if virtual_size == 0 or virtual_size > MAX_VIRTUAL_SIZE or virtual_size % logical:
        raise VhdxError(f"virtual disk size {virtual_size} (a multiple of the {logical}-byte sector up to 64 TiB)")
    page83 = items.get(PAGE83_DATA)
    return DiskParameters(
        block_size=block_size,
        leave_blocks_allocated=bool(flags & 1),
        has_parent=bool(flags & 2),
        virtual_size=virtual_size,
        logical_sector_size=logical,
        physical_sector_size=physical,
        page83=guid(page83) if page83 and len(page83) >= 16 else None,
    )


_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


@dataclass(frozen=True)
class ParentLocator:
    locator_type: uuid.UUID
    entries: dict[str, str] = field(default_factory=dict)

    @property
    def parent_linkage(self) -> uuid.UUID | None:
        text = self.entries.get("parent_linkage")
        try:
            return uuid.UUID(text) if text else None
        except ValueError:
            return None


def parse_parent_locator(data: bytes) -> ParentLocator:
    """The parent locator item: key/value pairs of UTF-16LE strings inside the item."""
    if len(data) < _LOCATOR_HEADER.size:
        raise VhdxError("parent locator is truncated")
    raw_type, _, count = _LOCATOR_HEADER.unpack_from(data)
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(data):
        raise VhdxError(f"parent locator claims {count} entries, more than its {len(data)} bytes hold")
    entries: dict[str, str] = {}
    for index in range(count):
        key_offset, value_offset, key_length, value_length = _LOCATOR_ENTRY.unpack_from(
            data, _LOCATOR_HEADER.size + index * _LOCATOR_ENTRY.size
        )
        if key_offset + key_length > len(data) or value_offset + value_length > len(data):
            raise VhdxError(f"parent locator entry {index} lies outside the item")
        try:
            key = data[key_offset : key_offset + key_length].decode("utf-16-le")
            value = data[value_offset : value_offset + value_length].decode("utf-16-le")
        except UnicodeDecodeError:
            raise VhdxError(f"parent locator entry {index} is not UTF-16") from None
        if key in entries:
            raise VhdxError(f"parent locator key {key!r} appears twice")
        entries[key] = value
    return ParentLocator(guid(raw_type), entries)


def pack_metadata(params: DiskParameters) -> bytes:
    """A metadata region's first bytes (table then items) for a disk without parent: the table at
    0, the items from 64 KiB on (as Hyper-V and qemu lay them out)."""
    items = [
        (FILE_PARAMETERS, struct.pack("<II", params.block_size, int(params.leave_blocks_allocated)),
         META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", params.virtual_size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83_DATA, (params.page83 or uuid.uuid4()).bytes_le, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", params.logical_sector_size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", params.physical_sector_size),
         META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    table = bytearray(METADATA_TABLE_SIZE)
    _METADATA_HEADER.pack_into(table, 0, METADATA_SIGNATURE, 0, len(items))
    body = bytearray()
    for index, (item, value, flags) in enumerate(items):
        _METADATA_ENTRY.pack_into(table, 32 + 32 * index, item.bytes_le, METADATA_TABLE_SIZE + len(body), len(value),
                                  flags, 0)
        body += value
    return bytes(table + body)


# --- BAT -------------------------------------------------------------------------------------


def bat_entry(state: int, file_offset: int) -> int:
    return (file_offset // MIB) << BAT_OFFSET_SHIFT | state


def bat_state(entry: int) -> int:
    return entry & BAT_STATE_MASK


def bat_offset(entry: int) -> int:
    return (entry >> BAT_OFFSET_SHIFT) * MIB


def payload_index(block: int, chunk_ratio: int) -> int:
    """The BAT index of payload block ``block``: a sector bitmap entry follows every chunk."""
    return block + block // chunk_ratio


def bitmap_index(chunk: int, chunk_ratio: int) -> int:
    """The BAT index of the sector bitmap entry of chunk ``chunk``."""
    return chunk * (chunk_ratio + 1) + chunk_ratio


# --- log -------------------------------------------------------------------------------------

_LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
_LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")
LOG_ENTRY_HEADER_SIZE = _LOG_ENTRY_HEADER.size
LOG_DESCRIPTOR_SIZE = _LOG_DESCRIPTOR.size


@dataclass(frozen=True)
class LogEntryHeader:
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int

    @property
    def descriptor_sectors(self) -> int:
        """4 KiB sectors taken by the header and descriptors (data sectors follow)."""
        return -(-(LOG_ENTRY_HEADER_SIZE + LOG_DESCRIPTOR_SIZE * self.descriptor_count) // LOG_SECTOR)


def parse_log_entry_header(data: bytes) -> LogEntryHeader | None:
    """The header of a log entry, or None where ``data`` does not start with one."""
    if len(data) < LOG_ENTRY_HEADER_SIZE or data[:4] != LOG_ENTRY_SIGNATURE:
        return None
    _, _, length, tail, sequence, count, _, raw_guid, flushed, last = _LOG_ENTRY_HEADER.unpack_from(data)
    return LogEntryHeader(length, tail, sequence, count, guid(raw_guid), flushed, last)


@dataclass(frozen=True)
class LogWrite:
    """One descriptor of a log entry: ``length`` bytes at ``file_offset``, ``data`` or zeros."""

    file_offset: int
    length: int
    data: bytes | None  # None: zeros


def parse_log_entry(entry: bytes, header: LogEntryHeader) -> list[LogWrite]:
    """The writes of one whole log entry (checksum verified by the caller), descriptors and data
    sectors checked against the entry's sequence number."""
    writes: list[LogWrite] = []
    data_sector = header.descriptor_sectors
    for index in range(header.descriptor_count):
        signature, trailing, leading_or_length, file_offset, sequence = _LOG_DESCRIPTOR.unpack_from(
            entry, LOG_ENTRY_HEADER_SIZE + index * LOG_DESCRIPTOR_SIZE
        )
        if sequence != header.sequence_number:
            raise VhdxError(f"descriptor {index} has sequence number {sequence}, not its entry's")
        if file_offset % LOG_SECTOR:
            raise VhdxError(f"descriptor {index} targets unaligned offset {file_offset}")
        if signature == LOG_ZERO_DESCRIPTOR:
            if leading_or_length % LOG_SECTOR:
                raise VhdxError(f"zero descriptor {index} has unaligned length {leading_or_length}")
            writes.append(LogWrite(file_offset, leading_or_length, None))
        elif signature == LOG_DATA_DESCRIPTOR:
            start = data_sector * LOG_SECTOR
            sector = entry[start : start + LOG_SECTOR]
            if len(sector) != LOG_SECTOR or sector[:4] != LOG_DATA_SECTOR:
                raise VhdxError(f"data sector of descriptor {index} is missing")
            high, low = struct.unpack_from("<I", sector, 4)[0], struct.unpack_from("<I", sector, 4092)[0]
            if (high << 32 | low) != header.sequence_number:
                raise VhdxError(f"data sector of descriptor {index} belongs to another entry")
            data = struct.pack("<Q", leading_or_length) + sector[8:4092] + struct.pack("<I", trailing)
            writes.append(LogWrite(file_offset, LOG_SECTOR, data))
            data_sector += 1
        else:
            raise VhdxError(f"descriptor {index} has unknown signature {signature!r}")
    if data_sector * LOG_SECTOR > header.entry_length:
        raise VhdxError("data sectors run past the entry")
    return writes
