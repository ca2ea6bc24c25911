"""Formats diskimg recognises but does not read, and what to tell the user about them.

``FOREIGN`` is the table: one entry per format, with how to recognise it (a pure function over the
file's first bytes, last bytes and size), what it is called, which qemu-img driver converts it, and
the advice to give. ``probe.py`` walks the table in stages (see ``Stage``) so that weak signals
never beat strong ones.

Every recogniser is pure, total over any bytes (it returns None rather than raising), and looks
only at what ``Probe`` holds: the head (first 128 KiB), the tail (last 1 KiB, empty when unknown)
and the file size (None when unknown, e.g. inside a compressed wrapper).
"""

from __future__ import annotations

import enum
import re
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    head: bytes
    tail: bytes = b""
    file_size: int | None = None


class Stage(enum.IntEnum):
    """When probe.py tries an entry (see the order in probe.py)."""

    MAGIC = 1  # a strong signature at offset 0 (or VDI's at 0x40)
    TAIL = 2  # a trailer at the end of the file (DMG koly)
    TEXT = 3  # a text file (VMDK descriptor)
    LATE = 4  # a signature that can also be content of a RAW disk (ISO 9660)


class Advice(enum.Enum):
    CONVERT = "convert"  # qemu-img converts the file itself
    EXTENT = "extent"  # one extent of a VMDK disk: convert the descriptor that lists it
    DESCRIPTOR = "descriptor"  # a VMDK descriptor: keep its extent files beside it, then convert
    DECRYPT = "decrypt"  # LUKS
    OPTICAL = "optical"  # ISO 9660 / UDF


@dataclass(frozen=True)
class Match:
    """What a recogniser found: details that refine the description and the advice."""

    subformat: str | None = None
    version: str | None = None
    #: replaces the default description "<label> (<subformat>)"
    description: str | None = None
    #: extent files named by a VMDK descriptor
    extents: tuple[str, ...] = ()
    #: replaces the entry's advice (a VMDK sparse extent found by the KDMV recogniser)
    advice: Advice | None = None


@dataclass(frozen=True)
class Foreign:
    name: str  # the JSON "format" value
    label: str  # the name in descriptions
    stage: Stage
    recognise: Callable[[Probe], Match | None]
    qemu_driver: str | None  # the qemu-img -f name, None when qemu-img does not take the file
    advice: Advice = Advice.CONVERT


# --- helpers ---------------------------------------------------------------------------------


def _u16be(b: bytes, offset: int) -> int | None:
    return struct.unpack_from(">H", b, offset)[0] if len(b) >= offset + 2 else None


def _u32be(b: bytes, offset: int) -> int | None:
    return struct.unpack_from(">I", b, offset)[0] if len(b) >= offset + 4 else None


def _u32le(b: bytes, offset: int) -> int | None:
    return struct.unpack_from("<I", b, offset)[0] if len(b) >= offset + 4 else None


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace").strip()


_CREATE_TYPE = re.compile(rb'^\s*createType\s*=\s*"?([A-Za-z0-9_]+)"?', re.MULTILINE)
_EXTENT_LINE = re.compile(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"\r\n]*)"', re.MULTILINE)
_PARENT_CID = re.compile(rb"^\s*parentCID\s*=\s*([0-9a-fA-F]+)", re.MULTILINE)


def _descriptor_facts(text: bytes) -> tuple[str | None, tuple[str, ...], bool]:
    """createType, extent file names, and whether it is a child (parentCID set)."""
    create = _CREATE_TYPE.search(text)
    extents = tuple(m.group(1).decode("utf-8", "replace") for m in _EXTENT_LINE.finditer(text))
    parent = _PARENT_CID.search(text)
    is_child = bool(parent and parent.group(1).lower() != b"ffffffff")
    return (create.group(1).decode("ascii") if create else None), extents[:16], is_child


# --- recognisers -----------------------------------------------------------------------------

_VMDK_COMPRESSED = 1 << 16
_VMDK_MARKERS = 1 << 17


def _vmdk_sparse(p: Probe) -> Match | None:
    """Hosted sparse extent 'KDMV': monolithicSparse, streamOptimized, or one extent of a split disk."""
    head = p.head
    if head[:4] != b"KDMV" or len(head) < 80:
        return None
    version, flags = struct.unpack_from("<II", head, 4)
    descriptor_sector, descriptor_sectors = struct.unpack_from("<QQ", head, 28)
    create_type = None
    descriptor_seen = False  # the embedded descriptor area lies within the head
    if descriptor_sector > 0 and 0 < descriptor_sectors <= 2048:
        start = descriptor_sector * 512
        if start < len(head):
            descriptor_seen = True
            text = head[start : start + descriptor_sectors * 512].split(b"\0", 1)[0]
            create_type = _descriptor_facts(text)[0]
    if create_type is None:
        if version == 3 and flags & _VMDK_COMPRESSED and flags & _VMDK_MARKERS:
            create_type = "streamOptimized"
        elif descriptor_sector == 0 or descriptor_seen:  # no descriptor, or an empty one
            return Match(
                subformat="sparseExtent",
                version=str(version),
                description="VMDK sparse extent (one piece of a split or snapshot disk, no descriptor inside)",
                advice=Advice.EXTENT,
            )
        else:
            create_type = "monolithicSparse"
    return Match(subformat=create_type, version=str(version))


def _vmdk_cowd(p: Probe) -> Match | None:
    if p.head[:4] != b"COWD":
        return None
    return Match(subformat="COWD", version=str(_u32le(p.head, 4)),
                 description="VMDK ESX COWD sparse extent (vmfsSparse)")


_SESPARSE_MAGIC = struct.pack("<Q", 0xCAFEBABE)


def _vmdk_sesparse(p: Probe) -> Match | None:
    if p.head[:8] != _SESPARSE_MAGIC:
        return None
    return Match(subformat="seSparse", description="VMDK seSparse extent (an ESXi snapshot delta)")


def _looks_like_text(b: bytes) -> bool:
    return bool(b) and all(c in (9, 10, 13) or c >= 32 for c in b) and b"\x7f" not in b


def _vmdk_descriptor(p: Probe) -> Match | None:
    """A VMDK descriptor file: plain text naming the extent files that hold the data."""
    text, _, rest = p.head.partition(b"\0")
    if rest.strip(b"\0") or not _looks_like_text(text[:4096]):
        return None
    if not text.lstrip().startswith(b"# Disk DescriptorFile") and not (
        b"createType" in text and re.search(rb"^\s*version\s*=", text, re.MULTILINE)
    ):
        return None
    create_type, extents, is_child = _descriptor_facts(text)
    if create_type is None and not extents:
        return None
    subformat = create_type or "unknown"
    description = f"VMDK descriptor ({subformat}{', a snapshot of a parent disk' if is_child else ''})"
    return Match(subformat=subformat, description=description, extents=extents)




def _qed(p: Probe) -> Match | None:
    return Match() if p.head[:4] == b"QED\0" else None


def _qcow1(p: Probe) -> Match | None:
    if p.head[:4] != b"QFI\xfb" or _u32be(p.head, 4) != 1:
        return None
    return Match(version="1", description="qcow (version 1, the predecessor of qcow2)")


def _parallels(p: Probe) -> Match | None:
    if p.head[:16] == b"WithoutFreeSpace":
        return Match(version="1", description="Parallels (v1)")
    if p.head[:16] == b"WithouFreSpacExt":
        return Match(version="2", description="Parallels (v2)")
    return None


def _bochs(p: Probe) -> Match | None:
    if p.head[:22] != b"Bochs Virtual HD Image":
        return None
    subtype = _cstr(p.head[48:64]).lower() or None
    version = _u32le(p.head, 64)
    return Match(subformat=subtype, version=f"{version >> 16}" if version else None)


_CLOOP_VERSION = re.compile(rb"#V(\d+\.\d+) Format")


def _cloop(p: Probe) -> Match | None:
    if not p.head.startswith(b"#!/bin/sh") or b"cloop" not in p.head[:128]:
        return None
    version = _CLOOP_VERSION.search(p.head[:128])
    return Match(version=version.group(1).decode() if version else None)


def _dmg(p: Probe) -> Match | None:
    trailer = p.tail[-512:]
    if len(trailer) < 512 or trailer[:4] != b"koly" or (p.file_size is not None and p.file_size < 512):
        return None
    if _u32be(trailer, 8) != 512:  # header size
        return None
    return Match(subformat="UDIF", version=str(_u32be(trailer, 4)), description="Apple DMG (UDIF)")


def _luks(p: Probe) -> Match | None:
    if p.head[:6] != b"LUKS\xba\xbe":
        return None
    version = _u16be(p.head, 6)
    return Match(subformat=f"LUKS{version}", version=str(version), description=f"LUKS{version} encrypted volume")


def _iso9660(p: Probe) -> Match | None:
    head = p.head
    standard = head[0x8001:0x8006]
    if standard not in (b"CD001", b"BEA01"):
        return None
    udf = standard == b"BEA01" or any(
        head[o + 1 : o + 6] in (b"NSR02", b"NSR03") for o in range(0x8800, min(len(head), 0x10000), 0x800)
    )
    volume = ""
    if standard == b"CD001" and head[0x8000] == 1:
        volume = "".join(c for c in head[0x8028:0x8048].decode("ascii", "replace").strip() if c.isprintable())
    from ..inspection.disk_start import identify_start  # loaded when needed

    boots_as_disk = identify_start(head[:0x8000]) in ("mbr", "gpt")
    parts = []
    if standard == b"CD001":
        parts.append("ISO 9660 optical image" + (" with UDF" if udf else ""))
    else:
        parts.append("UDF optical image")
    extra = [f"volume '{volume}'"] if volume else []
    if boots_as_disk:
        extra.append("hybrid: it also carries a partition table and boots as a disk")
    description = parts[0] + (f" ({'; '.join(extra)})" if extra else "")
    subformat = "hybrid" if boots_as_disk else ("udf" if udf else None)
    return Match(subformat=subformat, description=description)


# --- the table -------------------------------------------------------------------------------

FOREIGN: tuple[Foreign, ...] = (
    # name         label        stage          recognise         qemu-img -f   advice
    Foreign("vmdk", "VMDK", Stage.MAGIC, _vmdk_sparse, "vmdk"),
    Foreign("vmdk", "VMDK", Stage.MAGIC, _vmdk_cowd, "vmdk", Advice.EXTENT),
    Foreign("vmdk", "VMDK", Stage.MAGIC, _vmdk_sesparse, "vmdk", Advice.EXTENT),
    Foreign("qed", "QED", Stage.MAGIC, _qed, "qed"),
    Foreign("qcow", "qcow", Stage.MAGIC, _qcow1, "qcow"),
    Foreign("parallels", "Parallels", Stage.MAGIC, _parallels, "parallels"),
    Foreign("bochs", "Bochs", Stage.MAGIC, _bochs, "bochs"),
    Foreign("cloop", "cloop", Stage.MAGIC, _cloop, "cloop"),
    Foreign("luks", "LUKS", Stage.MAGIC, _luks, None, Advice.DECRYPT),
    Foreign("dmg", "DMG", Stage.TAIL, _dmg, "dmg"),
    Foreign("vmdk", "VMDK", Stage.TEXT, _vmdk_descriptor, "vmdk", Advice.DESCRIPTOR),
    Foreign("iso9660", "ISO 9660", Stage.LATE, _iso9660, None, Advice.OPTICAL),
)


def recognise(probe: Probe, stage: Stage) -> tuple[Foreign, Match] | None:
    """The first entry of ``stage`` that recognises the file, with what it found."""
    for entry in FOREIGN:
        if entry.stage is stage:
            try:
                found = entry.recognise(probe)
            except (struct.error, UnicodeError):  # the decoders' own errors: a header that only looked like one
                found = None
            if found is not None:
                return entry, found
    return None


def describe(entry: Foreign, match: Match) -> str:
    if match.description:
        return match.description
    return f"{entry.label} ({match.subformat})" if match.subformat else entry.label


# --- advice ---------------------------------------------------------------------------------
#
# A hint says what to do, not what the file is: callers put it after the description and
# "diskimg reads VHD, qcow2 and RAW" (UnsupportedFormat prints "<description>: ...; <hint>").


def output_name(name: str | None, suffix: str = ".qcow2") -> str:
    """OUT for a command line: the input name with its extension replaced (never the input itself)."""
    if not name:
        return "OUT" + suffix
    stem, dot, ext = name.rpartition(".")
    base = stem if dot and "/" not in ext and stem and not stem.endswith("/") else name
    out = base + suffix
    return out if out != name else base + ".converted" + suffix


def convert_commands(driver: str, name: str | None) -> str:
    source = shlex.quote(name) if name else "IN"
    target = shlex.quote(output_name(name))
    return (
        f"`diskimg convert --backend qemu-img -f {driver} {source} {target} -O qcow2` "
        f"or `qemu-img convert -f {driver} -O qcow2 {source} {target}`"
    )


def hint(entry: Foreign, match: Match, name: str | None = None) -> str:
    """What to do with a file of this format, with commands naming ``name`` (or IN / OUT)."""
    advice = match.advice or entry.advice
    if advice is Advice.CONVERT:
        return f"convert it first: {convert_commands(entry.qemu_driver or entry.name, name)}"
    if advice is Advice.DESCRIPTOR:
        files = ", ".join(match.extents) if match.extents else "the files it names"
        return (
            "this small text file only describes the disk; the data lives in the extent files it lists "
            f"({files}): keep them beside it and convert it first: {convert_commands('vmdk', name)}"
        )
    if advice is Advice.EXTENT:
        return (
            "this file is one extent of a VMDK disk, not a whole disk; convert the descriptor .vmdk "
            "that lists it (with its parent disk beside it, for a snapshot) first: "
            f"{convert_commands('vmdk', 'DESCRIPTOR.vmdk')}"
        )
    source = shlex.quote(name) if name else "IN"
    target = shlex.quote(output_name(name))
    if advice is Advice.DECRYPT:
        return (
            f"decrypt it with cryptsetup open first (`cryptsetup open --readonly {source} plain`, then read "
            f"/dev/mapper/plain as RAW: `diskimg convert -f raw /dev/mapper/plain {target} -O qcow2`), "
            "or convert it with its passphrase: `qemu-img convert --object secret,id=k,file=PASSPHRASE_FILE "
            f"--image-opts driver=luks,key-secret=k,file.filename={source} -O qcow2 {target}`"
        )
    # Advice.OPTICAL
    text = (
        "this is an ISO 9660 optical image, not a disk image; ECS does not import ISOs as system or data disks: "
        "install the operating system from it into a virtual machine and import that machine's disk"
    )
    if match.subformat == "hybrid":
        text += "; this hybrid ISO also boots as a disk, so to import it as one on purpose, force RAW with -f raw"
    return text
