"""Export a machine's disk set as downloadable archives with a manifest, and verify them.

The files are named like an ECS image export: one archive per disk, ``NAME_system.raw.tar.gz`` and
``NAME_data_xvdb.raw.tar.gz``, ``NAME_data_xvdc...`` for the data disks in order, each holding one
member named as the archive without its archive suffixes (``NAME_system.raw``). With
``layout="gce"`` the member is ``disk.raw``, RAW, its size rounded up to whole GiB, as Google
Compute Engine imports it.

Each disk is converted on the fly: source reader -> target format -> tar member -> compressor ->
file; nothing the size of a disk is written anywhere else. A member's size goes in its header,
before its data, so the layout is planned first, from the source's extents refined by a pre-scan of
its DATA extents for zeros (the converter's plan, as for a pipe):

- a RAW member is an old-GNU sparse member whose map is the plan's DATA extents: holes are not
  stored, and GNU tar (``tar -xSf``) restores a sparse file;
- a qcow2 or VHD member is written by the format's writer in streaming mode (metadata first, then
  every planned cluster or block), whose size ``measure`` computes exactly from the same plan; a
  compressed qcow2's size is only known once written, so it goes only to a bare file
  (``archive="none"``).

gzip is compressed by zlib-ng on every core (``zlib_ng.gzip_ng_threaded``, as pigz does: blocks
compressed in parallel, each with the previous 32 KiB as dictionary, into one standard gzip member),
zstd by zstandard's threads. The
archive's SHA-256 and CRC-64/XZ (what OSS reports as ``x-oss-hash-crc64ecma``: the ECMA-182
polynomial, reflected, initial value and final XOR all ones) are computed over the bytes as they are
written, and the member disk's guest content hash (``hashing.py``) over the guest data as it is
read: one pass for everything.

All outputs of a run (archives, ``NAME.manifest.json``, ``NAME.SHA256SUMS``: see ``manifest.py``)
are written to temporary names and renamed into place together at the end, in a folder made if
missing: if any disk fails, none of this run's outputs remain, nor the folders it made. Every
output is named after the export, so several exports can share a folder; ``verify`` checks each.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, cast, get_args

import zstandard
from fastcrc import crc64
from zlib_ng import gzip_ng_threaded

from ..choices import ArchiveKind, DiskFormat, ExportLayout, FormatName
from ..conversion.hashing import ContentHasher
from ..conversion.outputs import output_directory, reported_as, temporary_beside
from ..conversion.pipeline import (
    CHUNK,
    ProgressCallback,
    Tally,
    aligned_size,
    content_hash_of,
    convert,
    feed_in_order,
    map_is_plan,
    read_ahead,
    scan_for_zeroes,
    with_zero_tail,
)
from ..detection.image import Source, open_image
from ..errors import ArchiveError, DiskImageError, OutputError, UsageError
from ..formats import WRITERS, canonical_format
from ..formats.reader import DiskReader, Extent, ExtentKind
from ..formats.writer import OutputTarget
from ..host import interrupts
from ..host.files import file_kind, open_input
from ..streams.tar import END_OF_ARCHIVE, TarMember, iter_data, pack_member, padding, read_member
from ..version import __version__
from .manifest import SUFFIX as MANIFEST_SUFFIX, SUMS_SUFFIX, ExportedDisk, Manifest, read_manifest

if TYPE_CHECKING:
    from ..conversion.sparsify import SparsifiedVolume

#: the file name suffix of each kind of archive
ARCHIVES: dict[ArchiveKind, str] = {"tar.gz": ".tar.gz", "tar.zst": ".tar.zst", "tar": ".tar", "none": ""}
LAYOUTS: tuple[ExportLayout, ...] = get_args(ExportLayout)
SYSTEM_DEVICE = "xvda"
#: ECS names data disks by their device: /dev/xvdb, /dev/xvdc, ...
DATA_DEVICES = tuple(f"xvd{letter}" for letter in "bcdefghijklmnopqrstuvwxyz")
#: ECS exports at most this many data disks, each at most this size (warnings, not errors)
ECS_MAX_DATA_DISKS = 4
ECS_MAX_DATA_DISK_SIZE = 500 << 30
GIB = 1 << 30
#: zlib-ng level 3: about 6 % larger than pigz's default (-6) on a disk of system files, in a third
#: of its time (ISA-L's best level was 11 % larger; zlib-ng -4 4 % larger in half the time)
GZIP_LEVEL = 3
ZSTD_LEVEL = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_DEVICE = re.compile(r"^[a-z][a-z0-9]{0,15}$")


@dataclass
class SparsifiedDisk:
    """What ``sparsify`` did to one disk of the set (its ``file`` in the export)."""

    file: str
    #: the volumes' ``sparsified_bytes`` added up
    sparsified_bytes: int
    volumes: list[SparsifiedVolume]


@dataclass
class ExportResult:
    name: str
    layout: ExportLayout
    archive: ArchiveKind
    manifest: str
    sums: str
    disks: list[ExportedDisk]
    warnings: list[str]
    seconds: float
    #: with sparsify=True: each disk's volumes, whether their unused space was left out and why not
    sparsified: list[SparsifiedDisk] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Disk:
    """A disk being exported: where it comes from, what it becomes, and its plan."""

    role: str
    device: str
    source: Source
    file: str
    member: str | None
    reader: DiskReader | None = None
    virtual_size: int = 0
    plan: list[Extent] = field(default_factory=list)
    #: with sparsify: what it does to the disk's volumes (the reader then reads their unused ranges as zeros)
    sparsified: list[SparsifiedVolume] | None = None

    @property
    def left_out(self) -> bool:
        """Whether sparsify leaves anything out of the disk (what its manifest entry records)."""
        return any(volume.unused_bytes for volume in self.sparsified or ())


def export(
    name: str,
    system: Source,
    data: Sequence[Source] = (),
    *,
    out: str | os.PathLike[str] = ".",
    output_format: FormatName = "raw",
    archive: ArchiveKind = "tar.gz",
    layout: ExportLayout = "ecs",
    devices: Sequence[str] | None = None,
    threads: int | None = None,
    zero_granularity: int = 4096,
    compress: bool = False,
    allow_backing: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
    sparsify: bool = False,
) -> ExportResult:
    """Export the disk set ``system`` + ``data`` into the folder ``out`` (made if missing): one archive
    per disk, then ``NAME.manifest.json`` and ``NAME.SHA256SUMS``.

    ``output_format``: the disks' format inside the archives (raw, qcow2 or vhd); ``archive``: tar.gz,
    tar.zst, tar, or none (the bare disk file); ``devices``: the data disks' device names (default
    xvdb, xvdc, ...); ``threads``: compression threads (default: every core); ``zero_granularity``:
    zero ranges of at least this size are left out of RAW members and qcow2/VHD allocations (0:
    the source's allocation map only, no pre-scan); ``compress``: compressed qcow2 clusters
    (``archive="none"`` only). ``progress`` is called with ("scan" | "export", done, total) in guest
    bytes over the whole set. ``sparsify``: what the guests' file systems do not use reads as zeros
    in the exported disks (``conversion/sparsify.py``); the manifest records it for each disk.
    """
    started = time.monotonic()
    target_format = canonical_format(output_format)
    _check_arguments(name, target_format, archive, layout, compress, threads, zero_granularity)
    devices = list(devices) if devices is not None else list(DATA_DEVICES[: len(data)])
    _check_devices(devices, len(data))
    disks = [_Disk("system", SYSTEM_DEVICE, system, *_names(name, "system", target_format, archive, layout))]
    disks += [_Disk("data", device, source, *_names(name, f"data_{device}", target_format, archive, layout))
              for source, device in zip(data, devices, strict=True)]
    threads = threads or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        for disk in disks:
            disk.reader = stack.enter_context(open_image(disk.source, allow_backing=allow_backing))
            if sparsify:
                _sparsify(disk)
            size = disk.reader.virtual_size
            disk.virtual_size = aligned_size(size, GIB) if layout == "gce" else size
        warnings = _ecs_warnings(disks) if layout == "ecs" else []
        set_progress = _SetProgress(progress, [d.virtual_size for d in disks])
        stack.enter_context(interrupts.deferred())  # ends after the temporaries are removed
        if archive != "none":
            for index, disk in enumerate(disks):
                disk.plan = _plan(disk, zero_granularity, set_progress.reporter("scan", index))
        # temporaries entered first are renamed last: the manifest appears only when all is done
        out_dir = stack.enter_context(output_directory(out))
        sources = [d.reader.path for d in disks]  # type: ignore[union-attr]
        manifest_path = os.path.join(out_dir, name + MANIFEST_SUFFIX)
        sums_path = os.path.join(out_dir, name + SUMS_SUFFIX)
        temporary_manifest = stack.enter_context(temporary_beside(manifest_path, force, sources[0]))
        temporary_sums = stack.enter_context(temporary_beside(sums_path, force, sources[0]))
        temporaries = [stack.enter_context(temporary_beside(os.path.join(out_dir, d.file), force, source))
                       for d, source in zip(disks, sources, strict=True)]
        exported = []
        for index, (disk, temporary) in enumerate(zip(disks, temporaries, strict=True)):
            report = set_progress.reporter("export", index)
            if archive == "none":
                exported.append(_export_bare(disk, temporary, target_format, compress, zero_granularity,
                                             allow_backing, report))
            else:
                exported.append(_export_archive(disk, temporary, target_format, archive, threads, zero_granularity,
                                                report))
        manifest = Manifest(
            name=name, layout=layout, archive=archive, tool="diskimg", version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), disks=exported)
        _write_text(temporary_manifest, manifest_path, manifest.to_json())
        _write_text(temporary_sums, sums_path, manifest.sums())
    return ExportResult(name=name, layout=layout, archive=archive, manifest=manifest_path,
                        sums=sums_path, disks=exported, warnings=warnings,
                        seconds=round(time.monotonic() - started, 3),
                        sparsified=[SparsifiedDisk(d.file, sum(v.sparsified_bytes for v in d.sparsified), d.sparsified)
                                    for d in disks if d.sparsified is not None] if sparsify else None)


def _sparsify(disk: _Disk) -> None:
    """The disk read with its unused ranges as zeros, and what that does to its volumes."""
    from ..conversion.sparsify import report, sparsified  # the file-system readers load only when asked for

    assert disk.reader is not None
    source = disk.reader
    disk.reader, plan = sparsified(source)
    disk.sparsified = report(plan, source.extents())


def _check_arguments(name: str, target_format: str, archive: ArchiveKind, layout: ExportLayout, compress: bool,
                     threads: int | None, zero_granularity: int) -> None:
    if not _NAME.match(name):
        raise UsageError(f"invalid export name {name!r}: letters, digits, '.', '_' and '-', at most 200")
    if archive not in ARCHIVES:
        raise UsageError(f"unknown archive type {archive!r}: {', '.join(ARCHIVES)}")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}: {', '.join(LAYOUTS)}")
    if layout == "gce" and (target_format != "raw" or archive != "tar.gz"):
        raise UsageError("--layout gce: Compute Engine imports disk.raw in a .tar.gz (RAW only, --archive tar.gz)")
    if compress and (target_format != "qcow2" or archive != "none"):
        raise UsageError("compressed qcow2 only as a bare file (--format qcow2 --archive none): its size is "
                         "not known before it is written, and a tar header needs it first")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be at least 1")
    if zero_granularity and (zero_granularity % 512 or zero_granularity > GIB):
        raise UsageError("the zero granularity must be 0 or a multiple of 512 up to 1G")


def _check_devices(devices: list[str], count: int) -> None:
    if len(devices) != count:
        raise UsageError(f"{len(devices)} device names for {count} data disks")
    if count > len(DATA_DEVICES):
        raise UsageError(f"at most {len(DATA_DEVICES)} data disks")
    for device in devices:
        if not _DEVICE.match(device) or device == SYSTEM_DEVICE:
            raise UsageError(f"invalid data disk device name {device!r} (such as xvdb)")
    if len(set(devices)) != len(devices):
        raise UsageError("data disk device names must differ")


def _names(name: str, part: str, target_format: str, archive: ArchiveKind, layout: ExportLayout
           ) -> tuple[str, str | None]:
    """(file name, member name) of one disk."""
    bare = f"{name}_{part}.{target_format}"
    if archive == "none":
        return bare, None
    return bare + ARCHIVES[archive], "disk.raw" if layout == "gce" else bare


def _ecs_warnings(disks: list[_Disk]) -> list[str]:
    data = [d for d in disks if d.role == "data"]
    warnings = []
    if len(data) > ECS_MAX_DATA_DISKS:
        warnings.append(f"ECS exports at most {ECS_MAX_DATA_DISKS} data disks; this set has {len(data)}")
    for disk in data:
        if disk.virtual_size > ECS_MAX_DATA_DISK_SIZE:
            warnings.append(f"data disk {disk.device} is {disk.virtual_size >> 30} GiB; ECS exports data disks "
                            f"of at most {ECS_MAX_DATA_DISK_SIZE >> 30} GiB")
    return warnings


def _plan(disk: _Disk, granularity: int, progress: ProgressCallback) -> list[Extent]:
    """The exact allocation the member is written with: the source's extents with the zero ranges
    inside its DATA extents found by a pre-scan (not for a sparse tar member read through a
    compressed stream: its map is taken as it is, as the converter does), then the zero tail of a
    GCE size."""
    reader = disk.reader
    assert reader is not None
    scan = granularity and not map_is_plan(reader)
    extents = scan_for_zeroes(reader, granularity, progress) if scan else reader.extents()
    plan = list(with_zero_tail(extents, reader.virtual_size, disk.virtual_size))
    progress("scan", disk.virtual_size, disk.virtual_size)
    return plan


class _SetProgress:
    """Progress over the whole set: each disk's guest bytes counted after those of the disks before."""

    def __init__(self, progress: ProgressCallback | None, sizes: list[int]) -> None:
        self.progress = progress
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.total = sum(sizes)

    def reporter(self, phase: str, index: int) -> ProgressCallback:
        base = self.offsets[index]

        def report(_phase: str, done: int, _total: int) -> None:
            if self.progress is not None:
                self.progress(phase, base + done, self.total)

        return report


# -- writing an archive ----------------------------------------------------------------------------


class _HashedFile:
    """The archive file: every byte written is counted and hashed (SHA-256 and CRC-64/XZ)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.crc = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.crc = crc64.xz(view, self.crc)
        self.size += len(view)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror}", path=self.name) from None
        return len(data)

    def flush(self) -> None:
        pass


def _compressor(archive: str, file: _HashedFile, threads: int) -> Any:
    """A binary stream writing ``archive``'s compression of what it is given into ``file``."""
    if archive == "tar.gz":
        # zlib-ng ships no annotations for its threaded opener
        return gzip_ng_threaded.open(file, "wb", compresslevel=GZIP_LEVEL, threads=threads)  # type: ignore[no-untyped-call]
    if archive == "tar.zst":
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, threads=threads)
        return compressor.stream_writer(file, closefd=False)  # type: ignore[arg-type]  # write() is all it uses
    return contextlib.nullcontext(file)


def _export_archive(disk: _Disk, temporary: str, target_format: str, archive: str, threads: int, granularity: int,
                    progress: ProgressCallback) -> ExportedDisk:
    reader, member = disk.reader, disk.member
    assert reader is not None and member is not None
    fd = os.open(temporary, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_BINARY", 0))
    try:
        file = _HashedFile(fd, os.path.join(os.path.dirname(temporary), disk.file))
        hasher = ContentHasher(disk.virtual_size)
        mtime = int(time.time())
        with _compressor(archive, file, threads) as stream:
            if target_format == "raw":
                _write_raw_member(reader, disk, member, stream, hasher, mtime, progress)
            else:
                _write_image_member(reader, disk, member, stream, target_format, granularity, hasher, mtime,
                                    progress)
            stream.write(END_OF_ARCHIVE)
        os.fsync(fd)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror}", path=disk.file) from None
    finally:
        os.close(fd)
    return ExportedDisk(
        role=disk.role, device=disk.device, file=disk.file, size=file.size, sha256=file.sha256.hexdigest(),
        crc64ecma=str(file.crc), member=member, format=target_format, virtual_size=disk.virtual_size,
        content_hash=hasher.hexdigest(), source=reader.path, source_format=reader.format,
        sparsified=disk.left_out,
    )


def _write_raw_member(reader: DiskReader, disk: _Disk, member: str, stream: BinaryIO, hasher: ContentHasher,
                      mtime: int, progress: ProgressCallback) -> None:
    """An old-GNU sparse member: its map is the plan's DATA extents, its data their bytes."""
    segments = [(e.start, e.length) for e in disk.plan if e.kind is ExtentKind.DATA]
    stream.write(pack_member(member, disk.virtual_size, segments, mtime=mtime))
    hashed = stored = 0
    for offset, buffer, length in read_ahead(reader, disk.plan):
        data = memoryview(buffer)[:length]
        stream.write(data)
        hasher.skip_zeros(offset - hashed)
        hasher.update(data)
        hashed = offset + length
        stored += length
        progress("export", hashed, disk.virtual_size)
    hasher.skip_zeros(disk.virtual_size - hashed)
    stream.write(padding(stored))
    progress("export", disk.virtual_size, disk.virtual_size)


def _write_image_member(reader: DiskReader, disk: _Disk, member: str, stream: BinaryIO, target_format: str,
                        granularity: int, hasher: ContentHasher, mtime: int, progress: ProgressCallback) -> None:
    """A qcow2 or VHD member: the size ``measure`` gives for the plan, then the writer's stream."""
    writer_class = WRITERS[target_format]
    size = writer_class.measure(disk.virtual_size, disk.plan, {}, False)
    stream.write(pack_member(member, size, mtime=mtime))
    output = OutputTarget(stream, disk.file)
    writer = writer_class(output, disk.virtual_size, {}, False)
    writer.plan(disk.plan)
    feed_in_order(reader, disk.plan, granularity, writer, Tally(disk.virtual_size, progress), hasher)
    writer.finish()
    if output.position != size:  # the header is written: a wrong size would corrupt the archive
        raise OutputError(f"internal error: the {target_format} writer wrote {output.position} bytes where "
                          f"{size} were measured", path=disk.file)
    stream.write(padding(size))


def _export_bare(disk: _Disk, temporary: str, target_format: DiskFormat, compress: bool, granularity: int,
                 allow_backing: bool, progress: ProgressCallback) -> ExportedDisk:
    """The disk file itself (``archive="none"``), written by the converter with its checksums."""
    reader = disk.reader
    assert reader is not None

    def report(phase: str, done: int, total: int) -> None:
        if phase == "convert":  # the converter's own pre-scan is not counted again
            progress("export", done, total)

    # a sparsified disk is converted through its sparsifying reader (left open), as planned
    with reported_as(os.path.join(os.path.dirname(temporary), disk.file), temporary):
        result = convert(reader if disk.sparsified is not None else disk.source, temporary, target_format,
                         compress=compress, zero_granularity=granularity, checksum=True, allow_backing=allow_backing,
                         force=True, progress=report)
    return ExportedDisk(
        role=disk.role, device=disk.device, file=disk.file, size=os.stat(temporary).st_size,
        sha256=result.sha256 or "", crc64ecma=None, member=None, format=target_format,
        virtual_size=result.virtual_size, content_hash=result.content_hash or "", source=reader.path,
        source_format=reader.format, sparsified=disk.left_out,
    )


# -- verifying -------------------------------------------------------------------------------------


@dataclass
class VerifiedFile:
    #: the manifest listing the file
    manifest: str
    file: str
    #: "ok", "missing", "differs" (size or hashes), "malformed" (--deep: the archive does not decode)
    status: str
    message: str
    #: whether the guest content hash was recomputed (--deep: RAW members, any member of a plain tar,
    #: bare disk files; a qcow2 or VHD in a compressed stream cannot be read without random access)
    content_checked: bool = False


@dataclass
class VerifyResult:
    #: the manifests checked: the one named, or every ``*.manifest.json`` of the folder named
    manifests: list[str]
    deep: bool
    intact: bool
    files: list[VerifiedFile]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(path: str | os.PathLike[str], *, deep: bool = False) -> VerifyResult:
    """Re-hash every file of an export against its manifest (``path``: the manifest, or a folder:
    every manifest in it, since several exports may share one). ``deep`` also decompresses each
    archive, parses its tar and recomputes the member's guest content hash, in the same read as
    the file's hashes. Every manifest is read and checked before any file is hashed."""
    manifests = [read_manifest(manifest) for manifest in _find_manifests(os.fspath(path))]
    files = []
    for manifest in manifests:
        for entry in manifest.disks:
            file_path = manifest.locate(entry)
            if not os.path.isfile(file_path):
                kind = file_kind(os.stat(file_path).st_mode) if os.path.exists(file_path) else None
                files.append(VerifiedFile(manifest.path, entry.file, "missing",
                                          f"is {kind}, not a file" if kind else "not found"))
                continue
            files.append(_verify_file(manifest.path, file_path, entry, deep))
    return VerifyResult(manifests=[m.path for m in manifests], deep=deep,
                        intact=all(f.status == "ok" for f in files), files=files)


def _find_manifests(path: str) -> list[str]:
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            kind = file_kind(os.stat(path).st_mode) if os.path.exists(path) else None
            raise ArchiveError(f"is {kind}, not a manifest or folder" if kind else "no such manifest or folder",
                               path=path)
        return [os.path.abspath(path)]
    found = sorted(name for name in os.listdir(path) if name.endswith(MANIFEST_SUFFIX))
    if not found:
        raise UsageError(f"{path}: no *{MANIFEST_SUFFIX} in the folder")
    return [os.path.abspath(os.path.join(path, name)) for name in found]


class _HashedReader:
    """Reads a file, hashing every byte read (SHA-256 and CRC-64/XZ)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = cast(io.RawIOBase, f)  # open_input opens files unbuffered: a FileIO
        self.sha256 = hashlib.sha256()
        self.crc = 0
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size if size is not None and size >= 0 else CHUNK)
        self._hash(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count = self.f.readinto(buffer)
        self._hash(memoryview(buffer)[:count])
        return count

    def _hash(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.crc = crc64.xz(data, self.crc)
        self.size += len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _verify_file(manifest: str, path: str, entry: ExportedDisk, deep: bool) -> VerifiedFile:
    name = entry.file
    archive = next((kind for kind, suffix in ARCHIVES.items() if suffix and name.endswith(suffix)), "none")
    content_hash: str | None = None
    decode_problem: str | None = None
    with open_input(path) as f:
        hashed = _HashedReader(f)
        try:
            if deep and archive != "none":
                content_hash = _deep_read(hashed, archive, entry)
                if content_hash is None and archive == "tar":  # a qcow2 or VHD member, read in place
                    with open_image(path) as reader:
                        content_hash = content_hash_of(reader)
            elif deep:
                with open_image(path, canonical_format(entry.format)) as reader:
                    content_hash = content_hash_of(reader)
        except DiskImageError as exc:
            decode_problem = exc.message
        hashed.drain()
    problems = []
    if hashed.size != entry.size:
        problems.append(f"size {hashed.size}, the manifest says {entry.size}")
    if hashed.sha256.hexdigest() != entry.sha256:
        problems.append("sha256 differs")
    if entry.crc64ecma is not None and str(hashed.crc) != entry.crc64ecma:
        problems.append("crc64ecma differs")
    if content_hash is not None and entry.content_hash is not None and content_hash != entry.content_hash:
        problems.append("guest content hash differs")
    status = "differs" if problems else "malformed" if decode_problem else "ok"
    if decode_problem:
        problems.append(decode_problem)
    return VerifiedFile(manifest, name, status, "; ".join(problems) or "intact", content_hash is not None)


def _deep_read(hashed: _HashedReader, archive: str, entry: ExportedDisk) -> str | None:
    """Decompress the archive and parse its one member; the guest content hash of a RAW member
    (a qcow2 or VHD member is only checked for its tar structure: None)."""
    decoder: Any
    if archive == "tar.gz":
        decoder = gzip_ng_threaded.open(hashed, "rb", threads=1)  # type: ignore[no-untyped-call]
    elif archive == "tar.zst":
        decoder = zstandard.ZstdDecompressor().stream_reader(
            hashed, read_across_frames=True, closefd=False)  # type: ignore[arg-type]  # read() is all it uses
    else:
        decoder = contextlib.nullcontext(hashed)
    try:
        with decoder as stream:
            member = read_member(stream)
            if member is None or member.kind != "file":
                raise ArchiveError("the archive holds no disk member")
            if member.name != entry.member:
                raise ArchiveError(f"the member is {member.name!r}, the manifest says {entry.member!r}")
            content_hash = _member_content_hash(stream, member) if entry.format == "raw" else None
            if content_hash is None:
                for _ in iter_data(stream, member):
                    pass
            if read_member(stream) is not None:
                raise ArchiveError("the archive holds more than one member")
            while stream.read(CHUNK):  # to the end of the compressed stream: its own checks run
                pass
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise ArchiveError(f"cannot decompress: {exc}") from None
    return content_hash


def _member_content_hash(stream: Any, member: TarMember) -> str:
    hasher = ContentHasher(member.size)
    position = 0
    for offset, data in iter_data(stream, member, CHUNK):
        hasher.skip_zeros(offset - position)
        hasher.update(data)
        position = offset + len(data)
    hasher.skip_zeros(member.size - position)
    return hasher.hexdigest()


def _write_text(temporary: str, final: str, text: str) -> None:
    """``text`` into ``temporary``, flushed; errors name ``final``."""
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror}", path=final) from None

