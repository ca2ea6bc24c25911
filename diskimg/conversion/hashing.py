"""The guest content hash: one digest for the guest-visible bytes of a disk, whatever its format.

Definition (version 1), so that others can reimplement it:

- The disk of ``virtual_size`` bytes is cut into blocks of 65536 bytes; the last block may be
  shorter.
- A block is *zero* when all its bytes are zero (whether it was stored, or a hole, or an
  unallocated cluster: the definition looks at content only).
- The block sequence is turned into records: each maximal run of consecutive zero blocks becomes
  ``b"Z"`` followed by the run's block count as an unsigned 64-bit big-endian integer; each
  non-zero block becomes ``b"D"`` followed by the SHA-256 digest of its bytes.
- The content hash is the SHA-256 of ``b"diskimg-content-v1\\0"``, then ``virtual_size`` as an
  unsigned 64-bit big-endian integer, then the records in order. It is written as
  ``"sha256c1:" + hexdigest``.

Zero regions known from an image's allocation map cost one record however large they are, so a
2 TB disk holding 1 GB of data costs what hashing 1 GB costs.
"""

from __future__ import annotations

import hashlib
import struct

from .zeroes import is_zero

BLOCK_SIZE = 65536
PREFIX = "sha256c1:"


class ContentHasher:
    """Feed the guest disk in offset order: ``update(data)`` for bytes, ``skip_zeros(n)`` for known zeros."""

    def __init__(self, virtual_size: int) -> None:
        self.virtual_size = virtual_size
        self._outer = hashlib.sha256(b"diskimg-content-v1\0" + struct.pack(">Q", virtual_size))
        self._position = 0
        self._zero_run = 0  # zero blocks pending as one record
        self._partial = bytearray()  # bytes of a block not yet complete

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._partial:
            need = BLOCK_SIZE - len(self._partial)
            self._partial += view[:need]
            view = view[need:]
            if len(self._partial) == BLOCK_SIZE or self._position + len(self._partial) == self.virtual_size:
                self._block(bytes(self._partial))
                self._partial.clear()
        whole = len(view) - len(view) % BLOCK_SIZE
        for start in range(0, whole, BLOCK_SIZE):
            self._block(view[start : start + BLOCK_SIZE].tobytes())
        rest = view[whole:]
        if rest:
            if self._position + len(rest) == self.virtual_size:
                self._block(rest.tobytes())
            else:
                self._partial += rest

    def skip_zeros(self, length: int) -> None:
        """``length`` zero bytes, counted without being materialised where blocks are whole."""
        if self._partial:
            step = min(length, BLOCK_SIZE - len(self._partial))
            self.update(bytes(step))
            length -= step
        whole = length // BLOCK_SIZE
        if whole:
            self._zero_run += whole
            self._position += whole * BLOCK_SIZE
        if length % BLOCK_SIZE:
            self.update(bytes(length % BLOCK_SIZE))

    def _block(self, block: bytes) -> None:
        self._position += len(block)
        if is_zero(block):
            self._zero_run += 1
            return
        self._flush_zero_run()
        self._outer.update(b"D" + hashlib.sha256(block).digest())

    def _flush_zero_run(self) -> None:
        if self._zero_run:
            self._outer.update(b"Z" + struct.pack(">Q", self._zero_run))
            self._zero_run = 0

    def hexdigest(self) -> str:
        if self._position + len(self._partial) != self.virtual_size:
            raise ValueError(f"content hash fed {self._position + len(self._partial)} of {self.virtual_size} bytes")
        if self._partial:
            self._block(bytes(self._partial))
            self._partial.clear()
        self._flush_zero_run()
        return PREFIX + self._outer.copy().hexdigest()
