"""diskimg.streams.tar against GNU tar, bsdtar and Python's tarfile: archives they write are read back with
the right names, sizes and sparse maps; members we write are listed and extracted by them; malformed
headers raise ArchiveError and nothing else."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg.errors import ArchiveError
from diskimg.streams import tar

from .support.files import random_sparse_file
from .support.tools import run
from .support.units import MiB

requires_gnu_tar = pytest.mark.skipif(
    shutil.which("tar") is None or b"GNU tar" not in subprocess.run(["tar", "--version"], capture_output=True).stdout,
    reason="GNU tar not installed")
requires_bsdtar = pytest.mark.skipif(shutil.which("bsdtar") is None, reason="bsdtar not installed")


def sparse_source(path: Path, size: int, segments: list[tuple[int, int]]) -> bytes:
    """A sparse file with random data in ``segments``, holes elsewhere; returns its content."""
    return random_sparse_file(path, size, segments, seed=1).read_bytes()


def restore(stream, member: tar.TarMember) -> bytes:
    """The member's file content rebuilt from its stored data and sparse map (test-side)."""
    data = stream.read(member.stored_size)
    stream.read(len(tar.padding(member.stored_size)))
    if member.sparse_map is None:
        return data
    content = bytearray(member.size)
    position = 0
    for offset, length in member.sparse_map:
        content[offset : offset + length] = data[position : position + length]
        position += length
    return bytes(content)


def archive_of(name: str, content: bytes, segments: list[tuple[int, int]] | None, mtime: int = 0) -> bytes:
    """An archive with one member written by pack_member, its data being the segments' bytes."""
    out = bytearray(tar.pack_member(name, len(content), segments, mtime=mtime))
    stored = 0
    for offset, length in segments if segments is not None else [(0, len(content))]:
        out += content[offset : offset + length]
        stored += length
    return bytes(out + tar.padding(stored) + tar.END_OF_ARCHIVE)


SEGMENTS = [(4096, 8192)] + [(MiB + i * 65536, 4096) for i in range(30)] + [(3 * MiB, 100)]


@requires_gnu_tar
@pytest.mark.parametrize("options", [
    ["--format=gnu", "-S"], ["--format=oldgnu", "-S"],
    ["--format=posix", "-S", "--sparse-version=0.0"], ["--format=posix", "-S", "--sparse-version=0.1"],
    ["--format=posix", "-S", "--sparse-version=1.0"], ["--format=posix"], ["--format=ustar"], ["--format=v7"],
])
def test_reads_gnu_tar_archives(tmp_path: Path, options: list[str]) -> None:
    name = "disk.raw" if "--format=v7" in options else "d" * 80 + "/" + "f" * 60 + ".raw"
    (tmp_path / "src" / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
    content = sparse_source(tmp_path / "src" / name, 4 * MiB + 123, SEGMENTS)
    run("tar", "-cf", tmp_path / "a.tar", *options, "-C", tmp_path / "src", name)
    with open(tmp_path / "a.tar", "rb") as f:
        members = []
        while (member := tar.read_member(f)) is not None:
            members.append(member)
            if member.kind == "file":
                assert restore(f, member) == content
            else:
                tar.skip_data(f, member)
    files = [m for m in members if m.kind == "file"]
    assert [m.name for m in files] == [name]
    assert files[0].size == len(content)
    expected_format = {"--format=gnu": "gnu", "--format=oldgnu": "gnu", "--format=posix": "pax",
                       "--format=ustar": "ustar", "--format=v7": "v7"}[options[0]]
    assert files[0].header_format == expected_format
    if "-S" in options:
        assert files[0].sparse_map is not None and files[0].stored_size < len(content)
        for offset, length in SEGMENTS:  # every data segment is covered by the map
            assert any(o <= offset and offset + length <= o + n for o, n in files[0].sparse_map)


@requires_gnu_tar
def test_reads_links_directories_and_long_link_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_bytes(b"hello")
    os.symlink("t" * 150, src / "link")
    os.link(src / "dir" / "file", src / "hard")
    run("tar", "-cf", tmp_path / "a.tar", "--format=gnu", "-C", src, "dir", "link", "hard")
    with open(tmp_path / "a.tar", "rb") as f:
        found = {}
        while (member := tar.read_member(f)) is not None:
            found[member.name.rstrip("/")] = member
            tar.skip_data(f, member)
    assert found["dir"].kind == "directory"
    assert found["dir/file"].kind == "file" and found["dir/file"].size == 5
    assert found["link"].kind == "symlink" and found["link"].linkname == "t" * 150
    assert found["hard"].kind == "hardlink" and found["hard"].linkname == "dir/file"
    assert found["hard"].stored_size == 0


@requires_gnu_tar
@pytest.mark.parametrize("segments", [SEGMENTS[:3], SEGMENTS, [], [(0, 4 * MiB + 123)]],
                         ids=["in-header", "extension-blocks", "all-hole", "no-hole"])
def test_pack_member_sparse_extracted_by_gnu_tar(tmp_path: Path, segments: list[tuple[int, int]]) -> None:
    content = sparse_source(tmp_path / "original", 4 * MiB + 123, segments)
    name = "n" * 130 + ".raw"  # a GNU long name too
    (tmp_path / "a.tar").write_bytes(archive_of(name, content, segments, mtime=1_700_000_000))
    listing = run("tar", "-tvf", tmp_path / "a.tar").stdout.decode()
    assert f" {len(content)} " in listing and name in listing
    (tmp_path / "out").mkdir()
    run("tar", "-xSf", tmp_path / "a.tar", "-C", tmp_path / "out")
    restored = tmp_path / "out" / name
    assert restored.read_bytes() == content
    assert restored.stat().st_mtime == 1_700_000_000
    stored = sum(length for _, length in segments)
    assert restored.stat().st_blocks * 512 <= stored + 64 * 1024  # holes stayed holes


def test_pack_member_read_by_tarfile_and_read_member(tmp_path: Path) -> None:
    content = sparse_source(tmp_path / "original", 4 * MiB + 123, SEGMENTS)
    archive = archive_of("disk.raw", content, SEGMENTS)
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        (info,) = t.getmembers()
        assert info.name == "disk.raw" and info.size == len(content) and info.issparse()
        assert t.extractfile(info).read() == content
    stream = io.BytesIO(archive)
    member = tar.read_member(stream)
    assert member.sparse_map == tuple(SEGMENTS) and member.header_format == "gnu"
    assert member.stored_size == sum(length for _, length in SEGMENTS)
    assert restore(stream, member) == content
    assert tar.read_member(stream) is None


@requires_bsdtar
def test_pack_member_listed_by_bsdtar(tmp_path: Path) -> None:
    content = sparse_source(tmp_path / "original", 4 * MiB + 123, SEGMENTS)
    (tmp_path / "a.tar").write_bytes(archive_of("disk.raw", content, SEGMENTS))
    listing = run("bsdtar", "-tvf", tmp_path / "a.tar").stdout.decode()
    assert "disk.raw" in listing and str(len(content)) in listing
    (tmp_path / "out").mkdir()
    run("bsdtar", "-xf", tmp_path / "a.tar", "-C", tmp_path / "out")
    assert (tmp_path / "out" / "disk.raw").read_bytes() == content


@requires_gnu_tar
def test_large_sizes_use_base_256(tmp_path: Path) -> None:
    size = 9 << 30  # past the 8 GiB an 11-digit octal field holds
    segments = [(size - 4096, 4096)]
    header = tar.pack_member("big.raw", size, segments)
    archive = header + b"\xab" * 4096 + tar.END_OF_ARCHIVE
    (tmp_path / "a.tar").write_bytes(archive)
    assert f" {size} " in run("tar", "-tvf", tmp_path / "a.tar").stdout.decode()
    with tarfile.open(tmp_path / "a.tar") as t:
        assert t.getmembers()[0].size == size
    member = tar.read_member(io.BytesIO(archive))
    assert member.size == size and member.sparse_map == tuple(segments)


def test_pack_member_refuses_bad_maps() -> None:
    for segments in ([(0, 10), (5, 10)], [(0, 0)], [(90, 20)], [(50, 10), (0, 10)]):
        with pytest.raises(ValueError):
            tar.pack_member("x", 100, segments)


def test_padding() -> None:
    assert [len(tar.padding(n)) for n in (0, 1, 511, 512, 513)] == [0, 511, 1, 0, 511]


# -- malformed archives ----------------------------------------------------------------------------


def _rechecksummed(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _patched(offset: int, value: bytes, checksum: bool = True) -> bytes:
    """A sparse member's header with ``value`` written at ``offset`` (checksum recomputed)."""
    header = bytearray(tar.pack_member("disk.raw", 4096, [(0, 512), (1024, 512)]))
    header[offset : offset + len(value)] = value
    block = _rechecksummed(header[:512]) if checksum else bytes(header[:512])
    return block + bytes(header[512:]) + bytes(1024) + tar.END_OF_ARCHIVE


@pytest.mark.parametrize("archive, message", [
    (_patched(0, b"e", checksum=False), "checksum"),
    (_patched(124, b"0000000009x\0"), "octal"),
    (_patched(386, b"%011o\0%011o\0%011o\0%011o\0" % (1024, 512, 0, 512)), "out of order"),
    (_patched(386, b"%011o\0%011o\0%011o\0%011o\0" % (0, 1024, 512, 512)), "overlapping"),
    (_patched(483, b"%011o\0" % 1000), "past the file"),
    (_patched(124, b"%011o\0" % 2048), "accounts for"),
    (_patched(124, b"\xff" * 12), "negative"),
], ids=["checksum", "octal", "order", "overlap", "past-size", "stored-size", "negative"])
def test_malformed_headers_raise_archive_error(archive: bytes, message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        stream = io.BytesIO(archive)
        while (member := tar.read_member(stream)) is not None:
            tar.skip_data(stream, member)


def _pax(records: dict[str, str], body: bytes = b"", typeflag: bytes = b"0", size: int | None = None) -> bytes:
    text = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + 1
        while len(str(length)) + len(record) != length:
            length = len(str(length)) + len(record)
        text += str(length).encode() + record
    pax_header = bytearray(tar.pack_member("PaxHeader", len(text)))
    pax_header[156:157] = b"x"
    member = bytearray(tar.pack_member("GNUSparseFile.0/disk.raw", len(body) if size is None else size))
    member[156:157] = typeflag
    return (_rechecksummed(pax_header) + text + tar.padding(len(text)) + _rechecksummed(member)
            + body + tar.padding(len(body)) + tar.END_OF_ARCHIVE)


def test_pax_sparse_1_0_map_excluded_from_stored_size() -> None:
    body = b"2\n0\n3\n100\n2\n".ljust(512, b"\0") + b"abcde"
    archive = _pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "disk.raw",
                    "GNU.sparse.realsize": "200"}, body)
    stream = io.BytesIO(archive)
    member = tar.read_member(stream)
    assert (member.name, member.size, member.stored_size, member.sparse_map) == ("disk.raw", 200, 5, ((0, 3), (100, 2)))
    assert stream.read(5) == b"abcde"


@pytest.mark.parametrize("records, body, message", [
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
     b"99999999999\n".ljust(512, b"\0"), "entries"),
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
     b"1\n0\nx\n".ljust(512, b"\0"), "malformed"),
    ({"GNU.sparse.size": "10", "GNU.sparse.map": "0,5,3,2"}, b"1234567", "overlapping"),
    ({"GNU.sparse.size": "10", "GNU.sparse.numblocks": "3", "GNU.sparse.map": "0,5"}, b"12345", "numblocks"),
    ({"GNU.sparse.major": "2", "GNU.sparse.minor": "0"}, b"", "unknown pax sparse"),
    ({"size": "-1"}, b"", "not a valid size"),
    ({"mtime": "yesterday"}, b"", "mtime"),
])
def test_malformed_pax_raises_archive_error(records: dict[str, str], body: bytes, message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        tar.read_member(io.BytesIO(_pax(records, body)))


def test_oversized_and_truncated_metadata() -> None:
    header = bytearray(tar.pack_member("././@LongLink", tar.MAX_METADATA + 1))
    header[156:157] = b"L"
    with pytest.raises(ArchiveError, match="extension header"):
        tar.read_member(io.BytesIO(_rechecksummed(header)))
    with pytest.raises(ArchiveError, match="truncated"):
        tar.read_member(io.BytesIO(tar.pack_member("n" * 200, 10)[:700]))
    with pytest.raises(ArchiveError, match="before its member"):
        tar.read_member(io.BytesIO(tar.pack_member("n" * 200, 10)[:1024] + tar.END_OF_ARCHIVE))
    with pytest.raises(ArchiveError, match="truncated"):
        stream = io.BytesIO(tar.pack_member("x", 1000) + b"short")
        tar.skip_data(stream, tar.read_member(stream))
    assert tar.read_member(io.BytesIO(b"")) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_headers_raise_only_archive_error(data: st.DataObject) -> None:
    content = bytes(range(256)) * 40
    archive = bytearray(archive_of("m" * 110, content, [(0, 600), (2000, 1000), (5000, 3), (6000, 4000)]))
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, 3 * 512 - 1))
        archive[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # mostly past the checksum, to reach the fields
        for start in range(0, 2048, 512):
            if archive[start + 257 : start + 262] == b"ustar":
                archive[start : start + 512] = _rechecksummed(archive[start : start + 512])
    stream = io.BytesIO(bytes(archive))
    try:
        while (member := tar.read_member(stream)) is not None:
            assert 0 <= member.stored_size and 0 <= member.size
            if member.sparse_map is not None:
                assert sum(n for _, n in member.sparse_map) == member.stored_size
                assert all(o + n <= member.size for o, n in member.sparse_map)
            tar.skip_data(stream, member)
    except ArchiveError:
        pass
