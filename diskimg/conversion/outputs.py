"""Where an output goes: a regular file replaced atomically, or a device or FIFO written in place.

Every path diskimg writes (``convert``, ``export``, ``unpack``) is resolved here first:

- a symbolic link is followed, as ``cp`` follows it: the file it names is replaced and the link
  kept; a dangling link creates the file it names (as POSIX cp does; GNU cp refuses);
- a regular file is written under a temporary name beside it and renamed into place when
  complete, so a failed run leaves nothing under its name, never a partial file; replacing an
  existing file needs ``force``, and the old file is gone once the run starts (as with qemu-img,
  which truncates it when it opens it);
- a block device, a character device or a FIFO is written in place, in order, never truncated,
  renamed or replaced (``convert`` only; no ``force`` needed): a block device only if the output
  fits in it; the outputs of ``export`` and ``unpack`` are always regular files;
- a directory or a socket is refused, and so is the source image itself;
- an output folder (``export --out``, ``unpack --out``) is made when missing and removed again
  when the run that made it fails.

The old file is renamed aside (``.NAME.XXXX.old``) when the run starts and unlinked by a thread
while the conversion runs, so that the final rename finds the name free: renaming over an existing
file makes ext4 (``auto_da_alloc``) allocate and start writing back the new file's data at once,
which took longer than the whole conversion on a real disk, and freeing the old file's blocks
(half a second for a gigabyte on disk) then overlaps the conversion instead of following it. A crash
leaves no file under the final name, at most the complete new output under its temporary name
``.NAME.XXXX.part`` beside it; never a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import DiskImageError, OutputError
from ..formats.writer import OutputTarget
from ..host.files import file_kind


@dataclass(frozen=True)
class Destination:
    """An output path resolved: ``path`` is where the bytes go (a link followed), ``mode`` the
    ``st_mode`` of what is there already (None for nothing)."""

    path: str
    mode: int | None

    @property
    def in_place(self) -> bool:
        """True for a device or FIFO: written into, never replaced."""
        return self.mode is not None and (stat.S_ISBLK(self.mode) or stat.S_ISCHR(self.mode)
                                          or stat.S_ISFIFO(self.mode))


def resolve(target: str | os.PathLike[str], force: bool, source_path: str) -> Destination:
    """Where ``target`` leads, or an OutputError (exit 4) for a target that may not be written."""
    given = os.path.abspath(os.fspath(target))
    path = os.path.realpath(given)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return Destination(path, None)
    except OSError as exc:
        raise OutputError(f"cannot examine the output: {exc.strerror}", path=given) from None
    if _same_file(status, source_path):
        raise OutputError("is the source image; refusing to overwrite it", path=given)
    destination = Destination(path, status.st_mode)
    if stat.S_ISREG(status.st_mode):
        if not force:
            raise OutputError("already exists (pass --force to replace it)", path=given)
    elif not destination.in_place:
        raise OutputError(f"is {file_kind(status.st_mode)}, not a file or device an image can be written to",
                          path=given)
    return destination


def _same_file(status: os.stat_result, source_path: str) -> bool:
    try:
        source = os.stat(source_path)
    except (OSError, ValueError):  # a caller's file object has no path
        return False
    if stat.S_ISBLK(source.st_mode) and stat.S_ISBLK(status.st_mode):
        return source.st_rdev == status.st_rdev  # two nodes of one disk are one disk
    return (source.st_dev, source.st_ino) == (status.st_dev, status.st_ino)


def resolve_file(target: str | os.PathLike[str], force: bool, source_path: str) -> str:
    """The path of the regular file ``target`` leads to (for outputs that are files by nature:
    an export's archives and manifest, an unpacked disk, qemu-img's output)."""
    destination = resolve(target, force, source_path)
    if destination.in_place:
        assert destination.mode is not None
        raise OutputError(f"is {file_kind(destination.mode)}; this output is written only as a regular file",
                          path=os.path.abspath(os.fspath(target)))
    return destination.path


@contextlib.contextmanager
def temporary_beside(target: str | os.PathLike[str], force: bool, source_path: str) -> Iterator[str]:
    """A temporary file name beside the regular file ``target`` leads to, renamed to it when the
    block completes and removed if it fails."""
    with _replacing(resolve_file(target, force, source_path)) as temporary:
        yield temporary


@contextlib.contextmanager
def output_target(target: str | os.PathLike[str], force: bool, source_path: str, hash_output: bool,
                  needed: Callable[[], int]) -> Iterator[OutputTarget]:
    """An OutputTarget on standard output (``"-"``), on a device or FIFO written in place, or on a
    temporary file that replaces the target on success. ``needed()`` is the output's size, which a
    block device must hold."""
    name = os.fspath(target)
    if name == "-":
        sys.stdout.flush()
        yield OutputTarget(sys.stdout.fileno(), "<stdout>", hash_output=hash_output)
        return
    destination = resolve(target, force, source_path)
    if destination.in_place:
        with _in_place(destination, name, needed) as fd:
            yield OutputTarget(fd, name, hash_output=hash_output)
        return
    with _replacing(destination.path) as temporary:
        fd = os.open(temporary, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            yield OutputTarget(fd, name, hash_output=hash_output)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _in_place(destination: Destination, name: str, needed: Callable[[], int]) -> Iterator[int]:
    """A device or FIFO opened for writing (a FIFO waits here for its reader, as a shell's ``>``
    does); a block device is checked to hold ``needed()`` bytes first and flushed at the end."""
    try:
        fd = os.open(destination.path, os.O_WRONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise OutputError(f"cannot open for writing: {exc.strerror}", path=name) from None
    try:
        block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        if block_device:
            capacity, size = os.lseek(fd, 0, os.SEEK_END), needed()
            if capacity < size:
                raise OutputError(f"is a block device of {capacity} bytes; the output needs {size}", path=name)
        yield fd
        if block_device:
            try:
                os.fsync(fd)
            except OSError as exc:
                raise OutputError(f"cannot flush: {exc.strerror}", path=name) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[str]:
    """A new temporary file beside ``path``, which replaces ``path`` when the block completes."""
    temporary = new_temporary(path)
    try:
        remover = _remove_in_background(path)
    except BaseException:
        os.unlink(temporary)
        raise
    try:
        yield temporary
        if remover is not None:
            remover.join()
        replace_file(temporary, path)
    except BaseException:
        if remover is not None:
            remover.join()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _remove_in_background(path: str) -> threading.Thread | None:
    """The old file at ``path``, if any, renamed aside and unlinked by a thread (see the module
    docstring); the thread is to be joined before the name is given to the new file."""
    if not os.path.isfile(path):
        return None
    aside = os.path.join(os.path.dirname(path), f"{_temporary_prefix(path)}{uuid.uuid4().hex[:12]}.old")
    try:
        os.rename(path, aside)  # to a new name: nothing is replaced, so nothing is written back
    except OSError as exc:
        raise OutputError(f"cannot replace: {exc.strerror}", path=path) from None
    remover = threading.Thread(target=_unlink_quietly, args=(aside,), name="diskimg-unlink-old", daemon=True)
    remover.start()
    return remover


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def new_temporary(path: str) -> str:
    """An empty file ``.NAME.XXXX.part`` beside ``path``, with the permissions a new file gets."""
    directory = os.path.dirname(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX)
    except OSError as exc:
        raise OutputError(f"cannot create a file in {directory}: {exc.strerror}", path=path) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    return temporary


TEMPORARY_SUFFIX = ".part"


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def leftover_temporaries(target: str | os.PathLike[str]) -> list[str]:
    """The temporaries of ``target`` that a killed process left beside it (a failure it could see
    removes them; a SIGKILL or a power cut gives it no chance): for whoever runs the job again."""
    path = os.path.realpath(os.fspath(target))  # a link is followed: the temporary is beside the file
    directory, prefix = os.path.dirname(path), _temporary_prefix(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, name) for name in names
            if name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX)]


def replace_file(temporary: str, path: str) -> None:
    """Give the finished ``temporary`` the name ``path``: the old file is unlinked first (see the
    module docstring for why, and for what a crash in between leaves)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputError(f"cannot replace: {exc.strerror}", path=path) from None


@contextlib.contextmanager
def output_directory(path: str | os.PathLike[str]) -> Iterator[str]:
    """The absolute ``path`` of an output folder, made if missing (with its missing parents); if the
    block fails, the folders made here are removed again (when empty): a failed run leaves nothing."""
    directory = os.path.abspath(os.fspath(path))
    made = []  # deepest first
    missing = directory
    while not os.path.lexists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    try:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder: {exc.strerror}", path=directory) from None
        if not os.path.isdir(directory):
            raise OutputError("is not a folder", path=directory)
        yield directory
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


@contextlib.contextmanager
def reported_as(final: str, temporary: str) -> Iterator[None]:
    """Errors about ``temporary`` (an output written under a temporary name, to be renamed later)
    name ``final``, the file the user asked for."""
    try:
        yield
    except DiskImageError as exc:
        if exc.path is not None and os.path.abspath(exc.path) == os.path.abspath(temporary):
            exc.path = final
        raise
