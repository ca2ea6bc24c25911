"""The NTFS driver against volumes that ntfs-3g built.

The oracle: mkntfs makes the volume, ntfs-3g (FUSE, the GPL driver, used here and only here) writes
a tree into it that is also written to a host directory, and ntfsinfo says what the image holds
(record numbers, runlists, attribute lists, file attributes). The driver must read back exactly the
host tree, and only its own errors may escape on a damaged image.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest

from diskimg import open_image
from diskimg.errors import CorruptImage, DiskImageError, UnsupportedFormat
from diskimg.inspection.fs import FileType, open_filesystem
from diskimg.inspection.fs.ntfs import NtfsFileSystem, parse_boot_sector

from .support.digests import sha256_stream
from .support.disks import BytesDisk, copy_in, sfdisk
from .support.files import blank, read_at, write_at
from .support.filesystems import mkntfs, need_ntfs_tools, ntfs3g, ntfsinfo, ntfsinfo_attributes, ntfsinfo_runs
from .support.fs_compare import assert_tree_equal
from .support.tools import qemu_img, run
from .support.units import MiB


def ntfsinfo_field(text: str, name: str) -> int:
    match = re.search(rf"^\s*{re.escape(name)}:?\s+(\d+)", text, re.M)
    assert match, f"ntfsinfo says nothing of {name!r}"
    return int(match.group(1))






# -- the tree written both to the host and into the volume ---------------------------------------------


def _write_backwards(path: Path, rng: random.Random, pieces: int, piece: int) -> None:
    """A file written from its end to its start, each piece allocated at once: its runs come out of
    order on the volume (negative LCN deltas in its runlist)."""
    data = [rng.randbytes(piece) for _ in range(pieces)]
    with open(path, "wb", buffering=0) as f:
        for index in reversed(range(pieces)):
            f.seek(index * piece)
            f.write(data[index])
            os.fsync(f.fileno())


def populate(root: Path, large: int = 3 * MiB) -> None:
    """A Windows-shaped tree with everything the driver has to get right; the same bytes each call."""
    rng = random.Random(20261122)
    _write_backwards(root / "fragmented.bin", rng, 8, 256 << 10)
    _write_backwards(root / "many-runs.bin", rng, 300, 4096)  # a runlist too long for one MFT record
    config = root / "Windows" / "System32" / "config"
    drivers = root / "Windows" / "System32" / "drivers"
    config.mkdir(parents=True)
    drivers.mkdir(parents=True)
    (config / "SYSTEM").write_bytes(rng.randbytes(large))
    (config / "SOFTWARE").write_bytes(rng.randbytes(300))  # small enough to be resident in its MFT record
    (drivers / "viostor.sys").write_bytes(rng.randbytes(61234))
    (drivers / "tiny.sys").write_bytes(b"MZ")
    deep = root / "Program Files" / "Common Files" / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_text("at the bottom\n")
    (root / "empty").write_bytes(b"")
    (root / "$Recycle.Bin").mkdir()
    (root / "Ünïcødé ファイル.txt").write_text("unicode names\n", encoding="utf-8")
    many = root / "many"
    many.mkdir()
    for index in range(150):  # several INDX records, a B+tree two levels deep
        (many / f"entry number {index:04d} with a long name.txt").write_bytes(rng.randbytes(rng.randrange(0, 3000)))
    shrunk = root / "shrunk"
    shrunk.mkdir()
    for index in range(300):  # a large index, then almost all of it deleted: stale INDX records on disk
        (shrunk / f"gone {index:04d} name padding padding padding.dat").write_bytes(b"x")
    for index in range(300):
        if index % 97:
            (shrunk / f"gone {index:04d} name padding padding padding.dat").unlink()
    with open(root / "sparse.bin", "wb") as f:  # a hole, data, a hole to the end
        f.seek(2 * MiB)
        f.write(rng.randbytes(5000))
        f.truncate(3 * MiB + 123)
    links = root / "links"
    links.mkdir()
    (links / "original.txt").write_bytes(rng.randbytes(4000))
    for index in range(120):  # more names than an MFT record holds: an $ATTRIBUTE_LIST, itself non-resident
        os.link(links / "original.txt", links / f"another name for the very same file, number {index:03d}.txt")
    os.symlink("../Windows/System32/config", root / "links" / "to-config")
    os.symlink("nowhere/at all", root / "dangling")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 64 MiB volume with 4 KiB clusters holding ``populate``'s tree, and that tree on the host."""
    need_ntfs_tools()
    base = tmp_path_factory.mktemp("ntfs")
    host = base / "host"
    host.mkdir()
    populate(host)
    image = mkntfs(base / "volume.img", 64 * MiB, 4096)
    with ntfs3g(image, base / "mnt") as mounted:
        populate(mounted)
    return image, host


class PreadDisk:
    """A disk file kept open (support.disks's FileDisk opens the file for every read)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def __del__(self) -> None:
        os.close(self.fd)


def open_volume(image: Path) -> NtfsFileSystem:
    return NtfsFileSystem(PreadDisk(image), 0, image.stat().st_size)


def host_entries(root: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


# -- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [512, 4096, 65536, 131072, 2 * MiB])
def test_boot_sector_geometry_as_ntfsinfo_reports_it(tmp_path: Path, cluster: int) -> None:
    need_ntfs_tools()
    image = mkntfs(tmp_path / "v.img", 64 * MiB, cluster)
    info = ntfsinfo(image, "-m")
    boot = parse_boot_sector(read_at(image, 0, 512))
    assert boot.bytes_per_sector == ntfsinfo_field(info, "Sector Size") == 512
    assert boot.cluster_size == ntfsinfo_field(info, "Cluster Size") == cluster
    assert boot.mft_record_size == ntfsinfo_field(info, "MFT Record Size")
    assert boot.index_record_size == ntfsinfo_field(info, "Index Block Size")
    assert boot.mft_lcn == ntfsinfo_field(info, "LCN of Data Attribute for FILE_MFT")
    assert open_volume(image).listdir("/") == []


@pytest.mark.parametrize(("sector", "cluster"), [(512, 512), (512, 4096), (512, 131072), (4096, 4096)])
def test_tree_reads_back_as_written(tmp_path: Path, sector: int, cluster: int) -> None:
    """Every cluster size encoding, 4 KiB sectors (and then 4 KiB MFT records) too."""
    need_ntfs_tools()
    host = tmp_path / "host"
    host.mkdir()
    populate(host, large=2 * MiB)
    image = mkntfs(tmp_path / "v.img", 128 * MiB, cluster, sector)
    with ntfs3g(image, tmp_path / "mnt") as mounted:
        populate(mounted, large=2 * MiB)
    fs = open_volume(image)
    assert fs.type == "ntfs" and fs.case_insensitive
    assert assert_tree_equal(fs, host, check_mode=False) == host_entries(host) > 180
    # what the tree was meant to exercise is really in the image (as ntfsinfo sees it)
    lcns = [lcn for _, lcn, _ in ntfsinfo_runs(image, "/fragmented.bin") if lcn is not None]
    assert len(lcns) > 1 and any(later < earlier for earlier, later in itertools.pairwise(lcns)), lcns
    assert "$INDEX_ALLOCATION" in ntfsinfo_attributes(image, "/many")
    assert re.search(r"Resident:\s+Yes", ntfsinfo_attributes(image, "/Windows/System32/config/SOFTWARE")["$DATA"][0])
    attribute_list = ntfsinfo_attributes(image, "/links/original.txt")["$ATTRIBUTE_LIST"][0]
    assert re.search(r"Resident:\s+No", attribute_list)


def test_windows_paths_case_insensitive_and_in_pieces(built: tuple[Path, Path]) -> None:
    image, host = built
    fs = open_volume(image)
    expected = (host / "Windows/System32/config/SYSTEM").read_bytes()
    assert fs.stat("/windows/SYSTEM32/Config/system").size == len(expected)
    pieces = list(fs.iter_file("Windows/System32/config/SYSTEM", chunk=100_000))
    assert max(len(piece) for piece in pieces) <= 100_000
    assert b"".join(pieces) == expected
    assert fs.read_file("/WINDOWS/system32/DRIVERS/VIOSTOR.SYS") == (host / "Windows/System32/drivers/viostor.sys"
                                                                      ).read_bytes()
    assert fs.exists("/Windows/System32/drivers/viostor.sys")
    assert not fs.exists("/Windows/System32/drivers/vioscsi.sys")
    assert not fs.exists("/many/entry number 9999 with a long name.txt")
    # indexed lookup and listing agree for every name of a large directory
    names = fs.listdir("/many")
    assert len(names) == 150
    for name in names:
        assert fs.stat(f"/many/{name.upper()}").size == (host / "many" / name).stat().st_size
    # metafiles are not files of the guest; "$Recycle.Bin" is
    root = fs.listdir("/")
    assert "$Recycle.Bin" in root and not {"$MFT", "$Bitmap", "$Extend", "$UpCase", "."} & set(root)
    assert not fs.exists("/$MFT") and fs.is_dir("/$recycle.bin")
    # names deleted from a shrunk directory are still in its INDX records on disk, but not listed
    volume = image.read_bytes()
    blocks = [volume[match.start() : match.start() + 4096] for match in re.finditer(b"INDX", volume)]
    assert any(f"gone {index:04d} ".encode("utf-16-le") in block for index in range(300) if index % 97
               for block in blocks)
    assert sorted(fs.listdir("/shrunk")) == sorted(os.listdir(host / "shrunk"))
    # a symbolic link (ntfs-3g writes Interix links) is followed inside the guest
    assert fs.stat("/links/to-config/SYSTEM").size == len(expected)
    assert fs.stat("/dangling", follow_symlinks=False).type is FileType.SYMLINK
    assert fs.stat("/links/original.txt").nlink == (host / "links" / "original.txt").stat().st_nlink == 121


def test_sparse_and_fragmented_files(built: tuple[Path, Path]) -> None:
    image, host = built
    fs = open_volume(image)
    pieces = ntfsinfo_attributes(image, "/many-runs.bin")
    assert len(pieces["$DATA"]) > 1 and "$ATTRIBUTE_LIST" in pieces  # $DATA in several MFT records
    assert fs.read_file("/many-runs.bin") == (host / "many-runs.bin").read_bytes()
    runs = ntfsinfo_runs(image, "/sparse.bin")
    assert any(lcn is None for _, lcn, _ in runs), runs  # ntfs-3g did leave holes
    data_attribute = ntfsinfo_attributes(image, "/sparse.bin")["$DATA"][0]
    assert ntfsinfo_field(data_attribute, "Initialized size") < ntfsinfo_field(data_attribute, "Data size")
    assert fs.read_file("/sparse.bin") == (host / "sparse.bin").read_bytes()
    assert "sparse" in fs.stat("/sparse.bin").flags
    data = (host / "fragmented.bin").read_bytes()
    for offset, length in [(0, 1), (12287, 2), (100_000, 300_000), (len(data) - 5, 5)]:
        node = fs.resolve("/fragmented.bin")
        assert fs._read(node, offset, length) == data[offset : offset + length]


def _mft_record_offset(image: Path, path: str) -> tuple[int, int]:
    """(offset of the MFT record of ``path`` in the image, its number), from ntfsinfo alone."""
    number = int(re.search(r"Dumping Inode (\d+)", ntfsinfo(image, "-F", path)).group(1))
    info = ntfsinfo(image, "-m")
    offset = (ntfsinfo_field(info, "LCN of Data Attribute for FILE_MFT") * ntfsinfo_field(info, "Cluster Size")
              + number * ntfsinfo_field(info, "MFT Record Size"))
    record = read_at(image, offset, 48)
    assert record[:4] == b"FILE" and struct.unpack_from("<I", record, 44)[0] == number  # the first MFT run
    return offset, number


def _patch_file_attributes(image: Path, path: str, bits: int) -> None:
    """OR ``bits`` into the file attributes of $STANDARD_INFORMATION (the first attribute of a record)."""
    offset, _ = _mft_record_offset(image, path)
    record = read_at(image, offset, 1024)
    first = struct.unpack_from("<H", record, 20)[0]
    assert struct.unpack_from("<I", record, first)[0] == 0x10
    value = first + struct.unpack_from("<H", record, first + 20)[0]
    assert value + 36 < 510  # clear of the update sequence fixup at the end of the first sector
    flags = struct.unpack_from("<I", record, value + 32)[0]
    write_at(image, offset + value + 32, struct.pack("<I", flags | bits))


def test_file_attributes_from_standard_information(built: tuple[Path, Path], tmp_path: Path) -> None:
    source, host = built
    image = tmp_path / "patched.img"
    run("cp", "--sparse=always", source, image)
    _patch_file_attributes(image, "/Windows/System32/drivers/viostor.sys", 0x1)  # READONLY
    _patch_file_attributes(image, "/Windows/System32/config/SOFTWARE", 0x2 | 0x4)  # HIDDEN | SYSTEM
    _patch_file_attributes(image, "/empty", 0x4000)  # ENCRYPTED, as EFS marks a file
    _patch_file_attributes(image, "/Windows/System32/drivers/tiny.sys", 0x4000)
    assert "READONLY" in ntfsinfo(image, "-F", "/Windows/System32/drivers/viostor.sys")
    assert re.search(r"File attributes:.*HIDDEN SYSTEM", ntfsinfo(image, "-F", "/Windows/System32/config/SOFTWARE"))
    fs = open_volume(image)
    viostor = fs.stat("/Windows/System32/drivers/viostor.sys")
    assert "readonly" in viostor.flags and not {"hidden", "system"} & viostor.flags
    assert {"hidden", "system"} <= fs.stat("/Windows/System32/config/SOFTWARE").flags
    assert "readonly" not in fs.stat("/Windows/System32/config/SOFTWARE").flags
    assert fs.read_file("/Windows/System32/drivers/viostor.sys") == (
        host / "Windows/System32/drivers/viostor.sys").read_bytes()
    assert "encrypted" in fs.stat("/Windows/System32/drivers/tiny.sys").flags
    with pytest.raises(UnsupportedFormat, match=r"tiny.sys.*encrypted"):
        fs.read_file("/Windows/System32/drivers/tiny.sys")


def _reparse(tag: int, target: str, relative: bool | None) -> bytes:
    """A reparse buffer (symlink when ``relative`` is not None, else a junction) naming ``target`` twice."""
    substitute = (target if relative else "\\??\\" + target).encode("utf-16-le")
    printed = target.encode("utf-16-le")
    body = struct.pack("<HHHH", 0, len(substitute), len(substitute), len(printed))
    if relative is not None:
        body += struct.pack("<I", 1 if relative else 0)
    body += substitute + printed
    return struct.pack("<IHH", tag, len(body), 0) + body


def test_reparse_points_dos_names_and_compression(tmp_path: Path) -> None:
    need_ntfs_tools()
    image = mkntfs(tmp_path / "v.img", 32 * MiB, 4096)
    text = b"compressible text, again and again. " * 9000
    with ntfs3g(image, tmp_path / "mnt") as mounted:
        (mounted / "Windows" / "Temp").mkdir(parents=True)
        (mounted / "Windows" / "Temp" / "note.txt").write_bytes(b"through a junction")
        try:
            (mounted / "Documents and Settings").mkdir()
            os.setxattr(mounted / "Documents and Settings", "system.ntfs_reparse_data",
                        _reparse(0xA0000003, "C:\\Windows", None))
            (mounted / "abs-link").write_bytes(b"")
            os.setxattr(mounted / "abs-link", "system.ntfs_reparse_data",
                        _reparse(0xA000000C, "C:\\Windows\\Temp", False))
            (mounted / "rel-link").write_bytes(b"")
            os.setxattr(mounted / "rel-link", "system.ntfs_reparse_data", _reparse(0xA000000C, "Windows\\Temp", True))
            (mounted / "other-drive").write_bytes(b"")
            os.setxattr(mounted / "other-drive", "system.ntfs_reparse_data", _reparse(0xA000000C, "D:\\data", False))
            (mounted / "A rather long file name.text").write_bytes(b"long")
            os.setxattr(mounted / "A rather long file name.text", "system.ntfs_dos_name", b"ARATHE~1.TEX")
            (mounted / "packed").mkdir()
            os.setxattr(mounted / "packed", "system.ntfs_attrib_be", struct.pack(">I", 0x10 | 0x800))
        except OSError as exc:
            pytest.skip(f"this ntfs-3g does not take the extended attributes used here: {exc}")
        (mounted / "packed" / "text").write_bytes(text)
        (mounted / "packed" / "noise").write_bytes(random.Random(1).randbytes(150_000))
        (mounted / "packed" / "mixed").write_bytes(text[:70_000] + random.Random(2).randbytes(70_000) + bytes(300_000))
        os.utime(mounted / "packed" / "text", ns=(1_600_000_000_123_456_700, 1_500_000_000_987_654_300))
        mtimes = {name: (mounted / name).stat().st_mtime_ns for name in ("packed/text", "packed/noise", "Windows")}
    assert "COMPRESSED" in ntfsinfo(image, "-F", "/packed/text")
    assert any(lcn is None for _, lcn, _ in ntfsinfo_runs(image, "/packed/text"))  # compressed units do save space
    fs = open_volume(image)
    assert fs.readlink("/Documents and Settings") == "/Windows"
    assert fs.readlink("/abs-link") == "/Windows/Temp"
    assert fs.readlink("/rel-link") == "Windows/Temp"
    assert fs.read_file("/Documents and Settings/Temp/note.txt") == b"through a junction"
    assert fs.read_file("/abs-link/note.txt") == fs.read_file("/rel-link/note.txt") == b"through a junction"
    assert fs.stat("/other-drive", follow_symlinks=False).type is FileType.OTHER
    # the 8.3 alias is a name of the file for Windows, but not a second entry of the directory
    listed = fs.listdir("/")
    assert "A rather long file name.text" in listed and "ARATHE~1.TEX" not in listed
    assert "ARATHE~1.TEX" in ntfsinfo(image, "-F", "/A rather long file name.text")  # ntfs-3g did write it
    assert fs.read_file("/arathe~1.tex") == b"long"
    # LZNT1
    assert "compressed" in fs.stat("/packed/text").flags
    assert fs.read_file("/packed/text") == text
    assert fs.read_file("/packed/noise") == random.Random(1).randbytes(150_000)
    assert fs.read_file("/packed/mixed") == text[:70_000] + random.Random(2).randbytes(70_000) + bytes(300_000)
    # modification times: $STANDARD_INFORMATION's, as ntfs-3g reports them
    assert mtimes["packed/text"] == 1_500_000_000_987_654_300
    for name, mtime in mtimes.items():
        assert abs(fs.stat(name).mtime - mtime / 1e9) < 1e-6, name  # a float holds about 0.2 us here
    # on a volume that is not drive C:, an absolute link to C: leaves the volume
    other = NtfsFileSystem(PreadDisk(image), 0, image.stat().st_size, drive_letter="D")
    assert other.stat("/abs-link", follow_symlinks=False).type is FileType.OTHER
    assert other.readlink("/rel-link") == "Windows/Temp"


@pytest.mark.parametrize("fmt", ["qcow2", "vpc"])
def test_partition_of_an_image_through_open_filesystem(built: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    if shutil.which("qemu-img") is None or shutil.which("sfdisk") is None:
        pytest.skip("qemu-img or sfdisk not installed")
    volume, host = built
    disk = blank(tmp_path / "disk.raw", 66 * MiB)
    sfdisk(disk, "label: dos\nstart=2048, size=131072, type=7\n")
    copy_in(disk, volume, MiB)
    image = tmp_path / f"disk.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, disk, image)
    with open_image(image) as reader:
        fs = open_filesystem(reader, MiB, 64 * MiB)
        assert isinstance(fs, NtfsFileSystem)
        assert assert_tree_equal(fs, host, check_mode=False) == host_entries(host) > 180
        assert sha256_stream(fs.iter_file("/Windows/System32/config/SYSTEM")) == hashlib.sha256(
            (host / "Windows/System32/config/SYSTEM").read_bytes()).hexdigest()


def _fill(path: Path, piece: int) -> None:
    """Write ``path`` until the volume is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\1" * piece)
        except OSError:
            pass


def _new_files(mounted: Path, host: Path, count: int) -> None:
    """Empty files d/0, d/1, ... in both trees, as many as the volume takes (up to ``count``)."""
    (mounted / "d").mkdir()
    (host / "d").mkdir()
    for index in range(count):
        try:
            (mounted / "d" / f"{index}").write_bytes(b"")
        except OSError:
            break
        (host / "d" / f"{index}").write_bytes(b"")


def test_fragmented_mft(tmp_path: Path) -> None:
    """A full volume, then many new files: $MFT grows into the clusters a deleted file freed."""
    need_ntfs_tools()
    image = mkntfs(tmp_path / "v.img", 12 * MiB, 4096)
    host = tmp_path / "host"
    host.mkdir()
    with ntfs3g(image, tmp_path / "mnt") as mounted:
        (mounted / "early").write_bytes(b"\2" * MiB)
        _fill(mounted / "filler", 65536)
        (host / "filler").write_bytes(b"\1" * (mounted / "filler").stat().st_size)
        (mounted / "early").unlink()
        _new_files(mounted, host, 1500)
    assert "Total runs: 1 " not in ntfsinfo(image, "-v", "-i", "0").split("Dumping attribute $DATA")[1]
    assert assert_tree_equal(open_volume(image), host, check_mode=False) == host_entries(host) > 500


@pytest.mark.slow
def test_mft_with_an_attribute_list(tmp_path: Path) -> None:
    """Free space left only in one-cluster holes, then thousands of new files: $MFT grows in hundreds
    of pieces, more runs than its record 0 holds, so its own $DATA continues in an extension record."""
    need_ntfs_tools()
    image = mkntfs(tmp_path / "v.img", 16 * MiB, 4096)
    host = tmp_path / "host"
    (host / "holes").mkdir(parents=True)
    with ntfs3g(image, tmp_path / "mnt") as mounted:
        _fill(mounted / "filler", 65536)  # the MFT zone too; then all of it freed again
        (mounted / "filler").unlink()
        (mounted / "holes").mkdir()
        written = 0
        try:
            while True:  # one cluster each, until the volume is full
                (mounted / "holes" / f"{written}").write_bytes(b"h" * 4096)
                written += 1
        except OSError:
            (mounted / "holes" / f"{written}").unlink(missing_ok=True)  # cut short by the full volume
        for index in range(written):
            if index % 2 == 0:
                (mounted / "holes" / f"{index}").unlink()
            else:
                (host / "holes" / f"{index}").write_bytes(b"h" * 4096)
        _new_files(mounted, host, 6000)
    dumps = ntfsinfo(image, "-v", "-i", "0")
    assert "Dumping attribute $ATTRIBUTE_LIST" in dumps
    assert len(re.findall(r"Dumping attribute \$DATA", dumps)) > 1  # $MFT's $DATA in several records
    assert assert_tree_equal(open_volume(image), host, check_mode=False) == host_entries(host) > 5000


def test_torn_record_is_corruption(built: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = built
    image = tmp_path / "torn.img"
    run("cp", "--sparse=always", source, image)
    offset, _number = _mft_record_offset(image, "/Windows/System32/drivers/viostor.sys")
    write_at(image, offset + 510, b"\xde\xad")  # the update sequence check value of its first sector
    fs = open_volume(image)
    with pytest.raises(CorruptImage, match="update sequence") as caught:
        fs.stat("/Windows/System32/drivers/viostor.sys")
    assert caught.value.offset == offset + 510


def _metadata_ranges(image: bytes) -> list[tuple[int, int]]:
    """Where the volume's metadata lies, found without the driver: the boot sector, the first MFT
    records (from the boot sector's own fields) and every INDX record (by its magic)."""
    cluster = struct.unpack_from("<H", image, 11)[0] * image[13]
    mft = struct.unpack_from("<Q", image, 0x30)[0] * cluster
    ranges = [(0, 512), (mft, 128 * 1024)]
    ranges += [(match.start(), 4096) for match in re.finditer(b"INDX", image) if match.start() % 512 == 0]
    return ranges


def _walk_everything(fs: NtfsFileSystem) -> None:
    for path, info in fs.walk("/"):
        if info.is_file:
            for _ in fs.iter_file(path):
                pass
        elif info.is_symlink:
            fs.readlink(path)
    fs.exists("/Windows/System32/config/SYSTEM")


def test_damaged_metadata_raises_only_diskimage_errors(tmp_path: Path) -> None:
    need_ntfs_tools()
    host = tmp_path / "host"
    host.mkdir()
    image = mkntfs(tmp_path / "small.img", 8 * MiB, 4096)
    with ntfs3g(image, tmp_path / "mnt") as mounted:
        for root in (host, mounted):
            (root / "Windows" / "System32" / "config").mkdir(parents=True)
            (root / "Windows" / "System32" / "config" / "SYSTEM").write_bytes(bytes(range(256)) * 300)
            (root / "dir").mkdir()
            for index in range(60):
                (root / "dir" / f"file {index} of a directory with INDX records").write_bytes(b"%d" % index)
            os.symlink("../Windows", root / "dir" / "link")
            for index in range(20):  # an $ATTRIBUTE_LIST
                os.link(root / "dir" / "file 0 of a directory with INDX records", root / "dir" / f"hard link {index}")
            (root / "packed").mkdir()
        try:  # and LZNT1, where this ntfs-3g takes the attribute
            os.setxattr(mounted / "packed", "system.ntfs_attrib_be", struct.pack(">I", 0x10 | 0x800))
        except OSError:
            pass
        for root in (host, mounted):
            (root / "packed" / "text").write_bytes(b"all work and no play " * 1500)
    pristine = image.read_bytes()
    assert_tree_equal(NtfsFileSystem(BytesDisk(pristine), 0, len(pristine)), host, check_mode=False)
    ranges = _metadata_ranges(pristine)
    rng = random.Random(7)
    outcomes = {"ok": 0, "error": 0}

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError("walking a damaged volume took more than 10 s: a loop?")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    try:
        for _ in range(200):
            damaged = bytearray(pristine)
            start, length = rng.choice(ranges)
            for _ in range(rng.choice((1, 1, 2, 4, 16))):
                position = start + rng.randrange(length)
                damaged[position] = 0 if rng.random() < 0.3 else rng.randrange(256)
            signal.alarm(10)
            try:
                fs = NtfsFileSystem(BytesDisk(bytes(damaged)), 0, len(damaged))
                _walk_everything(fs)
                outcomes["ok"] += 1
            except DiskImageError:
                outcomes["error"] += 1
            finally:
                signal.alarm(0)
            if time.monotonic() - started > 20:
                break
    finally:
        signal.signal(signal.SIGALRM, previous or signal.SIG_DFL)
    assert outcomes["ok"] and outcomes["error"], outcomes
