"""Disks read through a wrapper: a compressed RAW disk (``.raw.xz``, ``.gz``, ``.zst``, ``.bz2``) and a
tar archive holding one disk (``.tar``, ``.tar.gz``, ``.tar.zst``, ``.tar.xz``, ECS's
``*_system.raw.tar.gz``), opened as DiskReaders so that ``info``, ``convert``, ``validate`` and
``unpack`` take them without unpacking first.

A compressed stream can only be read forward. Decisions:

- **Reads in increasing order cost one decompression pass in all.** The stream is decompressed in
  1 MiB chunks; the last ``CACHE_CHUNKS`` chunks are kept (an LRU), so parsers that re-read a
  boot sector or hop within a few MiB cost nothing more. A read *behind* the cached chunks
  restarts decompression from the start of the file (``passes`` counts the passes made).
  Readers that are read this way say so with ``forward_only``: the converter then reads them
  from one thread, in order.
- **The virtual size** (the inner RAW disk's size, rounded up to whole 512-byte sectors as for a
  RAW file) comes from metadata where the format has it: a tar member's header; xz's index (each
  stream's index records every block's uncompressed size); zstd frame headers, when every frame
  carries its content size (``zstd`` does for files; the frames are walked to the end, which also
  catches a truncated file). gzip's ISIZE is the size modulo 2^32 and per member, so it is not
  trusted: a gzip or bzip2 stream (or zstd frames without content sizes) is decompressed once at
  open to count its bytes — one extra decompression pass, said in ``info()``.
- **The allocation map** of a tar member comes from its sparse map (GNU old, pax 0.0/0.1/1.0):
  holes are ZERO extents, known before any data is read. A bare compressed disk has no map: it is
  one DATA extent (zero ranges are still skipped by the converter's zero detection).
- **What the wrapper holds** is identified from its head and its tail (the last ``INNER_TAIL``
  bytes) by the probes a bare file goes through, so a format known by its end is never read as
  RAW: a fixed VHD (data, then a footer) is read as a VHD, its virtual size and checks from the
  VHD driver's own footer code (over ``_EdgesFile``), the footer never as data; a trailer format
  diskimg does not read (DMG) is refused with its advice. The tail costs no extra pass where
  possible: a counted gzip/bzip2 stream keeps it in the counting pass; an xz or zstd file decodes
  its last block or frame alone; an uncompressed tar is read in place. Where seeing it would cost
  a pass of its own (an xz or zstd file of one block or frame, a compressed tar's member), the
  tail is seen when the disk is read: the reader checks it then (``guard_tail``), before any of
  those last bytes is returned, and refuses the disk (``EndShowsAnotherFormat``) if it shows
  another format; ``see_tail`` (``info``) reads it at open instead.
- A qcow2, dynamic or differencing VHD inside a compressed stream needs random access to its
  tables: refused, with the command that decompresses it first (before any pass, from its head).
  Inside an *uncompressed* tar the member is a plain byte range of the archive, read with the
  normal format drivers at its offset (any format, random access).
- Archives are untrusted: a member named with ``..`` or an absolute path, a link, a device, more
  than one disk, a size beyond ``MAX_MEMBER_SIZE``, a truncated or corrupt stream: ArchiveError.
  Members up to the disk are checked when it is opened; what follows it (a second disk, a damaged
  end of the stream) only by ``finish_archive``, which ``unpack`` calls after reading the disk
  (``info`` and ``convert`` read the first disk and stop there).
"""

from __future__ import annotations

import bisect
import bz2
import collections
import dataclasses
import functools
import lzma
import shlex
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

from ..errors import ArchiveError, UnsupportedFormat
from ..formats import READERS
from ..formats.probing import Detection, OpenOptions
from ..formats.reader import DiskReader, Extent, ExtentKind, ImageInfo, Run, RunKind
from ..host.files import HostFile
from ..units import READ_CHUNK, SECTOR_SIZE
from .compressed import (
    COMPRESSORS,
    CORRUPT_DATA,
    INNER_HEAD,
    INNER_TAIL,
    Identify,
    PeekedMember,
    article,
    unwrap_command,
    unwrapped_name,
    wrapper_hint,
)
from .tar import Readable, TarMember, padding, read_member, skip_data

if TYPE_CHECKING:
    import zstandard

#: decompression works in pieces of READ_CHUNK bytes (compressed input is read so too); the cache holds
#: the last few
CACHE_CHUNKS = 8
#: no member or disk larger than this is taken (a header claiming more is hostile or broken)
MAX_MEMBER_SIZE = 64 << 40
#: formats a wrapper may hold for sources to read it
WRAPPED_FORMATS = ("raw",)
_XZ_MEMLIMIT = 1 << 30  # xz -9 needs 674 MiB; a header asking for more is refused
_ZSTD_MAX_WINDOW = 1 << 31  # zstd --long=31 is the largest window the CLI makes


# --- forward-only decompression ---------------------------------------------------------------------


class _Decoder(Protocol):
    """What the standard library's decompressors (zlib, lzma, bz2) have in common; zlib's also has
    ``unconsumed_tail``, lzma's and bz2's ``needs_input``."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int, /) -> bytes: ...


class ForwardStream:
    """The decompressed bytes of a file (or the file itself, ``kind=None``), read forward.

    ``rewind()`` starts over from the beginning of the file: that is how a backwards read is
    served. ``digest``, when given, sees every byte of the file exactly once per pass (in order),
    so an archive's SHA-256 is computed by the same pass that unpacks it.
    """

    def __init__(self, host: HostFile, kind: str | None, digest: Callable[[], Any] | None = None) -> None:
        if kind is not None and kind not in COMPRESSORS:
            raise UnsupportedFormat(f"no decoder for {kind}", path=host.name, format=kind)
        self.host = host
        self.kind = kind
        self._new_digest = digest
        self.passes = 0
        self.rewind()

    def rewind(self) -> None:
        self.passes += 1
        self.position = 0  # decompressed bytes consumed
        self.digest = self._new_digest() if self._new_digest is not None else None
        self._input_position = 0  # compressed bytes taken from the file
        self._pending = bytearray()  # decompressed, not yet consumed
        self._ended = False
        self._decoder: _Decoder | None = None
        self._zstd: zstandard.ZstdDecompressionReader | None = None
        if self.kind == "zstd":
            import zstandard

            decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
            # zstandard takes any object with read(size); its stub names only IO[bytes]
            self._zstd = decompressor.stream_reader(_HostReader(self), read_size=READ_CHUNK,  # type: ignore[arg-type]
                                                    read_across_frames=True, closefd=False)

    # -- the compressed input

    def _take_input(self, size: int = READ_CHUNK) -> bytes:
        data = self.host.read_at(self._input_position, size)
        self._input_position += len(data)
        if self.digest is not None and data:
            self.digest.update(data)
        return data

    def drain_input(self) -> None:
        """Read the rest of the file (bytes after the data used), so that ``digest`` covers it all."""
        while self._take_input():
            pass

    # -- decompressed output

    def read(self, size: int) -> bytes:
        """``size`` bytes, fewer only at the end of the stream."""
        while len(self._pending) < size and not self._ended:
            self._produce(max(size - len(self._pending), READ_CHUNK))
        data = bytes(self._pending[:size])
        del self._pending[:size]
        self.position += len(data)
        return data

    def skip(self, length: int) -> int:
        """Step over ``length`` bytes; returns how many there were."""
        if self.kind is None and self.digest is None and not self._pending:  # a plain file: no need to read
            skipped = max(0, min(length, self.host.size - self._input_position))
            self._input_position += skipped
            self.position += skipped
            return skipped
        skipped = 0
        while skipped < length:
            data = self.read(min(READ_CHUNK, length - skipped))
            if not data:
                break
            skipped += len(data)
        return skipped

    def skip_to_end(self, keep: int, limit: int) -> tuple[int, bytes]:
        """Step over the rest of the stream (at most ``limit`` bytes and one chunk): how many bytes
        there were and the last ``keep`` of them, so that one pass both counts and sees the tail."""
        skipped = 0
        tail = b""
        while skipped <= limit:
            data = self.read(READ_CHUNK)
            if not data:
                break
            skipped += len(data)
            tail = (tail + data[-keep:])[-keep:]
        return skipped, tail

    def _produce(self, wanted: int) -> None:
        kind = self.kind
        if kind is None:
            data = self._take_input(wanted)
        elif self._zstd is not None:
            import zstandard

            try:
                data = self._zstd.read(wanted)
            except zstandard.ZstdError as exc:  # how zstandard reports corrupt data
                raise self._corrupt(exc) from None
        else:
            data = self._decode(kind, wanted)
        if data:
            self._pending += data
        else:
            self._ended = True

    def _corrupt(self, exc: Exception) -> ArchiveError:
        return ArchiveError(f"corrupt {self.kind} stream (near compressed offset {self._input_position}): "
                            f"{str(exc)[:200] or type(exc).__name__}", path=self.host.name)

    def _decode(self, kind: str, wanted: int) -> bytes:
        """Up to ``wanted`` bytes from a zlib/lzma/bz2 decoder, across concatenated members."""
        while True:
            if self._decoder is None:
                self._decoder, leftover = _start_member(kind, self._take_input, b"")
                if self._decoder is None:
                    return b""
                data = leftover
            elif self._decoder.eof:
                leftover = self._decoder.unused_data
                self._decoder, data = _start_member(kind, self._take_input, leftover)
                if self._decoder is None:
                    return b""  # the last member ended: trailing zeros or junk are not data
            else:
                tail = getattr(self._decoder, "unconsumed_tail", b"")  # zlib: input it had no room to decode
                data = tail or (self._take_input() if getattr(self._decoder, "needs_input", True) else b"")
            try:
                produced = self._decoder.decompress(data, wanted)
            except CORRUPT_DATA as exc:  # the decoders' own reports of corrupt data (bz2's is an OSError)
                raise self._corrupt(exc) from None
            if produced:
                return produced
            if not data and not self._decoder.eof:
                raise ArchiveError(f"truncated {self.kind} stream: the file ends inside compressed data "
                                   f"(after {self.position + len(self._pending)} bytes of output)",
                                   path=self.host.name)


_MAGIC = {"gzip": b"\x1f\x8b", "xz": b"\xfd7zXZ\x00", "bzip2": b"BZh"}


def _start_member(kind: str, take: Callable[[], bytes], leftover: bytes) -> tuple[_Decoder | None, bytes]:
    """A decoder for the next member/stream (and the input to feed it), or (None, b"") at the end.

    xz allows null padding between streams; gzip and bzip2 files are concatenations of members.
    """
    magic = _MAGIC[kind]
    data = leftover
    while len(data) < len(magic):
        more = take()
        if not more:
            break
        data += more
    if kind == "xz":
        while data.startswith(b"\0"):  # stream padding
            data = data.lstrip(b"\0") or take()
            if not data:
                return None, b""
    if not data.startswith(magic):
        return None, b""
    if kind == "gzip":
        return zlib.decompressobj(31), data
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT), data
    return bz2.BZ2Decompressor(), data


class _HostReader:
    """The compressed file as a forward ``read(n)`` for zstandard's stream reader."""

    def __init__(self, stream: ForwardStream) -> None:
        self.stream = stream

    def read(self, size: int = READ_CHUNK) -> bytes:
        return self.stream._take_input(size if size and size > 0 else READ_CHUNK)


# --- sizes from metadata ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LastUnits:
    """The last independently decodable pieces of a compressed file (xz blocks of its last stream,
    zstd frames) that hold at least its last INNER_TAIL bytes: where they start, their compressed
    length and how many bytes they decompress to. Decoding them alone gives the tail of the
    stream without a pass over all of it."""

    offset: int
    length: int  # their compressed bytes, to the end of the last one
    content: int  # their decompressed bytes
    whole_file: bool  # they are all the file holds: decoding them is a full pass
    stream_flags: bytes = b""  # xz: the flags of the stream they belong to
    records: tuple[tuple[int, int], ...] = ()  # xz: (unpadded size, uncompressed size) of each block


def _last_units(units: list[tuple[int, int]], keep: int) -> list[tuple[int, int]]:
    """The shortest suffix of ``units`` ((size, content) pairs) whose contents add up to ``keep``."""
    total = 0
    for index in range(len(units) - 1, -1, -1):
        total += units[index][1]
        if total >= keep:
            return units[index:]
    return units


def xz_layout(host: HostFile) -> tuple[int, LastUnits | None]:
    """The uncompressed size of an .xz file from its streams' indexes (read backwards from the end),
    and its last blocks (None when its last stream holds none)."""
    end = host.size
    total = 0
    blocks_seen = 0
    last: LastUnits | None = None
    for _ in range(1 << 16):
        while end >= 4 and host.read_at(end - 4, 4) == b"\0\0\0\0":  # stream padding
            end -= 4
        if end == 0:
            if last is not None and blocks_seen == len(last.records):
                last = dataclasses.replace(last, whole_file=True)
            return total, last
        footer = host.read_at(end - 12, 12) if end >= 12 else b""
        if len(footer) != 12 or footer[10:12] != b"YZ":
            raise ArchiveError("truncated or corrupt xz file: no stream footer at its end", path=host.name)
        index_size = (struct.unpack_from("<I", footer, 4)[0] + 1) * 4
        index_start = end - 12 - index_size
        if index_start < 12 or index_size > 1 << 26:
            raise ArchiveError("corrupt xz stream footer (backward size out of range)", path=host.name)
        index = host.read_at(index_start, index_size)
        if zlib.crc32(index[:-4]) != struct.unpack_from("<I", index, index_size - 4)[0] or index[0] != 0:
            raise ArchiveError(f"corrupt xz index at offset {index_start}", path=host.name)
        records = _xz_index_records(index, host.name)
        blocks = sum(_padded4(unpadded) for unpadded, _ in records)
        start = index_start - blocks - 12
        if start < 0 or host.read_at(start, 6) != _MAGIC["xz"]:
            raise ArchiveError(f"corrupt xz file: the index at offset {index_start} does not match its blocks",
                               path=host.name)
        if blocks_seen == 0 and records:  # the first stream met from the end holds the file's last blocks
            chosen = _last_units(records, INNER_TAIL)
            length = sum(_padded4(unpadded) for unpadded, _ in chosen)
            last = LastUnits(index_start - length, length, sum(content for _, content in chosen), False,
                             footer[8:10], tuple(chosen))
        blocks_seen += len(records)
        total += sum(content for _, content in records)
        end = start
    raise ArchiveError("too many xz streams", path=host.name)


def _padded4(length: int) -> int:
    return -(-length // 4) * 4


def _xz_index_records(index: bytes, name: str) -> list[tuple[int, int]]:
    """(unpadded size, uncompressed size) of each block one xz index lists."""
    position = 1
    count, position = _varint(index, position, name)
    records = []
    for _ in range(count):
        unpadded, position = _varint(index, position, name)
        size, position = _varint(index, position, name)
        records.append((unpadded, size))
    return records


def _xz_blocks_alone(units: LastUnits, blocks: Iterator[bytes]) -> Iterator[bytes]:
    """An xz stream holding only ``units`` (their bytes from ``blocks``): a stream header, the
    blocks, an index of their records and a stream footer, as the xz format lays them out, so that
    the standard decoder takes the last blocks of a multi-block file alone."""
    flags = units.stream_flags
    yield _MAGIC["xz"] + flags + zlib.crc32(flags).to_bytes(4, "little")
    yield from blocks
    records = b"\0" + _encode_varint(len(units.records)) + b"".join(
        _encode_varint(unpadded) + _encode_varint(content) for unpadded, content in units.records)
    records += bytes(-len(records) % 4)
    index = records + zlib.crc32(records).to_bytes(4, "little")
    backward = (len(index) // 4 - 1).to_bytes(4, "little")
    yield index + zlib.crc32(backward + flags).to_bytes(4, "little") + backward + flags + b"YZ"


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(data: bytes, position: int, name: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 63, 7):
        if position >= len(data) - 4:
            break
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise ArchiveError("corrupt xz index (bad number)", path=name)


def zstd_layout(host: HostFile) -> tuple[int | None, LastUnits | None]:
    """The sum of the content sizes of a .zst file's frames, walking every block header to the end
    (which also proves the file is not cut short; None when a frame does not record its size), and
    its last frame (None without a size)."""
    reader = _BufferedAt(host)
    position = 0
    total: int | None = 0
    first_frame: int | None = None
    frames: collections.deque[tuple[int, int]] = collections.deque()  # the last frames holding INNER_TAIL bytes
    held = 0  # their content
    while position < host.size:
        head = reader.read_at(position, 18)
        magic = struct.unpack_from("<I", head.ljust(4, b"\0"))[0]
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
            if len(head) < 8:
                break
            position += 8 + struct.unpack_from("<I", head, 4)[0]
            continue
        if magic != 0xFD2FB528 or len(head) < 6:
            if position > 0 and not head.strip(b"\0"):
                break  # zero padding after the last frame
            raise ArchiveError(f"corrupt zstd file: no frame at offset {position}", path=host.name)
        frame_start = position
        descriptor = head[4]
        single_segment = descriptor >> 5 & 1
        size_bytes = (0, 2, 4, 8)[descriptor >> 6] or single_segment
        header = 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3]
        content: int | None = None
        if size_bytes:
            content = int.from_bytes(head[header : header + size_bytes], "little") + (256 if size_bytes == 2 else 0)
            total = None if total is None else total + content
        else:
            total = None
        position += header + size_bytes
        while True:
            block = reader.read_at(position, 3)
            if len(block) < 3:
                raise ArchiveError("truncated zstd file: it ends inside a frame", path=host.name)
            value = int.from_bytes(block, "little")
            kind, size = value >> 1 & 3, value >> 3
            if kind == 3:
                raise ArchiveError(f"corrupt zstd block header at offset {position}", path=host.name)
            position += 3 + (1 if kind == 1 else size)
            if value & 1:
                break
        position += 4 if descriptor & 4 else 0  # content checksum
        first_frame = frame_start if first_frame is None else first_frame
        if content:  # (offset, content size); an empty frame decodes to nothing
            frames.append((frame_start, content))
            held += content
            while held - frames[0][1] >= INNER_TAIL:
                held -= frames.popleft()[1]
        last_end = position
    if position > host.size:
        raise ArchiveError("truncated zstd file: it ends inside a frame", path=host.name)
    if total is None or not frames:
        return total, None
    offset = frames[0][0]
    return total, LastUnits(offset, last_end - offset, held, offset == first_frame)


def last_units_tail(host: HostFile, kind: str, units: LastUnits, keep: int) -> bytes:
    """The last ``keep`` bytes of a compressed file, decoded from its last xz blocks or zstd frames
    alone (the caller makes sure they decompress to ``keep`` bytes or more)."""
    import zstandard

    tail = b""
    try:
        for data in _decode_units(host, kind, units):
            tail = (tail + data[-keep:])[-keep:]
    except (lzma.LZMAError, zstandard.ZstdError) as exc:  # how the two decoders report corrupt data
        raise ArchiveError(f"corrupt {kind} stream (its last {_unit_noun(kind)}s, from offset "
                           f"{units.offset}): {str(exc)[:200] or type(exc).__name__}", path=host.name) from None
    return tail


def _decode_units(host: HostFile, kind: str, units: LastUnits) -> Iterator[bytes]:
    """The decompressed bytes of the last xz blocks or zstd frames, a chunk at a time."""
    if kind == "zstd":
        import zstandard

        decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        pieces = _Pieces(_file_range(host, units.offset, units.length))
        # zstandard takes any object with read(size); its stub names only IO[bytes]
        frames = decompressor.stream_reader(pieces, read_size=READ_CHUNK,  # type: ignore[arg-type]
                                           read_across_frames=True, closefd=False)
        while data := frames.read(READ_CHUNK):
            yield data
        return
    decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
    for piece in _xz_blocks_alone(units, _file_range(host, units.offset, units.length)):
        if decoder.eof:  # an index and footer forged inside the blocks ended the stream early
            raise ArchiveError(f"corrupt xz stream: its last blocks, from offset {units.offset}, end before their "
                               "recorded length", path=host.name)
        data = decoder.decompress(piece, READ_CHUNK)
        while data:
            yield data
            data = decoder.decompress(b"", READ_CHUNK) if not decoder.needs_input and not decoder.eof else b""
    if not decoder.eof:
        raise ArchiveError(f"truncated xz block after offset {units.offset}", path=host.name)


def _file_range(host: HostFile, offset: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of the file from ``offset``, a chunk at a time (short at its end)."""
    end = offset + length
    while offset < end:
        data = host.read_at(offset, min(READ_CHUNK, end - offset))
        if not data:
            return
        yield data
        offset += len(data)


class _Pieces:
    """An iterator of byte strings as the forward ``read(n)`` zstandard reads from."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.pending = b""

    def read(self, size: int = READ_CHUNK) -> bytes:
        if not self.pending:
            self.pending = next(self.pieces, b"")
        data, self.pending = self.pending[:size], self.pending[size:]
        return data


class _BufferedAt:
    """Small reads at increasing offsets served from 1 MiB windows of the file."""

    def __init__(self, host: HostFile) -> None:
        self.host = host
        self.start = 0
        self.data = b""

    def read_at(self, offset: int, length: int) -> bytes:
        if not (self.start <= offset and offset + length <= self.start + len(self.data)):
            self.start, self.data = offset, self.host.read_at(offset, max(length, READ_CHUNK))
        return self.data[offset - self.start : offset - self.start + length]


# --- the reader ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Guest bytes [start, start + length) are stream bytes from ``stored`` on."""

    start: int
    length: int
    stored: int

    @property
    def end(self) -> int:
        return self.start + self.length


class StreamDiskReader(DiskReader):
    """A RAW disk (or a fixed VHD's data area) whose bytes are segments of a stream (holes between
    them read as zeros): a bare compressed disk (one segment), or a tar member (one segment per
    sparse extent). Stream offsets count from ``base`` (where the member's data starts). A
    compressed stream is read forward through a small cache of recent chunks; an uncompressed
    archive (unless a digest of it is wanted) is read at random, each segment being a range of the
    file. Thread-safe."""

    format = "raw"

    def __init__(self, host: HostFile, stream: ForwardStream, size: int, segments: list[Segment],
                 facts: dict[str, Any], base: int = 0, first_chunk: bytes | None = None,
                 disk: ImageInfo | None = None) -> None:
        super().__init__(host, disk.virtual_size if disk else -(-size // SECTOR_SIZE) * SECTOR_SIZE)
        #: the exact byte count of what the wrapper holds (the virtual size is rounded up to sectors)
        self.content_size = size
        #: the facts of a disk format other than RAW read from the stream (a fixed VHD: its data,
        #: then its footer), or None
        self.disk = disk
        if disk is not None:
            self.format = disk.format
        #: for a member of a compressed tar, whose end is not seen at open: the check of its last
        #: INNER_TAIL bytes (raises when they show another format), run when they are read if
        #: ``guard_tail`` asked for it
        self.tail_check: Callable[[bytes], None] | None = None
        self._tail_guarded = False
        self.stream = stream
        self.segments = segments
        self._starts = [segment.start for segment in segments]
        self.facts = facts
        self.base = base
        self.forward_only = stream.kind is not None or stream.digest is not None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        if first_chunk is not None:
            self._cache[0] = first_chunk

    @property
    def decompression_passes(self) -> int | None:
        """Passes made over the archive so far (None when it is read in place, at random)."""
        return self.stream.passes if self.forward_only else None

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        position = start
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        kind, offset = (RunKind.ENCODED, 0) if self.forward_only else (RunKind.HOST, self.base)
        while position < end:
            segment = self.segments[index] if index < len(self.segments) else None
            if segment is None or segment.start >= end:
                yield Run(position, end - position, RunKind.ZERO)
                return
            if segment.end <= position:
                index += 1
                continue
            if segment.start > position:
                yield Run(position, segment.start - position, RunKind.ZERO)
                position = segment.start
            piece_end = min(end, segment.end)
            yield Run(position, piece_end - position, kind, offset + segment.stored + position - segment.start)
            position = piece_end
            index += 1

    def guard_tail(self) -> None:
        """The bytes are read as a RAW disk: refuse them, once the last of them are read, if their
        end shows another format (nothing of those last bytes is returned before that check)."""
        self._tail_guarded = self.tail_check is not None

    def _read_encoded(self, run: Run) -> bytes:
        with self._lock:
            data = self._read_stream(run.host_offset, run.length)
            if self._tail_guarded and run.start + run.length > self.content_size - INNER_TAIL:
                self._check_tail()  # before the data is returned
        if len(data) != run.length:
            raise ArchiveError(f"truncated: the stream ends {run.length - len(data)} bytes short of the disk's "
                               f"data at guest offset {run.start + len(data)}", path=self.path)
        return data

    def _check_tail(self) -> None:
        """Run ``tail_check`` over the disk's last bytes, once the run reaching into them was read:
        what of them precedes the run's end is in the chunk cache (the disk is read forward; the run
        just read, or the one before when this run starts inside them), the rest is ahead, so this
        costs no pass."""
        assert self.tail_check is not None
        start = max(0, self.content_size - INNER_TAIL)
        tail = bytearray(self.content_size - start)
        for run in self._runs(start, self.content_size):
            if run.kind is not RunKind.ZERO:
                piece = self._read_stream(run.host_offset, run.length)  # ENCODED: a compressed tar is forward only
                tail[run.start - start : run.start - start + len(piece)] = piece
        self._tail_guarded = False  # checked once: a caller may then read the bytes as they are
        self.tail_check(bytes(tail))

    def _read_stream(self, offset: int, length: int) -> bytes:
        """Stream bytes [base + offset, ... + length), from the cache or by decompressing forward;
        short only at the end of the stream."""
        parts = []
        position = offset
        end = offset + length
        while position < end:
            index = position // READ_CHUNK
            piece = self._chunk(index)[position - index * READ_CHUNK : end - index * READ_CHUNK]
            if not piece:
                break
            parts.append(piece)
            position += len(piece)
        return b"".join(parts)

    def _chunk(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        target = self.base + index * READ_CHUNK
        if target < self.stream.position:
            self.stream.rewind()
        self.stream.skip(target - self.stream.position)
        data = self.stream.read(READ_CHUNK)
        self._cache[index] = data
        if len(self._cache) > CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return data

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        for run in self._runs(start, end):
            kind = ExtentKind.ZERO if run.kind is RunKind.ZERO else ExtentKind.DATA
            yield Extent(run.start, run.length, kind)

    def info(self) -> ImageInfo:
        details = {key: value for key, value in {**self.facts, "decompression_passes": self.decompression_passes}
                   .items() if value is not None}
        facts = ImageInfo(format=self.format, virtual_size=self.virtual_size, file_size=self.host.size,
                          allocated_bytes=sum(segment.length for segment in self.segments))
        if self.disk is None:
            return dataclasses.replace(facts, details=details)
        return dataclasses.replace(self.disk, virtual_size=facts.virtual_size, file_size=facts.file_size,
                                   allocated_bytes=facts.allocated_bytes, details={**self.disk.details, **details})


# --- opening ------------------------------------------------------------------------------------------


def opens_through_wrapper(detection: Detection) -> bool:
    """Whether ``open_wrapped`` takes a file detected so: a compressed file or a tar archive (what
    it holds is checked when it is opened)."""
    return detection.format in COMPRESSORS or detection.format == "tar"


@overload
def open_wrapped(source: Any, detection: Detection, identify: Identify, digest: Callable[[], Any] | None = None,
                 *, as_bytes: Literal[True], see_tail: bool = False) -> StreamDiskReader: ...


@overload
def open_wrapped(source: Any, detection: Detection, identify: Identify, digest: Callable[[], Any] | None = None,
                 as_bytes: bool = False, see_tail: bool = False) -> DiskReader: ...


def open_wrapped(source: Any, detection: Detection, identify: Identify, digest: Callable[[], Any] | None = None,
                 as_bytes: bool = False, see_tail: bool = False) -> DiskReader:
    """A reader of the disk inside a compressed file or a tar archive (see the module docstring).

    ``identify`` names what the wrapper holds, by the same probes as a bare file (the detector's
    ``identify_inner``, given by the caller: detection lies above this layer).

    ``digest`` (e.g. ``hashlib.sha256``) makes every read sequential and hashes the archive file
    in the same pass: ``stream.digest`` after ``finish_archive``. ``as_bytes`` reads what the
    wrapper holds as plain bytes whatever its format (``facts["inner_format"]`` says which), to
    extract a qcow2 or VHD file rather than read its guest disk. ``see_tail`` reads a compressed
    tar's member, or an xz or zstd file of one block or frame, to its end at open (one
    decompression pass), so that its format is known whole there (``info``) rather than checked
    when its last bytes are read.
    """
    host = HostFile(source)
    try:
        if detection.format == "tar":
            return _open_tar(host, None, identify, digest, as_bytes)
        if detection.inner_format == "tar":
            return _open_tar(host, detection.format, identify, digest, as_bytes, see_tail)
        return _open_compressed(host, detection.format, identify, digest, as_bytes, see_tail)
    except ArchiveError as exc:
        host.close()
        exc.path = exc.path or host.name
        raise
    except BaseException:
        host.close()
        raise


def open_file_bytes(source: Any, detection: Detection, digest: Callable[[], Any] | None = None) -> StreamDiskReader:
    """The bytes of an unwrapped disk file (e.g. an export with ``--archive none``) as a reader,
    so that it is copied (not re-encoded) like a member, hashed with ``digest`` in the same pass."""
    host = HostFile(source)
    facts = {"wrapper": None, "compression": None, "member": None, "inner_format": detection.format,
             "inner_description": detection.description, "virtual_size_from": "the file size",
             "access": "sequential" if digest else "random access"}
    return StreamDiskReader(host, ForwardStream(host, None, digest), host.size,
                            [Segment(0, host.size, 0)] if host.size else [], facts)


_ACCESS = ("sequential: reads in increasing order cost one decompression pass; "
           "reading backwards restarts decompression from the start")


def _open_compressed(host: HostFile, kind: str, identify: Identify, digest: Callable[[], Any] | None,
                     as_bytes: bool, see_tail: bool) -> DiskReader:
    stream = ForwardStream(host, kind, digest)
    first = stream.read(READ_CHUNK)
    head = first[:INNER_HEAD]
    if not as_bytes:  # a format known by its head (qcow2, a dynamic VHD...) is refused before any pass
        _require_raw(_identify(identify, head, b"", None, None), host.name, kind, None)
    size, size_from, tail, tail_from = _size_and_tail(host, kind, stream, first, see_tail)
    _check_size(size, host.name)
    name = unwrapped_name(kind, host.name)[0]
    inner = _identify(identify, head, tail or b"", size if tail is not None else None, name)
    facts = {"wrapper": kind, "compression": kind, "member": None, "inner_format": inner.format,
             "inner_description": inner.description, "virtual_size_from": size_from, "tail_from": tail_from,
             "access": _ACCESS}
    segments = [Segment(0, size, 0)] if size else []
    disk = None if as_bytes else _wrapped_disk(inner, head, tail or b"", size, host.name, kind, None)
    reader = StreamDiskReader(host, stream, size, _clip(segments, disk), facts, 0, first, disk)
    if tail is None:
        _check_tail_when_read(reader, identify, head, host.name, kind, None, as_bytes)
    return reader


def _size_and_tail(host: HostFile, kind: str, stream: ForwardStream, first: bytes,
                   see_tail: bool) -> tuple[int, str, bytes | None, str]:
    """(the decompressed size, where it comes from, the last INNER_TAIL bytes, how they were seen).

    An xz or zstd file takes its size from its index or frame headers, and its tail from its last
    block or frame decoded alone; a gzip or bzip2 stream (or zstd frames without sizes) is counted
    by one pass that keeps its tail. An xz or zstd file of one block or frame would need a pass of
    its own for the tail: unless ``see_tail`` asks for it, the tail is None then (not seen at open),
    and the reader checks it when it reads it."""
    size: int | None = None
    units: LastUnits | None = None
    if kind == "xz":
        size, units = xz_layout(host)
        size_from = "the xz index"
    elif kind == "zstd":
        size, units = zstd_layout(host)
        size_from = "the zstd frame headers"
    if len(first) < READ_CHUNK:
        counted, tail, tail_from = len(first), first[-INNER_TAIL:], "the first read, which reached its end"
    elif size is not None and units is not None and not units.whole_file and units.content >= INNER_TAIL:
        tail = last_units_tail(host, kind, units, INNER_TAIL)
        return size, size_from, tail, f"its last {_unit_noun(kind)}s, decoded alone"
    elif size is not None and not see_tail:
        return size, size_from, None, f"{_UNSEEN_TAIL} (a {kind} file of one {_unit_noun(kind)})"
    else:
        rest_count, rest = stream.skip_to_end(INNER_TAIL, MAX_MEMBER_SIZE)
        counted, tail = len(first) + rest_count, (first[-INNER_TAIL:] + rest)[-INNER_TAIL:]
        tail_from = "the pass that counted the size" if size is None else "one decompression pass at open"
    if size is None:
        return counted, f"counted by decompressing the whole {kind} stream once (it does not record its size)", \
            tail, tail_from
    if counted != size:
        raise ArchiveError(f"the {kind} metadata records {size} bytes but the stream holds {counted}: "
                           "the file is corrupt", path=host.name)
    return size, size_from, tail, tail_from


_UNSEEN_TAIL = "not at open: checked when the disk's last bytes are read"


def _unit_noun(kind: str) -> str:
    return "block" if kind == "xz" else "frame"


def _open_tar(host: HostFile, kind: str | None, identify: Identify, digest: Callable[[], Any] | None,
              as_bytes: bool, see_tail: bool = False) -> DiskReader:
    stream = ForwardStream(host, kind, digest)
    member = next_disk_member(stream)
    if member is None:
        raise ArchiveError("holds no disk: the archive has no regular file")
    base = stream.position
    first = stream.read(READ_CHUNK)  # a whole chunk of the cache (past the member's data if it is small)
    segments = member_segments(member)
    head = _head(first, segments, member.size)
    tail_start = max(0, member.size - INNER_TAIL)
    tail: bytes | None = None
    if kind is None:  # the member's end is at hand in an uncompressed tar
        tail = PeekedMember(member, base).read(host.read_at, tail_start, INNER_TAIL)
        tail_from = "the archive, read in place"
    elif see_tail:
        tail = PeekedMember(member, 0).read(_ForwardAt(stream, base, first).read_at, tail_start, INNER_TAIL)
        tail_from = "one decompression pass at open, to the member's end"
    else:
        tail_from = f"{_UNSEEN_TAIL} (a compressed tar is read forward)"
    inner = _identify(identify, head, tail or b"", member.size if tail is not None else None, member.name)
    facts = {"wrapper": "tar", "compression": kind, "member": member.name,
             "tar_format": member.header_format, "sparse": member.sparse_map is not None,
             "inner_format": inner.format, "inner_description": inner.description,
             "virtual_size_from": "the tar header", "tail_from": tail_from,
             "access": _ACCESS if kind else "random access (uncompressed tar)"}
    if kind is None and digest is None:  # a plain tar is read at random: what follows the disk is checked now
        rest = ForwardStream(host, None)
        rest.skip(base + member.stored_size + len(padding(member.stored_size)))
        _refuse_another_disk(rest, member.name)
    if as_bytes:
        reader = StreamDiskReader(host, stream, member.size, segments, facts, base, first)
    elif kind is None and member.sparse_map is None and inner.format in READERS and inner.format not in WRAPPED_FORMATS:
        # an uncompressed member is a plain byte range of the archive: any format, read in place
        contained = MemberFile(host, base, member.size, f"{host.name}:{member.name}")
        return READERS[inner.format].open(contained, None, OpenOptions())
    else:
        disk = _wrapped_disk(inner, head, tail or b"", member.size, host.name, kind or "tar", member.name)
        reader = StreamDiskReader(host, stream, member.size, _clip(segments, disk), facts, base, first, disk)
    if tail is None:
        _check_tail_when_read(reader, identify, head, host.name, kind or "tar", member.name, as_bytes)
    return reader


def _check_tail_when_read(reader: StreamDiskReader, identify: Identify, head: bytes, path: str, kind: str,
                          member: str | None, as_bytes: bool) -> None:
    """For a disk whose end was not seen at open: its check, made when the end is read (always
    when the bytes are read as a disk; when ``guard_tail`` asks, for bytes read as they are)."""
    reader.tail_check = functools.partial(_refuse_at_end, identify, head, reader.content_size, path, kind, member)
    if not as_bytes:
        reader.guard_tail()


class EndShowsAnotherFormat(UnsupportedFormat):
    """The end of a wrapped disk, seen only once read, shows a format other than RAW."""


class _ForwardAt:
    """A member's stored bytes (offsets from its start) read forward from the stream, its first
    chunk already in hand: ``read_at`` for reads at increasing offsets."""

    def __init__(self, stream: ForwardStream, base: int, first: bytes) -> None:
        self.stream = stream
        self.base = base
        self.first = first

    def read_at(self, offset: int, length: int) -> bytes:
        held = self.first[offset : offset + length]
        if len(held) == length:
            return held
        offset, length = offset + len(held), length - len(held)
        ahead = self.base + offset - self.stream.position
        if ahead < 0:
            raise AssertionError("a member's tail is read at increasing offsets")
        self.stream.skip(ahead)
        return held + self.stream.read(length)


def _refuse_at_end(identify: Identify, head: bytes, size: int, path: str, kind: str, member: str | None,
                   tail: bytes) -> None:
    """Refuse a wrapped disk whose end, seen only once read, shows a format other than RAW (a fixed
    VHD's footer, a DMG trailer): its bytes must not pass as a RAW disk."""
    inner = _identify(identify, head, tail, size, member)
    if inner.format in WRAPPED_FORMATS:
        return
    what = f"{kind}-compressed tar archive, and its member {member} is" if member else \
        f"{kind}-compressed, and what it holds is"
    command = f"diskimg unpack {shlex.quote(path)} --out DIR"
    then = (f"then use the {inner.format} file it restores" if inner.readable else
            f"then, for {member or 'what it restores'}: {inner.hint}")
    raise EndShowsAnotherFormat(f"{what} {article(inner.description)} (found at its end, which is seen only once "
                                "read): it is not a RAW disk", path=path, format=inner.format,
                                hint=f"restore it as it is first: `{command}`; {then}")


def _head(first: bytes, segments: list[Segment], size: int) -> bytes:
    """The member's first INNER_HEAD bytes, from the first chunk of its stored data."""
    head = bytearray(min(INNER_HEAD, size))
    for segment in segments:
        if segment.start >= len(head):
            break
        piece = first[segment.stored : segment.stored + min(segment.length, len(head) - segment.start)]
        head[segment.start : segment.start + len(piece)] = piece
    return bytes(head)


def next_disk_member(stream: Readable) -> TarMember | None:
    """The next regular file of an archive, after directories; None at its end. Anything hostile
    (an unsafe name, a link, a device, a size over the cap) is refused."""
    while True:
        member = read_member(stream)
        if member is None:
            return None
        check_member(member)
        if member.kind == "directory":
            skip_data(stream, member)
            continue
        return member


def check_member(member: TarMember) -> None:
    """Refuse a member a disk archive must not hold (one clear ArchiveError)."""
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if not name or "\0" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"member {name!r} has an absolute or empty name: refused")
    if ".." in parts:
        raise ArchiveError(f"member {name!r} climbs out of the output directory ('..'): refused")
    if member.kind not in ("file", "directory"):
        target = f" -> {member.linkname}" if member.kind in ("symlink", "hardlink") else ""
        raise ArchiveError(f"member {name!r} is a {member.kind}{target}: an archive of disks holds regular files only")
    if member.size > MAX_MEMBER_SIZE:
        raise ArchiveError(f"member {name!r} declares {member.size} bytes, more than the "
                           f"{MAX_MEMBER_SIZE >> 40} TiB accepted")


def member_segments(member: TarMember) -> list[Segment]:
    """Where the member's bytes are in its stored data: its sparse map, or one segment."""
    if member.sparse_map is None:
        return [Segment(0, member.size, 0)] if member.size else []
    segments = []
    stored = 0
    for offset, length in member.sparse_map:
        segments.append(Segment(offset, length, stored))
        stored += length
    return segments


def finish_archive(reader: DiskReader) -> None:
    """After the disk was read: check that nothing but directories follows it in the archive,
    decompress to the end (so a damaged stream or checksum is caught) and read the file to its
    end (so ``reader.stream.digest`` covers all of it). Only for readers from ``open_wrapped``."""
    if not isinstance(reader, StreamDiskReader):
        return
    try:
        with reader._lock:
            if reader.facts["wrapper"] == "tar":
                member_end = reader.segments[-1].stored + reader.segments[-1].length if reader.segments else 0
                rest = _StreamFrom(reader, member_end + len(padding(member_end)))
                _refuse_another_disk(rest, reader.facts["member"])
                rest.to_end()
            else:
                _StreamFrom(reader, reader.segments[-1].end if reader.segments else 0).to_end()
            reader.stream.drain_input()
    except ArchiveError as exc:
        exc.path = exc.path or reader.path
        raise


def _refuse_another_disk(rest: Readable, first: str) -> None:
    """After the disk member: only directories may follow it, up to the end of the archive."""
    extra = next_disk_member(rest)
    if extra is not None:
        raise ArchiveError(f"holds more than one disk ({first}, then {extra.name}): "
                           "an archive must hold exactly one disk")


class _StreamFrom:
    """The reader's stream from a relative offset on, read forward through its chunk cache."""

    def __init__(self, reader: StreamDiskReader, offset: int) -> None:
        self.reader = reader
        self.position = offset

    def read(self, size: int) -> bytes:
        data = self.reader._read_stream(self.position, size)
        self.position += len(data)
        return data

    def to_end(self) -> None:
        while self.read(READ_CHUNK):
            pass


class _UnopenedFile(HostFile):
    """A HostFile over bytes that are not a file of their own (nothing is opened, so no
    ``super().__init__``): a member of an archive, or what a stream showed of a file."""

    def __init__(self, name: str, size: int, lock: threading.Lock) -> None:
        self._lock = lock
        self.name = name
        self.size = size
        self.fd = None
        self.is_block_device = False
        self._owned = False

    @property
    def allocated_bytes(self) -> int | None:
        return None


class MemberFile(_UnopenedFile):
    """A byte range of an archive file, as the HostFile a format driver reads (offsets relative to
    the member, reads clipped to it). Closing it closes the archive."""

    def __init__(self, archive: HostFile, start: int, size: int, name: str) -> None:
        super().__init__(name, size, archive._lock)  # the archive's file is shared
        self._archive = archive
        self._start = start

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return self._archive.read_at(self._start + offset, length) if length else b""

    def readinto_at(self, offset: int, buffer: memoryview) -> int:
        length = max(0, min(len(buffer), self.size - offset))
        return self._archive.readinto_at(self._start + offset, buffer[:length]) if length else 0

    def data_regions(self, start: int, end: int) -> list[tuple[int, int]] | None:
        regions = self._archive.data_regions(self._start + start, self._start + end)
        return None if regions is None else [(a - self._start, b - self._start) for a, b in regions]

    def close(self) -> None:
        self._archive.close()


def _wrapped_disk(inner: Detection, head: bytes, tail: bytes, size: int, path: str, kind: str,
                  member: str | None) -> ImageInfo | None:
    """How the wrapped bytes are read as a disk: None for a RAW disk; a fixed VHD's facts (its
    virtual size from the footer, which is never data); anything else is refused."""
    if inner.format == "vhd" and inner.subformat == "fixed" and inner.readable:
        name = f"{path}:{member}" if member else path
        with READERS["vhd"].open(_EdgesFile(head, tail, size, name), None, OpenOptions()) as vhd:
            return vhd.info()
    _require_raw(inner, path, kind, member)
    return None


def _clip(segments: list[Segment], disk: ImageInfo | None) -> list[Segment]:
    """The segments that are disk data: a fixed VHD's footer (after its data area) is not."""
    if disk is None:
        return segments
    end = min(disk.details["data_area"], disk.virtual_size)
    return [Segment(s.start, min(s.length, end - s.start), s.stored) for s in segments if s.start < end]


class _EdgesFile(_UnopenedFile):
    """A file known by its head and its tail only (what a stream showed of it), as the HostFile the
    VHD driver reads a fixed disk's footer from: the driver's own checks apply, and it reads
    nothing else of a fixed disk."""

    def __init__(self, head: bytes, tail: bytes, size: int, name: str) -> None:
        super().__init__(name, size, threading.Lock())
        self._head, self._tail = head, tail

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= len(self._head):
            return self._head[offset:end]
        tail_start = self.size - len(self._tail)
        if offset >= tail_start:
            return self._tail[offset - tail_start : end - tail_start]
        raise ArchiveError(f"bytes {offset} to {end} of the disk inside are not at hand to identify it", path=self.name)

    def close(self) -> None:
        pass


def _identify(identify: Identify, head: bytes, tail: bytes, size: int | None, name: str | None) -> Detection:
    """What a wrapper holds, by the same probes as a bare file (one level in): from its head, and
    from its tail (a VHD footer, a DMG trailer) when ``size`` is known."""
    return identify(head, tail, size, 1, name)


def _require_raw(inner: Detection, path: str, kind: str, member: str | None) -> None:
    """Refuse a disk that cannot be read where it is: a format diskimg does not read (with that
    format's conversion advice), anything but RAW or a fixed VHD inside a compressed stream
    (qcow2 and the other VHDs need random access), and in a plain tar a sparse member of those."""
    if inner.format in WRAPPED_FORMATS:
        return
    where = f"its member {member}" if member else "what it holds"
    foreign = not inner.readable
    if kind == "tar":
        what = "an uncompressed tar archive"
        reason = ("diskimg reads VHD, qcow2 and RAW" if foreign else "from a tar diskimg reads RAW disks and fixed "
                  "VHDs, and other VHD or qcow2 members that are not sparse")
        hint = f"unpack it first: `diskimg unpack {shlex.quote(path)} --out DIR`"
        if foreign and inner.hint:
            hint += f"; then, for {member}: {inner.hint}"
    else:
        what = f"{kind}-compressed tar archive" if member else f"{kind}-compressed"
        reason = ("diskimg reads VHD, qcow2 and RAW" if foreign else
                  f"through a compressed stream diskimg reads RAW disks and fixed VHDs only ({inner.format} "
                  "needs random access)")
        command, produced = unwrap_command(kind, path)
        if member and produced and produced.endswith(".tar"):
            hint = (f"decompress it first: `{command}` (diskimg reads a disk inside an uncompressed tar in place: "
                    f"`diskimg info {shlex.quote(produced)}`)")
            if foreign and inner.hint:
                hint += f"; then, for {member}: {inner.hint}"
        else:
            hint = wrapper_hint(kind, path, inner, None)
    raise UnsupportedFormat(f"{what}, and {where} is {article(inner.description)}: {reason}", path=path,
                            format=inner.format, hint=hint)


def _check_size(size: int, path: str) -> None:
    if size > MAX_MEMBER_SIZE:
        raise ArchiveError(f"holds a disk of {size} bytes, more than the {MAX_MEMBER_SIZE >> 40} TiB accepted",
                           path=path)
