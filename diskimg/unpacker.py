"""``diskimg unpack``: restore the disks of archives (or of an export's manifest) into a directory.

Each archive is read once, forward, through ``sources.py``: a RAW disk (in a tar, sparse or not,
or in a bare compressed file) goes straight to the converter, so it lands as a sparse RAW file or,
with ``format``, as a qcow2 or VHD in the same pass (a tar's sparse map is the allocation map). A
qcow2 or VHD member is extracted as the file it is (holes where it has zero blocks) and, when
another format is asked for, converted from that extracted file (a second, local read).

With a manifest (``NAME.manifest.json``, written by ``diskimg export``), the SHA-256 of every
archive is computed in the same pass that unpacks it, and the guest content hash of every restored
disk (computed while writing it; for an extracted qcow2 or VHD, by reading it back) is compared
with the manifest's. Any mismatch is an error.

Archives are untrusted (see ``sources.py``: unsafe names, links, devices, two disks, huge sizes,
truncated or corrupt streams are refused). Outputs are named after the member's (or the
decompressed file's) base name, or for a manifest's disks after their archives, so nothing is
written outside the output directory whatever the archive says. They are written under temporary names and renamed into place only when every
disk of the run is complete and verified: after any failure nothing of this run remains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import interrupts
from .conversion import ProgressCallback, content_hash_of, convert
from .probe import detect
from .detection import READABLE_FORMATS
from .errors import ArchiveError, ImageNotFound, OutputError, UnsupportedFormat, UsageError
from .formats import canonical_format
from .hostfile import open_input
from .image import open_image
from .outputs import new_temporary, replace_file, resolve_file
from .sources import StreamDiskReader, finish_archive, open_file_bytes, open_wrapped, opens_through_wrapper
from .wrappers import COMPRESSORS, unwrapped_name

#: a manifest larger than this is not a manifest
MAX_MANIFEST = 16 << 20
#: disks one manifest may list (a machine has a system disk and at most a few dozen data disks)
MAX_DISKS = 64
_DISK_SUFFIXES = (".raw", ".img", ".qcow2", ".vhd", ".vpc", ".vmdk", ".vhdx", ".vdi")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.zst", ".tar.xz", ".tar.bz2", ".tgz", ".tar", ".gz", ".zst", ".xz", ".bz2")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    #: guest content hash of the restored disk (diskimg.hashing)
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


@dataclass(frozen=True)
class _Expected:
    """What a manifest says about one disk (each field optional: read defensively)."""

    file: str
    size: int | None = None
    sha256: str | None = None
    format: str | None = None
    content_hash: str | None = None
    virtual_size: int | None = None


def unpack(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: str | None = None,
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> UnpackResult:
    """Restore the disk of archive ``source`` (or every disk of the manifest ``source``) into the
    directory ``out``, in ``format`` (default: the disk's own format), verifying what a manifest
    records. Raises ArchiveError for a hostile or damaged archive or a hash mismatch."""
    started = time.monotonic()
    path = os.fspath(source)
    target_format = canonical_format(format) if format else None
    manifest = path if _is_manifest(path) else None
    expected = read_manifest(path) if manifest else [_Expected(path)]
    out_dir = os.path.abspath(os.fspath(out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory: {exc.strerror}", path=out_dir) from None
    disks: list[UnpackedDisk] = []
    finished: list[tuple[str, str]] = []  # (temporary, final) of the disks done so far
    try:
        with interrupts.deferred():
            for entry in expected:
                disk, temporary, final = _unpack_one(entry, manifest is not None, out_dir, target_format, force,
                                                     progress)
                if any(final == done for _, done in finished):
                    raise ArchiveError(f"two disks would be restored to the same file {disk.output}", path=path)
                finished.append((temporary, final))
                disks.append(disk)
        for temporary, final in finished:
            replace_file(temporary, final)
    except BaseException:
        for temporary, _ in finished:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise
    return UnpackResult(source=path, manifest=manifest, out=out_dir, disks=disks,
                        seconds=round(time.monotonic() - started, 3))


def _is_manifest(path: str) -> bool:
    if path.lower().endswith(".json"):
        return True
    with contextlib.suppress(OSError, ImageNotFound), open_input(path) as f:
        return f.read(64).lstrip().startswith(b"{")
    return False


def read_manifest(path: str) -> list[_Expected]:
    """The disks a manifest lists, each archive resolved beside the manifest (a name with a
    directory part is refused: a manifest may not point at other files of the host)."""
    try:
        with open_input(path) as f:
            text = f.read(MAX_MANIFEST + 1)
    except OSError as exc:
        raise ArchiveError(f"cannot read the manifest: {exc.strerror}", path=path) from None
    if len(text) > MAX_MANIFEST:
        raise ArchiveError(f"a manifest larger than {MAX_MANIFEST >> 20} MiB", path=path)
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"not a JSON manifest: {exc}", path=path) from None
    disks = document.get("disks") if isinstance(document, dict) else None
    if not isinstance(disks, list) or not disks or len(disks) > MAX_DISKS:
        raise ArchiveError(f"the manifest lists no disks (a 'disks' list of 1 to {MAX_DISKS} entries)", path=path)
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for number, disk in enumerate(disks):
        name = disk.get("file") if isinstance(disk, dict) else None
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
            raise ArchiveError(f"disk {number} of the manifest: 'file' must be a file name beside the manifest, "
                               f"not {name!r}", path=path)
        sha256 = disk.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256.lower())):
            raise ArchiveError(f"disk {number} of the manifest: 'sha256' is not a SHA-256 digest", path=path)
        content_hash, fmt = disk.get("content_hash"), disk.get("format")
        entries.append(_Expected(
            file=os.path.join(base, name),
            size=_integer(disk.get("size")),
            sha256=sha256.lower() if sha256 else None,
            format=fmt if isinstance(fmt, str) and fmt else None,
            content_hash=content_hash if isinstance(content_hash, str) and content_hash else None,
            virtual_size=_integer(disk.get("virtual_size")),
        ))
    return entries


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _unpack_one(entry: _Expected, verify: bool, out_dir: str, target_format: str | None, force: bool,
                progress: ProgressCallback | None) -> tuple[UnpackedDisk, str, str]:
    """Restore one disk to a temporary file: (what was done, the temporary name, the file it is to
    replace: the output path with a symbolic link followed)."""
    detection = detect(entry.file)
    if verify and entry.size is not None and os.path.getsize(entry.file) != entry.size:
        raise ArchiveError(f"is {os.path.getsize(entry.file)} bytes, the manifest says {entry.size}: the file is "
                           "damaged or incomplete", path=os.path.basename(entry.file))
    digest = hashlib.sha256 if verify and entry.sha256 else None
    reader: StreamDiskReader
    if opens_through_wrapper(detection):
        reader = open_wrapped(entry.file, detection, digest, as_bytes=True)  # type: ignore[assignment]
    else:
        if not detection.readable:
            raise UnsupportedFormat(f"{detection.description}: not an archive or disk diskimg unpacks",
                                    path=entry.file, format=detection.format, hint=detection.hint)
        reader = open_file_bytes(entry.file, detection, digest)
    with reader:
        facts = reader.info().details
        member = facts.get("member")
        inner_format = facts["inner_format"]
        if verify and entry.format is not None and entry.format != inner_format:
            raise ArchiveError(f"holds a {inner_format} disk, the manifest says {entry.format}",
                               path=os.path.basename(entry.file))
        final_format = target_format or inner_format
        final = os.path.join(out_dir, _output_name(entry.file, detection.format, member, target_format, verify))
        destination = resolve_file(final, force, entry.file)  # a device or directory is refused
        temporary = new_temporary(destination)
        try:
            disk = _restore(reader, entry, temporary, inner_format, final_format, progress)
            disk.output, disk.member = final, member
            if digest is not None:
                disk.archive_sha256 = _archive_sha256(reader)
            _verify(entry, disk, verify)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    return disk, temporary, destination


def _restore(reader: StreamDiskReader, entry: _Expected, temporary: str, inner_format: str, final_format: str,
             progress: ProgressCallback | None) -> UnpackedDisk:
    """Write the disk to ``temporary`` (converted on the fly when it is RAW) and say what was written."""
    if inner_format == "raw":
        result = convert(reader, temporary, final_format, checksum=entry.content_hash is not None, force=True,
                         progress=progress)
        finish_archive(reader)
        return UnpackedDisk(entry.file, None, temporary, final_format, result.virtual_size, result.bytes_written,
                            None, result.content_hash, None, result.decompression_passes)
    # a qcow2, VHD (or another format's) file: extract its bytes exactly, then convert the extracted
    # file if asked (with qemu-img for the formats diskimg does not read)
    result = convert(reader, temporary, "raw", force=True, progress=progress)
    finish_archive(reader)
    os.truncate(temporary, reader.content_size)
    virtual_size, written, content_hash = reader.content_size, result.bytes_written, None
    if final_format != inner_format:
        converted = convert(temporary, temporary + ".convert", final_format, checksum=entry.content_hash is not None,
                            force=True, progress=progress)
        replace_file(temporary + ".convert", temporary)
        content_hash, virtual_size, written = converted.content_hash, converted.virtual_size, converted.bytes_written
    elif inner_format in READABLE_FORMATS:
        with open_image(temporary, inner_format) as extracted:
            virtual_size = extracted.virtual_size
            content_hash = content_hash_of(extracted) if entry.content_hash is not None else None
    return UnpackedDisk(entry.file, None, temporary, final_format, virtual_size, written, None, content_hash, None,
                        result.decompression_passes)


def _archive_sha256(reader: StreamDiskReader) -> str:
    """The archive's SHA-256, computed by the unpacking pass (``finish_archive`` read it to the end)."""
    digest = reader.stream.digest
    assert digest is not None, "opened without a digest"
    return str(digest.hexdigest())


def _verify(entry: _Expected, disk: UnpackedDisk, verify: bool) -> None:
    if not verify:
        return
    name = os.path.basename(entry.file)
    if entry.sha256 is not None and disk.archive_sha256 != entry.sha256:
        raise ArchiveError(f"SHA-256 {disk.archive_sha256} differs from the manifest's {entry.sha256}: "
                           "the archive is damaged or not the one exported", path=name)
    if entry.virtual_size is not None and disk.virtual_size != entry.virtual_size:
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
    if name in ("", ".", ".."):
        raise UsageError(f"cannot name the disk restored from {archive!r}")
    if target_format is None:
        return name
    stem = name[: -len(suffix)] if (suffix := _disk_suffix(name)) else name
    return f"{stem}.{'vhd' if target_format == 'vhd' else target_format}"


def _disk_suffix(name: str) -> str:
    return next((s for s in _DISK_SUFFIXES if name.lower().endswith(s)), "")
