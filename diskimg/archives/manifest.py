"""The export manifest, ``NAME.manifest.json``: written by ``export``, read by ``verify`` and ``unpack``.

One module holds the format and its limits, so that the command writing a manifest and the two
reading it agree on what a manifest is. A manifest read back is untrusted like the archives it
names: it is read only up to ``MAX_BYTES``, its JSON nesting is measured before the JSON is parsed
(a deeply nested document must not exhaust the parser's recursion), it lists at most ``MAX_DISKS``
disks, every field is type-checked, and every file it names must be a plain name whose real path
(symbolic links resolved) lies in the manifest's own folder.

The export's sums file, ``NAME.SHA256SUMS`` (``sha256sum -c`` format), is named after the export
like the manifest, so that several exports can share a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..conversion.hashing import PREFIX as CONTENT_HASH_PREFIX
from ..errors import ArchiveError, ImageNotFound
from ..formats import WRITERS
from ..host.files import confined_path, open_input
from ..jsonlimits import nesting

SUFFIX = ".manifest.json"
SUMS_SUFFIX = ".SHA256SUMS"
#: a manifest of MAX_DISKS disks with long source paths is well under this
MAX_BYTES = 1 << 20
#: disks one manifest may list (a machine has a system disk and at most a few dozen data disks)
MAX_DISKS = 64
#: JSON nesting a manifest may have (it has 3: the document, its disk list, each disk)
MAX_DEPTH = 16
_MAX_NAME = 255  # bytes of a file name on common file systems

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_HASH = re.compile(re.escape(CONTENT_HASH_PREFIX) + "[0-9a-f]{64}")
_DECIMAL = re.compile(r"[0-9]{1,20}")


@dataclass
class ExportedDisk:
    """One disk of the set, as the manifest records it."""

    role: str  # "system" or "data" ("" when a hand-written manifest omits it)
    device: str
    file: str  # the archive (or bare disk file), a plain name in the manifest's folder
    size: int  # of the file
    sha256: str
    #: CRC-64/XZ of the file as OSS reports it (unsigned decimal); None where not computed
    crc64ecma: str | None
    member: str | None  # the tar member's name; None for a bare disk file
    format: str
    virtual_size: int
    content_hash: str | None  # the guest content hash (hashing.py); None when a manifest omits it
    source: str
    source_format: str
    #: whether ``--sparsify`` left out what the guest's file systems do not use (the disk then reads
    #: zeros there: its content hash is of what was written); False in manifests written before the key
    sparsified: bool = False


@dataclass
class Manifest:
    name: str
    layout: str
    archive: str
    tool: str
    version: str
    created: str
    disks: list[ExportedDisk]
    #: the manifest file this was read from ("" for one being written)
    path: str = field(default="", compare=False)

    def to_json(self) -> str:
        document = asdict(self)
        del document["path"]
        return json.dumps(document, indent=2) + "\n"

    def sums(self) -> str:
        """The ``NAME.SHA256SUMS`` text: one ``sha256sum`` line per file."""
        return "".join(f"{disk.sha256}  {disk.file}\n" for disk in self.disks)

    def locate(self, disk: ExportedDisk) -> str:
        """The real path of a disk's file, which must lie in the manifest's folder (a file name that is
        a symbolic link leading out of it is refused, as backing files are)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        located = confined_path(directory, disk.file, [os.path.realpath(directory)])
        if located is None:
            raise ArchiveError(f"{disk.file!r} is a symbolic link leading out of the manifest's folder: refused",
                               path=self.path)
        return located


def names_manifest(path: str) -> bool:
    """Whether ``path`` is given as a manifest rather than an archive: a ``.json`` name, or a file
    whose first bytes open a JSON object (a manifest renamed); reading it then checks it."""
    if path.lower().endswith(".json"):
        return True
    with contextlib.suppress(OSError, ImageNotFound), open_input(path) as f:
        return f.read(64).lstrip().startswith(b"{")
    return False


def read_manifest(path: str) -> Manifest:
    """The manifest at ``path``, checked (see the module docstring); every file it names is located
    at once, so a manifest pointing outside its folder is refused before anything is read."""
    try:
        with open_input(path) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ArchiveError(f"cannot read the manifest: {exc.strerror}", path=path) from None
    manifest = parse_manifest(data, path)
    for disk in manifest.disks:
        manifest.locate(disk)
    return manifest


def parse_manifest(data: bytes, path: str) -> Manifest:
    """The manifest in ``data`` (read from ``path``, named in errors), checked against the caps
    and types; raises ArchiveError naming what is wrong."""
    if len(data) > MAX_BYTES:
        raise ArchiveError(f"a manifest larger than {MAX_BYTES >> 20} MiB: not an export manifest", path=path)
    if nesting(data) > MAX_DEPTH:
        raise ArchiveError(f"JSON nested deeper than {MAX_DEPTH} levels: not an export manifest", path=path)
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"cannot read the manifest: not JSON ({exc})", path=path) from None
    disks = document.get("disks") if isinstance(document, dict) else None
    if not isinstance(disks, list) or not 1 <= len(disks) <= MAX_DISKS:
        raise ArchiveError(f"not an export manifest: a 'disks' list of 1 to {MAX_DISKS} entries is needed",
                           path=path)
    parsed = [_disk(entry, number, path) for number, entry in enumerate(disks)]
    files = [disk.file for disk in parsed]
    if len(set(files)) != len(files):
        twice = next(name for name in files if files.count(name) > 1)
        raise ArchiveError(f"the manifest lists {twice!r} more than once", path=path)
    text = {key: _optional(document, key, str, "", -1, path) for key in
            ("name", "layout", "archive", "tool", "version", "created")}
    return Manifest(**text, disks=parsed, path=path)


def _disk(entry: Any, number: int, path: str) -> ExportedDisk:
    if not isinstance(entry, dict):
        raise ArchiveError(f"disk {number} of the manifest is not an object", path=path)
    file = entry.get("file")
    if not (isinstance(file, str) and file not in ("", ".", "..") and "/" not in file and "\\" not in file
            and "\0" not in file and len(file.encode("utf-8", "surrogatepass")) <= _MAX_NAME):
        raise ArchiveError(f"disk {number} of the manifest: 'file' must be a file name beside the manifest, "
                           f"not {file!r}", path=path)
    sha256 = entry.get("sha256")
    if not (isinstance(sha256, str) and _HEX64.fullmatch(sha256.lower())):
        raise ArchiveError(f"disk {number} of the manifest: 'sha256' is not a SHA-256 digest", path=path)
    content_hash = _optional(entry, "content_hash", str, None, number, path)
    if content_hash is not None and not _CONTENT_HASH.fullmatch(content_hash):
        raise ArchiveError(f"disk {number} of the manifest: 'content_hash' is not a guest content hash "
                           f"({CONTENT_HASH_PREFIX} and 64 hex digits)", path=path)
    crc = _optional(entry, "crc64ecma", str, None, number, path)
    if crc is not None and not _DECIMAL.fullmatch(crc):
        raise ArchiveError(f"disk {number} of the manifest: 'crc64ecma' is not a decimal number", path=path)
    fmt = entry.get("format")
    if fmt not in WRITERS:
        raise ArchiveError(f"disk {number} of the manifest: 'format' must be one of {', '.join(WRITERS)}, "
                           f"not {fmt!r}", path=path)
    return ExportedDisk(
        role=_optional(entry, "role", str, "", number, path),
        device=_optional(entry, "device", str, "", number, path),
        file=file, size=_size(entry, "size", number, path), sha256=sha256.lower(), crc64ecma=crc,
        member=_optional(entry, "member", str, None, number, path), format=fmt,
        virtual_size=_size(entry, "virtual_size", number, path), content_hash=content_hash,
        source=_optional(entry, "source", str, "", number, path),
        source_format=_optional(entry, "source_format", str, "", number, path),
        sparsified=_optional(entry, "sparsified", bool, False, number, path),
    )


def _size(entry: dict[str, Any], key: str, number: int, path: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ArchiveError(f"disk {number} of the manifest: {key!r} must be a number of bytes, not {value!r}",
                           path=path)
    return value


def _optional(entry: dict[str, Any], key: str, kind: type, default: Any, number: int, path: str) -> Any:
    """``entry[key]`` when present and not null, checked to be a ``kind``; else ``default``."""
    value = entry.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        where = "the manifest" if number < 0 else f"disk {number} of the manifest"
        raise ArchiveError(f"{where}: {key!r} must be a {kind.__name__}, not {str(value)[:80]!r}", path=path)
    return value
