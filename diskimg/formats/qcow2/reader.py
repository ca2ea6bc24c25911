"""Reading qcow2 images: detection's probe, the first cluster (header and extensions, shared with
``check`` and the validator) and :class:`Qcow2Reader`, which walks the L1 and L2 tables on demand
with a bounded cache of L2 tables (qemu's qcow2.c and qcow2-cluster.c)."""

from __future__ import annotations

import os
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

from ...errors import CorruptImage, DiskImageError, UnsupportedFormat, UsageError
from ...host.files import HostFile
from ..probing import Detection, OpenOptions, ParentOpener
from ..reader import DiskReader, ImageInfo, Run, RunKind, Snapshot
from .structures import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    CRYPT_AES,
    CRYPT_LUKS,
    CRYPT_NONE,
    DATA_FILE_HINT,
    DECRYPT_HINT,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2_COMPRESSED,
    L2_INVALID,
    L2_NORMAL,
    L2_SUBCLUSTERS,
    L2_ZERO,
    L2_ZERO_ALLOC,
    MAGIC,
    MAX_CLUSTER_BITS,
    MAX_L1_ENTRIES,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_VIRTUAL_SIZE,
    MIN_CLUSTER_BITS,
    NAME,
    SUBCLUSTERS,
    HeaderExtensions,
    InvalidL2Entry,
    Qcow2Header,
    Qcow2Snapshot,
    SnapshotTableTruncated,
    check_header,
    check_l1_place,
    decode_l2_table,
    first_cluster_extensions,
    header_version,
    parse_snapshot_table,
    parse_u64_table,
    subcluster_runs,
)

try:  # zstd is a declared dependency, but keep zlib images readable without it
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]

#: the decompressors' errors for data that is not what its compression type says
_DECOMPRESSION_ERRORS: tuple[type[Exception], ...] = (zlib.error,)
if zstandard is not None:
    _DECOMPRESSION_ERRORS = (zlib.error, zstandard.ZstdError)

_HOST, _ZERO, _BACKING, _ENCODED = RunKind.HOST, RunKind.ZERO, RunKind.BACKING, RunKind.ENCODED


def _corrupt(message: str, structure: str, offset: int | None = None, path: str | None = None) -> CorruptImage:
    return CorruptImage(message, path=path, offset=offset, structure=structure)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def probe(head: bytes, tail: bytes, file_size: int) -> Detection | None:
    """A qcow2 v2/v3 header at offset 0 (v1 "qcow" is left to the detection module)."""
    version = header_version(head)
    if head[:4] != MAGIC or version not in (2, 3):
        return None
    compat = "0.10" if version == 2 else "1.1"
    description = f"qcow2 v{version} (compat {compat})"
    hint = None
    try:
        header = Qcow2Header.parse(head)
    except DiskImageError:
        description += ", truncated or damaged header"
    else:
        description += f", virtual size {header.virtual_size} bytes"
        if MIN_CLUSTER_BITS <= header.cluster_bits <= 63:
            description += f", cluster size {header.cluster_size}"
        if header.crypt_method in (CRYPT_AES, CRYPT_LUKS):
            method = "AES" if header.crypt_method == CRYPT_AES else "LUKS"
            description += f", encrypted ({method})"
            hint = DECRYPT_HINT
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            description += ", external data file"
            hint = DATA_FILE_HINT
        if header.backing_file_offset:
            description += ", has a backing file"
    return Detection(
        format=NAME, description=description, subformat=f"v{version}", version=str(version), readable=True, hint=hint
    )



def _check_l1_inside(offset: int, entries: int, file_size: int, what: str) -> None:
    if entries and offset + entries * 8 > file_size:
        raise _corrupt(
            f"{what} ({entries} entries at offset {offset}) runs past the end of the file ({file_size} bytes)",
            what,
            offset,
        )


class FirstCluster(NamedTuple):
    """What the first cluster of a qcow2 file holds, as :func:`read_first_cluster` found it."""

    header: Qcow2Header
    #: the header extensions (empty when ``error`` is set)
    extensions: HeaderExtensions
    #: the cluster's bytes (fewer when the file is shorter; only the first 4 KiB when the cluster
    #: size is out of range): the backing file name lies here too
    data: bytes
    #: why the extensions could not be read: cluster_bits outside 9..21, a header longer than its
    #: cluster, or an extension overflowing the cluster. The reader raises it; ``check`` reports it.
    error: CorruptImage | UnsupportedFormat | None = None


def read_first_cluster(host: HostFile) -> FirstCluster:
    """The header (from the first 4 KiB) and its extensions (from the first cluster), shared by the
    reader, ``diskimg check`` and the validator, which differ only in what they do with ``error``.

    Raises what :meth:`Qcow2Header.parse` raises: without a header there is nothing to report on.
    """
    file_size = host.size
    head = host.read_at(0, min(file_size, 4096))
    header = Qcow2Header.parse(head)
    cluster_bits = header.cluster_bits
    if cluster_bits < MIN_CLUSTER_BITS:
        error = _corrupt(f"cluster_bits {cluster_bits} is below the minimum of 9 (512-byte clusters)", "header", 20)
        return FirstCluster(header, HeaderExtensions(), head, error)
    if cluster_bits > MAX_CLUSTER_BITS:
        too_large = UnsupportedFormat(
            f"cluster size 2^{cluster_bits} is larger than the 2 MiB limit (cluster_bits {cluster_bits})",
            format=NAME,
        )
        return FirstCluster(header, HeaderExtensions(), head, too_large)
    cluster_size = header.cluster_size
    data = head[:cluster_size] if len(head) >= cluster_size else host.read_at(0, min(file_size, cluster_size))
    if header.header_length > cluster_size:
        error = _corrupt(f"header_length {header.header_length} exceeds the cluster size {cluster_size}", "header", 100)
        return FirstCluster(header, HeaderExtensions(), data, error)
    try:
        extensions = first_cluster_extensions(header, data)
    except CorruptImage as exc:
        return FirstCluster(header, HeaderExtensions(), data, exc)
    return FirstCluster(header, extensions, data)


class Qcow2Reader(DiskReader):
    format = NAME
    #: L2 tables kept in memory: at most this many bytes, and this many tables
    L2_CACHE_BYTES = 32 * 1024 * 1024
    L2_CACHE_TABLES = 4096

    def __init__(
        self,
        host: HostFile,
        header: Qcow2Header,
        extensions: HeaderExtensions,
        snapshots: list[Qcow2Snapshot],
        l1: array[int],
        l1_offset: int,
        virtual_size: int,
        backing_file: str | None,
        snapshot: Qcow2Snapshot | None = None,
    ) -> None:
        super().__init__(host, virtual_size)
        self.header = header
        self.extensions = extensions
        self.snapshots = snapshots
        self.snapshot = snapshot
        self._backing_name = backing_file
        self._l1 = l1
        self._l1_offset = l1_offset
        self._cluster_bits = header.cluster_bits
        self._cluster_size = header.cluster_size
        self._extended = header.extended_l2
        self._l2_entries = header.l2_entries
        self._span_shift = header.cluster_bits + (header.l2_entries.bit_length() - 1)
        self._file_size = host.size
        self._zstd = header.compression_type == COMPRESSION_ZSTD
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._cache_limit = max(1, min(self.L2_CACHE_TABLES, self.L2_CACHE_BYTES // self._cluster_size))
        self._cache_lock = threading.Lock()
        self._decoded: tuple[int, bytes] | None = None
        #: L2 table offset -> the L1 index that uses it; at most one per file cluster, as tables
        #: past the end of the file are refused
        self._l2_owners: dict[int, int] = {}

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions | None = None) -> Qcow2Reader:
        options = options or OpenOptions()
        try:
            reader = cls._open(host, options)
        except DiskImageError as exc:
            if exc.path is None:
                exc.path = host.name
            raise
        if reader._backing_name and open_parent is not None:
            reader.parent = open_parent([reader._backing_name], reader.extensions.backing_format)
        return reader

    @classmethod
    def _open(cls, host: HostFile, options: OpenOptions) -> Qcow2Reader:
        file_size = host.size
        header, extensions, first_cluster, error = read_first_cluster(host)
        if error is not None:
            raise error
        cluster_size = header.cluster_size

        check_header(header, extensions, file_size)
        cls._check_readable(header, file_size)
        backing_file = cls._backing_name_from(header, first_cluster)
        snapshots = cls._read_snapshots(host, header, file_size)

        selected = None
        l1_offset, l1_size = header.l1_table_offset, header.l1_size
        virtual_size = header.virtual_size
        if options.snapshot is not None:
            selected = _find_snapshot(snapshots, options.snapshot)
            if selected is None:
                available = ", ".join(f"{s.id} ({s.name!r})" for s in snapshots) or "none"
                raise UsageError(
                    f"no snapshot with id or name {options.snapshot!r}; available: {available}", path=host.name
                )
            l1_offset, l1_size = selected.l1_table_offset, selected.l1_size
            if selected.disk_size is not None:
                virtual_size = selected.disk_size
            if virtual_size > MAX_VIRTUAL_SIZE or header.l1_entries_needed(virtual_size) > MAX_L1_ENTRIES:
                raise _corrupt(f"snapshot {selected.id} has an impossible disk size {virtual_size}", "snapshot table")
            what = f"snapshot {selected.id} L1 table"
            check_l1_place(l1_offset, l1_size, cluster_size, what)
            _check_l1_inside(l1_offset, l1_size, file_size, what)
        # qemu addresses the guest in 512-byte sectors and ignores a partial last sector
        virtual_size -= virtual_size % 512
        l1 = parse_u64_table(host.read_at(l1_offset, l1_size * 8)) if l1_size else array("Q")
        if len(l1) != l1_size:
            raise _corrupt("L1 table runs past the end of the file", "L1 table", l1_offset)
        return cls(host, header, extensions, snapshots, l1, l1_offset, virtual_size, backing_file, selected)

    @staticmethod
    def _check_readable(header: Qcow2Header, file_size: int) -> None:
        """What this reader refuses beyond :func:`check_header`: encrypted guest data, and tables
        that lie past the end of the file (``check`` reports those as truncation, as qemu-img does)."""
        if header.crypt_method in (CRYPT_AES, CRYPT_LUKS):
            method = "AES" if header.crypt_method == CRYPT_AES else "LUKS"
            raise UnsupportedFormat(f"encrypted ({method}) qcow2 images are not supported", format=NAME,
                                    hint=DECRYPT_HINT)
        _check_l1_inside(header.l1_table_offset, header.l1_size, file_size, "L1 table")
        if header.refcount_table_offset >= file_size:
            raise _corrupt(f"refcount table offset {header.refcount_table_offset} is past the end of the file",
                           "header", 48)
        if header.nb_snapshots and header.snapshots_offset + 40 * header.nb_snapshots > file_size:
            raise _corrupt(f"snapshot table ({header.nb_snapshots} entries at offset {header.snapshots_offset}) "
                           "lies past the end of the file", "header", 64)

    @staticmethod
    def _backing_name_from(header: Qcow2Header, first_cluster: bytes) -> str | None:
        """The backing file name (its place was checked by :func:`check_header`)."""
        offset, size = header.backing_file_offset, header.backing_file_size
        raw = first_cluster[offset : offset + size] if offset else b""
        return os.fsdecode(raw) if raw else None

    @staticmethod
    def _read_snapshots(host: HostFile, header: Qcow2Header, file_size: int) -> list[Qcow2Snapshot]:
        count = header.nb_snapshots
        if not count:
            return []
        offset = header.snapshots_offset
        available = min(file_size - offset, MAX_SNAPSHOT_TABLE_BYTES)
        want = min(available, max(4096, count * 128))
        while True:
            data = host.read_at(offset, want)
            try:
                return parse_snapshot_table(data, count, offset)
            except SnapshotTableTruncated:
                if want >= available:
                    raise
                want = min(available, want * 4)

    # -- facts -----------------------------------------------------------------------------------

    @property
    def backing_file(self) -> str | None:
        return self._backing_name

    @property
    def cluster_size(self) -> int:
        return self._cluster_size

    def info(self) -> ImageInfo:
        header = self.header
        incompat = header.incompatible_features
        features = []
        if header.compatible_features & COMPAT_LAZY_REFCOUNTS:
            features.append("lazy_refcounts")
        if self._extended:
            features.append("extended_l2")
        if incompat & INCOMPAT_DIRTY:
            features.append("dirty")
        if incompat & INCOMPAT_CORRUPT:
            features.append("corrupt")
        if header.compression_type != COMPRESSION_ZLIB:
            features.append(f"compression_type={COMPRESSION_NAMES[header.compression_type]}")
        if self.extensions.bitmaps is not None:
            features.append("bitmaps")
        snapshots = [
            Snapshot(
                id=s.id,
                name=s.name,
                virtual_size=s.disk_size if s.disk_size is not None else header.virtual_size,
                date=s.date,
                vm_state_size=s.vm_state_size,
            )
            for s in self.snapshots
        ]
        details = {
            "compat": "0.10" if header.version == 2 else "1.1",
            "refcount_bits": header.refcount_bits,
            "cluster_bits": header.cluster_bits,
            "l1_size": header.l1_size,
            "header_length": header.header_length,
            "compression_type": COMPRESSION_NAMES[header.compression_type],
            "lazy_refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "extended_l2": self._extended,
            "dirty": bool(incompat & INCOMPAT_DIRTY),
            "corrupt": bool(incompat & INCOMPAT_CORRUPT),
            "encrypted": header.crypt_method != CRYPT_NONE,
            "data_file": self.extensions.data_file,
            "incompatible_features": incompat,
            "compatible_features": header.compatible_features,
            "autoclear_features": header.autoclear_features,
            "nb_snapshots": header.nb_snapshots,
            "bitmaps": self.extensions.bitmaps.nb_bitmaps if self.extensions.bitmaps else 0,
            "header_virtual_size": header.virtual_size,
            "snapshot": self.snapshot.id if self.snapshot else None,
        }
        if incompat & INCOMPAT_DIRTY:
            details["note_dirty"] = "refcounts may be stale (lazy refcounts; not cleanly closed); data is readable"
        if incompat & INCOMPAT_CORRUPT:
            details["note_corrupt"] = "qemu marked the image corrupt; it is read as is and must not be written"
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            subformat=f"v{header.version}",
            version=str(header.version),
            cluster_size=self._cluster_size,
            features=features,
            backing_file=self._backing_name,
            backing_format=self.extensions.backing_format if self._backing_name else None,
            snapshots=snapshots,
            details=details,
        )

    # -- mapping ---------------------------------------------------------------------------------

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        """Runs over [start, end): table pieces over whole clusters, merged, then clipped."""
        mask = self._cluster_size - 1
        span_shift = self._span_shift
        unallocated = _BACKING if self._backing_name else _ZERO
        l1 = self._l1
        l1_length = len(l1)
        stop = (end + mask) & ~mask
        position = start & ~mask
        pk: RunKind | None = None  # pending run: kind, start, length, host offset, extra
        ps = pl = ph = px = 0
        while position < stop:
            index = position >> span_shift
            if index >= l1_length:
                pieces = [(position, stop - position, unallocated, 0, 0)]
                chunk_end = stop
            else:
                chunk_end = min((index + 1) << span_shift, stop)
                entry = l1[index]
                l2_offset = entry & L1E_OFFSET_MASK
                if not l2_offset:
                    pieces = [(position, chunk_end - position, unallocated, 0, 0)]
                else:
                    owner = self._l2_owners.setdefault(l2_offset, index)
                    if owner != index:
                        # corrupt (qemu-img check counts the table's refcount wrong), and an L1 of
                        # such entries would make a small file describe petabytes of data
                        raise CorruptImage(
                            f"L1 entries {owner} and {index} point at the same L2 table {l2_offset:#x}",
                            path=self.path, offset=self._l1_offset + 8 * index, structure="L1 table",
                        )
                    table = self._l2_table(l2_offset, index)
                    pieces = self._scan_l2(table, l2_offset, position, chunk_end, unallocated)
            for p_start, p_length, kind, host, extra in pieces:
                if p_start + p_length <= start or p_start >= end:  # a subcluster piece outside the request
                    continue
                if kind == pk and ps + pl == p_start and kind != _ENCODED and (kind != _HOST or ph + pl == host):
                    pl += p_length
                    continue
                if pk is not None:
                    yield _clip(ps, pl, pk, ph, px, start, end)
                pk, ps, pl, ph, px = kind, p_start, p_length, host, extra
            position = chunk_end
        if pk is not None:
            yield _clip(ps, pl, pk, ph, px, start, end)

    def _l2_table(self, offset: int, l1_index: int) -> array[int]:
        with self._cache_lock:
            table = self._cache.get(offset)
            if table is not None:
                self._cache.move_to_end(offset)
                return table
        cluster_size = self._cluster_size
        if offset % cluster_size:
            raise CorruptImage(
                f"L2 table offset {offset:#x} (L1 index {l1_index}) is not cluster aligned",
                path=self.path,
                offset=self._l1_offset + 8 * l1_index,
                structure="L1 table",
            )
        if offset + cluster_size > self._file_size:
            raise CorruptImage(
                f"L2 table at host offset {offset:#x} (L1 index {l1_index}) lies past the end of the file",
                path=self.path,
                offset=self._l1_offset + 8 * l1_index,
                structure="L1 table",
            )
        table = parse_u64_table(self.host.read_at(offset, cluster_size))
        if len(table) * 8 != cluster_size:
            raise CorruptImage("L2 table read came short", path=self.path, offset=offset, structure="L2 table")
        with self._cache_lock:
            self._cache[offset] = table
            while len(self._cache) > self._cache_limit:
                self._cache.popitem(last=False)
        return table

    def _scan_l2(
        self, table: array[int], l2_offset: int, position: int, chunk_end: int, unallocated: RunKind
    ) -> list[tuple[int, int, RunKind, int, int]]:
        """Pieces for the whole clusters [position, chunk_end) described by one L2 table, from the
        runs of :func:`decode_l2_table`; host offsets are checked as qemu checks them before a read."""
        cluster_bits = self._cluster_bits
        cluster_size = self._cluster_size
        first = (position >> cluster_bits) & (self._l2_entries - 1)
        count = (chunk_end - position) >> cluster_bits
        pieces: list[tuple[int, int, RunKind, int, int]] = []
        file_size = self._file_size
        mask = cluster_size - 1
        entry_size = 16 if self._extended else 8
        base = position - (first << cluster_bits)  # guest offset of the table's first entry
        for state, index, length, host, extra in decode_l2_table(table, first, count, cluster_bits, self._extended):
            guest = base + (index << cluster_bits)
            if state == L2_INVALID:
                raise InvalidL2Entry(
                    f"invalid subcluster bitmap {extra:#018x} for guest offset {guest}",
                    path=self.path, offset=l2_offset + entry_size * index, structure="L2 table",
                )
            if state == L2_COMPRESSED:
                if host >= file_size:
                    raise CorruptImage(
                        f"compressed cluster for guest offset {guest} starts at host offset {host}, past the end of "
                        f"the file ({file_size} bytes)",
                        path=self.path, offset=l2_offset + entry_size * index, structure="L2 table",
                    )
                pieces.append((guest, cluster_size, _ENCODED, host, extra))
                continue
            if host & mask:
                raise CorruptImage(
                    f"cluster offset {host:#x} for guest offset {guest} is not cluster aligned",
                    path=self.path, offset=l2_offset + entry_size * index, structure="L2 table",
                )
            if state == L2_NORMAL:
                size = length << cluster_bits
                if host + size > file_size:
                    past = max(0, (file_size - host) >> cluster_bits)  # the first cluster not wholly inside
                    raise self._past_eof(guest + (past << cluster_bits), host + (past << cluster_bits), cluster_size,
                                         l2_offset + entry_size * (index + past))
                pieces.append((guest, size, _HOST, host, 0))
            elif state in (L2_ZERO, L2_ZERO_ALLOC):
                pieces.append((guest, length << cluster_bits, _ZERO, 0, 0))
            elif state == L2_SUBCLUSTERS:
                self._subcluster_pieces(pieces, guest, host, extra, unallocated, l2_offset + entry_size * index)
            else:  # L2_UNALLOCATED, L2_UNALLOCATED_ALLOC
                pieces.append((guest, length << cluster_bits, unallocated, 0, 0))
        return pieces

    def _past_eof(self, guest: int, host: int, length: int, entry_offset: int) -> CorruptImage:
        """The error for guest data whose host range does not lie wholly inside the file. (qemu
        would read zeros past the end; a cut data cluster means a truncated image, so say so.)"""
        return CorruptImage(
            f"image is truncated: guest offset {guest} maps to host offset {host} "
            f"({length} bytes), past the end of the file ({self._file_size} bytes)",
            path=self.path,
            offset=entry_offset,
            structure="L2 table",
        )

    def _subcluster_pieces(
        self, pieces: list[tuple[int, int, RunKind, int, int]], guest: int, host: int, bitmap: int,
        unallocated: RunKind, entry_offset: int,
    ) -> None:
        """The pieces of one cluster whose subclusters differ; only the allocated ones must lie
        inside the file."""
        size = self._cluster_size // SUBCLUSTERS
        for index, count, state in subcluster_runs(bitmap):
            start = guest + index * size
            length = count * size
            if state == L2_NORMAL:
                if host + (index + count) * size > self._file_size:
                    raise self._past_eof(start, host + index * size, length, entry_offset)
                pieces.append((start, length, _HOST, host + index * size, 0))
            else:
                pieces.append((start, length, _ZERO if state == L2_ZERO else unallocated, 0, 0))

    # -- compressed clusters -----------------------------------------------------------------------

    def _read_encoded(self, run: Run) -> bytes:
        cluster_start = run.start & ~(self._cluster_size - 1)
        cached = self._decoded
        if cached is not None and cached[0] == run.host_offset:
            data = cached[1]
        else:
            data = self._decompress(run.host_offset, run.extra, cluster_start)
            self._decoded = (run.host_offset, data)
        offset = run.start - cluster_start
        if offset == 0 and run.length == len(data):
            return data
        return data[offset : offset + run.length]

    def _decompress(self, host: int, length: int, guest: int) -> bytes:
        cluster_size = self._cluster_size
        # compressed data may end at the end of the file, inside its last sector: a short read is fine
        stored = self.host.read_at(host, length)
        try:
            if self._zstd:
                reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True)
                parts = []
                produced = 0
                while produced < cluster_size:
                    part = reader.read(cluster_size - produced)
                    if not part:
                        break
                    parts.append(part)
                    produced += len(part)
                data = b"".join(parts)
            else:
                data = zlib.decompressobj(-15).decompress(stored, cluster_size)
        except _DECOMPRESSION_ERRORS as exc:
            raise CorruptImage(
                f"compressed cluster for guest offset {guest} does not decompress: {exc}",
                path=self.path,
                offset=host,
                structure="compressed cluster",
            ) from None
        if len(data) != cluster_size:
            raise CorruptImage(
                f"compressed cluster for guest offset {guest} decompresses to {len(data)} bytes, "
                f"not {cluster_size}",
                path=self.path,
                offset=host,
                structure="compressed cluster",
            )
        return data


def _clip(run_start: int, length: int, kind: RunKind, host: int, extra: int, start: int, end: int) -> Run:
    if run_start < start:
        cut = start - run_start
        run_start = start
        length -= cut
        if kind is _HOST:
            host += cut
    if run_start + length > end:
        length = end - run_start
    return Run(run_start, length, kind, host, extra)


def _find_snapshot(snapshots: list[Qcow2Snapshot], wanted: str) -> Qcow2Snapshot | None:
    """By id first, then by name (as qemu's snapshot lookups do)."""
    for snapshot in snapshots:
        if snapshot.id == wanted:
            return snapshot
    for snapshot in snapshots:
        if snapshot.name == wanted:
            return snapshot
    return None
