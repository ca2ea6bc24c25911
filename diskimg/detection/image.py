"""Opening images: format choice, the forced-format check, and confined backing chains.

Backing files (qcow2) and parents (differencing VHD) are references written inside an untrusted
image; following them could make the tool read any host file. They are opened only when the
caller allows it, and then only inside the allowed directory trees (by default the directory of
the image the caller named), with the chain's depth capped and loops refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

from ..choices import FormatName, VhdSizeRule
from ..errors import BackingFileError, CorruptImage, UnsupportedFormat
from ..formats import READERS, canonical_format
from ..formats.probing import OpenOptions
from ..formats.reader import DiskReader, ImageInfo
from ..host.files import HostFile, confined_path
from .probe import check_forced, detect, identify_inner

Source = str | os.PathLike[str] | BinaryIO
MAX_CHAIN_DEPTH = 16


def open_image(
    source: Source,
    source_format: FormatName | None = None,
    *,
    allow_backing: bool = False,
    backing_dirs: Sequence[str | os.PathLike[str]] | None = None,
    snapshot: str | None = None,
    vhd_size: VhdSizeRule = "auto",
) -> DiskReader:
    """Open a RAW, VHD, VHDX or qcow2 image as a DiskReader.

    ``source_format`` forces the format (as ``qemu-img -f``) and must agree with the file's header.
    ``allow_backing`` lets a qcow2 backing file or a differencing VHD's parent be opened, from
    inside ``backing_dirs`` (default: the image's own directory tree) only.
    """
    reader = _open(source, source_format, OpenOptions(snapshot=snapshot, vhd_size=vhd_size), allow_backing,
                   backing_dirs)
    if reader.backing_file is not None and reader.parent is None:
        reader.close()
        raise BackingFileError(
            f"has a backing file {reader.backing_file!r}; it is read only when allowed "
            "(--allow-backing, and only from inside the image's directory)",
            path=reader.path,
        )
    return reader


def image_info(source: Source, source_format: FormatName | None = None, *,
               vhd_size: VhdSizeRule = "auto") -> ImageInfo:
    """The facts ``diskimg info`` shows; reads metadata only and never opens backing files."""
    reader = _open(source, source_format, OpenOptions(vhd_size=vhd_size), False, None, see_tail=True)
    try:
        return reader.info()
    finally:
        reader.close()


def _open(
    source: Source,
    source_format: str | None,
    options: OpenOptions,
    allow_backing: bool,
    backing_dirs: Sequence[str | os.PathLike[str]] | None,
    see_tail: bool = False,
) -> DiskReader:
    """``see_tail``: a wrapped disk whose end costs a pass to see (a compressed tar's member, an xz
    or zstd file of one block or frame) is read to its end at open (for its facts: a fixed VHD's
    footer, a DMG trailer) rather than checked when its end is read."""
    detection = detect(source)
    name: str
    if source_format is not None:
        name = canonical_format(source_format)
        check_forced(detection, name, source_name(source))
    elif detection.readable:
        name = detection.format
    else:
        # loaded when a wrapper is met (start-up time)
        from ..streams.sources import open_wrapped, opens_through_wrapper

        if opens_through_wrapper(detection):
            # a RAW disk or a fixed VHD in a compressed file, a disk in a tar
            return open_wrapped(source, detection, identify_inner, see_tail=see_tail)
        raise UnsupportedFormat(
            f"{detection.description}: diskimg reads VHD, VHDX, qcow2 and RAW",
            path=source_name(source),
            format=detection.format,
            hint=detection.hint,
        )
    opener = None
    if allow_backing and isinstance(source, (str, os.PathLike)):
        top = os.path.realpath(os.fspath(source))
        roots = [os.path.realpath(os.fspath(d)) for d in backing_dirs] if backing_dirs else [os.path.dirname(top)]
        opener = _ParentOpener(top, roots, options, depth=1, seen=frozenset({top}))
    return _open_reader(source, name, opener, options)


def _open_reader(source: Source, name: str, opener: _ParentOpener | None, options: OpenOptions) -> DiskReader:
    """The reader of format ``name`` over ``source``; the file is closed again if that fails."""
    host = HostFile(source)
    try:
        return READERS[name].open(host, opener, options)
    except BaseException:
        host.close()
        raise


class _ParentOpener:
    """Opens the parent of one image of a chain, confined to ``roots``."""

    def __init__(self, child: str, roots: list[str], options: OpenOptions, depth: int, seen: frozenset[str]) -> None:
        self.child = child
        self.roots = roots
        self.options = options
        self.depth = depth
        self.seen = seen

    def __call__(self, candidates: list[str], format: str | None) -> DiskReader:
        if self.depth > MAX_CHAIN_DEPTH:
            raise BackingFileError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images", path=self.child)
        refused = []
        for name in candidates:
            path = confined_path(os.path.dirname(self.child), name, self.roots)
            if path is None:
                refused.append(name)
                continue
            if not os.path.isfile(path):
                continue
            if path in self.seen:
                raise CorruptImage(f"backing chain loops back to {path!r}", path=self.child)
            parent_options = OpenOptions(vhd_size=self.options.vhd_size)  # snapshots apply to the top image only
            opener = _ParentOpener(path, self.roots, self.options, self.depth + 1, self.seen | {path})
            detection = detect(path)
            fmt = canonical_format(format) if format else detection.format
            if format:
                check_forced(detection, fmt, path)
            elif not detection.readable:
                raise UnsupportedFormat(
                    f"backing file {path!r} is {detection.description}", path=self.child, format=detection.format
                )
            return _open_reader(path, fmt, opener, parent_options)
        if refused:
            raise BackingFileError(
                f"backing file {refused[0]!r} lies outside the allowed directories ({', '.join(self.roots)})",
                path=self.child,
            )
        raise BackingFileError(f"backing file {candidates[0] if candidates else '?'!r} not found", path=self.child)


def source_name(source: Source) -> str:
    """The path, or a file object's name, for messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<file object>"))
