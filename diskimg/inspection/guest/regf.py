"""Windows registry hives (regf), read-only: keys, values and the current control set.

A hive file is a 4096-byte *base block* followed by the *hive bins data*: hbins (4096-byte
multiples, each a 32-byte header then cells). Every reference inside a hive is an offset relative to
the start of the hive bins data (file offset 4096). A *cell* is a signed 32-bit size (negative when
allocated, the size field included, 8-byte aligned) followed by its data:

- ``nk`` key node: flags, parent, subkey count and list, value count and list, security, name
  (Latin-1 when flag 0x20 is set, else UTF-16LE)
- subkey lists: ``lf``/``lh`` (offset + 4-byte hint each), ``li`` (offsets), ``ri`` (offsets of
  leaves: an index root never points to another index root)
- a value list: a bare array of offsets of ``vk`` cells
- ``vk`` value: name length, data size (high bit set: up to 4 bytes stored in the offset field
  itself), data offset, type, flags (0x1: Latin-1 name), name
- ``db`` big data (hive minor version 4 and later, data above 16344 bytes): a segment count and
  the offset of a list of segment cells, each holding up to 16344 bytes

A hive is *dirty* when its base block's two sequence numbers differ (Windows bumps the first before
writing the file and the second after) or its checksum is wrong: the newest data then lies in the
transaction logs beside it (``SYSTEM.LOG1``, ``SYSTEM.LOG2``), which :func:`replay_logs` applies in
memory as Windows does when it loads the hive (see there for the two log formats).

References: Maxim Suhanov's "Windows registry file format specification" and Joachim Metz's
libregf documentation. Nothing here trusts the file: every offset is checked against the hive bins
data, every count against the cell that holds it, and a referenced cell must be allocated; a broken
structure raises :class:`~diskimg.errors.CorruptImage`. The whole hive is held in memory (the caller
bounds its size); walking the tree detects cycles.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import chain

from ...errors import CorruptImage, DiskImageError

BASE_BLOCK_SIZE = 4096
SIGNATURE = b"regf"
HBIN_SIGNATURE = b"hbin"
#: bytes of data one big-data segment holds
BIG_DATA_SEGMENT = 16344
#: what a key path may hold before it is refused (Windows allows 512 levels)
MAX_PATH_DEPTH = 512
#: an empty reference
NO_CELL = 0xFFFFFFFF

KEY_COMP_NAME = 0x0020
VALUE_COMP_NAME = 0x0001

REG_NONE = 0
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_DWORD_BIG_ENDIAN = 5
REG_LINK = 6
REG_MULTI_SZ = 7
REG_QWORD = 11

_BASE = struct.Struct("<4sIIQIIIIII")  # signature, sequences 1/2, timestamp, major, minor, type, format, root, size
_NK = struct.Struct("<2sHQIIIIIIIIIIIIIIIHH")
_VK = struct.Struct("<2sHIIIHH")
_DB = struct.Struct("<2sHI")


class KeyNotFound(DiskImageError):
    """A key path that is not in the hive."""


class LogsNotUsable(DiskImageError):
    """No transaction log brings a dirty hive up to date: the hive can only be read as it is."""


def base_block_checksum(block: bytes | bytearray) -> int:
    """XOR of the first 127 little-endian 32-bit words of the base block (stored at offset 508)."""
    checksum = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        checksum ^= word
    return checksum


def windows_checksum(computed: int) -> int:
    """The checksum as Windows stores it: 1 for 0, 0xFFFFFFFE for 0xFFFFFFFF."""
    return {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(computed, computed)


def checksum_matches(stored: int, computed: int) -> bool:
    """Windows substitutes two checksums (see windows_checksum); other writers do not."""
    return stored in (computed, windows_checksum(computed))


def name_hash(name: str) -> int:
    """The ``lh`` hint of a key name: H = 37 * H + each character of the upper-cased name, mod 2**32."""
    value = 0
    for char in name.upper():
        value = (value * 37 + ord(char)) & 0xFFFFFFFF
    return value


def _utf16_string(raw: bytes) -> str:
    text = raw[: len(raw) & ~1].decode("utf-16-le", errors="replace")
    end = text.find("\0")
    return text if end < 0 else text[:end]


def decode_value(value_type: int, raw: bytes) -> str | list[str] | int | bytes | None:
    """The value as Windows reads it: strings for REG_SZ/REG_EXPAND_SZ/REG_LINK (up to the first NUL),
    a list for REG_MULTI_SZ, int for REG_DWORD (either byte order) and REG_QWORD, bytes otherwise. None when the
    data is too short for its type, so that a missing number is never read as 0."""
    if value_type in (REG_SZ, REG_EXPAND_SZ, REG_LINK):
        return _utf16_string(raw)
    if value_type == REG_MULTI_SZ:
        # NUL-terminated strings, the list ending at the first empty one (or at the end of the data)
        text = raw[: len(raw) & ~1].decode("utf-16-le", errors="replace")
        strings = text.split("\0")
        return strings[: strings.index("")] if "" in strings else strings
    if value_type in (REG_DWORD, REG_DWORD_BIG_ENDIAN):
        if len(raw) < 4:
            return None
        return int.from_bytes(raw[:4], "little" if value_type == REG_DWORD else "big")
    if value_type == REG_QWORD:
        return int.from_bytes(raw[:8], "little") if len(raw) >= 8 else None
    return raw


class Value:
    """One ``vk``: its name ("" for the key's default value) and type; the data is read when asked
    for, so that looking a value up by name never copies the data of the others."""

    __slots__ = ("_data_offset", "_size", "hive", "name", "offset", "type")

    def __init__(self, hive: Hive, offset: int) -> None:
        cell = hive.cell(offset, "value")
        if len(cell) < _VK.size or bytes(cell[:2]) != b"vk":
            raise CorruptImage("not a value (vk)", offset=BASE_BLOCK_SIZE + offset, structure="registry hive")
        _sig, name_length, self._size, self._data_offset, self.type, flags, _spare = _VK.unpack_from(cell)
        raw_name = bytes(cell[_VK.size:_VK.size + name_length])
        if len(raw_name) != name_length:
            raise CorruptImage("value name runs past its cell", offset=BASE_BLOCK_SIZE + offset,
                               structure="registry hive")
        self.hive = hive
        self.offset = offset
        self.name = raw_name.decode("latin-1") if flags & VALUE_COMP_NAME else _utf16_string(raw_name)

    def __repr__(self) -> str:
        return f"Value({self.name!r}, type={self.type}, offset={self.offset:#x})"

    @property
    def raw(self) -> bytes:
        return self.hive.value_data(self._size, self._data_offset, self.offset)

    @property
    def data(self) -> str | list[str] | int | bytes | None:
        return decode_value(self.type, self.raw)


class Key:
    """One ``nk`` cell of a hive; subkeys and values are read when asked for."""

    __slots__ = ("_subkey_count", "_subkey_list", "_value_count", "_value_list", "flags", "hive", "name", "offset")

    def __init__(self, hive: Hive, offset: int) -> None:
        cell = hive.cell(offset, "key node")
        if len(cell) < _NK.size or bytes(cell[:2]) != b"nk":
            raise CorruptImage("not a key node (nk)", offset=BASE_BLOCK_SIZE + offset, structure="registry hive")
        fields = _NK.unpack_from(cell)
        self.hive = hive
        self.offset = offset
        self.flags = fields[1]
        self._subkey_count, self._subkey_list = fields[5], fields[7]
        self._value_count, self._value_list = fields[9], fields[10]
        name_length = fields[18]
        raw_name = bytes(cell[_NK.size:_NK.size + name_length])
        if len(raw_name) != name_length:
            raise CorruptImage("key name runs past its cell", offset=BASE_BLOCK_SIZE + offset,
                               structure="registry hive")
        self.name = raw_name.decode("latin-1") if self.flags & KEY_COMP_NAME else _utf16_string(raw_name)

    def __repr__(self) -> str:
        return f"Key({self.name!r}, offset={self.offset:#x})"

    def subkeys(self) -> Iterator[Key]:
        if self._subkey_count == 0 or self._subkey_list == NO_CELL:
            return
        for found, offset in enumerate(self.hive.subkey_offsets(self._subkey_list)):
            if found >= self._subkey_count:
                break
            yield Key(self.hive, offset)

    def subkey(self, name: str) -> Key | None:
        """The subkey called ``name``, compared without case as Windows does."""
        folded = name.casefold()
        for key in self.subkeys():
            if key.name.casefold() == folded:
                return key
        return None

    def values(self) -> Iterator[Value]:
        if self._value_count == 0 or self._value_list == NO_CELL:
            return
        cell = self.hive.cell(self._value_list, "value list")
        if self._value_count * 4 > len(cell):
            raise CorruptImage(f"{self._value_count} values do not fit their list of {len(cell)} bytes",
                               offset=BASE_BLOCK_SIZE + self._value_list, structure="registry hive")
        for (offset,) in struct.iter_unpack("<I", cell[: self._value_count * 4]):
            yield Value(self.hive, offset)

    def value(self, name: str) -> Value | None:
        """The value called ``name`` ("" for the default value), compared without case."""
        folded = name.casefold()
        for value in self.values():
            if value.name.casefold() == folded:
                return value
        return None

    def data(self, name: str) -> str | list[str] | int | bytes | None:
        """The decoded data of value ``name``, or None when it is absent."""
        value = self.value(name)
        return value.data if value is not None else None


class Hive:
    """A registry hive held in memory (see the module docstring for the layout)."""

    def __init__(self, data: bytes | bytearray) -> None:
        if len(data) < BASE_BLOCK_SIZE + 32:
            raise CorruptImage(f"{len(data)} bytes is too small for a registry hive", structure="registry hive")
        (signature, self.primary_sequence, self.secondary_sequence, self.timestamp, self.major_version,
         self.minor_version, self.file_type, _format, root, bins_size) = _BASE.unpack_from(data)
        if signature != SIGNATURE:
            raise CorruptImage("no 'regf' signature", offset=0, structure="registry hive")
        if self.major_version != 1:
            raise CorruptImage(f"registry format version {self.major_version}.{self.minor_version}",
                               offset=20, structure="registry hive")
        stored = struct.unpack_from("<I", data, 508)[0]
        self.checksum_ok = checksum_matches(stored, base_block_checksum(data))
        if data[BASE_BLOCK_SIZE:BASE_BLOCK_SIZE + 4] != HBIN_SIGNATURE:
            raise CorruptImage("no hive bin after the base block", offset=BASE_BLOCK_SIZE, structure="registry hive")
        self._data = memoryview(data)
        # cells must lie in the hive bins data the base block declares, and in the file
        self._end = min(len(data), BASE_BLOCK_SIZE + bins_size) if bins_size else len(data)
        self.root = Key(self, root)

    @property
    def dirty(self) -> bool:
        """Windows was writing the hive when it was copied (its transaction logs hold newer data)."""
        return self.primary_sequence != self.secondary_sequence or not self.checksum_ok

    def cell(self, offset: int, what: str) -> memoryview:
        """The data of the allocated cell at ``offset`` (relative to the hive bins data)."""
        start = BASE_BLOCK_SIZE + offset
        if offset == NO_CELL or start + 4 > self._end:
            raise CorruptImage(f"{what} cell offset {offset:#x} is outside the hive", structure="registry hive")
        size = struct.unpack_from("<i", self._data, start)[0]
        if size >= 0:
            raise CorruptImage(f"{what} points to a free cell", offset=start, structure="registry hive")
        size = -size
        if size < 8 or start + size > self._end:
            raise CorruptImage(f"{what} cell of {size} bytes does not fit the hive", offset=start,
                               structure="registry hive")
        return self._data[start + 4:start + size]

    def subkey_offsets(self, list_offset: int) -> Iterator[int]:
        """The key node offsets of a subkey list (``lf``, ``lh``, ``li``, or an ``ri`` of leaves)."""
        cell = self.cell(list_offset, "subkey list")
        kind = bytes(cell[:2])
        if kind == b"ri":
            leaves: set[int] = set()
            for leaf in self._list_elements(cell, 4, list_offset):
                if leaf in leaves:  # so that a walk costs at most the size of the hive
                    raise CorruptImage("an index root lists a subkey list twice", offset=BASE_BLOCK_SIZE + leaf,
                                       structure="registry hive")
                leaves.add(leaf)
                leaf_cell = self.cell(leaf, "subkey list")
                if bytes(leaf_cell[:2]) not in (b"li", b"lf", b"lh"):
                    raise CorruptImage("an index root points to something other than a subkey list",
                                       offset=BASE_BLOCK_SIZE + leaf, structure="registry hive")
                yield from self._leaf(leaf_cell, leaf)
            return
        yield from self._leaf(cell, list_offset)

    def _leaf(self, cell: memoryview, offset: int) -> Iterator[int]:
        kind = bytes(cell[:2])
        if kind == b"li":
            yield from self._list_elements(cell, 4, offset)
        elif kind in (b"lf", b"lh"):
            yield from self._list_elements(cell, 8, offset)
        else:
            raise CorruptImage(f"unknown subkey list {kind!r}", offset=BASE_BLOCK_SIZE + offset,
                               structure="registry hive")

    @staticmethod
    def _list_elements(cell: memoryview, element_size: int, offset: int) -> Iterator[int]:
        if len(cell) < 4:
            raise CorruptImage("subkey list too short", offset=BASE_BLOCK_SIZE + offset, structure="registry hive")
        count = struct.unpack_from("<H", cell, 2)[0]
        if 4 + count * element_size > len(cell):
            raise CorruptImage(f"{count} subkey list elements do not fit {len(cell)} bytes",
                               offset=BASE_BLOCK_SIZE + offset, structure="registry hive")
        for index in range(count):
            yield struct.unpack_from("<I", cell, 4 + index * element_size)[0]

    def value_data(self, size: int, data_offset: int, vk_offset: int) -> bytes:
        """The data of the value at ``vk_offset``: ``size`` bytes inline (high bit set), in a cell, or in
        big-data segments."""
        if size & 0x80000000:  # stored in the data offset field itself
            size &= 0x7FFFFFFF
            if size > 4:
                raise CorruptImage(f"inline value data of {size} bytes", offset=BASE_BLOCK_SIZE + vk_offset,
                                   structure="registry hive")
            return struct.pack("<I", data_offset)[:size]
        if size == 0:
            return b""
        cell = self.cell(data_offset, "value data")
        if size > BIG_DATA_SEGMENT and self.minor_version >= 4 and bytes(cell[:2]) == b"db":
            return self._big_data(cell, size, data_offset)
        if size > len(cell):
            raise CorruptImage(f"value data of {size} bytes in a cell of {len(cell)}",
                               offset=BASE_BLOCK_SIZE + data_offset, structure="registry hive")
        return bytes(cell[:size])

    def _big_data(self, cell: memoryview, size: int, offset: int) -> bytes:
        if len(cell) < _DB.size:
            raise CorruptImage("big data record too short", offset=BASE_BLOCK_SIZE + offset, structure="registry hive")
        _sig, count, list_offset = _DB.unpack_from(cell)
        if count * BIG_DATA_SEGMENT < size:
            raise CorruptImage(f"{count} big data segments cannot hold {size} bytes",
                               offset=BASE_BLOCK_SIZE + offset, structure="registry hive")
        segments = self.cell(list_offset, "big data segment list")
        if count * 4 > len(segments):
            raise CorruptImage(f"{count} big data segments do not fit their list",
                               offset=BASE_BLOCK_SIZE + list_offset, structure="registry hive")
        pieces = []
        remaining = size
        for (segment_offset,) in struct.iter_unpack("<I", segments[: count * 4]):
            if remaining <= 0:
                break
            segment = self.cell(segment_offset, "big data segment")
            take = min(remaining, BIG_DATA_SEGMENT)
            if take > len(segment):
                raise CorruptImage(f"big data segment of {len(segment)} bytes, {take} expected",
                                   offset=BASE_BLOCK_SIZE + segment_offset, structure="registry hive")
            pieces.append(bytes(segment[:take]))
            remaining -= take
        return b"".join(pieces)

    # -- paths -------------------------------------------------------------------------------------

    def find(self, path: str) -> Key | None:
        """The key at ``path`` (backslash-separated, from the hive's root, without case), or None."""
        parts = [part for part in path.split("\\") if part]
        if len(parts) > MAX_PATH_DEPTH:
            return None
        key: Key | None = self.root
        for part in parts:
            key = key.subkey(part) if key is not None else None
        return key

    def open(self, path: str) -> Key:
        key = self.find(path)
        if key is None:
            raise KeyNotFound(f"no key {path!r} in the hive")
        return key

    def current_control_set(self) -> Key | None:
        """``ControlSet00N`` named by ``Select\\Current`` (a SYSTEM hive), or None when absent."""
        select = self.find("Select")
        current = select.data("Current") if select is not None else None
        if not isinstance(current, int) or not 0 < current < 1000:
            return None
        return self.find(f"ControlSet{current:03d}")

    def walk(self, top: Key | None = None) -> Iterator[tuple[str, Key]]:
        """Every key under ``top`` (the root by default) with its path, depth first; a key met twice
        (a cycle, or a key listed under two parents) raises CorruptImage."""
        start = top if top is not None else self.root
        seen = {start.offset}
        stack: list[tuple[str, Key]] = [("", start)]
        while stack:
            path, key = stack.pop()
            yield path, key
            children = []
            for child in key.subkeys():
                if child.offset in seen:
                    raise CorruptImage("a key is reached twice (a cycle in the key tree)",
                                       offset=BASE_BLOCK_SIZE + child.offset, structure="registry hive")
                seen.add(child.offset)
                children.append((f"{path}\\{child.name}" if path else child.name, child))
            stack.extend(reversed(children))


# -- transaction logs ---------------------------------------------------------------------------------
#
# Both log formats start with a 512-byte copy of the hive's base block, its file type 1 (2 before
# Windows XP) in the old format and 6 in the new one; a log is valid when that copy's checksum holds
# and its two sequence numbers are equal. Sizes and offsets count 512-byte sectors (Windows before 8
# supports no other sector size, and Windows 8 and later count 512 whatever the disk).
#
# Old format (up to Windows 8): at 512 the dirty vector, "DIRT" then a bitmap of one bit per 512-byte
# page of the hive bins data (least significant bit first); from the next 512-byte boundary on, one
# 512-byte page per set bit, in bit order; the page of bit n belongs at file offset 4096 + 512 * n.
#
# New format (Windows 8.1 and later): from 512 on, log entries, each a multiple of 512 bytes:
# "HvLE", size, flags, sequence number, hive bins data size, page count, hash-1 (Marvin32 of the entry
# from byte 40 on), hash-2 (Marvin32 of its first 32 bytes), then the (offset in the hive bins data,
# size) of each page, then the pages back to back. Applying the entry of sequence N leaves the hive
# at sequence N; the logs take turns, so that either may hold the older entries.

LOG_BASE_BLOCK = 512
LOG_PAGE = 512
#: hive bins are 4096-byte multiples, so is the hive bins data
HBIN_ALIGN = 4096
OLD_LOG_TYPES = (1, 2)
NEW_LOG_TYPE = 6
LOG_ENTRY_SIGNATURE = b"HvLE"
DIRTY_VECTOR_SIGNATURE = b"DIRT"
#: the Marvin32 seed of log entry hashes (the specification lists its bytes most significant first)
LOG_ENTRY_SEED = 0x82EF4D887A4E55C5
#: the flag of the base block (KTM has locked the hive) that log entries carry
LOG_ENTRY_FLAGS = 0x1
_LOG_ENTRY = struct.Struct("<4sIIIIIQQ")  # signature, size, flags, sequence, bins size, page count, hash-1, hash-2
_HBIN = struct.Struct("<4sII")  # signature, offset in the hive bins data, size
_WORD = 0xFFFFFFFF


def marvin32(data: bytes | memoryview, seed: int = LOG_ENTRY_SEED) -> int:
    """Marvin32, Microsoft's keyed 64-bit hash: two 32-bit lanes mixed after each little-endian word
    is added to the low one; the input ends with 0x80 after its last 0-3 bytes, then one zero word."""
    view = memoryview(data)
    whole = len(view) & ~3
    tail = (bytes(view[whole:]) + b"\x80").ljust(8, b"\0")
    low, high = seed & _WORD, seed >> 32
    for (word,) in chain(struct.iter_unpack("<I", view[:whole]), struct.iter_unpack("<I", tail)):
        low = (low + word) & _WORD
        high ^= low
        low = ((low << 20) | (low >> 12)) & _WORD
        low = (low + high) & _WORD
        high = ((high << 9) | (high >> 23)) & _WORD
        high ^= low
        low = ((low << 27) | (low >> 5)) & _WORD
        low = (low + high) & _WORD
        high = ((high << 19) | (high >> 13)) & _WORD
    return (high << 32) | low


@dataclass(frozen=True)
class TransactionLog:
    """The base block copy of one valid transaction log."""

    name: str
    data: bytes
    new_format: bool
    sequence: int
    timestamp: int
    bins_size: int


@dataclass(frozen=True)
class LogEntry:
    """One new-format log entry whose hashes hold: its pages, each (offset in the hive bins data, bytes)."""

    sequence: int
    flags: int
    bins_size: int
    pages: list[tuple[int, memoryview]]


@dataclass(frozen=True)
class Replay:
    """A dirty hive brought up to date by its transaction logs."""

    data: bytearray
    sequence: int
    #: the pages written into the hive
    pages: int
    #: the logs that held them, oldest first
    logs: tuple[str, ...]


def read_log(name: str, data: bytes) -> TransactionLog:
    """The base block copy at the start of log ``name``; LogsNotUsable when it is no valid log."""
    if len(data) < 2 * LOG_PAGE:
        raise LogsNotUsable(f"{name}: {len(data)} bytes is too small for a transaction log")
    signature, first, second, timestamp, major, _minor, file_type, _format, _root, bins_size = _BASE.unpack_from(data)
    if signature != SIGNATURE or major != 1:
        raise LogsNotUsable(f"{name}: no registry base block")
    if file_type not in (*OLD_LOG_TYPES, NEW_LOG_TYPE):
        raise LogsNotUsable(f"{name}: file type {file_type} is not a transaction log")
    if not checksum_matches(struct.unpack_from("<I", data, 508)[0], base_block_checksum(data)):
        raise LogsNotUsable(f"{name}: the checksum of its base block is wrong")
    if first != second:
        raise LogsNotUsable(f"{name}: it was being written (sequence numbers {first} and {second})")
    if bins_size % HBIN_ALIGN:
        raise LogsNotUsable(f"{name}: hive bins data of {bins_size} bytes")
    return TransactionLog(name, data, file_type == NEW_LOG_TYPE, first, timestamp, bins_size)


def log_entries(log: TransactionLog, max_size: int) -> Iterator[LogEntry]:
    """The entries of a new-format log, in file order, up to the first that is bad (signature, size,
    hashes, a hive above ``max_size`` bytes, a page outside the hive bins data): Windows stops there."""
    data = memoryview(log.data)
    offset = LOG_BASE_BLOCK
    while offset + _LOG_ENTRY.size <= len(data):
        signature, size, flags, sequence, bins_size, count, hash1, hash2 = _LOG_ENTRY.unpack_from(data, offset)
        end = offset + size
        pages_start = offset + _LOG_ENTRY.size + 8 * count
        if (signature != LOG_ENTRY_SIGNATURE or size % LOG_PAGE or not pages_start <= end <= len(data)
                or bins_size % HBIN_ALIGN or not 0 < bins_size <= max_size - BASE_BLOCK_SIZE
                or marvin32(data[offset:offset + 32]) != hash2 or marvin32(data[offset + 40:end]) != hash1):
            return
        pages = []
        position = pages_start
        for page_offset, page_size in struct.iter_unpack("<II", data[offset + _LOG_ENTRY.size:pages_start]):
            if page_size == 0 or page_offset + page_size > bins_size or position + page_size > end:
                return
            pages.append((page_offset, data[position:position + page_size]))
            position += page_size
        yield LogEntry(sequence, flags, bins_size, pages)
        offset = end


def dirty_pages(log: TransactionLog, max_size: int) -> list[tuple[int, memoryview]]:
    """The pages of an old-format log, each (offset in the hive bins data, 512 bytes)."""
    if BASE_BLOCK_SIZE + log.bins_size > max_size:
        raise LogsNotUsable(f"{log.name}: a hive of {BASE_BLOCK_SIZE + log.bins_size} bytes is more than the "
                            f"{max_size} read here")
    data = memoryview(log.data)
    bitmap_start = LOG_BASE_BLOCK + len(DIRTY_VECTOR_SIGNATURE)
    bitmap_end = bitmap_start + log.bins_size // LOG_PAGE // 8
    if data[LOG_BASE_BLOCK:bitmap_start] != DIRTY_VECTOR_SIGNATURE or bitmap_end > len(data):
        raise LogsNotUsable(f"{log.name}: no dirty vector")
    bitmap = bytes(data[bitmap_start:bitmap_end])
    position = -(-bitmap_end // LOG_PAGE) * LOG_PAGE
    count = int.from_bytes(bitmap, "little").bit_count()
    if position + count * LOG_PAGE > len(data):
        raise LogsNotUsable(f"{log.name}: {count} dirty pages, {max(len(data) - position, 0) // LOG_PAGE} stored")
    pages = []
    for index, byte in enumerate(bitmap):
        for bit in range(8) if byte else ():
            if byte >> bit & 1:
                pages.append(((index * 8 + bit) * LOG_PAGE, data[position:position + LOG_PAGE]))
                position += LOG_PAGE
    return pages


def _valid_hbin(offset: int, page: memoryview, bins_size: int) -> bool:
    """A page that starts a hive bin must name its own offset and a size that fits the hive."""
    if offset % HBIN_ALIGN or bytes(page[:4]) != HBIN_SIGNATURE:
        return True
    own_offset: int
    size: int
    _signature, own_offset, size = _HBIN.unpack_from(page)
    return own_offset == offset and size >= HBIN_ALIGN and size % HBIN_ALIGN == 0 and offset + size <= bins_size


def _write_pages(hive: bytearray, bins_size: int, pages: list[tuple[int, memoryview]]) -> None:
    end = BASE_BLOCK_SIZE + bins_size
    if len(hive) < end:  # a log may grow the hive, never shrink it
        hive.extend(bytes(end - len(hive)))
    for offset, page in pages:
        hive[BASE_BLOCK_SIZE + offset:BASE_BLOCK_SIZE + offset + len(page)] = page
    struct.pack_into("<I", hive, 40, bins_size)


def _close_base_block(hive: bytearray, sequence: int) -> None:
    """The base block of a hive written in full: both sequence numbers equal, a primary file, its checksum."""
    struct.pack_into("<II", hive, 4, sequence, sequence)
    struct.pack_into("<I", hive, 28, 0)
    struct.pack_into("<I", hive, 508, windows_checksum(base_block_checksum(bytes(hive[:508]))))


def _replay_entries(primary: bytes, logs: list[TransactionLog], max_size: int) -> Replay:
    """New format: the entries that continue the hive, in sequence order across both logs. The first one
    applied carries its log's own sequence number (not below the hive's secondary one), each next one
    N + 1. A hive whose base block is torn takes the base block of the log with the newest entries, and
    only that log."""
    hive = bytearray(primary)
    ordered = sorted(logs, key=lambda log: log.sequence)
    lowest = struct.unpack_from("<I", primary, 8)[0]
    if not checksum_matches(struct.unpack_from("<I", primary, 508)[0], base_block_checksum(primary)):
        ordered = ordered[-1:]
        hive[:LOG_BASE_BLOCK] = ordered[0].data[:LOG_BASE_BLOCK]
        lowest = 0
    expected: int | None = None
    pages = 0
    used: list[str] = []
    for log in ordered:
        for entry in log_entries(log, max_size):
            if entry.sequence != (expected if expected is not None else log.sequence) or entry.sequence < lowest:
                break
            _write_pages(hive, entry.bins_size, entry.pages)
            flags = struct.unpack_from("<I", hive, 144)[0]
            struct.pack_into("<I", hive, 144, flags & ~LOG_ENTRY_FLAGS | entry.flags & LOG_ENTRY_FLAGS)
            pages += len(entry.pages)
            expected = (entry.sequence + 1) & _WORD
            if log.name not in used:
                used.append(log.name)
    if expected is None:
        names = ", ".join(log.name for log in ordered)
        raise LogsNotUsable(f"{names}: no log entry continues the hive (sequence {lowest})")
    sequence = (expected - 1) & _WORD
    _close_base_block(hive, sequence)
    return Replay(hive, sequence, pages, tuple(used))


def _replay_dirty_pages(primary: bytes, logs: list[TransactionLog], max_size: int) -> Replay:
    """Old format: the newest valid log not older than the hive (by the timestamps of their base blocks;
    any age when the hive's base block is torn, which then comes from the log). Its pages are written
    up to the first that starts a broken hive bin."""
    timestamp = struct.unpack_from("<Q", primary, 12)[0]
    intact = checksum_matches(struct.unpack_from("<I", primary, 508)[0], base_block_checksum(primary))
    candidates = sorted((log for log in logs if log.timestamp >= timestamp or not intact),
                        key=lambda log: (log.timestamp, log.sequence), reverse=True)
    if not candidates:
        raise LogsNotUsable(f"{', '.join(log.name for log in logs)}: older than the hive")
    log = candidates[0]
    pages = dirty_pages(log, max_size)
    for index, (offset, page) in enumerate(pages):
        if not _valid_hbin(offset, page, log.bins_size):
            pages = pages[:index]
            break
    hive = bytearray(primary)
    if not intact:
        hive[:LOG_BASE_BLOCK] = log.data[:LOG_BASE_BLOCK]
    _write_pages(hive, log.bins_size, pages)
    _close_base_block(hive, log.sequence)
    return Replay(hive, log.sequence, len(pages), (log.name,))


def replay_logs(primary: bytes, logs: Mapping[str, bytes], max_size: int) -> Replay:
    """The dirty hive ``primary`` with its transaction ``logs`` (file name -> data) applied in memory, as
    Windows recovers a hive when it loads it, growing to at most ``max_size`` bytes. New-format logs are
    tried first, then old-format ones. LogsNotUsable, saying why, when no log applies."""
    if len(primary) < BASE_BLOCK_SIZE:
        raise LogsNotUsable(f"{len(primary)} bytes is too small for a registry hive")
    reasons = []
    usable = []
    for name, data in logs.items():
        try:
            usable.append(read_log(name, data))
        except LogsNotUsable as exc:
            reasons.append(exc.message)
    for new_format, replay in ((True, _replay_entries), (False, _replay_dirty_pages)):
        candidates = [log for log in usable if log.new_format == new_format]
        if candidates:
            try:
                return replay(primary, candidates, max_size)
            except LogsNotUsable as exc:
                reasons.append(exc.message)
    raise LogsNotUsable("; ".join(reasons) or "no transaction log")
