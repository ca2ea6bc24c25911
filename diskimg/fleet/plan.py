"""The batch plan: JSON Lines, one job a line, every line checked before any job runs.

A line is ``{"id": "web1-system", "op": "convert", "source": "...", "target": "..."}``: an ``id``
unique in the plan, an ``op`` (``validate``, ``convert``, ``export``, ``verify``, ``unpack``) and
that operation's arguments, named and typed as the keyword arguments of its function in the public
API (``diskimg.convert(source, target, output_format, ...)``). A batch that stops on a bad value after
running half the fleet would leave the user to sort out what ran, so a misspelled key, a wrong type,
an unknown format or a missing argument is refused up front, naming the line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from ..choices import ArchiveKind, Backend, BootMode, DiskRole, ExportLayout, VhdSizeRule
from ..errors import UsageError
from ..formats import canonical_format

#: a checker returns why a value is wrong, or None
Check = Callable[[Any], "str | None"]

#: largest plan line and plan accepted: a plan is a list of jobs, not data
MAX_LINE = 64 * 1024
MAX_JOBS = 1_000_000


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be a whole number, 0 or more"


def _texts(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(item, str) and item for item in value)
    return None if ok else "must be a list of non-empty strings"


def _options(value: Any) -> str | None:
    """qemu-img style ``k=v,k2=v2``, or an object of strings, as convert takes."""
    if isinstance(value, str) or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        return None
    return "must be a string k=v,k2=v2 or an object of strings"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"
    return check


def _image_format(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    try:
        canonical_format(value)
    except UsageError as exc:
        return str(exc)
    return None


def _target(value: Any) -> str | None:
    from ..validation.rules import profile

    if not isinstance(value, str):
        return "must be a string"
    try:
        profile(value)
    except UsageError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Operation:
    """One operation a job can run: the public API function that does it and its arguments."""

    name: str
    #: argument -> its check, for the keyword arguments of ``diskimg.<name>`` a plan may give
    arguments: Mapping[str, Check]
    required: tuple[str, ...]
    #: the arguments that name a file the job writes (two jobs may not write the same one)
    outputs: tuple[str, ...] = ()
    #: the result's attribute that is the command's yes/no answer (exit 1 when false), if it has one
    answer: str | None = None


OPERATIONS = {op.name: op for op in (
    Operation("validate", {
        "image": _text, "role": _one_of(*get_args(DiskRole)), "target": _target,
        "boot_mode": _one_of(*get_args(BootMode)),
        "strict": _flag, "system": _text, "data": _texts, "allow_backing": _flag}, (), answer="importable"),
    Operation("convert", {
        "source": _text, "target": _text, "output_format": _image_format, "options": _options, "compress": _flag,
        "align": _count, "zero_granularity": _count, "checksum": _flag,
        "backend": _one_of(*get_args(Backend)), "source_format": _text, "allow_backing": _flag,
        "snapshot": _text, "vhd_size": _one_of(*get_args(VhdSizeRule)), "force": _flag, "sparsify": _flag},
        ("source", "target"), ("target",)),
    Operation("export", {
        "name": _text, "system": _text, "data": _texts, "out": _text, "output_format": _image_format,
        "archive": _one_of(*get_args(ArchiveKind)), "layout": _one_of(*get_args(ExportLayout)),
        "devices": _texts, "threads": _count, "zero_granularity": _count, "compress": _flag,
        "allow_backing": _flag, "force": _flag, "sparsify": _flag}, ("name", "system")),
    Operation("verify", {"path": _text, "deep": _flag}, ("path",), answer="intact"),
    Operation("unpack", {"source": _text, "out": _text, "output_format": _image_format, "force": _flag},
              ("source", "out")),
)}


@dataclass(frozen=True)
class Job:
    """One line of the plan: one unit of work, run by one worker."""

    id: str
    op: str
    arguments: dict[str, Any]
    #: hash of the line's content: a journaled result counts only for the same id *and* line
    key: str

    @property
    def ref(self) -> str:
        """The job as the journal names it: an edited line is a different job."""
        return f"{self.id}@{self.key}"


def read_plan(path: str | os.PathLike[str], *, absolute_paths: bool = False) -> list[Job]:
    """Every job of the plan at ``path``, or a UsageError naming the first bad line. Blank lines and
    lines starting with ``#`` are skipped. ``absolute_paths`` refuses relative paths (jobs that run on
    other machines do not share our working directory)."""
    plan = os.fspath(path)
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    outputs: dict[str, int] = {}
    try:
        f = open(plan, "rb")  # noqa: SIM115 - opened apart so only its errors are translated; `with f` below
    except OSError as exc:
        raise UsageError(f"cannot read the plan: {exc.strerror}", path=plan) from None
    with f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if not raw.strip() or raw.lstrip().startswith(b"#"):
                continue
            if len(jobs) == MAX_JOBS:
                raise UsageError(f"more than {MAX_JOBS} jobs", path=plan)
            try:
                job = _parse_line(raw, absolute_paths)
            except ValueError as exc:
                raise UsageError(f"line {number}: {exc}", path=plan) from None
            if job.id in seen:
                raise UsageError(f"line {number}: id {job.id!r} is already the id of line {seen[job.id]}", path=plan)
            seen[job.id] = number
            for name in OPERATIONS[job.op].outputs:
                written = os.path.abspath(job.arguments[name])
                if written in outputs:
                    raise UsageError(f"line {number}: {name} {job.arguments[name]!r} is also written by line "
                                     f"{outputs[written]}", path=plan)
                outputs[written] = number
            jobs.append(job)
    if not jobs:
        raise UsageError("the plan has no jobs", path=plan)
    return jobs


def _parse_line(raw: bytes, absolute_paths: bool) -> Job:
    if len(raw) > MAX_LINE:  # read no further: the rest of it would be taken for the next line
        raise ValueError(f"longer than {MAX_LINE} bytes")
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not a JSON object ({exc})") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    job_id, op_name = entry.pop("id", None), entry.pop("op", None)
    if not isinstance(job_id, str) or not job_id or len(job_id) > 200 or not job_id.isprintable():
        raise ValueError("'id' must be a non-empty printable string of at most 200 characters")
    if op_name not in OPERATIONS:
        raise ValueError(f"'op' must be one of {', '.join(OPERATIONS)}")
    op = OPERATIONS[op_name]
    unknown = sorted(set(entry) - set(op.arguments))
    if unknown:
        raise ValueError(f"{op_name} takes no {', '.join(map(repr, unknown))} (it takes {', '.join(op.arguments)})")
    missing = [name for name in op.required if name not in entry]
    if missing:
        raise ValueError(f"{op_name} needs {', '.join(map(repr, missing))}")
    for name, value in entry.items():
        problem = op.arguments[name](value)
        if problem:
            raise ValueError(f"{name!r} {problem}")
    if op_name == "validate":
        _check_disk_set(entry)
    if absolute_paths:
        for name in ("image", "system", "data", "source", "target", "out", "path"):
            for value in ([entry[name]] if isinstance(entry.get(name), str) else entry.get(name) or []):
                if not os.path.isabs(value):
                    raise ValueError(f"{name!r} {value!r} must be an absolute path when jobs run on a cluster")
    canonical = json.dumps({"id": job_id, "op": op_name, **entry}, sort_keys=True, separators=(",", ":"))
    key = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return Job(job_id, op_name, entry, key)


def _check_disk_set(arguments: dict[str, Any]) -> None:
    """validate takes one disk (``image``) or a machine's set (``system`` + ``data``), not both."""
    if ("image" in arguments) == ("system" in arguments):
        raise ValueError("validate needs either 'image' (one disk) or 'system' (a machine's disk set)")
    if "data" in arguments and "system" not in arguments:
        raise ValueError("'data' disks go with 'system'")
    if "role" in arguments and "system" in arguments:
        raise ValueError("'role' is for one 'image'; with 'system' and 'data' the roles are given")
