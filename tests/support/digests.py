"""Digests the tests compare: sha256 of files, of what a DiskReader yields and of qemu's reading,
and the guest content hash as its definition states it, of bytes or of a sparse disk or file walked
by its extents."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from pathlib import Path

from .tools import qemu_raw

#: how much of a disk or a file is read at once
CHUNK = 4 << 20
#: the content hash's block: each is hashed, or counted in a run of zero blocks
CONTENT_BLOCK = 65536
_ZERO_BLOCK = bytes(CONTENT_BLOCK)


def sha256_stream(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(iter(lambda: f.read(CHUNK), b""))


def qemu_raw_sha256(image: os.PathLike, fmt: str, tmp_path: Path, image_opts: str | None = None) -> str:
    out = qemu_raw(image, fmt, tmp_path, image_opts)
    try:
        return file_sha256(out)
    finally:
        out.unlink()


def reader_sha256(reader) -> str:
    """sha256 of everything a DiskReader yields, read in 4 MiB chunks."""
    return sha256_stream(reader.read_at(offset, CHUNK) for offset in range(0, reader.virtual_size, CHUNK))


def reader_sha256_by_extents(reader) -> str:
    """sha256 of everything a DiskReader yields, its ZERO extents hashed from a zero buffer instead
    of read (the corpus has a 16 GiB one)."""
    digest = hashlib.sha256()
    zeros = bytes(CHUNK)
    for extent in reader.extents():
        for offset in range(extent.start, extent.end, CHUNK):
            length = min(CHUNK, extent.end - offset)
            digest.update(zeros[:length] if extent.kind.value == "zero" else reader.read_at(offset, length))
    return digest.hexdigest()


class ContentHash:
    """The guest content hash as diskimg/conversion/hashing.py's docstring defines it, written
    independently of it: sha256 over the disk size, then per 64 KiB block in order either "D" and the
    block's sha256 or, for a run of zero blocks, "Z" and the run's length. The disk is fed in order as
    data and zero runs; a zero run costs nothing however long, so sparse disks hash by their extents."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fed = 0
        self._outer = hashlib.sha256(b"diskimg-content-v1\0" + struct.pack(">Q", size))
        self._partial = bytearray()  # the start of the block being filled
        self._zero_run = 0  # zero blocks not yet written

    def data(self, chunk: bytes) -> None:
        self.fed += len(chunk)
        if self._partial:
            take = min(len(chunk), CONTENT_BLOCK - len(self._partial))
            self._partial += chunk[:take]
            chunk = chunk[take:]
            if len(self._partial) < CONTENT_BLOCK:
                return
            self._block(bytes(self._partial))
            self._partial.clear()
        whole = len(chunk) - len(chunk) % CONTENT_BLOCK
        for start in range(0, whole, CONTENT_BLOCK):
            self._block(chunk[start : start + CONTENT_BLOCK])
        self._partial += chunk[whole:]

    def zeros(self, length: int) -> None:
        self.fed += length
        if self._partial:
            take = min(length, CONTENT_BLOCK - len(self._partial))
            self._partial += bytes(take)
            length -= take
            if len(self._partial) < CONTENT_BLOCK:
                return
            self._block(bytes(self._partial))
            self._partial.clear()
        self._zero_run += length // CONTENT_BLOCK
        self._partial += bytes(length % CONTENT_BLOCK)

    def _block(self, block: bytes) -> None:
        if block == _ZERO_BLOCK[: len(block)]:
            self._zero_run += 1
            return
        if self._zero_run:
            self._outer.update(b"Z" + struct.pack(">Q", self._zero_run))
            self._zero_run = 0
        self._outer.update(b"D" + hashlib.sha256(block).digest())

    def hexdigest(self) -> str:
        """The hash, once the whole disk was fed (the last block may be short)."""
        assert self.fed == self.size, f"{self.fed} bytes fed of a {self.size}-byte disk"
        if self._partial:
            self._block(bytes(self._partial))
            self._partial.clear()
        if self._zero_run:
            self._outer.update(b"Z" + struct.pack(">Q", self._zero_run))
            self._zero_run = 0
        return "sha256c1:" + self._outer.hexdigest()


def content_hash_by_definition(data: bytes, virtual_size: int | None = None) -> str:
    """The guest content hash of ``data`` padded with zeros to ``virtual_size``."""
    size = len(data) if virtual_size is None else virtual_size
    digest = ContentHash(size)
    digest.data(data)
    digest.zeros(size - len(data))
    return digest.hexdigest()


def reader_content_hash(reader) -> str:
    """The content hash of what a DiskReader yields, walked by its extents: DATA extents are read,
    ZERO extents counted without reading (a sparse disk costs what its data costs)."""
    digest = ContentHash(reader.virtual_size)
    for extent in reader.extents():
        assert extent.start == digest.fed, f"extent {extent} does not follow the previous one"
        if extent.kind.value == "zero":
            digest.zeros(extent.length)
            continue
        for offset in range(extent.start, extent.end, CHUNK):
            digest.data(reader.read_at(offset, min(CHUNK, extent.end - offset)))
    return digest.hexdigest()


def file_content_hash(path: os.PathLike) -> str:
    """The content hash of a file, walked by its data extents (SEEK_DATA/SEEK_HOLE): holes cost
    nothing. Where the platform cannot tell holes, every byte is read."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        digest = ContentHash(size)
        position = 0
        while position < size:
            if hasattr(os, "SEEK_DATA"):
                try:
                    start = os.lseek(fd, position, os.SEEK_DATA)
                except OSError as error:
                    if error.errno != errno.ENXIO:  # ENXIO: only a hole lies past ``position``
                        raise
                    start = size
                end = os.lseek(fd, start, os.SEEK_HOLE) if start < size else size
            else:
                start, end = position, size
            digest.zeros(start - position)
            for offset in range(start, end, CHUNK):
                digest.data(os.pread(fd, min(CHUNK, end - offset), offset))
            position = end
    return digest.hexdigest()
