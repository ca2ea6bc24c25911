"""LZO1X decompression in pure Python (btrfs compresses extents with lzo1x-1).

Written from the description of the bitstream (the Linux kernel's ``Documentation/staging/lzo.rst``):
a stream is a sequence of instructions, each a literal run (bytes copied from the input) or a
match (bytes copied from the output already produced, ``distance`` bytes back), where the two low
bits ``S`` of most match instructions give the number (0-3) of literals that follow it. The opcode
byte ``t``:

* first byte of the stream above 17: ``t - 17`` literals, then as after that many literals;
* ``0-15`` after a match that copied no literals (state 0): a run of ``3 + L`` literals
  (``L == 0``: an extended length, 15 plus a run of zero bytes worth 255 each plus the byte ending it);
* ``0-15`` after a match followed by 1-3 literals: a 2-byte match, distance ``(H << 2) + D + 1``;
* ``0-15`` after a literal run of 4 or more: a 3-byte match, distance ``(H << 2) + D + 2049``;
* ``16-31``: a match of ``2 + L`` bytes (``L == 0``: extended, base 7), distance
  ``16384 + (bit 3 << 14) + D`` with ``D`` and ``S`` in the 16-bit little-endian word that follows;
  a distance of exactly 16384 ends the stream (the end marker is ``11 00 00``);
* ``32-63``: a match of ``2 + L`` bytes (``L == 0``: extended, base 31), distance ``D + 1`` (16-bit word);
* ``64-127``: a match of 3-4 bytes, ``128-255``: of 5-8 bytes (length ``(t >> 5) + 1``), distance
  ``(H << 3) + D + 1`` with ``D`` from bits 2-4 of ``t`` and ``H`` the next byte.

A match may overlap the bytes it produces (a distance shorter than its length repeats them).
Every read of the input and every distance is checked; the output is capped by the caller.
"""

from __future__ import annotations


class LzoError(Exception):
    """The bytes are not a valid LZO1X stream (or produce more than allowed)."""


#: the end-of-stream marker sits at this distance
END_DISTANCE = 0x4000


def decompress(data: bytes, max_output: int) -> bytes:
    """The bytes the LZO1X stream ``data`` decodes to: it must end with its end marker exactly at
    the end of ``data`` and produce at most ``max_output`` bytes."""
    n = len(data)
    out = bytearray()
    ip = 0

    def literals(count: int) -> None:
        nonlocal ip
        if ip + count > n:
            raise LzoError(f"literal run of {count} bytes past the input's end")
        if len(out) + count > max_output:
            raise LzoError(f"output exceeds {max_output} bytes")
        out.extend(data[ip : ip + count])
        ip += count

    def extended_length(base: int) -> int:
        """``base`` plus a run of zero bytes (255 each) and the non-zero byte that ends it."""
        nonlocal ip
        start = ip
        while ip < n and data[ip] == 0:
            ip += 1
        if ip >= n:
            raise LzoError("length runs past the input's end")
        zeros = ip - start
        if zeros * 255 > max_output:
            raise LzoError("length beyond the output's cap")
        value = base + zeros * 255 + data[ip]
        ip += 1
        return value

    def need(count: int) -> None:
        if ip + count > n:
            raise LzoError("instruction past the input's end")

    if n == 0:
        raise LzoError("empty stream")
    state = 0
    if data[0] > 17:
        ip = 1
        count = data[0] - 17
        literals(count)
        state = min(count, 4)
    while True:
        need(1)
        t = data[ip]
        ip += 1
        if t < 16:
            if state == 0:
                literals(3 + (t or extended_length(15)))
                state = 4
                continue
            need(1)
            if state < 4:
                length, distance = 2, (data[ip] << 2) + (t >> 2) + 1
            else:
                length, distance = 3, (data[ip] << 2) + (t >> 2) + 2049
            ip += 1
            follow = t & 3
        elif t >= 64:
            need(1)
            length, distance = (t >> 5) + 1, (data[ip] << 3) + ((t >> 2) & 7) + 1
            ip += 1
            follow = t & 3
        elif t >= 32:
            length = 2 + ((t & 31) or extended_length(31))
            need(2)
            word = data[ip] | data[ip + 1] << 8
            ip += 2
            distance, follow = (word >> 2) + 1, word & 3
        else:
            length = 2 + ((t & 7) or extended_length(7))
            need(2)
            word = data[ip] | data[ip + 1] << 8
            ip += 2
            distance, follow = ((t & 8) << 11) + (word >> 2), word & 3
            if distance == 0:
                if length != 3:
                    raise LzoError("malformed end marker")
                if ip != n:
                    raise LzoError(f"{n - ip} bytes after the end marker")
                return bytes(out)
            distance += END_DISTANCE
        start = len(out) - distance
        if start < 0:
            raise LzoError(f"match {distance} bytes back with {len(out)} produced")
        if len(out) + length > max_output:
            raise LzoError(f"output exceeds {max_output} bytes")
        if distance >= length:
            out.extend(out[start : start + length])
        else:  # the match overlaps what it writes: its last ``distance`` bytes repeat
            pattern = bytes(out[start:])
            out.extend((pattern * (length // distance + 1))[:length])
        state = follow
        literals(follow)
