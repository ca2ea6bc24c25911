"""Encrypted volumes and software RAID members (diskimg.inspection.volumes: luks, bitlocker, md).

Oracles:
- LUKS1 and LUKS2 headers are written by ``cryptsetup luksFormat`` on image files and checked
  against ``cryptsetup luksDump`` (and its ``--dump-json-metadata`` for LUKS2). luksDump and isLuks
  repair a damaged header in place, so the parser always reads a file before cryptsetup does.
- md superblocks: no tool here writes them (``mdadm --create`` and ``--build`` need the kernel's md
  driver, absent here), so they are built below from the kernel's published layout
  (include/uapi/linux/raid/md_p.h) and must be accepted by ``mdadm --examine``, which reports the
  UUID, level, version, role and checksum the parser must agree with.
- BitLocker: nothing here writes it and the shared corpus has no BitLocker sample (its MANIFEST
  lists none), so volumes are built from the tables of libbde's "BitLocker Drive Encryption (BDE)
  format specification" (github.com/libyal/libbde, documentation/), its sections "Volume header" and
  "FVE metadata block" (named in quotes below): the numbers are that document's offsets and values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from diskimg.errors import CorruptImage, UnsupportedFormat
from diskimg.inspection.signatures import probe
from diskimg.inspection.volumes import bitlocker, luks, md

from .support.disks import BytesDisk, FileDisk
from .support.files import blank, read_at, write_at
from .support.tools import run
from .support.units import KiB, MiB
from .support.volumes import (
    BITLOCKER_GUID,
    BLOCKS,
    FAST_KDF,
    MEMBER_SIZE,
    VOLUME,
    VOLUME_GUID,
    bitlocker_volume,
    fve_block,
    luks_format,
    luks_json,
    md_member,
    md_sb0_checksum,
    md_sb1_checksum,
    md_superblock_0_90,
    md_superblock_1,
    mdadm_examine,
    windows7_volume_header,
)

needs_cryptsetup = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed")
needs_mdadm = pytest.mark.skipif(shutil.which("mdadm") is None, reason="mdadm not installed")

# -- LUKS ------------------------------------------------------------------------------------------------





def luks_dump(path: Path) -> dict[str, str]:
    """The top-level "Name: value" lines of ``cryptsetup luksDump``."""
    fields = {}
    for line in run("cryptsetup", "luksDump", path).stdout.decode().splitlines():
        match = re.match(r"([A-Za-z][A-Za-z ]*):\s*(.*)$", line)
        if match and not line[0].isspace():
            fields[match[1]] = match[2].strip()
    return fields




def read_whole(path: Path) -> luks.LuksHeader | None:
    return luks.read_luks(FileDisk(path), 0, path.stat().st_size)


@needs_cryptsetup
@pytest.mark.parametrize("options, cipher, key_bits, hash_spec", [
    ((), "aes-xts-plain64", 512, "sha256"),
    (("--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha1"), "aes-cbc-essiv:sha256", 256, "sha1"),
    (("--cipher", "aes-cbc-plain64", "--key-size", "256", "--hash", "sha512", "--align-payload", "8192"),
     "aes-cbc-plain64", 256, "sha512"),
])
def test_luks1_header_as_luksdump_reads_it(tmp_path, options, cipher, key_bits, hash_spec):
    path = luks_format(tmp_path / "v1.img", 16 * MiB, "--type", "luks1", *FAST_KDF, *options)
    header = read_whole(path)
    dump = luks_dump(path)
    assert dump["Version"] == "1" and header.version == "1" and header.kind == "luks"
    assert header.uuid == dump["UUID"]
    assert header.cipher == f"{dump['Cipher name']}-{dump['Cipher mode']}" == cipher
    assert header.hash_spec == dump["Hash spec"] == hash_spec
    assert header.payload_offset == int(dump["Payload offset"]) * 512
    assert header.key_bytes * 8 == int(dump["MK bits"]) == key_bits
    enabled = [int(n) for n, state in re.findall(r"Key Slot (\d): (ENABLED|DISABLED)", run(
        "cryptsetup", "luksDump", path).stdout.decode()) if state == "ENABLED"]
    assert [slot.number for slot in header.keyslots] == enabled == [0]
    assert header.label is None and header.segments == ()


@needs_cryptsetup
@pytest.mark.parametrize("options", [
    ("--label", "cryptroot", "--subsystem", "installer"),
    ("--luks2-metadata-size", "64k", "--cipher", "aes-xts-plain", "--key-size", "256", "--sector-size", "512"),
    ("--offset", "65536", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--label", "data"),
])
def test_luks2_header_as_luksdump_reads_it(tmp_path, options):
    path = luks_format(tmp_path / "v2.img", 48 * MiB, "--type", "luks2", *FAST_KDF, *options)
    header = read_whole(path)
    dump = luks_dump(path)
    document = luks_json(path)
    assert dump["Version"] == "2" and header.version == "2"
    assert header.uuid == dump["UUID"]
    assert header.label == (None if dump["Label"] == "(no label)" else dump["Label"])
    assert header.subsystem == (None if dump["Subsystem"] == "(no subsystem)" else dump["Subsystem"])
    assert header.sequence == int(dump["Epoch"])
    assert header.header_size == int(dump["Metadata area"].split()[0]) and header.header_offset == 0
    assert header.checksum_algorithm == "sha256" and header.checksum_verified
    segments = document["segments"]
    assert [(s.number, s.type, s.offset, s.encryption, s.sector_size) for s in header.segments] == [
        (int(n), s["type"], int(s["offset"]), s["encryption"], s["sector_size"]) for n, s in segments.items()]
    assert header.cipher == segments["0"]["encryption"] and header.payload_offset == int(segments["0"]["offset"])
    assert [(k.number, k.type, k.key_size, k.kdf) for k in header.keyslots] == [
        (int(n), k["type"], k["key_size"], k["kdf"]["type"]) for n, k in document["keyslots"].items()]
    assert header.key_bytes == document["keyslots"]["0"]["key_size"]


@needs_cryptsetup
def test_luks2_argon2_keyslot_and_a_second_key(tmp_path):
    path = luks_format(tmp_path / "argon.img", 32 * MiB, "--type", "luks2", "--pbkdf", "argon2id",
                       "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32")
    second = tmp_path / "second.key"
    second.write_bytes(b"another")
    run("cryptsetup", "luksAddKey", "--batch-mode", "--key-file", path.with_suffix(".key"), *FAST_KDF, path, second)
    header = read_whole(path)
    document = luks_json(path)
    assert [(k.number, k.kdf) for k in header.keyslots] == [
        (int(n), k["kdf"]["type"]) for n, k in document["keyslots"].items()] == [(0, "argon2id"), (1, "pbkdf2")]
    assert header.sequence == int(luks_dump(path)["Epoch"])


def luks2_checksum_by_spec(area: bytes) -> bytes:
    """The LUKS2 header checksum as the specification defines it: SHA-256 over hdr_size bytes with
    the 64-byte checksum field at 448 zeroed."""
    return hashlib.sha256(area[:448] + bytes(64) + area[512:]).digest()


@needs_cryptsetup
def test_luks2_checksum_checked_and_the_secondary_header_used(tmp_path):
    path = luks_format(tmp_path / "v2.img", 32 * MiB, "--type", "luks2", *FAST_KDF, "--label", "root")
    size = read_whole(path).header_size
    area = read_at(path, 0, size)
    assert area[448:480] == luks2_checksum_by_spec(area)  # the oracle agrees with what cryptsetup wrote
    primary_damaged = tmp_path / "primary-damaged.img"
    shutil.copyfile(path, primary_damaged)
    write_at(primary_damaged, 4096 + 10, b"#")  # inside the JSON text
    with pytest.raises(CorruptImage, match="checksum"):
        luks.parse_luks2_header(read_at(primary_damaged, 0, size))
    fallback = read_whole(primary_damaged)
    assert fallback.header_offset == size and fallback.label == "root"
    both_damaged = tmp_path / "both-damaged.img"
    shutil.copyfile(primary_damaged, both_damaged)
    write_at(both_damaged, size + 4096 + 10, b"#")
    with pytest.raises(CorruptImage, match="checksum"):
        read_whole(both_damaged)
    # cryptsetup, after diskimg has read the files (it repairs a damaged primary in place)
    assert fallback.uuid == luks_dump(primary_damaged)["UUID"] == luks_dump(path)["UUID"]
    assert subprocess.run(["cryptsetup", "isLuks", str(both_damaged)]).returncode != 0


@needs_cryptsetup
def test_luks_probe_names_cipher_and_label(tmp_path):
    path = luks_format(tmp_path / "v2.img", 32 * MiB, "--type", "luks2", *FAST_KDF, "--label", "cryptroot")
    found = probe(FileDisk(path), 0, path.stat().st_size)
    dump = luks_dump(path)
    assert (found.type, found.version, found.uuid, found.label) == ("luks", "2", dump["UUID"], "cryptroot")
    segment = luks_json(path)["segments"]["0"]
    assert found.details["cipher"] == segment["encryption"]
    assert found.details["payload_offset"] == int(segment["offset"])
    # a damaged header is still a LUKS volume, named with what its binary header says
    write_at(path, 4096 + 10, b"#")
    damaged = probe(FileDisk(path), 0, path.stat().st_size)
    assert (damaged.type, damaged.uuid, damaged.label) == ("luks", dump["UUID"], "cryptroot")
    assert "checksum" in damaged.details["error"]


def test_not_luks():
    assert luks.read_luks(BytesDisk(bytes(64 * KiB)), 0, 64 * KiB) is None
    assert luks.read_luks(BytesDisk(b"LUKS\xba\xbe"), 0, 6) is None


@functools.lru_cache(maxsize=1)
def cryptsetup_luks2_area() -> bytes:
    """The primary header area (binary header + JSON) of a LUKS2 volume made by cryptsetup, once."""
    with tempfile.TemporaryDirectory() as folder:
        path = luks_format(Path(folder) / "seed.img", 32 * MiB, "--type", "luks2", *FAST_KDF, "--label", "seed")
        return read_at(path, 0, 16 * KiB)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.sampled_from(["dynamic", "crypt", "luks2", "0", "4096", "12288", "18446744073709551616"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["0", "1", "33", "x", "type", "offset", "size", "encryption", "sector_size", "key_size",
                         "kdf", "json_size", "requirements", "mandatory"]), inner, max_size=4),
    max_leaves=12,
)
#: places in cryptsetup's LUKS2 document where the fuzzer puts its values
LUKS2_PATHS = [(), ("keyslots",), ("segments",), ("config",), ("tokens",), ("keyslots", "0"), ("keyslots", "40"),
               ("keyslots", "0", "kdf"), ("keyslots", "0", "key_size"), ("keyslots", "0", "type"), ("segments", "0"),
               ("segments", "0", "offset"), ("segments", "0", "size"), ("segments", "0", "encryption"),
               ("segments", "0", "sector_size"), ("segments", "0", "type"), ("segments", "1"), ("config", "json_size"),
               ("config", "requirements"), ("config", "requirements", "mandatory")]


@needs_cryptsetup
@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(st.tuples(st.sampled_from(LUKS2_PATHS), JSON_VALUES), max_size=4),
    splices=st.lists(st.tuples(st.integers(0, 16 * KiB - 1), st.binary(min_size=1, max_size=16)), max_size=3),
)
def test_fuzzed_luks_headers_end_in_corruptimage_or_a_value(changes, splices):
    """cryptsetup's LUKS2 JSON with values replaced (the checksum then made right, so that the parser
    reads them) and bytes spliced anywhere; then LUKS1 headers made of the same bytes: a value or
    CorruptImage, nothing else."""
    area = bytearray(cryptsetup_luks2_area())
    document = json.loads(area[4096:].split(b"\0", 1)[0])
    for path, value in changes:
        if not path:
            document = value
            continue
        parent = document
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent[path[-1]] = value
    text = json.dumps(document).encode()[: 12 * KiB - 1]
    area[4096:] = text + bytes(12 * KiB - len(text))
    for position, data in splices:
        area[position : position + len(data)] = data[: 16 * KiB - position]
    area[448:480] = luks2_checksum_by_spec(bytes(area))
    for candidate in (bytes(area), b"LUKS\xba\xbe\x00\x01" + bytes(area[8:])):
        try:
            result = luks.read_luks(BytesDisk(candidate), 0, len(candidate))
        except CorruptImage:
            continue
        assert result is None or isinstance(result, luks.LuksHeader)


def test_deeply_nested_luks2_json_is_refused_before_parsing():
    binary = bytearray(4096)
    binary[0:8] = b"LUKS\xba\xbe\x00\x02"
    struct.pack_into(">Q", binary, 8, 16 * KiB)
    binary[72:78] = b"sha256"
    area = bytes(binary) + (b"[" * 5000).ljust(12 * KiB, b"\0")
    area = area[:448] + luks2_checksum_by_spec(area) + bytes(32) + area[512:]
    with pytest.raises(CorruptImage, match="nested"):
        luks.parse_luks2_header(area)


# -- md (Linux software RAID) ----------------------------------------------------------------------------

















def read_member(path: Path) -> md.MdSuperblock | None:
    return md.find_superblock(FileDisk(path), 0, path.stat().st_size)


@needs_mdadm
@pytest.mark.parametrize("version", ["0.90", "1.0", "1.1", "1.2"])
def test_md_raid1_member_as_mdadm_examines_it_and_read_as_the_array(tmp_path, version):
    path, data_offset = md_member(tmp_path / "member.img", version, dev_number=1)
    examined = mdadm_examine(path)
    assert examined["Checksum"].endswith("correct")
    sb = read_member(path)
    assert sb.kind == "md" and sb.version == examined["Version"].removesuffix(".00")
    assert sb.uuid == examined.get("Array UUID", examined.get("UUID"))
    assert sb.level_name == examined["Raid Level"] == "raid1"
    assert sb.raid_disks == int(examined["Raid Devices"])
    if version == "0.90":
        assert "active sync" in examined["this"] and sb.role == int(examined["this"].split()[4]) == 1
        assert sb.name is None
    else:
        assert examined["Device Role"] == f"Active device {sb.role}" == "Active device 1"
        assert sb.name == examined["Name"]
        assert sb.data_offset == int(examined.get("Data Offset", "0 sectors").split()[0]) * 512 == data_offset
        assert sb.super_offset == int(examined["Super Offset"].split()[0]) * 512
    array_kib = int(examined["Array Size"].split()[0])
    volume = md.open_raid1(FileDisk(path), 0, MEMBER_SIZE, sb)
    assert volume.size == array_kib * 1024
    payload = bytes(range(256)) * 16
    write_at(path, data_offset, payload)
    write_at(path, data_offset + volume.size - 3, b"end")
    assert volume.read_at(0, len(payload)) == payload
    assert volume.read_at(0, 4096) == payload[:4096]  # the Disk spelling
    assert volume.read_at(volume.size - 3, 100) == b"end"
    assert volume.read_at(volume.size, 10) == b""


@needs_mdadm
@pytest.mark.parametrize("version", ["0.90", "1.2"])
def test_md_raid5_member_named_not_read(tmp_path, version):
    path, _ = md_member(tmp_path / "r5.img", version, level=5, raid_disks=3, dev_number=2)
    examined = mdadm_examine(path)
    sb = read_member(path)
    assert (sb.level_name, sb.raid_disks, sb.layout) == (examined["Raid Level"], int(examined["Raid Devices"]), 2)
    assert sb.level_name == "raid5" and examined["Layout"] == "left-symmetric"
    assert sb.chunk_size == int(examined["Chunk Size"].removesuffix("K")) * 1024
    with pytest.raises(UnsupportedFormat, match="raid5"):
        md.open_raid1(FileDisk(path), 0, MEMBER_SIZE, sb)


@needs_mdadm
def test_md_spare_and_bad_checksum(tmp_path):
    spare, _ = md_member(tmp_path / "spare.img", "1.2", dev_number=1, role=0xFFFF)
    assert mdadm_examine(spare)["Device Role"] == "spare"
    sb = read_member(spare)
    assert (sb.state, sb.role) == ("spare", None)
    with pytest.raises(UnsupportedFormat, match="spare"):
        md.open_raid1(FileDisk(spare), 0, MEMBER_SIZE, sb)
    damaged, _ = md_member(tmp_path / "damaged.img", "1.2")
    write_at(damaged, 4096 + 40, b"X")  # in set_name
    assert "expected" in mdadm_examine(damaged)["Checksum"]
    with pytest.raises(CorruptImage, match="checksum"):
        read_member(damaged)


@needs_mdadm
def test_md_probe_at_the_start_and_at_the_end(tmp_path):
    start, _ = md_member(tmp_path / "a.img", "1.2")
    found = probe(FileDisk(start), 0, MEMBER_SIZE)
    examined = mdadm_examine(start)
    assert (found.type, found.version, found.uuid, found.label) == ("md", "1.2", examined["Array UUID"], "host:root")
    assert found.details["level"] == "raid1"
    end, _ = md_member(tmp_path / "b.img", "0.90")
    found = probe(FileDisk(end), 0, MEMBER_SIZE)
    assert (found.type, found.version, found.uuid) == ("md", "0.90", mdadm_examine(end)["UUID"])


def test_md_superblock_claiming_another_place_and_a_data_area_past_the_member(tmp_path):
    path, _ = md_member(tmp_path / "m.img", "1.2")
    raw = read_at(path, 4096, 4096)
    with pytest.raises(CorruptImage, match="says it lies at sector 8"):
        md.parse_superblock_1(raw, 0)
    sb = md.parse_superblock_1(raw, 4096)
    with pytest.raises(CorruptImage, match="past the member"):
        md.open_raid1(FileDisk(path), 0, MEMBER_SIZE // 2, sb)
    assert md.find_superblock(BytesDisk(bytes(MiB)), 0, MiB) is None


@functools.lru_cache(maxsize=1)
def md_seeds() -> tuple[bytes, bytes]:
    one = md_superblock_1(level=1, raid_disks=2, size=8000, data_offset=2048, data_size=8192, super_offset=8,
                          dev_number=0, roles=[0, 1])
    zero = md_superblock_0_90(level=1, raid_disks=2, size_kib=64, this_disk=0)
    return one.ljust(4096, b"\0"), zero


@settings(max_examples=400, deadline=None)
@given(splices=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6),
       location=st.sampled_from([0, 4096, 1 << 20]))
def test_fuzzed_md_superblocks_end_in_corruptimage_or_a_value(splices, location):
    """Fields overwritten at random, the checksum then made right so that the parser reads them."""
    one, zero = (bytearray(seed) for seed in md_seeds())
    for position, data in splices:
        one[position : position + len(data)] = data[: 4096 - position]
        zero[position : position + len(data)] = data[: 4096 - position]
    if struct.unpack_from("<I", one, 220)[0] <= 1920:
        struct.pack_into("<I", one, 216, md_sb1_checksum(one))
    struct.pack_into("<I", zero, 38 * 4, md_sb0_checksum(struct.unpack("<1024I", zero)))
    for parse, raw, place in ((md.parse_superblock_1, one, location), (md.parse_superblock_0_90, zero, 1 << 20)):
        try:
            sb = parse(bytes(raw), place)
        except CorruptImage:
            continue
        try:
            volume = md.open_raid1(BytesDisk(bytes(2 * MiB)), 0, 2 * MiB, sb)
        except (CorruptImage, UnsupportedFormat):
            continue
        assert len(volume.read_at(0, 512)) <= 512


# -- BitLocker ---------------------------------------------------------------------------------------------













@pytest.mark.parametrize("method, cipher", [
    (0x8000, "aes-cbc-128-elephant"), (0x8001, "aes-cbc-256-elephant"), (0x8002, "aes-cbc-128"),
    (0x8003, "aes-cbc-256"), (0x8004, "aes-xts-128"), (0x8005, "aes-xts-256"), (0x0000, None),
])
def test_bitlocker_windows7_volume_from_the_published_layout(tmp_path, method, cipher):
    path = bitlocker_volume(tmp_path / "bde.img", method)
    volume = bitlocker.read_bitlocker(FileDisk(path), 0, VOLUME)
    assert volume.kind == "bitlocker" and (volume.version, volume.variant) == ("2", "windows7")
    assert volume.uuid == str(VOLUME_GUID) and volume.encryption_method == method and volume.cipher == cipher
    assert volume.label == "DESKTOP-7 C: 14/02/2024"
    assert volume.protectors == ("TPM", "recovery password")
    assert volume.metadata_offsets == BLOCKS and volume.encrypted_size == VOLUME
    header = bitlocker.parse_volume_header(windows7_volume_header())
    assert header.identifier == str(BITLOCKER_GUID) and header.metadata_offsets == BLOCKS
    found = probe(FileDisk(path), 0, VOLUME)
    assert found.type == "bitlocker" and found.details == {"variant": "windows7", "metadata_offsets": list(BLOCKS)}


def test_bitlocker_damaged_first_block_and_all_blocks(tmp_path):
    path = bitlocker_volume(tmp_path / "bde.img", 0x8004)
    write_at(path, BLOCKS[0] + 64 + 8, struct.pack("<I", 99))  # metadata header size: not 48
    volume = bitlocker.read_bitlocker(FileDisk(path), 0, VOLUME)
    assert volume.cipher == "aes-xts-128" and volume.uuid == str(VOLUME_GUID)
    for place in BLOCKS[1:]:
        write_at(path, place, b"-FVE-XX-")
    with pytest.raises(CorruptImage, match="48"):  # the first block's error
        bitlocker.read_bitlocker(FileDisk(path), 0, VOLUME)


def test_bitlocker_vista_volume(tmp_path):
    """"BitLocker Windows Vista": boot entry EB 52 90, the first block as a cluster number at 56, block
    header version 1 naming the others."""
    path = blank(tmp_path / "vista.img", VOLUME)
    sector = bytearray(512)
    sector[0:11] = b"\xeb\x52\x90-FVE-FS-"
    struct.pack_into("<HB", sector, 11, 512, 8)
    struct.pack_into("<Q", sector, 56, BLOCKS[0] // 4096)  # cluster of 8 sectors of 512 bytes
    write_at(path, 0, bytes(sector))
    write_at(path, BLOCKS[0], fve_block(0x8001, version=1, protections=(0x0100,)))
    volume = bitlocker.read_bitlocker(FileDisk(path), 0, VOLUME)
    assert (volume.version, volume.variant, volume.cipher) == ("1", "vista", "aes-cbc-256-elephant")
    assert volume.encrypted_size is None and volume.protectors == ("TPM",)


@pytest.mark.skipif(shutil.which("mkfs.fat") is None, reason="mkfs.fat not installed")
def test_bitlocker_to_go_found_only_with_its_metadata(tmp_path):
    """"BitLocker To Go": a FAT32 boot sector with OEM name MSWIN4.1, the offsets at 440. A FAT32
    formatted by Windows has the same OEM name: without FVE metadata there, it stays a FAT32."""
    path = blank(tmp_path / "togo.img", VOLUME)
    run("mkfs.fat", "-F", "32", path)
    write_at(path, 3, b"MSWIN4.1")
    assert bitlocker.read_bitlocker(FileDisk(path), 0, VOLUME) is None
    assert probe(FileDisk(path), 0, VOLUME).type == "fat32"
    write_at(path, 424, BITLOCKER_GUID.bytes_le + struct.pack("<3Q", *BLOCKS))
    for place in BLOCKS:
        write_at(path, place, fve_block(0x8002, protections=(0x2000,)))
    volume = bitlocker.read_bitlocker(FileDisk(path), 0, VOLUME)
    assert (volume.variant, volume.cipher, volume.protectors) == ("to-go", "aes-cbc-128", ("password",))


SMALL_BLOCKS = (64 * KiB, 128 * KiB, 192 * KiB)


@functools.lru_cache(maxsize=1)
def bitlocker_seed() -> bytes:
    """A small volume (256 KiB) with its three metadata blocks."""
    data = bytearray(256 * KiB)
    data[0:512] = windows7_volume_header(SMALL_BLOCKS)
    for place in SMALL_BLOCKS:
        block = fve_block(0x8004, blocks=SMALL_BLOCKS)
        data[place : place + len(block)] = block
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(splices=st.lists(st.tuples(st.sampled_from([0, 160, 176, 184, 192, *SMALL_BLOCKS, SMALL_BLOCKS[0] + 64,
                                                   SMALL_BLOCKS[0] + 112, SMALL_BLOCKS[0] + 140]),
                                  st.integers(0, 64), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
def test_fuzzed_bitlocker_metadata_ends_in_corruptimage_none_or_a_value(splices):
    data = bytearray(bitlocker_seed())
    for base, shift, chunk in splices:
        data[base + shift : base + shift + len(chunk)] = chunk
    try:
        volume = bitlocker.read_bitlocker(BytesDisk(bytes(data)), 0, len(data))
    except CorruptImage:
        return
    assert volume is None or isinstance(volume, bitlocker.BitLockerVolume)
