"""qcow2 (QEMU copy-on-write, versions 2 and 3), split by concern as qemu splits it: structures
(header, extensions, snapshots, L1/L2/refcount entries: the one home of each rule), reader (probe,
open, read, allocation map), writer, check (refcounts, like ``qemu-img check``)."""

from .reader import Qcow2Reader, probe, read_first_cluster
from .structures import MAGIC, NAME, header_version
from .writer import Qcow2Writer

__all__ = ["MAGIC", "NAME", "Qcow2Reader", "Qcow2Writer", "header_version", "probe", "read_first_cluster"]
