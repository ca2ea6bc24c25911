"""Digests the tests compare: sha256 of files, of what a DiskReader yields and of qemu's reading,
and the guest content hash as its definition states it."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from .tools import qemu_raw


def sha256_stream(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(iter(lambda: f.read(1 << 22), b""))


def qemu_raw_sha256(image: os.PathLike, fmt: str, tmp_path: Path, image_opts: str | None = None) -> str:
    out = qemu_raw(image, fmt, tmp_path, image_opts)
    try:
        return file_sha256(out)
    finally:
        out.unlink()


def reader_sha256(reader) -> str:
    """sha256 of everything a DiskReader yields, read in 4 MiB chunks."""
    chunk = 4 << 20
    return sha256_stream(reader.read(offset, chunk) for offset in range(0, reader.virtual_size, chunk))


def content_hash_by_definition(data: bytes, virtual_size: int | None = None) -> str:
    """The guest content hash as diskimg/hashing.py's docstring defines it, written the plainest way
    (independently of diskimg.conversion.hashing); ``data`` is padded with zeros to ``virtual_size``."""
    size = len(data) if virtual_size is None else virtual_size
    data = data + bytes(size - len(data))
    outer = hashlib.sha256(b"diskimg-content-v1\0" + struct.pack(">Q", size))
    zero_run = 0
    for start in range(0, size, 65536):
        block = data[start : start + 65536]
        if block == bytes(len(block)):
            zero_run += 1
            continue
        if zero_run:
            outer.update(b"Z" + struct.pack(">Q", zero_run))
            zero_run = 0
        outer.update(b"D" + hashlib.sha256(block).digest())
    if zero_run:
        outer.update(b"Z" + struct.pack(">Q", zero_run))
    return "sha256c1:" + outer.hexdigest()
