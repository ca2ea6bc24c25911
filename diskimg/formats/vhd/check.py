"""``diskimg check`` for VHD (which qemu-img cannot check): every rule of structures.py the reader
applies - the footer and its copy at offset 0, the dynamic header, the BAT, every allocated block
inside the data area and apart from the others and the metadata, the parent locators - reported
as problems rather than raised; and the copy at offset 0 against the footer in force."""

from __future__ import annotations

from ...host.files import HostFile
from ..check_result import CheckResult
from .structures import (
    DISK_DIFFERENCING,
    DISK_FIXED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_SIZE,
    SECTOR,
    UNALLOCATED,
    Finding,
    FooterChoice,
    allocated_indices,
    bitmap_size,
    block_findings,
    choose_footer,
    choose_size,
    dynamic_header_findings,
    footer_findings,
    header_place_finding,
    locator_findings,
    metadata_regions,
    parse_bat,
    parse_dynamic_header,
)

#: how a finding counts in a check result
_KINDS = {"corrupt": "corruption", "truncated": "truncated", "warning": "warning"}


def check_vhd(host: HostFile, result: CheckResult) -> None:
    """Fill ``result`` for the VHD file ``host``."""
    size = host.size
    tail_length = min(FOOTER_SIZE, size)
    tail = host.pread(tail_length, size - tail_length)
    head = host.pread(FOOTER_SIZE, 0) if size >= 2 * FOOTER_SIZE else b""
    choice = choose_footer(head, tail, size)
    footer = choice.footer
    if footer is None:
        assert choice.problem is not None
        result.add("truncated" if size < FOOTER_SIZE else "corruption", choice.problem, choice.problem_offset, "footer")
        return
    _report_footer_copy(choice, size, result)
    virtual_size, _ = choose_size(footer)
    if _report(footer_findings(footer, choice.offset, choice.data_end, virtual_size), result):
        return
    if footer.disk_type == DISK_FIXED:
        result.image_end_offset = size
        return
    place = header_place_finding(footer, choice.offset, size)
    if place is not None:
        _report([place], result)
        return
    offset = footer.data_offset
    raw = host.pread(DYNAMIC_HEADER_SIZE, offset)
    if _report(dynamic_header_findings(raw, offset, footer, virtual_size, size), result):
        return
    header = parse_dynamic_header(raw)
    block = header.block_size
    table_bytes = header.max_table_entries * 4
    table = parse_bat(host.pread(table_bytes, header.table_offset))
    differencing = footer.disk_type == DISK_DIFFERENCING
    regions = metadata_regions(header, offset, differencing)
    _report(block_findings(table, header, virtual_size, regions, choice.data_end), result)
    if differencing:
        _report(locator_findings(header, offset, size), result)
    allocated = allocated_indices(table.tobytes())  # 0xFFFFFFFF reads alike in either byte order
    result.total_clusters = -(-virtual_size // block)
    result.allocated_clusters = len(allocated)
    highest_end = max(start + length for start, length, _ in regions)
    if allocated:
        last = max(filter(UNALLOCATED.__ne__, table))
        highest_end = max(highest_end, last * SECTOR + bitmap_size(block) + block)
    result.image_end_offset = highest_end + FOOTER_SIZE


def _report_footer_copy(choice: FooterChoice, size: int, result: CheckResult) -> None:
    """The footer at the end when the copy stands in for it; the copy at offset 0 of a dynamic or
    differencing disk: missing, damaged, or differing from the footer."""
    footer = choice.footer
    assert footer is not None
    if choice.source == "head_copy":
        kind = "corruption" if choice.tail_cookie else "truncated"
        result.add(kind, f"the footer at the end of the file is {'damaged' if choice.tail_cookie else 'missing'} "
                   f"({choice.tail_problem}); the copy at offset 0 is intact", size - FOOTER_SIZE, "footer")
        return
    if footer.disk_type == DISK_FIXED:
        return
    if choice.head_copy_problem == "absent":
        result.add("corruption", "the copy of the footer at offset 0 is missing", 0, "footer copy")
    elif choice.head_copy_problem is not None:
        result.add("corruption", f"the copy of the footer at offset 0 is damaged: {choice.head_copy_problem}", 0,
                   "footer copy")
    elif not choice.copy_matches:
        result.add("warning", "the copy of the footer at offset 0 differs from the footer at the end", 0,
                   "footer copy")


def _report(findings: list[Finding], result: CheckResult) -> bool:
    """Add the findings to the result; whether one of them stops the check."""
    for finding in findings:
        result.add(_KINDS[finding.kind], finding.message, finding.offset, finding.structure)
    return any(finding.fatal for finding in findings)
