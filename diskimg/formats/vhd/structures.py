"""VHD on-disk structures and rules: the footer, the dynamic header, parent locators, the block
allocation table (BAT) and sector bitmaps, as pure parse/pack functions; and the one home of every
rule the reader, ``diskimg check`` and detection apply to them.

Every VHD ends with a 512-byte *footer* (cookie ``conectix``; Virtual PC before 2004 wrote 511 bytes)
holding the sizes, the CHS geometry, the disk type and a unique id. All integers are big-endian and
a sector is 512 bytes.

* fixed: the guest bytes, then the footer.
* dynamic: a copy of the footer at offset 0, a 1024-byte *dynamic header* (``cxsparse``) at
  ``footer.data_offset``, the *block allocation table* (BAT: one u32 sector offset per block,
  0xFFFFFFFF = not allocated), then blocks, each a sector bitmap (padded to 512 bytes) followed by
  ``block_size`` bytes of data, and the footer at the end.
* differencing: laid out like dynamic; the header also names the parent (its unique id, a UTF-16BE
  name and up to eight *parent locators* holding platform-specific paths). A sector whose bitmap
  bit is 1 is read from this file; a sector whose bit is 0, or any sector of an unallocated block,
  is read from the parent.

The rules (each a function here; the reader raises the first finding, ``check`` reports them all):

* :func:`choose_footer`: the footer at the end of the file is authoritative (512 bytes, else the
  511 of old Virtual PC); when it is damaged (bad cookie or checksum), the copy at offset 0 of a
  dynamic or differencing disk is used instead (a fixed disk has no copy: offset 0 is guest data).
  :func:`footer_sizes_fixed_disk` is the evidence detection trusts over a signature at offset 0.
* :func:`choose_size`: the virtual size ("auto"): the CHS geometry (C*H*S*512) for creator
  applications ``vpc `` and ``qemu``, the footer's ``current_size`` for every other creator (the
  rule qemu adopted in 2025) and whenever the geometry is the saturated 65535/16/255 (or all zero).
* :func:`footer_findings`: a known disk type; a fixed disk holding the data its footer describes.
* :func:`header_place_finding`, :func:`dynamic_header_findings`: the dynamic header inside the
  file, its cookie and checksum, a power-of-two block size (256 MiB at most); the BAT must cover
  the disk and lie in the file (64 MiB at most).
* :func:`block_findings`: entries beyond the disk's size are ignored (blktap reserves table room
  for later growth; ``check`` warns when one is allocated); blocks may not share or overlap file
  space or the metadata (:func:`metadata_regions`), nor reach past the data area.
* :func:`locator_findings`: a parent locator's data lies in the file (64 KiB at most).
"""

from __future__ import annotations

import bisect
import operator
import os
import posixpath
import re
import struct
import sys
import urllib.parse
import uuid
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

NAME = "vhd"

SECTOR = 512
FOOTER_SIZE = 512
OLD_FOOTER_SIZE = 511  # Virtual PC before 2004
DYNAMIC_HEADER_SIZE = 1024
#: the eight 24-byte parent locator entries of the dynamic header start here
PARENT_LOCATORS_OFFSET = 576
PARENT_LOCATOR_SIZE = 24
PARENT_LOCATOR_COUNT = 8
_LOCATORS_END = PARENT_LOCATORS_OFFSET + PARENT_LOCATOR_COUNT * PARENT_LOCATOR_SIZE  # then 256 reserved bytes
FOOTER_COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
UNALLOCATED = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
SUBFORMATS = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}
DISK_TYPES = {
    0: "none",
    1: "reserved (1)",
    2: "fixed",
    3: "dynamic",
    4: "differencing",
    5: "reserved (5)",
    6: "reserved (6)",
}

FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2  # "must always be set"

MAX_GEOMETRY = (65535, 16, 255)
#: the footer timestamp counts seconds from this instant
VHD_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

#: creator applications whose footer current_size is not trusted (the size is C*H*S)
CHS_CREATORS = (b"vpc ", b"qemu")

# Caps on what a (possibly hostile) header may make us allocate or read.
MAX_BLOCK_SIZE = 256 * 1024 * 1024
MAX_BAT_BYTES = 64 * 1024 * 1024
MAX_LOCATOR_BYTES = 64 * 1024
#: an offset this far past the end of the file reads as a cut file, beyond it as a wild pointer
TRUNCATION_REACH = 1 << 40

LOCATOR_PLATFORMS = {
    b"W2ru": "windows-relative-utf16",
    b"W2ku": "windows-absolute-utf16",
    b"Wi2r": "windows-relative-ansi",
    b"Wi2k": "windows-absolute-ansi",
    b"MacX": "mac-url-utf8",
    b"Mac ": "mac-alias",
}
RELATIVE_PLATFORMS = (b"W2ru", b"Wi2r")
ABSOLUTE_PLATFORMS = (b"W2ku", b"Wi2k", b"MacX")

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sII512s")  # followed by 8 locators and 256 reserved bytes
_LOCATOR = struct.Struct(">4sIIIQ")
assert _FOOTER.size == FOOTER_SIZE and _HEADER.size == PARENT_LOCATORS_OFFSET and _LOCATOR.size == PARENT_LOCATOR_SIZE

# Where fields lie, for the offsets findings name and for readers of raw bytes.
#: footer: u64 offset of the dynamic header (all ones for a fixed disk)
FOOTER_DATA_OFFSET_FIELD = 16
#: footer: u32 disk type
FOOTER_DISK_TYPE_FIELD = 60
#: where the checksum field of each structure lies (``vhd_checksum`` leaves it out)
FOOTER_CHECKSUM_OFFSET = 64
DYNAMIC_HEADER_CHECKSUM_OFFSET = 36
#: dynamic header: u32 max_table_entries, then u32 block_size
MAX_TABLE_ENTRIES_FIELD = 28
BLOCK_SIZE_FIELD = 32


def parent_locator_offset(index: int) -> int:
    """Where parent locator entry ``index`` (0 to 7) lies in the dynamic header: after its fixed fields."""
    return PARENT_LOCATORS_OFFSET + PARENT_LOCATOR_SIZE * index


def vhd_checksum(data: bytes, checksum_offset: int | None = None) -> int:
    """One's complement of the byte sum, leaving out the 4-byte checksum field at ``checksum_offset``."""
    total = sum(data)
    if checksum_offset is not None:
        total -= sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of ``total_sectors``: the algorithm of the
    VHD specification's appendix. The result usually describes slightly fewer sectors."""
    total_sectors = max(0, min(total_sectors, 65535 * 16 * 255))
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track, heads = 255, 16
        cylinders_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinders_times_heads = total_sectors // sectors_per_track
        heads = max(4, (cylinders_times_heads + 1023) // 1024)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track, heads = 31, 16
            cylinders_times_heads = total_sectors // sectors_per_track
        if cylinders_times_heads >= heads * 1024:
            sectors_per_track, heads = 63, 16
            cylinders_times_heads = total_sectors // sectors_per_track
    return cylinders_times_heads // heads, heads, sectors_per_track


def fourcc_text(value: bytes) -> str:
    """A 4-byte tag as readable text: printable ASCII kept, NUL as ``\\0``, other bytes as ``\\xNN``."""
    out = []
    for byte in value:
        if byte == 0:
            out.append("\\0")
        elif 32 <= byte < 127 and byte != 0x5C:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def version_text(version: int) -> str:
    """A u32 version (major in the high 16 bits) as ``major.minor``."""
    return f"{version >> 16}.{version & 0xFFFF}"


def vhd_timestamp_iso(seconds: int) -> str:
    """A footer/header timestamp (seconds since 2000-01-01 UTC) in ISO 8601."""
    return (VHD_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class VhdFooter:
    """The 512-byte footer (and its copy at offset 0 of dynamic and differencing disks)."""

    cookie: bytes = FOOTER_COOKIE
    features: int = FEATURE_RESERVED
    format_version: int = 0x00010000
    data_offset: int = NO_DATA_OFFSET
    timestamp: int = 0
    creator_app: bytes = b"dimg"
    creator_version: int = 0x00010000
    creator_host_os: bytes = b"Wi2k"
    original_size: int = 0
    current_size: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors_per_track: int = 0
    disk_type: int = DISK_FIXED
    checksum: int = 0
    unique_id: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    saved_state: int = 0
    reserved: bytes = bytes(427)

    @property
    def geometry(self) -> tuple[int, int, int]:
        return self.cylinders, self.heads, self.sectors_per_track

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track * SECTOR

    @property
    def disk_type_name(self) -> str:
        return DISK_TYPES.get(self.disk_type, f"unknown ({self.disk_type})")

    @property
    def creator(self) -> str:
        """Readable creator, e.g. ``win  6.3 (Wi2k)``."""
        major, minor = self.creator_version >> 16, self.creator_version & 0xFFFF
        return f"{fourcc_text(self.creator_app)} {major}.{minor} ({fourcc_text(self.creator_host_os)})"

    def pack(self, *, checksum: int | None = None) -> bytes:
        """The 512 bytes of this footer; the checksum is computed unless one is given."""
        data = self._pack(0)
        return self._pack(vhd_checksum(data) if checksum is None else checksum)

    def computed_checksum(self) -> int:
        return vhd_checksum(self._pack(0))

    def _pack(self, checksum: int) -> bytes:
        return _FOOTER.pack(
            self.cookie, self.features, self.format_version, self.data_offset, self.timestamp,
            self.creator_app, self.creator_version, self.creator_host_os, self.original_size,
            self.current_size, self.cylinders, self.heads, self.sectors_per_track, self.disk_type,
            checksum, self.unique_id.bytes, self.saved_state, self.reserved,
        )  # fmt: skip


def parse_footer(data: bytes) -> VhdFooter:
    """Parse a footer (512 bytes, or the 511 of old Virtual PC). Neither cookie nor checksum is
    judged here: see :func:`footer_problem`."""
    if len(data) == OLD_FOOTER_SIZE:
        data = bytes(data) + b"\0"
    if len(data) != FOOTER_SIZE:
        raise ValueError(f"a VHD footer is 512 bytes, not {len(data)}")
    (cookie, features, version, data_offset, timestamp, app, app_version, host_os, original, current,
     cylinders, heads, sectors, disk_type, checksum, unique, saved, reserved) = _FOOTER.unpack(data)  # fmt: skip
    return VhdFooter(
        cookie, features, version, data_offset, timestamp, app, app_version, host_os, original, current,
        cylinders, heads, sectors, disk_type, checksum, uuid.UUID(bytes=unique), saved, reserved,
    )  # fmt: skip


def footer_problem(data: bytes) -> str | None:
    """Why these bytes are not a valid footer (cookie, checksum), or None if they are."""
    if len(data) == OLD_FOOTER_SIZE:
        data = bytes(data) + b"\0"
    if len(data) != FOOTER_SIZE:
        return "too short for a footer"
    if data[:8] != FOOTER_COOKIE:
        return "no 'conectix' cookie"
    stored = int.from_bytes(data[FOOTER_CHECKSUM_OFFSET : FOOTER_CHECKSUM_OFFSET + 4], "big")
    computed = vhd_checksum(data, FOOTER_CHECKSUM_OFFSET)
    if stored != computed:
        return f"footer checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
    return None


@dataclass
class ParentLocator:
    """One of the eight parent locator entries of a differencing disk's header."""

    platform_code: bytes = bytes(4)
    data_space: int = 0
    data_length: int = 0
    reserved: int = 0
    data_offset: int = 0

    @property
    def used(self) -> bool:
        return self.platform_code != bytes(4)

    @property
    def space_bytes(self) -> int:
        """The room reserved for the locator's data: the spec counts sectors, Windows writes bytes;
        a value below one sector can only be sectors."""
        return self.data_space if self.data_space >= SECTOR else self.data_space * SECTOR

    @property
    def read_length(self) -> int:
        """How many bytes of path data to read: ``data_length``, or the room when it is missing."""
        return self.data_length or self.space_bytes

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform_code, self.data_space, self.data_length, self.reserved, self.data_offset)


def _empty_locators() -> list[ParentLocator]:
    return [ParentLocator() for _ in range(PARENT_LOCATOR_COUNT)]


@dataclass
class DynamicHeader:
    """The 1024-byte header of dynamic and differencing disks."""

    cookie: bytes = DYNAMIC_COOKIE
    data_offset: int = NO_DATA_OFFSET
    table_offset: int = 0
    header_version: int = 0x00010000
    max_table_entries: int = 0
    block_size: int = 2 * 1024 * 1024
    checksum: int = 0
    parent_unique_id: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    parent_timestamp: int = 0
    reserved1: int = 0
    parent_name_raw: bytes = bytes(512)  # UTF-16BE, NUL padded
    parent_locators: list[ParentLocator] = field(default_factory=_empty_locators)
    reserved2: bytes = bytes(256)

    @property
    def parent_name(self) -> str:
        return decode_parent_name(self.parent_name_raw)

    def pack(self, *, checksum: int | None = None) -> bytes:
        data = self._pack(0)
        return self._pack(vhd_checksum(data) if checksum is None else checksum)

    def _pack(self, checksum: int) -> bytes:
        if len(self.parent_locators) != PARENT_LOCATOR_COUNT:
            raise ValueError("a dynamic header holds exactly 8 parent locators")
        head = _HEADER.pack(
            self.cookie, self.data_offset, self.table_offset, self.header_version, self.max_table_entries,
            self.block_size, checksum, self.parent_unique_id.bytes, self.parent_timestamp, self.reserved1,
            self.parent_name_raw,
        )  # fmt: skip
        return head + b"".join(locator.pack() for locator in self.parent_locators) + self.reserved2


def parse_dynamic_header(data: bytes) -> DynamicHeader:
    """Parse the 1024-byte dynamic header (cookie and checksum are judged by the reader)."""
    if len(data) != DYNAMIC_HEADER_SIZE:
        raise ValueError(f"a VHD dynamic header is 1024 bytes, not {len(data)}")
    (cookie, data_offset, table_offset, version, entries, block_size, checksum, parent_id, parent_time,
     reserved1, parent_name) = _HEADER.unpack_from(data)  # fmt: skip
    locators = [ParentLocator(*_LOCATOR.unpack_from(data, parent_locator_offset(i)))
                for i in range(PARENT_LOCATOR_COUNT)]
    return DynamicHeader(
        cookie, data_offset, table_offset, version, entries, block_size, checksum,
        uuid.UUID(bytes=parent_id), parent_time, reserved1, parent_name, locators, bytes(data[_LOCATORS_END:]),
    )  # fmt: skip


def dynamic_header_problem(data: bytes) -> str | None:
    """Why these 1024 bytes are not a valid dynamic header (cookie, checksum), or None if they are."""
    if data[:8] != DYNAMIC_COOKIE:
        return f"no 'cxsparse' cookie (found {bytes(data[:8])!r})"
    at = DYNAMIC_HEADER_CHECKSUM_OFFSET
    stored = int.from_bytes(data[at : at + 4], "big")
    computed = vhd_checksum(data, at)
    if stored != computed:
        return f"dynamic header checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
    return None


def parse_bat(data: bytes) -> array[int]:
    """The block allocation table: big-endian u32 sector offsets of the blocks (``UNALLOCATED``: none)."""
    bat = array("I", data)
    if sys.byteorder == "little":
        bat.byteswap()
    return bat


def encode_parent_name(name: str) -> bytes:
    """The 512-byte UTF-16BE parent name field (truncated to 255 characters)."""
    raw = name.encode("utf-16-be")[:510]
    return raw + bytes(512 - len(raw))


def decode_parent_name(raw: bytes) -> str:
    text = bytes(raw).decode("utf-16-be", errors="replace")
    return text.split("\0", 1)[0]


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each block: one bit a sector, padded to 512."""
    bits_bytes = (block_size // SECTOR + 7) // 8
    return (bits_bytes + SECTOR - 1) // SECTOR * SECTOR


def _decode_utf16(data: bytes) -> str:
    """UTF-16 text of unknown byte order: a BOM decides, else where the NULs of ASCII text fall
    (Windows writes little-endian; the spec does not say)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    data = data[: len(data) // 2 * 2]
    even_nuls = data[0::2].count(0)
    odd_nuls = data[1::2].count(0)
    return data.decode("utf-16-be" if even_nuls > odd_nuls else "utf-16-le")


def decode_locator_path(platform_code: bytes, data: bytes) -> str:
    """The path a parent locator of a path-holding platform (``RELATIVE_PLATFORMS``,
    ``ABSOLUTE_PLATFORMS``) records, Windows separators kept. Raises UnicodeDecodeError for
    undecodable data."""
    if platform_code in (b"W2ru", b"W2ku"):
        text = _decode_utf16(data)
    elif platform_code == b"MacX":
        text = data.decode("utf-8")
    elif platform_code in (b"Wi2r", b"Wi2k"):
        text = data.decode("latin-1")
    else:
        raise ValueError(f"platform {platform_code!r} holds no path diskimg can use")
    return text.split("\0", 1)[0].strip()


def host_path(recorded: str, platform_code: bytes | None) -> str:
    """A recorded parent path made usable on this host. On POSIX, Windows separators become ``/``,
    a drive letter is dropped (``C:\\a\\b`` -> ``/a/b``), ``\\\\?\\`` prefixes removed and UNC paths
    kept as ``//server/share``; a MacX ``file://`` URL becomes its path."""
    if platform_code == b"MacX":
        try:
            parsed = urllib.parse.urlsplit(recorded)
        except ValueError:  # how urlsplit reports a malformed URL (e.g. an unclosed "[" host)
            return recorded
        if parsed.scheme == "file":
            return urllib.parse.unquote(parsed.path)
        return recorded
    if os.name == "nt":
        return recorded
    path = recorded
    for prefix in ("\\\\?\\UNC\\", "\\\\?\\", "\\??\\"):
        if path.startswith(prefix):
            path = ("\\\\" if prefix.endswith("UNC\\") else "") + path[len(prefix) :]
            break
    unc = path.startswith("\\\\")
    path = path.replace("\\", "/")
    if re.match(r"^[A-Za-z]:", path):
        path = path[2:] or "/"
        if not path.startswith("/") and platform_code in ABSOLUTE_PLATFORMS:
            path = "/" + path
    if unc:
        return "//" + posixpath.normpath(path.lstrip("/"))
    return posixpath.normpath(path) if path else path



# -- sector bitmaps and the BAT ------------------------------------------------------------------

_FF_RUN = re.compile(rb"\xff{4,}")


def allocated_indices(raw_table: bytes) -> array[int]:
    """Indices of the allocated entries of a big-endian BAT. Unallocated entries (0xFFFFFFFF) are
    the aligned 4-byte groups inside runs of 0xFF bytes, found by a C-level regex scan, so a table
    of a million entries costs a few regex matches when empty and C-level range copies when full."""
    allocated = array("I")
    entries = len(raw_table) // 4
    position = 0
    for match in _FF_RUN.finditer(raw_table):
        first = -(-match.start() // 4)
        last = match.end() // 4
        if last > first:
            allocated.extend(range(position, first))
            position = last
    allocated.extend(range(position, entries))
    return allocated



# -- the rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One broken rule. ``kind``: "corrupt", "truncated" or "warning" (the reader goes on past a
    warning); ``offset``: where in the file the fault lies; ``fatal``: nothing past it can be judged
    (``check`` stops there, as the reader stops at any finding but a warning)."""

    kind: str
    message: str
    offset: int
    structure: str
    fatal: bool = True


@dataclass(frozen=True)
class FooterChoice:
    """The footer a file is read by (:func:`choose_footer`) and what is wrong with the others."""

    #: the footer in force; None when none verifies (then ``problem`` says why)
    footer: VhdFooter | None
    #: "tail" (the end of the file) or "head_copy" (offset 0); "" when no footer verifies
    source: str
    #: where the footer in force lies, and its length (512, or 511 for old Virtual PC)
    offset: int
    length: int
    raw: bytes
    #: why the end of the file holds no valid footer (None: it holds one, of 512 or 511 bytes)
    tail_problem: str | None
    #: whether the last 512 bytes start with the cookie (a damaged footer rather than none)
    tail_cookie: bool
    #: the first 512 bytes, where a dynamic or differencing disk keeps its copy
    head_copy: bytes
    #: why they are no valid copy: "absent" without a cookie, None when valid
    head_copy_problem: str | None
    #: where the data area ends: where the footer in force starts, or the end of the file when the
    #: copy at offset 0 stands in for a missing footer
    data_end: int
    #: when no footer verifies: why, and where
    problem: str | None = None
    problem_offset: int = 0
    #: when no footer verifies: what the first one with a cookie claims (a damaged footer), if any
    unverified: VhdFooter | None = None

    @property
    def copy_matches(self) -> bool:
        """Whether the copy at offset 0 is byte for byte the footer in force."""
        return self.head_copy == self.raw.ljust(FOOTER_SIZE, b"\0")


def has_footer_cookie(head: bytes, tail: bytes) -> bool:
    """Whether a file shows the ``conectix`` cookie where a footer (512 or 511 bytes) ends it or
    where a copy starts it: the files detection hands to the VHD driver."""
    return (
        head[:8] == FOOTER_COOKIE
        or (len(tail) >= FOOTER_SIZE and tail[-FOOTER_SIZE:][:8] == FOOTER_COOKIE)
        or (len(tail) >= OLD_FOOTER_SIZE and tail[-OLD_FOOTER_SIZE:][:8] == FOOTER_COOKIE)
    )


def choose_footer(head: bytes, tail: bytes, file_size: int | None) -> FooterChoice:
    """The footer a VHD is read by: the last 512 bytes, else the last 511 (Virtual PC before 2004),
    else the copy at offset 0 of a dynamic or differencing disk (a fixed disk has none: its offset
    0 is guest data). ``head`` and ``tail``: the first and last bytes of the file (512 or more where
    it has them); the copy is judged only in a file of two footers or more. ``file_size`` None:
    the end of the file is unknown (a peek into a compressed stream), only the copy is judged."""
    known_end = file_size is not None
    size = len(head) if file_size is None else file_size
    last = tail[-FOOTER_SIZE:] if known_end else b""
    full = last if len(last) == FOOTER_SIZE else b""
    old = last[-OLD_FOOTER_SIZE:] if len(last) >= OLD_FOOTER_SIZE else b""
    copy = head[:FOOTER_SIZE] if len(head) >= FOOTER_SIZE and (not known_end or size >= 2 * FOOTER_SIZE) else b""
    copy_problem = footer_problem(copy) if copy[:8] == FOOTER_COOKIE else "absent"
    if known_end:
        tail_problem = footer_problem(full) if full else "file too small"
    else:
        tail_problem = "the end of the file is unseen"
    tail_cookie = full[:8] == FOOTER_COOKIE

    def chosen(raw: bytes, source: str, offset: int, problem: str | None, data_end: int) -> FooterChoice:
        return FooterChoice(parse_footer(raw), source, offset, len(raw), raw, problem, tail_cookie, copy,
                            copy_problem, data_end)

    def refused(problem: str, offset: int, unverified: bytes) -> FooterChoice:
        claimed = parse_footer(unverified) if len(unverified) >= OLD_FOOTER_SIZE else None
        return FooterChoice(None, "", 0, 0, b"", tail_problem, tail_cookie, copy, copy_problem, size, problem, offset,
                            claimed)

    if known_end and size < OLD_FOOTER_SIZE:
        return refused(f"file of {size} bytes is too small to be a VHD", 0, b"")
    if tail_problem is None:
        return chosen(full, "tail", size - FOOTER_SIZE, None, size - FOOTER_SIZE)
    problems = [f"{tail_problem} at offset {size - FOOTER_SIZE}" if full else tail_problem] if known_end else []
    if old[:8] == FOOTER_COOKIE:
        old_problem = footer_problem(old)
        if old_problem is None:
            return chosen(old, "tail", size - OLD_FOOTER_SIZE, None, size - OLD_FOOTER_SIZE)
        problems.append(f"{old_problem} at offset {size - OLD_FOOTER_SIZE} (511-byte footer)")
    if copy_problem is None and parse_footer(copy).disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
        return chosen(copy, "head_copy", 0, tail_problem, size)
    if copy_problem not in (None, "absent"):
        problems.append(f"copy at offset 0: {copy_problem}")
    cookies = [data for data in (full, old, copy) if data[:8] == FOOTER_COOKIE]
    if not cookies:
        return refused("not a VHD: no 'conectix' footer at the end of the file or at offset 0", size - FOOTER_SIZE,
                       b"")
    offset = size - FOOTER_SIZE if full[:8] == FOOTER_COOKIE or copy[:8] != FOOTER_COOKIE else 0
    return refused("no valid VHD footer: " + "; ".join(problems), offset, cookies[0])


def footer_sizes_fixed_disk(tail: bytes, file_size: int | None) -> bool:
    """Whether the end of the file holds a valid fixed-disk footer whose current_size is exactly
    the data in front of it: evidence a guest cannot forge (it writes a fixed disk's offset 0,
    never its footer), so detection trusts it over a signature at offset 0."""
    if file_size is None:
        return False
    choice = choose_footer(b"", tail, file_size)
    footer = choice.footer
    return footer is not None and footer.disk_type == DISK_FIXED and footer.current_size == choice.offset


def choose_size(footer: VhdFooter, rule: str = "auto") -> tuple[int, str]:
    """(virtual size, "chs" or "current_size"): by ``rule`` "chs" or "current_size", or "auto":
    C*H*S*512 for the creators ``vpc `` and ``qemu`` unless the geometry is saturated or zero, the
    footer's current_size otherwise (the rule of qemu since 2025)."""
    if rule == "auto":
        chs = footer.creator_app in CHS_CREATORS and footer.geometry != MAX_GEOMETRY and footer.chs_size != 0
        rule = "chs" if chs else "current_size"
    return (footer.chs_size if rule == "chs" else footer.current_size), rule


def footer_findings(footer: VhdFooter, footer_offset: int, data_end: int, virtual_size: int) -> list[Finding]:
    """A disk type diskimg knows; a fixed disk's data area holding at least the smallest size its
    footer can mean (the virtual size, current_size, and the geometry's unless saturated)."""
    if footer.disk_type not in SUBFORMATS:
        return [Finding("corrupt", f"disk type {footer.disk_type} ({footer.disk_type_name}) is not fixed, dynamic or "
                        "differencing", footer_offset + FOOTER_DISK_TYPE_FIELD, "footer")]
    if footer.disk_type == DISK_FIXED:
        plausible = [virtual_size, footer.current_size]
        if footer.geometry != MAX_GEOMETRY and footer.chs_size:
            plausible.append(footer.chs_size)
        needed = min(plausible)
        if data_end < needed:
            return [Finding("truncated", f"fixed VHD is truncated: the footer describes {needed} bytes of data, the "
                            f"file holds {data_end}", footer_offset, "fixed disk data")]
    return []


def _past_end(offset: int, file_size: int) -> str:
    """How a structure reaching past the end of the file counts: a cut file, or a wild offset."""
    return "truncated" if offset < file_size + TRUNCATION_REACH else "corrupt"


def header_place_finding(footer: VhdFooter, footer_offset: int, file_size: int) -> Finding | None:
    """The dynamic header (``footer.data_offset``) must lie in the file."""
    offset = footer.data_offset
    if offset != NO_DATA_OFFSET and offset + DYNAMIC_HEADER_SIZE <= file_size:
        return None
    return Finding(_past_end(offset, file_size), f"the dynamic header offset {offset} from the footer lies outside "
                   f"the file ({file_size} bytes)", footer_offset + FOOTER_DATA_OFFSET_FIELD, "footer")


def dynamic_header_findings(raw: bytes, offset: int, footer: VhdFooter, virtual_size: int,
                            file_size: int) -> list[Finding]:
    """The 1024 bytes at ``offset`` as a dynamic header: its cookie and checksum, the block size
    (a power of two, 512 bytes to ``MAX_BLOCK_SIZE``), a BAT that covers the disk and lies in the
    file (``MAX_BAT_BYTES`` at most)."""
    if len(raw) < DYNAMIC_HEADER_SIZE:
        return [Finding("truncated", f"the file ends inside the dynamic header ({len(raw)} of {DYNAMIC_HEADER_SIZE} "
                        "bytes)", offset, "dynamic header")]
    problem = dynamic_header_problem(raw)
    if raw[:8] != DYNAMIC_COOKIE:
        return [Finding("corrupt", str(problem), offset, "dynamic header")]
    findings = []
    if problem is not None:  # the checksum: the fields may still be judged
        findings.append(Finding("corrupt", problem, offset + DYNAMIC_HEADER_CHECKSUM_OFFSET, "dynamic header", False))
    header = parse_dynamic_header(raw)
    block_size = header.block_size
    if block_size < SECTOR or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        findings.append(Finding("corrupt", f"block size {block_size} is not a power of two between 512 and "
                                f"{MAX_BLOCK_SIZE}", offset + BLOCK_SIZE_FIELD, "dynamic header"))
        return findings
    entries = header.max_table_entries
    entries_at = offset + MAX_TABLE_ENTRIES_FIELD
    covered = min(virtual_size, footer.current_size)
    if entries * block_size < covered:
        findings.append(Finding("corrupt", f"max_table_entries {entries} with {block_size}-byte blocks covers "
                                f"{entries * block_size} bytes, less than the disk's {covered} bytes", entries_at,
                                "dynamic header", False))
    table = header.table_offset
    claimed = entries * 4
    if claimed > MAX_BAT_BYTES:
        needed = -(-virtual_size // block_size)
        findings.append(Finding("corrupt", f"max_table_entries {entries} ({claimed} bytes of table) cannot be right: "
                                f"the disk of {virtual_size} bytes needs {needed} entries of {block_size} bytes",
                                entries_at, "dynamic header"))
    elif table + claimed > file_size:
        findings.append(Finding(_past_end(table, file_size), f"the block allocation table (max_table_entries "
                                f"{entries}: {claimed} bytes at offset {table}) lies past the end of the file "
                                f"({file_size} bytes)", entries_at, "dynamic header"))
    return findings


def metadata_regions(header: DynamicHeader, header_offset: int, differencing: bool) -> list[tuple[int, int, str]]:
    """(offset, length, name) of what no block may overlap: the footer copy, the dynamic header,
    the whole BAT (as claimed) and, in a differencing disk, the parent locators' data."""
    regions = [(0, FOOTER_SIZE, "footer copy"), (header_offset, DYNAMIC_HEADER_SIZE, "dynamic header"),
               (header.table_offset, header.max_table_entries * 4, "block allocation table")]
    if differencing:
        regions += [(locator.data_offset, locator.space_bytes, f"parent locator {index}")
                    for index, locator in enumerate(header.parent_locators) if locator.used and locator.data_space]
    return regions


def block_findings(table: array[int], header: DynamicHeader, virtual_size: int, regions: list[tuple[int, int, str]],
                   data_end: int, limit: int | None = None) -> list[Finding]:
    """What is wrong with the blocks a BAT (``table``: its first entries, as parsed) allocates:
    two blocks at one sector or overlapping, a block over metadata (``regions``), a block whose
    data reaches past ``data_end`` (the last block only as far as the disk reaches). Entries past
    the disk are ignored but for a warning when allocated. Stops after ``limit`` findings.

    A sound table (the usual case) is settled by C-level passes over the sorted sectors: only a
    table that fails them is walked block by block."""
    block_size = header.block_size
    bitmap = bitmap_size(block_size)
    span = (bitmap + block_size) // SECTOR  # sectors one block takes in the file
    needed = min(len(table), -(-virtual_size // block_size))
    used = table if len(table) == needed else table[:needed]
    sectors = sorted(filter(UNALLOCATED.__ne__, used))
    suspect = bool(sectors) and (
        any(map(span.__gt__, map(operator.sub, sectors[1:], sectors)))
        or (sectors[-1] + span) * SECTOR > data_end
        or any(_blocks_within(sectors, span, start, length) for start, length, _ in regions)
    )
    findings: list[Finding] = []
    if suspect:
        at = header.table_offset
        previous: tuple[int, int] | None = None
        for sector, index in sorted((sector, index) for index, sector in enumerate(used) if sector != UNALLOCATED):
            start = sector * SECTOR
            entry = at + 4 * index
            if previous is not None and sector < previous[0] + span:
                if sector == previous[0]:
                    message = f"blocks {previous[1]} and {index} both point at the same sector ({sector})"
                else:
                    message = (f"blocks {previous[1]} and {index} overlap (at offsets {previous[0] * SECTOR} and "
                               f"{start}, {span * SECTOR} bytes each)")
                findings.append(Finding("corrupt", message, entry, "block allocation table", False))
            for region_start, region_length, name in regions:
                if start < region_start + region_length and region_start < start + span * SECTOR:
                    findings.append(Finding("corrupt", f"block {index} at offset {start} overlaps the {name}", entry,
                                            "block allocation table", False))
            end = start + bitmap + min(block_size, virtual_size - index * block_size)
            if end > data_end:
                findings.append(Finding("truncated", f"block {index} at offset {start} ends at {end}, past the end of "
                                        f"the file's data ({data_end} bytes): the image is truncated", entry,
                                        "data block", False))
            previous = (sector, index)
            if limit is not None and len(findings) >= limit:
                return findings[:limit]
    if len(table) > needed:
        for index in allocated_indices(table[needed:].tobytes()):  # 0xFFFFFFFF reads alike in either byte order
            findings.append(Finding("warning", f"block {needed + index} lies past the end of the disk and is "
                                    "allocated", header.table_offset + 4 * (needed + index), "block allocation table",
                                    False))
            if limit is not None and len(findings) >= limit:
                break
    return findings


def _blocks_within(sectors: list[int], span: int, start: int, length: int) -> bool:
    """Whether a block of ``span`` sectors at any of the sorted ``sectors`` overlaps [start, start + length)."""
    first = bisect.bisect_right(sectors, (start - span * SECTOR) // SECTOR)  # blocks ending after ``start``
    last = bisect.bisect_left(sectors, -(-(start + length) // SECTOR))  # blocks starting before its end
    return last > first


def locator_findings(header: DynamicHeader, header_offset: int, file_size: int) -> list[Finding]:
    """Each used parent locator's data must lie in the file and be ``MAX_LOCATOR_BYTES`` at most."""
    findings = []
    for index, locator in enumerate(header.parent_locators):
        if not locator.used:
            continue
        length = locator.read_length
        if length > MAX_LOCATOR_BYTES or locator.data_offset + length > file_size:
            findings.append(Finding(
                "corrupt", f"parent locator {index} ({fourcc_text(locator.platform_code)}) claims {length} bytes at "
                f"offset {locator.data_offset}, outside the file or over {MAX_LOCATOR_BYTES} bytes",
                header_offset + parent_locator_offset(index), "parent locator"))
    return findings
