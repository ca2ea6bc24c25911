"""The registry hive reader against hivex: hives written by hivexsh (from an empty seed hive) are read
back and compared key by key and value by value with what the test wrote, and with hivexml's dump;
structures hivex does not write (index roots, li/lf leaves, big data) are laid out by a small cell
builder here and read by hivex as the oracle. Broken hives raise CorruptImage only.

Transaction logs: real Windows hives of the corpus (regipy's test data: a clean Windows 7 SYSTEM, a
dirty Windows 10 SYSTEM with the .LOG1/.LOG2 Windows wrote, a BCD store) read as the corpus MANIFEST
(hivexsh) says, and the dirty one replayed compares with hivexml reading our replayed bytes and, when
regipy is installed, with regipy's own recovery. Logs in both formats are also laid out here from two
hives hivexsh wrote (before and after a change): replaying must give the "after" hive. Hostile logs
end in LogsNotUsable only, within bounds.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diskimg.errors import CorruptImage
from diskimg.inspection.guest import regf
from diskimg.inspection.guest.regf import (
    REG_BINARY,
    REG_DWORD,
    REG_DWORD_BIG_ENDIAN,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_NONE,
    REG_QWORD,
    REG_SZ,
    Hive,
    Key,
    KeyNotFound,
    LogsNotUsable,
)

from .support.hives import (
    CellBuilder,
    Spec,
    bins_size_of,
    build_hive,
    changed_blocks,
    dword,
    leaf,
    log_entry,
    mid_write,
    modify_hive,
    multi_sz,
    new_format_log,
    old_format_log,
    sequences_of,
    sz,
    with_base_block,
    xor_checksum,
)

pytestmark = pytest.mark.skipif(shutil.which("hivexsh") is None, reason="hivexsh (libhivex-bin) is not installed")


# -- hives written by hivexsh (the builders are in support/hives.py) -----------------------------------


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
    assert_matches_hivexml(Hive(spec_hive.read_bytes()), hivexml_tree(spec_hive))


def assert_matches_hivexml(hive: Hive, theirs: dict[str, dict[str, tuple[str, bytes | str | list[str]]]]) -> None:
    """Every key, value name and value of ``hive`` as hivexml decoded them (``hivexml_tree``)."""
    ours = read_tree(hive)
    assert set(ours) == set(theirs)
    for path, values in ours.items():
        assert set(values) == set(theirs[path]), path
        for name, (value_type, raw) in values.items():
            kind, data = theirs[path][name]
            decoded = regf.decode_value(value_type, raw)
            if kind in ("string", "expand"):
                assert decoded == data
            elif kind == "string-list":  # hivexml lists the empty strings that end the list too
                assert isinstance(data, list) and decoded == (data[:data.index("")] if "" in data else data)
            elif kind in ("int32", "int64"):  # hivexml prints them signed
                assert decoded == int(str(data)) % (1 << (32 if kind == "int32" else 64)), (path, name)
            elif kind in ("binary", "none", "unknown", "resource-list", "resource-requirements",
                          "full-resource-description"):
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


# -- transaction logs: laid out from two hives hivexsh wrote (support/hives.py) -----------------------


@pytest.fixture(scope="module")
def changed_hive(spec_hive: Path) -> tuple[bytes, bytes]:
    """(before, after): the SPEC hive, and the same after hivexsh set a value and added a key holding
    3000 bytes (the hive grows by a hive bin)."""
    after = modify_hive(spec_hive, spec_hive.with_name("SYSTEM.after"),
                        "cd \\ControlSet001\\Services\\viostor\nsetval 1\nStart\ndword:0\n"
                        "cd \\ \nadd Grown\ncd \\Grown\nsetval 1\nBlob\n"
                        f"hex:3:{bytes(i % 251 for i in range(3000)).hex()}\n")
    # a hive long in use: sequence numbers well above those of the stale entries the tests write
    before, grown = (with_base_block(path.read_bytes(), sequences=(100, 100)) for path in (spec_hive, after))
    assert bins_size_of(grown) > bins_size_of(before)
    return before, grown


def assert_replayed_to(replay: regf.Replay, after: Path) -> None:
    """The replayed hive holds the hive bins data of the hive at ``after``, its base block is consistent
    (sequence numbers equal, checksum valid, a primary file) and hivexml reads it as it reads ``after``,
    and as ours does."""
    expected = after.read_bytes()
    size = bins_size_of(expected)
    assert bins_size_of(replay.data) == size
    assert replay.data[4096:4096 + size] == expected[4096:4096 + size]
    assert sequences_of(replay.data) == (replay.sequence, replay.sequence)
    assert struct.unpack_from("<I", replay.data, 508)[0] == xor_checksum(replay.data)
    assert struct.unpack_from("<I", replay.data, 28)[0] == 0
    replayed = after.with_name("replayed")
    replayed.write_bytes(replay.data)
    theirs = hivexml_tree(replayed)
    assert theirs == hivexml_tree(after)
    assert_matches_hivexml(Hive(bytes(replay.data)), theirs)


def test_marvin32_published_vectors() -> None:
    """The Marvin32 test vectors of .NET's MarvinTests (dotnet/corefx; seed 0x004FB61A001BDBCC)."""
    vectors = {"": 0x30ED35C100CD3C7D, "af": 0x48E73FC77D75DDC1, "e70f": 0xB5F6E1FC485DBFF8,
               "37f495": 0xF0B07C789B8CF7E8, "8642dc59": 0x7008F2E87E9CF556, "153fb79826": 0xE6C08C6DA2AFA997,
               "0932e6246c47": 0x6F04BF1A5EA24060, "ab427ea8d10fc7": 0xE11847E4F0678C41}
    for data, expected in vectors.items():
        assert regf.marvin32(bytes.fromhex(data), 0x004FB61A001BDBCC) == expected, data


def test_new_format_logs_replayed_in_sequence_order(changed_hive: tuple[bytes, bytes], tmp_path: Path) -> None:
    """The changes split over two entries in two logs, .LOG2 holding the older one (the logs take turns);
    both write one page, the older entry a draft of it. .LOG1 also holds a stale entry after its own,
    which must not be applied. Replayed in sequence order the hive is the one hivexsh wrote."""
    before, after = changed_hive
    after_path = tmp_path / "after"
    after_path.write_bytes(after)
    first, second = sequences_of(before)
    size = bins_size_of(after)
    pages = changed_blocks(before, after, 4096)
    assert len(pages) >= 2
    shared, *rest = pages
    draft = (shared[0], bytes(len(shared[1])))
    older = log_entry(second + 1, size, [draft, *rest[: len(rest) // 2]])
    newer = log_entry(second + 2, size, [shared, *rest[len(rest) // 2:]])
    stale = log_entry(second - 3, size, [draft])
    logs = {"SYSTEM.LOG1": new_format_log(after, second + 2, [newer, stale]),
            "SYSTEM.LOG2": new_format_log(after, second + 1, [older])}
    replay = regf.replay_logs(mid_write(before), logs, 1 << 20)
    assert (replay.sequence, replay.logs) == (second + 2, ("SYSTEM.LOG2", "SYSTEM.LOG1"))
    assert replay.pages == len(pages) + 1
    assert_replayed_to(replay, after_path)
    hive = Hive(bytes(replay.data))
    assert not hive.dirty and hive.open("ControlSet001\\Services\\viostor").data("Start") == 0
    assert hive.open("Grown").data("Blob") == bytes(i % 251 for i in range(3000))
    # a torn base block (wrong checksum) comes from the log with the newest entries, and only that log is used
    torn = bytearray(mid_write(before))
    torn[200] ^= 0xFF
    replay = regf.replay_logs(bytes(torn), {"SYSTEM.LOG1": new_format_log(after, second + 1, [older, newer])},
                              1 << 20)
    assert replay.sequence == second + 2
    assert_replayed_to(replay, after_path)


def test_old_format_log_replayed(changed_hive: tuple[bytes, bytes], tmp_path: Path) -> None:
    """A base block copy, the dirty vector and the 512-byte dirty pages (Windows up to 8): the hive
    hivexsh wrote. A .LOG2 caught mid-write (its sequence numbers differ) is not used."""
    before, after = changed_hive
    after_path = tmp_path / "after"
    after_path.write_bytes(after)
    _first, second = sequences_of(before)
    pages = changed_blocks(before, after, 512)
    log = old_format_log(after, second + 1, pages)
    torn = with_base_block(old_format_log(after, second + 1, [(at, bytes(512)) for at, _ in pages])[:512],
                           sequences=(second + 2, second + 1)) + log[512:]
    replay = regf.replay_logs(mid_write(before), {"SYSTEM.LOG1": log, "SYSTEM.LOG2": torn}, 1 << 20)
    assert (replay.sequence, replay.logs, replay.pages) == (second + 1, ("SYSTEM.LOG1",), len(pages))
    assert_replayed_to(replay, after_path)


# -- transaction logs: hostile ---------------------------------------------------------------------------


def test_hostile_logs_end_in_logs_not_usable(changed_hive: tuple[bytes, bytes]) -> None:
    before, after = changed_hive
    _first, second = sequences_of(before)
    size = bins_size_of(after)
    primary = mid_write(before)
    pages = changed_blocks(before, after, 4096)
    good = log_entry(second + 1, size, pages)

    def new(*entries: bytes, sequence: int = second + 1) -> dict[str, bytes]:
        return {"SYSTEM.LOG1": new_format_log(after, sequence, list(entries))}

    def patched(entry: bytes, offset: int, fmt: str, value: int) -> bytes:
        changed = bytearray(entry)
        struct.pack_into(fmt, changed, offset, value)
        return bytes(changed)

    flipped = bytearray(good)
    flipped[-1] ^= 1
    not_continuing = "no log entry continues the hive"
    cases: dict[str, tuple[dict[str, bytes], str]] = {
        "no logs": ({}, "no transaction log"),
        "a page outside the hive": (new(log_entry(second + 1, size, [(size, bytes(4096))])), not_continuing),
        "a page past 4 GiB": (new(log_entry(second + 1, size, [(0xFFFFF000, bytes(4096))])), not_continuing),
        "a bad hash": (new(bytes(flipped)), not_continuing),
        "a size not in sectors": (new(patched(good, 4, "<I", len(good) + 1)), not_continuing),
        "a size past the log": (new(patched(good, 4, "<I", 0xFFFFFE00)), not_continuing),
        "4 billion pages": (new(log_entry(second + 1, size, [])[:20] + struct.pack("<I", 0xFFFFFFFF)
                                + log_entry(second + 1, size, [])[24:]), not_continuing),
        "a 4 GiB hive": (new(log_entry(second + 1, 0xFFFFF000, pages)), not_continuing),
        "bins not in hive bins": (new(log_entry(second + 1, size + 512, pages)), not_continuing),
        "an entry older than the hive": (new(log_entry(second - 1, size, pages), sequence=second - 1),
                                         not_continuing),
        "a log whose own sequence no entry has": (new(good, sequence=second + 5), not_continuing),
        "a wrong checksum": ({"SYSTEM.LOG1": new_format_log(after, second + 1, [good])[:508] + b"\0\0\0\0"
                              + new_format_log(after, second + 1, [good])[512:]}, "checksum"),
        "a log caught mid-write": ({"SYSTEM.LOG1": with_base_block(new_format_log(after, second + 1, [good]),
                                                                   sequences=(second + 2, second + 1))},
                                   "was being written"),
        "not a log": ({"SYSTEM.LOG1": with_base_block(new_format_log(after, second + 1, [good]), file_type=0)},
                      "is not a transaction log"),
        "too short": ({"SYSTEM.LOG1": b"regf"}, "too small"),
        "every page dirty, few stored": ({"SYSTEM.LOG1": old_format_log(after, second + 1, [])[:1024]
                                          .replace(b"DIRT" + bytes(4), b"DIRT" + b"\xff" * 4)}, "dirty pages"),
        "no dirty vector": ({"SYSTEM.LOG1": with_base_block(after[:512], file_type=1, sequences=(9, 9))
                             + bytes(4096)}, "no dirty vector"),
        "an old log claiming a 4 GiB hive": ({"SYSTEM.LOG1": with_base_block(
            patched(old_format_log(after, second + 1, []), 40, "<I", 0xFFFFF000)[:512]) + bytes(1024)},
            "more than the"),
    }
    for name, (logs, message) in cases.items():
        with pytest.raises(LogsNotUsable, match=message):
            regf.replay_logs(primary, logs, 1 << 20)
            pytest.fail(name)
    # one entry repeated 1000 times (a sequence that loops): applied once, the rest ignored, in one pass
    looping = regf.replay_logs(primary, new(*[good] * 1000), 1 << 20)
    assert looping.sequence == second + 1 and looping.pages == len(pages)
    # an old log's page that starts a hive bin naming another offset ends the replay there
    bogus = [(0, struct.pack("<4sII", b"hbin", 4096, 4096) + bytes(500))]
    stopped = regf.replay_logs(primary, {"SYSTEM.LOG1": old_format_log(after, second + 1, bogus)}, 1 << 20)
    assert stopped.pages == 0 and stopped.data[4096:4096 + len(before) - 4096] == before[4096:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_logs_replay_or_are_not_usable(changed_hive: tuple[bytes, bytes], data: st.DataObject) -> None:
    """Whatever bytes the logs hold: a replayed hive within the size cap, or LogsNotUsable."""
    before, after = changed_hive
    _first, second = sequences_of(before)
    pages = changed_blocks(before, after, 4096)
    logs = {"SYSTEM.LOG1": bytearray(new_format_log(after, second + 1, [log_entry(second + 1, bins_size_of(after),
                                                                                  pages)])),
            "SYSTEM.LOG2": bytearray(old_format_log(after, second + 1, changed_blocks(before, after, 512)))}
    for name, log in logs.items():
        for _ in range(data.draw(st.integers(0, 4), label=f"{name} changes")):
            # mostly in the base block and the entry or vector header, where the sizes and offsets are
            offset = data.draw(st.one_of(st.integers(0, 600), st.integers(0, len(log) - 4)), label="offset")
            log[offset:offset + 4] = data.draw(st.binary(min_size=4, max_size=4), label="bytes")
    cap = 4096 + bins_size_of(after) + data.draw(st.sampled_from([0, 4096, 1 << 20]), label="room")
    try:
        replay = regf.replay_logs(mid_write(before), {name: bytes(log) for name, log in logs.items()}, cap)
    except LogsNotUsable:
        return
    assert len(replay.data) <= max(cap, len(before))
    assert sequences_of(replay.data) == (replay.sequence, replay.sequence)


# -- real hives: the corpus (regipy's test data) ---------------------------------------------------------


def computer_name(hive: Hive) -> str | int | list[str] | bytes | None:
    control_set = hive.current_control_set()
    assert control_set is not None
    return hive.open(f"{control_set.name}\\Control\\ComputerName\\ComputerName").data("ComputerName")


def services(hive: Hive) -> dict[str, Key]:
    control_set = hive.current_control_set()
    assert control_set is not None
    return {key.name.casefold(): key for key in hive.open(f"{control_set.name}\\Services").subkeys()}


def test_windows7_system_reads_as_the_manifest_says(regipy_hives: Path) -> None:
    hive = Hive((regipy_hives / "SYSTEM").read_bytes())
    assert not hive.dirty and hive.open("Select").data("Current") == 1
    assert computer_name(hive) == "WKS-WIN732BITA"
    found = services(hive)
    assert len(found) == 467 and not {"viostor", "vioscsi", "stornvme"} & set(found)
    starts = {name: found[name.casefold()].data("Start") for name in ("atapi", "intelide", "LSI_SAS", "msahci",
                                                                     "iaStorV", "pciide")}
    assert starts == {"atapi": 0, "intelide": 0, "LSI_SAS": 0, "msahci": 3, "iaStorV": 3, "pciide": 3}


def test_bcd_store_reads_like_hivexml(regipy_hives: Path) -> None:
    hive = Hive((regipy_hives / "BCD").read_bytes())
    assert not hive.dirty and hive.minor_version == 3
    assert_matches_hivexml(hive, hivexml_tree(regipy_hives / "BCD"))


def test_dirty_windows10_system_replayed_from_its_logs(regipy_hives: Path, tmp_path: Path) -> None:
    """The hive as Windows 10 left it (sequence 1622/1621) with the two logs it wrote: replayed, its base
    block is consistent, hivexml reads our bytes as we do, the logs changed some keys, and what they did
    not touch still reads as hivexsh read the base file (the MANIFEST's facts)."""
    base = (regipy_hives / "SYSTEM_B").read_bytes()
    hive = Hive(base)
    assert hive.dirty and (hive.primary_sequence, hive.secondary_sequence) == (1622, 1621)
    logs = {name: (regipy_hives / f"SYSTEM_B.{name}").read_bytes() for name in ("LOG1", "LOG2")}
    replay = regf.replay_logs(base, logs, 512 << 20)
    # the logs' own headers say which holds the older entries: LOG1 (from 2107) before LOG2 (from 2111)
    assert [sequences_of(logs[name])[0] for name in ("LOG1", "LOG2")] == [2107, 2111]
    assert replay.logs == ("LOG1", "LOG2") and replay.sequence > 2111
    first, second = sequences_of(replay.data)
    assert first == second and struct.unpack_from("<I", replay.data, 508)[0] == xor_checksum(replay.data)
    replayed_path = tmp_path / "SYSTEM.replayed"
    replayed_path.write_bytes(replay.data)
    replayed = Hive(bytes(replay.data))
    assert not replayed.dirty
    after = hivexml_tree(replayed_path)
    assert_matches_hivexml(replayed, after)
    before = hivexml_tree(regipy_hives / "SYSTEM_B")
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    assert changed, "the logs hold newer data"
    services_key = "controlset001\\services\\"
    assert sum(path.startswith(services_key) and "\\" not in path[len(services_key):] for path in before) == 655
    found = services(replayed)
    assert len(found) == sum(path.startswith(services_key) and "\\" not in path[len(services_key):]
                             for path in after)
    for hive_read in (hive, replayed):
        assert computer_name(hive_read) == "DESKTOP-PM6C56D"
        assert not {"viostor", "vioscsi"} & set(services(hive_read))
        assert {name: services(hive_read)[name].data("Start") for name in ("stornvme", "storahci", "atapi")} == {
            "stornvme": 0, "storahci": 0, "atapi": 0}
    assert "controlset001\\control\\computername\\computername" not in changed


def regipy_python() -> str | None:
    """An interpreter that imports regipy (MIT licence; a test oracle here, never a dependency of diskimg):
    $DISKIMG_REGIPY_PYTHON (e.g. a throwaway venv's python), else this one."""
    for python in filter(None, (os.environ.get("DISKIMG_REGIPY_PYTHON"), sys.executable)):
        if subprocess.run([python, "-c", "import regipy.recovery"], capture_output=True).returncode == 0:
            return python
    return None


def test_replay_matches_regipy(regipy_hives: Path, tmp_path: Path) -> None:
    """regipy's recovery writes the same hive bins data. regipy applies the logs in the order it is given
    them, its second log first: it is given the log with the newer entries first."""
    python = regipy_python()
    if python is None:
        pytest.skip("regipy is not installed (set DISKIMG_REGIPY_PYTHON to a python that has it)")
    theirs = tmp_path / "SYSTEM_B.regipy"
    subprocess.run([python, "-c", "import sys; from regipy.recovery import apply_transaction_logs as apply; "
                    "apply(*sys.argv[1:])", regipy_hives / "SYSTEM_B", regipy_hives / "SYSTEM_B.LOG2",
                    regipy_hives / "SYSTEM_B.LOG1", theirs], check=True, capture_output=True)
    logs = {name: (regipy_hives / f"SYSTEM_B.{name}").read_bytes() for name in ("LOG1", "LOG2")}
    replay = regf.replay_logs((regipy_hives / "SYSTEM_B").read_bytes(), logs, 512 << 20)
    recovered = theirs.read_bytes()
    size = bins_size_of(replay.data)
    assert len(recovered) >= 4096 + size
    assert replay.data[4096:4096 + size] == recovered[4096:4096 + size]
