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

References: Maxim Suhanov's "Windows registry file format specification" and Joachim Metz's
libregf documentation. Nothing here trusts the file: every offset is checked against the hive bins
data, every count against the cell that holds it, and a referenced cell must be allocated; a broken
structure raises :class:`~diskimg.errors.CorruptImage`. The whole hive is held in memory (the caller
bounds its size); walking the tree detects cycles.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ..errors import CorruptImage, DiskImageError

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


def base_block_checksum(block: bytes) -> int:
    """XOR of the first 127 little-endian 32-bit words of the base block (stored at offset 508)."""
    checksum = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        checksum ^= word
    return checksum


def checksum_matches(stored: int, computed: int) -> bool:
    """Windows stores 1 for a checksum of 0 and 0xFFFFFFFE for 0xFFFFFFFF; other writers do not."""
    substitute = {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(computed, computed)
    return stored in (computed, substitute)


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

    __slots__ = ("hive", "offset", "name", "type", "_size", "_data_offset")

    def __init__(self, hive: Hive, offset: int) -> None:
        cell = hive.cell(offset, "value")
        if len(cell) < _VK.size or cell[:2] != b"vk":
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

    __slots__ = ("hive", "offset", "name", "flags", "_subkey_count", "_subkey_list", "_value_count", "_value_list")

    def __init__(self, hive: Hive, offset: int) -> None:
        cell = hive.cell(offset, "key node")
        if len(cell) < _NK.size or cell[:2] != b"nk":
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

    def __init__(self, data: bytes) -> None:
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
