"""BitLocker volumes: the volume header and the FVE metadata, read without any key.

The layouts are those of libbde's "BitLocker Drive Encryption (BDE) format specification"
(https://github.com/libyal/libbde/blob/main/documentation/BitLocker%20Drive%20Encryption%20(BDE)%20format.asciidoc);
the quoted titles below are its sections. Three volume headers exist ("Volume header"): Windows Vista
(``EB 52 90 -FVE-FS-``, the first FVE metadata block given as a cluster number at 56), Windows 7 and
later (``EB 58 90 -FVE-FS-``, the BitLocker identifier GUID at 160 and the three FVE metadata block
offsets at 176, 184, 192) and BitLocker To Go (a FAT32 boot sector, ``MSWIN4.1``, with the GUID
at 424 and the offsets at 440, 448, 456). Each of the three FVE metadata blocks ("FVE metadata block") starts
with a 64-byte block header (``-FVE-FS-``, version 1 for Vista, 2 for Windows 7 and later), then a
48-byte metadata header (the volume GUID, the encryption method) and metadata entries (key
protectors, the description Windows shows).

``parse_volume_header``, ``parse_fve_block_header`` and ``parse_fve_metadata`` are pure and raise
only :class:`~diskimg.errors.CorruptImage`; ``read_bitlocker`` reads a volume, falling back to the
second and third metadata copies when one is damaged.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import ClassVar

from ...errors import CorruptImage
from ..fs.base import read_volume
from ..signatures import Disk

FVE_SIGNATURE = b"-FVE-FS-"
VOLUME_HEADER_SIZE = 512
#: boot entry points ("Volume header"): Vista's, and that of Windows 7 and later (and To Go)
VISTA_BOOT_ENTRY = b"\xeb\x52\x90"
WINDOWS7_BOOT_ENTRY = b"\xeb\x58\x90"
TO_GO_SIGNATURE = b"MSWIN4.1"
#: sizes of the "FVE metadata block header" and the "FVE metadata header"
BLOCK_HEADER_SIZE = 64
METADATA_HEADER_SIZE = 48
#: the metadata blocks Windows 7 writes are 64 KiB; what a header claims beyond this is not read
MAX_METADATA_SIZE = 1 << 20
#: "FVE metadata entry" header: size, entry type, value type, version
ENTRY_HEADER_SIZE = 8
ENTRY_VMK = 0x0002  # a volume master key, protected by a key protector
ENTRY_DESCRIPTION = 0x0007  # "computer name, volume name and date"
VALUE_UNICODE = 0x0002
VALUE_VMK = 0x0008
VMK_PROTECTION_OFFSET = 26  # in a VMK value: key identifier (16), FILETIME (8), unknown (2), then this

#: "Encryption methods" of the FVE metadata header
ENCRYPTION_METHODS = {
    0x8000: "aes-cbc-128-elephant", 0x8001: "aes-cbc-256-elephant", 0x8002: "aes-cbc-128", 0x8003: "aes-cbc-256",
    0x8004: "aes-xts-128", 0x8005: "aes-xts-256",
}
#: "Key protection types" of a volume master key
PROTECTORS = {
    0x0000: "clear key", 0x0100: "TPM", 0x0200: "startup key", 0x0500: "TPM and PIN", 0x0800: "recovery password",
    0x2000: "password",
}
#: bytes per sector a volume header may declare
SECTOR_SIZES = (512, 1024, 2048, 4096)


@dataclass(frozen=True)
class BitLockerHeader:
    """The first sector of a BitLocker volume."""

    variant: str  # "vista", "windows7" (7 and later) or "to-go"
    bytes_per_sector: int
    sectors_per_cluster: int
    identifier: str | None  # the BitLocker GUID (not written by Vista)
    metadata_offsets: tuple[int, ...]  # bytes from the volume's start; Vista names only the first


@dataclass(frozen=True)
class FveBlockHeader:
    """The 64-byte header of an FVE metadata block."""

    version: int  # 1: Vista, 2: Windows 7 and later
    metadata_offsets: tuple[int, int, int]
    encrypted_size: int | None  # version 2: bytes still encrypted (decryption runs from the back)
    volume_header_offset: int | None  # version 2: where the original boot sectors are kept, encrypted


@dataclass(frozen=True)
class FveMetadata:
    """The metadata header and the entries diskimg reports."""

    size: int
    volume_guid: str
    encryption_method: int
    description: str | None
    protectors: tuple[str, ...]


@dataclass(frozen=True)
class BitLockerVolume:
    """A BitLocker volume as its metadata describes it."""

    kind: ClassVar[str] = "bitlocker"
    version: str  # the FVE metadata block version: "1" (Vista) or "2" (Windows 7 and later)
    variant: str
    uuid: str | None  # the volume GUID
    cipher: str | None  # ENCRYPTION_METHODS' name; None where the method is not one of them
    label: str | None  # the description entry
    encryption_method: int
    encrypted_size: int | None
    metadata_offsets: tuple[int, ...]
    protectors: tuple[str, ...]


def _guid(raw: bytes) -> str:
    """A GUID as Windows stores it (the first three fields little-endian)."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


def parse_volume_header(sector: bytes) -> BitLockerHeader | None:
    """The BitLocker volume header in ``sector``, or None when it is not one.

    A To Go header is a FAT32 boot sector like any Windows writes: it is only a candidate until
    its metadata block is found (``read_bitlocker`` does that).
    """
    if len(sector) < VOLUME_HEADER_SIZE:
        return None
    bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", sector, 11)
    if sector[3:11] == FVE_SIGNATURE and sector[:3] == VISTA_BOOT_ENTRY:
        variant, identifier, offsets = "vista", None, None
    elif sector[3:11] == FVE_SIGNATURE:
        variant, identifier, offsets = "windows7", sector[160:176], struct.unpack_from("<3Q", sector, 176)
    elif sector[:3] == WINDOWS7_BOOT_ENTRY and sector[3:11] == TO_GO_SIGNATURE:
        variant, identifier, offsets = "to-go", sector[424:440], struct.unpack_from("<3Q", sector, 440)
    else:
        return None
    if bytes_per_sector not in SECTOR_SIZES or not sectors_per_cluster:
        raise CorruptImage(f"BitLocker volume header with {bytes_per_sector}-byte sectors, {sectors_per_cluster} "
                           "per cluster", offset=11, structure="BitLocker volume header")
    if offsets is None:  # Vista: the first block's cluster number where NTFS keeps the MFT mirror's
        offsets = (struct.unpack_from("<Q", sector, 56)[0] * sectors_per_cluster * bytes_per_sector,)
    return BitLockerHeader(variant=variant, bytes_per_sector=bytes_per_sector, sectors_per_cluster=sectors_per_cluster,
                           identifier=_guid(identifier) if identifier is not None else None,
                           metadata_offsets=tuple(offsets))


def parse_fve_block_header(raw: bytes) -> FveBlockHeader:
    """The block header starting an FVE metadata block."""
    if len(raw) < BLOCK_HEADER_SIZE or raw[:8] != FVE_SIGNATURE:
        raise CorruptImage("no FVE metadata block signature", structure="BitLocker metadata block")
    version = struct.unpack_from("<H", raw, 10)[0]
    offsets = struct.unpack_from("<3Q", raw, 32)
    if version == 1:
        return FveBlockHeader(version=1, metadata_offsets=offsets, encrypted_size=None, volume_header_offset=None)
    if version == 2:
        return FveBlockHeader(version=2, metadata_offsets=offsets, encrypted_size=struct.unpack_from("<Q", raw, 16)[0],
                              volume_header_offset=struct.unpack_from("<Q", raw, 56)[0])
    raise CorruptImage(f"FVE metadata block version {version} (1 and 2 are known)", offset=10,
                       structure="BitLocker metadata block")


def metadata_size(header: bytes) -> int:
    """The size the 48-byte metadata header gives its metadata (header and entries), checked."""
    if len(header) < METADATA_HEADER_SIZE:
        raise CorruptImage("FVE metadata header truncated", structure="BitLocker metadata")
    size, version, header_size = struct.unpack_from("<III", header, 0)
    if version != 1 or header_size != METADATA_HEADER_SIZE:
        raise CorruptImage(f"FVE metadata header version {version}, size {header_size} (1 and 48 are known)",
                           structure="BitLocker metadata")
    if not METADATA_HEADER_SIZE <= size <= MAX_METADATA_SIZE:
        raise CorruptImage(f"FVE metadata of {size} bytes (48 to {MAX_METADATA_SIZE})", structure="BitLocker metadata")
    return int(size)


def parse_fve_metadata(raw: bytes) -> FveMetadata:
    """The FVE metadata (the part of a block after its block header): header and entries."""
    size = metadata_size(raw)
    if len(raw) < size:
        raise CorruptImage(f"FVE metadata of {size} bytes truncated at {len(raw)}", structure="BitLocker metadata")
    description = None
    protectors = []
    position = METADATA_HEADER_SIZE
    while position + ENTRY_HEADER_SIZE <= size:
        entry_size, entry_type, value_type = struct.unpack_from("<HHH", raw, position)
        if entry_size == 0:  # zero padding after the last entry
            break
        if entry_size < ENTRY_HEADER_SIZE or position + entry_size > size:
            raise CorruptImage(f"FVE metadata entry of {entry_size} bytes", offset=position,
                               structure="BitLocker metadata")
        value = raw[position + ENTRY_HEADER_SIZE : position + entry_size]
        if entry_type == ENTRY_DESCRIPTION and value_type == VALUE_UNICODE:
            description = value.decode("utf-16-le", errors="replace").split("\0", 1)[0] or None
        elif entry_type == ENTRY_VMK and value_type == VALUE_VMK and len(value) >= VMK_PROTECTION_OFFSET + 2:
            protection = struct.unpack_from("<H", value, VMK_PROTECTION_OFFSET)[0]
            protectors.append(PROTECTORS.get(protection, f"0x{protection:04x}"))
        position += entry_size
    return FveMetadata(size=size, volume_guid=_guid(raw[16:32]),
                       encryption_method=struct.unpack_from("<I", raw, 36)[0] & 0xFFFF,  # high half: unknown use
                       description=description, protectors=tuple(protectors))


def read_bitlocker(disk: Disk, offset: int, length: int) -> BitLockerVolume | None:
    """The BitLocker volume spanning ``length`` bytes from ``offset`` of ``disk``, or None when it is
    not one (a To Go candidate with no FVE signature where its header points is a plain FAT32).
    The first sound metadata block of the three is used; when none is, the first one's error is raised."""
    if length < VOLUME_HEADER_SIZE:
        return None
    header = parse_volume_header(read_volume(disk, offset, length, 0, VOLUME_HEADER_SIZE, "BitLocker volume header"))
    if header is None:
        return None
    places = [place for place in dict.fromkeys(header.metadata_offsets) if place and place < length]
    if header.variant == "to-go" and not any(disk.read(offset + place, 8) == FVE_SIGNATURE for place in places):
        return None
    first_error = CorruptImage("the BitLocker volume header names no FVE metadata block inside the volume",
                               offset=offset, structure="BitLocker volume header")
    for number, place in enumerate(places):
        try:
            block, metadata = _read_block(disk, offset, length, place)
        except CorruptImage as exc:
            first_error = exc if number == 0 else first_error
            continue
        return BitLockerVolume(
            version=str(block.version), variant=header.variant, uuid=metadata.volume_guid,
            cipher=ENCRYPTION_METHODS.get(metadata.encryption_method), label=metadata.description,
            encryption_method=metadata.encryption_method, encrypted_size=block.encrypted_size,
            metadata_offsets=block.metadata_offsets, protectors=metadata.protectors,
        )
    raise first_error


def _read_block(disk: Disk, offset: int, length: int, place: int) -> tuple[FveBlockHeader, FveMetadata]:
    if place + BLOCK_HEADER_SIZE + METADATA_HEADER_SIZE > length:
        raise CorruptImage(f"FVE metadata block at {place} lies past the volume's {length} bytes",
                           offset=offset + place, structure="BitLocker metadata block")
    start = read_volume(disk, offset, length, place, BLOCK_HEADER_SIZE + METADATA_HEADER_SIZE, "BitLocker metadata")
    block = parse_fve_block_header(start)
    size = metadata_size(start[BLOCK_HEADER_SIZE:])
    if place + BLOCK_HEADER_SIZE + size > length:
        raise CorruptImage(f"FVE metadata of {size} bytes at {place} reaches past the volume", offset=offset + place,
                           structure="BitLocker metadata")
    return block, parse_fve_metadata(read_volume(disk, offset, length, place + BLOCK_HEADER_SIZE, size,
                                                 "BitLocker metadata"))
