"""The result of a structural check (``diskimg check``, like ``qemu-img check``): what each format's
check fills in (``detection/check.py`` runs them), and how it is shown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: problems kept in a result (the counts go on)
MAX_PROBLEMS = 200


@dataclass
class CheckProblem:
    """One thing found wrong. ``kind``: corruption, leak, truncated, warning or error (the check
    itself could not go on)."""

    kind: str
    message: str
    offset: int | None = None
    structure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.offset is not None:
            entry["offset"] = self.offset
        if self.structure is not None:
            entry["structure"] = self.structure
        return entry


@dataclass
class CheckResult:
    """What ``check`` found. ``clean`` means nothing but warnings."""

    filename: str
    format: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    warnings: int = 0
    truncated: bool = False
    #: header flags that say the image needs attention ("dirty", "corrupt")
    flags: list[str] = field(default_factory=list)
    problems: list[CheckProblem] = field(default_factory=list)
    problems_omitted: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    #: guest offset of the first compressed cluster (qcow2, active layer)
    first_compressed_offset: int | None = None
    leaked_clusters: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors or self.truncated or self.flags)

    def add(self, kind: str, message: str, offset: int | None = None, structure: str | None = None,
            times: int = 1) -> None:
        """Record a problem; ``times``: how often it counts (a table referenced that many times)."""
        if kind == "corruption":
            self.corruptions += times
        elif kind == "leak":
            self.leaks += times
        elif kind == "error":
            self.check_errors += times
        elif kind == "warning":
            self.warnings += 1
        elif kind == "truncated":
            self.truncated = True
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(CheckProblem(kind, message, offset, structure))
        else:
            self.problems_omitted += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "format": self.format,
            "clean": self.clean,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "check_errors": self.check_errors,
            "warnings": self.warnings,
            "truncated": self.truncated,
            "flags": list(self.flags),
            "image_end_offset": self.image_end_offset,
            "total_clusters": self.total_clusters,
            "allocated_clusters": self.allocated_clusters,
            "fragmented_clusters": self.fragmented_clusters,
            "compressed_clusters": self.compressed_clusters,
            "first_compressed_offset": self.first_compressed_offset,
            "problems": [p.to_dict() for p in self.problems],
            "problems_omitted": self.problems_omitted,
        }

    def render_text(self) -> str:
        lines = []
        for problem in self.problems:
            where = ""
            if problem.structure or problem.offset is not None:
                at = None if problem.offset is None else f"offset {problem.offset}"
                parts = [p for p in (problem.structure, at) if p]
                where = f" ({', '.join(parts)})"
            lines.append(f"{problem.kind.upper()}: {problem.message}{where}")
        if self.problems_omitted:
            lines.append(f"... and {self.problems_omitted} more problems")
        if self.clean:
            lines.append("No errors were found on the image.")
        else:
            summary = []
            if self.corruptions:
                summary.append(f"{self.corruptions} errors were found on the image (corruptions)")
            if self.leaks:
                summary.append(f"{self.leaks} leaked clusters were found on the image")
            if self.truncated:
                summary.append("the image is truncated")
            if self.check_errors:
                summary.append(f"{self.check_errors} internal errors occurred during the check")
            if self.flags:
                summary.append(f"header flags set: {', '.join(self.flags)}")
            lines.append("; ".join(summary) + ".")
        if self.allocated_clusters is not None and self.total_clusters:
            share = 100.0 * self.allocated_clusters / self.total_clusters
            lines.append(f"{self.allocated_clusters}/{self.total_clusters} = {share:.2f}% allocated"
                         + (f", {self.compressed_clusters} compressed" if self.compressed_clusters else ""))
        if self.image_end_offset is not None:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)
