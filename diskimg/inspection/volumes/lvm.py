"""LVM2: physical volumes found on disks, assembled into volume groups whose logical volumes read as volumes.

On disk (LVM2's lib/label/label.h and lib/format_text/layout.h):

- a *label* in one of the first four 512-byte sectors of a physical volume (PV): ``LABELONE``, the label's
  own sector number, a checksum of the rest of the sector, the offset of the ``pv_header`` and the type
  ``LVM2 001``;
- the ``pv_header``: the PV's UUID (32 characters), the device size in bytes, then two lists of
  (offset, size) pairs in bytes from the PV's start, each ending with a zero offset: the data areas, then
  the metadata areas;
- each metadata area begins with an ``mda_header`` sector (checksum, magic, version, its own start, the
  area's size, ``raw_locn`` slots). Slot 0 locates the committed metadata text in a circular buffer that
  fills the rest of the area: text running past the area's end continues right after the header sector;
- the text (libdm's configuration syntax): ``name { ... }`` sections and ``key = value`` lines where a value
  is a string, an integer, a float or a list of those; ``#`` starts a comment. One section is the volume
  group: its extent size, its PVs by UUID (``pe_start``, ``pe_count``), its logical volumes (LVs), each a
  run of segments mapping the LV's extents onto PV extents or onto other LVs' extents.

Pure functions turn bytes into values (:func:`parse_label`, :func:`parse_mda_header`,
:func:`metadata_text_ranges`, :func:`parse_config`, :func:`parse_metadata`); :func:`find_volume_groups` reads
the disks, and :class:`LvmVolume` reads an LV. ``linear`` and ``striped`` LVs are read through their
segments, ``raid1`` and ``mirror`` LVs through one healthy leg; thin, snapshot, cache, VDO and the other
kinds are named (``kind``, ``unreadable_reason``), not read. Every value from the image is checked and
capped: what LVM itself would refuse raises :class:`~diskimg.errors.CorruptImage` (and
:func:`find_volume_groups` records it as a problem of that PV or volume group); an LV that cannot be read
from the disks given says why in ``unreadable_reason``.

For ``--sparsify``: :meth:`VolumeGroup.free_extent_ranges` gives the PV extents no LV uses, and
:meth:`LvmVolume.locate` where an LV's bytes lie on the disks (on every leg of a mirror, if asked), so the
unused ranges of an LV's file system become ranges of the disks.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ...errors import CorruptImage, UnsupportedFormat
from ..signatures import Disk, lvm_crc, lvm_uuid

SECTOR = 512
#: the label is looked for in the first four sectors (label.h: LABEL_SCAN_SECTORS)
LABEL_SCAN_SECTORS = 4
LABEL_ID = b"LABELONE"
#: the type of a text-format (LVM2) label
LABEL_TYPE = b"LVM2 001"
#: label_header: id[8], sector u64, crc u32 (of the rest of the sector from offset 20), offset u32, type[8]
_LABEL_HEADER = struct.Struct("<8sQII8s")
_LABEL_CRC_FROM = 20
#: pv_header: the UUID's 32 characters and the device size, then the disk_locn lists
_PV_HEADER = struct.Struct("<32sQ")
#: disk_locn and pv lists: offset u64, size u64 (bytes)
_DISK_LOCN = struct.Struct("<QQ")
#: characters of an LVM UUID (lib/id/id.c)
_UUID_CHARACTERS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#")

MDA_HEADER_SIZE = 512
#: mda_header: checksum u32 (of the rest of the sector), magic[16], version u32, start u64, size u64
_MDA_HEADER = struct.Struct("<I16sIQQ")
#: the metadata area's magic (layout.h: FMTT_MAGIC)
FMTT_MAGIC = b" LVM2 x[5A%r0N*>"
FMTT_VERSION = 1
#: raw_locn: offset u64 (from the area's start), size u64, checksum u32 (of the text), flags u32
_RAW_LOCN = struct.Struct("<QQII")
#: raw_locn flag: this area's metadata is to be ignored (pvchange --metadataignore)
RAW_LOCN_IGNORED = 0x1

#: the text format the metadata must declare (import-export.h)
CONTENTS_VALUE = "Text Format Volume Group"
FORMAT_VERSION_VALUE = 1

# -- caps on what the image may ask for (LVM's own defaults are far below) ---------------------------------

#: metadata text read from one area (LVM's default area is 1 MiB, and a copy may use at most half of it)
MAX_METADATA_TEXT = 4 << 20
#: nesting of sections (the volume group's text nests four deep)
MAX_CONFIG_DEPTH = 16
#: sections and values (each list item counts) in one metadata text
MAX_CONFIG_NODES = 1 << 17
#: digits of an integer (2**64 has 20)
MAX_INTEGER_DIGITS = 20
MAX_PHYSICAL_VOLUMES = 1024
MAX_LOGICAL_VOLUMES = 2048
#: segments over all the LVs of a volume group
MAX_SEGMENTS = 1 << 16
#: areas (stripes, legs) of one segment (LVM allows 128 stripes, 64 RAID images)
MAX_AREAS = 256
#: LVs stacked on LVs (a raid1 LV on its images, a pvmove mirror under an LV): far deeper is a loop or a lie
MAX_STACK_DEPTH = 8
#: a metadata area header is read at most this many times per PV (a PV has one or two areas)
MAX_METADATA_AREAS = 8
#: bytes one read of an LV may ask for (as of a DiskReader)
MAX_READ = 64 << 20

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


# -- the label and the pv_header -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskLocation:
    """An area of a PV: ``offset`` and ``size`` in bytes from the PV's start (size 0: to the PV's end)."""

    offset: int
    size: int


@dataclass(frozen=True)
class PvLabel:
    """What an LVM2 label and its pv_header say."""

    sector: int
    uuid: str
    device_size: int
    data_areas: tuple[DiskLocation, ...]
    metadata_areas: tuple[DiskLocation, ...]


def parse_label(head: bytes) -> PvLabel | None:
    """The LVM2 label among the first four sectors of ``head`` (the first 2 KiB of a partition or disk), or
    None when there is none. A label whose checksum, sector or pv_header is wrong raises CorruptImage (LVM
    ignores such a device)."""
    for sector in range(LABEL_SCAN_SECTORS):
        block = head[sector * SECTOR : (sector + 1) * SECTOR]
        if len(block) < SECTOR or not block.startswith(LABEL_ID):
            continue
        _, own_sector, crc, offset, label_type = _LABEL_HEADER.unpack_from(block)
        where = sector * SECTOR
        if label_type != LABEL_TYPE:
            raise CorruptImage(f"LVM label of type {label_type!r}, not {LABEL_TYPE.decode()}", offset=where,
                               structure="LVM label")
        if own_sector != sector:
            raise CorruptImage(f"LVM label in sector {sector} says it is in sector {own_sector}", offset=where,
                               structure="LVM label")
        if crc != lvm_crc(block[_LABEL_CRC_FROM:]):
            raise CorruptImage("LVM label checksum mismatch", offset=where, structure="LVM label")
        return _parse_pv_header(block, offset, sector)
    return None


def _parse_pv_header(block: bytes, offset: int, sector: int) -> PvLabel:
    where = sector * SECTOR + offset
    if offset < _LABEL_HEADER.size or offset + _PV_HEADER.size > SECTOR:
        raise CorruptImage(f"pv_header at {offset} lies outside its label sector", offset=where,
                           structure="LVM pv_header")
    raw_uuid, device_size = _PV_HEADER.unpack_from(block, offset)
    if not set(raw_uuid) <= _UUID_CHARACTERS:
        raise CorruptImage("PV UUID holds characters LVM never writes", offset=where, structure="LVM pv_header")
    position = offset + _PV_HEADER.size
    lists: list[tuple[DiskLocation, ...]] = []
    for _ in range(2):  # data areas, then metadata areas
        areas: list[DiskLocation] = []
        while True:
            if position + _DISK_LOCN.size > SECTOR:
                raise CorruptImage("pv_header area list runs past its sector", offset=sector * SECTOR + position,
                                   structure="LVM pv_header")
            area_offset, area_size = _DISK_LOCN.unpack_from(block, position)
            position += _DISK_LOCN.size
            if area_offset == 0:  # the list's end (LVM stops at a zero offset)
                break
            areas.append(DiskLocation(area_offset, area_size))
        lists.append(tuple(areas))
    return PvLabel(sector=sector, uuid=lvm_uuid(raw_uuid), device_size=device_size, data_areas=lists[0],
                   metadata_areas=lists[1])


# -- the metadata area --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawLocation:
    """One raw_locn slot: where a copy of the metadata text lies in its area (offset from the area's start)."""

    offset: int
    size: int
    checksum: int
    flags: int

    @property
    def ignored(self) -> bool:
        return bool(self.flags & RAW_LOCN_IGNORED)


@dataclass(frozen=True)
class MdaHeader:
    start: int
    size: int
    #: slot 0 is the committed metadata, slot 1 (when present) the precommitted
    locations: tuple[RawLocation, ...]


def parse_mda_header(block: bytes, where: int = 0) -> MdaHeader:
    """A metadata area's header sector (``where``: its offset, for messages)."""
    if len(block) < MDA_HEADER_SIZE:
        raise CorruptImage("the disk ends inside an LVM metadata area header", offset=where, structure="LVM mda_header")
    checksum, magic, version, start, size = _MDA_HEADER.unpack_from(block)
    if magic != FMTT_MAGIC:
        raise CorruptImage("LVM metadata area header without its magic", offset=where, structure="LVM mda_header")
    if checksum != lvm_crc(block[4:MDA_HEADER_SIZE]):
        raise CorruptImage("LVM metadata area header checksum mismatch", offset=where, structure="LVM mda_header")
    if version != FMTT_VERSION:
        raise CorruptImage(f"LVM metadata area header version {version}", offset=where, structure="LVM mda_header")
    locations = []
    for position in range(_MDA_HEADER.size, MDA_HEADER_SIZE - _RAW_LOCN.size + 1, _RAW_LOCN.size):
        location = RawLocation(*_RAW_LOCN.unpack_from(block, position))
        if location.offset == 0:  # the list's end
            break
        locations.append(location)
    return MdaHeader(start=start, size=size, locations=tuple(locations))


def metadata_text_ranges(header: MdaHeader) -> list[tuple[int, int]] | None:
    """Where the committed metadata text lies in its area, as (offset from the area's start, length) pieces:
    one, or two when the text wraps around the circular buffer. None when the area holds no metadata (a PV
    in no volume group) or its metadata is marked to be ignored."""
    if not header.locations:
        return None
    committed = header.locations[0]
    if committed.ignored or committed.size == 0:
        return None
    if header.size <= MDA_HEADER_SIZE:
        raise CorruptImage(f"LVM metadata area of {header.size} bytes has no room for text", offset=header.start,
                           structure="LVM mda_header")
    if not MDA_HEADER_SIZE <= committed.offset < header.size or committed.size > header.size - MDA_HEADER_SIZE:
        raise CorruptImage(f"LVM metadata text ({committed.size} bytes at {committed.offset}) lies outside its "
                           f"area of {header.size} bytes", offset=header.start, structure="LVM raw_locn")
    if committed.size > MAX_METADATA_TEXT:
        raise CorruptImage(f"LVM metadata text of {committed.size} bytes, more than the {MAX_METADATA_TEXT} read",
                           offset=header.start, structure="LVM raw_locn")
    first = min(committed.size, header.size - committed.offset)
    ranges = [(committed.offset, first)]
    if first < committed.size:
        ranges.append((MDA_HEADER_SIZE, committed.size - first))
    return ranges


def check_metadata_text(text: bytes, header: MdaHeader) -> None:
    """CorruptImage unless ``text`` (the committed copy, unwrapped) has the checksum its slot records."""
    if lvm_crc(text) != header.locations[0].checksum:
        raise CorruptImage("LVM metadata text checksum mismatch", offset=header.start, structure="LVM metadata")


# -- the text format ----------------------------------------------------------------------------------------

ConfigScalar = int | float | str
ConfigValue = ConfigScalar | list[ConfigScalar]


@dataclass
class ConfigSection:
    """A ``name { ... }`` section: its values and its subsections, in the order written."""

    name: str
    values: dict[str, ConfigValue] = field(default_factory=dict)
    sections: dict[str, ConfigSection] = field(default_factory=dict)


#: one token after blanks (the alternatives cannot start with a blank, so a failed match backtracks once)
_TOKEN = re.compile(
    r"""\s*(?:(?P<punct>[{}\[\],=])
       |(?P<comment>\#[^\n]*)
       |"(?P<quoted>(?:[^"\\]|\\.)*)"   # a string; a backslash escapes the next character
       |'(?P<single>[^']*)'             # a string without escapes
       |(?P<word>[^\s\#={}\[\],"']+)    # a name, a number or a bare string
       |(?P<end>\Z))""",
    re.VERBOSE | re.DOTALL,
)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


class _Tokens:
    """The tokens of a metadata text, one at a time, as (kind, text) with kind one of "punct", "string",
    "word", "end"."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def next(self) -> tuple[str, str]:
        while True:
            found = _TOKEN.match(self.text, self.position)
            if found is None:
                raise CorruptImage(f"LVM metadata: a string not closed after character {self.position}",
                                   structure="LVM metadata")
            self.position = found.end()
            kind = found.lastgroup
            if kind != "comment":
                break
        if kind == "quoted":
            return "string", _ESCAPE.sub(r"\1", found.group("quoted"))
        if kind == "single":
            return "string", found.group("single")
        if kind == "end" or kind is None:
            return "end", ""
        return kind, found.group(kind)


class _ConfigParser:
    def __init__(self, text: str) -> None:
        self.tokens = _Tokens(text)
        self.nodes = 0

    def _count(self) -> None:
        self.nodes += 1
        if self.nodes > MAX_CONFIG_NODES:
            raise CorruptImage(f"LVM metadata with more than {MAX_CONFIG_NODES} values", structure="LVM metadata")

    def _error(self, message: str) -> CorruptImage:
        return CorruptImage(f"LVM metadata: {message} (near byte {self.tokens.position})", structure="LVM metadata")

    def parse(self) -> ConfigSection:
        root = ConfigSection("")
        stack = [root]
        while True:
            kind, text = self.tokens.next()
            if kind == "end":
                if len(stack) > 1:
                    raise self._error(f"section {stack[-1].name!r} is not closed")
                return root
            if kind == "punct" and text == "}":
                if len(stack) == 1:
                    raise self._error("'}' closes no section")
                stack.pop()
                continue
            if kind not in ("word", "string") or not text:
                raise self._error(f"a name expected, found {text!r}")
            section = stack[-1]
            if text in section.values or text in section.sections:
                raise self._error(f"{text!r} appears twice in section {section.name!r}")
            self._count()
            kind_after, after = self.tokens.next()
            if kind_after == "punct" and after == "{":
                if len(stack) > MAX_CONFIG_DEPTH:
                    raise self._error(f"sections nested deeper than {MAX_CONFIG_DEPTH}")
                child = ConfigSection(text)
                section.sections[text] = child
                stack.append(child)
            elif kind_after == "punct" and after == "=":
                section.values[text] = self._value()
            else:
                raise self._error(f"'=' or '{{' expected after {text!r}")

    def _value(self) -> ConfigValue:
        kind, text = self.tokens.next()
        if kind == "punct" and text == "[":
            items: list[ConfigScalar] = []
            kind, text = self.tokens.next()
            while not (kind == "punct" and text == "]"):
                items.append(self._scalar(kind, text))
                self._count()
                kind, text = self.tokens.next()
                if kind == "punct" and text == ",":
                    kind, text = self.tokens.next()
            return items
        return self._scalar(kind, text)

    def _scalar(self, kind: str, text: str) -> ConfigScalar:
        if kind == "string":
            return text
        if kind != "word":
            raise self._error(f"a value expected, found {text or 'the end'!r}")
        if _INTEGER.fullmatch(text):
            if len(text.lstrip("+-")) > MAX_INTEGER_DIGITS:
                raise self._error(f"integer of {len(text)} digits")
            return int(text)
        if _FLOAT.fullmatch(text):
            if len(text) > 2 * MAX_INTEGER_DIGITS:
                raise self._error(f"number of {len(text)} characters")
            return float(text)
        if text[0] in "0123456789+-.":
            raise self._error(f"{text[:40]!r} is not a number")
        return text  # a bare string


def parse_config(text: bytes) -> ConfigSection:
    """LVM's configuration text (libdm's syntax) as nested sections; the text ends at its first NUL.
    Duplicate names in one section are refused (LVM never writes them)."""
    if len(text) > MAX_METADATA_TEXT:
        raise CorruptImage(f"LVM metadata text of {len(text)} bytes, more than the {MAX_METADATA_TEXT} read",
                           structure="LVM metadata")
    return _ConfigParser(text.split(b"\0", 1)[0].decode("utf-8", errors="replace")).parse()


# -- volume group metadata ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PvEntry:
    """A PV as the volume group's metadata lists it (sizes in 512-byte sectors)."""

    key: str  # "pv0", the name segments use
    uuid: str
    device: str | None  # the device it was last seen as (a hint only)
    pe_start: int
    pe_count: int
    dev_size: int | None
    status: tuple[str, ...]
    flags: tuple[str, ...]

    @property
    def marked_missing(self) -> bool:
        return "MISSING" in self.status or "MISSING" in self.flags


@dataclass(frozen=True)
class Area:
    """Where a segment's area lies: extent ``extent`` of PV ``name`` (a key of the PV list) or of LV ``name``."""

    name: str
    extent: int
    on_pv: bool


@dataclass(frozen=True)
class Segment:
    start_extent: int
    extent_count: int
    type: str  # "striped", "raid1", "mirror", "thin", ... (flags after '+' in the metadata left out)
    stripe_count: int = 1
    stripe_size: int = 0  # sectors
    areas: tuple[Area, ...] = ()
    #: extents of each area (striped: extent_count / stripe_count; mirror, raid1: extent_count)
    area_extents: int = 0
    #: sectors before the data in each raid image (a reshaped RAID)
    data_offset: int = 0
    #: the other LVs a segment names: thin_pool, origin, cow_store, metadata, pool, cache_pool, vdo_pool, ...
    references: tuple[tuple[str, str], ...] = ()


#: segment types read through their areas
_STRIPED, _MIRROR, _RAID1 = "striped", "mirror", "raid1"
#: segment types whose use of PV extents diskimg knows: in their own areas (striped, mirror), or only through
#: the LVs they name, whose segments hold the extents (and every "raid*" type: its images are LVs)
_KNOWN_SEGMENT_TYPES = frozenset({"striped", "mirror", "thin", "thin-pool", "snapshot", "cache", "cache-pool",
                                  "writecache", "vdo", "vdo-pool", "integrity", "error", "zero"})
#: keys of a segment naming another LV, by segment types LVM2 writes (thin, snapshot, cache, VDO, ...)
_REFERENCE_KEYS = ("thin_pool", "origin", "external_origin", "merge", "cow_store", "merging_store", "metadata",
                   "pool", "cache_pool", "data", "vdo_pool", "writecache", "meta_dev", "mirror_log")


@dataclass(frozen=True)
class LvEntry:
    name: str
    uuid: str
    status: tuple[str, ...]
    flags: tuple[str, ...]
    segments: tuple[Segment, ...]  # in order, from extent 0, without gaps

    @property
    def extent_count(self) -> int:
        last = self.segments[-1]
        return last.start_extent + last.extent_count

    @property
    def visible(self) -> bool:
        return "VISIBLE" in self.status

    @property
    def segment_kind(self) -> str:
        """"linear" or "striped" when every segment is striped; else the first other segment type."""
        types = [segment.type for segment in self.segments]
        if all(kind == _STRIPED for kind in types):
            return "linear" if all(segment.stripe_count == 1 for segment in self.segments) else "striped"
        return next(kind for kind in types if kind != _STRIPED)


@dataclass(frozen=True)
class VgMetadata:
    """One volume group as its metadata text describes it (sizes in 512-byte sectors)."""

    name: str
    uuid: str
    seqno: int
    extent_size: int
    status: tuple[str, ...]
    physical_volumes: dict[str, PvEntry]  # by key ("pv0")
    logical_volumes: dict[str, LvEntry]  # by name

    @property
    def extent_bytes(self) -> int:
        return self.extent_size * SECTOR


def _get(section: ConfigSection, key: str, where: str) -> ConfigValue:
    if key not in section.values:
        raise CorruptImage(f"LVM metadata: {where} has no {key}", structure="LVM metadata")
    return section.values[key]


def _integer(section: ConfigSection, key: str, where: str, low: int = 0, high: int = _U64) -> int:
    value = _get(section, key, where)
    if not isinstance(value, int) or not low <= value <= high:
        raise CorruptImage(f"LVM metadata: {where}: {key} = {str(value)[:40]} (from {low} to {high} expected)",
                           structure="LVM metadata")
    return value


def _optional_integer(section: ConfigSection, key: str, where: str, high: int) -> int | None:
    return _integer(section, key, where, 0, high) if key in section.values else None


def _string(section: ConfigSection, key: str, where: str) -> str:
    value = _get(section, key, where)
    if not isinstance(value, str):
        raise CorruptImage(f"LVM metadata: {where}: {key} is not a string", structure="LVM metadata")
    return value


def _strings(section: ConfigSection, key: str, where: str) -> tuple[str, ...]:
    value = section.values.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CorruptImage(f"LVM metadata: {where}: {key} is not a list of strings", structure="LVM metadata")
    return tuple(str(item) for item in value)


def parse_metadata(text: bytes) -> VgMetadata:
    """The volume group a metadata text describes. CorruptImage for what LVM would refuse to load: missing
    keys, values out of range, segments with gaps or overlaps, areas naming absent PVs or LVs or extents past
    them, LVs stacked in a cycle, and for more than the caps allow."""
    root = parse_config(text)
    contents = root.values.get("contents")
    version = root.values.get("version")
    if contents != CONTENTS_VALUE or version != FORMAT_VERSION_VALUE:
        raise CorruptImage(f"LVM metadata of contents {str(contents)[:40]!r} version {str(version)[:20]}, not "
                           f"{CONTENTS_VALUE!r} version {FORMAT_VERSION_VALUE}", structure="LVM metadata")
    if len(root.sections) != 1:
        raise CorruptImage(f"LVM metadata with {len(root.sections)} volume group sections", structure="LVM metadata")
    vg = next(iter(root.sections.values()))
    where = f"volume group {vg.name}"
    pv_sections = vg.sections.get("physical_volumes", ConfigSection("physical_volumes")).sections
    lv_sections = vg.sections.get("logical_volumes", ConfigSection("logical_volumes")).sections
    if len(pv_sections) > MAX_PHYSICAL_VOLUMES or len(lv_sections) > MAX_LOGICAL_VOLUMES:
        raise CorruptImage(f"LVM metadata: {where} lists {len(pv_sections)} PVs and {len(lv_sections)} LVs "
                           f"(at most {MAX_PHYSICAL_VOLUMES} and {MAX_LOGICAL_VOLUMES} read)", structure="LVM metadata")
    physical_volumes = {key: _parse_pv(section) for key, section in pv_sections.items()}
    if len({pv.uuid for pv in physical_volumes.values()}) != len(physical_volumes):
        raise CorruptImage(f"LVM metadata: {where} lists a PV twice", structure="LVM metadata")
    segment_sections = sum(len(section.sections) for section in lv_sections.values())
    if segment_sections > MAX_SEGMENTS:
        raise CorruptImage(f"LVM metadata: {where} has {segment_sections} segments, more than the {MAX_SEGMENTS} "
                           "read", structure="LVM metadata")
    logical_volumes = {name: _parse_lv(section, physical_volumes) for name, section in lv_sections.items()}
    metadata = VgMetadata(
        name=vg.name,
        uuid=_string(vg, "id", where),
        seqno=_integer(vg, "seqno", where, 0, _U32),
        extent_size=_integer(vg, "extent_size", where, 1, _U32),
        status=_strings(vg, "status", where),
        physical_volumes=physical_volumes,
        logical_volumes=logical_volumes,
    )
    _check_areas(metadata)
    return metadata


def _parse_pv(section: ConfigSection) -> PvEntry:
    where = f"physical volume {section.name}"
    device = section.values.get("device")
    return PvEntry(
        key=section.name,
        uuid=_string(section, "id", where),
        device=device if isinstance(device, str) else None,
        pe_start=_integer(section, "pe_start", where),
        pe_count=_integer(section, "pe_count", where, 0, _U32),
        dev_size=_optional_integer(section, "dev_size", where, _U64),
        status=_strings(section, "status", where),
        flags=_strings(section, "flags", where),
    )


def _parse_lv(section: ConfigSection, physical_volumes: dict[str, PvEntry]) -> LvEntry:
    where = f"logical volume {section.name}"
    segment_count = _integer(section, "segment_count", where, 1, _U32)
    if segment_count != len(section.sections):
        raise CorruptImage(f"LVM metadata: {where} has {len(section.sections)} segments, segment_count says "
                           f"{segment_count}", structure="LVM metadata")
    segments = sorted((_parse_segment(child, f"{where}, {child.name}", physical_volumes)
                       for child in section.sections.values()), key=lambda segment: segment.start_extent)
    expected = 0
    for segment in segments:  # no gaps, no overlaps (LVM's check_lv_segments)
        if segment.start_extent != expected:
            raise CorruptImage(f"LVM metadata: {where} has a segment at extent {segment.start_extent}, "
                               f"{expected} expected", structure="LVM metadata")
        expected += segment.extent_count
    return LvEntry(name=section.name, uuid=_string(section, "id", where), status=_strings(section, "status", where),
                   flags=_strings(section, "flags", where), segments=tuple(segments))


def _parse_segment(section: ConfigSection, where: str, physical_volumes: dict[str, PvEntry]) -> Segment:
    start = _integer(section, "start_extent", where, 0, _U32)
    count = _integer(section, "extent_count", where, 1, _U32)
    kind = _string(section, "type", where).split("+", 1)[0]  # "+FLAG" suffixes carry LV flags
    references = tuple((key, value) for key in _REFERENCE_KEYS if isinstance(value := section.values.get(key), str))
    stripes, stripe_size, data_offset, area_extents = 1, 0, 0, count
    areas: tuple[Area, ...] = ()
    if kind == _STRIPED:
        stripes = _integer(section, "stripe_count", where, 1, MAX_AREAS)
        stripe_size = _integer(section, "stripe_size", where, 1, _U32) if stripes > 1 else 0
        if count % stripes:
            raise CorruptImage(f"LVM metadata: {where}: {count} extents over {stripes} stripes",
                               structure="LVM metadata")
        areas = _area_pairs(section, "stripes", stripes, where, physical_volumes)
        area_extents = count // stripes
    elif kind == _MIRROR:
        legs = _integer(section, "mirror_count", where, 1, MAX_AREAS)
        areas = _area_pairs(section, "mirrors", legs, where, physical_volumes)
    elif kind == _RAID1:
        legs = _integer(section, "device_count", where, 1, MAX_AREAS)
        data_offset = _optional_integer(section, "data_offset", where, _U32) or 0
        areas = _raid_images(section, legs, where)
    return Segment(start, count, kind, stripes, stripe_size, areas, area_extents, data_offset, references)


def _area_pairs(section: ConfigSection, key: str, count: int, where: str,
                physical_volumes: dict[str, PvEntry]) -> tuple[Area, ...]:
    """A "stripes"/"mirrors" list: (PV key or LV name, extent) pairs; a PV key is looked up first, as LVM does."""
    value = _get(section, key, where)
    if not isinstance(value, list) or len(value) != 2 * count:
        raise CorruptImage(f"LVM metadata: {where}: {key} does not hold {count} (volume, extent) pairs",
                           structure="LVM metadata")
    areas = []
    for name, extent in zip(value[0::2], value[1::2], strict=True):
        if not isinstance(name, str) or not isinstance(extent, int) or not 0 <= extent <= _U32:
            raise CorruptImage(f"LVM metadata: {where}: {key} holds {str(name)[:40]!r}, {str(extent)[:20]}",
                               structure="LVM metadata")
        areas.append(Area(name, extent, on_pv=name in physical_volumes))
    return tuple(areas)


def _raid_images(section: ConfigSection, count: int, where: str) -> tuple[Area, ...]:
    """A raid "raids" list: each image LV, after its metadata LV where it has one (LVM tells them apart by
    "_rmeta_" in the name)."""
    value = _get(section, "raids", where)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CorruptImage(f"LVM metadata: {where}: raids is not a list of names", structure="LVM metadata")
    images = [str(name) for name in value if "_rmeta_" not in str(name)]
    if len(images) != count or len(value) - len(images) not in (0, count):
        raise CorruptImage(f"LVM metadata: {where}: raids does not list {count} images", structure="LVM metadata")
    return tuple(Area(name, 0, on_pv=False) for name in images)


def _check_areas(vg: VgMetadata) -> None:
    """Every area names a PV or an LV of the group and lies within it; no LV is stacked on itself, none deeper
    than MAX_STACK_DEPTH."""
    for lv in vg.logical_volumes.values():
        for segment in lv.segments:
            for area in segment.areas:
                if area.on_pv:
                    extents = vg.physical_volumes[area.name].pe_count
                elif area.name in vg.logical_volumes:
                    extents = vg.logical_volumes[area.name].extent_count
                else:
                    raise CorruptImage(f"LVM metadata: LV {lv.name} uses {area.name[:80]!r}, which is neither a PV "
                                       f"nor an LV of {vg.name}", structure="LVM metadata")
                end = area.extent + segment.area_extents + _ceil_div(segment.data_offset, vg.extent_size)
                if end > extents:
                    raise CorruptImage(f"LVM metadata: LV {lv.name} uses extents {area.extent}-{end - 1} of "
                                       f"{area.name}, which has {extents}", structure="LVM metadata")
    depth: dict[str, int] = {}
    for name in vg.logical_volumes:
        _stack_depth(vg, name, depth, set())


def _stack_depth(vg: VgMetadata, name: str, depth: dict[str, int], path: set[str]) -> int:
    """How many LVs lie under ``name`` through its areas; CorruptImage on a cycle or too deep a stack
    (``path``: the LVs above, at most MAX_STACK_DEPTH, so the recursion is bounded)."""
    if name in depth:
        return depth[name]
    if name in path:
        raise CorruptImage(f"LVM metadata: LV {name} is stacked on itself", structure="LVM metadata")
    if len(path) >= MAX_STACK_DEPTH:
        raise CorruptImage(f"LVM metadata: LVs stacked deeper than {MAX_STACK_DEPTH}", structure="LVM metadata")
    path.add(name)
    below = {area.name for segment in vg.logical_volumes[name].segments for area in segment.areas if not area.on_pv}
    depth[name] = max((_stack_depth(vg, child, depth, path) + 1 for child in below), default=0)
    path.discard(name)
    return depth[name]


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


# -- reading the disks ------------------------------------------------------------------------------------------


def _read_exact(disk: Disk, offset: int, length: int, structure: str) -> bytes:
    data = disk.read_at(offset, length)
    if len(data) != length:
        raise CorruptImage(f"the disk ends inside the {structure}", offset=offset, structure=structure)
    return data


@dataclass
class PhysicalVolume:
    """A PV found on a disk: the area it spans (``offset``, ``length`` in bytes of ``disk``) and the newest
    copy of the metadata its areas hold (None: it has none, or it is in no volume group)."""

    disk: Disk
    offset: int
    length: int
    label: PvLabel
    metadata: VgMetadata | None
    #: the index of its area in the list given to :func:`find_volume_groups`
    source: int = 0

    @property
    def uuid(self) -> str:
        return self.label.uuid


@dataclass(frozen=True)
class LvmProblem:
    """Something found that could not be used: a damaged label, metadata area or metadata text, a PV or
    volume group seen twice. ``source`` is the index of the area given, ``offset`` where on its disk."""

    message: str
    source: int | None = None
    offset: int | None = None


def read_physical_volume(disk: Disk, offset: int, length: int, problems: list[LvmProblem] | None = None,
                         source: int = 0) -> PhysicalVolume | None:
    """The PV in ``length`` bytes at ``offset`` of ``disk`` (a partition or a whole disk), or None when it
    holds no LVM label. A damaged label raises CorruptImage; a damaged metadata area is added to
    ``problems`` and the other area (a PV may have two) used."""
    head = disk.read_at(offset, min(length, LABEL_SCAN_SECTORS * SECTOR))
    try:
        label = parse_label(head)
    except CorruptImage as exc:
        exc.offset = offset + (exc.offset or 0)
        raise
    if label is None:
        return None
    newest: VgMetadata | None = None
    for area in label.metadata_areas[:MAX_METADATA_AREAS]:
        try:
            found = _read_metadata_area(disk, offset, length, area)
        except CorruptImage as exc:
            if problems is not None:
                problems.append(LvmProblem(f"PV {label.uuid}: {exc}", source, offset + area.offset))
            continue
        if found is not None and (newest is None or found.seqno > newest.seqno):
            newest = found
    return PhysicalVolume(disk, offset, length, label, newest, source)


def _read_metadata_area(disk: Disk, pv_offset: int, pv_length: int, area: DiskLocation) -> VgMetadata | None:
    if area.offset + MDA_HEADER_SIZE > pv_length:
        raise CorruptImage(f"metadata area at {area.offset} lies past the PV's {pv_length} bytes",
                           offset=pv_offset + area.offset, structure="LVM pv_header")
    where = pv_offset + area.offset
    header = parse_mda_header(_read_exact(disk, where, MDA_HEADER_SIZE, "LVM mda_header"), where)
    if header.start != area.offset:
        raise CorruptImage(f"metadata area header says it starts at {header.start}, the label at {area.offset}",
                           offset=where, structure="LVM mda_header")
    ranges = metadata_text_ranges(header)
    if ranges is None:
        return None
    if area.offset + header.size > pv_length:
        raise CorruptImage(f"metadata area of {header.size} bytes runs past the PV's {pv_length} bytes",
                           offset=where, structure="LVM mda_header")
    text = b"".join(_read_exact(disk, where + start, size, "LVM metadata") for start, size in ranges)
    check_metadata_text(text, header)
    try:
        return parse_metadata(text)
    except CorruptImage as exc:
        exc.offset = where + ranges[0][0]
        raise


# -- volume groups and logical volumes as volumes ------------------------------------------------------------

#: what each kind of LV the reader does not read is, in words (by segment type)
_NOT_READ = {
    "thin": "a thin volume: its blocks are mapped by the thin pool's own metadata, which diskimg does not read",
    "thin-pool": "a thin pool: it holds thin volumes, not a file system",
    "snapshot": "a snapshot: its changed blocks live in a copy-on-write store, which diskimg does not read",
    "cache": "a cached volume: its newest blocks may be in the cache, which diskimg does not read",
    "cache-pool": "a cache pool: it caches another volume",
    "writecache": "a write-cached volume: its newest blocks may be in the cache, which diskimg does not read",
    "vdo": "a VDO volume: deduplicated and compressed by the VDO pool, which diskimg does not read",
    "vdo-pool": "a VDO pool: it holds a VDO volume, not a file system",
    "integrity": "a volume with dm-integrity metadata interleaved, which diskimg does not read",
    "error": "an error volume: every read of it fails",
    "zero": "a zero volume: it reads as zeros and holds nothing",
}


@dataclass(frozen=True)
class MissingPhysicalVolume:
    """A PV the volume group spans that none of the disks given holds (or that its metadata marks missing)."""

    vg_name: str
    uuid: str
    device: str | None  # the device it was last seen as (a hint only)
    logical_volumes: tuple[str, ...]  # the LVs with extents on it
    marked_missing: bool = False  # the metadata itself says LVM found it missing

    @property
    def message(self) -> str:
        seen = f" (last seen as {self.device})" if self.device else ""
        where = "which its metadata marks missing" if self.marked_missing else "which is on none of the disks given"
        uses = f"; it holds extents of {', '.join(self.logical_volumes)}" if self.logical_volumes else ""
        return f"volume group {self.vg_name} spans physical volume {self.uuid}{seen}, {where}{uses}"


@dataclass(frozen=True)
class LogicalVolume:
    """An LV of an assembled volume group: what it is and whether it can be read from the disks given."""

    vg_name: str
    name: str
    uuid: str
    kind: str  # "linear", "striped", "raid1", "mirror", "thin", "thin-pool", "snapshot", "cache", "vdo", ...
    size: int  # bytes
    visible: bool  # False for the sub-volumes LVM hides (raid images, thin pool data, ...)
    unreadable_reason: str | None

    @property
    def path(self) -> str:
        """``VG/LV``, as in ``/dev/VG/LV``."""
        return f"{self.vg_name}/{self.name}"

    @property
    def mapper_name(self) -> str:
        """The device-mapper name, as in ``/dev/mapper/VG-LV`` (dashes inside each name doubled)."""
        return f"{self.vg_name.replace('-', '--')}-{self.name.replace('-', '--')}"


class VolumeGroup:
    """A volume group assembled from the PVs found: its newest metadata, the PVs present and missing, and its
    LVs, each readable through :meth:`open` unless its ``unreadable_reason`` says why not."""

    def __init__(self, metadata: VgMetadata, found: dict[str, PhysicalVolume]) -> None:
        self.metadata = metadata
        #: the group's PVs among those found, by UUID (those its metadata marks missing left out)
        self.physical_volumes = {pv.uuid: found[pv.uuid] for pv in metadata.physical_volumes.values()
                                 if pv.uuid in found and not pv.marked_missing}
        self._reasons: dict[str, str | None] = {}
        self._legs: dict[tuple[str, int], Area] = {}  # (LV, segment index) -> the leg read
        self._segment_starts: dict[str, list[int]] = {}  # LV -> the byte where each of its segments starts
        #: the copy-on-write store of each (old-style) snapshot -> (its origin, whether it is merging into it)
        self._snapshot_stores: dict[str, tuple[str, bool]] = {}
        for lv in metadata.logical_volumes.values():
            for segment in lv.segments:
                named = dict(segment.references)
                store = named.get("cow_store") or named.get("merging_store")
                if segment.type == "snapshot" and store and "origin" in named:
                    self._snapshot_stores[store] = (named["origin"], "merging_store" in named)
        self.missing = [self._missing(pv) for pv in metadata.physical_volumes.values()
                        if pv.uuid not in self.physical_volumes]
        self.logical_volumes = [self._logical_volume(lv) for lv in metadata.logical_volumes.values()]

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def uuid(self) -> str:
        return self.metadata.uuid

    def logical_volume(self, name: str) -> LogicalVolume | None:
        return next((lv for lv in self.logical_volumes if lv.name == name), None)

    def open(self, name: str) -> LvmVolume:
        """LV ``name`` as a volume; UnsupportedFormat when it cannot be read (its ``unreadable_reason``)."""
        lv = self.logical_volume(name)
        if lv is None:
            raise UnsupportedFormat(f"volume group {self.name} has no logical volume {name}", format="lvm2")
        if lv.unreadable_reason is not None:
            raise UnsupportedFormat(f"{lv.path}: {lv.unreadable_reason}", format="lvm2")
        return LvmVolume(self, self.metadata.logical_volumes[name])

    def _missing(self, pv: PvEntry) -> MissingPhysicalVolume:
        users = tuple(lv.name for lv in self.metadata.logical_volumes.values()
                      if any(area.on_pv and area.name == pv.key for segment in lv.segments for area in segment.areas))
        return MissingPhysicalVolume(self.name, pv.uuid, pv.device, users, pv.marked_missing)

    def _logical_volume(self, lv: LvEntry) -> LogicalVolume:
        kind = "snapshot" if lv.name in self._snapshot_stores else lv.segment_kind
        return LogicalVolume(self.name, lv.name, lv.uuid, kind, lv.extent_count * self.metadata.extent_bytes,
                             self._visible(lv), self._reason(lv.name))

    def _visible(self, lv: LvEntry) -> bool:
        """Whether LVM shows the LV (lv_is_visible): a snapshot's store as its origin is, unless it is merging; the
        internal snapshot LV never; others by their VISIBLE flag."""
        seen = set()
        while lv.name in self._snapshot_stores and lv.name not in seen:
            seen.add(lv.name)
            origin, merging = self._snapshot_stores[lv.name]
            if merging or origin not in self.metadata.logical_volumes:
                return False
            lv = self.metadata.logical_volumes[origin]
        return lv.visible and lv.segment_kind != "snapshot"

    def _reason(self, name: str) -> str | None:
        """Why LV ``name`` cannot be read, or None (the stack below it is bounded by ``_check_areas``)."""
        if name in self._reasons:
            return self._reasons[name]
        lv = self.metadata.logical_volumes[name]
        reason: str | None = None
        if name in self._snapshot_stores:
            reason = _NOT_READ["snapshot"]
        elif "REBUILD" in lv.status:
            reason = "a RAID image marked for rebuild"
        for index, segment in enumerate(lv.segments):
            if reason is not None:
                break
            if segment.type == _STRIPED:
                reason = _stripe_reason(segment, self.metadata.extent_bytes) or next(
                    filter(None, (self._area_reason(segment, area) for area in segment.areas)), None)
            elif segment.type in (_MIRROR, _RAID1):
                reasons = []
                for area in segment.areas:
                    leg_reason = self._area_reason(segment, area)
                    if leg_reason is None:
                        self._legs[(name, index)] = area
                        break
                    reasons.append(f"{area.name}: {leg_reason}")
                else:
                    reason = f"no leg of the {segment.type} can be read ({'; '.join(reasons)})"
            else:
                reason = _NOT_READ.get(segment.type, f"of segment type {segment.type}, which diskimg does not read")
        self._reasons[name] = reason
        return reason

    def _area_reason(self, segment: Segment, area: Area) -> str | None:
        if not area.on_pv:
            below = self._reason(area.name)
            return None if below is None else f"{area.name} is {below}"
        entry = self.metadata.physical_volumes[area.name]
        pv = self.physical_volumes.get(entry.uuid)
        if pv is None:
            marked = " (marked missing in the metadata)" if entry.marked_missing else ""
            return f"its physical volume {entry.uuid} is missing{marked}"
        end = entry.pe_start * SECTOR + (area.extent + segment.area_extents) * self.metadata.extent_bytes
        if end > pv.length:
            return f"its extents end at byte {end} of physical volume {entry.uuid}, which has {pv.length}"
        return None

    # -- free extents --

    def free_extent_ranges(self) -> list[tuple[PhysicalVolume, int, int]]:
        """(PV, byte offset from the PV's start, length) of the extents no segment of any LV uses (hidden LVs
        included: RAID images, thin pool data, snapshot stores, pvmove), PV by PV in extent order: what
        ``--sparsify`` leaves out of the PVs besides what the LVs' own file systems free.

        NotSparsifiable when a PV of the group is missing (the newest metadata, which may use more extents,
        may be on it) or an LV has a segment type whose use of extents diskimg cannot tell; CorruptImage when
        two segments use one extent."""
        from ..fs.base import NotSparsifiable  # fs/ is loaded only when this is asked

        if self.missing:
            raise NotSparsifiable(self.missing[0].message)
        unknown = sorted({segment.type for lv in self.metadata.logical_volumes.values() for segment in lv.segments
                          if segment.type not in _KNOWN_SEGMENT_TYPES and not segment.type.startswith("raid")})
        if unknown:
            raise NotSparsifiable(f"volume group {self.name} has segments of type {', '.join(unknown)}, whose use "
                                  "of the physical extents diskimg does not know")
        used: dict[str, list[tuple[int, int]]] = {}
        for lv in self.metadata.logical_volumes.values():
            for segment in lv.segments:
                for area in segment.areas:
                    if area.on_pv:
                        used.setdefault(area.name, []).append((area.extent, area.extent + segment.area_extents))
        extent_bytes = self.metadata.extent_bytes
        free = []
        for key, entry in self.metadata.physical_volumes.items():
            pv = self.physical_volumes[entry.uuid]
            base = entry.pe_start * SECTOR
            position = 0
            for first, end in [*sorted(used.get(key, [])), (entry.pe_count, entry.pe_count)]:
                if first < position:
                    raise CorruptImage(f"LVM metadata: extent {first} of PV {entry.uuid} is used twice",
                                       structure="LVM metadata")
                start, stop = base + position * extent_bytes, min(base + first * extent_bytes, pv.length)
                if stop > start:
                    free.append((pv, start, stop - start))
                position = end
        return free

    # -- mapping an LV's bytes onto the disks --

    def locate(self, lv: LvEntry, offset: int, length: int, every_copy: bool = False
               ) -> Iterator[tuple[Disk, int, int]]:
        """The (disk, offset, length) pieces holding ``length`` bytes at ``offset`` of ``lv``, an LV whose
        ``unreadable_reason`` is None (the bounds were checked by ``parse_metadata`` and ``_area_reason``).
        A raid1 or mirror segment's bytes are where its chosen leg holds them, or with ``every_copy`` on
        each of its legs that can be read, one after the other."""
        extent_bytes = self.metadata.extent_bytes
        starts = self._segment_starts.get(lv.name)
        if starts is None:
            starts = self._segment_starts[lv.name] = [segment.start_extent * extent_bytes for segment in lv.segments]
        end = offset + length
        index = bisect.bisect_right(starts, offset) - 1
        while offset < end:
            segment = lv.segments[index]
            local = offset - starts[index]
            size = min(end, starts[index] + segment.extent_count * extent_bytes) - offset
            if segment.type == _STRIPED:
                yield from self._striped(segment, local, size, every_copy)
            else:  # mirror or raid1: the leg chosen by _reason, or every leg that can be read
                legs = ([area for area in segment.areas if self._area_reason(segment, area) is None] if every_copy
                        else [self._legs[(lv.name, index)]])
                for leg in legs:
                    yield from self._area(leg, segment.data_offset * SECTOR + local, size, every_copy)
            offset += size
            index += 1

    def _striped(self, segment: Segment, local: int, size: int, every_copy: bool) -> Iterator[tuple[Disk, int, int]]:
        if segment.stripe_count == 1:
            yield from self._area(segment.areas[0], local, size, every_copy)
            return
        chunk = segment.stripe_size * SECTOR  # dm-stripe: chunks go round the stripes in turn
        end = local + size
        while local < end:
            number, within = divmod(local, chunk)
            row, stripe = divmod(number, segment.stripe_count)
            piece = min(chunk - within, end - local)
            yield from self._area(segment.areas[stripe], row * chunk + within, piece, every_copy)
            local += piece

    def _area(self, area: Area, offset: int, size: int, every_copy: bool) -> Iterator[tuple[Disk, int, int]]:
        start = area.extent * self.metadata.extent_bytes + offset
        if not area.on_pv:
            yield from self.locate(self.metadata.logical_volumes[area.name], start, size, every_copy)
            return
        entry = self.metadata.physical_volumes[area.name]
        pv = self.physical_volumes[entry.uuid]
        yield pv.disk, pv.offset + entry.pe_start * SECTOR + start, size


def _stripe_reason(segment: Segment, extent_bytes: int) -> str | None:
    """Why device-mapper would refuse the striped segment (each stripe a whole number of chunks), or None."""
    if segment.stripe_count > 1 and segment.area_extents * extent_bytes % (segment.stripe_size * SECTOR):
        return (f"its stripes of {segment.area_extents * extent_bytes} bytes are not a whole number of "
                f"{segment.stripe_size * SECTOR}-byte chunks")
    return None


class LvmVolume:
    """A logical volume read as a volume: ``size`` bytes, positional reads. It also offers ``read(offset,
    length)``, the name the file-system drivers use today, so they read it as they read a disk."""

    def __init__(self, vg: VolumeGroup, lv: LvEntry) -> None:
        self.vg = vg
        self.lv = lv
        self.name = f"{vg.name}/{lv.name}"
        self.size = lv.extent_count * vg.metadata.extent_bytes

    def locate(self, offset: int, length: int, every_copy: bool = False) -> Iterator[tuple[Disk, int, int]]:
        """The (disk, offset on it, length) pieces holding ``length`` bytes at ``offset`` of the LV, adjacent
        pieces of one disk joined: how the LV's file system's unused ranges map onto the disks. With
        ``every_copy``, a mirrored piece is given on every leg that can be read (what clearing it must clear)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{length} bytes at {offset} lie outside the {self.size} bytes of {self.name}")
        return _merged(self.vg.locate(self.lv, offset, length, every_copy))

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer past the end). CorruptImage when a disk ends before its PV."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        if length > MAX_READ:
            raise ValueError(f"read of {length} bytes exceeds the {MAX_READ}-byte limit")
        parts = []
        for disk, where, size in _merged(self.vg.locate(self.lv, offset, length)):
            parts.append(_read_exact(disk, where, size, f"LVM logical volume {self.name}"))
        return b"".join(parts)


def _merged(pieces: Iterable[tuple[Disk, int, int]]) -> Iterator[tuple[Disk, int, int]]:
    """Adjacent pieces of one disk joined, so a striped read makes one read per stripe run."""
    current: tuple[Disk, int, int] | None = None
    for disk, offset, size in pieces:
        if current is not None and current[0] is disk and current[1] + current[2] == offset:
            current = (disk, current[1], current[2] + size)
            continue
        if current is not None:
            yield current
        current = (disk, offset, size)
    if current is not None:
        yield current


# -- several disks ------------------------------------------------------------------------------------------


@dataclass
class LvmScan:
    """What :func:`find_volume_groups` found: the volume groups, every PV (those in no volume group too), and
    what could not be used."""

    volume_groups: list[VolumeGroup]
    physical_volumes: list[PhysicalVolume]
    problems: list[LvmProblem]


def find_volume_groups(areas: Iterable[tuple[Disk, int, int]]) -> LvmScan:
    """The volume groups held by ``areas``: (disk, offset, length) candidates, the partitions and whole disks of
    a machine's system and data disks. Each volume group is read from its newest metadata copy (the highest
    seqno) among its PVs; its PVs are matched by UUID. Damaged labels, areas and metadata are recorded as
    problems, not raised."""
    problems: list[LvmProblem] = []
    found: dict[str, PhysicalVolume] = {}
    for source, (disk, offset, length) in enumerate(areas):
        try:
            pv = read_physical_volume(disk, offset, length, problems, source)
        except CorruptImage as exc:
            problems.append(LvmProblem(str(exc), source, exc.offset))
            continue
        if pv is None:
            continue
        if pv.uuid in found:
            problems.append(LvmProblem(f"PV {pv.uuid} found again (first in area {found[pv.uuid].source}); "
                                       "the first is used", source, offset))
            continue
        found[pv.uuid] = pv
    newest: dict[str, VgMetadata] = {}
    for pv in found.values():
        if pv.metadata is not None:
            current = newest.get(pv.metadata.uuid)
            if current is None or pv.metadata.seqno > current.seqno:
                newest[pv.metadata.uuid] = pv.metadata
    groups = []
    for metadata in newest.values():
        groups.append(VolumeGroup(metadata, found))
    names = [group.name for group in groups]
    for name in sorted({name for name in names if names.count(name) > 1}):
        problems.append(LvmProblem(f"two volume groups are named {name} (their UUIDs differ)"))
    return LvmScan(groups, list(found.values()), problems)
