"""MBR and GPT partition tables: pure parsers for their structures, and the checks a cloud import
needs (signatures, GPT CRC32s, the backup GPT at the last LBA, entries inside the disk, overlaps,
the protective MBR, extended/logical MBR partitions with a loop guard).

The parse functions (``parse_mbr``, ``parse_gpt_header``, ``parse_gpt_entries``) turn bytes into
values and never raise anything but :class:`CorruptImage`. ``read_partition_table(disk)`` does the
I/O through anything with ``read_at(offset, length) -> bytes`` (a :class:`~diskimg.formats.reader.DiskReader`)
and reports what it found wrong as :class:`TableIssue` values instead of raising: a broken table
is a finding, not an error of the tool.

Sectors are 512 bytes (what clouds present); a GPT written for 4096-byte sectors is recognised
too, and reported, because such a disk cannot be read as a 512-byte-sector disk.

Linux semantics are followed where the tools disagree: a GPT counts only with a protective (or
hybrid) MBR entry of type 0xEE starting at LBA 1, as the kernel requires (``is_pmbr_valid``);
otherwise the MBR is what the guest sees.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptImage
from ..units import SECTOR_SIZE
from .signatures import Disk, SizedDisk, probe_boot_sector

GPT_SIGNATURE = b"EFI PART"
MBR_SIGNATURE = b"\x55\xaa"

#: caps on what a GPT header may claim, so that an image cannot make us allocate or loop at will
MAX_GPT_ENTRIES = 16384
MAX_GPT_ENTRY_SIZE = 4096
MAX_GPT_ARRAY_BYTES = 4 << 20
#: logical partitions followed in an extended partition before the chain is called a loop
MAX_LOGICAL_PARTITIONS = 256

MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MBR_PROTECTIVE_TYPE = 0xEE
MBR_ESP_TYPE = 0xEF

# Partition type GUIDs (canonical upper-case strings).
GUID_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GUID_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GUID_LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GUID_LINUX_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
GUID_LINUX_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
GUID_LINUX_RAID = "A19D880F-05FC-4D3B-A006-743F0F84911E"
GUID_LINUX_LUKS = "CA7D7CCB-63ED-4C53-861C-1742536059CC"
GUID_MS_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
GUID_MS_RESERVED = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"
GUID_MS_RECOVERY = "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC"
GUID_MS_LDM_DATA = "AF9B60A0-1431-4F62-BC68-3311714A69AD"
GUID_XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"

#: GPT type GUID -> (kind, name). ``kind`` is what the validator reasons about.
GPT_TYPES: dict[str, tuple[str, str]] = {
    GUID_ESP: ("esp", "EFI System"),
    GUID_BIOS_BOOT: ("bios_boot", "BIOS boot"),
    GUID_LINUX_FS: ("linux", "Linux filesystem"),
    GUID_LINUX_LVM: ("lvm", "Linux LVM"),
    GUID_LINUX_SWAP: ("swap", "Linux swap"),
    GUID_LINUX_RAID: ("raid", "Linux RAID"),
    GUID_LINUX_LUKS: ("luks", "Linux LUKS"),
    GUID_XBOOTLDR: ("linux", "Linux extended boot"),
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": ("linux", "Linux root (x86-64)"),
    "44479540-F297-41B2-9AF7-D131D5F0458A": ("linux", "Linux root (x86)"),
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": ("linux", "Linux root (ARM64)"),
    "8484680C-9521-48C6-9C11-B0720656F69E": ("linux", "Linux /usr (x86-64)"),
    "B0E01050-EE5F-4390-949A-9101B17104E9": ("linux", "Linux /usr (ARM64)"),
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": ("linux", "Linux /home"),
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": ("linux", "Linux /srv"),
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D": ("linux", "Linux /var"),
    GUID_MS_BASIC_DATA: ("msdata", "Microsoft basic data"),
    GUID_MS_RESERVED: ("msr", "Microsoft reserved"),
    GUID_MS_RECOVERY: ("recovery", "Windows recovery environment"),
    GUID_MS_LDM_DATA: ("ldm", "Windows LDM data"),
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": ("ldm", "Windows LDM metadata"),
    "516E7CB4-6ECF-11D6-8FF8-00022D09712B": ("bsd", "FreeBSD data"),
    "83BD6B9D-7F41-11DC-BE0B-001560B84F0F": ("bsd", "FreeBSD boot"),
    "516E7CBA-6ECF-11D6-8FF8-00022D09712B": ("bsd", "FreeBSD ZFS"),
    "6A898CC3-1DD2-11B2-99A6-080020736631": ("zfs", "Solaris /usr or Apple ZFS"),
    "48465300-0000-11AA-AA11-00306543ECAC": ("apple", "Apple HFS+"),
}

#: MBR partition type -> (kind, name)
MBR_TYPES: dict[int, tuple[str, str]] = {
    0x01: ("fat", "FAT12"),
    0x04: ("fat", "FAT16 <32M"),
    0x05: ("extended", "Extended"),
    0x06: ("fat", "FAT16"),
    0x07: ("msdata", "HPFS/NTFS/exFAT"),
    0x0B: ("fat", "W95 FAT32"),
    0x0C: ("fat", "W95 FAT32 (LBA)"),
    0x0E: ("fat", "W95 FAT16 (LBA)"),
    0x0F: ("extended", "W95 Extended (LBA)"),
    0x11: ("fat", "Hidden FAT12"),
    0x12: ("recovery", "Compaq diagnostics / recovery"),
    0x17: ("msdata", "Hidden HPFS/NTFS"),
    0x27: ("recovery", "Hidden NTFS WinRE"),
    0x42: ("ldm", "Windows dynamic disk (LDM)"),
    0x82: ("swap", "Linux swap"),
    0x83: ("linux", "Linux"),
    0x85: ("extended", "Linux extended"),
    0x8E: ("lvm", "Linux LVM"),
    0xA5: ("bsd", "FreeBSD"),
    0xA6: ("bsd", "OpenBSD"),
    0xA9: ("bsd", "NetBSD"),
    0xBF: ("zfs", "Solaris"),
    0xEE: ("protective", "GPT protective"),
    0xEF: ("esp", "EFI System"),
    0xFD: ("raid", "Linux RAID autodetect"),
}


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MbrEntry:
    index: int  # 0..3 within its sector
    status: int
    type: int
    start_lba: int
    sectors: int

    @property
    def used(self) -> bool:
        return self.type != 0

    @property
    def bootable(self) -> bool:
        return self.status == 0x80


@dataclass(frozen=True)
class Mbr:
    """Sector 0 (or an EBR): bootstrap code, disk signature, four entries, the 55 AA signature."""

    bootstrap: bytes
    disk_signature: int
    entries: tuple[MbrEntry, ...]
    signature_ok: bool

    @property
    def has_boot_code(self) -> bool:
        """Non-zero bootstrap area (bytes 0-439; the disk signature follows and does not count)."""
        return any(self.bootstrap)

    @property
    def boot_loader(self) -> str | None:
        """A best guess at the boot code's author, from strings boot loaders leave in it."""
        return identify_boot_code(self.bootstrap)

    @property
    def entries_sane(self) -> bool:
        """Status bytes are 0x00 or 0x80, as every MBR-writing tool sets them."""
        return all(entry.status in (0x00, 0x80) for entry in self.entries)

    @property
    def protective_entry(self) -> MbrEntry | None:
        for entry in self.entries:
            if entry.type == MBR_PROTECTIVE_TYPE:
                return entry
        return None


@dataclass(frozen=True)
class GptHeader:
    revision: int
    header_size: int
    header_crc: int
    crc_ok: bool
    current_lba: int
    backup_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: str
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


@dataclass(frozen=True)
class GptEntry:
    index: int  # 0-based slot in the array
    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int
    attributes: int
    name: str


@dataclass
class Partition:
    """A partition as a guest sees it; bounds in bytes (``start``, ``size``) and in sectors."""

    number: int  # 1-4 primary and 5+ logical (MBR, as Linux numbers them); GPT slot + 1
    scheme: str  # "mbr" | "gpt"
    start: int
    size: int
    type: str  # "0x83", or a GPT type GUID
    type_name: str
    kind: str  # esp, bios_boot, linux, lvm, swap, msdata, msr, recovery, extended, ... or "other"
    first_lba: int
    last_lba: int  # inclusive
    bootable: bool = False  # MBR active flag, or GPT attribute bit 2 (legacy BIOS bootable)
    logical: bool = False
    name: str | None = None
    guid: str | None = None
    attributes: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "number": self.number,
            "start": self.start,
            "size": self.size,
            "end": self.end,
            "first_lba": self.first_lba,
            "last_lba": self.last_lba,
            "type": self.type,
            "type_name": self.type_name,
            "kind": self.kind,
            "bootable": self.bootable,
        }
        if self.scheme == "mbr":
            entry["logical"] = self.logical
        else:
            entry["name"] = self.name
            entry["guid"] = self.guid
            entry["attributes"] = self.attributes
        return entry


@dataclass(frozen=True)
class TableIssue:
    """Something wrong with a partition table. ``code`` names a validator rule."""

    code: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartitionTable:
    """What ``read_partition_table`` found: the scheme the guest will see, its partitions, issues."""

    scheme: str | None  # "mbr", "gpt", or None (no partition table)
    disk_size: int
    sector_size: int = SECTOR_SIZE
    partitions: list[Partition] = field(default_factory=list)
    issues: list[TableIssue] = field(default_factory=list)
    mbr: Mbr | None = None
    gpt: GptHeader | None = None
    #: "primary" or "backup": which GPT header the partitions were read from
    gpt_source: str | None = None
    #: a GPT with an MBR that also describes partitions (besides the 0xEE entry)
    hybrid_mbr: bool = False
    #: the extended partition container (MBR), kept out of ``partitions``
    extended: Partition | None = None
    #: where the tables themselves lie, as (offset, length, what) in bytes: sector 0, the GPT headers and
    #: entry arrays (primary and backup), each extended boot record read; what rewrites a disk keeps these
    structures: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def disk_guid(self) -> str | None:
        return self.gpt.disk_guid if self.gpt else None

    def by_kind(self, kind: str) -> list[Partition]:
        return [p for p in self.partitions if p.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"scheme": self.scheme, "sector_size": self.sector_size}
        if self.mbr is not None:
            result["mbr_boot_code"] = self.mbr.has_boot_code
            result["mbr_boot_loader"] = self.mbr.boot_loader
            if self.scheme == "mbr":
                result["disk_signature"] = f"0x{self.mbr.disk_signature:08x}"
        if self.gpt is not None:
            result["disk_guid"] = self.gpt.disk_guid
            result["gpt_header"] = self.gpt_source
            result["first_usable_lba"] = self.gpt.first_usable_lba
            result["last_usable_lba"] = self.gpt.last_usable_lba
            result["hybrid_mbr"] = self.hybrid_mbr
        result["partitions"] = [p.to_dict() for p in self.partitions]
        return result


# -- pure parsers ---------------------------------------------------------------------------------


def parse_mbr(sector: bytes) -> Mbr:
    """Sector 0 or an EBR (512 bytes)."""
    if len(sector) < SECTOR_SIZE:
        raise CorruptImage(f"MBR needs {SECTOR_SIZE} bytes, got {len(sector)}", offset=0, structure="MBR")
    entries = []
    for index in range(4):
        base = 446 + 16 * index
        status, ptype, start, count = sector[base], sector[base + 4], *struct.unpack_from("<II", sector, base + 8)
        entries.append(MbrEntry(index, status, ptype, start, count))
    return Mbr(
        bootstrap=bytes(sector[:440]),
        disk_signature=struct.unpack_from("<I", sector, 440)[0],
        entries=tuple(entries),
        signature_ok=sector[510:512] == MBR_SIGNATURE,
    )


def guid_from_bytes(raw: bytes) -> str:
    """A GPT GUID (mixed-endian on disk) as an upper-case canonical string."""
    return str(uuid.UUID(bytes_le=bytes(raw))).upper()


def parse_gpt_header(block: bytes) -> GptHeader:
    """A GPT header (the first ``header_size`` bytes of its LBA). CRC validity is in ``crc_ok``."""
    if len(block) < 92 or block[:8] != GPT_SIGNATURE:
        raise CorruptImage("no GPT header signature 'EFI PART'", structure="GPT header")
    (revision, header_size, header_crc, _reserved, current, backup, first_usable, last_usable) = struct.unpack_from(
        "<IIIIQQQQ", block, 8
    )
    disk_guid = guid_from_bytes(block[56:72])
    entries_lba, num_entries, entry_size, entries_crc = struct.unpack_from("<QIII", block, 72)
    crc_ok = False
    if 92 <= header_size <= len(block):
        image = bytearray(block[:header_size])
        image[16:20] = b"\0\0\0\0"
        crc_ok = zlib.crc32(image) == header_crc
    return GptHeader(
        revision=revision,
        header_size=header_size,
        header_crc=header_crc,
        crc_ok=crc_ok,
        current_lba=current,
        backup_lba=backup,
        first_usable_lba=first_usable,
        last_usable_lba=last_usable,
        disk_guid=disk_guid,
        entries_lba=entries_lba,
        num_entries=num_entries,
        entry_size=entry_size,
        entries_crc=entries_crc,
    )


def gpt_array_problem(header: GptHeader) -> str | None:
    """Why a header's entry-array geometry cannot be trusted, or None."""
    if header.entry_size < 128 or header.entry_size > MAX_GPT_ENTRY_SIZE or header.entry_size % 128:
        return f"entry size {header.entry_size} is not a multiple of 128 between 128 and {MAX_GPT_ENTRY_SIZE}"
    if header.num_entries == 0 or header.num_entries > MAX_GPT_ENTRIES:
        return f"entry count {header.num_entries} is outside 1..{MAX_GPT_ENTRIES}"
    if header.num_entries * header.entry_size > MAX_GPT_ARRAY_BYTES:
        return f"entry array of {header.num_entries * header.entry_size} bytes is too large"
    return None


def parse_gpt_entries(data: bytes, entry_size: int, count: int) -> list[GptEntry]:
    """The used entries (type GUID not all zeros) of a GPT entry array."""
    if entry_size < 128 or count < 0 or len(data) < entry_size * count:
        raise CorruptImage("GPT entry array shorter than its header says", structure="GPT entries")
    entries = []
    for index in range(count):
        base = index * entry_size
        type_raw = data[base : base + 16]
        if not any(type_raw):
            continue
        first, last, attributes = struct.unpack_from("<QQQ", data, base + 32)
        name = bytes(data[base + 56 : base + 128]).decode("utf-16-le", errors="replace").split("\0", 1)[0]
        entries.append(
            GptEntry(
                index=index,
                type_guid=guid_from_bytes(type_raw),
                unique_guid=guid_from_bytes(data[base + 16 : base + 32]),
                first_lba=first,
                last_lba=last,
                attributes=attributes,
                name=name,
            )
        )
    return entries


def identify_boot_code(bootstrap: bytes) -> str | None:
    """Which boot loader wrote an MBR's bootstrap area, from the strings each one leaves there.

    Each loader is known by a message of its own: "Missing operating system" is in syslinux's
    mbr.bin as well as Windows', so it names neither."""
    if not any(bootstrap):
        return None
    for marker, name in (
        (b"GRUB", "grub"),
        (b"LILO", "lilo"),
        (b"SYSLINUX", "syslinux"),
        (b"Multiple active partitions", "syslinux"),  # mbr.bin and gptmbr.bin, which boot the active partition
        (b"Invalid partition table", "windows"),
        (b"Error loading operating system", "windows"),
        (b"Boot failed", "syslinux"),
        (b"isolinux", "isolinux"),
        (b"EXTLINUX", "extlinux"),
    ):
        if marker in bootstrap:
            return name
    return "unknown"


def mbr_type_info(ptype: int) -> tuple[str, str]:
    return MBR_TYPES.get(ptype, ("other", f"type 0x{ptype:02x}"))


def gpt_type_info(guid: str) -> tuple[str, str]:
    return GPT_TYPES.get(guid, ("other", f"type {guid}"))


# -- reading a disk ---------------------------------------------------------------------------------


def read_partition_table(disk: SizedDisk, disk_size: int | None = None) -> PartitionTable:
    """The partition table of ``disk`` as the guest will see it, with every issue found.

    ``disk_size`` defaults to ``disk.virtual_size``. Only DiskImageError can escape (a read of a
    damaged image that fails); a damaged table itself is reported in ``issues``.
    """
    size = int(disk_size if disk_size is not None else disk.virtual_size)
    table = PartitionTable(scheme=None, disk_size=size)
    if size < SECTOR_SIZE:
        return table
    head = disk.read_at(0, min(size, 2 * 4096))
    mbr = parse_mbr(head[:SECTOR_SIZE]) if len(head) >= SECTOR_SIZE else None
    table.mbr = mbr
    table.structures.append((0, SECTOR_SIZE, "MBR"))

    gpt_sector_size = None
    if head[SECTOR_SIZE : SECTOR_SIZE + 8] == GPT_SIGNATURE:
        gpt_sector_size = SECTOR_SIZE
    elif head[4096 : 4096 + 8] == GPT_SIGNATURE:
        gpt_sector_size = 4096
    elif mbr is not None and mbr.signature_ok and mbr.protective_entry is not None:
        # A protective MBR without a primary header: a GPT disk whose primary header is gone (the
        # backup at the last LBA may still be there).
        gpt_sector_size = SECTOR_SIZE

    if gpt_sector_size is not None:
        protective = _protective_entry(mbr, gpt_sector_size)
        if protective is not None or not _mbr_describes_partitions(mbr):
            _read_gpt(disk, table, gpt_sector_size, protective)
            return table
        # An MBR with real partitions and no 0xEE entry: Linux and firmware use the MBR.
        table.issues.append(
            TableIssue(
                "gpt-stale",
                "a GPT header is present but the MBR has no protective 0xEE entry, so the guest sees the "
                "MBR partitions; partitioning tools may read the stale GPT instead",
                {"offset": gpt_sector_size},
            )
        )
    if (mbr is not None and mbr.signature_ok and mbr.entries_sane and not _boot_sector_file_system(head)
            and (_mbr_describes_partitions(mbr) or mbr.has_boot_code)):
        _read_mbr(disk, table, mbr)
    return table


def _protective_entry(mbr: Mbr | None, sector_size: int) -> MbrEntry | None:
    """The 0xEE entry that makes a GPT valid for Linux: in a signed MBR, starting at LBA 1."""
    if mbr is None or not mbr.signature_ok:
        return None
    for entry in mbr.entries:
        if entry.type == MBR_PROTECTIVE_TYPE and entry.start_lba == 1:
            return entry
    return None


def _mbr_describes_partitions(mbr: Mbr | None) -> bool:
    return (
        mbr is not None
        and mbr.signature_ok
        and mbr.entries_sane
        and any(e.used and e.type != MBR_PROTECTIVE_TYPE for e in mbr.entries)
    )


def _boot_sector_file_system(head: bytes) -> bool:
    """Sector 0 is the boot sector of a whole-disk file system (its 55 AA is not an MBR's)."""
    return probe_boot_sector(head) is not None


def _read_mbr(disk: Disk, table: PartitionTable, mbr: Mbr) -> None:
    table.scheme = "mbr"
    size = table.disk_size
    sectors = size // SECTOR_SIZE
    for entry in mbr.entries:
        if not entry.used:
            continue
        kind, name = mbr_type_info(entry.type)
        number = entry.index + 1
        if entry.sectors == 0 or entry.start_lba == 0:
            table.issues.append(
                TableIssue(
                    "partition-invalid",
                    f"MBR partition {number} (type 0x{entry.type:02x}) "
                    + ("has no sectors" if entry.sectors == 0 else "starts at LBA 0, over the partition table"),
                    {"partition": number, "start_lba": entry.start_lba, "sectors": entry.sectors,
                     "offset": 446 + 16 * entry.index},
                )
            )
            continue
        part = Partition(
            number=number,
            scheme="mbr",
            start=entry.start_lba * SECTOR_SIZE,
            size=entry.sectors * SECTOR_SIZE,
            type=f"0x{entry.type:02x}",
            type_name=name,
            kind=kind,
            first_lba=entry.start_lba,
            last_lba=entry.start_lba + entry.sectors - 1,
            bootable=entry.bootable,
        )
        if part.last_lba >= sectors:
            table.issues.append(_out_of_bounds(part, size, "past the end of the disk"))
        if kind == "extended":
            if table.extended is not None:
                table.issues.append(
                    TableIssue(
                        "partition-invalid",
                        f"MBR partition {number} is a second extended partition; only the first is followed",
                        {"partition": number},
                    )
                )
                continue
            table.extended = part
        else:
            table.partitions.append(part)
    if table.extended is not None:
        _read_logical(disk, table, table.extended)
    _check_overlaps(table)


def _read_logical(disk: Disk, table: PartitionTable, extended: Partition) -> None:
    """Follow the EBR chain of an extended partition, with a loop guard."""
    size = table.disk_size
    base_lba = extended.first_lba
    ebr_lba = base_lba
    seen: set[int] = set()
    number = 5
    while True:
        if ebr_lba in seen or len(seen) >= MAX_LOGICAL_PARTITIONS:
            table.issues.append(
                TableIssue(
                    "mbr-ebr-loop",
                    "the chain of logical partitions loops back on itself"
                    if ebr_lba in seen
                    else f"more than {MAX_LOGICAL_PARTITIONS} logical partitions: the chain is taken as a loop",
                    {"offset": ebr_lba * SECTOR_SIZE, "lba": ebr_lba, "logical_partitions": number - 5},
                )
            )
            return
        seen.add(ebr_lba)
        offset = ebr_lba * SECTOR_SIZE
        if offset + SECTOR_SIZE <= size:
            table.structures.append((offset, SECTOR_SIZE, "extended boot record"))
        if offset + SECTOR_SIZE > size or ebr_lba > extended.last_lba:
            table.issues.append(
                TableIssue(
                    "partition-out-of-bounds",
                    f"the extended boot record at LBA {ebr_lba} lies outside "
                    + ("the disk" if offset + SECTOR_SIZE > size else "its extended partition"),
                    {"offset": offset, "lba": ebr_lba, "partition": extended.number, "disk_size": size},
                )
            )
            return
        sector = disk.read_at(offset, SECTOR_SIZE)
        ebr = parse_mbr(sector)
        if not ebr.signature_ok:
            table.issues.append(
                TableIssue(
                    "mbr-ebr-invalid",
                    f"the extended boot record at LBA {ebr_lba} has no 55 AA signature; logical partitions "
                    "from here on are lost",
                    {"offset": offset + 510, "lba": ebr_lba, "value": sector[510:512].hex()},
                )
            )
            return
        first, link = ebr.entries[0], ebr.entries[1]
        if first.used and first.sectors:
            kind, name = mbr_type_info(first.type)
            start_lba = ebr_lba + first.start_lba
            part = Partition(
                number=number,
                scheme="mbr",
                start=start_lba * SECTOR_SIZE,
                size=first.sectors * SECTOR_SIZE,
                type=f"0x{first.type:02x}",
                type_name=name,
                kind=kind,
                first_lba=start_lba,
                last_lba=start_lba + first.sectors - 1,
                bootable=first.bootable,
                logical=True,
            )
            if part.last_lba * SECTOR_SIZE >= size:
                table.issues.append(_out_of_bounds(part, size, "past the end of the disk"))
            elif part.last_lba > extended.last_lba or part.first_lba <= ebr_lba:
                table.issues.append(_out_of_bounds(part, size, "outside its extended partition"))
            table.partitions.append(part)
            number += 1
        if not link.used or link.type not in MBR_EXTENDED_TYPES or link.start_lba == 0:
            return
        ebr_lba = base_lba + link.start_lba


def _read_gpt(disk: Disk, table: PartitionTable, sector_size: int, protective: MbrEntry | None) -> None:
    table.scheme = "gpt"
    table.sector_size = sector_size
    size = table.disk_size
    total = size // sector_size
    last_lba = total - 1
    if sector_size != SECTOR_SIZE:
        table.issues.append(
            TableIssue(
                "gpt-4k-sectors",
                "the GPT was written for 4096-byte sectors (a 4Kn disk); the cloud presents 512-byte sectors, "
                "where this disk has no partition table",
                {"offset": sector_size, "sector_size": sector_size},
            )
        )
    mbr = table.mbr
    if protective is None:
        table.issues.append(
            TableIssue(
                "gpt-protective-mbr-missing",
                "the GPT has no protective MBR (a signed MBR with a type 0xEE entry starting at LBA 1); "
                "Linux ignores such a GPT and firmware may too",
                {"offset": 0, "value": _mbr_summary(mbr)},
            )
        )
    elif mbr is not None:
        table.hybrid_mbr = any(e.used and e.type != MBR_PROTECTIVE_TYPE for e in mbr.entries)

    primary = _read_gpt_header(disk, sector_size, 1, size)
    _add_gpt_structures(table, primary, 1, sector_size)
    backup_lba_hint = primary.backup_lba if isinstance(primary, GptHeader) and primary.crc_ok else last_lba
    backup = _read_gpt_header(disk, sector_size, last_lba, size)
    _add_gpt_structures(table, backup, last_lba, sector_size)
    backup_damaged = not isinstance(backup, GptHeader) or not backup.crc_ok
    if backup_damaged and backup_lba_hint != last_lba and 0 < backup_lba_hint < total:
        elsewhere = _read_gpt_header(disk, sector_size, backup_lba_hint, size)
        _add_gpt_structures(table, elsewhere, backup_lba_hint, sector_size)
        if isinstance(elsewhere, GptHeader) and elsewhere.crc_ok:
            backup = elsewhere

    primary_ok = isinstance(primary, GptHeader) and primary.crc_ok
    backup_ok = isinstance(backup, GptHeader) and backup.crc_ok
    if not primary_ok:
        found = primary.header_crc if isinstance(primary, GptHeader) else None
        table.issues.append(
            TableIssue(
                "gpt-header-invalid",
                "the primary GPT header at LBA 1 "
                + ("has a bad CRC32" if isinstance(primary, GptHeader) else str(primary))
                + ("; the backup header is intact and was used" if backup_ok
                   else "; the backup header is not usable either"),
                {"offset": sector_size, "value": None if found is None else f"0x{found:08x}",
                 "backup_usable": backup_ok},
            )
        )
    header: GptHeader | None = None
    if primary_ok and isinstance(primary, GptHeader):
        header = primary
    elif backup_ok and isinstance(backup, GptHeader):
        header = backup
    if header is None:
        return
    table.gpt = header
    table.gpt_source = "primary" if primary_ok else "backup"

    if primary_ok:
        assert isinstance(primary, GptHeader)
        if primary.backup_lba != last_lba:
            table.issues.append(
                TableIssue(
                    "gpt-backup-not-at-end",
                    f"the GPT says its backup header is at LBA {primary.backup_lba} but the disk's last LBA is "
                    f"{last_lba}" + (" (the disk was enlarged after partitioning)" if primary.backup_lba < last_lba
                                     else " (the disk is smaller than its GPT says: truncated?)"),
                    {"offset": sector_size + 32, "value": primary.backup_lba, "expected": last_lba},
                )
            )
        if not backup_ok:
            table.issues.append(
                TableIssue(
                    "gpt-backup-missing",
                    "the backup GPT header is missing or damaged "
                    f"(looked at LBA {last_lba}"
                    + (f" and LBA {primary.backup_lba}" if primary.backup_lba != last_lba else "")
                    + ")",
                    {"offset": last_lba * sector_size, "lba": last_lba},
                )
            )
        if primary.last_usable_lba >= total or primary.first_usable_lba > primary.last_usable_lba:
            table.issues.append(
                TableIssue(
                    "gpt-header-invalid",
                    f"the GPT's usable area (LBA {primary.first_usable_lba}-{primary.last_usable_lba}) does not fit "
                    f"a disk of {total} sectors",
                    {"offset": sector_size + 40, "value": [primary.first_usable_lba, primary.last_usable_lba],
                     "disk_sectors": total},
                )
            )

    entries = _read_gpt_entries(disk, table, header, sector_size, "primary" if primary_ok else "backup")
    if entries is None and primary_ok and backup_ok:
        assert isinstance(backup, GptHeader)
        entries = _read_gpt_entries(disk, table, backup, sector_size, "backup")
    if entries is None:
        return
    for entry in entries:
        kind, name = gpt_type_info(entry.type_guid)
        part = Partition(
            number=entry.index + 1,
            scheme="gpt",
            start=entry.first_lba * sector_size,
            size=max(0, entry.last_lba - entry.first_lba + 1) * sector_size,
            type=entry.type_guid,
            type_name=name,
            kind=kind,
            first_lba=entry.first_lba,
            last_lba=entry.last_lba,
            bootable=bool(entry.attributes & 0x4),
            name=entry.name,
            guid=entry.unique_guid,
            attributes=entry.attributes,
        )
        if entry.last_lba < entry.first_lba:
            table.issues.append(
                TableIssue(
                    "partition-invalid",
                    f"GPT partition {part.number} ends (LBA {entry.last_lba}) before it starts (LBA {entry.first_lba})",
                    {"partition": part.number, "first_lba": entry.first_lba, "last_lba": entry.last_lba},
                )
            )
            continue
        if entry.last_lba >= total:
            table.issues.append(_out_of_bounds(part, size, "past the end of the disk"))
        elif entry.first_lba < header.first_usable_lba or entry.last_lba > header.last_usable_lba:
            table.issues.append(
                _out_of_bounds(
                    part, size,
                    f"outside the GPT's usable area (LBA {header.first_usable_lba}-{header.last_usable_lba}), "
                    "over the GPT's own structures",
                )
            )
        table.partitions.append(part)
    _check_overlaps(table)


def _add_gpt_structures(table: PartitionTable, header: GptHeader | str, lba: int, sector_size: int) -> None:
    """Record where a GPT header read at ``lba`` and its entry array lie (the part of the array inside the
    disk, when its size is within the caps; a damaged header's too: nothing of it is to be overwritten)."""
    if not isinstance(header, GptHeader):
        return
    table.structures.append((lba * sector_size, sector_size, "GPT header"))
    start = header.entries_lba * sector_size
    if gpt_array_problem(header) is None and 0 < start < table.disk_size:
        length = min(header.num_entries * header.entry_size, table.disk_size - start)
        table.structures.append((start, length, "GPT entry array"))


def _read_gpt_header(disk: Disk, sector_size: int, lba: int, size: int) -> GptHeader | str:
    offset = lba * sector_size
    if lba <= 0 or offset + sector_size > size:
        return f"LBA {lba} lies outside the disk"
    block = disk.read_at(offset, sector_size)
    if block[:8] != GPT_SIGNATURE:
        return "has no 'EFI PART' signature"
    header = parse_gpt_header(block)
    if header.crc_ok and header.current_lba != lba:
        return f"says it lies at LBA {header.current_lba}, not {lba}"
    return header


def _read_gpt_entries(
    disk: Disk, table: PartitionTable, header: GptHeader, sector_size: int, which: str
) -> list[GptEntry] | None:
    size = table.disk_size
    problem = gpt_array_problem(header)
    offset = header.entries_lba * sector_size
    length = header.num_entries * header.entry_size
    if problem is None and (header.entries_lba == 0 or offset + length > size):
        problem = f"its entry array (LBA {header.entries_lba}, {length} bytes) lies outside the disk"
    if problem is not None:
        table.issues.append(
            TableIssue("gpt-header-invalid", f"the {which} GPT header is unusable: {problem}",
                       {"offset": header.current_lba * sector_size, "lba": header.current_lba})
        )
        return None
    data = disk.read_at(offset, length)
    crc = zlib.crc32(data)
    if crc != header.entries_crc:
        table.issues.append(
            TableIssue(
                "gpt-entries-crc",
                f"the {which} GPT entry array's CRC32 does not match its header "
                f"(header 0x{header.entries_crc:08x}, computed 0x{crc:08x})",
                {"offset": offset, "value": f"0x{crc:08x}", "expected": f"0x{header.entries_crc:08x}"},
            )
        )
    return parse_gpt_entries(data, header.entry_size, header.num_entries)


def _out_of_bounds(part: Partition, disk_size: int, where: str) -> TableIssue:
    return TableIssue(
        "partition-out-of-bounds",
        f"partition {part.number} (LBA {part.first_lba}-{part.last_lba}) lies {where}",
        {"partition": part.number, "start": part.start, "end": part.end, "first_lba": part.first_lba,
         "last_lba": part.last_lba, "disk_size": disk_size},
    )


def _check_overlaps(table: PartitionTable, limit: int = 32) -> None:
    parts = sorted(table.partitions, key=lambda p: (p.first_lba, p.last_lba))
    reported = 0
    widest: Partition | None = None
    for part in parts:
        if widest is not None and part.first_lba <= widest.last_lba:
            if reported < limit:
                table.issues.append(
                    TableIssue(
                        "partition-overlap",
                        f"partitions {widest.number} (LBA {widest.first_lba}-{widest.last_lba}) and {part.number} "
                        f"(LBA {part.first_lba}-{part.last_lba}) overlap",
                        {"partition": [widest.number, part.number], "offset": part.start,
                         "overlap_bytes": (min(widest.last_lba, part.last_lba) - part.first_lba + 1)
                                          * table.sector_size},
                    )
                )
            reported += 1
        if widest is None or part.last_lba > widest.last_lba:
            widest = part


def _mbr_summary(mbr: Mbr | None) -> str:
    if mbr is None:
        return "no sector 0"
    if not mbr.signature_ok:
        return "no 55 AA signature"
    types = [f"0x{e.type:02x}@{e.start_lba}" for e in mbr.entries if e.used]
    return "entries: " + (", ".join(types) if types else "none")

