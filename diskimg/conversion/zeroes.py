"""Finding zero ranges in data at memcmp speed.

Comparing a ``bytes`` slice with a preallocated zero ``bytes`` of the same length runs at memory
speed; comparing memoryviews or counting bytes is 10-30x slower (a memoryview is therefore copied
out with ``tobytes`` first, which is a memcpy). Candidate zero pieces are located with
``bytes.find`` of a zero needle, a C search that skips through non-zero data, and zero runs are
extended by comparing 64 KiB blocks, then pieces of the requested granularity.
"""

from __future__ import annotations

from collections.abc import Iterator

_COARSE = 64 * 1024
_ZERO_BLOCKS: dict[int, bytes] = {}


def zero_block(size: int) -> bytes:
    """A shared all-zero bytes object of ``size`` bytes (kept for the common sizes)."""
    block = _ZERO_BLOCKS.get(size)
    if block is None:
        block = bytes(size)
        if len(_ZERO_BLOCKS) < 16:
            _ZERO_BLOCKS[size] = block
    return block


Buffer = bytes | bytearray | memoryview


def _comparable(data: Buffer) -> bytes | bytearray:
    return data.tobytes() if isinstance(data, memoryview) else data


def is_zero(data: Buffer) -> bool:
    return _comparable(data) == zero_block(len(data))


def nonzero_runs(data: Buffer, granularity: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, end) ranges of ``data[start:stop]`` holding non-zero bytes, relative to ``start``:
    every ``granularity``-aligned piece of zeros is left out (0: the whole window is one range).

    Zero pieces are found with ``bytes.find`` of a zero needle (a C search), so data without zero
    runs costs one call per buffer whatever its size. A window of a larger bytearray is searched in
    place (no copy); a memoryview is copied out first.
    """
    stop = len(data) if stop is None else stop
    size = stop - start
    if granularity <= 0:
        if size > 0:
            yield 0, size
        return
    if isinstance(data, memoryview):
        data, start, stop = data[start:stop].tobytes(), 0, size
    if start == 0 and stop == len(data) and data == zero_block(size):
        return
    zero_piece = zero_block(granularity)
    coarse = max(_COARSE, granularity)
    zero_coarse = zero_block(coarse)
    run_start = search = start
    while (found := data.find(zero_piece, search, stop)) >= 0:
        piece = start + -(-(found - start) // granularity) * granularity  # the first aligned piece that may be zero
        if piece + granularity > stop:
            break
        if data[piece : piece + granularity] != zero_piece:
            search = piece + 1  # the zero run found ends before this piece ends
            continue
        end = piece + granularity
        while end + coarse <= stop and data[end : end + coarse] == zero_coarse:
            end += coarse
        while end + granularity <= stop and data[end : end + granularity] == zero_piece:
            end += granularity
        if piece > run_start:
            yield run_start - start, piece - start
        run_start = search = end
    tail = stop - size % granularity
    last = tail if run_start <= tail < stop and data[tail:stop] == zero_block(stop - tail) else stop
    if last > run_start:
        yield run_start - start, last - start
