"""``diskimg check`` for qcow2, like qemu's ``qcow2_check_refcounts`` (qcow2-refcount.c).

First the header, judged by the reader's own rule (``structures.check_header``): a header no
reader takes is one corruption and nothing more is counted (qemu opens no such image); a feature
diskimg does not take (an external data file, an unknown compression type...) raises
UnsupportedFormat, as in every other command. Then every reference of every host cluster is
counted - header, L1 tables (active and snapshots), L2 tables, data and compressed clusters, the
snapshot table, the refcount table and blocks, the encryption header, persistent bitmaps - and
the counts are compared with the refcounts stored in the image. A stored refcount lower than the
references is a *corruption* (a cluster may be freed while in use), a higher one a *leak* (wasted
space). Unaligned tables, references past the end of the file, ``OFLAG_COPIED`` flags that
disagree with the refcounts and invalid subcluster bitmaps are corruptions too. The counts
(``corruptions``, ``leaks``, ``image_end_offset``, ``allocated_clusters``...) are meant to agree
with ``qemu-img check --output=json``. Only metadata is read, never guest data.
"""

from __future__ import annotations

from array import array

from ...errors import CorruptImage, UnsupportedFormat
from ...host.files import HostFile
from ..check_result import MAX_PROBLEMS, CheckResult
from . import structures as q
from .reader import read_first_cluster

#: host clusters a qcow2 check will count (2 bytes each in memory)
MAX_CHECK_CLUSTERS = 1 << 28
#: distinct L2 tables a qcow2 check keeps track of (262144 tables map 128 TiB with 64 KiB clusters)
MAX_L2_TABLES = 1 << 18


def check_qcow2(host: HostFile, result: CheckResult) -> None:
    """Count every reference of every host cluster and compare with the stored refcounts."""
    _Qcow2Check(host, result).run()


class _Qcow2Check:
    def __init__(self, host: HostFile, result: CheckResult) -> None:
        self.host = host
        self.result = result
        self.file_size = host.size
        #: the active L1 table as check_l1 walked it (None when it could not be walked)
        self.active_l1: array[int] | None = None

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; past the end of the file reads zeros (as qemu's check does)."""
        data = self.host.read_at(offset, length) if offset < self.file_size else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    def run(self) -> None:
        result = self.result
        header, self.extensions, first_cluster, error = read_first_cluster(self.host)
        if isinstance(error, UnsupportedFormat):
            raise error
        if error is not None and (header.cluster_bits < q.MIN_CLUSTER_BITS
                                  or header.header_length > header.cluster_size):
            result.add("corruption", error.message, error.offset, "header")
            return
        self.header = header
        self.bits = header.cluster_bits
        self.cs = header.cluster_size
        cs = self.cs
        if header.header_length > len(first_cluster):
            result.add("truncated", "the file ends inside its header", 0, "header")
            return
        if error is not None:
            result.add("corruption", error.message, error.offset, "header extension")
        incompat = header.incompatible_features
        if incompat & q.INCOMPAT_DIRTY:
            result.flags.append("dirty")
        if incompat & q.INCOMPAT_CORRUPT:
            result.flags.append("corrupt")
        try:
            q.check_header(header, self.extensions, self.file_size)
        except CorruptImage as exc:  # as qemu, which opens no such image: nothing else is counted
            result.add("corruption", exc.message, exc.offset, exc.structure)
            return
        self.extended = header.extended_l2
        self.nb_clusters = -(-self.file_size // cs)
        if self.nb_clusters > MAX_CHECK_CLUSTERS:
            result.add("error", f"the file has {self.nb_clusters} clusters, more than this check counts", None, "file")
            return
        # computed references, one counter per host cluster (grown for a last, semi-allocated cluster)
        self.refs = array("H", bytes(2 * self.nb_clusters))
        result.total_clusters = -(-header.virtual_size // cs)
        result.allocated_clusters = 0
        result.fragmented_clusters = 0
        result.compressed_clusters = 0
        self.next_contiguous = 0

        # table entries this check reads: a sound image's tables never overlap, so together they
        # hold at most file_size / 8 entries (L2 tables shared by snapshots are walked once)
        self.entries_left = self.file_size // 8
        #: L2 table offset -> [references, references from the active L1, first active L1 index]
        self.l2_tables: dict[int, list[int]] = {}
        self.walked_l2: list[int] = []
        self.inc(0, cs, "header")
        self.check_l1(header.l1_table_offset, header.l1_size, active=True, what="L1 table")
        snapshots = self.snapshots()
        for snapshot in snapshots:
            self.check_l1(snapshot.l1_table_offset, snapshot.l1_size, active=False,
                          what=f"snapshot {snapshot.id} L1 table")
        self.walk_l2_tables()
        self.inc(header.refcount_table_offset, header.refcount_table_clusters * cs, "refcount table")
        if header.crypt_method == q.CRYPT_LUKS and self.extensions.fde is not None:
            offset, length = self.extensions.fde
            self.inc(offset, length, "encryption header")
        if self.extensions.bitmaps is not None:
            self.check_bitmaps(self.extensions.bitmaps)
        ondisk = self.refcounts()
        self.compare(ondisk)
        self.check_copied_flags(ondisk)

    # references --------------------------------------------------------------------------------

    def inc(self, offset: int, size: int, what: str, times: int = 1) -> None:
        """Count ``times`` references to the clusters of [offset, offset + size) (qcow2_inc_refcounts_imrt)."""
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            # as qemu: a region ending a cluster or more past the end of the file is not counted
            self.result.add("truncated", f"{what} at offset {offset} ({size} bytes) reaches past the end of the "
                            f"file ({self.file_size} bytes)", offset, what)
            self.result.corruptions += times
            return
        refs = self.refs
        first = offset >> self.bits
        last = (offset + size - 1) >> self.bits
        if last >= len(refs):
            refs.extend(array("H", bytes(2 * (last + 1 - len(refs)))))
        for cluster in range(first, last + 1):
            count = refs[cluster] + times
            if count > 0xFFFF:  # as qemu: each reference past the counter's maximum is a corruption
                self.result.add("corruption", f"cluster {cluster} is referenced more than 65535 times",
                                cluster << self.bits, what, times=count - 0xFFFF)
                count = 0xFFFF
            refs[cluster] = count

    def table(self, offset: int, length: int, what: str) -> array[int] | None:
        """The entries of a table of ``length`` bytes, up to the end of the file (past it they read as
        zeros, so nothing is walked there); None, and an error once, when the check's budget of
        entries is spent: tables that overlap are corrupt, and walking them could take hours."""
        inside = max(0, min(length, self.file_size - offset)) & ~7
        if inside > 8 * self.entries_left:
            if self.entries_left >= 0:
                self.result.add("error", f"{what}: the tables overlap, more table entries than the file holds; "
                                "not walked further", offset, what)
                self.entries_left = -1
            return None
        self.entries_left -= inside // 8
        return q.parse_u64_table(self.read_at(offset, inside))

    def check_l1(self, l1_offset: int, l1_size: int, *, active: bool, what: str) -> None:
        """Count the L1 table and the references to its L2 tables; the L2 tables are walked later,
        each once however many entries point at it (walk_l2_tables)."""
        cs = self.cs
        if l1_size == 0:
            return
        if l1_size > q.MAX_L1_ENTRIES:
            self.result.add("corruption", f"{what} of {l1_size} entries is larger than 32 MiB", None, what)
            return
        if l1_offset % cs:
            self.result.add("corruption", f"{what} offset {l1_offset:#x} is not cluster aligned", l1_offset, what)
            return
        self.inc(l1_offset, l1_size * 8, what)
        l1 = self.table(l1_offset, l1_size * 8, what)
        if l1 is None:
            return
        if active:
            self.active_l1 = l1
        tables = self.l2_tables
        for index, entry in enumerate(l1):
            l2_offset = entry & q.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset % cs:
                # as qemu: reported, then still counted and read where the entry points
                self.result.add(
                    "corruption",
                    f"L2 table offset {l2_offset:#x} (L1 index {index}) is not cluster aligned; L1 entry corrupted",
                    l1_offset + 8 * index, what,
                )
            uses = tables.get(l2_offset)
            if uses is None:
                if len(tables) >= MAX_L2_TABLES:
                    self.result.add("error", f"{what}: more than {MAX_L2_TABLES} L2 tables; not walked further",
                                    l1_offset + 8 * index, what)
                    return
                tables[l2_offset] = uses = [0, 0, index]
            uses[0] += 1
            if active:
                uses[1] += 1

    def walk_l2_tables(self) -> None:
        """Each L2 table once, its references counted as often as L1 entries point at it (as qemu,
        which walks it again for each entry)."""
        cs = self.cs
        for l2_offset, (uses, active_uses, l1_index) in self.l2_tables.items():
            self.inc(l2_offset, cs, "L2 table", uses)
            table = self.table(l2_offset, cs, "L2 table")
            if table is None:
                return
            self.walked_l2.append(l2_offset)
            self.check_l2(table, l2_offset, uses, active_uses, l1_index)

    def check_l2(self, table: array[int], l2_offset: int, uses: int, active_uses: int, l1_index: int) -> None:
        """One L2 table, decoded by :func:`structures.decode_l2_table`: its clusters referenced ``uses``
        times, ``active_uses`` of them from the active L1 (whose first entry pointing here is ``l1_index``)."""
        cs = self.cs
        result = self.result
        width = 2 if self.extended else 1
        if len(table) % width:  # cut by the end of the file: the bitmap past it reads as zeros
            table.append(0)
        entry_size = 8 * width
        self.next_contiguous = 0  # as qemu, fragmentation is counted within one L2 table
        for state, index, count, host, extra in q.decode_l2_table(table, 0, len(table) // width, self.bits,
                                                                  self.extended):
            where = l2_offset + entry_size * index
            if state == q.L2_COMPRESSED:
                entry = table[index * width]
                if entry & q.OFLAG_COPIED:
                    result.add("corruption", f"compressed cluster entry {entry:#x} has the COPIED flag set", where,
                               "L2 table", uses)
                if self.extended and table[index * width + 1]:  # as qemu: reported, not counted
                    result.add("corruption", "compressed cluster entry has a non-zero subcluster bitmap", where,
                               "L2 table", uses)
                    continue
                self.inc(host, extra, "compressed cluster", uses)
                if active_uses:
                    result.allocated_clusters = (result.allocated_clusters or 0) + active_uses
                    result.compressed_clusters = (result.compressed_clusters or 0) + active_uses
                    result.fragmented_clusters = (result.fragmented_clusters or 0) + active_uses
                    if result.first_compressed_offset is None:
                        result.first_compressed_offset = (l1_index * self.header.l2_entries + index) * cs
                continue
            if state == q.L2_INVALID:  # as qemu: reported, and a host cluster still counted
                result.add("corruption", f"invalid subcluster bitmap {extra:#018x}", where, "L2 table", uses)
            if not host:
                continue  # unallocated, or zero without a cluster
            if active_uses:
                result.allocated_clusters = (result.allocated_clusters or 0) + count * active_uses
                if self.next_contiguous and host != self.next_contiguous:
                    result.fragmented_clusters = (result.fragmented_clusters or 0) + active_uses
                self.next_contiguous = host + count * cs
            if host % cs:  # as qemu: reported, then each entry still counted where it points
                for number in range(count):
                    result.add("corruption", f"cluster offset {host + number * cs:#x} is not cluster aligned; L2 "
                               "entry corrupted", where + entry_size * number, "L2 table", uses)
                    self.inc(host + number * cs, cs, "data cluster", uses)
                continue
            self.inc_clusters(host, count, "data cluster", uses)

    def inc_clusters(self, offset: int, count: int, what: str, times: int) -> None:
        """``inc`` for ``count`` whole clusters from ``offset``, each one past the end of the file
        reported on its own."""
        cs = self.cs
        inside = min(count, max(0, -(-(self.file_size - offset) // cs)))  # clusters that start inside the file
        if inside:
            self.inc(offset, inside * cs, what, times)
        for number in range(inside, count):
            self.inc(offset + number * cs, cs, what, times)

    def snapshots(self) -> list[q.Qcow2Snapshot]:
        header = self.header
        if not header.nb_snapshots:
            return []
        offset = header.snapshots_offset
        data = self.read_at(offset, min(q.MAX_SNAPSHOT_TABLE_BYTES, max(0, self.file_size - offset)))
        snapshots: list[q.Qcow2Snapshot] = []
        position = 0
        for index in range(header.nb_snapshots):
            try:
                entry = q.parse_snapshot_table(data[position:], 1, offset + position)[0]
            except q.SnapshotTableTruncated:
                # as qemu: the entries before stay, the table counts up to this entry's fixed part
                self.result.add("corruption", f"snapshot table entry {index} is incomplete", offset + position,
                                "snapshot table")
                position += 40
                break
            except CorruptImage as exc:
                self.result.add("corruption", exc.message, exc.offset, "snapshot table")
                break
            snapshots.append(entry)
            position += len(entry.pack())
        self.inc(offset, position, "snapshot table")
        return snapshots

    def check_bitmaps(self, ext: q.BitmapsExtension) -> None:
        cs = self.cs
        if ext.directory_offset % cs or ext.directory_size > 64 << 20:
            self.result.add("corruption", "the bitmap directory is unaligned or too large", ext.directory_offset,
                            "bitmap directory")
            return
        self.inc(ext.directory_offset, ext.directory_size, "bitmap directory")
        data = self.read_at(ext.directory_offset, ext.directory_size)
        try:
            tables = q.parse_bitmap_directory(data, ext.nb_bitmaps)
        except CorruptImage as exc:
            self.result.add("corruption", exc.message, ext.directory_offset, "bitmap directory")
            return
        for table_offset, table_size in tables:
            if table_offset % cs or table_size > q.MAX_L1_ENTRIES:
                self.result.add("corruption", f"bitmap table at {table_offset:#x} is unaligned or too large",
                                table_offset, "bitmap table")
                continue
            self.inc(table_offset, table_size * 8, "bitmap table")
            entries = self.table(table_offset, table_size * 8, "bitmap table")
            if entries is None:
                return
            for entry in entries:
                offset = entry & q.BME_TABLE_ENTRY_OFFSET_MASK
                if offset:
                    if offset % cs:
                        self.result.add("corruption", f"bitmap data cluster {offset:#x} is unaligned", table_offset,
                                        "bitmap table")
                        continue
                    self.inc(offset, cs, "bitmap data")

    # stored refcounts -------------------------------------------------------------------------------

    def refcounts(self) -> array[int]:
        """The stored refcount of every counted cluster (qemu's check_refblocks + get_refcount)."""
        header = self.header
        cs = self.cs
        result = self.result
        order = header.refcount_order
        table_bytes = header.refcount_table_clusters * cs
        raw = self.read_at(header.refcount_table_offset, table_bytes)
        table = q.parse_refcount_table(raw)
        per_block = cs * 8 >> order
        count = len(self.refs)
        ondisk = array("Q" if order > 4 else "H", bytes((8 if order > 4 else 2) * count))
        self.unknown_blocks: set[int] = set()
        for index, entry in enumerate(table):
            offset = entry & q.REFT_OFFSET_MASK
            if not offset:
                continue
            if offset % cs:
                result.add("corruption", f"refcount block {index} is not cluster aligned; refcount table entry "
                           "corrupted", header.refcount_table_offset + 8 * index, "refcount table")
                self.unknown_blocks.add(index)
                continue
            if offset >> self.bits >= self.nb_clusters:
                result.add("corruption", f"refcount block {index} is outside the image", offset, "refcount table")
                self.unknown_blocks.add(index)
                continue
            cluster = offset >> self.bits
            self.inc(offset, cs, "refcount block")
            if self.refs[cluster] != 1:
                result.add("corruption", f"refcount block {index} is referenced {self.refs[cluster]} times", offset,
                           "refcount block")
            first = index * per_block
            if first >= count:
                continue
            values = q.decode_refcount_block(self.read_at(offset, cs), order)
            take = min(per_block, count - first, len(values))
            ondisk[first : first + take] = values[:take]
        if len(ondisk) < len(self.refs):  # refcount blocks referenced themselves past the old end
            ondisk.extend(array(ondisk.typecode, bytes(ondisk.itemsize * (len(self.refs) - len(ondisk)))))
        self.per_block = per_block
        return ondisk

    def compare(self, ondisk: array[int]) -> None:
        result = self.result
        refs = self.refs
        per_block = self.per_block
        cs = self.cs
        highest = -1
        computed = refs if ondisk.typecode == "H" else array("Q", refs)
        count = len(refs)
        for start in range(0, count, per_block):
            end = min(count, start + per_block)
            block = start // per_block
            stored = ondisk[start:end]
            wanted = computed[start:end]
            if stored == wanted:
                for i in range(end - 1, start - 1, -1):
                    if stored[i - start]:
                        highest = max(highest, i)
                        break
                continue
            if block in self.unknown_blocks:
                result.add("error", f"cannot get the refcounts of clusters {start}-{end - 1} (bad refcount block)")
                continue
            for i in range(start, end):
                have, want = stored[i - start], wanted[i - start]
                if have or want:
                    highest = max(highest, i)
                if have == want:
                    continue
                if have < want:
                    result.add("corruption", f"cluster {i} has refcount {have} but {want} references",
                               i * cs, "refcount block")
                else:
                    result.add("leak", f"leaked cluster {i}: refcount {have}, {want} references", i * cs,
                               "refcount block")
                    if len(result.leaked_clusters) < MAX_PROBLEMS:
                        result.leaked_clusters.append(i)
        result.image_end_offset = (highest + 1) * cs

    def check_copied_flags(self, ondisk: array[int]) -> None:
        """OFLAG_COPIED must be set exactly where a cluster's refcount is 1 (active L1/L2 only)."""
        header = self.header
        cs = self.cs
        if self.active_l1 is None:  # check_l1 found the table too large or misplaced, and said so
            return
        width = 2 if self.extended else 1

        def stored(offset: int) -> int | None:
            cluster = offset >> self.bits
            if cluster >= len(ondisk) or cluster // self.per_block in self.unknown_blocks:
                return None
            return ondisk[cluster]

        for index, entry in enumerate(self.active_l1):
            l2_offset = entry & q.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = stored(l2_offset)
            if refcount is not None and (refcount == 1) != bool(entry & q.OFLAG_COPIED):
                self.result.add("corruption", f"OFLAG_COPIED of L2 table {l2_offset:#x} (L1 index {index}) "
                                f"disagrees with its refcount {refcount}", header.l1_table_offset + 8 * index,
                                "L1 table")
        # each L2 table of the active L1 once, its problems counted once per L1 entry pointing at it;
        # only the tables the counting walk read (it stops where the budget does)
        for l2_offset in self.walked_l2:
            active_uses = self.l2_tables[l2_offset][1]
            if not active_uses:
                continue
            table = q.parse_u64_table(self.read_at(l2_offset, cs))
            for state, first, count, host, _ in q.decode_l2_table(table, 0, len(table) // width, self.bits,
                                                                  self.extended):
                if not host or state == q.L2_COMPRESSED:
                    continue
                for number in range(first, first + count):
                    refcount = stored(host)
                    l2_entry = table[number * width]
                    if refcount is not None and (refcount == 1) != bool(l2_entry & q.OFLAG_COPIED):
                        self.result.add("corruption", f"OFLAG_COPIED of data cluster {host:#x} disagrees with its "
                                        f"refcount {refcount}", l2_offset + 8 * width * number, "L2 table", active_uses)
                    host += cs
