"""The volume stacks of a machine: what its partitions hold when they are not file systems.

:func:`assemble` is given every disk of a machine (the system disk and its data disks, as one ``validate``
call names them) with its base volumes (partitions, or the whole disk). It finds the LVM2 physical volumes
among them, assembles their volume groups across all the disks, and returns a :class:`GuestVolume` for each
visible logical volume: readable through :class:`~diskimg.inspection.volumes.lvm.LvmVolume` (its file system
probed there), or with the reason it is not (a thin or snapshot volume, an extent on a missing PV). Each
container volume gets the facts of what it holds (``GuestVolume.holds``), so the report shows the stack
(partition -> PV -> VG/LV -> file system) and the guest's names for a volume (``/dev/mapper/VG-LV``,
``/dev/VG/LV``) resolve to it.

An assembled volume belongs to the disk holding the first of its physical volumes (in the order the disks
were given, partitions in order), so the system disk holds every volume group it has a part of. Only
metadata is read here: labels, metadata areas, and the head of each logical volume for its file system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import DiskImageError
from ...units import format_size
from ..signatures import Disk, probe
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
    areas: list[tuple[int, GuestVolume, Disk]] = []  # (disk index, PV volume, where it is read)
    for index, machine_disk in enumerate(disks):
        if machine_disk is None:
            continue
        for volume in machine_disk.volumes:
            if volume.fs_type == "lvm2":
                areas.append((index, volume, volume.source if volume.source is not None else machine_disk.disk))
    if areas:
        _assemble_lvm(found, areas)
    return found


def _assemble_lvm(found: MachineStack, areas: list[tuple[int, GuestVolume, Disk]]) -> None:
    scan = find_volume_groups((disk, volume.offset, volume.length) for _, volume, disk in areas)
    for problem in scan.problems:
        found.problems[_problem_disk(problem, areas)].append(_problem_text(problem, areas))
    in_group: dict[str, VolumeGroup] = {}
    for group in scan.volume_groups:
        for uuid in group.physical_volumes:
            in_group[uuid] = group
    for pv in scan.physical_volumes:
        index, volume, _ = areas[pv.source]
        group = in_group.get(pv.uuid)
        found.pv_groups[id(volume)] = group
        facts: dict[str, Any] = {"uuid": pv.uuid, "vg": group.name if group else None,
                                 "vg_uuid": group.uuid if group else None}
        where = f" of VG {group.name}" if group else ", in no volume group that could be read"
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
