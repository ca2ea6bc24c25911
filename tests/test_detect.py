"""Format detection: every format made by its real producer, wrappers, RAW content, the corpus,
forced formats, and fuzzing (nothing but DiskImageError escapes detect())."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

try:  # tests as a package, or as a plain directory on sys.path
    from .support.corpus import corpus_dir, corpus_manifest, corpus_params
    from .support.tools import qemu_img, requires_qemu, run
except ImportError:
    from support.corpus import corpus_dir, corpus_manifest, corpus_params  # type: ignore[no-redef]
    from support.tools import qemu_img, requires_qemu, run  # type: ignore[no-redef]
from diskimg.detection.probe import check_forced, detect
from diskimg.errors import DiskImageError, FormatMismatch, ImageNotFound, UsageError
from diskimg.formats.probing import READABLE_FORMATS, Detection
from diskimg.formats.vmdk.structures import READ_CREATE_TYPES
from diskimg.inspection.disk_start import identify_start
from diskimg.streams.compressed import PEEK_INPUT

MiB = 1 << 20


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def qemu_format(path: Path) -> str:
    fmt = json.loads(qemu_img("info", "--output=json", path))["format"]
    return {"vpc": "vhd"}.get(fmt, fmt)


def mbr_disk(path: Path, size: int = 8 * MiB) -> Path:
    """A RAW disk with an MBR made by sfdisk, with a little data so that it compresses like one."""
    with open(path, "wb") as f:
        f.truncate(size)
    run("sfdisk", "-q", path, input=b"label: dos\n,4M,83\n,,7\n")
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(4096))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("detect")


@pytest.fixture(scope="module")
def mbr_raw(work) -> Path:
    if not have("sfdisk"):
        pytest.skip("sfdisk (fdisk package) not installed")
    return mbr_disk(work / "disk.raw")


# --- formats qemu-img makes -------------------------------------------------------------------

# (file name, qemu-img create arguments, format, subformat, qemu-img -f for the hint)
QEMU_MADE = [
    ("raw.img", ["-f", "raw"], "raw", None, None),
    ("fixed.vhd", ["-f", "vpc", "-o", "subformat=fixed"], "vhd", "fixed", None),
    ("dynamic.vhd", ["-f", "vpc", "-o", "subformat=dynamic"], "vhd", "dynamic", None),
    ("v2.qcow2", ["-f", "qcow2", "-o", "compat=0.10"], "qcow2", "v2", None),
    ("v3.qcow2", ["-f", "qcow2", "-o", "compat=1.1"], "qcow2", "v3", None),
    ("sparse.vmdk", ["-f", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk", "monolithicSparse", None),
    ("stream.vmdk", ["-f", "vmdk", "-o", "subformat=streamOptimized"], "vmdk", "streamOptimized", None),
    ("flat.vmdk", ["-f", "vmdk", "-o", "subformat=monolithicFlat"], "vmdk", "monolithicFlat", None),
    ("split.vmdk", ["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"], "vmdk", "twoGbMaxExtentSparse", None),
    ("disk.vhdx", ["-f", "vhdx"], "vhdx", "dynamic", None),
    ("fixed.vhdx", ["-f", "vhdx", "-o", "subformat=fixed"], "vhdx", "fixed", None),
    ("disk.vdi", ["-f", "vdi"], "vdi", "dynamic", None),
    ("fixed.vdi", ["-f", "vdi", "-o", "static=on"], "vdi", "fixed", None),
    ("disk.qed", ["-f", "qed"], "qed", None, "qed"),
    ("disk.qcow", ["-f", "qcow"], "qcow", None, "qcow"),
    ("disk.parallels", ["-f", "parallels"], "parallels", None, "parallels"),
]


@requires_qemu
@pytest.mark.parametrize("name,args,fmt,subformat,driver", QEMU_MADE, ids=[c[0] for c in QEMU_MADE])
def test_qemu_made_formats(work, name, args, fmt, subformat, driver):
    path = work / name
    qemu_img("create", "-q", *args, path, "64M")
    found = detect(path)
    assert found.format == fmt, found
    assert found.subformat == subformat, found
    assert found.readable == (fmt in READABLE_FORMATS)
    if driver:
        assert f"qemu-img convert -f {driver} -O qcow2" in found.hint
        assert f"diskimg convert --backend qemu-img -f {driver}" in found.hint
        assert found.description and found.description.lower().startswith(fmt[:3])
    else:
        assert found.hint is None
    if fmt == "raw":
        assert found.starts_with == "empty"
    if subformat != "fixed":  # qemu probes a fixed VHD as raw (no header at offset 0)
        assert qemu_format(path) == fmt


@requires_qemu
def test_vmdk_split_extent_and_flat_extent(work):
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", work / "big.vmdk", "3G")
    extent = detect(work / "big-s001.vmdk")
    assert (extent.format, extent.subformat) == ("vmdk", "sparseExtent")
    assert "DESCRIPTOR.vmdk" in extent.hint and "one extent" in extent.hint
    descriptor = detect(work / "big.vmdk")
    assert descriptor.subformat == "twoGbMaxExtentSparse" and descriptor.readable
    # the -flat extent of monolithicFlat is the RAW data itself
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", work / "mf.vmdk", "8M")
    assert detect(work / "mf-flat.vmdk").format == "raw"


@requires_qemu
def test_luks(work):
    path = work / "disk.luks"
    qemu_img(
        "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=x", "-o", "key-secret=s0,iter-time=50", path, "16M"
    )
    found = detect(path)
    assert (found.format, found.subformat, found.readable) == ("luks", "LUKS1", False)
    assert "cryptsetup open" in found.hint
    assert qemu_format(path) == "luks"


@requires_qemu
def test_qcow2_with_a_backing_file_is_not_followed(work):
    base = work / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    top = work / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    found = detect(top)
    assert found.format == "qcow2" and found.readable


def _vhd_checksum(footer: bytearray) -> None:
    footer[64:68] = b"\0\0\0\0"
    footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)


@requires_qemu
def test_differencing_vhd(work):
    """qemu-img cannot make one: turn a dynamic VHD into a differencing one (type 4, both footers)."""
    path = work / "diff.vhd"
    qemu_img("create", "-q", "-f", "vpc", path, "16M")
    data = bytearray(path.read_bytes())
    for offset in (0, len(data) - 512):
        footer = bytearray(data[offset : offset + 512])
        footer[60:64] = struct.pack(">I", 4)
        _vhd_checksum(footer)
        data[offset : offset + 512] = footer
    path.write_bytes(bytes(data))
    found = detect(path)
    assert (found.format, found.subformat, found.readable) == ("vhd", "differencing", True)


@requires_qemu
def test_fixed_vhd_footer_beats_a_guest_written_header(work):
    """Offset 0 of a fixed VHD is guest data: a qcow2 header there must not make it qcow2."""
    guest = work / "guest.raw"
    qemu_img("create", "-q", "-f", "qcow2", work / "evil.qcow2", "1M")
    evil = (work / "evil.qcow2").read_bytes()[:4096]
    with open(guest, "wb") as f:
        f.truncate(4 * MiB)
        f.write(evil)
    fixed = work / "guest-fixed.vhd"
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", guest, fixed)
    found = detect(fixed)
    assert (found.format, found.subformat) == ("vhd", "fixed"), found
    assert "qcow2" in found.description
    # ... while a qcow2 whose last bytes merely look like a footer stays qcow2
    fake = work / "fake-footer.qcow2"
    data = bytearray((work / "evil.qcow2").read_bytes())
    footer = bytearray(fixed.read_bytes()[-512:])
    fake.write_bytes(bytes(data) + bytes(footer))
    assert detect(fake).format == "qcow2"
    # the RAW disk itself: a qcow2 header in sector 0 of a raw file is what qemu would misread;
    # detect reports the header (never RAW), and forcing raw is refused by check_forced
    assert detect(guest).format == "qcow2"
    with pytest.raises(FormatMismatch):
        check_forced(detect(guest), "raw")


# --- foreign formats without a producer here: crafted headers ---------------------------------


def _write(path: Path, data: bytes, size: int | None = None) -> Path:
    with open(path, "wb") as f:
        f.write(data)
        if size:
            f.truncate(size)
    return path


def test_crafted_foreign_formats(work):
    cases = {
        "cowd": (b"COWD" + struct.pack("<I", 1), "vmdk", "COWD", "vmdk"),
        "sesparse": (struct.pack("<QQ", 0xCAFEBABE, 0x200000001), "vmdk", "seSparse", "vmdk"),
        "bochs": (
            b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0") + b"Growing".ljust(16, b"\0")
            + struct.pack("<I", 0x00020000),
            "bochs",
            "growing",
            "bochs",
        ),
        "cloop": (
            b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
            "cloop",
            None,
            "cloop",
        ),
        "parallels1": (b"WithoutFreeSpace" + struct.pack("<I", 2), "parallels", None, "parallels"),
        "luks2": (b"LUKS\xba\xbe\x00\x02", "luks", "LUKS2", None),
    }
    for name, (data, fmt, subformat, driver) in cases.items():
        found = detect(_write(work / name, data, 1 * MiB))
        assert (found.format, found.subformat, found.readable) == (fmt, subformat, False), name
        assert found.hint, name
        if driver:
            assert f"-f {driver}" in found.hint, name


def test_dmg_trailer(work):
    koly = bytearray(512)
    koly[0:4] = b"koly"
    koly[4:12] = struct.pack(">II", 4, 512)
    found = detect(_write(work / "x.dmg", bytes(64 * 1024) + bytes(koly)))
    assert (found.format, found.subformat) == ("dmg", "UDIF")
    assert "qemu-img convert -f dmg -O qcow2" in found.hint


def test_qcow_unknown_version_is_never_raw(work):
    found = detect(_write(work / "q9", b"QFI\xfb" + struct.pack(">I", 9), 1 * MiB))
    assert (found.format, found.readable) == ("qcow2", False)
    assert "unknown version" in found.description and found.hint


def test_iso(work):
    if have("xorriso"):
        src = work / "isosrc"
        src.mkdir(exist_ok=True)
        (src / "hello.txt").write_text("hello\n")
        iso = work / "disk.iso"
        run("xorriso", "-as", "mkisofs", "-quiet", "-V", "MYDISC", "-o", iso, src)
    else:  # craft the primary volume descriptor
        pvd = bytearray(2048)
        pvd[0:7] = b"\x01CD001\x01"
        pvd[40:72] = b"MYDISC".ljust(32)
        iso = _write(work / "disk.iso", bytes(0x8000) + bytes(pvd) + b"\xffCD001\x01".ljust(2048, b"\0"))
    found = detect(iso)
    assert (found.format, found.readable) == ("iso9660", False)
    assert "MYDISC" in found.description
    assert "not a disk image" in found.hint and "ECS does not import ISOs" in found.hint
    # a hybrid ISO: an MBR in sector 0 as well; ISO still wins, and -f raw is allowed on purpose
    data = bytearray(iso.read_bytes())
    data[446:462] = bytes([0x80, 0, 2, 0, 0x17, 0, 0, 0]) + struct.pack("<II", 0, len(data) // 512)
    data[510:512] = b"\x55\xaa"
    hybrid = _write(work / "hybrid.iso", bytes(data))
    found = detect(hybrid)
    assert (found.format, found.subformat) == ("iso9660", "hybrid")
    assert "-f raw" in found.hint
    check_forced(found, "raw")
    with pytest.raises(FormatMismatch):
        check_forced(found, "qcow2")


# --- RAW content ------------------------------------------------------------------------------


def _blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.skipif(not have("sfdisk"), reason="sfdisk not installed")
def test_raw_partition_tables(work, mbr_raw):
    found = detect(mbr_raw)
    assert (found.format, found.starts_with, found.readable) == ("raw", "mbr", True)
    assert found.description == "RAW disk with an MBR" and found.hint is None
    gpt = _blank(work / "gpt.raw", 8 * MiB)
    run("sfdisk", "-q", gpt, input=b"label: gpt\n,,L\n")
    assert detect(gpt).starts_with == "gpt"
    assert detect(gpt).description == "RAW disk with a GPT partition table"


MKFS = [
    ("ext2", ["mkfs.ext2", "-q", "-F"], 16 * MiB),
    ("ext3", ["mkfs.ext3", "-q", "-F"], 16 * MiB),
    ("ext4", ["mkfs.ext4", "-q", "-F"], 16 * MiB),
    ("fat12", ["mkfs.fat", "-F", "12"], 4 * MiB),
    ("fat16", ["mkfs.fat", "-F", "16"], 32 * MiB),
    ("fat32", ["mkfs.fat", "-F", "32"], 64 * MiB),
    ("swap", ["mkswap"], 16 * MiB),
    ("xfs", ["mkfs.xfs", "-q", "-f"], 320 * MiB),
]


@pytest.mark.parametrize("expected,command,size", MKFS, ids=[m[0] for m in MKFS])
def test_raw_file_systems(work, expected, command, size):
    if not have(command[0]):
        pytest.skip(f"{command[0]} not installed")
    path = _blank(work / f"{expected}.img", size)
    run(*command, path)
    found = detect(path)
    assert (found.format, found.starts_with) == ("raw", expected), found
    assert qemu_format(path) == "raw" if have("qemu-img") else True


def test_identify_start_crafted():
    def at(offset: int, magic: bytes, size: int = 0x10048) -> bytes:
        data = bytearray(size)
        data[offset : offset + len(magic)] = magic
        return bytes(data)

    assert identify_start(b"") == "empty"
    assert identify_start(bytes(4096)) == "empty"
    assert identify_start(at(0x10040, b"_BHRfS_M")) == "btrfs"
    assert identify_start(at(3, b"NTFS    ")) == "ntfs"
    assert identify_start(at(3, b"EXFAT   ")) == "exfat"
    assert identify_start(at(0, b"hsqs")) == "squashfs"
    assert identify_start(at(0, b"XFSB")) == "xfs"
    lvm = bytearray(4096)
    lvm[512:520] = b"LABELONE"
    lvm[536:544] = b"LVM2 001"
    assert identify_start(bytes(lvm)) == "lvm2"
    assert identify_start(at(4096 - 10, b"SWAPSPACE2")) == "swap"
    assert identify_start(at(4096, b"EFI PART")) == "gpt"  # 4Kn media
    assert identify_start(at(100, b"\x01")) == "unknown"
    boot = bytearray(at(510, b"\x55\xaa", 512))
    assert identify_start(bytes(boot)) == "mbr"  # a boot sector with an empty table
    boot[446] = 0x33  # not a boot indicator: not an MBR
    boot[450] = 0x83
    assert identify_start(bytes(boot)) == "unknown"
    # an ext superblock behind an MBR with a partition: the MBR wins; behind an empty table: ext
    ext = bytearray(at(1080, b"\x53\xef", 4096))
    ext[510:512] = b"\x55\xaa"
    assert identify_start(bytes(ext)) == "ext2"
    ext[446 + 4] = 0x83
    assert identify_start(bytes(ext)) == "mbr"
    for garbage in (b"\xff" * 10, os.urandom(0x10048)):
        identify_start(garbage)


def test_empty_file_and_tiny_files(work):
    found = detect(_write(work / "empty", b""))
    assert (found.format, found.starts_with, found.description) == ("raw", "empty", "empty file (0 bytes)")
    check_forced(found, "raw")
    assert detect(_write(work / "one", b"\x01")).starts_with == "unknown"
    assert detect(_write(work / "zeros", bytes(1000))).description == "RAW disk whose first 1000 bytes are all zeros"


# --- wrappers ---------------------------------------------------------------------------------

COMPRESSORS = {
    "gzip": (".gz", lambda d: gzip.compress(d, 1), "gunzip -k"),
    "xz": (".xz", lambda d: lzma.compress(d, preset=0), "xz -dk"),
    "bzip2": (".bz2", lambda d: bz2.compress(d, 1), "bunzip2 -k"),
    "zstd": (".zst", lambda d: zstandard.ZstdCompressor(level=1).compress(d), "zstd -d"),
}


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_compressed_raw(work, mbr_raw, kind):
    suffix, compress, command = COMPRESSORS[kind]
    path = _write(work / f"disk.raw{suffix}", compress(mbr_raw.read_bytes()))
    found = detect(path)
    assert (found.format, found.inner_format, found.readable) == (kind, "raw", False)
    assert found.description == f"{kind}-compressed, containing a RAW disk with an MBR"
    assert found.inner_description == "RAW disk with an MBR"
    assert f"`{command} {path}`" in found.hint
    assert str(work / "disk.raw") in found.hint


@requires_qemu
@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_compressed_qcow2_and_vmdk(work, kind):
    suffix, compress, _ = COMPRESSORS[kind]
    qemu_img("create", "-q", "-f", "qcow2", work / "c.qcow2", "64M")
    found = detect(_write(work / f"c.qcow2{suffix}", compress((work / "c.qcow2").read_bytes())))
    assert (found.format, found.inner_format) == (kind, "qcow2")
    assert found.inner_description.startswith("qcow2 v3")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", work / "c.vmdk", "64M")
    found = detect(_write(work / f"c.vmdk{suffix}", compress((work / "c.vmdk").read_bytes())))
    assert (found.format, found.inner_format) == (kind, "vmdk")
    assert found.description == f"{kind}-compressed, containing a VMDK (streamOptimized)"
    assert found.hint.endswith(f"then use {work / 'c.vmdk'} (vmdk)")


def test_compressor_cli_tools(work, mbr_raw):
    for tool, flag, fmt in (("gzip", "-1", "gzip"), ("xz", "-0", "xz"), ("bzip2", "-1", "bzip2"), ("zstd", "-1", "zstd")):
        if not have(tool):
            continue
        out = work / f"cli-{tool}.img"
        with open(out, "wb") as f:
            subprocess.run([tool, flag, "-c", str(mbr_raw)], stdout=f, check=True)
        found = detect(out)
        assert (found.format, found.inner_format) == (fmt, "raw"), tool
        # no known suffix: the command names an explicit output
        assert f"{out}.out" in found.hint


def test_zstd_skippable_frame_and_multi_member_gzip(work, mbr_raw):
    data = mbr_raw.read_bytes()
    skippable = struct.pack("<II", 0x184D2A50, 8) + b"metadata"
    found = detect(_write(work / "s.zst", skippable + zstandard.ZstdCompressor().compress(data)))
    assert (found.format, found.inner_format) == ("zstd", "raw")
    # two gzip members (as bgzip/pigz --independent write): the inner file is their concatenation
    small = data[:512] + bytes(1000)
    found = detect(_write(work / "m.gz", gzip.compress(small[:300]) + gzip.compress(small[300:])))
    assert (found.format, found.inner_format) == ("gzip", "raw")
    assert "MBR" in found.inner_description


def test_tar_zip_and_nesting(work, mbr_raw):
    tar = work / "disk.tar"
    run("tar", "-C", work, "-cSf", tar, mbr_raw.name)
    found = detect(tar)
    assert (found.format, found.subformat, found.inner_format) == ("tar", "gnu", "raw")
    assert found.description == "tar archive whose first member disk.raw is a RAW disk with an MBR"
    assert f"tar -xSf {tar}" in found.hint
    assert qemu_format(tar) == "raw" if have("qemu-img") else True

    tgz = work / "disk.tar.gz"
    run("tar", "-C", work, "-cSzf", tgz, mbr_raw.name)
    found = detect(tgz)
    assert (found.format, found.inner_format) == ("gzip", "tar")
    assert found.description == "gzip-compressed tar archive whose first member disk.raw is a RAW disk with an MBR"
    assert f"tar -xSf {tgz}" in found.hint

    zipped = work / "disk.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(mbr_raw, "disk.raw")
    found = detect(zipped)
    assert (found.format, found.inner_format) == ("zip", "raw")
    assert found.description == "zip archive whose first entry disk.raw is a RAW disk with an MBR"
    assert f"unzip {zipped}" in found.hint
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_BZIP2):
        with zipfile.ZipFile(work / "m.zip", "w", method) as z:
            z.mkdir("dir")
            z.write(mbr_raw, "dir/disk.raw")
        assert detect(work / "m.zip").inner_format == "raw"
    with zipfile.ZipFile(work / "empty.zip", "w"):
        pass
    assert detect(work / "empty.zip").description == "empty zip archive"

    # three levels: gzip -> tar -> gzip member: the member is named, not opened
    (work / "inner.raw.gz").write_bytes(gzip.compress(mbr_raw.read_bytes()))
    run("tar", "-C", work, "-czf", work / "deep.tar.gz", "inner.raw.gz")
    found = detect(work / "deep.tar.gz")
    assert (found.format, found.inner_format) == ("gzip", "tar")
    assert "first member inner.raw.gz is gzip-compressed (not looked into further)" in found.description
    # two levels through a zip: zip -> xz -> raw
    with zipfile.ZipFile(work / "x.zip", "w") as z:
        z.writestr("disk.raw.xz", lzma.compress(mbr_raw.read_bytes(), preset=0))
    found = detect(work / "x.zip")
    assert (found.inner_format, found.inner_description) == ("xz", "xz-compressed, containing a RAW disk with an MBR")


def _sparse_btrfs_like(path: Path) -> Path:
    """A file whose first 64 KiB are a hole, with data blocks scattered after: only a tar reader
    that honours the sparse map finds the btrfs magic at 0x10040."""
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        for block in range(16, 200, 2):
            f.seek(block * 4096)
            f.write(b"\x01" * 4096)
        f.seek(0x10040)
        f.write(b"_BHRfS_M")
    return path


@pytest.mark.parametrize("variant", ["gnu", "posix-0.0", "posix-0.1", "posix-1.0", "v7", "python-pax"])
def test_tar_variants_and_sparse_maps(work, variant):
    source = _sparse_btrfs_like(work / "sparse.img")
    archive = work / f"{variant}.tar"
    if variant == "gnu":
        run("tar", "-C", work, "--format=gnu", "-cSf", archive, source.name)
    elif variant.startswith("posix"):
        version = variant.split("-")[1]
        run("tar", "-C", work, "--format=posix", f"--sparse-version={version}", "-cSf", archive, source.name)
    elif variant == "v7":
        run("tar", "-C", work, "--format=v7", "-cf", archive, source.name)
    else:
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as t:
            t.add(source, arcname="d" * 150 + "/sparse.img")  # a long name needs a PAX header
    found = detect(archive)
    assert found.format == "tar", found
    assert found.inner_format == "raw" and found.inner_description == "RAW disk with a Btrfs file system", found
    assert "sparse.img" in found.description


def test_tar_member_fully_known_sees_a_fixed_vhd(work):
    """Inside an uncompressed tar the member's end is readable: a fixed VHD is seen as one."""
    if not have("qemu-img"):
        pytest.skip("qemu-img not installed")
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", work / "t-fixed.vhd", "4M")
    run("tar", "-C", work, "-cSf", work / "vhd.tar", "t-fixed.vhd")
    found = detect(work / "vhd.tar")
    assert (found.inner_format, found.inner_description[:11]) == ("vhd", "VHD (fixed)")


def test_ova(work):
    if not have("qemu-img"):
        pytest.skip("qemu-img not installed")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", work / "disk1.vmdk", "64M")
    (work / "app.ovf").write_text("<?xml version='1.0'?><Envelope/>")
    (work / "app.mf").write_text("SHA256(app.ovf)= 00\n")
    run("tar", "-C", work, "-cf", work / "app.ova", "app.ovf", "app.mf", "disk1.vmdk")
    found = detect(work / "app.ova")
    assert (found.format, found.subformat, found.inner_format) == ("tar", "ova", "vmdk")
    assert found.description == "OVA (tar) whose disk disk1.vmdk is a VMDK (streamOptimized)"
    assert found.hint.endswith("then use disk1.vmdk (vmdk)")


class CountingFile(io.BytesIO):
    """A file object without fileno(): detect reads it through seek+read, which we count."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size=-1):  # type: ignore[override]
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_peek_is_bounded(work):
    """A 1 GiB stream of zeros, and a big incompressible one: a peek reads and inflates little."""
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 * MiB)) * 16  # 16 frames: 1 GiB
    for data in (gzip.compress(bytes(256 * MiB), 1), bomb, os.urandom(48 * MiB)):
        for wrapped in (data, gzip.compress(data, 1)[: 40 * MiB]):
            source = CountingFile(wrapped)
            started = time.monotonic()
            found = detect(source)
            assert time.monotonic() - started < 5
            assert source.bytes_read <= PEEK_INPUT + 256 * 1024
            assert found.format in ("gzip", "zstd", "raw")


def test_damaged_and_truncated_wrappers(work, mbr_raw):
    good = gzip.compress(mbr_raw.read_bytes())
    truncated = detect(io.BytesIO(good[: len(good) // 3]))
    assert truncated.format == "gzip"
    corrupt = bytearray(good)
    corrupt[20:60] = b"\xff" * 40
    found = detect(io.BytesIO(bytes(corrupt)))
    assert found.format == "gzip" and "could not look inside" in found.description or "damaged" in found.description
    for kind in ("xz", "bzip2", "zstd"):
        _, compress, _ = COMPRESSORS[kind]
        data = compress(mbr_raw.read_bytes())
        assert detect(io.BytesIO(data[:40])).format == kind
        assert detect(io.BytesIO(data[:12] + b"\0" * 200)).format == kind


# --- sources ----------------------------------------------------------------------------------


def test_sources(work, mbr_raw):
    with pytest.raises(ImageNotFound):
        detect(work / "missing.img")
    with pytest.raises(ImageNotFound):
        detect(work)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as pipe, os.fdopen(write_end, "wb"):
        with pytest.raises(ImageNotFound, match="pipe"):
            detect(pipe)
    with open(mbr_raw, "rb") as f:
        assert detect(f).starts_with == "mbr"
    assert detect(io.BytesIO(mbr_raw.read_bytes())).starts_with == "mbr"
    # a file object's name is used in hints only when it is a real name
    found = detect(io.BytesIO(gzip.compress(mbr_raw.read_bytes())))
    assert "gzip -dc IN > OUT" in found.hint


# --- forced formats ---------------------------------------------------------------------------


def test_check_forced(work):
    qcow2 = Detection(format="qcow2", description="qcow2 v3 (compat 1.1)", subformat="v3", version="3", readable=True)
    with pytest.raises(FormatMismatch) as error:
        check_forced(qcow2, "raw")
    assert str(error.value) == (
        "forced format raw, but the file has a qcow2 header (v3); a file with a format header is never read as RAW"
        " (it is qcow2 v3 (compat 1.1))"
    )
    check_forced(qcow2, "qcow2")
    with pytest.raises(FormatMismatch, match="no VHD footer"):
        check_forced(qcow2, "vpc")
    raw = Detection(format="raw", description="RAW disk with an MBR", readable=True, starts_with="mbr")
    check_forced(raw, "raw")
    with pytest.raises(FormatMismatch, match="forced format vhd, but the file has no VHD footer: it is a RAW disk"):
        check_forced(raw, "vhd")
    with pytest.raises(FormatMismatch, match="no qcow2 header"):
        check_forced(raw, "qcow2")
    fixed = Detection(format="vhd", description="VHD (fixed)", subformat="fixed", readable=True)
    check_forced(fixed, "vpc")
    with pytest.raises(FormatMismatch, match="truncate -s -512"):
        check_forced(fixed, "raw")
    for fmt in ("vmdk", "gzip", "tar", "luks"):
        with pytest.raises(FormatMismatch):
            check_forced(Detection(format=fmt, description=fmt), "raw")
    with pytest.raises(FormatMismatch, match="no VMDK header or descriptor"):
        check_forced(raw, "vmdk")
    with pytest.raises(UsageError):
        check_forced(raw, "vhdz")


@requires_qemu
def test_check_forced_on_real_files(work):
    qemu_img("create", "-q", "-f", "qcow2", work / "f.qcow2", "8M")
    with pytest.raises(FormatMismatch, match=r"qcow2 header \(v3\)"):
        check_forced(detect(work / "f.qcow2"), "raw")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", work / "f.vmdk", "8M")
    with pytest.raises(FormatMismatch, match=r"VMDK header \(streamOptimized\)"):
        check_forced(detect(work / "f.vmdk"), "raw")


# --- the corpus -------------------------------------------------------------------------------

CORPUS = corpus_manifest()


def _decompressed(entry: dict, directory: Path, out_dir: Path) -> Path:
    opener = {"bzip2": bz2.open, "gzip": gzip.open}[entry["compression_wrapper"]]
    out = out_dir / entry["file"].replace("/", "__").rsplit(".", 1)[0]
    if not out.exists():
        with opener(directory / entry["file"]) as f, open(out, "wb") as g:
            zero = bytes(1 << 20)
            while chunk := f.read(1 << 20):
                if chunk == zero:
                    g.seek(len(chunk), os.SEEK_CUR)  # keep the copy sparse
                else:
                    g.write(chunk)
            g.truncate()
    return out


@pytest.mark.parametrize("entry", corpus_params(CORPUS))
def test_corpus(entry, tmp_path_factory):
    directory = corpus_dir()
    expected = entry["format"]
    if expected == "vhd-footer-fragment":
        # a 512-byte VHD footer alone: reported as what the footer says, flagged as incomplete
        expected = "vhd"
    stored = detect(directory / entry["file"])
    wrapper = entry["compression_wrapper"]
    if wrapper:
        assert stored.format == wrapper and not stored.readable
        assert stored.hint
        peek_blind = expected == "vhd" and "disk type fixed" in entry["features"]  # footer at the end
        assert stored.inner_format == ("raw" if peek_blind else expected), stored
        decompressed = _decompressed(entry, directory, tmp_path_factory.mktemp("corpus"))
        found = detect(decompressed)
    else:
        found = stored
    assert found.format == expected, found
    assert found.readable == (expected in READABLE_FORMATS and expected != "vmdk"
                              or (expected == "vmdk" and found.subformat in READ_CREATE_TYPES))
    if not found.readable:
        assert found.hint
    if entry["format"] == "vhd-footer-fragment":
        assert "footer only" in found.description
    probe = entry.get("qemu_probe_format")
    if probe and probe != "raw":
        assert {"vpc": "vhd"}.get(probe, probe) == found.format


# --- fuzzing ----------------------------------------------------------------------------------


def _samples() -> list[bytes]:
    """Real headers to mutate (small files, made here without tools)."""
    raw = bytearray(4096)
    raw[446:462] = bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 10000)
    raw[510:512] = b"\x55\xaa"
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("disk.raw")
        info.size = len(raw)
        t.addfile(info, io.BytesIO(bytes(raw)))
    zip_buffer = io.BytesIO()
    with zipfile.ZipFile(zip_buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("disk.raw", bytes(raw))
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    footer[8:16] = struct.pack(">II", 2, 0x10000)
    footer[16:24] = struct.pack(">Q", 512)
    footer[48:64] = struct.pack(">QQ", 4096, 4096)[:16]
    footer[60:64] = struct.pack(">I", 3)
    _vhd_checksum(footer)
    dynamic = bytearray(1024)
    dynamic[0:8] = b"cxsparse"
    qcow2 = b"QFI\xfb" + struct.pack(">IQIIQIIQQIIQ", 3, 0, 0, 16, 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0)
    kdmv = b"KDMV" + struct.pack("<IIQQQQIQQQ", 3, 0x30001, 2048, 128, 1, 20, 512, 0, 21, 128) + b"\0\n \r\n"
    vdi = b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(64, b"\0") + struct.pack("<IIII", 0xBEDA107F, 0x10001, 400, 1)
    return [
        bytes(raw),
        tar_buffer.getvalue(),
        zip_buffer.getvalue(),
        gzip.compress(bytes(raw)),
        lzma.compress(bytes(raw)),
        bz2.compress(bytes(raw)),
        zstandard.ZstdCompressor().compress(bytes(raw)),
        bytes(footer) + bytes(dynamic) + bytes(footer),
        bytes(raw) + bytes(footer),
        qcow2.ljust(4096, b"\0"),
        kdmv.ljust(2048, b"\0"),
        vdi.ljust(1024, b"\0"),
        b"# Disk DescriptorFile\nversion=1\ncreateType=\"vmfs\"\nRW 100 VMFS \"x-flat.vmdk\"\n",
        b"\0" * 0x8000 + b"\x01CD001\x01" + b"\0" * 2041,
    ]


SAMPLES = _samples()


def _detect_bytes(data: bytes) -> None:
    try:
        found = detect(io.BytesIO(data))
    except DiskImageError:
        return
    assert isinstance(found, Detection) and found.format and found.description
    json.dumps(found.to_dict())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data):
    _detect_bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(SAMPLES))),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=12),
    st.integers(0, 1 << 16),
)
def test_fuzz_mutated_headers(index, mutations, cut):
    data = bytearray(SAMPLES[index])
    for position, value in mutations:
        if data:
            data[position % len(data)] = value
    _detect_bytes(bytes(data))
    _detect_bytes(bytes(data[: cut % (len(data) + 1)]))


def test_fuzz_zlib_errors_do_not_escape():
    """Deflate streams with a valid zip header but garbage data, in every compressor wrapper."""
    for body in (b"\xff" * 100, zlib.compress(b"x" * 100)[2:50], os.urandom(300)):
        header = b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 8, 0, 0, 0, len(body), 0, 8, 0) + b"disk.raw"
        _detect_bytes(header + body)
        for prefix in (b"\x1f\x8b\x08\0\0\0\0\0\0\xff", b"\xfd7zXZ\0", b"BZh91AY&SY", b"\x28\xb5\x2f\xfd"):
            _detect_bytes(prefix + body)


def _tar_block(name: bytes, size: int, typeflag: bytes, extra: dict[int, bytes] | None = None) -> bytes:
    """A ustar header block with a correct checksum (fields at ``extra`` offsets overwritten)."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = b"%011o\0" % size
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    for offset, value in (extra or {}).items():
        block[offset : offset + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_hostile_tar_headers():
    def pax(records: dict[str, str]) -> bytes:
        body = b""
        for key, value in records.items():
            record = f" {key}={value}\n".encode()
            length = len(record) + len(str(len(record)))
            length = len(record) + len(str(length))
            body += str(length).encode() + record
        return _tar_block(b"PaxHeader", len(body), b"x") + body.ljust((len(body) + 511) // 512 * 512, b"\0")

    member = _tar_block(b"disk.raw", 1024, b"0") + bytes(1024)
    cases = [
        pax({"size": "9" * 5000}) + member,
        pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "9" * 5000}) + member,
        pax({"GNU.sparse.map": ",".join(["1" * 30] * 50), "GNU.sparse.realsize": "100"}) + member,
        pax({"GNU.sparse.major": "1", "GNU.sparse.realsize": "4096"}) + _tar_block(b"d", 512, b"0") + b"9" * 512,
        _tar_block(b"big", 0, b"L", {124: b"\x80" + b"\xff" * 11}) + member,  # base-256 size, huge
        _tar_block(b"sparse", 10, b"S", {482: b"\x01"}) + b"\xff" * 2048,  # endless extension flags
        _tar_block(b"sparse", 10, b"S", {386: b"7" * 96}) + bytes(1024),
    ]
    for data in cases:
        found = detect(io.BytesIO(data))
        assert found.format == "tar", found
