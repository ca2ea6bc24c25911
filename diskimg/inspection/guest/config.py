"""Small, tolerant parsers of Linux configuration files, pure functions over text.

Each takes the text of one file (already read, with a size cap, by the inspector) and returns plain
values; malformed lines are skipped, never raised on: a guest file is untrusted input, and a broken
line must not hide the rest of the file. Every parser reads its text through :func:`config_lines`,
which caps the file's size and the length of a line, and no pattern here can backtrack more than
linearly (no two adjacent repeats that can match the same characters), so a hostile file costs time
in proportion to its size.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: characters of a configuration file parsed (the rest is ignored)
MAX_CONFIG = 4 << 20
#: characters of one line; a longer line is skipped as malformed (a kernel command line, the longest
#: thing in these files, is at most 4096 bytes)
MAX_LINE = 8192


def config_lines(text: str) -> list[str]:
    """The lines of the first MAX_CONFIG characters of ``text``; a line longer than MAX_LINE is read as
    an empty one (skipped, and the lines after it keep their numbers)."""
    return [line if len(line) <= MAX_LINE else "" for line in text[:MAX_CONFIG].splitlines()]


# -- shell-style KEY=value files (os-release, ifcfg, /etc/default/grub, selinux, lsb-release) ---------


def _unquote(value: str) -> str:
    value = value.strip()
    try:
        parts = shlex.split(value, comments=True)
    except ValueError:
        return value.strip("'\"")
    return " ".join(parts)


def parse_shell_vars(text: str) -> dict[str, str]:
    """``KEY=value`` lines as a shell would read them (quotes removed, comments and other lines ignored)."""
    found: dict[str, str] = {}
    for line in config_lines(text):
        line = line.strip()
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            found[key] = _unquote(value)
    return found


# -- /etc/fstab -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FstabEntry:
    spec: str  # UUID=..., LABEL=..., /dev/sda1, tmpfs...
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    line: int

    @property
    def nofail(self) -> bool:
        return "nofail" in self.options or "noauto" in self.options

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "mountpoint": self.mountpoint, "fstype": self.fstype,
                "options": ",".join(self.options), "line": self.line}


def _fstab_unescape(field_text: str) -> str:
    """fstab writes spaces and tabs in names as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_fstab(text: str) -> list[FstabEntry]:
    entries = []
    for number, line in enumerate(config_lines(text), start=1):
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3:
            continue
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ("defaults",)
        entries.append(FstabEntry(_fstab_unescape(fields[0]), _fstab_unescape(fields[1]), fields[2], options, number))
    return entries


# -- GRUB 2: grub.cfg menu entries, grubenv, BLS entries ------------------------------------------------


@dataclass
class BootEntry:
    """One boot menu entry: where it came from, its kernel, initrds and command line."""

    title: str
    id: str | None = None
    linux: str | None = None
    initrd: list[str] = field(default_factory=list)
    options: str = ""
    source: str = ""
    #: the grub device the paths are relative to (``search --fs-uuid --set=root X``), as "UUID=X"
    search_root: str | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "id": self.id, "linux": self.linux, "initrd": list(self.initrd),
                "options": self.options, "source": self.source, "version": self.version}


@dataclass
class GrubConfig:
    entries: list[BootEntry]
    #: the value of the last top-level ``set default=...``, None when absent
    default: str | None
    #: the file loads BLS snippets (``blscfg``, RHEL 8+ and Fedora)
    uses_blscfg: bool = False


def _grub_words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return line.split()


def _grub_statements(text: str) -> Iterator[str]:
    """Statements, one per line: lines are split after an unquoted '{', around '}' and at ';', so
    that one-line entries (``menuentry 'x' { linux /vmlinuz }``) read like multi-line ones."""
    for line in config_lines(text):
        piece, quote = "", ""
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
                piece += ch
            elif ch in "'\"":
                quote = ch
                piece += ch
            elif ch == "#" and not piece.strip():
                break
            elif ch == "{":
                yield (piece + ch).strip()
                piece = ""
            elif ch in "};":
                if piece.strip():
                    yield piece.strip()
                if ch == "}":
                    yield "}"
                piece = ""
            else:
                piece += ch
        if piece.strip():
            yield piece.strip()


def parse_grub_cfg(text: str, source: str = "grub.cfg") -> GrubConfig:
    """Menu entries (with submenus' titles joined by '>', as GRUB_DEFAULT names them) and the default."""
    entries: list[BootEntry] = []
    default: str | None = None
    uses_blscfg = False
    menus: list[str] = []  # titles of the open submenus
    blocks: list[str] = []  # "submenu", "entry" or "other" for each open '{'
    current: BootEntry | None = None
    search_root: str | None = None
    for line in _grub_statements(text):
        words = _grub_words(line)
        if not words:
            continue
        head = words[0]
        if head in ("menuentry", "submenu"):
            title = words[1] if len(words) > 1 else ""
            ident = None
            for i, word in enumerate(words):
                if word.startswith("--id="):
                    ident = word[5:]
                elif word in ("--id", "$menuentry_id_option") and i + 1 < len(words):
                    ident = words[i + 1]
            if head == "submenu":
                menus.append(title)
                blocks.append("submenu")
            else:
                current = BootEntry(title=">".join([*menus, title]), id=ident, source=source,
                                    search_root=search_root)
                blocks.append("entry")
            continue
        if line.endswith("{") and head not in ("menuentry", "submenu"):
            blocks.append("other")  # if/function blocks
            continue
        if head == "}":
            if blocks:
                kind = blocks.pop()
                if kind == "submenu" and menus:
                    menus.pop()
                elif kind == "entry" and current is not None:
                    entries.append(current)
                    current = None
            continue
        if head == "fi" and blocks and blocks[-1] == "other":
            blocks.pop()
            continue
        if head in ("if", "for", "while", "function") and not line.endswith("{"):
            if head != "function":
                blocks.append("other")
            continue
        if head in ("done",) and blocks and blocks[-1] == "other":
            blocks.pop()
            continue
        if head == "blscfg":
            uses_blscfg = True
        elif head == "search" and ("--set=root" in words or "--set" in words):
            by = "UUID" if any(w in ("--fs-uuid", "-u") for w in words) else (
                "LABEL" if any(w in ("--label", "-l") for w in words) else None)
            target = [w for w in words[1:] if not w.startswith("-") and w != "root"]
            if by and target:
                if current is not None:
                    current.search_root = f"{by}={target[-1]}"
                else:
                    search_root = f"{by}={target[-1]}"
        elif current is not None and head in ("linux", "linux16", "linuxefi", "kernel"):
            if len(words) > 1:
                current.linux = words[1]
                current.options = " ".join(words[2:])
        elif current is not None and head in ("initrd", "initrd16", "initrdefi"):
            current.initrd.extend(words[1:])
        elif head == "set" and len(words) > 1 and words[1].startswith("default=") and current is None:
            default = words[1][len("default="):]
    return GrubConfig(entries, default, uses_blscfg)


def grub_legacy_default(text: str) -> str:
    """The entry GRUB legacy's menu.lst boots (``default N`` or ``default=N``; "0" when unsaid)."""
    for line in config_lines(text):
        match = re.match(r"[ \t]*default[ \t]*(?:=[ \t]*)?(\d+)", line)
        if match:
            return match.group(1)
    return "0"


def parse_grubenv(text: str) -> dict[str, str]:
    """The environment block: ``# GRUB Environment Block`` then ``key=value`` lines, '#' padding."""
    found = {}
    for line in config_lines(text):
        if line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep and key:
            found[key] = value
    return found


def parse_bls_entry(text: str, source: str) -> BootEntry:
    """A Boot Loader Specification entry: ``key value`` lines (title, version, linux, initrd, options)."""
    values: dict[str, list[str]] = {}
    for line in config_lines(text):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value.strip())
    name = source.rsplit("/", 1)[-1]
    ident = name[:-5] if name.endswith(".conf") else name

    def first(key: str) -> str | None:
        return values[key][0] if values.get(key) else None

    return BootEntry(
        title=first("title") or ident,
        id=ident,
        linux=first("linux"),
        initrd=[path for value in values.get("initrd", []) for path in value.split()],
        options=" ".join(values.get("options", [])),
        source=source,
        version=first("version"),
    )


def version_sort_key(text: str) -> list[tuple[int, int | str]]:
    """A sort key like rpm's version comparison: digit runs compare as numbers, above letter runs."""
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.findall(r"\d+|[A-Za-z]+", text)]


def sort_bls_entries(entries: list[BootEntry]) -> list[BootEntry]:
    """The order GRUB's blscfg shows them in: newest version (or id) first."""
    return sorted(entries, key=lambda e: version_sort_key(e.version or e.id or ""), reverse=True)


def expand_grub_vars(text: str, env: dict[str, str]) -> str:
    """``$name`` and ``${name}`` replaced from the grub environment (unknown names become empty)."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), text).strip()


def kernel_arg(cmdline: str, name: str) -> str | None:
    """The value of the last ``name=value`` argument of a kernel command line."""
    value = None
    for word in cmdline.split():
        key, sep, rest = word.partition("=")
        if key == name and sep:
            value = rest
    return value


#: kernel arguments that boot systemd (or SysV init) into rescue or emergency mode, a console only
#: (systemd's kernel-command-line(7); the runlevel words come from SysV init)
RECOVERY_ARGUMENTS = frozenset({"single", "s", "S", "1", "rescue", "rd.rescue", "emergency", "rd.emergency", "-b",
                                "systemd.unit=rescue.target", "systemd.unit=emergency.target",
                                "rd.systemd.unit=rescue.target", "rd.systemd.unit=emergency.target"})


def recovery_arguments(cmdline: str) -> list[str]:
    """The arguments of a kernel command line that boot into rescue or emergency mode."""
    return [word for word in cmdline.split() if word in RECOVERY_ARGUMENTS]


def choose_default(entries: list[BootEntry], default: str | None) -> BootEntry | None:
    """The entry GRUB boots: ``default`` is an index, a title (submenus joined by '>'), or an id."""
    if not entries:
        return None
    if default in (None, ""):
        return entries[0]
    assert default is not None
    if re.fullmatch(r"\d+(>\d+)*", default):
        # indexes count the items of each menu level, submenus included ("1>2": 3rd entry of the 2nd item)
        prefix = ""
        for index in map(int, default.split(">")):
            level = [e.title[len(prefix):].split(">")[0] for e in entries if e.title.startswith(prefix)]
            items = list(dict.fromkeys(level))
            if index >= len(items):
                return None
            prefix += items[index] + ">"
        title = prefix[:-1]
        return next((e for e in entries if e.title == title), None)
    for entry in entries:
        if default in (entry.title, entry.id):
            return entry
    last = default.split(">")[-1]
    for entry in entries:
        if last in (entry.title.split(">")[-1], entry.id):
            return entry
    return None


# -- network ----------------------------------------------------------------------------------------


@dataclass
class Interface:
    """One configured network interface, whatever tool configures it."""

    name: str | None
    source: str
    #: "dhcp", "static", "auto" (SLAAC/link-local only), "manual", "disabled", or None if unsaid
    ipv4: str | None = None
    ipv6: str | None = None
    mac: str | None = None
    enabled: bool = True
    #: the program that wrote the file and rewrites it at boot ("cloud-init"), None for a hand-written one
    generator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "ipv4": self.ipv4, "ipv6": self.ipv6, "mac": self.mac,
                "enabled": self.enabled, "generator": self.generator}


#: what cloud-init writes at the top of the network files it renders (netplan, ENI, sysconfig)
_CLOUD_INIT_HEADERS = ("generated from information provided by the datasource", "created by cloud-init")


def network_file_generator(path: str, text: str) -> str | None:
    """"cloud-init" for a network file cloud-init renders (50-cloud-init.yaml, interfaces.d/50-cloud-init,
    cloud-init-eth0.nmconnection, 10-cloud-init-eth0.network, or an ifcfg-* with its header), else None."""
    if "cloud-init" in path.rsplit("/", 1)[-1]:
        return "cloud-init"
    comments = " ".join(line.lstrip("#").strip() for line in config_lines(text)[:10] if line.startswith("#"))
    return "cloud-init" if any(header in comments.lower() for header in _CLOUD_INIT_HEADERS) else None


def parse_ifcfg(text: str, source: str) -> Interface | None:
    """RHEL ``ifcfg-*`` (network-scripts) and SUSE ``ifcfg-*`` (wicked): BOOTPROTO, HWADDR, ONBOOT."""
    values = parse_shell_vars(text)
    name = values.get("DEVICE") or values.get("NAME") or source.rsplit("ifcfg-", 1)[-1]
    if name == "lo":
        return None
    proto = values.get("BOOTPROTO", "").lower()
    ipv4: str | None
    if proto.startswith("dhcp"):
        ipv4 = "dhcp"
    elif proto in ("static", "none") and (values.get("IPADDR") or any(k.startswith("IPADDR") for k in values)):
        ipv4 = "static"
    elif proto in ("static", "none", ""):
        ipv4 = "static" if values.get("IPADDR") else ("manual" if proto else None)
    else:
        ipv4 = proto
    ipv6 = "static" if values.get("IPV6ADDR") else ("dhcp" if values.get("DHCPV6C", "").lower() == "yes" else None)
    onboot = values.get("ONBOOT", values.get("STARTMODE", "yes")).lower()
    return Interface(name, source, ipv4, ipv6, values.get("HWADDR") or values.get("MACADDR") or values.get("LLADDR"),
                     onboot not in ("no", "off", "manual"))


def parse_ini(text: str) -> dict[str, dict[str, str]]:
    """INI sections (NetworkManager keyfiles, systemd .network): later keys win, '#'/';' comments."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in config_lines(text):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), {})
            continue
        key, sep, value = line.partition("=")
        if sep and current is not None:
            current[key.strip()] = value.strip()
    return sections


def parse_nm_keyfile(text: str, source: str) -> Interface | None:
    sections = parse_ini(text)
    connection = sections.get("connection", {})
    if connection.get("type", "ethernet") not in ("ethernet", "802-3-ethernet"):
        return None
    method4 = sections.get("ipv4", {}).get("method", "auto")
    method6 = sections.get("ipv6", {}).get("method")
    ethernet = sections.get("ethernet", sections.get("802-3-ethernet", {}))
    names = {"auto": "dhcp", "manual": "static", "disabled": "disabled", "link-local": "auto", "shared": "static"}
    return Interface(connection.get("interface-name"), source, names.get(method4, method4),
                     names.get(method6, method6) if method6 else None, ethernet.get("mac-address") or None,
                     connection.get("autoconnect", "true").lower() not in ("false", "no", "0"))


def parse_networkd(text: str, source: str) -> Interface | None:
    sections = parse_ini(text)
    match = sections.get("Match", {})
    network = sections.get("Network", {})
    name = match.get("Name")
    if name in ("lo",):
        return None
    dhcp = network.get("DHCP", "no").lower()
    addresses = [a for a in [network.get("Address")] + [s.get("Address") for k, s in sections.items()
                                                       if k == "Address"] if a]
    static4 = any(":" not in a for a in addresses)
    static6 = any(":" in a for a in addresses)
    ipv4 = "dhcp" if dhcp in ("yes", "ipv4", "true") else ("static" if static4 else None)
    ipv6 = "dhcp" if dhcp in ("yes", "ipv6", "true") else ("static" if static6 else None)
    return Interface(name, source, ipv4, ipv6, match.get("MACAddress") or match.get("PermanentMACAddress"))


def parse_interfaces(text: str, source: str) -> tuple[list[Interface], list[str]]:
    """Debian ``/etc/network/interfaces``: ``iface NAME inet dhcp|static``; returns the interfaces and
    the ``source``/``source-directory`` patterns to read as well."""
    found: dict[str, Interface] = {}
    includes: list[str] = []
    auto: set[str] = set()
    current: Interface | None = None
    for line in config_lines(text):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        head = words[0]
        if head in ("source", "source-directory") and len(words) > 1:
            includes.append(words[1] + ("/*" if head == "source-directory" else ""))
            current = None
        elif head in ("auto",) or head.startswith("allow-"):
            auto.update(words[1:])
            current = None
        elif head == "iface" and len(words) >= 4:
            name, family, method = words[1], words[2], words[3]
            if name == "lo":
                current = None
                continue
            current = found.setdefault(name, Interface(name, source))
            value = {"dhcp": "dhcp", "static": "static", "manual": "manual", "auto": "auto",
                     "loopback": None}.get(method, method)
            if family == "inet":
                current.ipv4 = value
            elif family == "inet6":
                current.ipv6 = value
        elif current is not None and head in ("hwaddress",) and len(words) > 1:
            current.mac = words[-1]
    for name, interface in found.items():
        interface.enabled = name in auto
    return list(found.values()), includes


# -- a small YAML reader (netplan, cloud.cfg) ------------------------------------------------------------


def _yaml_scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if text[0] in "'\"" and text[-1] == text[0] and len(text) >= 2:
        return text[1:-1]
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_yaml_scalar(part) for part in _split_flow(inner)] if inner else []
    if text.startswith("{") and text.endswith("}"):
        result = {}
        for part in _split_flow(text[1:-1]):
            key, _, value = part.partition(":")
            result[key.strip().strip("'\"")] = _yaml_scalar(value)
        return result
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "~"):
        return None
    return text


def _split_flow(text: str) -> list[str]:
    parts, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


#: nesting levels of a YAML document read (netplan and cloud.cfg use fewer than ten)
MAX_YAML_DEPTH = 64


def parse_yaml(text: str, max_lines: int = 100_000) -> Any:
    """The block-style YAML subset configuration files use: nested mappings and ``- item`` lists with
    scalars and one-line flow collections. Anchors, multi-line strings and documents are not
    understood (their lines are taken as plain scalars or skipped): enough for netplan and cloud.cfg."""
    lines: list[tuple[int, str]] = []
    for raw in config_lines(text)[:max_lines]:
        stripped = _strip_comment(raw).rstrip()
        if stripped.strip() and stripped.strip() not in ("---", "..."):
            lines.append((len(stripped) - len(stripped.lstrip(" ")), stripped.strip()))
    value, _ = _yaml_block(lines, 0, 0)
    return value


def _yaml_block(lines: list[tuple[int, str]], index: int, indent: int, depth: int = 0) -> tuple[Any, int]:
    if index >= len(lines):
        return None, index
    if depth > MAX_YAML_DEPTH:  # read as null, with every line nested under it
        while index < len(lines) and lines[index][0] >= indent:
            index += 1
        return None, index
    if lines[index][1].startswith("- ") or lines[index][1] == "-":
        items: list[Any] = []
        block_indent = lines[index][0]
        while index < len(lines) and lines[index][0] == block_indent and (
                lines[index][1].startswith("- ") or lines[index][1] == "-"):
            rest = lines[index][1][1:].strip()
            if not rest:
                value, index = _yaml_block(lines, index + 1, block_indent + 1, depth + 1)
                items.append(value)
            elif re.match(r"[^'\"\[{][^:]*:(\s|$)", rest):
                # "- key: value" starts a mapping whose further keys are indented under the key
                lines[index] = (block_indent + 2, rest)
                value, index = _yaml_block(lines, index, block_indent + 2, depth + 1)
                items.append(value)
            else:
                items.append(_yaml_scalar(rest))
                index += 1
        return items, index
    mapping: dict[str, Any] = {}
    block_indent = lines[index][0]
    if block_indent < indent:
        return None, index
    while index < len(lines) and lines[index][0] == block_indent:
        text = lines[index][1]
        pair = _yaml_key_value(text)
        index += 1
        if pair is None:
            continue
        key, rest = pair
        if rest:
            mapping[key] = _yaml_scalar(rest)
        elif index < len(lines) and (lines[index][0] > block_indent or (
                lines[index][0] == block_indent and lines[index][1].startswith("-"))):
            mapping[key], index = _yaml_block(lines, index, block_indent + 1, depth + 1)
        else:
            mapping[key] = None
    while index < len(lines) and lines[index][0] > block_indent:
        index += 1  # deeper lines after a malformed one
    return mapping, index


def _yaml_key_value(text: str) -> tuple[str, str] | None:
    """``key: value`` (the key quoted or not; the colon followed by a space or the end) split in two,
    None for another line. Plain string searches: a line of spaces must not make a pattern backtrack."""
    start = 0
    if text[0] in "'\"":
        close = text.find(text[0], 1)
        if close > 0 and text[close + 1:].lstrip().startswith(":"):
            start = close + 1
    colon = text.find(":", start)
    if colon <= 0 or text[colon + 1: colon + 2] not in ("", " ", "\t"):
        return None
    return text[:colon].strip().strip("'\""), text[colon + 1:].strip()


def parse_netplan(text: str, source: str) -> list[Interface]:
    """netplan ``network: {ethernets: {NAME: {dhcp4, addresses, match: {macaddress}}}}``."""
    document = parse_yaml(text)
    network = document.get("network") if isinstance(document, dict) else None
    if not isinstance(network, dict):
        return []
    found = []
    for kind in ("ethernets", "bonds", "bridges", "vlans"):
        section = network.get(kind)
        if not isinstance(section, dict):
            continue
        for name, conf in section.items():
            if not isinstance(conf, dict):
                conf = {}
            addresses = conf.get("addresses") or []
            if not isinstance(addresses, list):
                addresses = [addresses]
            static4 = any(isinstance(a, str) and ":" not in a for a in addresses)
            static6 = any(isinstance(a, str) and ":" in a for a in addresses)
            match: dict[str, Any] = conf["match"] if isinstance(conf.get("match"), dict) else {}
            mac = match.get("macaddress") or conf.get("macaddress")
            ipv4 = "dhcp" if conf.get("dhcp4") is True else ("static" if static4 else None)
            ipv6 = "dhcp" if conf.get("dhcp6") is True else ("static" if static6 else None)
            # the key is an id; set-name renames the matched interface
            found.append(Interface(str(conf.get("set-name") or name), source, ipv4, ipv6, str(mac) if mac else None))
    return found


def parse_persistent_net_rules(text: str) -> list[str]:
    """MAC addresses pinned by udev rules (``ATTR{address}=="..."``)."""
    return [mac for line in config_lines(text) for mac in re.findall(r'ATTRS?\{address\}=="([^"]+)"', line)]


# -- cloud-init ------------------------------------------------------------------------------------------


def cloud_init_version(text: str) -> str | None:
    """The version from ``cloudinit/version.py`` (``__VERSION__ = "..."``) or package metadata (``Version:``)."""
    lines = config_lines(text)
    for pattern in (r"""__VERSION__\s*=\s*['"]([^'"]+)['"]""", r"^Version:\s*(\S+)"):
        match = next(filter(None, (re.search(pattern, line) for line in lines)), None)
        if match:
            return match.group(1)
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric components ("0.7.6a15" -> (0, 7, 6)), for comparisons against minimums."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def cloud_init_network_config(text: str) -> str | None:
    """``network: {config: ...}`` of a cloud.cfg file ("disabled" stops cloud-init writing the network
    configuration), None when the file does not set it."""
    document = parse_yaml(text)
    network = document.get("network") if isinstance(document, dict) else None
    value = network.get("config") if isinstance(network, dict) else None
    return str(value) if value is not None else None


def cloud_init_datasources(text: str) -> list[str] | None:
    """``datasource_list`` of a cloud.cfg file, None when the file does not set it."""
    document = parse_yaml(text)
    if not isinstance(document, dict) or "datasource_list" not in document:
        return None
    value = document["datasource_list"]
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    return [str(value)] if value else []
