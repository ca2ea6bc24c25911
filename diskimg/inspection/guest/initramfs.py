"""What an initramfs holds: the names in its cpio archives, read as the kernel unpacks them.

An initramfs image is a sequence of parts (init/initramfs.c ``unpack_to_rootfs``): cpio archives in
the "newc" format (magic ``070701``, or ``070702`` with checksums), each ending with an entry named
``TRAILER!!!``, NUL padding between them, and compressed streams whose output is again such cpio
archives. dracut and initramfs-tools put an uncompressed early-microcode archive first, then the
compressed main archive.

A newc header is 110 ASCII bytes: the magic, then 13 fields of 8 hex digits (ino, mode, uid, gid,
nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check); the name (with
its NUL) follows, padded so header + name is a multiple of 4, then the data, padded to 4.

Only names are kept: the image is read from a file in chunks, file data is decompressed and skipped,
and NUL padding is skipped a chunk at a time with C string operations, so memory holds the entry list
and a few chunks whatever the image's size; decompressed bytes and entries are capped.

Compressions (the kernel's ``decompress_method`` magics): gzip, bzip2, xz, lzma (the "alone"
format), zstd, and lz4 in its *legacy* frame (magic 0x184C2102: 4-byte little-endian block sizes,
each block an LZ4 block of at most 8 MiB output). LZO is recognised but not decoded.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...errors import CorruptImage
from ...units import READ_CHUNK

#: decompressed bytes walked at most (a bomb stops here; real initramfs images are far smaller)
MAX_DECOMPRESSED = 2 << 30
#: cpio entries listed at most
MAX_ENTRIES = 200_000
#: longest entry name accepted
MAX_NAME = 4096
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20
_HEADER = 110
_TRAILER = "TRAILER!!!"

#: a kernel module file, possibly compressed
MODULE_SUFFIX = re.compile(r"\.ko(\.(xz|zst|gz))?$")


class InitramfsError(CorruptImage):
    """An initramfs part could not be decoded."""


@dataclass
class Part:
    offset: int
    compression: str | None  # None: an uncompressed cpio
    entries: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "compression": self.compression or "none", "entries": self.entries}


@dataclass
class InitramfsListing:
    """The names found in every part, and what stopped the walk early (if anything)."""

    names: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    #: why some of the image could not be read (an unsupported compression, damage, a cap reached)
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def modules(self) -> dict[str, str]:
        """Kernel modules carried: module name ('-' read as '_') -> path in the archive."""
        found: dict[str, str] = {}
        for name in self.names:
            if MODULE_SUFFIX.search(name) and "/modules/" in f"/{name}":
                found.setdefault(module_name(name), name)
        return found

    @property
    def firmware(self) -> list[str]:
        return [name for name in self.names if name.startswith(("lib/firmware/", "usr/lib/firmware/"))
                and not name.endswith("/")]


def module_name(path: str) -> str:
    """``.../virtio-blk.ko.xz`` -> ``virtio_blk``."""
    return MODULE_SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


# -- the image ---------------------------------------------------------------------------------------------


class SeekableFile(Protocol):
    """What the lister needs of a file: an open binary file, a guest file."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes | None: ...


class _Image:
    """Positional reads of the initramfs file (any seekable binary file)."""

    def __init__(self, file: SeekableFile) -> None:
        self.file = file
        self.size = file.seek(0, io.SEEK_END)

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
        self.file.seek(offset)
        pieces = []
        while length > 0 and (piece := self.file.read(length)):
            pieces.append(piece)
            length -= len(piece)
        return b"".join(pieces)

    def chunks(self, offset: int) -> Iterator[bytes]:
        while offset < self.size and (piece := self.read_at(offset, READ_CHUNK)):
            yield piece
            offset += len(piece)

    def after_zeros(self, offset: int) -> int:
        """The offset of the first non-NUL byte at or after ``offset`` (the size if there is none)."""
        for piece in self.chunks(offset):
            data = piece.lstrip(b"\0")
            offset += len(piece) - len(data)
            if data:
                return offset
        return self.size


class _Window(io.RawIOBase):
    """``length`` bytes of the image from ``start``, as a file (the input of a zstd frame reader)."""

    def __init__(self, image: _Image, start: int, length: int) -> None:
        super().__init__()
        self.image, self.position, self.end = image, start, start + length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.image.read_at(self.position, min(len(buffer), self.end - self.position))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


# -- cpio ------------------------------------------------------------------------------------------------


class _Stream:
    """Sequential reads of bytes produced by ``source`` (chunks), with skipping, counting the total."""

    def __init__(self, source: Iterator[bytes]) -> None:
        self.source = source
        self.buffer = bytearray()
        self.position = 0  # bytes consumed so far

    def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            chunk = next(self.source, None)
            if chunk is None:
                return False
            self.buffer += chunk
        return True

    def read(self, size: int) -> bytes:
        if not self._fill(size):
            raise InitramfsError(f"cpio data ends inside an entry (after {self.position + len(self.buffer)} bytes)",
                                 structure="initramfs")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.position += size
        return data

    def skip(self, size: int) -> None:
        while size > 0:
            if not self.buffer and not self._fill(1):
                raise InitramfsError("cpio data ends inside a file", structure="initramfs")
            step = min(size, len(self.buffer))
            del self.buffer[:step]
            self.position += step
            size -= step

    def skip_zeros(self) -> bool:
        """Skip NUL padding; False at the end of the stream."""
        while True:
            if not self.buffer and not self._fill(1):
                return False
            stripped = self.buffer.lstrip(b"\0")
            self.position += len(self.buffer) - len(stripped)
            self.buffer = bytearray(stripped)
            if self.buffer:
                return True


def parse_newc_header(header: bytes) -> tuple[int, int, int]:
    """(mode, filesize, namesize) of a newc/crc header; raises InitramfsError if it is not one."""
    if len(header) != _HEADER or header[:6] not in (b"070701", b"070702"):
        raise InitramfsError(f"not a cpio newc header: {header[:6]!r}", structure="initramfs")
    try:
        fields = [int(header[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    except ValueError:
        raise InitramfsError("cpio header with a non-hex field", structure="initramfs") from None
    return fields[1], fields[6], fields[11]


def _list_cpio(stream: _Stream, names: list[str]) -> int:
    """Entries of one archive (up to its trailer) appended to ``names``; returns how many."""
    count = 0
    while True:
        mode, size, namesize = parse_newc_header(stream.read(_HEADER))
        if not 1 <= namesize <= MAX_NAME:
            raise InitramfsError(f"cpio entry name of {namesize} bytes", structure="initramfs")
        raw = stream.read(namesize)
        stream.skip((-(_HEADER + namesize)) % 4)
        name = raw.rstrip(b"\0").decode("utf-8", errors="replace")
        if name == _TRAILER:
            return count
        stream.skip(size + (-size) % 4)
        if len(names) >= MAX_ENTRIES:
            raise InitramfsError(f"more than {MAX_ENTRIES} entries", structure="initramfs")
        name = name[2:] if name.startswith("./") else name.lstrip("/")
        if name in ("", "."):
            continue
        names.append(name + "/" if mode & 0o170000 == 0o040000 else name)
        count += 1


# -- decompression ------------------------------------------------------------------------------------------


def compression_of(head: bytes) -> str | None:
    """The compression a part starts with (the kernel's table of magics), None if none is known."""
    if head[:2] in (b"\x1f\x8b", b"\x1f\x9e"):
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:3] == b"\x5d\x00\x00":
        return "lzma"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head[:4] == struct.pack("<I", _LZ4_LEGACY_MAGIC):
        return "lz4"
    if head[:4] == b"\x04\x22\x4d\x18":
        return "lz4-frame"
    if head[:4] == b"\x89LZO":
        return "lzo"
    return None


class _Budget:
    """Counts decompressed bytes against MAX_DECOMPRESSED."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, data: bytes) -> bytes:
        self.left -= len(data)
        if self.left < 0:
            raise InitramfsError(f"more than {MAX_DECOMPRESSED} bytes once decompressed", structure="initramfs")
        return data


def _stdlib_stream(decoder: Any, data: _Image, start: int, budget: _Budget, end: list[int]) -> Iterator[bytes]:
    """Output of a zlib/bz2/lzma decompressor, ``READ_CHUNK`` at a time; ``end[0]`` = where its input ended."""
    position = start
    pending = b""
    while True:
        if getattr(decoder, "eof", False):
            break
        if hasattr(decoder, "unconsumed_tail"):  # zlib
            if not pending:
                pending = data.read_at(position, READ_CHUNK)
                if not pending:
                    break
                position += len(pending)
            out = decoder.decompress(pending, READ_CHUNK)
            pending = decoder.unconsumed_tail
        else:  # bz2 / lzma
            if decoder.needs_input:
                chunk = data.read_at(position, READ_CHUNK)
                if not chunk:
                    break
                position += len(chunk)
            else:
                chunk = b""
            out = decoder.decompress(chunk, READ_CHUNK)
        if out:
            yield budget.take(out)
        elif hasattr(decoder, "unconsumed_tail") and not pending and position >= data.size:
            break
    if not getattr(decoder, "eof", True):
        raise InitramfsError("compressed stream ends early", structure="initramfs")
    end[0] = position - len(decoder.unused_data) - len(pending)


def zstd_frame_length(data: _Image, start: int) -> int:
    """Bytes of the zstd frame (or skippable frame) at ``start``, from its frame and block headers."""
    head = data.read_at(start, 8)
    if len(head) < 8:
        raise InitramfsError("truncated zstd frame", structure="initramfs")
    magic = struct.unpack_from("<I", head)[0]
    if magic & 0xFFFFFFF0 == 0x184D2A50:
        skippable: int = struct.unpack_from("<I", head, 4)[0]
        return 8 + skippable
    descriptor = head[4]
    single = descriptor >> 5 & 1
    fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
    position = start + 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
    while True:
        block = data.read_at(position, 3)
        if len(block) < 3:
            raise InitramfsError("truncated zstd frame", structure="initramfs")
        header = int.from_bytes(block, "little")
        kind, size = header >> 1 & 3, header >> 3
        if kind == 3:
            raise InitramfsError("reserved zstd block type", structure="initramfs")
        position += 3 + (1 if kind == 1 else size)
        if header & 1:
            break
    return position + (4 if descriptor & 4 else 0) - start


def _zstd_stream(data: _Image, start: int, budget: _Budget, end: list[int]) -> Iterator[bytes]:
    import zstandard

    position = start
    # consecutive frames form one stream (zstd -T writes several)
    while (magic := data.read_at(position, 4)) == b"\x28\xb5\x2f\xfd" or magic[1:] == b"\x2a\x4d\x18":
        length = zstd_frame_length(data, position)
        if position + length > data.size:
            raise InitramfsError("truncated zstd frame", structure="initramfs")
        frame = _Window(data, position, length)
        position += length
        try:
            # zstandard takes any object with read(size); its stub names only IO[bytes]
            reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False)  # type: ignore[arg-type]
            while True:
                out = reader.read(READ_CHUNK)
                if not out:
                    break
                yield budget.take(out)
        except zstandard.ZstdError as exc:
            raise InitramfsError(f"zstd: {exc}", structure="initramfs") from None
    end[0] = position


def _lz4_legacy_stream(data: _Image, start: int, budget: _Budget, end: list[int]) -> Iterator[bytes]:
    import lz4.block

    position = start + 4
    bound = _LZ4_LEGACY_BLOCK + _LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound
    while len(word := data.read_at(position, 4)) == 4:
        size = struct.unpack_from("<I", word)[0]
        if size == _LZ4_LEGACY_MAGIC:  # another legacy stream concatenated
            position += 4
            continue
        if size == 0 or size > bound or position + 4 + size > data.size:
            break  # the end of the stream (what follows is another part, or padding)
        block = data.read_at(position + 4, size)
        try:
            out = lz4.block.decompress(block, uncompressed_size=_LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise InitramfsError(f"lz4 block at {position}: {exc}", structure="initramfs") from None
        position += 4 + size
        yield budget.take(out)
    end[0] = position


_DECODERS: dict[str, Callable[[], Any]] = {
    "gzip": lambda: zlib.decompressobj(47),  # 32 + 15: gzip or zlib header
    "bzip2": bz2.BZ2Decompressor,
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
    "lzma": lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE),
}


def _decompressed(kind: str, data: _Image, start: int, budget: _Budget, end: list[int]) -> Iterator[bytes]:
    if kind in _DECODERS:
        try:
            yield from _stdlib_stream(_DECODERS[kind](), data, start, budget, end)
        except (zlib.error, OSError, lzma.LZMAError, EOFError) as exc:
            raise InitramfsError(f"{kind}: {exc}", structure="initramfs") from None
    elif kind == "zstd":
        yield from _zstd_stream(data, start, budget, end)
    elif kind == "lz4":
        yield from _lz4_legacy_stream(data, start, budget, end)
    else:
        raise InitramfsError(f"{kind} compression is not decoded by diskimg", structure="initramfs")


def list_initramfs(image: bytes | SeekableFile, max_decompressed: int = MAX_DECOMPRESSED) -> InitramfsListing:
    """Every name in an initramfs image (its bytes, or a seekable binary file read in chunks). Never
    raises: a part that cannot be read ends the walk and is named in ``problem``, keeping what was
    listed before it."""
    listing = InitramfsListing()
    data = _Image(io.BytesIO(image) if isinstance(image, bytes) else image)
    budget = _Budget(max_decompressed)
    position = 0
    try:
        while True:
            position = data.after_zeros(position)
            if position >= data.size:
                break
            head = data.read_at(position, 8)
            if head[:5] == b"07070":
                stream = _Stream(data.chunks(position))
                part = Part(position, None)
                listing.parts.append(part)
                part.entries = _list_cpio(stream, listing.names)
                position += stream.position
                continue
            kind = compression_of(head)
            if kind is None:
                listing.problem = f"unrecognised data at offset {position} of the initramfs"
                break
            part = Part(position, kind)
            listing.parts.append(part)
            end = [data.size]
            stream = _Stream(_decompressed(kind, data, position, budget, end))
            # one compressed stream may hold several archives, separated by NUL padding
            while stream.skip_zeros():
                part.entries += _list_cpio(stream, listing.names)
            if end[0] <= position:
                raise InitramfsError("compressed stream without progress", structure="initramfs")
            position = end[0]
    except InitramfsError as exc:
        where = listing.parts[-1] if listing.parts else None
        prefix = f"{where.compression or 'cpio'} part at offset {where.offset}: " if where else ""
        listing.problem = prefix + exc.message
    return listing
