"""The closed sets of strings of the public API, as ``Literal`` types.

Each set is listed once, here: the API's annotations name these types, and the command's choices
and the batch plan's checks are made from them (``typing.get_args``). A leaf module, cheap to
import: the command loads it at start-up.
"""

from __future__ import annotations

from typing import Literal

#: the formats diskimg reads and writes, by their canonical names
DiskFormat = Literal["raw", "vhd", "qcow2", "vmdk", "vhdx", "vdi"]
#: a format as a caller may name it: a canonical name, or vpc (qemu's name for vhd)
FormatName = Literal["raw", "vhd", "vpc", "qcow2", "vmdk", "vhdx", "vdi"]
#: which of a VHD's two sizes is its virtual size: "auto" follows the creator application (as
#: current qemu and Hyper-V do), "chs" the geometry's, "current_size" the footer's
VhdSizeRule = Literal["auto", "chs", "current_size"]
#: who converts: diskimg itself ("native"), qemu-img (for formats diskimg recognises but does not
#: read), or "auto": native where it can
Backend = Literal["auto", "native", "qemu-img"]
#: who did convert, in a ConvertResult
UsedBackend = Literal["native", "qemu-img"]
#: the archive each exported disk is packed in ("none": the bare disk file)
ArchiveKind = Literal["tar.gz", "tar.zst", "tar", "none"]
#: whose import conventions an export's names and sizes follow: Alibaba Cloud ECS, Google Compute Engine
ExportLayout = Literal["ecs", "gce"]
#: the cloud whose import rules ``validate`` checks
CloudTarget = Literal["ecs"]
#: a disk's role in a machine
DiskRole = Literal["system", "data"]
#: the mode a system disk is declared to boot in
BootMode = Literal["BIOS", "UEFI"]
