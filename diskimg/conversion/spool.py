"""A forward-only disk made random-access by one conversion pass into a temporary RAW file."""

from __future__ import annotations

import os
import tempfile

from ..formats import READERS
from ..formats.probing import OpenOptions
from ..formats.reader import DiskReader
from ..host.files import HostFile
from .pipeline import convert


def spooled(reader: DiskReader, directory: str | None = None) -> DiskReader:
    """The disk of a forward-only reader copied in one pass into a temporary sparse RAW file, and
    read at random from there: for callers that read all over the disk (``validate``), where each
    read backwards would otherwise cost a decompression pass. The copy takes the disk's allocated
    bytes of temporary space; its name is removed at once, so it disappears with the reader."""
    with tempfile.TemporaryDirectory(prefix="diskimg-", dir=directory) as scratch:
        path = os.path.join(scratch, "disk.raw")
        convert(reader, path, "raw")
        host = HostFile(path)
    try:
        return READERS["raw"].open(host, None, OpenOptions())
    except BaseException:
        host.close()
        raise
