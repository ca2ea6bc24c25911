"""VHD (Virtual PC, Hyper-V; qemu's "vpc"): structures and rules, reader and detection's probe,
writer, and the structural check, split by concern (check.py is loaded by ``diskimg check``)."""

from .reader import BitmapRunsCache, VhdReader, probe, sector_bitmap_runs
from .structures import NAME, host_path
from .writer import VhdWriter

__all__ = ["NAME", "BitmapRunsCache", "VhdReader", "VhdWriter", "host_path", "probe",
           "sector_bitmap_runs"]
