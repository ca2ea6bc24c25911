"""Host files as the tests make and patch them: sparse files, bytes written or read at an offset."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from .tools import run


def blank(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes, all holes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sparse_file(path: Path, size: int, runs: list[tuple[int, bytes]]) -> Path:
    """A sparse file of ``size`` bytes holding each (offset, bytes) run."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    return path


def random_sparse_file(path: Path, size: int, runs: list[tuple[int, int]], seed: int = 0) -> Path:
    """A sparse file of ``size`` bytes with random bytes (from ``seed``) at each (offset, length), holes elsewhere."""
    rng = random.Random(seed)
    return sparse_file(path, size, [(offset, rng.randbytes(length)) for offset, length in runs])


def sparse_copy(source: Path, target: Path) -> Path:
    run("cp", "--sparse=always", source, target)
    return target


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_u64(path: Path, offset: int) -> int:
    """The big-endian u64 at ``offset`` (a qcow2 table entry)."""
    return struct.unpack(">Q", read_at(path, offset, 8))[0]


def leftovers(directory: Path) -> list[str]:
    """The temporary outputs (``*.part``) left in a folder."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))
