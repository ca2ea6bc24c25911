"""Compare what a GuestFileSystem reads with the host tree the image was built from (the oracle)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from diskimg.inspection.fs import FileType, GuestFileSystem


def assert_tree_equal(fs: GuestFileSystem, host_root: Path, guest_root: str = "/", check_mode: bool = True,
                      ignore: frozenset[str] = frozenset({"lost+found"})) -> int:
    """Every directory, file and symlink under ``host_root`` reads back identically from ``fs``.

    Returns the number of entries compared (so a test can check it compared something)."""
    compared = 0
    for dirpath, dirnames, filenames in os.walk(host_root):
        rel = os.path.relpath(dirpath, host_root)
        guest_dir = guest_root.rstrip("/") + ("" if rel == "." else "/" + rel)
        guest_dir = guest_dir or "/"
        host_names = set(dirnames) | set(filenames)
        guest_names = set(fs.listdir(guest_dir)) - (ignore if rel == "." else set())
        assert guest_names == host_names, f"{guest_dir}: {sorted(guest_names ^ host_names)[:10]}"
        for name in sorted(host_names):
            host_path = os.path.join(dirpath, name)
            guest_path = f"{guest_dir.rstrip('/')}/{name}"
            host_stat = os.lstat(host_path)
            guest_stat = fs.stat(guest_path, follow_symlinks=False)
            compared += 1
            if stat.S_ISLNK(host_stat.st_mode):
                assert guest_stat.type is FileType.SYMLINK, guest_path
                assert fs.readlink(guest_path) == os.readlink(host_path), guest_path
            elif stat.S_ISDIR(host_stat.st_mode):
                assert guest_stat.type is FileType.DIRECTORY, guest_path
            elif stat.S_ISREG(host_stat.st_mode):
                assert guest_stat.type is FileType.FILE, guest_path
                assert guest_stat.size == host_stat.st_size, guest_path
                assert fs.read_file(guest_path) == Path(host_path).read_bytes(), guest_path
            if check_mode and guest_stat.mode is not None:
                assert guest_stat.mode == stat.S_IMODE(host_stat.st_mode), guest_path
    return compared


def tree_digest(fs: GuestFileSystem) -> dict[str, tuple[object, ...]]:
    """Every entry of ``fs`` as the guest sees it: type, size, mode, owner, link count, and the
    SHA-256 of a file's data or a link's target (to compare one file system before and after a
    change that must not alter what it holds)."""
    entries: dict[str, tuple[object, ...]] = {}
    for path, info in fs.walk("/"):
        content: str | None = None
        if info.is_file:
            digest = hashlib.sha256()
            for piece in fs.iter_file(path):
                digest.update(piece)
            content = digest.hexdigest()
        elif info.is_symlink:
            content = fs.readlink(path)
        entries[path] = (info.type, info.size, info.mode, info.uid, info.gid, info.nlink, content)
    return entries
