"""Replaying a VHDX log in memory, as Hyper-V does when it opens a file whose log is not empty.

The log is a circular buffer of entries (``loge``), each a header, descriptors (``desc``: one
4 KiB sector to write, ``zero``: a range to zero) and data sectors, with a CRC-32C over the whole
entry. The *active sequence* ends at the valid entry with the highest sequence number; its ``tail``
field names where the sequence starts, and from there every entry must follow with the next
sequence number. Replaying writes the descriptors of that sequence in order.

A torn newest entry (its checksum fails) simply does not count, so the previous entry heads the
sequence, as MS-VHDX's search finds it. Where the newest valid entry's sequence is broken (an
entry between its tail and itself missing or out of order), MS-VHDX would fall back to an older
complete sequence; diskimg refuses the file instead, as it refuses any metadata it cannot trust
(qemu refuses every file with a log when it opens it read-only). Entries of the log GUID that
are all invalid or absent mean nothing to replay, as qemu reads them.

diskimg never writes the source: :class:`ReplayedFile` shows the file as it would be after the
replay (later writes win, the file extended to the sequence's ``last_file_offset``). A log that
cannot be replayed (the newest entry's sequence broken, writes outside the file, a sequence that
does not close) raises :class:`VhdxError`; the reader turns that into one error line.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import uuid
from typing import Any

from . import structures as s


def active_sequence(log: bytes, log_guid: uuid.UUID) -> list[tuple[s.LogEntryHeader, bytes]]:
    """The entries of the active sequence, oldest first; empty when the log holds no valid entry
    of this log GUID (then there is nothing to replay)."""
    length = len(log)
    valid: dict[int, tuple[s.LogEntryHeader, bytes]] = {}  # offset -> entry
    for offset in range(0, length, s.LOG_SECTOR):
        found = _valid_entry(log, offset, log_guid)
        if found is not None:
            valid[offset] = found
    if not valid:
        return []
    head_offset = max(valid, key=lambda offset: valid[offset][0].sequence_number)
    head = valid[head_offset][0]
    sequence = []
    offset = head.tail
    expected = None
    for _ in range(len(valid)):
        if offset not in valid:
            raise s.VhdxError(f"the active log sequence breaks at log offset {offset} (no valid entry there)")
        header, entry = valid[offset]
        if expected is not None and header.sequence_number != expected:
            raise s.VhdxError(f"log entry at {offset} has sequence number {header.sequence_number}, not {expected}")
        sequence.append((header, entry))
        if offset == head_offset:
            return sequence
        expected = header.sequence_number + 1
        offset = (offset + header.entry_length) % length
    raise s.VhdxError("the active log sequence does not reach its newest entry (a loop)")


def _valid_entry(log: bytes, offset: int, log_guid: uuid.UUID) -> tuple[s.LogEntryHeader, bytes] | None:
    header = s.parse_log_entry_header(log[offset : offset + s.LOG_ENTRY_HEADER_SIZE])
    if header is None or header.log_guid != log_guid:
        return None
    size = header.entry_length
    if size < s.LOG_SECTOR or size % s.LOG_SECTOR or size > len(log) or header.tail % s.LOG_SECTOR:
        return None
    if header.tail >= len(log) or header.descriptor_sectors * s.LOG_SECTOR > size:
        return None
    end = offset + size
    entry = log[offset:end] if end <= len(log) else log[offset:] + log[: end - len(log)]  # wraps around
    if not s.checksum_ok(entry):
        return None
    return header, entry


def replay(log: bytes, log_guid: uuid.UUID, file_size: int) -> tuple[list[s.LogWrite], int, int]:
    """(the writes of the active sequence in order, the file size after the replay, the number of
    entries replayed)."""
    sequence = active_sequence(log, log_guid)
    if not sequence:
        return [], file_size, 0
    writes: list[s.LogWrite] = []
    newest = sequence[-1][0]
    if newest.flushed_file_offset > file_size:
        raise s.VhdxError(
            f"the log says the file was flushed up to {newest.flushed_file_offset} bytes, but it has {file_size}"
        )
    final_size = max(file_size, newest.last_file_offset)
    for header, entry in sequence:
        for write in s.parse_log_entry(entry, header):
            if write.file_offset < s.HEADER_AREA or write.file_offset + write.length > final_size:
                raise s.VhdxError(
                    f"log entry {header.sequence_number} writes {write.length} bytes at {write.file_offset}, "
                    f"outside the file's {final_size} bytes past its header area"
                )
            writes.append(write)
    return writes, final_size, len(sequence)


class ReplayedFile:
    """A read-only view of a host file with log writes applied over it (later writes win).

    Stands in for the HostFile the reader reads: ``read_at``/``readinto_at`` at file offsets; bytes
    between the real end and the replayed size read as zeros."""

    def __init__(self, host: Any, writes: list[s.LogWrite], size: int) -> None:
        self._host = host
        self.size = size
        self._starts, self._segments = _flatten(writes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)  # name, fd, close, allocated_bytes ...

    def data_regions(self, start: int, end: int) -> None:
        return None  # holes of the real file say nothing about the replayed one

    def read_at(self, offset: int, length: int) -> bytes:
        buffer = bytearray(max(0, min(length, self.size - offset)))
        self.readinto_at(offset, memoryview(buffer))
        return bytes(buffer)

    def readinto_at(self, offset: int, buffer: memoryview) -> int:
        count = max(0, min(len(buffer), self.size - offset))
        got = self._host.readinto_at(offset, buffer[:count]) if offset < self._host.size else 0
        buffer[got:count] = bytes(count - got)
        end = offset + count
        index = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while index < len(self._segments):
            start, stop, data, data_start = self._segments[index]
            if start >= end:
                break
            low, high = max(start, offset), min(stop, end)
            if low < high:
                if data is None:
                    buffer[low - offset : high - offset] = bytes(high - low)
                else:
                    buffer[low - offset : high - offset] = data[low - data_start : high - data_start]
            index += 1
        return count

    def overlaps(self, start: int, end: int) -> bool:
        """True when [start, end) of the file was written by the replay."""
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        return any(seg[0] < end and start < seg[1] for seg in self._segments[index : index + 2])


def _flatten(writes: list[s.LogWrite]) -> tuple[list[int], list[tuple[int, int, bytes | None, int]]]:
    """Non-overlapping segments (start, end, data or None for zeros, where data starts), sorted:
    for each byte the last write covering it."""
    points = sorted({p for w in writes for p in (w.file_offset, w.file_offset + w.length)})
    by_start = sorted(range(len(writes)), key=lambda i: writes[i].file_offset)
    heap: list[tuple[int, int]] = []  # (-order, end)
    segments: list[tuple[int, int, bytes | None, int]] = []
    next_write = 0
    for left, right in itertools.pairwise(points):
        while next_write < len(by_start) and writes[by_start[next_write]].file_offset <= left:
            order = by_start[next_write]
            heapq.heappush(heap, (-order, writes[order].file_offset + writes[order].length))
            next_write += 1
        while heap and heap[0][1] <= left:
            heapq.heappop(heap)
        if not heap:
            continue
        winner = writes[-heap[0][0]]
        segments.append((left, right, winner.data, winner.file_offset))
    return [segment[0] for segment in segments], segments

