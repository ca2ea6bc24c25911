"""LUKS1 and LUKS2 headers: what an encrypted volume says about itself without its key.

LUKS1 (LUKS On-Disk Format Specification 1.2.3, section 2.4): a 592-byte big-endian ``phdr`` at
offset 0 naming the cipher, mode and hash, the payload offset in sectors, the key size and the UUID,
then eight key-slot descriptors.

LUKS2 (LUKS2 On-Disk Format Specification, sections 2-3): a 4096-byte big-endian binary header
(label, checksum algorithm, UUID, ``hdr_size``) followed by a JSON metadata area; ``hdr_size``
covers both and is 16 KiB to 4 MiB, a power of two. The checksum (SHA-256 unless the header names
another) is taken over the whole ``hdr_size`` bytes with its own 64-byte field zeroed. The binary
header and JSON area are written twice: the secondary copy (magic ``SKUL\\xba\\xbe``) follows the
primary at ``hdr_size``, and ``read_luks`` falls back to it, as cryptsetup does, when the primary
is damaged. Data segments (offset, size, cipher, sector size) and keyslots are in the JSON.

``parse_luks1_phdr``, ``parse_luks2_binary_header``, ``parse_luks2_metadata`` and ``parse_luks2_header``
are pure and raise only :class:`~diskimg.errors.CorruptImage`; ``read_luks`` does the reads.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import CorruptImage
from ...jsonlimits import nesting
from ..fs.base import read_volume
from ..signatures import Disk

LUKS_MAGIC = b"LUKS\xba\xbe"
#: magic of the LUKS2 secondary header
LUKS2_SECONDARY_MAGIC = b"SKUL\xba\xbe"
SECTOR = 512

LUKS1_PHDR_SIZE = 592
LUKS1_KEYSLOTS = 8
LUKS1_KEYSLOT_OFFSET = 208  # the first of eight 48-byte key-slot descriptors
LUKS1_KEY_ENABLED = 0x00AC71F3

LUKS2_BINARY_HEADER_SIZE = 4096
#: the hdr_size values the specification allows (binary header + JSON area): 16 KiB to 4 MiB
LUKS2_HEADER_SIZES = tuple((16 << 10) << shift for shift in range(9))
LUKS2_CHECKSUM_OFFSET = 448
LUKS2_CHECKSUM_SIZE = 64
#: cryptsetup's limits on JSON objects (LUKS2_KEYSLOTS_MAX, LUKS2_SEGMENT_MAX)
LUKS2_MAX_KEYSLOTS = 32
LUKS2_MAX_SEGMENTS = 32
#: a LUKS2 document nests five levels (document, keyslots, a keyslot, its kdf); more is not LUKS2
LUKS2_MAX_NESTING = 16
#: the JSON objects every LUKS2 header has
LUKS2_SECTIONS = ("keyslots", "tokens", "segments", "digests", "config")
#: checksum algorithms as the header names them (cryptsetup writes "sha256") -> hashlib's names
CHECKSUM_ALGORITHMS = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
                       "sha512": "sha512", "sha3-256": "sha3_256", "sha3-512": "sha3_512"}

_DECIMAL = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class LuksKeyslot:
    """An enabled key slot: a way to unlock the volume key."""

    number: int
    type: str  # "luks1" for LUKS1 slots; the JSON "type" for LUKS2 ("luks2", "reencrypt")
    key_size: int | None  # bytes
    kdf: str | None  # "pbkdf2", "argon2i", "argon2id"


@dataclass(frozen=True)
class LuksSegment:
    """A LUKS2 segment: where encrypted (``crypt``) or plain (``linear``) data lies."""

    number: int
    type: str
    offset: int  # bytes from the start of the LUKS device
    size: int | None  # bytes; None: "dynamic", to the end of the device
    encryption: str | None  # for crypt segments, e.g. "aes-xts-plain64"
    sector_size: int | None


@dataclass(frozen=True)
class Luks2BinaryHeader:
    """The 4096-byte LUKS2 binary header (primary or secondary)."""

    secondary: bool
    header_size: int  # hdr_size: this binary header and the JSON area after it
    sequence: int  # seqid, raised at each update
    label: str | None
    checksum_algorithm: str
    uuid: str | None
    subsystem: str | None
    header_offset: int  # hdr_offset: where this copy lies
    checksum: bytes


@dataclass(frozen=True)
class Luks2Metadata:
    """What the LUKS2 JSON area says."""

    keyslots: tuple[LuksKeyslot, ...]
    segments: tuple[LuksSegment, ...]
    json_size: int
    requirements: tuple[str, ...]  # config.requirements.mandatory (e.g. an unfinished reencryption)


@dataclass(frozen=True)
class LuksHeader:
    """A LUKS volume as its header describes it. ``payload_offset`` is in bytes (LUKS1 stores
    sectors); for LUKS2 it is the first data segment's offset."""

    kind: ClassVar[str] = "luks"
    version: str  # "1" or "2"
    uuid: str | None
    cipher: str | None  # "aes-xts-plain64"
    label: str | None  # LUKS2 only
    payload_offset: int | None
    key_bytes: int | None
    hash_spec: str | None  # LUKS1: the PBKDF2 hash; LUKS2 keeps hashes per keyslot
    keyslots: tuple[LuksKeyslot, ...]
    segments: tuple[LuksSegment, ...]  # LUKS2 only
    header_size: int
    header_offset: int  # 0, or where the LUKS2 secondary header read instead of a damaged primary lies
    sequence: int | None  # LUKS2 seqid
    subsystem: str | None
    checksum_algorithm: str | None
    checksum_verified: bool  # False where hashlib lacks the named algorithm
    requirements: tuple[str, ...]


def _text(raw: bytes) -> str | None:
    """A NUL-terminated string field; None when empty."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", errors="replace") or None


def luks_version(head: bytes) -> int | None:
    """The LUKS version of a header starting with ``head``, or None when it carries no LUKS magic."""
    if len(head) < 8 or head[:6] not in (LUKS_MAGIC, LUKS2_SECONDARY_MAGIC):
        return None
    return int(struct.unpack_from(">H", head, 6)[0])


def parse_luks1_phdr(raw: bytes) -> LuksHeader:
    """The LUKS1 phdr and its enabled key slots."""
    if len(raw) < LUKS1_PHDR_SIZE:
        raise CorruptImage("LUKS1 header truncated", offset=0, structure="LUKS1 header")
    if raw[:6] != LUKS_MAGIC or luks_version(raw) != 1:
        raise CorruptImage("not a LUKS1 header", offset=0, structure="LUKS1 header")
    name = _text(raw[8:40])
    mode = _text(raw[40:72])
    payload_sectors, key_bytes = struct.unpack_from(">II", raw, 104)
    if payload_sectors * SECTOR < LUKS1_PHDR_SIZE:
        raise CorruptImage(f"LUKS1 payload offset of {payload_sectors} sectors lies inside the header", offset=104,
                           structure="LUKS1 header")
    slots = []
    for number in range(LUKS1_KEYSLOTS):
        active = struct.unpack_from(">I", raw, LUKS1_KEYSLOT_OFFSET + 48 * number)[0]
        if active == LUKS1_KEY_ENABLED:
            slots.append(LuksKeyslot(number, "luks1", key_bytes, "pbkdf2"))
    return LuksHeader(
        version="1", uuid=_text(raw[168:208]), cipher=f"{name}-{mode}" if name and mode else name,
        label=None, payload_offset=payload_sectors * SECTOR, key_bytes=key_bytes,
        hash_spec=_text(raw[72:104]), keyslots=tuple(slots), segments=(),
        header_size=LUKS1_PHDR_SIZE, header_offset=0, sequence=None, subsystem=None, checksum_algorithm=None,
        checksum_verified=False, requirements=(),
    )


def parse_luks2_binary_header(raw: bytes) -> Luks2BinaryHeader:
    """The LUKS2 binary header at the start of ``raw`` (primary or secondary copy)."""
    if len(raw) < LUKS2_BINARY_HEADER_SIZE:
        raise CorruptImage("LUKS2 binary header truncated", structure="LUKS2 header")
    if raw[:6] not in (LUKS_MAGIC, LUKS2_SECONDARY_MAGIC) or luks_version(raw) != 2:
        raise CorruptImage("not a LUKS2 binary header", structure="LUKS2 header")
    header_size, sequence = struct.unpack_from(">QQ", raw, 8)
    if header_size not in LUKS2_HEADER_SIZES:
        raise CorruptImage(f"LUKS2 header size {header_size} is not one of 16 KiB, 32 KiB, ..., 4 MiB", offset=8,
                           structure="LUKS2 header")
    return Luks2BinaryHeader(
        secondary=raw[:6] == LUKS2_SECONDARY_MAGIC, header_size=header_size, sequence=sequence,
        label=_text(raw[24:72]), checksum_algorithm=_text(raw[72:104]) or "",
        uuid=_text(raw[168:208]), subsystem=_text(raw[208:256]),
        header_offset=struct.unpack_from(">Q", raw, 256)[0],
        checksum=bytes(raw[LUKS2_CHECKSUM_OFFSET : LUKS2_CHECKSUM_OFFSET + LUKS2_CHECKSUM_SIZE]),
    )


def luks2_checksum(area: bytes, algorithm: str) -> bytes | None:
    """The checksum of a LUKS2 header area (binary header + JSON) as stored in its checksum field,
    or None when hashlib does not provide ``algorithm``."""
    name = CHECKSUM_ALGORITHMS.get(algorithm.lower())
    if name is None:
        return None
    digest = hashlib.new(name)
    digest.update(area[:LUKS2_CHECKSUM_OFFSET])
    digest.update(bytes(LUKS2_CHECKSUM_SIZE))
    digest.update(area[LUKS2_CHECKSUM_OFFSET + LUKS2_CHECKSUM_SIZE :])
    return digest.digest().ljust(LUKS2_CHECKSUM_SIZE, b"\0")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorruptImage(f"LUKS2 metadata: {what} is not a JSON object", structure="LUKS2 metadata")
    return value


def _number(value: Any, what: str) -> int:
    """A LUKS2 integer: 64-bit values are decimal strings, small ones JSON numbers."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    raise CorruptImage(f"LUKS2 metadata: {what} is not a number", structure="LUKS2 metadata")


def _optional_text(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise CorruptImage(f"LUKS2 metadata: {what} is not a string", structure="LUKS2 metadata")


def _numbered(section: dict[str, Any], name: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """The entries of a keyslots/segments object, keyed by decimal numbers, in number order."""
    if len(section) > limit:
        raise CorruptImage(f"LUKS2 metadata: {len(section)} {name} (at most {limit})", structure="LUKS2 metadata")
    entries = []
    for key, value in section.items():
        if not _DECIMAL.fullmatch(key) or int(key) >= limit:
            raise CorruptImage(f"LUKS2 metadata: {name} entry {key[:20]!r} is not a number below {limit}",
                               structure="LUKS2 metadata")
        entries.append((int(key), _object(value, f"{name} {key}")))
    return sorted(entries, key=lambda entry: entry[0])


def _json_integer(digits: str) -> int:
    """JSON integers of at most 20 digits (a u64): longer ones are no LUKS2 value, and Python refuses
    to convert very long ones with a ValueError of its own."""
    if len(digits.lstrip("-")) > 20:
        raise CorruptImage(f"LUKS2 metadata: a number of {len(digits)} digits", structure="LUKS2 metadata")
    return int(digits)


def parse_luks2_metadata(json_area: bytes) -> Luks2Metadata:
    """The JSON metadata area (NUL-padded) that follows a LUKS2 binary header."""
    text = bytes(json_area).split(b"\0", 1)[0]
    if nesting(text) > LUKS2_MAX_NESTING:
        raise CorruptImage(f"LUKS2 metadata nested deeper than {LUKS2_MAX_NESTING} levels",
                           structure="LUKS2 metadata")
    try:
        document = json.loads(text, parse_int=_json_integer)
    except UnicodeDecodeError as exc:
        raise CorruptImage(f"LUKS2 metadata is not UTF-8: {exc.reason}", structure="LUKS2 metadata") from None
    except json.JSONDecodeError as exc:
        raise CorruptImage(f"LUKS2 metadata is not JSON: {exc.msg} at {exc.pos}", structure="LUKS2 metadata") from None
    sections = _object(document, "the document")
    for name in LUKS2_SECTIONS:
        _object(sections.get(name), f"'{name}'")
    keyslots = []
    for number, slot in _numbered(sections["keyslots"], "keyslots", LUKS2_MAX_KEYSLOTS):
        kdf = slot.get("kdf")
        keyslots.append(LuksKeyslot(
            number=number, type=_optional_text(slot.get("type"), f"keyslot {number} type") or "",
            key_size=_number(slot["key_size"], f"keyslot {number} key_size") if "key_size" in slot else None,
            kdf=_optional_text(_object(kdf, f"keyslot {number} kdf").get("type"), f"keyslot {number} kdf type")
            if kdf is not None else None,
        ))
    segments = []
    for number, segment in _numbered(sections["segments"], "segments", LUKS2_MAX_SEGMENTS):
        size = segment.get("size")
        segments.append(LuksSegment(
            number=number, type=_optional_text(segment.get("type"), f"segment {number} type") or "",
            offset=_number(segment.get("offset"), f"segment {number} offset"),
            size=None if size == "dynamic" else _number(size, f"segment {number} size"),
            encryption=_optional_text(segment.get("encryption"), f"segment {number} encryption"),
            sector_size=_number(segment["sector_size"], f"segment {number} sector_size")
            if "sector_size" in segment else None,
        ))
    config = sections["config"]
    requirements = _object(config.get("requirements", {}), "config requirements").get("mandatory", [])
    if not isinstance(requirements, list) or not all(isinstance(item, str) for item in requirements):
        raise CorruptImage("LUKS2 metadata: config requirements are not a list of names", structure="LUKS2 metadata")
    return Luks2Metadata(keyslots=tuple(keyslots), segments=tuple(segments),
                         json_size=_number(config.get("json_size"), "config json_size"),
                         requirements=tuple(requirements))


def parse_luks2_header(area: bytes) -> LuksHeader:
    """A whole LUKS2 header copy: the binary header and its JSON area (``hdr_size`` bytes), the
    checksum verified where hashlib has its algorithm."""
    binary = parse_luks2_binary_header(area)

    def broken(message: str) -> CorruptImage:
        return CorruptImage(message, offset=binary.header_offset, structure="LUKS2 header")

    if len(area) < binary.header_size:
        raise broken(f"LUKS2 header of {binary.header_size} bytes truncated at {len(area)}")
    area = area[: binary.header_size]
    expected = luks2_checksum(area, binary.checksum_algorithm)
    if expected is not None and expected != binary.checksum:
        raise broken(f"LUKS2 header checksum ({binary.checksum_algorithm}) mismatch")
    metadata = parse_luks2_metadata(area[LUKS2_BINARY_HEADER_SIZE:])
    if metadata.json_size != binary.header_size - LUKS2_BINARY_HEADER_SIZE:
        raise broken(f"LUKS2 JSON area of {metadata.json_size} bytes in a header of {binary.header_size}")
    data = sorted((segment for segment in metadata.segments if segment.type == "crypt"), key=lambda s: s.offset)
    first = data[0] if data else None
    key_sizes = [slot.key_size for slot in metadata.keyslots if slot.key_size is not None]
    return LuksHeader(
        version="2", uuid=binary.uuid, cipher=first.encryption if first else None, label=binary.label,
        payload_offset=first.offset if first else None, key_bytes=key_sizes[0] if key_sizes else None,
        hash_spec=None, keyslots=metadata.keyslots, segments=metadata.segments, header_size=binary.header_size,
        header_offset=binary.header_offset, sequence=binary.sequence, subsystem=binary.subsystem,
        checksum_algorithm=binary.checksum_algorithm, checksum_verified=expected is not None,
        requirements=metadata.requirements,
    )


def read_luks(disk: Disk, offset: int, length: int) -> LuksHeader | None:
    """The LUKS header of the volume spanning ``length`` bytes from ``offset`` of ``disk``, or None
    when it has no LUKS magic. A damaged LUKS2 primary header is replaced by the secondary copy
    when that one is sound; otherwise the primary's error is raised."""
    if length < LUKS1_PHDR_SIZE:
        return None
    head = read_volume(disk, offset, length, 0, min(length, LUKS2_BINARY_HEADER_SIZE), "LUKS header")
    if head[:6] != LUKS_MAGIC:
        return None
    if luks_version(head) == 1:
        return parse_luks1_phdr(head)
    try:
        return _read_luks2_copy(disk, offset, length, 0)
    except CorruptImage as primary_error:
        for place in LUKS2_HEADER_SIZES:  # the secondary follows a primary of any allowed size
            if place + LUKS2_BINARY_HEADER_SIZE > length:
                break
            if disk.read(offset + place, 6) != LUKS2_SECONDARY_MAGIC:
                continue
            try:
                return _read_luks2_copy(disk, offset, length, place)
            except CorruptImage:
                continue
        raise primary_error


def _read_luks2_copy(disk: Disk, offset: int, length: int, place: int) -> LuksHeader:
    """The LUKS2 header copy (binary header and JSON area) at ``place`` of the volume."""
    header_size = parse_luks2_binary_header(
        read_volume(disk, offset, length, place, LUKS2_BINARY_HEADER_SIZE, "LUKS2 header")).header_size
    if place + header_size > length:
        raise CorruptImage(f"LUKS2 header of {header_size} bytes at {place} reaches past the volume's {length}",
                           offset=offset + place, structure="LUKS2 header")
    header = parse_luks2_header(read_volume(disk, offset, length, place, header_size, "LUKS2 header"))
    if header.header_offset != place:
        raise CorruptImage(f"LUKS2 header found at {place} says it lies at {header.header_offset}",
                           offset=offset + place, structure="LUKS2 header")
    return header
