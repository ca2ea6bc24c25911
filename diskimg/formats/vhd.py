"""VHD: Microsoft Virtual Hard Disk v1 (qemu's "vpc"), fixed, dynamic and differencing.

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

Choices made here:

* The footer at the end of the file is authoritative; when it is damaged (bad cookie or checksum),
  the copy at offset 0 of a dynamic or differencing disk is used instead.
* Sector bitmaps of *dynamic* disks are not consulted: an allocated block reads as its stored
  data, as qemu reads it (the project's oracle). Every dynamic block in our corpus (Hyper-V,
  Disk2vhd, qemu, vhd-tool) carries a full bitmap, so the spec's "0 = never written, reads as
  zeros" would change nothing there; elsewhere, reading the stored bytes never hides data. For
  differencing disks the bitmap is honoured, as it must be (bitmaps are read lazily, a bounded
  number of blocks cached).
* Virtual size ("auto"): the CHS geometry (C*H*S*512) for creator applications ``vpc `` and
  ``qemu``, the footer's ``current_size`` for every other creator (the rule qemu adopted in 2025)
  and whenever the geometry is the saturated 65535/16/255 (or all zero). ``OpenOptions.vhd_size``
  forces either. A fixed disk's bytes past its data area, and a dynamic disk's bytes past what
  its BAT describes, read as zeros.
* The BAT must cover the disk and lie in the file (64 MiB at most); entries beyond the disk's
  size are ignored (blktap reserves table room for later growth). Blocks may not share or
  overlap file space or metadata, nor lie past the end of the file.
* A differencing disk's parent is looked up, through the caller's opener, by the relative
  locators (W2ru, Wi2r), then the absolute ones (W2ku, Wi2k, MacX), then the parent name and its
  base name; the parent's unique id must match the one the child records.
* Every offset, length and count read from the file is checked against the file size and caps
  before use; a malformed image raises :class:`CorruptImage`, never another exception.

Writing (:class:`VhdWriter`, ``-O vhd``, options ``subformat``, ``block_size``, ``force_size``):

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

import bisect
import operator
import os
import posixpath
import re
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .probing import Detection, OpenOptions, ParentOpener
from ..errors import BackingFileError, CorruptImage, DiskImageError, OutputError, UsageError
from ..host.files import HostFile
from .reader import DiskReader, Extent, ImageInfo, Run, RunKind
from ..units import format_size, parse_size
from .writer import DiskWriter, OutputTarget, planned_blocks

NAME = "vhd"

SECTOR = 512
FOOTER_SIZE = 512
OLD_FOOTER_SIZE = 511  # Virtual PC before 2004
DYNAMIC_HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
UNALLOCATED = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
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
BITMAP_CACHE_BLOCKS = 256

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

# ---------------------------------------------------------------------------------------------
# Pure structures
# ---------------------------------------------------------------------------------------------

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sII512s")  # followed by 8 locators and 256 reserved bytes
_LOCATOR = struct.Struct(">4sIIIQ")
#: where the checksum field of each structure lies (``vhd_checksum`` leaves it out)
FOOTER_CHECKSUM_OFFSET = 64
DYNAMIC_HEADER_CHECKSUM_OFFSET = 36
assert _FOOTER.size == FOOTER_SIZE and _HEADER.size == 576 and _LOCATOR.size == 24


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

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform_code, self.data_space, self.data_length, self.reserved, self.data_offset)


def _empty_locators() -> list[ParentLocator]:
    return [ParentLocator() for _ in range(8)]


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
        if len(self.parent_locators) != 8:
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
    locators = [ParentLocator(*_LOCATOR.unpack_from(data, 576 + 24 * i)) for i in range(8)]
    return DynamicHeader(
        cookie, data_offset, table_offset, version, entries, block_size, checksum,
        uuid.UUID(bytes=parent_id), parent_time, reserved1, parent_name, locators, bytes(data[768:]),
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


def parse_bat(data: bytes) -> array:
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
    """The path a parent locator holds, as recorded (Windows separators kept). May raise
    UnicodeDecodeError / ValueError for undecodable data."""
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
        parsed = urllib.parse.urlsplit(recorded)
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


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def probe(head: bytes, tail: bytes, file_size: int) -> Detection | None:
    """Recognise a VHD from the first (up to 64 KiB) and last (up to 1024) bytes of a file."""
    candidates: list[tuple[str, bytes]] = []
    if len(tail) >= FOOTER_SIZE and tail[-FOOTER_SIZE:][:8] == FOOTER_COOKIE:
        candidates.append(("tail", tail[-FOOTER_SIZE:]))
    if len(tail) >= OLD_FOOTER_SIZE and tail[-OLD_FOOTER_SIZE:][:8] == FOOTER_COOKIE:
        candidates.append(("tail-511", tail[-OLD_FOOTER_SIZE:]))
    if len(head) >= FOOTER_SIZE and head[:8] == FOOTER_COOKIE:
        candidates.append(("head", head[:FOOTER_SIZE]))
    if not candidates:
        return None
    for where, data in candidates:
        if footer_problem(data) is not None:
            continue
        footer = parse_footer(data)
        if where == "head" and footer.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
            continue  # a fixed disk has no copy at offset 0: guest data that looks like a footer
        subformat = _SUBFORMATS.get(footer.disk_type)
        kind = subformat or f"disk type {footer.disk_type}"
        note = "" if where != "head" else ", footer at end of file damaged (using the copy at offset 0)"
        return Detection(
            format=NAME,
            subformat=subformat,
            version=_version_text(footer.format_version),
            readable=True,
            description=f"VHD ({kind}), creator {footer.creator}, size {footer.current_size} bytes{note}",
        )
    footer = parse_footer(candidates[0][1])
    problem = footer_problem(candidates[0][1])
    return Detection(
        format=NAME,
        subformat=_SUBFORMATS.get(footer.disk_type),
        version=_version_text(footer.format_version),
        readable=True,
        description=f"VHD, corrupt: {problem}",
    )


_SUBFORMATS = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}


def _version_text(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

_BITMAP_RUNS = re.compile(rb"\x00+|\xff+|[\x01-\xfe]")
_FF_RUN = re.compile(rb"\xff{4,}")


class VhdReader(DiskReader):
    format = NAME

    # Set by open(); listed for readers of the code.
    footer: VhdFooter
    header: DynamicHeader | None
    subformat: str
    footer_source: str

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> VhdReader:
        size_rule = getattr(options, "vhd_size", "auto")
        if size_rule not in ("auto", "chs", "current_size"):
            raise UsageError(f"vhd_size must be 'auto', 'chs' or 'current_size', not {size_rule!r}")
        parser = _Opener(host, size_rule)
        try:
            parser.parse()
        except DiskImageError:
            raise
        except (struct.error, UnicodeError, ValueError, IndexError, OverflowError, MemoryError) as exc:
            raise CorruptImage(
                f"malformed {parser.structure}: {exc}", path=host.name, offset=parser.offset, structure=parser.structure
            ) from None
        reader = cls(host, parser.virtual_size)
        reader._adopt(parser)
        if reader.subformat == "differencing" and open_parent is not None:
            reader._open_parent(open_parent)
        return reader

    # -- set-up ----------------------------------------------------------------------------------

    def _adopt(self, parsed: _Opener) -> None:
        self.footer = parsed.footer
        self.header = parsed.header
        self.subformat = _SUBFORMATS[parsed.footer.disk_type]
        self.footer_source = parsed.footer_source
        self.footer_length = parsed.footer_length
        self.size_source = parsed.size_source
        self._facts = parsed.facts
        self._locators = parsed.locators
        self.parent_candidates = parsed.parent_candidates
        self._data_area = parsed.data_area
        self._bat = parsed.bat
        self._allocated = parsed.allocated
        self._entries = len(parsed.bat)
        self._block_size = parsed.header.block_size if parsed.header else 0
        self._bitmap_size = bitmap_size(self._block_size) if parsed.header else 0
        self._covered = self._entries * self._block_size
        self._differencing = self.subformat == "differencing"
        self._bitmap_runs_cache = BitmapRunsCache()

    def _open_parent(self, open_parent: ParentOpener) -> None:
        assert self.header is not None
        if not self.parent_candidates:
            raise BackingFileError(
                "differencing VHD records neither a parent name nor a parent locator", path=self.path
            )
        parent = open_parent(list(self.parent_candidates), NAME)
        expected = self.header.parent_unique_id
        found = getattr(getattr(parent, "footer", None), "unique_id", None)
        if found != expected:
            name = getattr(parent, "path", "?")
            parent.close()
            raise BackingFileError(
                f"parent {name!r} has unique id {found}, but this differencing disk expects {expected}",
                path=self.path,
            )
        self.parent = parent

    # -- metadata ------------------------------------------------------------------------------

    @property
    def unique_id(self) -> uuid.UUID:
        return self.footer.unique_id

    @property
    def block_size(self) -> int | None:
        return self._block_size or None

    @property
    def backing_file(self) -> str | None:
        if not self._differencing or self.header is None:
            return None
        name = self.header.parent_name
        if name:
            return name
        if self.parent_candidates:
            return self.parent_candidates[0]
        return f"<parent {self.header.parent_unique_id}>"  # named nowhere: the id is all there is

    def info(self) -> ImageInfo:
        footer = self.footer
        details: dict[str, Any] = dict(self._facts)
        features = []
        if self.footer_source != "tail":
            features.append("footer-from-head-copy")
        if self.footer_length == OLD_FOOTER_SIZE:
            features.append("511-byte-footer")
        if footer.features & FEATURE_TEMPORARY:
            features.append("temporary")
        if footer.saved_state:
            features.append("saved-state")
        if self.size_source == "chs":
            features.append("chs-size")
        if self._differencing:
            details["parent_locators"] = [dict(locator) for locator in self._locators]
            details["parent_candidates"] = list(self.parent_candidates)
            details["parent_opened"] = self.parent is not None
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            subformat=self.subformat,
            version=_version_text(footer.format_version),
            cluster_size=self.block_size,
            creator=footer.creator,
            features=features,
            backing_file=self.backing_file,
            backing_format=NAME if self._differencing else None,
            details=details,
        )

    # -- runs ------------------------------------------------------------------------------------

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        if self.header is None:  # fixed: a sparse file's holes are zeros known without reading
            return self._identity_extents(start, end, self._data_area)
        return super()._unmerged_extents(start, end)

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        if self.header is None:
            split = min(max(start, self._data_area), end)
            if split > start:
                yield Run(start, split - start, RunKind.HOST, start)
            if end > split:
                yield Run(split, end - split, RunKind.ZERO)
            return
        hole = RunKind.BACKING if self._differencing else RunKind.ZERO
        block_size = self._block_size
        allocated = self._allocated
        bat = self._bat
        covered = self._covered
        position = start
        index = bisect.bisect_left(allocated, position // block_size)
        while position < end:
            if position >= covered:
                yield Run(position, end - position, hole)
                return
            block = position // block_size
            while index < len(allocated) and allocated[index] < block:
                index += 1
            next_allocated = allocated[index] if index < len(allocated) else self._entries
            if next_allocated > block:  # a range of unallocated blocks
                stop = min(end, next_allocated * block_size)
                yield Run(position, stop - position, hole)
                position = stop
                continue
            block_start = block * block_size
            stop = min(end, block_start + block_size)
            data_offset = bat[block] * SECTOR + self._bitmap_size
            if self._differencing:
                yield from self._differencing_runs(block, block_start, position, stop, data_offset)
            else:
                yield Run(position, stop - position, RunKind.HOST, data_offset + position - block_start)
            position = stop

    def _differencing_runs(self, block: int, block_start: int, start: int, end: int, data_offset: int) -> Iterator[Run]:
        return sector_bitmap_runs(self._block_bitmap_runs(block), SECTOR, block_start, self._block_size, start, end,
                                  data_offset)

    def _block_bitmap_runs(self, block: int) -> tuple[list[int], list[int]]:
        """The sector bitmap of an allocated block as runs: (first sectors, bits), read lazily and
        kept in a small cache."""
        cached = self._bitmap_runs_cache.get(block)
        if cached is not None:
            return cached
        offset = self._bat[block] * SECTOR
        sectors = self._block_size // SECTOR
        used = (sectors + 7) // 8
        bitmap = self.host.read_at(offset, used)
        if len(bitmap) != used:
            raise CorruptImage(
                f"image is truncated: the sector bitmap of block {block} lies past the end of the file",
                path=self.path,
                offset=offset,
                structure="sector bitmap",
            )
        return self._bitmap_runs_cache.put(block, bitmap_runs(bitmap, sectors))


class BitmapRunsCache:
    """The sector bitmaps of recently read blocks as runs: at most BITMAP_CACHE_BLOCKS of them,
    shared by the threads that read one image."""

    def __init__(self) -> None:
        self._runs: dict[int, tuple[list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, block: int) -> tuple[list[int], list[int]] | None:
        return self._runs.get(block)

    def put(self, block: int, runs: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        with self._lock:
            if len(self._runs) >= BITMAP_CACHE_BLOCKS:
                self._runs.clear()
            self._runs[block] = runs
        return runs


def bitmap_runs(bitmap: bytes, sectors: int) -> tuple[list[int], list[int]]:
    """Runs of equal bits in a sector bitmap (MSB of byte 0 = sector 0) over ``sectors`` sectors:
    ``(starts, bits)``, ``starts[0] == 0``. Whole 0x00 / 0xFF byte runs are handled in C."""
    if bitmap == b"\xff" * len(bitmap):
        return [0], [1]
    if not any(bitmap):
        return [0], [0]
    starts: list[int] = []
    bits: list[int] = []

    def add(sector: int, bit: int) -> None:
        if sector < sectors and (not bits or bits[-1] != bit):
            starts.append(sector)
            bits.append(bit)

    for match in _BITMAP_RUNS.finditer(bitmap):
        first = match.start()
        value = bitmap[first]
        if value == 0:
            add(first * 8, 0)
        elif value == 0xFF:
            add(first * 8, 1)
        else:
            for k in range(8):
                add(first * 8 + k, (value >> (7 - k)) & 1)
    return starts, bits


def sector_bitmap_runs(bitmap: tuple[list[int], list[int]], sector: int, block_start: int, block_size: int,
                       start: int, end: int, data_offset: int) -> Iterator[Run]:
    """Runs of [start, end) inside a block whose data lies at ``data_offset``, split by the block's
    sector bitmap (``bitmap_runs`` output): set sectors from this file, clear ones from the parent
    (the rule of differencing VHD and VHDX alike)."""
    starts, bits = bitmap
    i = bisect.bisect_right(starts, (start - block_start) // sector) - 1
    position = start
    while position < end:
        run_end = block_start + (starts[i + 1] * sector if i + 1 < len(starts) else block_size)
        stop = min(end, run_end)
        if bits[i]:
            yield Run(position, stop - position, RunKind.HOST, data_offset + position - block_start)
        else:
            yield Run(position, stop - position, RunKind.BACKING)
        position = stop
        i += 1


def allocated_indices(raw_table: bytes) -> array:
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


class _Opener:
    """Reads and checks the metadata of one VHD file; the values end up on the VhdReader."""

    def __init__(self, host: HostFile, size_rule: str) -> None:
        self.host = host
        self.path = host.name
        self.size_rule = size_rule
        self.structure = "footer"
        self.offset: int | None = None
        self.header: DynamicHeader | None = None
        self.bat: array = array("I")
        self.allocated: array = array("I")
        self.locators: list[dict[str, Any]] = []
        self.parent_candidates: list[str] = []
        self.data_area = 0
        self.facts: dict[str, Any] = {}

    def corrupt(self, message: str, offset: int | None = None, structure: str | None = None) -> CorruptImage:
        return CorruptImage(message, path=self.path, offset=offset, structure=structure or self.structure)

    def parse(self) -> None:
        self._read_footer()
        footer = self.footer
        if footer.disk_type not in _SUBFORMATS:
            raise self.corrupt(
                f"disk type {footer.disk_type} ({footer.disk_type_name}) is not fixed, dynamic or differencing",
                self.footer_offset,
            )
        self._choose_size()
        if footer.disk_type == DISK_FIXED:
            self._check_fixed()
        else:
            self._read_dynamic_header()
            self._read_bat()
            if footer.disk_type == DISK_DIFFERENCING:
                self._read_locators()
        self._collect_facts()

    # footer -------------------------------------------------------------------------------------

    def _read_footer(self) -> None:
        size = self.host.size
        if size < OLD_FOOTER_SIZE:
            raise self.corrupt(f"file of {size} bytes is too small to be a VHD", 0)
        tail = self.host.read_at(size - FOOTER_SIZE, FOOTER_SIZE) if size >= FOOTER_SIZE else b""
        problems = []
        self.head_copy_problem: str | None = "absent"
        head = self.host.read_at(0, FOOTER_SIZE) if size >= 2 * FOOTER_SIZE else b""
        if head[:8] == FOOTER_COOKIE:
            self.head_copy_problem = footer_problem(head)
        self.tail_problem = footer_problem(tail) if tail else "file too small"
        if self.tail_problem is None:
            self._take_footer(tail, "tail", size - FOOTER_SIZE, FOOTER_SIZE)
            return
        problems.append(f"{self.tail_problem} at offset {size - FOOTER_SIZE}")
        old = self.host.read_at(size - OLD_FOOTER_SIZE, OLD_FOOTER_SIZE)
        if old[:8] == FOOTER_COOKIE:
            problem = footer_problem(old)
            if problem is None:
                self.tail_problem = None
                self._take_footer(old, "tail", size - OLD_FOOTER_SIZE, OLD_FOOTER_SIZE)
                return
            problems.append(f"{problem} at offset {size - OLD_FOOTER_SIZE} (511-byte footer)")
        if self.head_copy_problem is None:
            copy = parse_footer(head)
            if copy.disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
                self._take_footer(head, "head_copy", 0, FOOTER_SIZE)
                return
        if head[:8] == FOOTER_COOKIE and self.head_copy_problem is not None:
            problems.append(f"copy at offset 0: {self.head_copy_problem}")
        if tail[:8] != FOOTER_COOKIE and old[:8] != FOOTER_COOKIE and head[:8] != FOOTER_COOKIE:
            raise self.corrupt(
                "not a VHD: no 'conectix' footer at the end of the file or at offset 0", size - FOOTER_SIZE
            )
        offset = size - FOOTER_SIZE if tail[:8] == FOOTER_COOKIE or head[:8] != FOOTER_COOKIE else 0
        raise self.corrupt("no valid VHD footer: " + "; ".join(problems), offset)

    def _take_footer(self, data: bytes, source: str, offset: int, length: int) -> None:
        self.footer = parse_footer(data)
        self.footer_source = source
        self.footer_offset = offset
        self.footer_length = length
        self.footer_raw = data

    # size --------------------------------------------------------------------------------------

    def _choose_size(self) -> None:
        footer = self.footer
        chs_size = footer.chs_size
        if self.size_rule == "chs":
            source = "chs"
        elif self.size_rule == "current_size":
            source = "current_size"
        elif footer.geometry == MAX_GEOMETRY or chs_size == 0:
            source = "current_size"
        elif footer.creator_app in CHS_CREATORS:
            source = "chs"
        else:
            source = "current_size"
        self.size_source = source
        self.virtual_size = chs_size if source == "chs" else footer.current_size

    def _check_fixed(self) -> None:
        footer = self.footer
        self.data_area = self.host.size - self.footer_length
        plausible = [self.virtual_size, footer.current_size]
        if footer.geometry != MAX_GEOMETRY and footer.chs_size:
            plausible.append(footer.chs_size)
        needed = min(plausible)
        if self.data_area < needed:
            raise self.corrupt(
                f"fixed VHD is truncated: the footer describes {needed} bytes of data, the file holds {self.data_area}",
                self.footer_offset,
                "fixed disk data",
            )

    # dynamic header ----------------------------------------------------------------------------

    def _read_dynamic_header(self) -> None:
        self.structure = "dynamic header"
        offset = self.footer.data_offset
        self.offset = offset
        if offset == NO_DATA_OFFSET or offset + DYNAMIC_HEADER_SIZE > self.host.size:
            raise self.corrupt(
                f"the dynamic header offset {offset} from the footer lies outside the file ({self.host.size} bytes)",
                self.footer_offset,
                "footer data_offset",
            )
        data = self.host.read_at(offset, DYNAMIC_HEADER_SIZE)
        problem = dynamic_header_problem(data)
        if problem is not None:
            raise self.corrupt(problem, offset)
        header = parse_dynamic_header(data)
        block_size = header.block_size
        if block_size < SECTOR or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise self.corrupt(
                f"block size {block_size} is not a power of two between 512 and {MAX_BLOCK_SIZE}", offset + 32
            )
        self.header = header

    # BAT ----------------------------------------------------------------------------------------

    def _read_bat(self) -> None:
        header = self.header
        assert header is not None
        self.structure = "block allocation table"
        size = self.host.size
        block_size = header.block_size
        entries = header.max_table_entries
        table = header.table_offset
        self.offset = table
        # The disk needs ceil(size / block_size) entries; a bigger table is allowed (blktap reserves
        # room to grow) as long as it lies in the file, but only the needed entries are read.
        needed = -(-self.virtual_size // block_size)
        needed_by_footer = -(-min(self.virtual_size, self.footer.current_size) // block_size)
        if entries < needed_by_footer:
            raise self.corrupt(
                f"max_table_entries {entries} with {block_size}-byte blocks covers {entries * block_size} bytes, "
                f"less than the disk's {min(self.virtual_size, self.footer.current_size)} bytes",
                self.footer.data_offset + 28,
                "dynamic header",
            )
        claimed = entries * 4
        if claimed > MAX_BAT_BYTES or table + claimed > size:
            raise self.corrupt(
                f"max_table_entries {entries} ({claimed} bytes of table at offset {table}) cannot be right: the "
                f"disk of {self.virtual_size} bytes needs {needed} entries of {block_size} bytes and the file holds "
                f"{size} bytes",
                self.footer.data_offset + 28,
                "dynamic header",
            )
        used_entries = min(entries, needed)
        raw = self.host.read_at(table, used_entries * 4)
        if len(raw) != used_entries * 4:
            raise self.corrupt("the table lies past the end of the file", table)
        self.bat = parse_bat(raw)
        self.allocated = allocated_indices(raw)
        if self.allocated:
            self._check_blocks(table, claimed)

    def _check_blocks(self, table: int, claimed: int) -> None:
        """Blocks may not share or overlap file space, cover metadata, or lie past the end of the file."""
        assert self.header is not None
        block_size = self.header.block_size
        span = (bitmap_size(block_size) + block_size) // SECTOR  # sectors one block occupies
        bat = self.bat
        sectors = sorted(filter(UNALLOCATED.__ne__, bat))
        if any(map(span.__gt__, map(operator.sub, sectors[1:], sectors))):
            for previous, following in zip(sectors, sectors[1:]):
                if following == previous:
                    first = bat.index(previous)
                    second = bat.index(previous, first + 1)
                    raise self.corrupt(
                        f"blocks {first} and {second} both point at sector {previous}",
                        self.header.table_offset + 4 * second,
                    )
                if following - previous < span:
                    raise self.corrupt(
                        f"blocks at offsets {previous * SECTOR} and {following * SECTOR} overlap "
                        f"({span * SECTOR} bytes each)",
                        following * SECTOR,
                        "data block",
                    )
        # Metadata regions no block may overlap: the footer copy, the header, the table.
        regions = [(0, FOOTER_SIZE, "footer copy"), (self.footer.data_offset, DYNAMIC_HEADER_SIZE, "dynamic header"),
                   (table, claimed, "block allocation table")]  # fmt: skip
        for region_start, region_length, name in regions:
            i = bisect.bisect_left(sectors, -(-(region_start + region_length) // SECTOR))
            if i > 0 and (sectors[i - 1] + span) * SECTOR > region_start:
                offset = sectors[i - 1] * SECTOR
                raise self.corrupt(f"a data block at offset {offset} overlaps the {name}", offset, "data block")
        # Every block must lie in the file; a last, partial block only as far as the disk reaches.
        partial = len(bat) - 1 if len(bat) * block_size > self.virtual_size else -1
        highest = sectors[-1]
        if partial >= 0 and bat[partial] == highest:
            self._check_block_end(partial, self.virtual_size - partial * block_size)
            highest = sectors[-2] if len(sectors) > 1 else None
        if highest is not None:
            self._check_block_end(bat.index(highest), block_size)

    def _check_block_end(self, block: int, data_bytes: int) -> None:
        assert self.header is not None
        start = self.bat[block] * SECTOR
        end = start + bitmap_size(self.header.block_size) + data_bytes
        if end > self.host.size:
            raise self.corrupt(
                f"block {block} at offset {start} ends at {end}, past the end of the file ({self.host.size} bytes): "
                "the image is truncated",
                start,
                "data block",
            )

    # parent locators ---------------------------------------------------------------------------

    def _read_locators(self) -> None:
        header = self.header
        assert header is not None
        self.structure = "parent locator"
        relative: list[str] = []
        absolute: list[str] = []
        for index, locator in enumerate(header.parent_locators):
            if not locator.used:
                continue
            entry_offset = self.footer.data_offset + 576 + 24 * index
            entry: dict[str, Any] = {
                "platform_code": fourcc_text(locator.platform_code),
                "data_space": locator.data_space,
                "data_length": locator.data_length,
                "data_offset": locator.data_offset,
            }
            self.locators.append(entry)
            length = locator.data_length
            if length == 0 and locator.data_space:
                # data_length missing: take the space, in bytes or in sectors as the value suggests
                length = locator.data_space if locator.data_space >= SECTOR else locator.data_space * SECTOR
            if length > MAX_LOCATOR_BYTES or locator.data_offset + length > self.host.size:
                raise self.corrupt(
                    f"parent locator {index} ({entry['platform_code']}) claims {length} bytes at offset "
                    f"{locator.data_offset}, outside the file or over {MAX_LOCATOR_BYTES} bytes",
                    entry_offset,
                )
            if locator.platform_code not in RELATIVE_PLATFORMS + ABSOLUTE_PLATFORMS:
                entry["path"] = None
                continue
            data = self.host.read_at(locator.data_offset, length)
            try:
                recorded = decode_locator_path(locator.platform_code, data)
            except (UnicodeError, ValueError):
                entry["path"] = None
                entry["problem"] = "undecodable path"
                continue
            entry["path"] = recorded
            if recorded:
                target = relative if locator.platform_code in RELATIVE_PLATFORMS else absolute
                target.append(host_path(recorded, locator.platform_code))
        name = header.parent_name
        names = []
        if name:
            converted = host_path(name, b"W2ku" if re.match(r"^([A-Za-z]:|\\\\)", name) else b"W2ru")
            names.append(converted)
            base = posixpath.basename(converted)
            if base and base != converted:
                names.append(base)
        candidates: list[str] = []
        for candidate in relative + absolute + names:
            if candidate and candidate not in candidates:
                candidates.append(candidate)
        self.parent_candidates = candidates

    # facts -------------------------------------------------------------------------------------

    def _collect_facts(self) -> None:
        footer = self.footer
        facts: dict[str, Any] = {
            "disk_type": footer.disk_type_name,
            "current_size": footer.current_size,
            "original_size": footer.original_size,
            "chs_size": footer.chs_size,
            "geometry": {
                "cylinders": footer.cylinders,
                "heads": footer.heads,
                "sectors_per_track": footer.sectors_per_track,
            },
            "size_source": self.size_source,
            "creator_app": fourcc_text(footer.creator_app),
            "creator_version": _version_text(footer.creator_version),
            "creator_host_os": fourcc_text(footer.creator_host_os),
            "unique_id": str(footer.unique_id),
            "timestamp": vhd_timestamp_iso(footer.timestamp),
            "saved_state": bool(footer.saved_state),
            "features_flags": footer.features,
            "format_version": _version_text(footer.format_version),
            "footer_source": self.footer_source,
            "footer_length": self.footer_length,
            "footer_checksum": f"0x{footer.checksum:08x}",
            "footer_checksum_valid": True,
            "tail_footer_problem": self.tail_problem,
        }
        if footer.disk_type != DISK_FIXED:
            facts["head_copy_problem"] = self.head_copy_problem
            if self.footer_source == "tail" and self.head_copy_problem is None:
                copy = self.host.read_at(0, FOOTER_SIZE)
                facts["footer_copy_matches"] = copy == self.footer_raw.ljust(FOOTER_SIZE, b"\0")
        else:
            facts["data_area"] = self.data_area
        header = self.header
        if header is not None:
            facts.update(
                {
                    "header_offset": footer.data_offset,
                    "header_version": _version_text(header.header_version),
                    "header_checksum": f"0x{header.checksum:08x}",
                    "header_checksum_valid": True,
                    "block_size": header.block_size,
                    "max_table_entries": header.max_table_entries,
                    "table_offset": header.table_offset,
                    "table_entries_used": len(self.bat),
                    "allocated_blocks": len(self.allocated),
                    "sector_bitmap_honoured": footer.disk_type == DISK_DIFFERENCING,
                }
            )
            if footer.disk_type == DISK_DIFFERENCING:
                facts.update(
                    {
                        "parent_unique_id": str(header.parent_unique_id),
                        "parent_timestamp": vhd_timestamp_iso(header.parent_timestamp),
                        "parent_name": header.parent_name,
                    }
                )
        self.facts = facts


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

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
    from .. import __version__

    parts = [int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", __version__)[:2]] + [0, 0]
    return (min(parts[0], 0xFFFF) << 16) | min(parts[1], 0xFFFF)


class VhdWriter(DiskWriter):
    """Writes fixed or dynamic VHDs in one forward pass (see the module docstring for the layout,
    sizes, geometry and limits)."""

    format = NAME
    OPTIONS = {
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
        VHD is the disk at its own offsets; a dynamic VHD's blocks are allocated under a lock."""
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
        the converter keeps to guest order), each with its bitmap."""
        if not self.dynamic or not length:
            return
        bs = self.block_size
        for block in range(offset // bs, (offset + length - 1) // bs + 1):
            if self.bat[block] == UNALLOCATED:
                self.bat[block] = self._next_free // SECTOR
                self._next_free += self._span
                self.target.pwrite(self._bitmap, self.bat[block] * SECTOR)

    def _write_at_offsets(self, offset: int, view: memoryview) -> None:
        """Positional writes (``concurrent_writes``) into blocks that ``reserve`` allocated."""
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


__all__ = [
    "NAME",
    "VhdFooter",
    "DynamicHeader",
    "ParentLocator",
    "VhdReader",
    "VhdWriter",
    "writer_geometry",
    "parse_footer",
    "parse_dynamic_header",
    "footer_problem",
    "dynamic_header_problem",
    "parse_bat",
    "FOOTER_CHECKSUM_OFFSET",
    "DYNAMIC_HEADER_CHECKSUM_OFFSET",
    "vhd_checksum",
    "chs_geometry",
    "bitmap_size",
    "bitmap_runs",
    "sector_bitmap_runs",
    "BitmapRunsCache",
    "encode_parent_name",
    "decode_locator_path",
    "host_path",
    "probe",
]
