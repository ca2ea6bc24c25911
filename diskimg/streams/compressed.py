"""Compressed and archive wrappers around disk images: recognise them and peek inside.

diskimg does not read images through a wrapper; it names the wrapper, says what it holds and gives
the command that unwraps it. Peeking is bounded whatever the input: at most ``PEEK_INPUT`` bytes of
the wrapper are read and at most ``PEEK_OUTPUT`` bytes are decompressed (a decompression bomb yields
no more than that), so it costs milliseconds even on a multi-GiB stream.

What is inside is identified by a callback (``Identify``, provided by probe.py), so a wrapper
inside a wrapper (a tar in a gzip stream) is followed up to ``MAX_DEPTH`` levels.

Inside a compressed stream only a prefix of the inner file is seen: when the stream ends within
that prefix the inner file is known whole (head, tail and size); otherwise the tail is unknown,
so a fixed VHD (whose footer is at the end) shows up as the RAW disk it starts with (opening
it, in sources.py, sees the tail).
"""

from __future__ import annotations

import bz2
import lzma
import shlex
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ArchiveError
from ..formats.probing import Detection
from . import tar

#: what a peek decompresses at most (the inner head needs 128 KiB; a tar header and an OVF more)
PEEK_OUTPUT = 384 * 1024
#: how much compressed input a peek reads at most
PEEK_INPUT = 16 * 1024 * 1024
#: wrappers inside wrappers followed (gzip -> tar -> disk is two)
MAX_DEPTH = 2
_CHUNK = 64 * 1024
#: the inner head passed to detection
INNER_HEAD = 128 * 1024
#: the inner tail passed to detection (where a VHD footer or a DMG trailer is)
INNER_TAIL = 1024

ReadAt = Callable[[int, int], bytes]  # (offset, length) -> bytes, short only at the end
#: (head, tail, size or None, depth, name or None) -> Detection of what a wrapper holds
Identify = Callable[[bytes, bytes, "int | None", int, "str | None"], Detection]

COMPRESSORS = ("gzip", "xz", "bzip2", "zstd")
#: compressors recognised but not looked into (no decoder in the standard library)
OPAQUE = {"7z": "7-Zip archive", "lz4": "lz4-compressed"}


# --- recognition -----------------------------------------------------------------------------


def recognise_leading(head: bytes) -> str | None:
    """A wrapper whose signature is at offset 0: a compressor or a zip archive."""
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[3:4] and head[4:10] in (
        b"\x31\x41\x59\x26\x53\x59",
        b"\x17\x72\x45\x38\x50\x90",  # an empty stream: end-of-stream marker straight away
    ):
        return "bzip2"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if len(head) >= 8 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        # zstd skippable frame; a zstd frame (or another skippable frame) follows
        return "zstd"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return "7z"
    if head[:4] == b"\x04\x22\x4d\x18":
        return "lz4"
    return None


def recognise_tar(head: bytes) -> str | None:
    """``"ustar"``/``"gnu"`` by the magic at 257, ``"v7"`` by a valid header checksum, else None."""
    if len(head) < 512:
        return None
    magic = head[257:265]
    if magic == b"ustar  \0":
        flavor = "gnu"
    elif magic[:6] == b"ustar\0":
        flavor = "ustar"
    else:
        flavor = "v7"
    if not tar.is_header(head[:512]) or (flavor == "v7" and head[0] == 0):
        return None
    return flavor


# --- bounded decompression ------------------------------------------------------------------


@dataclass
class Prefix:
    data: bytes
    complete: bool  # the stream ended within the prefix: data is the whole inner file
    error: str | None = None


class _InputBudget:
    """Sequential reads of the wrapper, ``PEEK_INPUT`` bytes at most, as a file for zstandard."""

    def __init__(self, read_at: ReadAt, start: int, limit: int | None = None) -> None:
        self.read_at = read_at
        self.position = start
        self.remaining = PEEK_INPUT if limit is None else min(PEEK_INPUT, limit)
        self._capped = limit is None or limit > PEEK_INPUT  # the budget, not the file end, may stop us
        self.exhausted_budget = False

    def read(self, size: int = _CHUNK) -> bytes:
        size = min(size if size and size > 0 else _CHUNK, _CHUNK, self.remaining)
        if size <= 0:
            self.exhausted_budget = self._capped
            return b""
        data = self.read_at(self.position, size)
        self.position += len(data)
        self.remaining -= len(data)
        return data


#: how the standard library's decoders report corrupt data, and nothing else: zlib.error,
#: lzma.LZMAError (also for a header asking for more memory than the limit) and OSError, which is
#: how bz2 reports it ("Invalid data stream"); only the decoder's own call is guarded, so an
#: OSError of the file itself is not taken for corrupt data
CORRUPT_DATA = (zlib.error, lzma.LZMAError, OSError)


def _stream_prefix(make: Callable[[], Any], magic: bytes, source: _InputBudget) -> Prefix:
    """Decompress with a zlib/lzma/bz2 decompressor, following concatenated members/streams."""
    out = bytearray()
    decoder = make()
    while len(out) < PEEK_OUTPUT:
        if decoder.eof:
            rest = decoder.unused_data
            if len(rest) < len(magic):
                rest += source.read(len(magic))
            if not rest.startswith(magic):
                return Prefix(bytes(out), complete=True)  # the last member ended; padding ignored
            decoder = make()
            data = rest
        elif hasattr(decoder, "unconsumed_tail"):  # zlib
            data = decoder.unconsumed_tail or source.read()
            if not data:
                break
        elif decoder.needs_input:  # lzma, bz2
            data = source.read()
            if not data:
                break
        else:
            data = b""  # output is still buffered inside the decoder
        try:
            produced = decoder.decompress(data, PEEK_OUTPUT - len(out))
        except CORRUPT_DATA as exc:
            return Prefix(bytes(out), False, _error_text(exc))
        if not produced and not data:
            break  # no input and no progress: never spin
        out += produced
    return Prefix(bytes(out[:PEEK_OUTPUT]), complete=False)


def _zstd_prefix(source: _InputBudget) -> Prefix:
    import zstandard

    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 27)  # refuse windows over 128 MiB
    out = bytearray()
    try:
        # zstandard takes any object with read(size); its stub names only IO[bytes]
        with decompressor.stream_reader(source, read_size=_CHUNK, read_across_frames=True,  # type: ignore[arg-type]
                                        closefd=False) as reader:
            while len(out) < PEEK_OUTPUT:
                data = reader.read(PEEK_OUTPUT - len(out))
                if not data:
                    # zstandard's reader does not tell a truncated frame from a finished one:
                    # nothing decoded is reported as such, otherwise the output is taken as whole
                    if not out:
                        return Prefix(b"", False, "no data could be decoded (an empty or truncated stream)")
                    return Prefix(bytes(out), complete=not source.exhausted_budget)
                out += data
    except zstandard.ZstdError as exc:  # how zstandard reports corrupt data (and a window over the limit)
        return Prefix(bytes(out), False, _error_text(exc))
    return Prefix(bytes(out), complete=False)


def decompress_prefix(kind: str, read_at: ReadAt, start: int = 0, limit: int | None = None) -> Prefix:
    """The first ``PEEK_OUTPUT`` bytes of a compressed stream at ``start``; corrupt data ends the
    prefix with an ``error`` (only an error reading the file itself is raised)."""
    source = _InputBudget(read_at, start, limit)
    try:
        if kind == "gzip":
            return _stream_prefix(lambda: zlib.decompressobj(31), b"\x1f\x8b", source)
        if kind == "deflate":  # raw deflate, as in zip entries
            return _stream_prefix(lambda: zlib.decompressobj(-15), b"\0never", source)
        if kind == "xz":
            return _stream_prefix(lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=1 << 28), b"\xfd7zXZ\0",
                                  source)
        if kind == "bzip2":
            return _stream_prefix(bz2.BZ2Decompressor, b"BZh", source)
        if kind == "zstd":
            return _zstd_prefix(source)
    except ImportError:
        return Prefix(b"", False, "the zstandard module is not installed")
    return Prefix(b"", False, f"no decoder for {kind}")


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


# --- tar: peeked at through diskimg.streams.tar's parser ---------------------------------------------


class _ReadAtStream:
    """``read_at`` as the forward stream ``tar.read_member`` reads headers from."""

    def __init__(self, read_at: ReadAt) -> None:
        self.read_at = read_at
        self.position = 0

    def read(self, size: int, /) -> bytes:
        data = self.read_at(self.position, size)
        self.position += len(data)
        return data


@dataclass(frozen=True)
class PeekedMember:
    """A member's headers and where its stored data starts in the archive."""

    header: tar.TarMember
    data_offset: int

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def stored_size(self) -> int:
        return self.header.stored_size

    @property
    def is_file(self) -> bool:
        return self.header.kind == "file"

    def read(self, read_at: ReadAt, offset: int, length: int) -> bytes:
        """Bytes of the member's file (holes of a sparse member read as zeros)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if self.header.sparse_map is None:
            return read_at(self.data_offset + offset, end - offset)
        out = bytearray(end - offset)
        stored = self.data_offset
        for seg_offset, seg_length in self.header.sparse_map:
            lo, hi = max(seg_offset, offset), min(seg_offset + seg_length, end)
            if lo < hi:
                data = read_at(stored + lo - seg_offset, hi - lo)
                out[lo - offset : lo - offset + len(data)] = data
            stored += seg_length
            if seg_offset >= end:
                break
        return bytes(out)


def tar_members(read_at: ReadAt, size: int | None, limit: int = 8) -> tuple[list[PeekedMember], str | None]:
    """The first ``limit`` members of a tar archive, and the error that stopped the walk (if any).

    Reads past what ``read_at`` holds (a peeked prefix) end the walk without an error."""
    stream = _ReadAtStream(read_at)
    members: list[PeekedMember] = []
    while len(members) < limit:
        try:
            header = tar.read_member(stream)
        except ArchiveError as exc:
            return members, exc.message
        if header is None:
            break
        members.append(PeekedMember(header, stream.position))
        stream.position += header.stored_size + len(tar.padding(header.stored_size))
        if size is not None and stream.position >= size:
            break
    return members, None


_METADATA_SUFFIXES = (".ovf", ".mf", ".cert", ".txt", ".xml", ".json", ".md", ".sha256", ".sha1", ".sig", ".asc")


def _pick_member(members: list[PeekedMember]) -> tuple[PeekedMember | None, bool]:
    """The member to look into: the first disk-like file, or else the first file; and is-OVA."""
    files = [m for m in members if m.is_file]
    if not files:
        return None, False
    is_ova = files[0].name.lower().endswith(".ovf")
    for member in files:
        if not member.name.lower().endswith(_METADATA_SUFFIXES):
            return member, is_ova
    return files[0], is_ova


# --- peeking ----------------------------------------------------------------------------------


def article(text: str) -> str:
    return ("an " if text[:1].lower() in "aeiox" else "a ") + text


def _holds(detection: Detection) -> str:
    """How a wrapper's description names its content: "a RAW disk with an MBR", "tar archive ..."."""
    if detection.format == "tar" or detection.format in COMPRESSORS:
        return detection.description
    return article(detection.description)


_SUFFIXES = {
    "gzip": ((".tgz", ".tar"), (".gz", "")),
    "xz": ((".txz", ".tar"), (".xz", "")),
    "bzip2": ((".tbz2", ".tar"), (".tbz", ".tar"), (".bz2", "")),
    "zstd": ((".tzst", ".tar"), (".zst", "")),
}
_UNPACK = {
    "gzip": ("gunzip -k {src}", "gzip -dc {src} > {dst}"),
    "xz": ("xz -dk {src}", "xz -dc {src} > {dst}"),
    "bzip2": ("bunzip2 -k {src}", "bzip2 -dc {src} > {dst}"),
    "zstd": ("zstd -d {src}", "zstd -d {src} -o {dst}"),
}


def unwrapped_name(kind: str, name: str | None) -> tuple[str | None, bool]:
    """The name a decompressor gives the output, and whether it derives it by itself."""
    if not name:
        return None, False
    for suffix, replacement in _SUFFIXES.get(kind, ()):
        base = name[: -len(suffix)]
        if name.lower().endswith(suffix) and base and not base.endswith("/"):
            return base + replacement, True
    return name + ".out", False


def unwrap_command(kind: str, name: str | None) -> tuple[str, str | None]:
    """The command that unwraps ``name`` and the name of the file it produces (None: many)."""
    source = shlex.quote(name) if name else "IN"
    if kind == "tar":
        return f"tar -xSf {source}", None
    if kind == "zip":
        return f"unzip {source}", None
    if kind == "7z":
        return f"7z x {source}", None
    if kind == "lz4":
        return f"lz4 -d {source}", None
    out, automatic = unwrapped_name(kind, name)
    simple, explicit = _UNPACK[kind]
    if automatic:
        return simple.format(src=source), out
    return explicit.format(src=source, dst=shlex.quote(out) if out else "OUT"), out


def wrapper_hint(kind: str, name: str | None, inner: Detection | None, inner_name: str | None) -> str:
    """Unwrap first, then do what the content needs (its own hint says what, for the unwrapped name)."""
    command, produced = unwrap_command(kind, name)
    verb = "unpack" if kind in ("tar", "zip", "7z") else "decompress"
    text = f"{verb} it first: `{command}`"
    if inner is None or inner.format == "unknown":
        return text
    target = produced or inner_name
    if inner.readable:
        if target:
            return f"{text}, then use {target} ({inner.format})"
        return f"{text}, then use the {inner.format} image inside"
    if inner.hint:
        follow = inner.hint
        if follow.startswith("this ") or not target:
            return text + f"; then, for {target or 'what it holds'}: {follow}"
        follow = follow.replace("convert it first:", f"convert {target}:", 1)
        follow = follow.replace("decrypt it with cryptsetup open first", f"decrypt {target} with cryptsetup open", 1)
        return text + f"; then {follow}"
    return text


def peek_compressed(
    kind: str, read_at: ReadAt, identify: Identify, depth: int, name: str | None, limit: int | None = None
) -> Detection:
    """The Detection of a compressed stream (gzip, xz, bzip2, zstd, or opaque 7z/lz4) and what it holds."""
    if kind in OPAQUE:
        return Detection(
            format=kind, description=f"{OPAQUE[kind]} (not looked into)", hint=wrapper_hint(kind, name, None, None)
        )
    if depth >= MAX_DEPTH:
        return Detection(format=kind, description=f"{kind}-compressed (not looked into further)")
    inner_name, _ = unwrapped_name(kind, name)
    prefix = decompress_prefix(kind, read_at, 0, limit)
    if not prefix.data:
        if prefix.error:
            description = f"{kind}-compressed (could not look inside: {prefix.error})"
        else:
            description = f"{kind}-compressed, containing nothing (an empty stream)"
        return Detection(format=kind, description=description, hint=wrapper_hint(kind, name, None, None))
    holds_tar = recognise_tar(prefix.data[:512]) is not None
    # `tar -xSf x.tar.gz` unpacks both layers: the tar's advice is given for the outer name
    inner = _identify_prefix(prefix, identify, depth + 1, name if holds_tar else inner_name)
    if inner.format == "tar":
        description = f"{kind}-compressed {inner.description}"
        hint = inner.hint or wrapper_hint(kind, name, None, None)
    else:
        description = f"{kind}-compressed, containing {_holds(inner)}"
        hint = wrapper_hint(kind, name, inner, inner_name)
    if prefix.error:
        description += f" (the stream is damaged after {len(prefix.data)} bytes: {prefix.error})"
    return Detection(
        format=kind,
        description=description,
        inner_format=inner.format if inner.format != "unknown" else None,
        inner_description=inner.description,
        hint=hint,
    )


def _identify_prefix(prefix: Prefix, identify: Identify, depth: int, name: str | None) -> Detection:
    data = prefix.data
    if prefix.complete:
        return identify(data[:INNER_HEAD], data[-INNER_TAIL:], len(data), depth, name)
    return identify(data[:INNER_HEAD], b"", None, depth, name)


def peek_tar(read_at: ReadAt, size: int | None, identify: Identify, depth: int, name: str | None,
             flavor: str) -> Detection:
    """The Detection of a tar archive: its first (disk-like) member and what that holds.

    ``read_at`` may be a prefix of a decompressed stream, in which case reads past what was
    decompressed come back short and the member is known only by its head.
    """
    members, error = tar_members(read_at, size)
    member, is_ova = _pick_member(members)
    kind_text = "OVA (tar)" if is_ova else "tar archive"
    subformat = "ova" if is_ova else flavor
    if member is None:
        if error:
            description = f"{kind_text} (could not read its members: {error})"
        elif members:
            description = f"{kind_text} holding no regular file among its first members ({members[0].name}, ...)"
        else:
            description = f"empty {kind_text}"
        return Detection(format="tar", subformat=subformat, description=description,
                         hint=wrapper_hint("tar", name, None, None))
    which = "first member" if member is members[0] else "first disk-like member"
    if is_ova and member is not members[0]:
        which = "disk"
    head = member.read(read_at, 0, INNER_HEAD)
    if depth >= MAX_DEPTH:
        inner = Detection(format="unknown", description="data (not looked into further)")
    elif member.size == 0:
        inner = Detection(format="unknown", description="empty file")
    else:
        tail = member.read(read_at, max(0, member.size - INNER_TAIL), INNER_TAIL)
        known_whole = len(tail) == min(INNER_TAIL, member.size) and _fully_readable(read_at, member)
        inner = identify(head, tail if known_whole else b"", member.size if known_whole else None, depth + 1,
                         member.name)
    description = f"{kind_text} whose {which} {member.name} is {_holds(inner)}"
    return Detection(
        format="tar",
        subformat=subformat,
        description=description,
        inner_format=inner.format if inner.format != "unknown" else None,
        inner_description=inner.description,
        hint=wrapper_hint("tar", name, inner, member.name),
    )


def _fully_readable(read_at: ReadAt, member: PeekedMember) -> bool:
    """Whether the archive holds all of the member's stored data (not cut off by a peek prefix)."""
    if member.stored_size == 0:
        return True
    last = read_at(member.data_offset + member.stored_size - 1, 1)
    return len(last) == 1


_ZIP_METHODS = {0: "stored", 8: "deflate", 12: "bzip2", 93: "zstd"}


def peek_zip(read_at: ReadAt, identify: Identify, depth: int, name: str | None) -> Detection:
    """The Detection of a zip archive from its first local file header (no central directory)."""
    header = read_at(0, 30)
    if header[:4] == b"PK\x05\x06":
        return Detection(format="zip", description="empty zip archive", hint=wrapper_hint("zip", name, None, None))
    offset = 0
    entry_name = ""
    for _ in range(8):  # skip directory entries
        header = read_at(offset, 30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            return Detection(
                format="zip",
                description="zip archive (could not read its first entry)",
                hint=wrapper_hint("zip", name, None, None),
            )
        flags, method = struct.unpack_from("<HH", header, 6)
        (compressed,) = struct.unpack_from("<I", header, 18)
        name_length, extra_length = struct.unpack_from("<HH", header, 26)
        entry_name = read_at(offset + 30, name_length).decode("utf-8" if flags & 0x800 else "cp437", "replace")
        data_offset = offset + 30 + name_length + extra_length
        if not entry_name.endswith("/"):
            break
        if flags & 0x8:
            break  # sizes follow the data: cannot step over it without decompressing
        offset = data_offset + compressed
    description_start = f"zip archive whose first entry {entry_name}"
    if flags & 0x1:
        inner = Detection(format="unknown", description="encrypted (not looked into)")
    elif method not in _ZIP_METHODS:
        inner = Detection(format="unknown", description=f"compressed with zip method {method} (not looked into)")
    elif depth >= MAX_DEPTH:
        inner = Detection(format="unknown", description="data (not looked into further)")
    else:
        known = not (flags & 0x8) and compressed != 0xFFFFFFFF
        limit = compressed if known else None

        def entry_at(position: int, length: int) -> bytes:
            if limit is not None:
                length = max(0, min(length, limit - position))
            return read_at(data_offset + position, length)

        if method == 0:
            data = entry_at(0, PEEK_OUTPUT)
            complete = known and len(data) == compressed
            prefix = Prefix(data, complete and compressed <= PEEK_OUTPUT)
        else:
            prefix = decompress_prefix({8: "deflate", 12: "bzip2", 93: "zstd"}[method], entry_at, 0)
        if prefix.data:
            inner = _identify_prefix(prefix, identify, depth + 1, entry_name)
        elif prefix.error:
            inner = Detection(format="unknown", description=f"unreadable ({prefix.error})")
        else:
            inner = Detection(format="unknown", description="empty file")
    return Detection(
        format="zip",
        description=f"{description_start} is {_holds(inner)}",
        inner_format=inner.format if inner.format != "unknown" else None,
        inner_description=inner.description,
        hint=wrapper_hint("zip", name, inner, entry_name),
    )
