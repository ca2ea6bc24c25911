"""Tar headers: read GNU, ustar, pax and v7 members; write GNU members with old-GNU sparse maps.

A tar archive is a sequence of 512-byte blocks. Each member is a header block, then its data padded
to a whole block; two zero blocks end the archive. The header (ustar layout)::

    0 name[100]  100 mode[8]  108 uid[8]  116 gid[8]  124 size[12]  136 mtime[12]  148 chksum[8]
    156 typeflag  157 linkname[100]  257 magic[6] version[2]  265 uname[32]  297 gname[32]
    329 devmajor[8]  337 devminor[8]  345 prefix[155] (ustar) | GNU fields (below)

Numbers are octal text (NUL- or space-terminated), or for large values GNU's base-256: the first
byte has its high bit set and the rest is a big-endian integer. ``chksum`` is the sum of the
header's bytes with the checksum field counted as eight spaces. Magic ``"ustar\\0" "00"`` is POSIX
ustar (``prefix`` + ``/`` + ``name`` is the path), ``"ustar  \\0"`` is GNU; no magic is old v7.

Extensions that come as headers of their own, before the member they describe:

- GNU ``L`` / ``K``: the data is the member's long name / long link name.
- pax ``x`` (this member) and ``g`` (global): records ``"LEN key=value\\n"``, LEN counting the
  whole record in decimal; ``path``, ``linkpath`` and ``size`` override the header.

Sparse files (holes not stored; the stored data is the data segments, concatenated):

- old GNU, typeflag ``S``: at 386 four (offset[12], numbytes[12]) entries, at 482 ``isextended``,
  at 483 ``realsize[12]`` (the file's size; ``size`` counts only the stored bytes). While
  ``isextended`` is set, an extension block follows the header: 21 entries, ``isextended`` at 504.
  GNU tar ends a map whose file ends in a hole with an entry (realsize, 0).
- pax 0.0: ``GNU.sparse.size``, ``GNU.sparse.numblocks``, then ``GNU.sparse.offset`` /
  ``GNU.sparse.numbytes`` repeated in order; 0.1: the pairs comma-separated in ``GNU.sparse.map``,
  the real name in ``GNU.sparse.name``; 1.0 (``GNU.sparse.major=1``, ``minor=0``): the real name
  and ``GNU.sparse.realsize`` in the pax header, the map at the start of the data as decimal
  numbers one a line (the count, then offset and length pairs), padded to a whole block.

Archives are untrusted: every field is checked, metadata headers are capped in size, sparse maps in
entries, and a map must be in order, not overlap, stay within the file and account for exactly the
stored bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import ArchiveError

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)

#: GNU long names and pax headers larger than this are refused
MAX_METADATA = 1 << 20
#: sparse map entries accepted in one member (a tuple each in memory)
MAX_SPARSE_ENTRIES = 1 << 20
#: metadata headers (L, K, x, g) accepted before one member
MAX_EXTENSION_HEADERS = 16
#: sizes and offsets at or above this are refused (no file system holds such files)
MAX_SIZE = 1 << 62

_GNU_MAGIC = b"ustar  \0"
_USTAR_MAGIC = b"ustar\x0000"
_ENTRY = 24  # one old-GNU sparse entry: offset[12], numbytes[12]
_HEADER_ENTRIES = 4
_EXTENSION_ENTRIES = 21

_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"S": "file", b"1": "hardlink", b"2": "symlink",
          b"3": "character", b"4": "block", b"5": "directory", b"6": "fifo"}
_NO_DATA = ("hardlink", "symlink", "character", "block", "directory", "fifo")  # size field ignored


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True)
class TarMember:
    """One member of an archive, its extension headers applied."""

    name: str
    kind: str  # "file", "directory", "symlink", "hardlink", "character", "block", "fifo", "other"
    size: int  # the file's logical size (for a sparse member: its real size)
    stored_size: int  # bytes of member data stored after the header(s) (a 1.0 sparse map excluded)
    sparse_map: tuple[tuple[int, int], ...] | None  # (offset, length) data segments in order
    linkname: str
    mode: int
    mtime: int
    header_format: str  # "gnu" (old-GNU sparse included), "ustar", "pax", "v7"


# -- reading ---------------------------------------------------------------------------------------


def read_member(stream: Readable) -> TarMember | None:
    """The next member's header(s) from a forward-only ``stream``, which is left at the first byte
    of the member's data; None at the end of the archive (a zero block, or the end of the stream)."""
    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] = {}
    pax_pairs: list[int] = []  # sparse 0.0: GNU.sparse.offset / numbytes values in order
    for _ in range(MAX_EXTENSION_HEADERS + 1):
        block = stream.read(BLOCK)
        if len(block) < BLOCK and block:
            block += _read_exact(stream, BLOCK - len(block), "a header")
        if not block or block == END_OF_ARCHIVE[:BLOCK]:
            if long_name is not None or long_link is not None or pax:
                raise ArchiveError("the archive ends after an extension header, before its member")
            return None
        _check_checksum(block)
        typeflag = block[156:157]
        size = _number(block[124:136], "size")
        if typeflag in (b"L", b"K", b"x", b"g"):
            if size > MAX_METADATA:
                raise ArchiveError(f"an extension header ({typeflag.decode()}) of {size} bytes "
                                   f"(at most {MAX_METADATA})")
            data = _read_exact(stream, size + len(padding(size)), "an extension header")[:size]
            if typeflag == b"L":
                long_name = _text(data.split(b"\0", 1)[0])
            elif typeflag == b"K":
                long_link = _text(data.split(b"\0", 1)[0])
            elif typeflag == b"x":
                for key, value in _pax_records(data):
                    if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                        if len(pax_pairs) >= 2 * MAX_SPARSE_ENTRIES:
                            raise ArchiveError(f"a sparse map of more than {MAX_SPARSE_ENTRIES} entries")
                        pax_pairs.append(_decimal(value, key))
                    else:
                        pax[key] = value
            else:
                _pax_records(data)  # global headers are checked, not applied
            continue
        return _member(stream, block, typeflag, size, long_name, long_link, pax, pax_pairs)
    raise ArchiveError(f"more than {MAX_EXTENSION_HEADERS} extension headers before one member")


def skip_data(stream: Readable, member: TarMember) -> None:
    """Read and drop the member's stored data and its padding."""
    remaining = member.stored_size + len(padding(member.stored_size))
    while remaining:
        step = min(remaining, 1 << 20)
        _read_exact(stream, step, f"the data of {member.name}")
        remaining -= step


def iter_data(stream: Readable, member: TarMember, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """The member's stored data as (offset in the file, bytes) pieces of at most ``chunk`` bytes, in
    order, holes left out; its padding is read too."""
    segments = member.sparse_map if member.sparse_map is not None else ((0, member.stored_size),)
    for offset, length in segments:
        end = offset + length
        while offset < end:
            step = min(chunk, end - offset)
            yield offset, _read_exact(stream, step, f"the data of {member.name}")
            offset += step
    _read_exact(stream, len(padding(member.stored_size)), f"the data of {member.name}")


def padding(size: int) -> bytes:
    """The zeros that follow ``size`` bytes of data up to the next block boundary."""
    return bytes(-size % BLOCK)


def _member(stream: Readable, block: bytes, typeflag: bytes, size: int, long_name: str | None,
            long_link: str | None, pax: dict[str, str], pax_pairs: list[int]) -> TarMember:
    magic = block[257:265]
    if magic == _GNU_MAGIC:
        header_format = "gnu"
    elif magic[:6] == b"ustar\0":
        header_format = "ustar"
    else:
        header_format = "v7"
    name = _text(block[:100].split(b"\0", 1)[0])
    if header_format == "ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = _text(prefix) + "/" + name
    name = pax.get("path", long_name or name)
    linkname = pax.get("linkpath", long_link or _text(block[157:257].split(b"\0", 1)[0]))
    if pax or pax_pairs:
        header_format = "pax"
    if "size" in pax:
        size = _decimal(pax["size"], "size")
    mtime = _number(block[136:148], "mtime")
    if "mtime" in pax:
        mtime = _pax_time(pax["mtime"])
    kind = _KINDS.get(typeflag, "other")
    stored_size = 0 if kind in _NO_DATA else size
    sparse_map: list[tuple[int, int]] | None = None
    if typeflag == b"S":
        sparse_map = _old_gnu_map(stream, block)
        size = _number(block[483:495], "realsize")
    elif kind == "file" and (pax_pairs or any(key.startswith("GNU.sparse.") for key in pax)):
        name = pax.get("GNU.sparse.name", name)
        if pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
            sparse_map, map_bytes = _pax_1_map(stream)
            if map_bytes > stored_size:
                raise ArchiveError(f"{name}: the sparse map is longer than the member's data")
            stored_size -= map_bytes
            size = _decimal(pax.get("GNU.sparse.realsize", ""), "GNU.sparse.realsize")
        elif "GNU.sparse.major" in pax or "GNU.sparse.minor" in pax:
            raise ArchiveError(f"{name}: unknown pax sparse format "
                               f"{pax.get('GNU.sparse.major')}.{pax.get('GNU.sparse.minor')}")
        else:
            size = _decimal(pax.get("GNU.sparse.size", pax.get("GNU.sparse.realsize", "")), "GNU.sparse.size")
            if "GNU.sparse.map" in pax:  # 0.1
                text = pax["GNU.sparse.map"]
                numbers = [_decimal(n, "GNU.sparse.map") for n in text.split(",")] if text else []
            else:  # 0.0
                numbers = pax_pairs
            if "GNU.sparse.numblocks" in pax and _decimal(pax["GNU.sparse.numblocks"], "numblocks") * 2 != len(numbers):
                raise ArchiveError(f"{name}: GNU.sparse.numblocks does not match the sparse map")
            sparse_map = _pairs(numbers, name)
    if sparse_map is not None:
        _check_map(sparse_map, size, stored_size, name)
        sparse_map = [segment for segment in sparse_map if segment[1]]  # (realsize, 0) ends GNU maps
    if size >= MAX_SIZE:
        raise ArchiveError(f"{name}: a member of {size} bytes")
    return TarMember(
        name=name, kind=kind, size=size, stored_size=stored_size,
        sparse_map=None if sparse_map is None else tuple(sparse_map), linkname=linkname,
        mode=_number(block[100:108], "mode") & 0o7777, mtime=mtime, header_format=header_format,
    )


def _read_exact(stream: Readable, size: int, what: str) -> bytes:
    """``size`` bytes of the stream; its end before them means a truncated archive."""
    parts = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise ArchiveError(f"the archive is truncated: it ends inside {what}")
        parts.append(chunk)
        remaining -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def is_header(block: bytes) -> bool:
    """Whether a 512-byte block carries a valid tar header checksum (its fields may still be bad)."""
    if len(block) != BLOCK:
        return False
    try:
        _check_checksum(block)
    except ArchiveError:
        return False
    return True


def _check_checksum(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    signed = unsigned - 2 * sum(1 for b in block[:148] + block[156:] if b >= 128) * 128
    if stored not in (unsigned, signed):
        raise ArchiveError(f"bad tar header checksum (stored {stored}, computed {unsigned}): not a tar header")


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or base-256 (high bit of the first byte set)."""
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:  # 0xff starts a negative number: never valid here
            raise ArchiveError(f"{what} field of a tar header is negative or malformed: {field!r}")
        value = int.from_bytes(field[1:], "big")
    else:
        text = field.split(b"\0", 1)[0].strip(b" ")
        if not text:
            return 0
        if not all(48 <= c <= 55 for c in text):
            raise ArchiveError(f"{what} field of a tar header is not an octal number: {field!r}")
        value = int(text, 8)
    if value >= MAX_SIZE:
        raise ArchiveError(f"{what} field of a tar header is out of range ({value})")
    return value


def _decimal(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) >= MAX_SIZE:
        raise ArchiveError(f"{what} is not a valid size in a pax header: {text[:40]!r}")
    return int(text)


def _pax_time(text: str) -> int:
    whole, _, fraction = text.partition(".")
    digits = whole.removeprefix("-")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19) or \
            (fraction and not (fraction.isascii() and fraction.isdigit())):
        raise ArchiveError(f"mtime is not a time in a pax header: {text[:40]!r}")
    return int(whole)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _pax_records(data: bytes) -> list[tuple[str, str]]:
    """The ``"LEN key=value\\n"`` records of a pax header, in order."""
    records = []
    data = data.rstrip(b"\0")
    position = 0
    while position < len(data):
        space = data.find(b" ", position, position + 20)
        digits = data[position:space] if space > position else b""
        if not digits.isdigit():
            raise ArchiveError("malformed pax header: a record does not start with its length")
        end = position + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1 : end] != b"\n":
            raise ArchiveError("malformed pax header: a record's length does not match its text")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise ArchiveError("malformed pax header: a record without key=value")
        records.append((_text(key), _text(value)))
        position = end
    return records


def _pairs(numbers: list[int], name: str) -> list[tuple[int, int]]:
    if len(numbers) % 2:
        raise ArchiveError(f"{name}: the sparse map has an odd count of numbers")
    if len(numbers) > 2 * MAX_SPARSE_ENTRIES:
        raise ArchiveError(f"{name}: a sparse map of more than {MAX_SPARSE_ENTRIES} entries")
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _old_gnu_map(stream: Readable, block: bytes) -> list[tuple[int, int]]:
    """The old-GNU sparse map: the header's four entries, then 21 per extension block."""
    segments = _entries(block[386 : 386 + _HEADER_ENTRIES * _ENTRY])
    extended = block[482]
    while extended:
        if len(segments) > MAX_SPARSE_ENTRIES:
            raise ArchiveError(f"a sparse map of more than {MAX_SPARSE_ENTRIES} entries")
        extension = _read_exact(stream, BLOCK, "a sparse extension block")
        segments += _entries(extension[: _EXTENSION_ENTRIES * _ENTRY])
        extended = extension[504]
    return segments


def _entries(area: bytes) -> list[tuple[int, int]]:
    """Sparse entries up to the first empty one (an empty numbytes field ends the map)."""
    segments = []
    for start in range(0, len(area), _ENTRY):
        entry = area[start : start + _ENTRY]
        if entry[12] == 0:
            break
        segments.append((_number(entry[:12], "sparse offset"), _number(entry[12:], "sparse numbytes")))
    return segments


def _pax_1_map(stream: Readable) -> tuple[list[tuple[int, int]], int]:
    """A pax 1.0 map from the start of the data, and the bytes it takes (whole blocks)."""
    text = b""
    blocks = 0
    numbers: list[int] = []
    count: int | None = None
    while count is None or len(numbers) < 2 * count:
        if blocks * BLOCK > 48 * MAX_SPARSE_ENTRIES:
            raise ArchiveError("the pax sparse map is too long")
        text += _read_exact(stream, BLOCK, "a pax sparse map")
        blocks += 1
        *lines, text = text.split(b"\n")
        for line in lines:
            if not line.isdigit() or len(line) > 19:
                raise ArchiveError(f"malformed pax sparse map line {line[:40]!r}")
            if count is None:
                count = int(line)
                if count > MAX_SPARSE_ENTRIES:
                    raise ArchiveError(f"a sparse map of {count} entries (at most {MAX_SPARSE_ENTRIES})")
            else:
                numbers.append(int(line))
    if len(numbers) != 2 * count or text.strip(b"\0"):
        raise ArchiveError("malformed pax sparse map: extra numbers after its last entry")
    return list(zip(numbers[::2], numbers[1::2], strict=True)), blocks * BLOCK


def _check_map(segments: list[tuple[int, int]], size: int, stored_size: int, name: str) -> None:
    end = 0
    for offset, length in segments:
        if offset < end:
            raise ArchiveError(f"{name}: sparse map entries out of order or overlapping at offset {offset}")
        end = offset + length
        if end > size:
            raise ArchiveError(f"{name}: a sparse map entry ends at {end}, past the file's {size} bytes")
    if sum(length for _, length in segments) != stored_size:
        raise ArchiveError(f"{name}: the sparse map accounts for {sum(length for _, length in segments)} "
                           f"bytes but {stored_size} are stored")


# -- writing ---------------------------------------------------------------------------------------


def pack_member(name: str, size: int, sparse_map: tuple[tuple[int, int], ...] | list[tuple[int, int]] | None = None,
                *, mode: int = 0o644, mtime: int = 0) -> bytes:
    """The header block(s) of a regular file member in GNU format: a GNU long name header first
    when the name takes more than 100 bytes; with ``sparse_map`` an old-GNU sparse member whose
    stored data is the map's segments, concatenated (the map's extension blocks follow the header)."""
    encoded = name.encode("utf-8")
    out = bytearray()
    if len(encoded) > 100:
        long_name = encoded + b"\0"
        out += _header(b"././@LongLink", b"L", len(long_name), 0o644, 0) + long_name + padding(len(long_name))
    if sparse_map is None:
        return bytes(out + _header(encoded[:100], b"0", size, mode, mtime))
    _check_own_map(sparse_map, size)
    entries = list(sparse_map)
    if not entries or entries[-1][0] + entries[-1][1] < size:
        entries.append((size, 0))  # the file ends in a hole: GNU tar sets its size from this entry
    stored = sum(length for _, length in entries)
    header = bytearray(_header(encoded[:100], b"S", stored, mode, mtime, checksum=False))
    header[386 : 386 + _HEADER_ENTRIES * _ENTRY] = _pack_entries(entries[:_HEADER_ENTRIES], _HEADER_ENTRIES)
    header[482] = len(entries) > _HEADER_ENTRIES
    header[483:495] = _number_field(size, 12)
    out += _with_checksum(header)
    rest = entries[_HEADER_ENTRIES:]
    for start in range(0, len(rest), _EXTENSION_ENTRIES):
        extension = bytearray(BLOCK)
        extension[: _EXTENSION_ENTRIES * _ENTRY] = _pack_entries(rest[start : start + _EXTENSION_ENTRIES],
                                                                 _EXTENSION_ENTRIES)
        extension[504] = start + _EXTENSION_ENTRIES < len(rest)
        out += extension
    return bytes(out)


def _check_own_map(sparse_map: tuple[tuple[int, int], ...] | list[tuple[int, int]], size: int) -> None:
    end = 0
    for offset, length in sparse_map:
        if offset < end or length <= 0 or offset + length > size:
            raise ValueError(f"sparse map entry ({offset}, {length}) out of order, empty or past {size}")
        end = offset + length


def _header(name: bytes, typeflag: bytes, size: int, mode: int, mtime: int, checksum: bool = True) -> bytes:
    header = bytearray(BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"%07o\0" % mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = _number_field(size, 12)
    header[136:148] = _number_field(mtime, 12)
    header[156:157] = typeflag
    header[257:265] = _GNU_MAGIC
    header[265:269] = b"root"  # uname
    header[297:301] = b"root"  # gname
    return _with_checksum(header) if checksum else bytes(header)


def _with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _number_field(value: int, width: int) -> bytes:
    """Octal text with a NUL when it fits, else GNU base-256."""
    if value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value >= 1 << (8 * (width - 1)):
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def _pack_entries(entries: list[tuple[int, int]], slots: int) -> bytes:
    packed = b"".join(_number_field(offset, 12) + _number_field(length, 12) for offset, length in entries)
    return packed + bytes((slots - len(entries)) * _ENTRY)
