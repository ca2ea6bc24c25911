"""``diskimg check`` for VHDX: both copies of the headers and region table, a log waiting to be
replayed, and every rule the reader applies (metadata, BAT states, blocks inside the file and
apart from each other), reported as problems rather than raised."""

from __future__ import annotations

from typing import Any

from ...errors import CorruptImage
from ..check_result import CheckResult
from . import structures as s
from .reader import VhdxLayout


def check_vhdx(host: Any, result: CheckResult) -> None:
    """Fill ``result`` for the VHDX file ``host``."""
    size = host.size
    if size < s.HEADER_AREA:
        result.add("truncated", f"a file of {size} bytes cannot hold the VHDX header area", 0, "header")
        return
    for index, offset in enumerate(s.HEADER_OFFSETS):
        try:
            s.parse_header(host.read_at(offset, s.HEADER_SIZE))
        except s.VhdxError as exc:
            result.add("corruption", f"header {index + 1} is invalid: {exc}", offset, "header")
    tables = [host.read_at(offset, s.REGION_TABLE_SIZE) for offset in s.REGION_TABLE_OFFSETS]
    for index, (offset, table) in enumerate(zip(s.REGION_TABLE_OFFSETS, tables, strict=True)):
        try:
            s.parse_region_table(table)
        except s.VhdxError as exc:
            result.add("corruption", f"region table copy {index + 1} is invalid: {exc}", offset, "region table")
    if tables[0] != tables[1]:
        result.add("corruption", "the two copies of the region table differ", s.REGION_TABLE_OFFSETS[1],
                   "region table")
    try:
        layout = VhdxLayout.read(host)
    except CorruptImage as exc:
        kind = "truncated" if "past the end of the file" in exc.message else "corruption"
        result.add(kind, exc.message, exc.offset, exc.structure)
        return
    if layout.log_entries:
        result.flags.append("log")
        result.add("warning", f"the log holds {layout.log_entries} entries not yet replayed into the file (Hyper-V "
                   "replays them when it opens the file; diskimg replays them in memory)", layout.header.log_offset,
                   "log")
    result.total_clusters = layout.params.payload_blocks
    result.allocated_clusters = sum(layout.state_counts.get(s.PAYLOAD_STATES[state], 0)
                                    for state in (s.PAYLOAD_FULLY_PRESENT, s.PAYLOAD_PARTIALLY_PRESENT))
    result.image_end_offset = layout.image_end

