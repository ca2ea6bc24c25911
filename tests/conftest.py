"""Shared test helpers: the qemu-img oracle and the third-party corpus."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "fixtures"


def corpus_dir() -> Path | None:
    """The shared corpus: $DISKIMG_CORPUS, or ../shared/corpus beside the checkout."""
    env = os.environ.get("DISKIMG_CORPUS")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "corpus")
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def corpus_manifest() -> list[dict]:
    directory = corpus_dir()
    if directory is None:
        return []
    return json.loads((directory / "manifest.json").read_text())["files"]


requires_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def run(*args: str | os.PathLike, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a tool; fail the test with its stderr if it fails."""
    proc = subprocess.run([str(a) for a in args], input=input, capture_output=True)
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc


def qemu_img(*args: str | os.PathLike) -> str:
    return run("qemu-img", *args).stdout.decode()


def qemu_io(image: os.PathLike, fmt: str, *commands: str) -> None:
    """Write into an image with qemu-io, e.g. qemu_io(p, "qcow2", "write -P 0xab 0 64k")."""
    args: list[str | os.PathLike] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, image)


def sha256_stream(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def qemu_raw(image: os.PathLike, fmt: str, tmp_path: Path, image_opts: str | None = None) -> Path:
    """``qemu-img convert -O raw`` of an image, the oracle for what a reader yields (a sparse file)."""
    out = tmp_path / f"oracle-{hashlib.md5(f'{image}{image_opts}'.encode()).hexdigest()}.raw"
    if image_opts:
        run("qemu-img", "convert", "--image-opts", image_opts, "-O", "raw", out)
    else:
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", image, out)
    return out


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


def qemu_map(image: os.PathLike, fmt: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", "-f", fmt, image))


def assert_extents_sound(reader, oracle_raw: os.PathLike) -> None:
    """extents() covers the disk in order with no gaps, and every ZERO extent reads as zeros in
    qemu's reading of the image (so every non-zero byte qemu yields lies in one of our DATA
    extents; our map may be finer than ``qemu-img map``)."""
    position = 0
    with open(oracle_raw, "rb") as oracle:
        for extent in reader.extents():
            assert extent.start == position and extent.length > 0, f"gap or overlap at {extent}"
            position = extent.end
            if extent.kind.value == "zero":
                oracle.seek(extent.start)
                remaining = extent.length
                while remaining:
                    chunk = oracle.read(min(remaining, 1 << 22))
                    assert chunk and chunk == bytes(len(chunk)), f"ZERO extent {extent} is not zero in qemu's reading"
                    remaining -= len(chunk)
    assert position == reader.virtual_size
