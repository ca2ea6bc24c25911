"""The rule catalogue and the per-target profiles, as data.

Every finding the validator can emit has one :class:`Rule` here: a stable ``code``, its severity,
the category it belongs to, the roles (system / data disk) and targets it applies to, and a short
rationale naming its source in the project's reference notes (the section number and the notes'
source tags, e.g. ``F1 (A-IMPORT, A-API-IMP)``); users are shown the public documents those tags
stand for (``references.py``), and every source cites at least one. Checks (``checks.py``) decide
*whether* a rule is broken; this table decides *how bad* that is and *why*.

A target is a :class:`Profile`: which formats it takes, its size limits, its sizing advice. Adding
a cloud means adding a profile (and listing it in the ``targets`` of the rules that apply to it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .references import Reference, is_inference, references

GiB = 1 << 30


class Severity(str, enum.Enum):
    ERROR = "error"  # the import fails or the instance will not boot
    WARNING = "warning"  # boots, but degraded, or the cloud's documentation says "do not"
    INFO = "info"  # facts to know (sizes to declare, boot mode to choose)

    @property
    def rank(self) -> int:
        return {"error": 0, "warning": 1, "info": 2}[self.value]


ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO
SYSTEM, DATA = "system", "data"
BOTH = (SYSTEM, DATA)


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    category: str  # container, integrity, size, partitions, filesystems, boot, set
    title: str
    rationale: str
    source: str
    roles: tuple[str, ...] = BOTH
    targets: tuple[str, ...] = ("ecs",)

    @property
    def references(self) -> list[Reference]:
        """The public documents the rule comes from."""
        return references(self.source)

    @property
    def inference(self) -> bool:
        """Whether diskimg infers the rule from its documents (they do not state it)."""
        return is_inference(self.source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "category": self.category,
            "title": self.title,
            "rationale": self.rationale,
            "references": [reference.to_dict() for reference in self.references],
            "inference": self.inference,
            "roles": list(self.roles),
            "targets": list(self.targets),
        }


@dataclass(frozen=True)
class Profile:
    """What one target cloud accepts, as numbers and names."""

    name: str
    title: str
    #: diskimg format -> the name the import API uses
    formats: dict[str, str]
    #: formats taken only in a restricted preview (still refused here, with that said)
    preview_formats: dict[str, str] = field(default_factory=dict)
    min_disk_gib: int = 1
    max_disk_gib: int = 2048
    #: limits of earlier API versions, still met in older regions, consoles and SDKs (warnings)
    legacy_max_gib: dict[str, int] = field(default_factory=dict)
    recommended_system_gib: int = 20
    multipart_upload_above: int = 5 * GiB
    max_data_disks: int = 16
    boot_modes: tuple[str, ...] = ("BIOS", "UEFI")
    default_boot_mode: str = "BIOS"
    #: file systems the target documents for a system disk
    system_file_systems: frozenset[str] = frozenset()
    #: below this share of free space a system disk's file system is reported
    min_free_fraction: float = 0.10
    api: str = ""


PROFILES: dict[str, Profile] = {
    "ecs": Profile(
        name="ecs",
        title="Alibaba Cloud ECS (ImportImage)",
        formats={"raw": "RAW", "vhd": "VHD", "qcow2": "QCOW2"},
        preview_formats={"vmdk": "VMDK"},
        min_disk_gib=1,
        max_disk_gib=2048,
        legacy_max_gib={SYSTEM: 500, DATA: 1000},
        recommended_system_gib=20,
        multipart_upload_above=5 * GiB,
        max_data_disks=16,
        system_file_systems=frozenset({"ext2", "ext3", "ext4", "xfs", "ntfs", "fat12", "fat16", "fat32"}),
        api="ImportImage",
    ),
}

TARGETS = tuple(PROFILES)


def _r(code: str, severity: Severity, category: str, title: str, rationale: str, source: str,
       roles: tuple[str, ...] = BOTH) -> Rule:
    return Rule(code, severity, category, title, rationale, source, roles)


RULES: tuple[Rule, ...] = (
    # -- container ------------------------------------------------------------------------------
    _r("format-refused", ERROR, "container", "Image format not accepted",
       "ECS imports RAW, VHD and QCOW2 files; other container formats must be converted first.",
       "§1.1 F1 (A-IMPORT, A-API-IMP)"),
    _r("format-vmdk", ERROR, "container", "VMDK is an invitation-only preview",
       "ImportImage lists VMDK only as an invitational preview (API, 2025-07); convert to QCOW2, VHD or RAW.",
       "§1.1 F1/F2 (A-API-IMP, Go SDK 2025-07)"),
    _r("format-iso", ERROR, "container", "ISO images are not disk images",
       "ECS does not import ISO 9660 images; install the OS into a VM disk and import that disk.",
       "§1.1 F1 (A-INSTR: 'ISO images not supported')"),
    _r("format-wrapped", ERROR, "container", "Compressed or archived image",
       "ECS reads the image file from OSS as is; a gzip/xz/bzip2/zstd stream or a tar/zip archive must be "
       "unpacked first.", "§1.1 F1 (A-IMPORT) [inference: format detected from the file header]"),
    _r("wrapped-inspected", INFO, "container", "Disk inspected through its wrapper",
       "The checks of partitions, file systems and boot read the RAW disk inside a compressed file or tar "
       "(decompressed once, in full, into a temporary sparse copy), so its problems are known before it is "
       "unpacked.", "§1.1 F1 (A-IMPORT) [diskimg: what the unpacked file would hold]"),
    _r("image-unreadable", ERROR, "container", "Image cannot be read",
       "The file claims a supported format but its metadata is damaged or truncated, so the importer cannot "
       "read it.", "§1.1 F1/F3 (A-API-IMP error InvalidImageFormat.Malformed)"),
    _r("backing-file", ERROR, "container", "qcow2 image depends on a backing file",
       "Only the one uploaded file is imported; data in a backing file would be missing (self-contained image).",
       "§1.1 F3 [inference] (qcow2 spec: backing_file_offset)"),
    _r("vhd-differencing", ERROR, "container", "Differencing VHD",
       "A differencing VHD holds only changes against a parent that is not uploaded (AWS rejects them too).",
       "§1.1 F3 [inference], §3.1 (AWS: 'Footers not identical')"),
    _r("encrypted", ERROR, "container", "Encrypted qcow2",
       "The importer has no key for qcow2 encryption (AES or LUKS); the image must be decrypted first.",
       "§1.1 F3 [inference] (qcow2 spec: crypt_method)"),
    _r("external-data-file", ERROR, "container", "qcow2 with an external data file",
       "The guest data lives in a separate file that is not uploaded with the image.",
       "§1.1 F3 [inference] (qcow2 spec: incompatible feature bit 2)"),
    _r("qcow2-dirty", ERROR, "container", "qcow2 dirty bit set",
       "The image was not closed cleanly (lazy refcounts, VM still running or crashed): its refcounts are stale "
       "and the guest data may be a crash-consistent copy.", "§1.1 F3 [inference] (qcow2 spec: bit 0)"),
    _r("qcow2-corrupt", ERROR, "container", "qcow2 corrupt bit set",
       "QEMU found the image's metadata corrupt and marked it so; it must be repaired and checked first.",
       "§1.1 F3 [inference] (qcow2 spec: bit 1)"),
    _r("qcow2-compressed", WARNING, "container", "Compressed qcow2 clusters",
       "Alibaba does not document compressed qcow2 input; compressed clusters are a risk worth removing "
       "(and slow the import).", "§1.1 F3 (A-IMPORT; qcow2 spec) [inference: compressed clusters -> WARN only]"),
    _r("qcow2-newer-features", WARNING, "container", "qcow2 features older readers lack",
       "zstd compression (QEMU 5.1+) or extended L2 entries (QEMU 5.2+) make the image unreadable to older "
       "qemu-img versions an importer may use.", "§1.1 F3 [inference] (qcow2 spec: bits 3-4)"),
    _r("qcow2-snapshots", INFO, "container", "qcow2 internal snapshots",
       "Only the active layer is imported; internal snapshots just make the upload larger.",
       "§1.1 F3 [inference] (qcow2 spec: nb_snapshots)"),
    # -- integrity ------------------------------------------------------------------------------
    _r("integrity-corruption", ERROR, "integrity", "Image metadata is corrupt",
       "Tables point outside the file, clusters or blocks are used twice, or refcounts are too low: the import "
       "may fail or the guest data be wrong (what `qemu-img check` calls corruptions).",
       "§1.1 F3 (A-API-IMP error InvalidImageFormat.Malformed)"),
    _r("integrity-leaks", WARNING, "integrity", "Leaked clusters",
       "Clusters are allocated but unused: harmless for the guest, but the file is larger than needed.",
       "§1.1 F3 [inference] (qemu-img check 'leaks')"),
    _r("image-truncated", ERROR, "integrity", "Image file is truncated",
       "The file ends before data its metadata references (an interrupted copy or download).",
       "§1.1 F3/F4 (A-API-IMP error InvalidImageFormat.Malformed)"),
    # -- size -----------------------------------------------------------------------------------
    _r("size-empty", ERROR, "size", "Disk has no size",
       "DiskImageSize must be at least 1 GiB; a disk of 0 bytes has nothing to import.",
       "§1.1 F4/F5 (A-API-IMP)"),
    _r("size-too-large", ERROR, "size", "Disk larger than the target allows",
       "DiskImageSize is limited to 1-2048 GiB per disk (ImportImage, 2025+).", "§1.1 F5 (A-API-IMP, Go SDK)"),
    _r("size-legacy-limit", WARNING, "size", "Disk above the older size limit",
       "Before 2025 the limits were 500 GiB (system) and 1000 GiB (data); older regions, consoles and SDKs "
       "may still apply them.", "§1.1 F5, §5 item 1 (A-API-IMP mirror history)"),
    _r("size-system-small", WARNING, "size", "System disk below the recommended size",
       "The image specification recommends a system disk of at least 20 GiB (the import may declare a larger "
       "DiskImageSize than the image).", "§1.1 F6 (A-SPEC)", (SYSTEM,)),
    _r("size-unaligned", WARNING, "size", "Virtual size is not a whole number of sectors",
       "A partial last sector is ignored by hypervisors; the disk is effectively smaller than the file.",
       "§1.1 F4 (A-INSTR) [inference]"),
    _r("disk-image-size", INFO, "size", "DiskImageSize to declare",
       "DiskImageSize (GiB) must be at least the virtual size, rounded up; for a VHD the larger of its two "
       "sizes (footer current_size and CHS geometry) is used.", "§1.1 F4 (A-INSTR, A-API-IMP)"),
    _r("upload-multipart", INFO, "size", "Multipart upload to OSS",
       "Files over 5 GiB must be uploaded to OSS with multipart upload (ossutil does it by itself).",
       "§1.1 F8 (A-IMPORT)"),
    # -- partitions -----------------------------------------------------------------------------
    _r("no-partition-table", ERROR, "partitions", "System disk without a partition table",
       "A system disk needs an MBR or GPT (and a boot loader); a bare file system or an empty disk cannot boot.",
       "§1.3 P1 (A-INSTR; 'ERR if no valid PT')", (SYSTEM,)),
    _r("data-disk-unpartitioned", INFO, "partitions", "Data disk without a partition table",
       "A data disk may hold a bare file system; noted so that it is not a surprise.", "§1.3 P1 (A-INSTR) [inference]",
       (DATA,)),
    _r("gpt-header-invalid", ERROR, "partitions", "GPT header damaged",
       "The primary GPT header fails its CRC32 or describes impossible bounds; firmware and Linux may not find "
       "the partitions.", "§1.3 P1, §6 (UEFI spec 5.3)"),
    _r("gpt-entries-crc", ERROR, "partitions", "GPT partition entries damaged",
       "The partition entry array does not match the CRC32 in its header.", "§1.3 P1, §6 (UEFI spec 5.3)"),
    _r("gpt-backup-missing", WARNING, "partitions", "Backup GPT missing",
       "The backup GPT header at the last LBA is missing or damaged: the disk still boots, but a damaged "
       "primary could not be recovered and partitioning tools complain.", "§1.3 P1 (UEFI spec 5.3.2)"),
    _r("gpt-backup-not-at-end", WARNING, "partitions", "Backup GPT not at the end of the disk",
       "The disk was resized after partitioning; growpart and sgdisk -e fix this, the kernel only warns.",
       "§1.3 P1 (UEFI spec 5.3.2) [inference]"),
    _r("gpt-protective-mbr-missing", ERROR, "partitions", "GPT without a protective MBR",
       "Linux ignores a GPT whose sector 0 has no 0xEE protective entry starting at LBA 1.",
       "§1.3 P1, §6 (Linux block/partitions/efi.c is_pmbr_valid) [inference]"),
    _r("gpt-stale", WARNING, "partitions", "Stale GPT beside an MBR",
       "A GPT header remains on an MBR disk; the guest uses the MBR, but tools may pick the stale GPT.",
       "§1.3 P1 (A-INSTR; UEFI spec 5.2.3) [inference]"),
    _r("gpt-4k-sectors", ERROR, "partitions", "GPT made for 4096-byte sectors",
       "Cloud disks present 512-byte logical sectors; a 4Kn layout shows no partition table there.",
       "§1.3 P1 (A-INSTR; UEFI spec 5.3.1) [inference]"),
    _r("partition-out-of-bounds", ERROR, "partitions", "Partition outside the disk",
       "A partition ends past the disk (a truncated copy) or lies over the GPT's own structures.",
       "§1.3 P1 (A-INSTR; UEFI spec 5.3) [inference]"),
    _r("partition-overlap", ERROR, "partitions", "Overlapping partitions",
       "Two partitions share sectors; writing one corrupts the other.", "§1.3 P1 (A-INSTR) [inference]"),
    _r("partition-invalid", WARNING, "partitions", "Meaningless partition entry",
       "An entry with no sectors, starting over the partition table, or ending before it starts, is ignored "
       "or misread by tools.", "§1.3 P1 (A-INSTR) [inference]"),
    _r("mbr-ebr-loop", ERROR, "partitions", "Logical partition chain loops",
       "The chain of extended boot records points back on itself.", "§1.3 P1 (A-INSTR) [inference]"),
    _r("mbr-ebr-invalid", ERROR, "partitions", "Extended boot record damaged",
       "An extended boot record lacks its signature: logical partitions after it are lost.",
       "§1.3 P1 (A-INSTR) [inference]"),
    # -- file systems ---------------------------------------------------------------------------
    _r("fs-needs-recovery", ERROR, "filesystems", "File system not cleanly unmounted",
       "The journal needs replaying or the file system was not unmounted: the disk was copied from a running "
       "or crashed VM; verify the file system's integrity first.", "§1.3 P9 (A-INSTR, A-TOOL)"),
    _r("fs-errors", ERROR, "filesystems", "File system has recorded errors",
       "The kernel recorded errors in the superblock (or XFS needs repair): run fsck before importing.",
       "§1.3 P9 (A-INSTR, A-TOOL)"),
    _r("fs-larger-than-partition", ERROR, "filesystems", "File system larger than its partition",
       "The partition was shrunk below its file system or the image is truncated: data at the end is lost.",
       "§1.3 P9 (A-INSTR) [inference]"),
    _r("fs-lvm", WARNING, "filesystems", "LVM on the system disk",
       "Alibaba's image specification says not to manage system-disk partitions with LVM (the 2018 compliance "
       "tool failed it). The finding names the volume group and the logical volumes found inside, with their "
       "file systems.", "§1.3 P7 (A-SPEC, A-TOOL 2018)", (SYSTEM,)),
    _r("fs-lvm-pv-missing", ERROR, "filesystems", "Volume group with a missing physical volume",
       "The volume group spans a physical volume (named by its UUID) that is on none of the disks validated "
       "together, or that its metadata marks missing: the logical volumes with extents on it cannot be activated "
       "on the instance, so a root or a mount on them fails. Import the disk holding it with the image (and "
       "validate the disks together), or remove it from the group.",
       "§1.3 P7 (A-SPEC) [inference: LVM2's lvmraid(7)/vgreduce(8), activation of LVs on missing PVs]"),
    _r("fs-swap-partition", WARNING, "filesystems", "Swap partition on the system disk",
       "The image specification asks for no swap partition.", "§1.3 P8 (A-SPEC)", (SYSTEM,)),
    _r("fs-encrypted", ERROR, "filesystems", "Encrypted volume on the system disk",
       "An instance cannot unlock a LUKS or BitLocker volume unattended at first boot, and ECS cannot inspect, "
       "adapt or repair what is inside, so it cannot import the system disk; nothing inside can be checked here "
       "either. The finding gives the header's UUID and cipher.",
       "§1.3 P4 [inference], §3.3 (GCE: no software-encrypted disks)", (SYSTEM,)),
    _r("fs-ext4-64bit", INFO, "filesystems", "ext4 '64bit' feature (a retired 2019-2020 rule)",
       "Alibaba's 2019-2020 image import instructions and compliance tool forbade the ext4 64bit feature; "
       "mke2fs sets it by default since e2fsprogs 1.43 (2016), ECS's own current images have it and the "
       "current import pages no longer say so: a fact for the record, not a problem.",
       "§1.3 P4, §5 item 5 (A-INSTR, A-INSTR-CN, A-TOOL)"),
    _r("fs-ext4-project-quota", WARNING, "filesystems", "ext4 'project' and 'quota' together (old rule)",
       "2019-2020 ECS docs forbid enabling the ext4 features project and quota together.",
       "§1.3 P4 (A-INSTR, A-INSTR-CN)"),
    _r("fs-not-listed", WARNING, "filesystems", "File system not documented for a system disk",
       "ECS documents ext3/ext4/xfs (Linux) and NTFS (Windows) for system disks; Btrfs, ZFS and others may "
       "boot but are not covered.", "§1.3 P4/P5 (A-INSTR) [inference: btrfs not listed]", (SYSTEM,)),
    _r("fs-full", WARNING, "filesystems", "Little free space",
       "The system disk must not be full: ECS and cloud-init install drivers and agents at first boot.",
       "§1.3 P9 (A-INSTR, A-TOOL) [threshold 10% is an inference]", (SYSTEM,)),
    _r("fs-unknown", INFO, "filesystems", "Partition without a recognised file system",
       "Nothing known was found at the start of the partition (empty, or a format not recognised).",
       "§1.3 P4 (A-INSTR) [inference]"),
    # -- boot -----------------------------------------------------------------------------------
    _r("boot-mode-unsupported", ERROR, "boot", "Disk cannot boot in the chosen mode",
       "UEFI needs an EFI system partition with a FAT file system; BIOS needs boot code in the MBR (and on GPT "
       "a BIOS boot partition). ECS cannot fix the boot loader.", "§1.3 P2 (A-BOOT)", (SYSTEM,)),
    _r("boot-none", ERROR, "boot", "No boot loader found",
       "Neither BIOS boot code nor an EFI system partition was found: the instance would not find its system "
       "disk.", "§1.3 P2 (A-BOOT)", (SYSTEM,)),
    _r("boot-mode", INFO, "boot", "Boot mode to declare",
       "BootMode must match what the image can boot (default BIOS); an image that boots both ways can be "
       "marked UEFI-Preferred after import.", "§1.2 BootMode, §1.3 P2 (A-BOOT, A-API-IMP)", (SYSTEM,)),
    _r("esp-not-fat", WARNING, "boot", "EFI system partition without FAT",
       "UEFI firmware reads the ESP only as FAT12/16/32.", "§1.3 P2 (A-BOOT; UEFI spec 13.3)", (SYSTEM,)),
    _r("esp-unreadable", WARNING, "boot", "EFI system partition cannot be read",
       "The FAT file system on the ESP is damaged; the firmware may not find a boot loader.",
       "§1.3 P2 (A-BOOT; UEFI spec 13.3) [inference]", (SYSTEM,)),
    _r("esp-no-loader", ERROR, "boot", "No removable-media UEFI boot loader",
       "A new instance has empty NVRAM (no UEFI boot entries), so its firmware boots only \\EFI\\BOOT\\BOOTX64.EFI "
       "(BOOTAA64.EFI on Arm) and drops to its shell without it. Reported only when the disk would boot with UEFI.",
       "§1.3 P2 (A-BOOT), §3.1 (AWS: UEFI Linux needs the fallback loader); UEFI spec 3.5.1", (SYSTEM,)),
    _r("gpt-bios-no-bios-boot-partition", WARNING, "boot", "GPT disk booting BIOS without a BIOS boot partition",
       "GRUB needs a BIOS boot partition (type 21686148-...) to boot a GPT disk in BIOS mode.",
       "§1.3 P1, P2 (A-INSTR, A-BOOT) [inference: WARN on GPT+BIOS only if no BIOS boot partition]", (SYSTEM,)),
    _r("bios-boot-code-missing", WARNING, "boot", "BIOS boot partition but no MBR boot code",
       "A BIOS boot partition holds GRUB's core image, but without boot code in sector 0 the BIOS never "
       "reaches it.", "§1.3 P2 (A-BOOT) [inference]", (SYSTEM,)),
    _r("mbr-no-active-partition", ERROR, "boot", "No active partition for the MBR boot code",
       "Windows and syslinux MBR code boot the partition marked active; with none, the BIOS finds nothing to "
       "boot.", "§1.3 P2 (A-BOOT) [inference]; the Windows and syslinux MBR code", (SYSTEM,)),
    _r("bios-boot-chain-broken", ERROR, "boot", "BIOS boot chain ends after the MBR",
       "The MBR code loads a next stage that is not there: GRUB's core image (at the LBA boot.img keeps at 0x5c) "
       "zeroed or out of the disk, or an active partition whose boot sector has no loader (no 55 AA, or the "
       "'This is not a bootable disk' stub of mkfs.fat/mkntfs). The machine hangs at 'GRUB' or 'Missing "
       "operating system'.", "§1.3 P2 (A-BOOT) [inference]; GRUB boot.S/diskboot.S, syslinux mbr.S",
       (SYSTEM,)),
    # -- guest: Linux ----------------------------------------------------------------------------
    _r("guest-os", INFO, "guest", "Operating system found",
       "Platform, OSType and Architecture for ImportImage come from the guest: os-release (or the legacy release "
       "files) and the ELF machine of init.", "§1.2 Platform/OSType/Architecture (A-API-IMP), §1.6 GUESTOS.Platform",
       (SYSTEM,)),
    _r("guest-not-found", WARNING, "guest", "No operating system found",
       "No volume holds a Linux root file system (/etc/os-release or a legacy release file) or a Windows "
       "system: the image may not be a system disk.", "§1.6 GUESTOS.SystemImage (A-CHECK)", (SYSTEM,)),
    _r("guest-root-unreadable", ERROR, "guest", "Root file system on a volume that cannot be read",
       "No readable volume holds the system, and a volume that may hold it cannot be read: a thin or snapshot "
       "logical volume, one with extents on a missing physical volume, a volume group whose metadata is damaged, "
       "an md array of a level other than RAID1 (or the boot entry's root= names such a volume). None of the "
       "guest checks can run, so the image's readiness for import is unknown.",
       "§1.6 GUESTOS (A-CHECK) [inference: the checks need the root file system]", (SYSTEM,)),
    _r("guest-initramfs-cannot-mount-root", ERROR, "guest", "Initramfs cannot mount the root file system",
       "A root on LVM needs device-mapper (dm-mod, built in or in the initramfs) and the lvm tool (or dracut's "
       "lvm module) in the initramfs to activate its logical volume; a root on btrfs needs the btrfs module "
       "built in or in the initramfs. Without them the boot stops before the root is mounted.",
       "§1.4 L1 (A-VIRTIO) [inference: dracut's lvm and btrfs modules, initramfs-tools' lvm2 hook]", (SYSTEM,)),
    _r("guest-virtio-missing", ERROR, "guest", "virtio drivers missing for the default kernel",
       "On KVM the system disk is virtio-blk: virtio_blk and virtio_pci must be built into the default kernel or "
       "carried by its initramfs, and virtio_net built in or installed as a module, or the instance finds no "
       "disk or network.", "§1.4 L1 (A-VIRTIO, A-CHECK GUESTOS.Virtio)", (SYSTEM,)),
    _r("guest-initramfs-unreadable", WARNING, "guest", "Initramfs of the default kernel cannot be read",
       "Which drivers the default kernel has at boot depends on its initramfs; it could not be read, so its "
       "virtio/NVMe drivers are not known.", "§1.4 L1 (A-VIRTIO) [inference]", (SYSTEM,)),
    _r("guest-nvme", INFO, "guest", "NVMe readiness (Features.NvmeSupport)",
       "NVMe-only instance families need the nvme driver at boot; declare Features.NvmeSupport=supported only "
       "when the default kernel has it built in or in its initramfs.", "§1.2 Features.NvmeSupport, §1.4 L2 "
       "(A-NVME, A-CHECK GUESTOS.Nvme)", (SYSTEM,)),
    _r("guest-fstab-unresolved", ERROR, "guest", "/etc/fstab names a file system that is not there",
       "A mount that is not 'nofail' and whose UUID, LABEL or device is on no volume of the disk (nor of a data "
       "disk validated with it) stops the boot in emergency mode.",
       "§1.4 L3 (A-CHECK GUESTOS.Fstab, A-SPEC)", (SYSTEM,)),
    _r("guest-device-name", WARNING, "guest", "Kernel device names in fstab or on the kernel command line",
       "/dev/sda1-style names change with the disk bus (virtio: /dev/vda, NVMe: /dev/nvme0n1); use UUID= or "
       "LABEL=.", "§1.4 L3/L4 (A-SPEC: 'use UUID in fstab and grub')", (SYSTEM,)),
    _r("guest-boot-entry-broken", ERROR, "guest", "Default boot entry cannot boot",
       "The boot loader's default entry names a kernel or initrd that is not in the image, or a root= that "
       "resolves to no file system.", "§1.4 L4 (A-CHECK GUESTOS.Grub)", (SYSTEM,)),
    _r("guest-boot-recovery-mode", WARNING, "guest", "Default boot entry boots into rescue or emergency mode",
       "Kernel arguments such as single, emergency or systemd.unit=rescue.target stop the boot at a root "
       "console: no network, no SSH, no cloud-init, and a new instance has no password to enter there.",
       "§1.4 L4 (A-CHECK GUESTOS.Grub) [inference: the arguments from systemd's kernel-command-line(7), "
       "https://www.freedesktop.org/software/systemd/man/latest/kernel-command-line.html]", (SYSTEM,)),
    _r("guest-boot-config-missing", WARNING, "guest", "No boot loader configuration found",
       "No grub.cfg, BLS entry or menu.lst was found: the default kernel (and so its drivers) is not known.",
       "§1.4 L4 (A-CHECK GUESTOS.Grub) [inference]", (SYSTEM,)),
    _r("guest-static-ip", ERROR, "guest", "Static IP address on the primary interface",
       "ECS gives addresses by DHCP; a static address leaves the instance unreachable.",
       "§1.4 L5 (A-CHECK GUESTOS.Dhcp, A-INSTR)", (SYSTEM,)),
    _r("guest-static-ip-cloud-init", WARNING, "guest", "Static IP address in a file cloud-init generates",
       "cloud-init renders the network configuration from the instance's metadata on the first boot, "
       "replacing the file that holds the static address, unless its network configuration is disabled "
       "(network: {config: disabled}, then it is guest-static-ip).",
       "§1.4 L5, L7 (A-CHECK GUESTOS.Dhcp, A-CINIT) [inference: cloud-init's Network configuration, "
       "https://cloudinit.readthedocs.io/en/latest/reference/network-config.html]", (SYSTEM,)),
    _r("guest-mac-address", WARNING, "guest", "Network configuration pinned to a MAC address",
       "The instance's NIC has a new MAC address: a configuration bound to the old one is not applied.",
       "§1.4 L6 (Huawei IMS, Oracle G03)", (SYSTEM,)),
    _r("guest-persistent-net-rules", WARNING, "guest", "udev persistent-net rules",
       "70-persistent-net.rules pins interface names to the old MAC addresses: the new NIC becomes eth1.",
       "§1.4 L6 (Huawei IMS, Oracle G03)", (SYSTEM,)),
    _r("guest-cloud-init-missing", WARNING, "guest", "cloud-init not installed",
       "cloud-init sets the hostname, password, keys and grows the root partition on first boot.",
       "§1.4 L7 (A-INSTR, A-CINIT, A-CHECK GUESTOS.CloudInit)", (SYSTEM,)),
    _r("guest-cloud-init-disabled", WARNING, "guest", "cloud-init installed but not running",
       "cloud-init that is disabled (/etc/cloud/cloud-init.disabled, cloud-init=disabled on the kernel command "
       "line), masked or not enabled in systemd, or limited to a datasource_list without AliYun does not set the "
       "hostname, password, keys or network on first boot: as if it were missing.",
       "§1.4 L7 (A-INSTR, A-CINIT, A-CHECK GUESTOS.CloudInit); cloud-init docs (boot stages, datasource_list)",
       (SYSTEM,)),
    _r("guest-ssh-host-keys-missing", WARNING, "guest", "SSH host keys missing",
       "Without host keys sshd does not start (Debian's ssh.service generates none; RHEL's sshd-keygen and "
       "SUSE's sshd-gen-keys-start do); cloud-init would create them, but it is not running: no SSH login.",
       "§1.4 L7 (A-CINIT) [inference]; Debian's openssh-server (ssh.service makes no host keys)", (SYSTEM,)),
    _r("guest-cloud-init-old", WARNING, "guest", "cloud-init older than 0.7.9",
       "cloud-init versions before 0.7.9 are unsuitable and must be upgraded.", "§1.4 L7 (A-INSTR, A-CINIT)",
       (SYSTEM,)),
    _r("guest-qemu-guest-agent", WARNING, "guest", "qemu-guest-agent installed",
       "Alibaba asks for qemu-ga to be removed: some services ECS needs may be unavailable with it.",
       "§1.4 L8 (A-INSTR, A-INSTR-CN, A-TOOL)", (SYSTEM,)),
    _r("guest-selinux-enforcing", WARNING, "guest", "SELinux enforcing",
       "An enforcing SELinux may stop the first boot (relabelling, ECS agents); the image check recommends it "
       "disabled. Reported when SELinux is loaded at all: a policy is installed or the kernel command line "
       "enables it (on Debian, with AppArmor, the config file alone does nothing).",
       "§1.4 L11 (A-INSTR, A-CHECK GUESTOS.Selinux)", (SYSTEM,)),
    _r("guest-shadow-immutable", ERROR, "guest", "/etc/shadow is immutable",
       "ECS writes the root password into /etc/shadow; an immutable (chattr +i) or append-only file makes "
       "that fail.", "§1.4 L12 (A-INSTR, A-TOOL 'shadow file authority')", (SYSTEM,)),
    _r("guest-root-account", WARNING, "guest", "Root account or passwd command missing",
       "ECS sets the password of root with passwd: both must exist.", "§1.4 L12 (A-TOOL 'root', 'passwd')",
       (SYSTEM,)),
    _r("guest-lib-absolute-symlink", WARNING, "guest", "/lib or /lib64 is an absolute symbolic link",
       "The compliance tool requires /lib and /lib64 links to be relative (usr/lib), so that the disk works "
       "mounted elsewhere (repair, image check).", "§1.4 L15 (A-TOOL 'lib')", (SYSTEM,)),
    _r("guest-root-not-last", WARNING, "guest", "Root partition is not the last partition",
       "growpart can only extend the last partition: the root file system should be last so that it grows "
       "into a larger system disk.", "§1.3 P6, §1.4 L10 (A-SPEC)", (SYSTEM,)),
    _r("guest-arm64-not-uefi", ERROR, "guest", "arm64 image without UEFI boot",
       "ImportImage takes arm64 images with BootMode=UEFI only.", "§1.2 BootMode, §1.3 P3 (A-API-IMP)",
       (SYSTEM,)),
    # -- guest: Windows --------------------------------------------------------------------------
    _r("windows-client-edition", ERROR, "guest", "Windows client edition",
       "ECS imports Windows Server only; client editions (XP, 7, 8, 8.1, 10, 11) are refused.",
       "§1.5 W1 (A-INSTR, A-API-IMP)", (SYSTEM,)),
    _r("windows-version-unsupported", ERROR, "guest", "Windows Server release not supported",
       "ECS imports Windows Server 2003 SP1 to 2022; older releases (2003 before SP1, 2000) are refused.",
       "§1.5 W1 (A-INSTR, A-API-IMP)", (SYSTEM,)),
    _r("windows-version-unlisted", WARNING, "guest", "Windows Server release not in ECS's list",
       "The import documentation lists Windows Server 2003 SP1 to 2022; a later or semi-annual release imports as "
       "Platform 'Other Windows', without the configuration ECS applies to the listed ones.",
       "§1.2 Platform, §1.5 W1 (A-API-IMP) [inference]", (SYSTEM,)),
    _r("windows-registry-unreadable", ERROR, "guest", "Registry hive missing or damaged",
       "Windows cannot boot without readable SYSTEM and SOFTWARE hives; the image check rejects invalid hives.",
       "§1.6 GUESTOS.Registry (A-CHECK)", (SYSTEM,)),
    _r("windows-registry-dirty", WARNING, "guest", "Registry hive not cleanly saved",
       "The hive's sequence numbers or checksum show Windows was writing it when the image was taken: newer data "
       "lies in its transaction logs (.LOG1, .LOG2), which Windows replays at boot; here they are missing or "
       "unusable, so what is read may be stale.",
       "§1.6 GUESTOS.Registry (A-CHECK) [inference]", (SYSTEM,)),
    _r("windows-registry-replayed", INFO, "guest", "Registry hive read with its transaction logs",
       "The hive was being written when the image was taken; its transaction logs were replayed in memory as "
       "Windows does when it loads the hive (the log formats of Maxim Suhanov's registry format specification), "
       "so the facts are the ones Windows will boot with.", "§1.6 GUESTOS.Registry (A-CHECK) [inference]",
       (SYSTEM,)),
    _r("windows-boot-driver-missing", ERROR, "guest", "No storage driver loads at boot",
       "The system disk is virtio-blk (viostor), virtio-scsi (vioscsi) or NVMe (stornvme): one of them must be a "
       "boot-start service (Start=0) with its driver file present (before Windows Server 2012 also bound to the "
       "device in the CriticalDeviceDatabase), or Windows stops with INACCESSIBLE_BOOT_DEVICE.",
       "§1.5 W3 (A-WIN-NVME, A-VIRTIO; CriticalDeviceDatabase PCI IDs: inference)", (SYSTEM,)),
    _r("windows-virtio-readonly", ERROR, "guest", "Read-only community virtio driver files",
       "Community (Fedora/Red Hat) virtio drivers are not supported; ECS replaces them at import, which fails while "
       "netkvm.sys, balloon.sys, vioser.sys, viostor.sys or pvpanic.sys are read-only.",
       "§1.5 W2 (A-INSTR, A-VIRTIO)", (SYSTEM,)),
    _r("windows-boot-files-missing", ERROR, "guest", "Windows boot manager or BCD missing or damaged",
       "BIOS starts \\bootmgr and \\Boot\\BCD from the active partition (ntldr and boot.ini before Windows Server "
       "2008); UEFI starts \\EFI\\Microsoft\\Boot\\bootmgfw.efi and its BCD from the EFI system partition. A BCD "
       "store is a registry hive that must hold the boot manager's object.",
       "§1.5 W7 (A-CHECK GUESTOS.BCD, GUESTOS.BootMgr)", (SYSTEM,)),
    _r("windows-upper-filter-missing", ERROR, "guest", "Disk upper filter driver missing",
       "A driver listed in the disk class's UpperFilters whose file is missing (left by uninstalled backup or "
       "encryption software) stops the disk stack at boot.", "§1.5 W7 (A-CHECK GUESTOS.Disk)", (SYSTEM,)),
    _r("windows-xen-leftovers", WARNING, "guest", "Xen paravirtual driver leftovers",
       "Xen PV drivers that hide the emulated devices (XenPCI hide_devices) or still start at boot get in the way "
       "of the KVM devices.", "§1.5 W7 (A-CHECK GUESTOS.Xen)", (SYSTEM,)),
    _r("windows-driver-install-disabled", WARNING, "guest", "Driver installation disabled",
       "ECS installs its drivers at import and first boot; a switch or policy that disables device installation "
       "stops that.", "§1.5 W7 (A-CHECK GUESTOS.Server)", (SYSTEM,)),
    _r("windows-hotfix", WARNING, "guest", "Known-bad or missing Windows updates",
       "The image check asks to uninstall KB5009624, KB5009595, KB5009546, KB5009557, KB5009555, KB5014738, "
       "KB5014702, KB5014692 and KB5014678, and Windows Server 2008 R2 needs KB3033929 (SHA-2 driver signatures).",
       "§1.5 W7 (A-CHECK GUESTOS.Hotfix)", (SYSTEM,)),
    _r("windows-qemu-ga", WARNING, "guest", "QEMU guest agent installed",
       "Alibaba asks for qemu-ga to be removed: some services ECS needs may be unavailable with it.",
       "§1.5 W4 (A-INSTR)", (SYSTEM,)),
    _r("windows-nvme", INFO, "guest", "NVMe readiness (Features.NvmeSupport)",
       "NVMe-only instance families need stornvme as a boot-start driver; declare Features.NvmeSupport=supported "
       "only then.", "§1.2 Features.NvmeSupport, §1.5 W3 (A-WIN-NVME)", (SYSTEM,)),
    # -- disk set -------------------------------------------------------------------------------
    _r("too-many-data-disks", ERROR, "set", "Too many data disks",
       "ImportImage takes one system disk and at most 16 data disks (DiskDeviceMapping.1-17).",
       "§1.1 F7 (A-API-IMP)"),
    _r("duplicate-disk", WARNING, "set", "Same image given twice",
       "The same file is listed as two disks of one machine.", "§1.1 F7 (A-API-IMP) [inference]"),
)

RULES_BY_CODE: dict[str, Rule] = {rule.code: rule for rule in RULES}
assert len(RULES_BY_CODE) == len(RULES), "duplicate rule code"

CATEGORIES = ("container", "integrity", "size", "partitions", "filesystems", "boot", "guest", "set")


def profile(target: str) -> Profile:
    from ..errors import UsageError

    try:
        return PROFILES[target.lower()]
    except KeyError:
        raise UsageError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}") from None


def list_rules(target: str = "ecs") -> list[Rule]:
    """The rules checked for ``target``, in catalogue order."""
    name = profile(target).name
    return [rule for rule in RULES if name in rule.targets]


def render_rules_text(rules: list[Rule]) -> str:
    lines: list[str] = []
    category = None
    for rule in rules:
        if rule.category != category:
            category = rule.category
            lines.append(f"{'' if not lines else chr(10)}[{category}]")
        roles = "" if rule.roles == BOTH else f" ({', '.join(rule.roles)} disk)"
        lines.append(f"  {rule.code:<34} {rule.severity.value:<7} {rule.title}{roles}")
        lines.append(f"      {rule.rationale}")
        label = "inferred from" if rule.inference else "source"
        for reference in rule.references:
            lines.append(f"      {label}: {reference.title}, {reference.url}")
    return "\n".join(lines)
