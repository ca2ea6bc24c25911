"""``diskimg check`` for VDI: every rule of structures.py over the header and the whole block map,
and the header's allocated count against the map (as ``qemu-img check`` counts it)."""

from __future__ import annotations

from ...host.files import HostFile
from ..check_result import CheckResult
from .structures import (
    HEADER_READ_SIZE,
    OFFSET_BLOCKS_ALLOCATED,
    Finding,
    block_map_findings,
    header_findings,
    parse_block_map,
    parse_header,
)

#: how a broken rule counts in a check result
_KINDS = {"corrupt": "corruption", "truncated": "truncated", "unsupported": "error"}
#: findings gathered from the block map before the check stops listing them
MAX_MAP_FINDINGS = 1000


def check_vdi(host: HostFile, result: CheckResult) -> None:
    if host.size < HEADER_READ_SIZE:
        result.add("truncated", f"a file of {host.size} bytes cannot hold a VDI header", 0, "header")
        return
    header = parse_header(host.pread(HEADER_READ_SIZE, 0))
    findings = header_findings(header, host.size)
    _report(result, findings)
    if findings:
        return
    table = parse_block_map(host.pread(4 * header.blocks_in_image, header.offset_bmap))
    _report(result, block_map_findings(header, table, host.size, limit=MAX_MAP_FINDINGS))
    blocks = header.blocks_in_image
    # entries past the image's blocks count nowhere, as in qemu-img check (they are reported above)
    inside = [entry for entry in table if entry < blocks]
    if len(inside) != header.blocks_allocated:
        result.add("corruption", f"the header counts {header.blocks_allocated} allocated blocks, the block map "
                   f"{len(inside)}", OFFSET_BLOCKS_ALLOCATED, "header")
    result.total_clusters = blocks
    result.allocated_clusters = len(inside)
    result.image_end_offset = header.offset_data + (max(inside) + 1 if inside else 0) * header.block_size


def _report(result: CheckResult, findings: list[Finding]) -> None:
    for finding in findings:
        result.add(_KINDS[finding.kind], finding.message, finding.offset, finding.structure)
