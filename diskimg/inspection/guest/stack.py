"""The volume stacks of a machine: what its partitions hold when they are not file systems.

:func:`assemble` is given every disk of a machine (the system disk and its data disks, as one ``validate``
call names them) with its base volumes (partitions, or the whole disk), and builds what lies on them, in the
order Linux does:

1. md RAID members are grouped by array UUID; a RAID1 array is read through one in-sync member
   (:func:`~diskimg.inspection.volumes.md.open_raid1`), other levels are named with the reason they are not read;
2. LVM2 physical volumes (on partitions, whole disks and arrays) are assembled into volume groups across all
   the disks; each visible logical volume is read through :class:`~diskimg.inspection.volumes.lvm.LvmVolume`,
   or named with the reason it is not (a thin or snapshot volume, an extent on a missing PV);
3. LUKS and BitLocker headers, wherever they lie, are read for their UUID and cipher; they are never opened.

Each assembled volume is a :class:`GuestVolume` whose file system is probed through it, and each container
volume gets the facts of what it holds (``GuestVolume.holds``), so the report shows the stack (partition ->
PV -> VG/LV -> file system; partition -> LUKS; partition -> md member -> array) and the guest's names for a
volume (``/dev/mapper/VG-LV``, ``/dev/VG/LV``, ``/dev/md/NAME``) resolve to it.

An assembled volume belongs to the disk holding the first of its physical volumes or members (in the order
the disks were given, partitions in order), so the system disk holds every volume group it has a part of.
Only metadata is read here: labels, superblocks, headers and the head of each assembled volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import DiskImageError
from ...units import format_size
from ..signatures import Disk, probe
from ..volumes import bitlocker, luks, md
from ..volumes.lvm import LogicalVolume, LvmProblem, VolumeGroup, find_volume_groups
from . import GuestVolume, Layer

#: LV kinds that hold other LVs, never a file system: named among their group's volumes, not made volumes
POOL_KINDS = frozenset({"thin-pool", "cache-pool", "vdo-pool"})


@dataclass
class MachineDisk:
    """One disk of the machine: ``label`` names it in messages (its image path)."""

    label: str
    disk: Disk
    volumes: list[GuestVolume]


@dataclass
class MachineStack:
    """What :func:`assemble` found, by disk (in the order given): the volumes assembled on each, the volume
    groups each holds (the first of their PVs), and what could not be read, in words."""

    volumes: list[list[GuestVolume]]
    volume_groups: list[list[VolumeGroup]]
    problems: list[list[str]]
    #: the volume group each PV volume belongs to (by ``id`` of the volume): None for a PV in no group
    pv_groups: dict[int, VolumeGroup | None] = field(default_factory=dict)


def assemble(disks: list[MachineDisk | None]) -> MachineStack:
    """The stacks on ``disks`` (None for a disk that cannot be read: it holds nothing)."""
    found = MachineStack([[] for _ in disks], [[] for _ in disks], [[] for _ in disks])
    placed: list[tuple[int, GuestVolume, Disk]] = []  # (disk index, volume, what it is read from), in order
    for index, machine_disk in enumerate(disks):
        if machine_disk is not None:
            placed += [(index, volume, machine_disk.disk) for volume in machine_disk.volumes]
    placed += _assemble_arrays(found, [item for item in placed if item[1].fs_type == "md"])
    physical = [item for item in placed if item[1].fs_type == "lvm2"]
    if physical:
        _assemble_lvm(found, [(index, volume, _source(volume, disk)) for index, volume, disk in physical])
    for index, machine_disk in enumerate(disks):
        everything = (machine_disk.volumes if machine_disk is not None else []) + found.volumes[index]
        for volume in everything:
            if volume.fs_type in ("luks", "bitlocker") and machine_disk is not None:
                volume.holds = _encrypted(volume, _source(volume, machine_disk.disk))
    return found


def _source(volume: GuestVolume, disk: Disk) -> Disk:
    return volume.source if volume.source is not None else disk


def _assemble_arrays(found: MachineStack, members: list[tuple[int, GuestVolume, Disk]]
                     ) -> list[tuple[int, GuestVolume, Disk]]:
    """An array volume for each md array among ``members`` (grouped by array UUID, homed on the disk of its
    first member): a RAID1 array read through its first in-sync member, another level named, not read."""
    arrays: dict[str, list[tuple[int, GuestVolume, md.MdSuperblock, Disk]]] = {}  # by array UUID
    for index, volume, disk in members:
        try:
            superblock = md.find_superblock(disk, volume.offset, volume.length)
        except DiskImageError as exc:
            found.problems[index].append(f"{volume.name}: {exc.message}")
            continue
        if superblock is None:
            continue
        volume.holds = Layer("md-member", f"md member ({superblock.state}) of {superblock.level_name} array "
                             f"{superblock.name or superblock.uuid}",
                             {"uuid": superblock.uuid, "name": superblock.name, "level": superblock.level_name,
                              "version": superblock.version, "role": superblock.role, "state": superblock.state})
        arrays.setdefault(superblock.uuid, []).append((index, volume, superblock, disk))
    assembled = []
    for uuid, legs in arrays.items():
        first = legs[0][2]
        facts = {"uuid": uuid, "name": first.name, "level": first.level_name, "members": len(legs),
                 "raid_disks": first.raid_disks, "size": first.array_member_size}
        short = (first.name or "").rpartition(":")[2]  # mdadm names the array /dev/md/NAME, its homehost left out
        array = GuestVolume(f"md array {short or uuid}", None, 0, first.array_member_size, None,
                            below=tuple(leg[1] for leg in legs),
                            layer=Layer("md-array", f"md {first.level_name} array {short or uuid}", facts),
                            device_names=(f"/dev/md/{short}",) if short else ())
        reasons = []
        for _, volume, superblock, disk in legs:
            try:
                array.source = md.open_raid1(disk, volume.offset, volume.length, superblock)
                break
            except DiskImageError as exc:
                reasons.append(f"{volume.name}: {exc.message}")
        found.volumes[legs[0][0]].append(array)
        if array.source is None:
            array.unreadable = "; ".join(reasons)
            continue
        try:
            array.fs = probe(array.source, 0, array.length)
        except DiskImageError as exc:
            array.unreadable = f"it cannot be read: {exc.message}"
            continue
        assembled.append((legs[0][0], array, array.source))
    return assembled


def _encrypted(volume: GuestVolume, disk: Disk) -> Layer:
    """What a LUKS or BitLocker header says: its UUID and cipher (or why it cannot be read)."""
    kind = volume.fs_type or ""
    reader = luks.read_luks if kind == "luks" else bitlocker.read_bitlocker
    shown = "LUKS" if kind == "luks" else "BitLocker"
    try:
        header = reader(disk, volume.offset, volume.length)
    except DiskImageError as exc:
        return Layer(kind, f"{shown} (its header cannot be read: {exc.message})", {"error": exc.message})
    if header is None:
        return Layer(kind, shown, {})
    facts = {"version": header.version, "uuid": header.uuid, "cipher": header.cipher, "label": header.label}
    words = [shown + (header.version if kind == "luks" else ""), header.uuid, f"({header.cipher or 'cipher unknown'})"]
    return Layer(kind, " ".join(word for word in words if word), facts)


def _assemble_lvm(found: MachineStack, areas: list[tuple[int, GuestVolume, Disk]]) -> None:
    scan = find_volume_groups((disk, volume.offset, volume.length) for _, volume, disk in areas)
    for problem in scan.problems:
        found.problems[_problem_disk(problem, areas)].append(_problem_text(problem, areas))
    in_group: dict[str, VolumeGroup] = {}
    for group in scan.volume_groups:
        for uuid in group.physical_volumes:
            in_group[uuid] = group
    for pv in scan.physical_volumes:
        _, volume, _ = areas[pv.source]
        owner = in_group.get(pv.uuid)
        found.pv_groups[id(volume)] = owner
        facts: dict[str, Any] = {"uuid": pv.uuid, "vg": owner.name if owner else None,
                                 "vg_uuid": owner.uuid if owner else None}
        where = f" of VG {owner.name}" if owner else ", in no volume group that could be read"
        volume.holds = Layer("lvm-pv", f"LVM2 PV {pv.uuid}{where}", facts)
    for group in scan.volume_groups:
        members = sorted(group.physical_volumes.values(), key=lambda pv: pv.source)
        home = areas[members[0].source][0]
        found.volume_groups[home].append(group)
        below = tuple(areas[pv.source][1] for pv in members)
        for lv in group.logical_volumes:
            if lv.visible and lv.kind not in POOL_KINDS:
                found.volumes[home].append(_logical_volume(group, lv, below))


def _logical_volume(group: VolumeGroup, lv: LogicalVolume, below: tuple[GuestVolume, ...]) -> GuestVolume:
    """An LV as a volume: its file system probed through the LV, or the reason it cannot be read."""
    facts = {"vg": lv.vg_name, "lv": lv.name, "path": lv.path, "uuid": lv.uuid, "type": lv.kind, "size": lv.size}
    layer = Layer("lvm-lv", f"LV {lv.path} ({lv.kind}, {format_size(lv.size)})", facts)
    names = (f"/dev/mapper/{lv.mapper_name}", f"/dev/{lv.path}")
    reason = lv.unreadable_reason
    source = None
    fs = None
    if reason is None:
        source = group.open(lv.name)
        try:
            fs = probe(source, 0, lv.size)
        except DiskImageError as exc:
            reason = f"it cannot be read: {exc.message}"
    return GuestVolume(f"LV {lv.path}", None, 0, lv.size, fs, source=source, below=below, layer=layer,
                       unreadable=reason, device_names=names)


def _problem_disk(problem: LvmProblem, areas: list[tuple[int, GuestVolume, Disk]]) -> int:
    return areas[problem.source][0] if problem.source is not None else areas[0][0]


def _problem_text(problem: LvmProblem, areas: list[tuple[int, GuestVolume, Disk]]) -> str:
    if problem.source is None:
        return problem.message
    return f"{areas[problem.source][1].name}: {problem.message}"
