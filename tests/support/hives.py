"""Windows registry hives and their transaction logs, made for the tests: hives written by hivexsh
(from an empty seed hive laid out here), structures hivex does not write laid out by a small cell
builder, and logs in both formats laid out from two hives (before and after a change)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from diskimg.inspection.guest import regf

NO_CELL = 0xFFFFFFFF


# -- a minimal cell layout: enough to start hivex from, and the structures hivex does not write -----


class CellBuilder:
    """Cells laid out one after another in one hbin; offsets are relative to the hive bins data."""

    def __init__(self) -> None:
        self.body = bytearray()

    def add(self, payload: bytes, allocated: bool = True) -> int:
        offset = 0x20 + len(self.body)
        size = (4 + len(payload) + 7) & ~7
        self.body += struct.pack("<i", -size if allocated else size) + payload.ljust(size - 4, b"\0")
        return offset

    def security(self) -> int:
        descriptor = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)  # self-relative, nothing set
        offset = 0x20 + len(self.body)
        return self.add(struct.pack("<2sHIIII", b"sk", 0, offset, offset, 1, len(descriptor)) + descriptor)

    def key(self, name: str, security: int, subkeys: tuple[int, int] = (0, NO_CELL),
            values: tuple[int, int] = (0, NO_CELL), ascii_name: bool = True) -> int:
        raw = name.encode("latin-1") if ascii_name else name.encode("utf-16-le")
        flags = 0x20 if ascii_name else 0
        return self.add(struct.pack("<2sHQIIIIIIIIIIIIIIIHH", b"nk", flags, 0, 0, NO_CELL, subkeys[0], 0,
                                    subkeys[1], NO_CELL, values[0], values[1], security, NO_CELL,
                                    0, 0, 0, 0, 0, len(raw), 0) + raw)

    def value(self, name: str, value_type: int, data: bytes, big: bool = False) -> int:
        raw = name.encode("latin-1")
        if len(data) <= 4:
            size, where = len(data) | 0x80000000, int.from_bytes(data.ljust(4, b"\0"), "little")
        elif big:
            segments = [self.add(data[i:i + regf.BIG_DATA_SEGMENT])
                        for i in range(0, len(data), regf.BIG_DATA_SEGMENT)]
            segment_list = self.add(b"".join(struct.pack("<I", s) for s in segments))
            size, where = len(data), self.add(struct.pack("<2sHI", b"db", len(segments), segment_list))
        else:
            size, where = len(data), self.add(data)
        return self.add(struct.pack("<2sHIIIHH", b"vk", len(raw), size, where, value_type, 1, 0) + raw)

    def hive(self, root: int, minor: int = 5, sequences: tuple[int, int] = (1, 1)) -> bytes:
        bins = bytes(self.body)
        hbin_size = -(-(0x20 + len(bins) + 8) // 4096) * 4096
        free = hbin_size - 0x20 - len(bins)
        hbin = struct.pack("<4sIIQQI", b"hbin", 0, hbin_size, 0, 0, 0) + bins + struct.pack("<i", free) + bytes(free - 4)
        base = bytearray(4096)
        struct.pack_into("<4sIIQIIIIII", base, 0, b"regf", sequences[0], sequences[1], 0, 1, minor, 0, 1, root,
                         hbin_size)
        struct.pack_into("<I", base, 44, 1)
        struct.pack_into("<I", base, 508, regf.base_block_checksum(bytes(base)))
        return bytes(base) + hbin


def leaf(kind: bytes, keys: list[tuple[int, str]]) -> bytes:
    """An li, lf or lh subkey list over (offset, name) pairs."""
    elements = b""
    for offset, name in keys:
        elements += struct.pack("<I", offset)
        if kind == b"lf":
            elements += name.encode("latin-1")[:4].ljust(4, b"\0")
        elif kind == b"lh":
            elements += struct.pack("<I", regf.name_hash(name))
    return kind + struct.pack("<H", len(keys)) + elements


def empty_hive(path: Path, minor: int = 5) -> Path:
    """A hive holding only its root key (and its security cell): where hivexsh starts from."""
    cells = CellBuilder()
    security = cells.security()
    root = cells.key("ROOT", security)
    path.write_bytes(cells.hive(root, minor))
    return path


# -- writing with hivexsh ----------------------------------------------------------------------------

#: a hive as the tests describe it: key path -> [(value name, type, data bytes)]
Spec = dict[str, list[tuple[str, int, bytes]]]


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def multi_sz(*strings: str) -> bytes:
    return "".join(s + "\0" for s in strings).encode("utf-16-le") + b"\0\0"


def dword(number: int) -> bytes:
    return struct.pack("<I", number)


def hivexsh_script(spec: Spec) -> str:
    """hivexsh commands creating every key of ``spec`` (parents first) and setting its values."""
    lines: list[str] = []
    made: set[str] = set()
    for path in sorted(spec, key=lambda p: p.count("\\")):
        parts = path.split("\\")
        for depth in range(1, len(parts) + 1):
            prefix = "\\".join(parts[:depth])
            if prefix.casefold() in made:
                continue
            made.add(prefix.casefold())
            parent = "\\".join(parts[:depth - 1])
            lines += [f"cd \\{parent}" if parent else "cd \\ ", f"add {parts[depth - 1]}"]
        values = spec[path]
        if values:
            lines += [f"cd \\{path}", f"setval {len(values)}"]
            for name, value_type, data in values:
                lines += [name or "@", f"hex:{value_type}:{data.hex()}" if data else f"hex:{value_type}:"]
    return "\n".join(lines) + "\n"


def build_hive(path: Path, spec: Spec, minor: int = 5) -> Path:
    """A hive made by hivexsh from an empty one, holding ``spec``'s keys and values."""
    seed = empty_hive(path.with_suffix(".seed"), minor)
    script = path.with_suffix(".hivexsh")
    script.write_text(hivexsh_script(spec) + f"commit {path}\n", encoding="utf-8")
    subprocess.run(["hivexsh", "-w", "-f", str(script), str(seed)], check=True, capture_output=True)
    return path


def modify_hive(source: Path, target: Path, script: str) -> Path:
    """``source`` changed by hivexsh running ``script``, committed to ``target``."""
    commands = target.with_suffix(".change")
    commands.write_text(script + f"commit {target}\n", encoding="utf-8")
    subprocess.run(["hivexsh", "-w", "-f", str(commands), str(source)], check=True, capture_output=True)
    return target


# -- transaction logs: laid out from two hives hivexsh wrote ------------------------------------------


def xor_checksum(block: bytes | bytearray) -> int:
    """The base block checksum as the specification defines it: XOR of the first 127 32-bit words."""
    checksum = 0
    for word in struct.unpack_from("<127I", block):
        checksum ^= word
    return checksum


def with_base_block(data: bytes, file_type: int | None = None, sequences: tuple[int, int] | None = None) -> bytes:
    """``data`` with base block fields changed and its checksum made to match again."""
    block = bytearray(data)
    if sequences is not None:
        struct.pack_into("<II", block, 4, *sequences)
    if file_type is not None:
        struct.pack_into("<I", block, 28, file_type)
    struct.pack_into("<I", block, 508, xor_checksum(block))
    return bytes(block)


def sequences_of(data: bytes | bytearray) -> tuple[int, int]:
    return struct.unpack_from("<II", data, 4)


def bins_size_of(data: bytes | bytearray) -> int:
    return int(struct.unpack_from("<I", data, 40)[0])


def mid_write(hive: bytes) -> bytes:
    """The hive as Windows leaves it while writing: the primary sequence number one ahead."""
    _first, second = sequences_of(hive)
    return with_base_block(hive, sequences=(second + 1, second))


def changed_blocks(before: bytes, after: bytes, size: int) -> list[tuple[int, bytes]]:
    """(offset in the hive bins data, data) of each ``size``-byte block of ``after`` that differs from ``before``."""
    new = after[4096:4096 + bins_size_of(after)]
    old = before[4096:].ljust(len(new), b"\0")
    return [(at, new[at:at + size]) for at in range(0, len(new), size) if new[at:at + size] != old[at:at + size]]


def log_entry(sequence: int, bins_size: int, pages: list[tuple[int, bytes]], flags: int = 1) -> bytes:
    """A new-format log entry (HvLE) holding ``pages``, its hashes Marvin32 with the logs' seed."""
    body = b"".join(struct.pack("<II", at, len(page)) for at, page in pages) + b"".join(page for _at, page in pages)
    size = -(-(40 + len(body)) // 512) * 512
    body = body.ljust(size - 40, b"\0")
    head = struct.pack("<4sIIIII", b"HvLE", size, flags, sequence, bins_size, len(pages))
    hash1 = regf.marvin32(body)
    return head + struct.pack("<QQ", hash1, regf.marvin32(head + struct.pack("<Q", hash1))) + body


def new_format_log(hive: bytes, sequence: int, entries: list[bytes]) -> bytes:
    """A Windows 8.1+ log: the hive's first 512 bytes as a log (file type 6, both sequences ``sequence``),
    then the entries, then zeros to a 4096 boundary."""
    log = with_base_block(hive[:512], file_type=6, sequences=(sequence, sequence)) + b"".join(entries)
    return log.ljust(-(-len(log) // 4096) * 4096, b"\0")


def old_format_log(after: bytes, sequence: int, pages: list[tuple[int, bytes]]) -> bytes:
    """A log as Windows up to 8 writes it: ``after``'s base block as a log (file type 1), the dirty vector
    ("DIRT", one bit per 512-byte page of the hive bins data), then the 512-byte pages in bit order."""
    bitmap = bytearray(bins_size_of(after) // 512 // 8)
    for at, _page in pages:
        bitmap[at // 512 // 8] |= 1 << (at // 512 % 8)
    vector = b"DIRT" + bytes(bitmap)
    vector = vector.ljust(-(-len(vector) // 512) * 512, b"\0")
    return (with_base_block(after[:512], file_type=1, sequences=(sequence, sequence)) + vector
            + b"".join(page for _at, page in sorted(pages)))
