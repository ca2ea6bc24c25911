"""``diskimg unpack``: restore the disks of archives (or of an export's manifest) into a directory.

Each archive is read once, forward, through ``sources.py``: a RAW disk (in a tar, sparse or not,
or in a bare compressed file) goes straight to the converter, so it lands as a sparse RAW file or,
with ``format``, as a qcow2 or VHD in the same pass (a tar's sparse map is the allocation map). A
qcow2 or VHD member is extracted as the file it is (holes where it has zero blocks) and, when
another format is asked for, converted from that extracted file (a second, local read).

With a manifest (``NAME.manifest.json``, written by ``diskimg export``, read by ``manifest.py``
with the same checks and caps as ``verify``), the SHA-256 of every
archive is computed in the same pass that unpacks it, and the guest content hash of every restored
disk (computed while writing it; for an extracted qcow2 or VHD, by reading it back) is compared
with the manifest's. Any mismatch is an error.

Archives are untrusted (see ``sources.py``: unsafe names, links, devices, two disks, huge sizes,
truncated or corrupt streams are refused). Outputs are named after the member's (or the
decompressed file's) base name, or for a manifest's disks after their archives, so nothing is
written outside the output directory whatever the archive says. They are written under temporary
names and renamed into place only when every disk of the run is complete and verified: after any
failure nothing of this run remains, nor the output folder if the run made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..choices import FormatName
from ..conversion.outputs import new_temporary, output_directory, replace_file, reported_as, resolve_file
from ..conversion.pipeline import ProgressCallback, content_hash_of, convert
from ..detection.image import open_image
from ..detection.probe import detect, identify_inner
from ..errors import ArchiveError, UnsupportedFormat
from ..formats import canonical_format
from ..formats.probing import READABLE_FORMATS
from ..host import interrupts
from ..streams.compressed import COMPRESSORS, unwrapped_name
from ..streams.sources import (
    EndShowsAnotherFormat,
    StreamDiskReader,
    finish_archive,
    open_file_bytes,
    open_wrapped,
    opens_through_wrapper,
)
from .manifest import ExportedDisk, names_manifest, read_manifest

_DISK_SUFFIXES = (".raw", ".img", ".qcow2", ".vhd", ".vpc", ".vmdk", ".vhdx", ".vdi")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.zst", ".tar.xz", ".tar.bz2", ".tgz", ".tar", ".gz", ".zst", ".xz", ".bz2")


@dataclass
class UnpackedDisk:
    #: the archive (or disk file) read, and the tar member when there was one
    archive: str
    member: str | None
    #: the restored disk
    output: str
    format: str
    virtual_size: int
    bytes_written: int
    #: SHA-256 of the archive file (computed in the unpacking pass when a manifest is given)
    archive_sha256: str | None
    #: guest content hash of the restored disk (diskimg.conversion.hashing)
    content_hash: str | None
    #: True when checked against a manifest (a mismatch is an error), None without one
    verified: bool | None
    decompression_passes: int | None


@dataclass
class UnpackResult:
    source: str
    manifest: str | None
    out: str
    disks: list[UnpackedDisk]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unpack(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    output_format: FormatName | None = None,
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> UnpackResult:
    """Restore the disk of archive ``source`` (or every disk of the manifest ``source``) into the
    directory ``out``, in ``output_format`` (default: the disk's own format), verifying what a manifest
    records. Raises ArchiveError for a hostile or damaged archive or a hash mismatch."""
    started = time.monotonic()
    path = os.fspath(source)
    target_format = canonical_format(output_format) if output_format else None
    manifest = read_manifest(path) if names_manifest(path) else None
    # (the archive, what the manifest says of it)
    jobs = [(manifest.locate(d), d) for d in manifest.disks] if manifest else [(path, None)]
    disks: list[UnpackedDisk] = []
    finished: list[tuple[str, str]] = []  # (temporary, final) of the disks done so far
    with output_directory(out) as out_dir:
        try:
            with interrupts.deferred():
                for archive, expected in jobs:
                    disk, temporary, final = _unpack_one(archive, expected, out_dir, target_format, force,
                                                         progress)
                    finished.append((temporary, final))
                    if any(final == done for _, done in finished[:-1]):
                        raise ArchiveError(f"two disks would be restored to the same file {disk.output}", path=path)
                    disks.append(disk)
            for temporary, final in finished:
                replace_file(temporary, final)
        except BaseException:
            for temporary, _ in finished:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            raise
    return UnpackResult(source=path, manifest=manifest.path if manifest else None, out=out_dir, disks=disks,
                        seconds=round(time.monotonic() - started, 3))


def _unpack_one(archive: str, expected: ExportedDisk | None, out_dir: str, target_format: str | None, force: bool,
                progress: ProgressCallback | None) -> tuple[UnpackedDisk, str, str]:
    """Restore the disk of ``archive`` (checked against what a manifest says of it, ``expected``) to a
    temporary file: (what was done, the temporary name, the file it is to replace: the output path
    with a symbolic link followed)."""
    detection = detect(archive)
    if expected is not None and os.path.getsize(archive) != expected.size:
        raise ArchiveError(f"is {os.path.getsize(archive)} bytes, the manifest says {expected.size}: the file is "
                           "damaged or incomplete", path=expected.file)
    digest = hashlib.sha256 if expected is not None else None
    reader: StreamDiskReader
    if opens_through_wrapper(detection):
        reader = open_wrapped(archive, detection, identify_inner, digest, as_bytes=True)
    else:
        if not detection.readable:
            raise UnsupportedFormat(f"{detection.description}: not an archive or disk diskimg unpacks",
                                    path=archive, format=detection.format, hint=detection.hint)
        reader = open_file_bytes(archive, detection, digest)
    with reader:
        facts = reader.info().details
        member = facts.get("member")
        inner_format = facts["inner_format"]
        if expected is not None and expected.format != inner_format:
            raise ArchiveError(f"holds a {inner_format} disk, the manifest says {expected.format}",
                               path=expected.file)
        final_format = target_format or inner_format
        name = expected.file if expected is not None else archive
        final = os.path.join(out_dir, _output_name(name, detection.format, member, target_format, expected is not None))
        destination = resolve_file(final, force, archive)  # a device or directory is refused
        temporary = new_temporary(destination)
        try:
            with reported_as(final, temporary):
                disk = _restore(reader, archive, expected, temporary, inner_format, final_format, progress)
            disk.output, disk.member = final, member
            if digest is not None:
                disk.archive_sha256 = _archive_sha256(reader)
            if expected is not None:
                _verify(expected, disk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    return disk, temporary, destination


def _restore(reader: StreamDiskReader, archive: str, expected: ExportedDisk | None, temporary: str,
             inner_format: str, final_format: str, progress: ProgressCallback | None) -> UnpackedDisk:
    """Write the disk to ``temporary`` (converted on the fly when it is RAW) and say what was written."""
    checksum = expected is not None and expected.content_hash is not None
    if inner_format == "raw":
        if final_format != "raw":  # read as a disk: an end not seen at open is checked when read
            reader.guard_tail()
        try:
            result = convert(reader, temporary, canonical_format(final_format), checksum=checksum, force=True,
                             progress=progress)
        except EndShowsAnotherFormat as found:  # e.g. a fixed VHD's footer: restored as the file it is, below
            inner_format = str(found.format)
        else:
            finish_archive(reader)
            return UnpackedDisk(archive, None, temporary, final_format, result.virtual_size, result.bytes_written,
                                None, result.content_hash, None, result.decompression_passes)
    # a qcow2, VHD (or another format's) file: extract its bytes exactly, then convert the extracted
    # file if asked (with qemu-img for the formats diskimg does not read)
    result = convert(reader, temporary, "raw", force=True, progress=progress)
    finish_archive(reader)
    os.truncate(temporary, reader.content_size)
    virtual_size, written, content_hash = reader.content_size, result.bytes_written, None
    if final_format != inner_format:
        converted = convert(temporary, temporary + ".convert", canonical_format(final_format), checksum=checksum,
                            force=True, progress=progress)
        replace_file(temporary + ".convert", temporary)
        content_hash, virtual_size, written = converted.content_hash, converted.virtual_size, converted.bytes_written
    elif inner_format in READABLE_FORMATS:
        with open_image(temporary, inner_format) as extracted:
            virtual_size = extracted.virtual_size
            content_hash = content_hash_of(extracted) if checksum else None
    return UnpackedDisk(archive, None, temporary, final_format, virtual_size, written, None, content_hash, None,
                        result.decompression_passes)


def _archive_sha256(reader: StreamDiskReader) -> str:
    """The archive's SHA-256, computed by the unpacking pass (``finish_archive`` read it to the end)."""
    digest = reader.stream.digest
    assert digest is not None, "opened without a digest"
    return str(digest.hexdigest())


def _verify(entry: ExportedDisk, disk: UnpackedDisk) -> None:
    name = entry.file
    if disk.archive_sha256 != entry.sha256:
        raise ArchiveError(f"SHA-256 {disk.archive_sha256} differs from the manifest's {entry.sha256}: "
                           "the archive is damaged or not the one exported", path=name)
    if disk.virtual_size != entry.virtual_size:
        raise ArchiveError(f"holds a disk of {disk.virtual_size} bytes, the manifest says {entry.virtual_size}",
                           path=name)
    if entry.content_hash is not None and disk.content_hash != entry.content_hash:
        raise ArchiveError(f"the restored disk's content hash {disk.content_hash} differs from the manifest's "
                           f"{entry.content_hash}", path=name)
    disk.verified = True


def _output_name(archive: str, wrapper: str, member: str | None, target_format: str | None,
                 from_manifest: bool) -> str:
    """The restored disk's file name, with the target format's suffix when converting: for a disk
    of a manifest, its archive's name without the archive suffixes (``NAME_system.raw``: unique in
    the set even when every member is ``disk.raw``, as in a GCE layout); otherwise what ``tar -x``
    or the decompressor would name it (the member's base name)."""
    base = os.path.basename(archive)
    if from_manifest:
        name = next((base[: -len(s)] for s in _ARCHIVE_SUFFIXES if base.lower().endswith(s) and len(base) > len(s)),
                    base)
    elif member is not None:
        name = member.replace("\\", "/").rsplit("/", 1)[-1]
    elif wrapper in COMPRESSORS:
        name = unwrapped_name(wrapper, base)[0] or "disk"
    else:
        name = base
    if name in ("", ".", ".."):  # the input is at fault (a member named '.'): refused as archives are
        named_by = f"member {member!r}" if member is not None and not from_manifest else f"the name {base!r}"
        raise ArchiveError(f"{named_by} leaves no file name to restore the disk under: refused", path=archive)
    if target_format is None:
        return name
    stem = name[: -len(suffix)] if (suffix := _disk_suffix(name)) else name
    return f"{stem}.{'vhd' if target_format == 'vhd' else target_format}"


def _disk_suffix(name: str) -> str:
    return next((s for s in _DISK_SUFFIXES if name.lower().endswith(s)), "")

