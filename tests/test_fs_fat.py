"""The FAT driver (diskimg/fs/fat.py) against volumes made by mkfs.fat and mtools.

The oracle is the host tree each volume was built from (tests/support/fs_compare.py), mtools' own listing
(mdir) for short names, and structures located in the image independently of the driver (the BPB
read here with struct) for the corruption cases.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest

import diskimg
from diskimg.errors import CorruptImage
from diskimg.inspection.fs import GuestPathError, open_filesystem
from diskimg.inspection.fs.fat import FatFileSystem, find_efi_loaders

from .support.disks import FileDisk, copy_in, sgdisk
from .support.files import blank, read_at, write_at
from .support.filesystems import make_fat
from .support.fs_compare import assert_tree_equal
from .support.tools import run
from .support.units import MiB

TOOLS = ("mkfs.fat", "mcopy", "mdel", "mattrib", "mdir")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)}")

#: (FAT bits, volume size in KiB): small enough to be quick, big enough for mkfs.fat to accept the type
VOLUMES = {12: 8192, 16: 16384, 32: 36000}
#: an odd number of seconds: FAT keeps two-second steps
MTIME = 1_700_000_001

SIZES = {"empty": 0, "one": 1, "s511": 511, "s512": 512, "s513": 513, "big.bin": 3 * MiB + 123}
MANY = 300


@pytest.fixture(autouse=True)
def _mtools_env(monkeypatch):
    # mtools writes local time and encodes long names from the locale
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("MTOOLS_SKIP_CHECK", "1")


def build_tree(root: Path) -> Path:
    rng = random.Random(6)
    root.mkdir()
    for name, text in (("readme.txt", b"lower-case 8.3\n"), ("lower", b"no extension\n"), ("UPPER.TXT", b"UP\n"),
                       ("Mixed.Txt", b"mixed\n"), ("A long name.txt", b"long\n"),
                       ("\u00dcn\u00efc\u00f6d\u00e9 \u30d5\u30a1\u30a4\u30eb.txt", b"unicode\n")):
        (root / name).write_bytes(text)
    sizes = root / "sizes"
    sizes.mkdir()
    for name, size in SIZES.items():
        (sizes / name).write_bytes(rng.randbytes(size))
    deep = root / "nested" / "Level One" / "level2" / "THREE"
    deep.mkdir(parents=True)
    (deep / "deep file.txt").write_bytes(b"deep\n" * 1000)
    many = root / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"entry number {i:03d} with a long name.txt").write_bytes(f"{i}\n".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME))
    return root


def open_fat(image: Path) -> FatFileSystem:
    return FatFileSystem(FileDisk(image), 0, image.stat().st_size)


def short_names(image: Path, directory: str = "::") -> dict[str, str]:
    """Long name -> 8.3 alias, as mdir lists them ("ALONGN~1 TXT   5 date time  A long name.txt")."""
    listing = run("mdir", "-i", image, directory).stdout.decode()
    found = {}
    for line in listing.splitlines():
        match = re.match(r"^(\S{1,8}) +(\S{0,3}) +(?:<DIR>|\d+) +\S+ +\S+ +(.+)$", line)
        if match:
            base, ext, long_name = match.groups()
            found[long_name] = f"{base}.{ext}" if ext else base
    return found


# -- the BPB and directory entries, located without the driver (for the corruption tests) -----------


class Layout:
    """A FAT16 volume's regions from its boot sector."""

    def __init__(self, image: Path) -> None:
        self.image = image
        boot = read_at(image, 0, 512)
        bps, self.spc, reserved, fats, root_entries, _, _, fat_size = struct.unpack_from("<HBHBHHBH", boot, 11)
        self.bps = bps
        self.fat = reserved * bps
        root = self.fat + fats * fat_size * bps
        self.data = root + root_entries * 32
        self.copies = [self.fat + k * fat_size * bps for k in range(fats)]

    def entry(self, short: bytes) -> int:
        """The image offset of the directory entry with this 11-byte short name."""
        data = self.image.read_bytes()
        at = data.find(short)
        while at % 32:
            at = data.find(short, at + 1)
        assert at > 0, short
        return at

    def first_cluster(self, short: bytes) -> int:
        return struct.unpack_from("<H", read_at(self.image, self.entry(short) + 26, 2))[0]

    def next(self, cluster: int) -> int:
        return struct.unpack_from("<H", read_at(self.image, self.fat + 2 * cluster, 2))[0]

    def link(self, cluster: int, value: int) -> None:
        for copy in self.copies:
            write_at(self.image, copy + 2 * cluster, struct.pack("<H", value))


# -- reading what mtools wrote ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("fat") / "tree")


@pytest.mark.parametrize("bits", sorted(VOLUMES))
def test_volume_reads_as_the_tree_it_was_built_from(tmp_path, tree, bits):
    image = make_fat(tmp_path / "fat.img", tree, bits, VOLUMES[bits], label="TESTVOL", keep_times=True)
    fs = open_fat(image)
    assert fs.type == f"fat{bits}"
    # root: 6 files, sizes/, nested/ and its 4 levels, many/
    assert assert_tree_equal(fs, tree, check_mode=False) == 6 + 1 + len(SIZES) + 5 + 1 + MANY
    # the volume label mkfs.fat wrote is not a file; '.' and '..' are not listed
    assert "TESTVOL" not in fs.listdir("/") and "." not in fs.listdir("/nested")
    # premise: the directory of several hundred long names (3 pieces + the short entry each) spans clusters
    bps, spc = struct.unpack_from("<HB", read_at(image, 11, 3))
    assert MANY * 4 * 32 > 8 * bps * spc
    stat = fs.stat("/sizes/s513")
    assert stat.mode is None and stat.mtime == MTIME - MTIME % 2 and not stat.flags - {"archive"}
    assert fs.stat("/nested/Level One").is_dir
    # reads in pieces that straddle cluster boundaries
    host = (tree / "sizes" / "big.bin").read_bytes()
    assert b"".join(fs.iter_file("/sizes/big.bin", chunk=fs.cluster_size + 7)) == host
    node = fs.resolve("/sizes/big.bin")
    for offset in (0, 1, fs.cluster_size - 1, fs.cluster_size, len(host) - 5, len(host)):
        assert fs._read(node, offset, 3 * fs.cluster_size) == host[offset : offset + 3 * fs.cluster_size]


def test_names_case_flags_and_short_aliases(tmp_path, tree):
    image = make_fat(tmp_path / "fat.img", tree, 16, VOLUMES[16], label="TESTVOL", keep_times=True)
    raw = image.read_bytes()
    # premise: mtools kept "readme.txt" as a bare 8.3 entry with the NT lower-case flags
    at = raw.find(b"README  TXT")
    assert at % 32 == 0 and raw[at + 12] == 0x18 and raw[at - 32 + 11] != 0x0F
    fs = open_fat(image)
    assert {"readme.txt", "lower", "UPPER.TXT", "Mixed.Txt", "A long name.txt"} <= set(fs.listdir("/"))
    # lookups ignore case and accept the 8.3 alias mtools gave each long name
    aliases = short_names(image)
    assert fs.read_file("/a LONG name.TXT") == b"long\n"
    assert fs.read_file("/" + aliases["A long name.txt"]) == b"long\n"
    assert fs.read_file("/NESTED/level one/LEVEL2/three/DEEP FILE.TXT") == b"deep\n" * 1000
    with pytest.raises(GuestPathError):
        fs.read_file("/missing.txt")
    with pytest.raises(GuestPathError):
        fs.readlink("/readme.txt")


def test_deleted_entries_fragmented_files_and_attributes(tmp_path):
    rng = random.Random(7)
    image = tmp_path / "frag.img"
    run("mkfs.fat", "-F", "12", "-n", "FRAG", "-C", image, str(VOLUMES[12]))
    small = tmp_path / "small"
    small.mkdir()
    for i in range(30):
        (small / f"piece {i:02d}.bin").write_bytes(rng.randbytes(5000))
    run("mcopy", "-s", "-i", image, small, "::/small")
    for i in range(0, 30, 2):
        run("mdel", "-i", image, f"::/small/piece {i:02d}.bin")
        (small / f"piece {i:02d}.bin").unlink()
    big = tmp_path / "big.bin"
    big.write_bytes(rng.randbytes(300_000))
    run("mcopy", "-i", image, big, "::/big.bin")
    run("mattrib", "-i", image, "+r", "::/big.bin")
    run("mattrib", "-i", image, "+h", "+s", "::/small/piece 01.bin")
    fs = open_fat(image)
    starts, runs = fs._file_runs(fs.resolve("/big.bin"))
    assert len(runs) > 5  # premise: mtools filled the holes the deletions left
    assert fs.read_file("/big.bin") == big.read_bytes()
    assert assert_tree_equal(fs, small, "/small", check_mode=False) == 15
    assert {"readonly"} <= fs.stat("/big.bin").flags and not {"hidden", "system"} & fs.stat("/big.bin").flags
    assert {"hidden", "system"} <= fs.stat("/small/piece 01.bin").flags
    assert "readonly" not in fs.stat("/small/piece 01.bin").flags
    assert not {"readonly", "hidden", "system"} & fs.stat("/small/piece 03.bin").flags


def test_esp_loaders_and_a_qcow2_gpt_disk(tmp_path, tree):
    if shutil.which("sgdisk") is None or shutil.which("qemu-img") is None:
        pytest.skip("needs sgdisk and qemu-img")
    esp_tree = tmp_path / "esp"
    for path, content in (("EFI/BOOT/BOOTX64.EFI", b"MZ boot"), ("EFI/debian/grubx64.efi", b"MZ grub"),
                          ("EFI/debian/grub.cfg", b"search.fs_uuid\n")):
        (esp_tree / path).parent.mkdir(parents=True, exist_ok=True)
        (esp_tree / path).write_bytes(content)
    shutil.copytree(tree / "sizes", esp_tree / "sizes")
    part_size = 40 * MiB
    part = make_fat(tmp_path / "esp.img", esp_tree, 32, part_size >> 10, label="TESTVOL", keep_times=True)
    assert sorted(find_efi_loaders(FileDisk(part), 0, part_size)) == ["EFI/BOOT/BOOTX64.EFI",
                                                                     "EFI/debian/grubx64.efi"]
    disk = blank(tmp_path / "disk.raw", 64 * MiB)
    sgdisk(disk, "-n", "1:2048:+40M", "-t", "1:ef00")
    copy_in(disk, part, MiB)
    qcow2 = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, qcow2)
    with diskimg.open_image(qcow2) as reader:
        fs = open_filesystem(reader, MiB, part_size)
        assert isinstance(fs, FatFileSystem) and fs.type == "fat32"
        assert assert_tree_equal(fs, esp_tree, check_mode=False) == 6 + 1 + len(SIZES)
        assert sorted(find_efi_loaders(reader, MiB, part_size)) == ["EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi"]


# -- broken volumes: CorruptImage, never a hang or a foreign exception ---------------------------------


@pytest.fixture
def fat16(tmp_path) -> Path:
    image = tmp_path / "fat16.img"
    run("mkfs.fat", "-F", "16", "-n", "BROKEN", "-C", image, str(VOLUMES[16]))
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for i in range(200):
        (src / "many" / f"a long file name number {i:03d}.txt").write_bytes(b"x")
    (src / "loop.bin").write_bytes(random.Random(1).randbytes(10_000))
    (src / "A long name.txt").write_bytes(b"long\n")
    run("mcopy", "-s", "-i", image, *sorted(src.iterdir()), "::")
    return image


def test_file_chain_loop_is_detected(fat16):
    layout = Layout(fat16)
    first = layout.first_cluster(b"LOOP    BIN")
    layout.link(layout.next(first), first)
    with pytest.raises(CorruptImage, match="loops"):
        open_fat(fat16).read_file("/loop.bin")


def test_directory_chain_loop_is_detected(fat16):
    layout = Layout(fat16)
    first = layout.first_cluster(b"MANY       ")
    second = layout.next(first)
    assert layout.next(second) not in (0, 0xFFFF)  # premise: at least three clusters
    layout.link(layout.next(second), first)
    with pytest.raises(CorruptImage, match="loops"):
        open_fat(fat16).listdir("/many")


def test_chain_into_a_free_cluster_and_out_of_range_clusters(fat16):
    layout = Layout(fat16)
    layout.link(layout.first_cluster(b"LOOP    BIN"), 0)
    fs = open_fat(fat16)
    with pytest.raises(CorruptImage, match="free cluster"):
        fs.read_file("/loop.bin")
    write_at(fat16, layout.entry(b"MANY       ") + 26, struct.pack("<H", 0xFFF0))
    with pytest.raises(CorruptImage, match="outside"):
        open_fat(fat16).listdir("/many")


def test_chain_shorter_than_the_file_and_a_directory_past_the_format_limit(fat16, tmp_path):
    layout = Layout(fat16)
    layout.link(layout.first_cluster(b"LOOP    BIN"), 0xFFFF)  # end of chain after the first cluster
    with pytest.raises(CorruptImage, match="ends after 1 of"):
        open_fat(fat16).read_file("/loop.bin")
    # a directory whose chain is a 3 MiB file of "A"s: 32-byte entries that never end
    filler = tmp_path / "filler.bin"
    filler.write_bytes(b"A" * (3 * MiB))
    run("mcopy", "-i", fat16, filler, "::/filler.bin")
    cluster = layout.first_cluster(b"FILLER  BIN")
    write_at(fat16, layout.entry(b"MANY       ") + 26, struct.pack("<H", cluster))
    with pytest.raises(CorruptImage, match="directory longer than"):
        open_fat(fat16).listdir("/many")


def test_orphan_long_name_pieces_fall_back_to_the_short_name(fat16):
    alias = short_names(fat16)["A long name.txt"]
    layout = Layout(fat16)
    base, ext = alias.split(".")
    entry = layout.entry(f"{base:8}{ext:3}".encode())
    assert read_at(fat16, entry - 32, 12)[11] == 0x0F  # premise: a long-name piece precedes it
    checksum = read_at(fat16, entry - 32 + 13, 1)[0]
    write_at(fat16, entry - 32 + 13, bytes([checksum ^ 0xFF]))
    names = open_fat(fat16).listdir("/")
    assert alias in names and "A long name.txt" not in names


def test_not_a_fat_volume(tmp_path):
    image = blank(tmp_path / "zero.img", MiB)
    with pytest.raises(CorruptImage):
        open_fat(image)
