"""What is this file? ``detect`` names the format, ``check_forced`` vets a format given with ``-f``.

``detect(source)`` reads the first 128 KiB and the last 1 KiB of the file (plus a bounded peek into
a compressed or archive wrapper) and decides in this order, strongest evidence first:

1. an empty file: RAW, ``starts_with="empty"``, description "empty file (0 bytes)" (readable, so
   that ``-f raw`` and open behave as for any RAW file; a reader of 0 bytes has nothing to yield)
2. a VHD footer (``conectix`` at EOF-512/EOF-511, or a dynamic/differencing copy at 0): the VHD
   driver's ``probe``. A *fixed* VHD whose footer verifies (checksum, type fixed, current size =
   the data in front of it: ``vhd.structures.footer_sizes_fixed_disk``) wins even over a
   signature at offset 0, because offset 0 of a fixed VHD is guest-controlled: a guest can write
   a qcow2 header there (the CVE-2008-2004 class), while it cannot write the footer. Any other
   VHD result loses to a signature at offset 0.
3. strong signatures at offset 0: qcow2 (v2/v3: the qcow2 driver's ``probe``), qcow v1, QED,
   VHDX, VMDK (KDMV, COWD, seSparse), Parallels, Bochs, cloop, LUKS, the compressors (gzip, xz,
   bzip2, zstd incl. skippable frames, plus 7z and lz4 named without peeking) and zip; then the
   VDI signature at 0x40
4. DMG ``koly`` trailer at EOF-512
5. a VMDK descriptor (only when the file is text)
6. tar (``ustar`` magic at 257, or a v7 header whose checksum verifies)
7. ISO 9660 / UDF (``CD001``/``BEA01`` at 0x8001; a hybrid ISO with an MBR or GPT is still ISO)
8. RAW, with ``starts_with`` from :func:`diskimg.inspection.disk_start.identify_start`

A file carrying a format header is never reported as RAW: a ``QFI\\xfb`` file with a version
diskimg does not know is reported as qcow2 (not readable), and a ``conectix`` footer that does not
verify is reported by the VHD driver as a corrupt VHD.

Decisions worth knowing:

* A bare VHD footer (a 512-byte file such as libvhdi's ``file_footer.1``) is reported as what the
  footer says (``vhd``, e.g. differencing) with "footer only" in the description; opening it
  fails in the VHD reader, which is where the error belongs.
* Inside a compressed wrapper only a prefix is decompressed, so the tail of the inner file is
  known only when the stream ends within the prefix; a large fixed VHD inside gzip therefore shows
  here as the RAW disk it begins with. Opening it (``sources.py``) passes the tail through the same
  ``identify_inner`` and reads it as the fixed VHD it is.
* ``check_forced``: forcing ``raw`` on any recognised format is a mismatch - including a fixed VHD
  (a RAW disk plus a 512-byte footer: read it as vhd, or cut the footer off) - except ISO 9660,
  which is content (a file system) rather than a container, so a hybrid ISO can be imported as a
  RAW disk on purpose.

Nothing but :class:`~diskimg.errors.DiskImageError` subclasses escapes, whatever the input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from ..errors import DiskImageError, FormatMismatch, ImageNotFound
from ..formats import qcow2
from ..formats.foreign import Foreign, Match, Probe, Stage, describe, hint, recognise
from ..formats.probing import Detection
from ..formats.qcow2 import probe as qcow2_probe
from ..formats.vdi import structures as vdi_structures
from ..formats.vhd import probe as vhd_probe
from ..formats.vhd.structures import footer_sizes_fixed_disk
from ..formats.vhdx import probe as vhdx_probe, structures as vhdx_structures
from ..host.files import HostFile
from ..streams import compressed as wrappers

HEAD_SIZE = 128 * 1024
TAIL_SIZE = 1024

_ReadAt = Callable[[int, int], bytes]


def detect(source: str | os.PathLike[str] | BinaryIO) -> Detection:
    """Identify an image file (a path or a readable, seekable binary file object)."""
    try:
        host = HostFile(source)
    except DiskImageError:
        raise
    except (OSError, ValueError) as exc:  # a caller's file object that cannot seek or is closed
        raise ImageNotFound(f"cannot read: {exc}", path=_name_of(source)) from None
    try:
        size = host.size
        head = host.read_at(0, min(HEAD_SIZE, size)) if size else b""
        tail_length = min(TAIL_SIZE, size)
        tail = host.read_at(size - tail_length, tail_length) if size else b""
        return _classify(head, tail, size, _name_of(source), 0, host.read_at)
    except DiskImageError:
        raise
    except (OSError, ValueError) as exc:  # EIO, a closed or unseekable caller's file
        raise ImageNotFound(f"cannot read: {exc}", path=host.name) from None
    finally:
        host.close()


def _name_of(source: object) -> str | None:
    """The name to put in suggested commands, or None (placeholders are used then)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) and not name.startswith("<") else None


def identify_inner(data: bytes, tail: bytes, size: int | None, depth: int, name: str | None) -> Detection:
    """What a wrapper holds, from the decompressed prefix ``data`` (the callback of wrappers.py)."""

    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return _classify(data[:HEAD_SIZE], tail, size, name, depth, read_at)


def _classify(
    head: bytes, tail: bytes, size: int | None, name: str | None, depth: int, read_at: _ReadAt
) -> Detection:
    if size == 0 or (size is None and not head):
        return Detection(format="raw", description="empty file (0 bytes)", readable=True, starts_with="empty")
    probe = Probe(head, tail, size)

    strong = _strong_magic(probe, name, depth, read_at, size)
    vhd = vhd_probe(head, tail, size)
    if vhd is not None:
        if strong is None:
            return vhd
        if footer_sizes_fixed_disk(tail, size):
            vhd.description += f"; the disk inside starts with bytes that look like a {strong[0]} header"
            return vhd
    if strong is not None:
        return strong[1]()

    for stage in (Stage.TAIL, Stage.TEXT):
        found = recognise(probe, stage)
        if found is not None:
            return _foreign_detection(*found, name)

    flavor = wrappers.recognise_tar(head)
    if flavor is not None:
        return wrappers.peek_tar(read_at, size, identify_inner, depth, name, flavor)

    found = recognise(probe, Stage.LATE)
    if found is not None:
        return _foreign_detection(*found, name)

    return raw_detection(head)


def raw_detection(head: bytes) -> Detection:
    from ..inspection.disk_start import describe_start, identify_start  # loaded when needed

    starts_with = identify_start(head)
    if starts_with == "empty":
        description = f"RAW disk whose first {_kib(len(head))} are all zeros"
    elif starts_with == "unknown":
        description = "RAW disk with nothing recognisable at its start (no partition table or file system signature)"
    else:
        description = f"RAW disk with {describe_start(starts_with)}"
    return Detection(format="raw", description=description, readable=True, starts_with=starts_with)


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} bytes"


def _foreign_detection(entry: Foreign, match: Match, name: str | None) -> Detection:
    readable = _reads_subformat(entry.name, match)
    return Detection(
        format=entry.name,
        description=describe(entry, match),
        subformat=match.subformat,
        version=match.version,
        readable=readable,
        hint=None if readable else hint(entry, match, name),
    )


def _reads_subformat(format_name: str, match: Match) -> bool:
    """Whether a driver reads this file of a format the table names (a VMDK of a create type it reads)."""
    if format_name == "vmdk":
        from ..formats.vmdk.structures import READ_CREATE_TYPES

        return match.advice is None and match.subformat in READ_CREATE_TYPES
    return False


def _strong_magic(
    probe: Probe, name: str | None, depth: int, read_at: _ReadAt, size: int | None
) -> tuple[str, Callable[[], Detection]] | None:
    """(format name, a function building the Detection) for a signature at offset 0 (or VDI's)."""
    head = probe.head
    if head[:4] == qcow2.MAGIC:
        version = qcow2.header_version(head)
        if version == 1:
            found = recognise(probe, Stage.MAGIC)
            if found is not None:
                return "qcow", lambda: _foreign_detection(*found, name)
        return "qcow2", lambda: _qcow2(probe, version)
    kind = wrappers.recognise_leading(head)
    if kind == "zip":
        return "zip", lambda: wrappers.peek_zip(read_at, identify_inner, depth, name)
    if kind is not None:
        return kind, lambda: wrappers.peek_compressed(kind, read_at, identify_inner, depth, name, size)
    if head[:8] == vhdx_structures.FILE_IDENTIFIER_SIGNATURE:
        return "vhdx", lambda: vhdx_probe(head, read_at, size)
    if vdi_structures.has_signature(head):  # the driver judges the rest
        return "vdi", lambda: vdi_structures.probe(head)
    found = recognise(probe, Stage.MAGIC)
    if found is not None:
        return found[0].name, lambda: _foreign_detection(*found, name)
    return None


# --- qcow2: the driver's probe, and a header of a version no driver knows --------------------------


def _qcow2(probe: Probe, version: int | None) -> Detection:
    found = qcow2_probe(probe.head, probe.tail, probe.file_size or len(probe.head))
    if found is not None:
        return found
    shown = "missing" if version is None else str(version)
    return Detection(
        format="qcow2",
        version=None if version is None else str(version),
        readable=False,
        description=f"qcow2 header with an unknown version ({shown})",
        hint="diskimg reads qcow2 versions 2 and 3 (qcow version 1 is 'qcow'); `qemu-img info` may know this one",
    )


# --- forced formats ----------------------------------------------------------------------------

_HEADER_WORDS = {
    "vhd": "a VHD footer",
    "qcow2": "a qcow2 header",
    "qcow": "a qcow (v1) header",
    "vmdk": "a VMDK header",
    "vhdx": "a VHDX header",
    "vdi": "a VDI header",
    "qed": "a QED header",
    "parallels": "a Parallels header",
    "bochs": "a Bochs header",
    "cloop": "a cloop header",
    "dmg": "a DMG (koly) trailer",
    "luks": "a LUKS header",
    "iso9660": "an ISO 9660 volume descriptor",
    "gzip": "a gzip header",
    "xz": "an xz header",
    "bzip2": "a bzip2 header",
    "zstd": "a zstd header",
    "zip": "a zip header",
    "tar": "a tar header",
    "7z": "a 7z header",
    "lz4": "an lz4 header",
}


def _header_phrase(detection: Detection) -> str:
    words = _HEADER_WORDS.get(detection.format, f"a {detection.format} header")
    detail = detection.subformat or (f"v{detection.version}" if detection.version else None)
    return f"{words} ({detail})" if detail else words


def check_forced(detection: Detection, forced: str, path: str | None = None) -> None:
    """Raise FormatMismatch, naming the file at ``path``, when a format given with ``-f`` (raw,
    vhd/vpc, qcow2, vdi) contradicts the file. Forcing the detected format passes (even for a damaged
    header: the reader reports that).
    """
    from ..formats import canonical_format

    wanted = canonical_format(forced)
    actual = detection.format
    if wanted == actual:
        return
    if wanted == "raw":
        if actual == "iso9660":
            return  # a file system, not a container: a hybrid ISO may be imported as a RAW disk
        message = (
            f"forced format raw, but the file has {_header_phrase(detection)}; "
            "a file with a format header is never read as RAW"
        )
        if actual == "vhd" and detection.subformat == "fixed":
            message += (
                " (a fixed VHD is a RAW disk plus a 512-byte footer: read it with -f vhd, "
                "or cut the footer off with `truncate -s -512 FILE` to make it RAW)"
            )
        elif detection.description:
            message += f" (it is {detection.description})"
        raise FormatMismatch(message, path=path)
    # "a VHD footer" -> "VHD footer"; a VMDK may also be a descriptor (text) naming its extents
    expected = "VMDK header or descriptor" if wanted == "vmdk" else _HEADER_WORDS[wanted].split(" ", 1)[1]
    raise FormatMismatch(f"forced format {wanted}, but the file has no {expected}: it is {_a(detection.description)}",
                         path=path)


def _a(text: str) -> str:
    return ("an " if text[:1].lower() in "aeiox" else "a ") + text
