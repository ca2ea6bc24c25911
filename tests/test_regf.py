"""The registry hive reader against hivex: hives written by hivexsh (from an empty seed hive) are read
back and compared key by key and value by value with what the test wrote, and with hivexml's dump;
structures hivex does not write (index roots, li/lf leaves, big data) are laid out by a small cell
builder here and read by hivex as the oracle. Broken hives raise CorruptImage only.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskimg.errors import CorruptImage
from diskimg.guest import regf
from diskimg.guest.regf import (REG_BINARY, REG_DWORD, REG_DWORD_BIG_ENDIAN, REG_EXPAND_SZ, REG_MULTI_SZ, REG_NONE,
                                REG_QWORD, REG_SZ, Hive, KeyNotFound)

pytestmark = pytest.mark.skipif(shutil.which("hivexsh") is None, reason="hivexsh (libhivex-bin) is not installed")

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


def hivexml_tree(path: Path) -> dict[str, dict[str, tuple[str, bytes | str | list[str]]]]:
    """hivexml's view of a hive: key path (lower-cased) -> value name -> (hivexml type, value)."""
    out = subprocess.run(["hivexml", str(path)], check=True, capture_output=True).stdout
    tree: dict[str, dict[str, tuple[str, bytes | str | list[str]]]] = {}

    def visit(node: ET.Element, path: str) -> None:
        values = tree.setdefault(path.casefold(), {})
        for child in node:
            if child.tag == "value":
                raw = child.get("value", "")
                data: bytes | str | list[str] = base64.b64decode(raw) if child.get("encoding") == "base64" else raw
                if child.get("type") == "string-list":
                    data = [string.text or "" for string in child.iter("string")]
                values[child.get("key", "")] = (child.get("type", ""), data)
            elif child.tag == "node":
                name = child.get("name", "")
                visit(child, f"{path}\\{name}" if path else name)

    visit(ET.fromstring(out).find("node"), "")  # type: ignore[arg-type]
    return tree


def read_tree(hive: Hive) -> dict[str, dict[str, tuple[int, bytes]]]:
    return {path.casefold(): {v.name: (v.type, v.raw) for v in key.values()} for path, key in hive.walk()}


SPEC: Spec = {
    "Select": [("Current", REG_DWORD, dword(2)), ("Default", REG_DWORD, dword(1))],
    "ControlSet001\\Services\\viostor": [("Start", REG_DWORD, dword(3))],
    "ControlSet002\\Services\\viostor": [
        ("Start", REG_DWORD, dword(0)),
        ("ImagePath", REG_EXPAND_SZ, sz("System32\\drivers\\viostor.sys")),
        ("DisplayName", REG_SZ, sz("Red Hat VirtIO SCSI controller")),
        ("Group", REG_SZ, sz("SCSI miniport")),
        ("DependOnService", REG_MULTI_SZ, multi_sz("Tcpip", "Afd")),
        ("BigEndian", REG_DWORD_BIG_ENDIAN, struct.pack(">I", 0x01020304)),
        ("Stamp", REG_QWORD, struct.pack("<Q", 0x0123456789ABCDEF)),
        ("Blob", REG_BINARY, bytes(range(256)) * 8),
        ("Nothing", REG_NONE, b""),
        ("", REG_SZ, sz("the default value")),
    ],
    "ControlSet002\\Control\\Class\\{4d36e967-e325-11ce-bfc1-08002be10318}": [
        ("UpperFilters", REG_MULTI_SZ, multi_sz("PartMgr", "EhStorClass")),
    ],
    "Microsoft\\Windows NT\\CurrentVersion": [
        ("ProductName", REG_SZ, sz("Windows Server 2019 Datacenter")),
        ("Unicodé 名前", REG_SZ, sz("värde ☃")),
        ("Empty", REG_SZ, b""),
    ],
    "Unicodé\\Ключ": [("x", REG_DWORD, dword(7))],
}


@pytest.fixture(scope="module")
def spec_hive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hive(tmp_path_factory.mktemp("regf") / "SYSTEM", SPEC)


def test_keys_and_values_match_what_hivex_wrote(spec_hive: Path) -> None:
    hive = Hive(spec_hive.read_bytes())
    assert hive.checksum_ok and not hive.dirty
    tree = read_tree(hive)
    expected_keys = {""}
    for path in SPEC:
        parts = path.split("\\")
        expected_keys |= {"\\".join(parts[:i]).casefold() for i in range(1, len(parts) + 1)}
    assert set(tree) == expected_keys
    for path, values in SPEC.items():
        assert tree[path.casefold()] == {name: (value_type, data) for name, value_type, data in values}, path


def test_tree_matches_hivexml(spec_hive: Path) -> None:
    """hivexml decodes every value itself: the same keys, names, and data as ours."""
    ours = read_tree(Hive(spec_hive.read_bytes()))
    theirs = hivexml_tree(spec_hive)
    assert set(ours) == set(theirs)
    for path, values in ours.items():
        assert set(values) == set(theirs[path]), path
        for name, (value_type, raw) in values.items():
            kind, data = theirs[path][name]
            decoded = regf.decode_value(value_type, raw)
            if kind in ("string", "expand"):
                assert decoded == data
            elif kind == "string-list":  # hivexml lists the empty string that ends the list too
                assert isinstance(decoded, list) and decoded + [""] == data
            elif kind in ("int32", "int64"):
                assert decoded == int(str(data))
            elif kind in ("binary", "none"):
                assert raw == data, (path, name)
            else:
                pytest.fail(f"hivexml type {kind} of {path}\\{name} not compared")


def test_decoded_values_and_case_insensitive_lookup(spec_hive: Path) -> None:
    hive = Hive(spec_hive.read_bytes())
    viostor = hive.open("controlset002\\SERVICES\\ViOsToR")
    assert viostor.name == "viostor"
    assert viostor.data("start") == 0
    assert viostor.data("IMAGEPATH") == "System32\\drivers\\viostor.sys"
    assert viostor.data("DependOnService") == ["Tcpip", "Afd"]
    assert viostor.data("BigEndian") == 0x01020304
    assert viostor.data("Stamp") == 0x0123456789ABCDEF
    assert viostor.data("Blob") == bytes(range(256)) * 8
    assert viostor.data("Nothing") == b""
    assert viostor.data("") == "the default value"
    assert viostor.data("missing") is None
    assert hive.open("Microsoft\\Windows NT\\CurrentVersion").data("unicodé 名前") == "värde ☃"
    assert hive.open("Microsoft\\Windows NT\\CurrentVersion").data("Empty") == ""
    assert hive.open("UNICODÉ\\ключ").data("X") == 7
    assert hive.find("ControlSet003") is None
    with pytest.raises(KeyNotFound):
        hive.open("ControlSet002\\Services\\vioscsi")


def test_current_control_set(spec_hive: Path, tmp_path: Path) -> None:
    hive = Hive(spec_hive.read_bytes())
    current = hive.current_control_set()
    assert current is not None and current.name == "ControlSet002"
    no_select = Hive(build_hive(tmp_path / "nosel", {"ControlSet001": []}).read_bytes())
    assert no_select.current_control_set() is None


def test_many_subkeys_as_hivex_lists_them(tmp_path: Path) -> None:
    names = [f"Key{i:04d}" for i in range(700)]
    path = build_hive(tmp_path / "many", {f"Services\\{name}": [] for name in names})
    listed = subprocess.run(["hivexsh", str(path)], input=b"cd Services\nls\n",
                            capture_output=True, check=True).stdout.decode().split()
    hive = Hive(path.read_bytes())
    ours = [key.name for key in hive.open("Services").subkeys()]
    assert sorted(ours) == sorted(listed) == names
    assert hive.open("services\\KEY0699").name == "Key0699"


@pytest.mark.parametrize("minor", [3, 5])
def test_index_root_leaves_and_big_data_as_hivex_reads_them(tmp_path: Path, minor: int) -> None:
    """An ri over li, lf and lh leaves, a UTF-16 key name, a 40000-byte value in db segments (minor
    version 5; with version 1.3 a big value sits in one cell) and a default value."""
    cells = CellBuilder()
    security = cells.security()
    big = bytes((i * 7) & 0xFF for i in range(40000))
    values = [cells.value("Big", REG_BINARY, big, big=minor >= 4), cells.value("", REG_DWORD, dword(5)),
              cells.value("Text", REG_SZ, sz("hello"))]
    value_list = cells.add(b"".join(struct.pack("<I", v) for v in values))
    names = [f"Child{i}" for i in range(9)] + ["Ünïcode☃"]
    children = [(cells.key(name, security, ascii_name=name.isascii()), name) for name in names]
    leaves = [cells.add(leaf(b"li", children[:3])), cells.add(leaf(b"lf", children[3:6])),
              cells.add(leaf(b"lh", children[6:]))]
    index_root = cells.add(b"ri" + struct.pack("<H", 3) + b"".join(struct.pack("<I", x) for x in leaves))
    root = cells.key("ROOT", security, subkeys=(len(children), index_root), values=(len(values), value_list))
    path = tmp_path / "built"
    path.write_bytes(cells.hive(root, minor))

    hive = Hive(path.read_bytes())
    assert [key.name for key in hive.root.subkeys()] == names
    assert hive.root.data("Big") == big
    assert hive.root.data("") == 5
    assert hive.open("ünïcode☃").name == "Ünïcode☃"
    theirs = hivexml_tree(path)
    assert set(theirs) == {p for p, _ in ((p.casefold(), k) for p, k in hive.walk())}
    assert theirs[""]["Big"] == ("binary", big)
    assert theirs[""]["Text"] == ("string", "hello")


# -- damaged hives ---------------------------------------------------------------------------------


def corrupt_at(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch):]


def test_base_block_problems(spec_hive: Path) -> None:
    data = spec_hive.read_bytes()
    flipped = Hive(corrupt_at(data, 112, b"\x01"))  # a reserved byte: the checksum no longer matches
    assert not flipped.checksum_ok and flipped.dirty
    mid_write = bytearray(data)
    struct.pack_into("<I", mid_write, 4, struct.unpack_from("<I", data, 4)[0] + 1)
    struct.pack_into("<I", mid_write, 508, regf.base_block_checksum(bytes(mid_write)))
    hive = Hive(bytes(mid_write))
    assert hive.checksum_ok and hive.dirty
    for broken in (b"nope" + data[4:], data[:4096], corrupt_at(data, 20, b"\x02"), corrupt_at(data, 4096, b"xbin")):
        with pytest.raises(CorruptImage):
            Hive(broken)


def test_cycles_free_cells_and_overflowing_counts() -> None:
    cells = CellBuilder()
    security = cells.security()
    # root -> A -> (list pointing back at root)
    loop_list = cells.add(leaf(b"li", [(0, "")]))  # patched below to the root's offset
    a = cells.key("A", security, subkeys=(1, loop_list))
    root_list = cells.add(leaf(b"li", [(a, "A")]))
    root = cells.key("ROOT", security, subkeys=(1, root_list))
    struct.pack_into("<I", cells.body, loop_list - 0x20 + 4 + 4, root)
    hive = Hive(cells.hive(root))
    assert hive.open("A\\ROOT\\A\\ROOT").name == "ROOT"  # a lookup is bounded by its path
    with pytest.raises(CorruptImage):
        list(hive.walk())

    cells = CellBuilder()
    security = cells.security()
    free = cells.add(b"vk" + bytes(30), allocated=False)
    values = cells.add(struct.pack("<I", free))
    big_count = cells.add(leaf(b"lh", [])[:2] + struct.pack("<H", 500))
    root = cells.key("ROOT", security, subkeys=(500, big_count), values=(1, values))
    hive = Hive(cells.hive(root))
    with pytest.raises(CorruptImage):
        list(hive.root.values())
    with pytest.raises(CorruptImage):
        list(hive.root.subkeys())
    # an index root may hold only leaves, each once (else one small cell could list keys without end)
    nested = CellBuilder()
    security = nested.security()
    child = nested.key("Child", security)
    inner = nested.add(b"ri" + struct.pack("<H", 0))
    outer = nested.add(b"ri" + struct.pack("<HI", 1, inner))
    one_leaf = nested.add(leaf(b"lh", [(child, "Child")]))
    repeated = nested.add(b"ri" + struct.pack("<H", 3) + struct.pack("<I", one_leaf) * 3)
    nested_root = nested.key("ROOT", security, subkeys=(1, outer))
    repeating_root = nested.key("ROOT", security, subkeys=(3, repeated))
    for root in (nested_root, repeating_root):
        with pytest.raises(CorruptImage):
            list(Hive(nested.hive(root)).root.subkeys())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_hives_raise_only_corrupt_image(spec_hive: Path, data: st.DataObject) -> None:
    hive_bytes = bytearray(spec_hive.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        offset = data.draw(st.integers(4096, len(hive_bytes) - 4))
        hive_bytes[offset:offset + 4] = data.draw(st.binary(min_size=4, max_size=4))
    try:
        hive = Hive(bytes(hive_bytes))
        for _path, key in hive.walk():
            for value in key.values():
                value.data
        hive.current_control_set()
    except CorruptImage:
        pass
