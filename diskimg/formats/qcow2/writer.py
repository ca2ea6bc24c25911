"""Writing qcow2 images in one forward pass, to files and pipes, optionally with compressed
clusters: the layout of qemu's scripts/qcow2-to-stdout.py, planned before the first byte."""

from __future__ import annotations

import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from ...errors import OutputError, UsageError
from ...units import parse_size
from ..compression import ClusterCompressor, CompressionPool
from ..reader import Extent, ExtentKind
from ..writer import DiskWriter, OutputTarget, option_flag
from .structures import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_FEATURE_NAMES,
    FEATURE_AUTOCLEAR,
    FEATURE_COMPATIBLE,
    FEATURE_INCOMPATIBLE,
    INCOMPAT_COMPRESSION,
    L2E_OFFSET_MASK,
    MAX_CLUSTER_BITS,
    MAX_L1_ENTRIES,
    MAX_REFCOUNT_TABLE_BYTES,
    MIN_CLUSTER_BITS,
    NAME,
    OFLAG_COPIED,
    HeaderExtension,
    Qcow2Header,
    encode_compressed_entry,
    pack_feature_name_table,
    pack_header_extensions,
    pack_refcounts,
    pack_u64_table,
)

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

try:  # zstd is a declared dependency, but keep zlib images readable without it
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]

#
# Layout (one for files and pipes, as in qemu's scripts/qcow2-to-stdout.py):
#
#     cluster 0         header, feature name table (v3, clusters above 4 KiB, as qemu writes it)
#     refcount table    sized with the refcount blocks by a fixed-point loop (blocks count themselves)
#     refcount blocks
#     L1 table
#     L2 tables         one per L1 range the plan touches, in guest order
#     data              clusters in guest order (compressed clusters packed byte after byte)
#
# On a streaming target (a pipe, or while the output's SHA-256 is computed) the plan is exact and
# everything is known before the first byte: the metadata is written first, then every planned
# cluster (a hole, or zeros, where no data arrives).  On a seekable file the plan is an upper
# bound: the metadata space is reserved from it, data clusters are allocated in arrival order, and
# the real tables are written into the reserved space at the end; reserved clusters left unused
# have refcount 0 (holes that ``qemu-img check`` calls neither leaks nor errors).

#: qemu 7.2's feature name table, in its order
FEATURE_NAME_TABLE = [
    (FEATURE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
]
#: qemu leaves the feature name table out for clusters of 4 KiB and less (room for a backing name)
FEATURE_TABLE_MIN_CLUSTER = 4096 + 1

_COMPAT_VERSIONS = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}
#: zlib level for -c (qemu uses Z_DEFAULT_COMPRESSION) and zstd level (qemu uses zstd's default, 3)
ZLIB_LEVEL = 6
ZSTD_LEVEL = 3
#: deflate window qemu inflates with (windowBits -12): a larger window would corrupt reads in qemu
ZLIB_WBITS = -12

#: (guest cluster, count, host cluster, newly allocated) of a run of clusters a write goes to
_Piece: TypeAlias = "tuple[int, int, int, bool]"
#: (data, file offset) of a write of placed clusters
_Write: TypeAlias = "tuple[bytes | bytearray | memoryview, int]"
#: (first cluster, count, refcount): one refcount for all, or one per cluster
_Segment: TypeAlias = "tuple[int, int, int | array[int]]"
#: what stays beside a batch being compressed: its guest clusters, its buffer
_BatchTag: TypeAlias = "tuple[list[int], bytearray]"


@dataclass(frozen=True)
class Qcow2WriterSettings:
    """The ``-o`` options of the qcow2 writer, checked."""

    version: int = 3
    cluster_bits: int = 16
    compression_type: int = COMPRESSION_ZLIB
    refcount_order: int = 4
    lazy_refcounts: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _flag(options: Mapping[str, str], key: str) -> bool:
    return option_flag(options, key, NAME)


def writer_settings(options: Mapping[str, str]) -> Qcow2WriterSettings:
    """Check the qcow2 writer's ``-o`` options (qemu-img's names, values and rules)."""

    compat = str(options.get("compat", "1.1")).strip().lower()
    if compat not in _COMPAT_VERSIONS:
        raise UsageError(f"qcow2 option compat={compat!r}: expected 1.1 (v3, the default) or 0.10 (v2)")
    version = _COMPAT_VERSIONS[compat]
    cluster_size = parse_size(str(options.get("cluster_size", "64k")))
    if cluster_size & (cluster_size - 1) or not 1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS:
        raise UsageError(
            f"qcow2 option cluster_size={options.get('cluster_size')}: must be a power of two from 512 to 2M"
        )
    kind = str(options.get("compression_type", "zlib")).strip().lower()
    types = {name: number for number, name in COMPRESSION_NAMES.items()}
    if kind not in types:
        raise UsageError(f"qcow2 option compression_type={kind!r}: expected zlib or zstd")
    if types[kind] != COMPRESSION_ZLIB:
        if version < 3:
            raise UsageError("compression_type=zstd needs compat=1.1 (a v3 image)")
        if zstandard is None:  # pragma: no cover
            raise UsageError("compression_type=zstd needs the 'zstandard' package")
    text = str(options.get("refcount_bits", "16")).strip()
    bits = int(text) if text.isdigit() else 0
    if bits not in (1, 2, 4, 8, 16, 32, 64):
        raise UsageError(f"qcow2 option refcount_bits={text!r}: must be a power of two from 1 to 64")
    if bits != 16 and version < 3:
        raise UsageError("refcount widths other than 16 bits need compat=1.1 (a v3 image)")
    lazy = _flag(options, "lazy_refcounts")
    if lazy and version < 3:
        raise UsageError("lazy_refcounts=on needs compat=1.1 (a v3 image)")
    preallocation = str(options.get("preallocation", "off")).strip().lower()
    if preallocation != "off":
        raise UsageError(f"qcow2 option preallocation={preallocation!r}: diskimg writes sparse images only (off)")
    if _flag(options, "extended_l2"):
        raise UsageError("qcow2 option extended_l2=on is not supported by the diskimg writer (off only)")
    return Qcow2WriterSettings(
        version=version,
        cluster_bits=cluster_size.bit_length() - 1,
        compression_type=types[kind],
        refcount_order=bits.bit_length() - 1,
        lazy_refcounts=lazy,
    )


class Qcow2Layout(NamedTuple):
    """Where everything goes in a written image, in clusters (see the layout above)."""

    cluster_bits: int
    l1_size: int  # entries
    l1_clusters: int
    l2_tables: int
    refcount_table_clusters: int
    refcount_blocks: int
    data_clusters: int

    @property
    def refcount_table_offset(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_blocks_offset(self) -> int:
        return (1 + self.refcount_table_clusters) << self.cluster_bits

    @property
    def l1_offset(self) -> int:
        return (1 + self.refcount_table_clusters + self.refcount_blocks) << self.cluster_bits

    @property
    def l2_offset(self) -> int:
        return self.l1_offset + (self.l1_clusters << self.cluster_bits)

    @property
    def data_offset(self) -> int:
        return self.l2_offset + (self.l2_tables << self.cluster_bits)

    @property
    def total_clusters(self) -> int:
        return (self.data_offset >> self.cluster_bits) + self.data_clusters


def plan_layout(
    cluster_bits: int, refcount_order: int, virtual_size: int, l2_tables: int, data_clusters: int,
    *, writable: bool = True,
) -> Qcow2Layout:
    """The layout of an image with this many L2 tables and data clusters. The refcount table and
    blocks size themselves by a fixed-point loop: the blocks must count every cluster, their own
    and the table's included. ``writable``: refuse a layout whose refcount table qemu would refuse
    (off for a size that is only reported, as qemu-img measure reports it)."""
    cluster_size = 1 << cluster_bits
    span_bits = 2 * cluster_bits - 3
    l1_size = -(-virtual_size >> span_bits)
    if l1_size > MAX_L1_ENTRIES:
        raise UsageError(
            f"a virtual size of {virtual_size} bytes needs an L1 table above qemu's 32 MiB limit with "
            f"{cluster_size}-byte clusters: use a larger cluster_size"
        )
    l1_clusters = -(-l1_size * 8 >> cluster_bits)
    per_block = (cluster_size * 8) >> refcount_order
    fixed = 1 + l1_clusters + l2_tables + data_clusters
    table_clusters, blocks = 1, 0
    while True:
        need_blocks = -(-(fixed + table_clusters + blocks) // per_block)
        need_table = max(1, -(-need_blocks * 8 >> cluster_bits))
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    if writable and table_clusters << cluster_bits > MAX_REFCOUNT_TABLE_BYTES:
        raise UsageError(
            f"the image would need a refcount table above qemu's 8 MiB limit with {cluster_size}-byte clusters "
            "and these refcount_bits: use a larger cluster_size"
        )
    return Qcow2Layout(cluster_bits, l1_size, l1_clusters, l2_tables, table_clusters, blocks, data_clusters)


def plan_clusters(extents: Iterable[Extent], cluster_bits: int, virtual_size: int,
                  ) -> tuple[array[int], array[int], bytearray, int]:
    """The guest clusters the DATA extents touch: (run starts, run ends) in cluster numbers, merged;
    one byte per L1 entry, 1 where the range holds a planned cluster; and the cluster count."""

    starts, ends = array("Q"), array("Q")
    l2_bits = cluster_bits - 3
    planned_l1 = bytearray(-(-virtual_size >> (cluster_bits + l2_bits)))
    count = 0
    run_start = run_end = -1

    def close() -> None:
        nonlocal count
        starts.append(run_start)
        ends.append(run_end)
        count += run_end - run_start
        first, last = run_start >> l2_bits, (run_end - 1) >> l2_bits
        planned_l1[first : last + 1] = b"\x01" * (last - first + 1)

    for extent in extents:
        if extent.kind is not ExtentKind.DATA or extent.length <= 0:
            continue
        start, end = max(0, extent.start), min(extent.start + extent.length, virtual_size)
        if start >= end:
            continue
        first, stop = start >> cluster_bits, ((end - 1) >> cluster_bits) + 1
        if first < run_start:
            raise UsageError("qcow2 writer: the planned extents are not in increasing order")
        if first <= run_end:
            run_end = max(run_end, stop)
            continue
        if run_end > run_start >= 0:
            close()
        run_start, run_end = first, stop
    if run_end > run_start >= 0:
        close()
    return starts, ends, planned_l1, count


_REFCOUNT_TYPECODES = {8: "B", 16: "H", 32: "I" if array("I").itemsize == 4 else "L", 64: "Q"}


class Qcow2Writer(DiskWriter):
    """Writes qcow2 v3 (compat 1.1) or v2 (compat 0.10) images in one forward pass, to files and
    pipes, optionally with compressed clusters (files only). See the layout notes above.

    On a seekable file without compression, ``write`` may be called from several threads at once
    (``concurrent_writes``): host clusters are allocated under a lock in the order data arrives,
    so data clusters follow guest order up to the interleaving of the chunks in flight.
    """

    format = NAME
    OPTIONS: Mapping[str, str] = {
        "compat": "1.1 (v3, default) or 0.10 (v2, for old consumers)",
        "cluster_size": "a power of two from 512 to 2M (default 64k)",
        "compression_type": "zlib (default) or zstd (needs compat=1.1) for -c",
        "refcount_bits": "refcount width: 1, 2, 4, 8, 16 (default), 32 or 64",
        "lazy_refcounts": "on or off (default): sets the lazy refcounts feature bit (compat=1.1)",
        "preallocation": "off only (the image is sparse)",
        "extended_l2": "off only",
    }
    supports_compression = True

    #: guest bytes given to a compression thread at once
    BATCH_BYTES = 2 << 20

    def __init__(self, target: OutputTarget, virtual_size: int, options: Mapping[str, str], compress: bool) -> None:
        super().__init__(target, virtual_size, options, compress)
        self.settings = writer_settings(self.options)
        if compress and target.streaming:
            raise UsageError(
                "compressed qcow2 (-c) cannot be streamed (to a pipe, or hashed as it is written): the "
                "compressed sizes must be known before the tables that precede the data; write to a file"
            )
        self._cb = self.settings.cluster_bits
        self._cs = 1 << self._cb
        self._l2_bits = self._cb - 3
        #: qemu addresses the guest in 512-byte sectors: a partial last sector is rounded up
        self.disk_size = -(-virtual_size // 512) * 512
        plan_layout(self._cb, self.settings.refcount_order, self.disk_size, 0, 0)  # size limits, early
        self._layout: Qcow2Layout | None = None
        self._planned_l1 = bytearray()
        # streaming: the planned runs of guest clusters (first, count, first host cluster)
        self._rg, self._rn, self._rh = array("Q"), array("Q"), array("Q")
        self._cursor = 0  # the run the last write went to
        # seekable: the L2 tables being built (L1 index -> entries), allocation and its limits
        self._tables: dict[int, array[int]] = {}
        self._empty_table = bytes(self._cs)
        self._next_free = 0  # next free host cluster
        self._capacity = 0  # host clusters the reserved refcount blocks cover
        self._lock = threading.Lock()
        #: a block device keeps old bytes where nothing is written: new clusters are zeroed there
        self._zero_fill = not getattr(target, "is_regular_file", True)
        self._pool: CompressionPool[list[memoryview], _BatchTag, list[bytes | None]] | None = None  # -c only
        self._io: ThreadPoolExecutor | None = None  # writes of compressed batches
        self._pending_io: deque[tuple[Future[None], bytearray | None]] = deque()  # writes not yet waited for

    # -- sizes -----------------------------------------------------------------------------------

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        """The output file's size for this plan, uncompressed: exact on a streaming target (where the
        plan is exact); on a seekable file, where only clusters receiving data are allocated, an
        upper bound. With ``compress`` an upper bound too (compressed clusters never take more host
        clusters than they would uncompressed)."""
        return cls._planned_size(virtual_size, extents, options, writable=True)

    @classmethod
    def fully_allocated(cls, virtual_size: int, options: Mapping[str, str] | None, compress: bool = False) -> int:
        return cls._planned_size(virtual_size, [Extent(0, virtual_size, ExtentKind.DATA)], options, writable=False)

    @classmethod
    def _planned_size(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                      writable: bool) -> int:
        settings = writer_settings(dict(options or {}))
        size = -(-virtual_size // 512) * 512
        _, _, planned_l1, clusters = plan_clusters(extents, settings.cluster_bits, size)
        layout = plan_layout(settings.cluster_bits, settings.refcount_order, size, planned_l1.count(1), clusters,
                             writable=writable)
        return layout.total_clusters << settings.cluster_bits

    @property
    def requires_exact_plan(self) -> bool:
        return self.target.streaming

    @property
    def concurrent_writes(self) -> bool:
        return not self.target.streaming and not self.compress

    # -- plan ------------------------------------------------------------------------------------

    def plan(self, extents: Iterable[Extent]) -> None:
        if self._layout is not None:
            raise UsageError("qcow2 writer: plan() given twice")
        starts, ends, planned_l1, clusters = plan_clusters(extents, self._cb, self.disk_size)
        layout = plan_layout(self._cb, self.settings.refcount_order, self.disk_size, planned_l1.count(1), clusters)
        self._layout = layout
        self._planned_l1 = planned_l1
        target = self.target
        data_cluster = layout.data_offset >> self._cb
        self._next_free = data_cluster
        if target.streaming:
            host = data_cluster
            for start, end in zip(starts, ends, strict=True):
                self._rg.append(start)
                self._rn.append(end - start)
                self._rh.append(host)
                host += end - start
            self._write_streaming_metadata()
        else:
            per_block = (self._cs * 8) >> self.settings.refcount_order
            self._capacity = layout.refcount_blocks * per_block
            if self.compress:
                self._start_compression()

    def _ensure_plan(self) -> None:
        if self._layout is None:
            self.plan([Extent(0, self.disk_size, ExtentKind.DATA)] if self.disk_size else [])

    # -- data ------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.disk_size)
        length = len(view)
        end = offset + length
        concurrent = self.concurrent_writes
        if not length:
            return
        if self._layout is None:
            with self._lock:
                self._ensure_plan()
        if not concurrent:
            self._written_to = end
        if self.compress:
            self._assemble(offset, view)
        elif self.target.streaming:
            self._write_streaming(offset, view)
        else:
            self._write_positional(offset, view)

    def reserve(self, offset: int, length: int) -> None:
        """Allocate host clusters for [offset, offset + length) in the order data arrives (which the
        converter keeps to guest order), so that the file's layout does not depend on thread timing.
        On a block device new clusters are zero-filled by ``write``, which must allocate them itself."""
        if not length or self.compress or self.target.streaming or self._zero_fill:
            return
        with self._lock:
            self._ensure_plan()
            self._allocate(offset >> self._cb, (offset + length - 1) >> self._cb)

    def _unplanned(self, offset: int) -> OutputError:
        return OutputError(
            f"qcow2 writer: data at guest offset {offset} lies outside the planned allocation "
            "(the source changed during the conversion?)",
            path=self.target.name,
        )

    def _write_streaming(self, offset: int, view: memoryview) -> None:
        """Exact plan: the host offset of every planned cluster is known; write in file order."""
        cb, target = self._cb, self.target
        end = offset + len(view)
        first, last = offset >> cb, (end - 1) >> cb
        rg, rn = self._rg, self._rn
        index, runs = self._cursor, len(rg)
        while index < runs and rg[index] + rn[index] <= first:
            index += 1
        self._cursor = index
        if index == runs or rg[index] > first:
            raise self._unplanned(offset)
        if last >= rg[index] + rn[index]:
            raise self._unplanned((rg[index] + rn[index]) << cb)
        host = ((self._rh[index] + first - rg[index]) << cb) + (offset & (self._cs - 1))
        if host < target.position:
            raise AssertionError(f"qcow2 writer: host offset {host} behind the output position {target.position}")
        target.skip(host - target.position)
        target.write(view)

    def _write_positional(self, offset: int, view: memoryview) -> None:
        """Seekable file: host clusters for the guest clusters the data touches (allocated under
        the lock, in arrival order), then positional writes outside it."""
        cb = self._cb
        end = offset + len(view)
        target = self.target
        with self._lock:
            pieces = self._allocate(offset >> cb, (end - 1) >> cb)
            if self._zero_fill:  # the parts of new clusters this data leaves, zeroed before anyone writes there
                zeros = memoryview(self._empty_table)
                for guest, count, host, new in pieces:
                    if new:
                        start, stop = max(offset, guest << cb), min(end, (guest + count) << cb)
                        target.pwrite(zeros[: start - (guest << cb)], host << cb)
                        target.pwrite(zeros[: ((guest + count) << cb) - stop], (host << cb) + stop - (guest << cb))
        for guest, count, host, _new in pieces:
            start, stop = max(offset, guest << cb), min(end, (guest + count) << cb)
            target.pwrite(view[start - offset : stop - offset], (host << cb) + start - (guest << cb))

    def _allocate(self, first: int, last: int) -> list[_Piece]:
        """(guest cluster, count, host cluster, newly allocated) runs covering clusters [first, last].

        Ranges with no allocated cluster are allocated at once; a cluster allocated already (by
        earlier data ending inside it, or by another thread's data) is reused, one at a time."""
        pieces: list[_Piece] = []
        cb, l2_bits = self._cb, self._l2_bits
        mask = (1 << l2_bits) - 1
        guest = first
        while guest <= last:
            stop = min(last + 1, ((guest >> l2_bits) + 1) << l2_bits)  # within one L2 table
            table = self._tables.get(guest >> l2_bits)
            if table is not None:
                rest = table[guest & mask : ((stop - 1) & mask) + 1]
                if rest.count(0) != len(rest):
                    entry = table[guest & mask]
                    if entry:
                        self._add_piece(pieces, guest, 1, (entry & L2E_OFFSET_MASK) >> cb, False)
                    else:
                        self._add_piece(pieces, guest, 1, self._new_clusters(guest, 1), True)
                    guest += 1
                    continue
            self._add_piece(pieces, guest, stop - guest, self._new_clusters(guest, stop - guest), True)
            guest = stop
        return pieces

    def _new_clusters(self, guest: int, count: int) -> int:
        """Allocate and map ``count`` host clusters for guest clusters from ``guest``; the first."""
        self._check_room(guest, guest + count - 1, count)
        host = self._next_free
        self._next_free += count
        self._map_range(guest, count, host)
        return host

    def _add_piece(self, pieces: list[_Piece], guest: int, count: int, host: int, new: bool) -> None:
        if pieces:
            last_guest, last_count, last_host, last_new = pieces[-1]
            if last_guest + last_count == guest and last_host + last_count == host and (
                last_new == new or not self._zero_fill
            ):
                pieces[-1] = (last_guest, last_count + count, last_host, last_new and new)
                return
        pieces.append((guest, count, host, new))

    def _check_room(self, first: int, last: int, count: int) -> None:
        """Seekable mode: clusters [first, last] lie in planned L1 ranges, and ``count`` more host
        clusters stay within what the reserved refcount blocks cover."""
        l2_bits = self._l2_bits
        if self._planned_l1.find(b"\0", first >> l2_bits, (last >> l2_bits) + 1) >= 0:
            raise self._unplanned(first << self._cb)
        if self._next_free + count > self._capacity:
            raise self._unplanned(first << self._cb)

    def _table(self, l1_index: int) -> array[int]:
        table = self._tables.get(l1_index)
        if table is None:
            table = self._tables[l1_index] = array("Q", self._empty_table)
        return table

    def _map_range(self, guest: int, count: int, host: int) -> None:
        """L2 entries for ``count`` uncompressed clusters from ``guest``, at host clusters from ``host``."""
        cb, cs, l2_bits = self._cb, self._cs, self._l2_bits
        mask = (1 << l2_bits) - 1
        while count:
            step = min(count, (1 << l2_bits) - (guest & mask))
            first = (host << cb) | OFLAG_COPIED
            self._table(guest >> l2_bits)[guest & mask : (guest & mask) + step] = array(
                "Q", range(first, first + (step << cb), cs)
            )
            guest, host, count = guest + step, host + step, count - step

    # -- compression -----------------------------------------------------------------------------
    #
    # The data is copied, whole clusters, into batch buffers (zeros where nothing was written; the
    # data given to write() is valid only during the call); a thread pool compresses each batch;
    # results are placed in order. Clusters stored uncompressed are written straight from the
    # batch buffer (runs of them in one write); compressed clusters are packed byte after byte in
    # the host cluster being filled, kept in a small buffer until it is full or given up. Buffers
    # are recycled: no fresh memory (page faults) per chunk of data.

    def _start_compression(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # only compression uses pools: loaded then

        self._pool = CompressionPool("qcow2-compress")
        self._max_inflight = self._pool.max_inflight
        # writes go through one more thread, so that the copies into the page cache overlap the
        # rest; a batch buffer is reused once its writes are done
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcow2-write")
        self._writes: list[_Write] = []  # of the batch being placed
        zstd = self.settings.compression_type == COMPRESSION_ZSTD
        # qemu: compressed data must fit in cluster_size - 1 bytes
        self._compressor = ClusterCompressor(self._cs, self._cs - 1, zlib_level=ZLIB_LEVEL, zlib_wbits=ZLIB_WBITS,
                                             zstd_level=ZSTD_LEVEL if zstd else None)
        self._slots = max(1, self.BATCH_BYTES >> self._cb)  # clusters per batch
        self._free_buffers: list[bytearray] = []
        self._buffer = bytearray(self._slots << self._cb)
        self._used = 0  # slots of the buffer taken
        self._batch_g: list[int] = []  # guest clusters of the completed slots, in slot order
        self._asm_g = -1  # the guest cluster being assembled in the last slot taken
        self._hrc = array("I")  # refcount of each host data cluster
        self._data_cluster = self._next_free
        self._rpos = -1  # host byte where the next compressed cluster goes (-1: no cluster being filled)
        self._rlast = -1  # the host cluster being filled; its bytes are in _rbuf (two clusters: it may spill)
        self._rbuf = bytearray(2 * self._cs)
        order = self.settings.refcount_order
        self._max_refcount = min((1 << (1 << order)) - 1, 0xFFFFFFFF)

    def _assemble(self, offset: int, view: memoryview) -> None:
        """Copy the data into whole clusters of the batch buffer."""
        cb, cs = self._cb, self._cs
        position, end = offset, offset + len(view)
        while position < end:
            cluster = position >> cb
            cluster_start = cluster << cb
            piece_end = min(end, cluster_start + cs)
            if cluster != self._asm_g:
                self._complete_assembled()
                if self._used == self._slots:
                    self._submit()
                slot = self._used << cb
                if position == cluster_start and piece_end == cluster_start + cs:
                    count = min((end - position) >> cb, self._slots - self._used)
                    source = position - offset
                    self._buffer[slot : slot + (count << cb)] = view[source : source + (count << cb)]
                    self._batch_g.extend(range(cluster, cluster + count))
                    self._used += count
                    position += count << cb
                    continue
                self._buffer[slot : slot + cs] = self._empty_table
                self._used += 1
                self._asm_g = cluster
            slot = (self._used - 1) << cb
            self._buffer[slot + position - cluster_start : slot + piece_end - cluster_start] = view[
                position - offset : piece_end - offset
            ]
            position = piece_end

    def _complete_assembled(self) -> None:
        if self._asm_g >= 0:
            self._batch_g.append(self._asm_g)
            self._asm_g = -1

    def _submit(self) -> None:
        """Hand the completed slots to the pool, take a free buffer, place what is done."""
        assert self._asm_g < 0 and self._pool is not None
        if self._batch_g:
            cb = self._cb
            view = memoryview(self._buffer)
            clusters = [view[slot << cb : (slot + 1) << cb] for slot in range(len(self._batch_g))]
            self._pool.submit(self._compressor.batch, clusters, (self._batch_g, self._buffer))
            self._reclaim(2)
            self._buffer = self._free_buffers.pop() if self._free_buffers else bytearray(self._slots << cb)
            self._batch_g = []
            self._used = 0
        self._drain(self._max_inflight)

    def _drain(self, keep: int) -> None:
        """Place the results of the oldest batches, in order, until ``keep`` remain in flight."""
        cb = self._cb
        assert self._pool is not None
        for (clusters, buffer), results in self._pool.completed(keep):
            view = memoryview(buffer)
            writes: list[_Write] = []
            self._writes = writes
            run_slot = run_host = run_count = 0  # uncompressed clusters contiguous in buffer and file
            for slot, (cluster, packed) in enumerate(zip(clusters, results, strict=True)):
                if packed is not None:
                    self._place_compressed(cluster, packed)
                    continue
                self._check_room(cluster, cluster, 1)
                host = self._next_free
                self._next_free += 1
                self._hrc.append(1)
                self._map_range(cluster, 1, host)
                if run_count and run_slot + run_count == slot and run_host + run_count == host:
                    run_count += 1
                    continue
                if run_count:
                    writes.append((view[run_slot << cb : (run_slot + run_count) << cb], run_host << cb))
                run_slot, run_host, run_count = slot, host, 1
            if run_count:
                writes.append((view[run_slot << cb : (run_slot + run_count) << cb], run_host << cb))
            assert self._io is not None
            self._pending_io.append((self._io.submit(self._write_all, writes), buffer))
            self._reclaim(4)

    def _write_all(self, writes: list[_Write]) -> None:
        for data, offset in writes:
            self.target.pwrite(data, offset)

    def _reclaim(self, keep: int) -> None:
        """Wait for the oldest writes until ``keep`` remain; their buffers are free again."""
        while len(self._pending_io) > keep:
            future, buffer = self._pending_io.popleft()
            future.result()
            if buffer is not None:
                self._free_buffers.append(buffer)

    def _place_compressed(self, cluster: int, packed: bytes) -> None:
        """Pack a compressed cluster after the previous one, byte after byte, like qemu: it may
        spill into the next host cluster when that one is still free, and a host cluster takes
        no more references than the refcount width allows."""
        cb, cs = self._cb, self._cs
        size = len(packed)
        position = self._rpos
        spills = False
        if position >= 0:
            spills = (position + size - 1) >> cb > self._rlast
            if self._hrc[self._rlast - self._data_cluster] >= self._max_refcount or (
                spills and self._next_free != self._rlast + 1
            ):
                self._close_region()
                position = -1
        self._check_room(cluster, cluster, 1 if position < 0 or spills else 0)
        if position < 0:
            position = self._next_free << cb
            self._rlast = self._next_free
            self._next_free += 1
            self._hrc.append(0)
            self._rbuf[:cs] = self._rbuf[cs:] = self._empty_table
            spills = False
        elif spills:
            self._next_free += 1
            self._hrc.append(0)
        start = position - (self._rlast << cb)
        self._rbuf[start : start + size] = packed
        hrc, base = self._hrc, self._data_cluster
        for host in range(position >> cb, ((position + size - 1) >> cb) + 1):
            hrc[host - base] += 1
        l2_bits = self._l2_bits
        self._table(cluster >> l2_bits)[cluster & ((1 << l2_bits) - 1)] = encode_compressed_entry(position, size, cb)
        if spills:  # the filled cluster is complete; go on in the next one
            self._writes.append((self._rbuf[:cs], self._rlast << cb))
            self._rbuf[:cs] = self._rbuf[cs:]
            self._rbuf[cs:] = self._empty_table
            self._rlast += 1
        self._rpos = position + size
        if self._rpos & (cs - 1) == 0:
            self._close_region()

    def _close_region(self) -> None:
        """Write the cluster being filled with compressed data (its tail stays zero, unused)."""
        if self._rpos >= 0:
            self._writes.append((self._rbuf[: self._cs], self._rlast << self._cb))
            self._rpos = -1

    def _finish_compression(self) -> None:
        self._complete_assembled()
        self._submit()
        self._drain(0)
        self._writes = []
        self._close_region()
        assert self._io is not None
        self._pending_io.append((self._io.submit(self._write_all, self._writes), None))
        self._reclaim(0)

    def close(self) -> None:
        """Cancel the batches not started; wait for the compression and the writes in hand."""
        if self._pool is not None:
            self._pool.close()
        for future, _ in self._pending_io:
            if not future.cancel():  # running or done
                future.exception()
        self._pending_io.clear()
        if self._io is not None:
            self._io.shutdown(wait=True)  # idle by now: quick
        self._pool = self._io = None

    # -- metadata --------------------------------------------------------------------------------

    def _header_cluster(self) -> bytes:
        layout = self._layout
        assert layout is not None
        settings = self.settings
        zstd = settings.compression_type == COMPRESSION_ZSTD
        header = Qcow2Header(
            version=settings.version,
            cluster_bits=self._cb,
            virtual_size=self.disk_size,
            l1_size=layout.l1_size,
            l1_table_offset=layout.l1_offset if layout.l1_size else 0,
            refcount_table_offset=layout.refcount_table_offset,
            refcount_table_clusters=layout.refcount_table_clusters,
            incompatible_features=INCOMPAT_COMPRESSION if zstd else 0,
            compatible_features=COMPAT_LAZY_REFCOUNTS if settings.lazy_refcounts else 0,
            refcount_order=settings.refcount_order,
            compression_type=settings.compression_type,
        )
        data = header.pack()
        if settings.version >= 3:
            items = []
            if self._cs >= FEATURE_TABLE_MIN_CLUSTER:
                items.append(HeaderExtension(EXT_FEATURE_NAMES, pack_feature_name_table(FEATURE_NAME_TABLE)))
            data += pack_header_extensions(items)
        return data + bytes(self._cs - len(data))

    def _refcount_table(self, blocks: int) -> bytes:
        layout = self._layout
        assert layout is not None
        table = array("Q", bytes(layout.refcount_table_clusters << self._cb))
        first = layout.refcount_blocks_offset
        table[:blocks] = array("Q", range(first, first + (blocks << self._cb), self._cs))
        return pack_u64_table(table)

    def _refcount_blocks(self, blocks: int, segments: list[_Segment]) -> Iterator[bytes]:
        """The first ``blocks`` refcount blocks, from (first cluster, count, value) segments where
        value is a number for all of them, or a sequence with one count per cluster."""
        bits = 1 << self.settings.refcount_order
        per_block = (self._cs * 8) >> self.settings.refcount_order
        typecode = _REFCOUNT_TYPECODES[max(bits, 8)]
        empty = bytes(per_block * array(typecode).itemsize)
        for block in range(blocks):
            low, high = block * per_block, (block + 1) * per_block
            counts = array(typecode, empty)
            for start, count, value in segments:
                first, stop = max(start, low), min(start + count, high)
                if first >= stop:
                    continue
                if isinstance(value, int):
                    counts[first - low : stop - low] = array(typecode, [value]) * (stop - first)
                else:
                    counts[first - low : stop - low] = array(typecode, value[first - start : stop - start])
            yield pack_refcounts(counts, bits)

    def _l1_table(self, entries: array[int]) -> bytes:
        layout = self._layout
        assert layout is not None
        raw = pack_u64_table(entries)
        return raw + bytes((layout.l1_clusters << self._cb) - len(raw))

    def _planned_tables(self) -> Iterator[tuple[int, int]]:
        """(slot, L1 index) of each reserved L2 table, in order."""
        planned = self._planned_l1
        index = planned.find(1)
        slot = 0
        while index >= 0:
            yield slot, index
            slot += 1
            index = planned.find(1, index + 1)

    def _streaming_l2_tables(self) -> Iterator[array[int]]:
        """The L2 table of each planned L1 range, in order, from the planned runs."""
        cb, cs, l2_bits = self._cb, self._cs, self._l2_bits
        rg, rn, rh = self._rg, self._rn, self._rh
        runs, run = len(rg), 0
        for _slot, l1_index in self._planned_tables():
            low, high = l1_index << l2_bits, (l1_index + 1) << l2_bits
            table = array("Q", self._empty_table)
            while run < runs and rg[run] < high:
                start, stop = rg[run], rg[run] + rn[run]
                first, last = max(start, low), min(stop, high)
                if first < last:
                    host = ((rh[run] + first - start) << cb) | OFLAG_COPIED
                    table[first - low : last - low] = array("Q", range(host, host + ((last - first) << cb), cs))
                if stop > high:
                    break
                run += 1
            yield table

    def _write_streaming_metadata(self) -> None:
        layout = self._layout
        assert layout is not None
        target = self.target
        target.write(self._header_cluster())
        target.write(self._refcount_table(layout.refcount_blocks))
        for block in self._refcount_blocks(layout.refcount_blocks, [(0, layout.total_clusters, 1)]):
            target.write(block)
        l1 = array("Q", bytes(layout.l1_size * 8))
        for slot, l1_index in self._planned_tables():
            l1[l1_index] = (layout.l2_offset + (slot << self._cb)) | OFLAG_COPIED
        target.write(self._l1_table(l1))
        for table in self._streaming_l2_tables():
            target.write(pack_u64_table(table))
        assert target.position == layout.data_offset

    def _write_file_metadata(self) -> None:
        layout = self._layout
        assert layout is not None
        target, cb = self.target, self._cb
        l1 = array("Q", bytes(layout.l1_size * 8))
        used = array("B", bytes(layout.l2_tables))
        for slot, l1_index in self._planned_tables():
            table = self._tables.pop(l1_index, None)
            if table is None:
                continue  # reserved, unused: a hole with refcount 0
            offset = layout.l2_offset + (slot << cb)
            l1[l1_index] = offset | OFLAG_COPIED
            used[slot] = 1
            target.pwrite(pack_u64_table(table), offset)
        assert not self._tables, "an L2 table outside the planned L1 ranges"
        end = self._next_free
        per_block = (self._cs * 8) >> self.settings.refcount_order
        blocks = -(-end // per_block)
        assert blocks <= layout.refcount_blocks
        data_cluster = layout.data_offset >> cb
        segments: list[_Segment] = [
            (0, 1 + layout.refcount_table_clusters + blocks, 1),
            (layout.l1_offset >> cb, layout.l1_clusters, 1),
            (layout.l2_offset >> cb, layout.l2_tables, used),
            (data_cluster, end - data_cluster, self._hrc if self.compress else 1),
        ]
        for number, block in enumerate(self._refcount_blocks(blocks, segments)):
            target.pwrite(block, layout.refcount_blocks_offset + (number << cb))
        target.pwrite(self._refcount_table(blocks), layout.refcount_table_offset)
        if layout.l1_size:
            target.pwrite(self._l1_table(l1), layout.l1_offset)
        target.pwrite(self._header_cluster(), 0)

    # -- the end ---------------------------------------------------------------------------------

    def finish(self) -> None:
        self._ensure_plan()
        layout = self._layout
        assert layout is not None
        target = self.target
        if target.streaming:
            target.skip((layout.total_clusters << self._cb) - target.position)
            target.finish()
            return
        if self.compress:
            self._finish_compression()
        self._write_file_metadata()
        target.finish(self._next_free << self._cb)
