"""The pytest fixtures several test files use. Helpers and builders live in ``tests/support/``: the
fixtures call them."""

from __future__ import annotations

import lzma
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support.corpus import NO_CORPUS, corpus_dir, corpus_file
from .support.lvm import LoopLvm, TwoDisks, build_two_disks


@pytest.fixture
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt in this test, as in an interactive Python, even when the suite
    runs where SIGINT is ignored (a background job of a non-interactive shell)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def full_disk(tmp_path: Path):
    """A folder on a 1 MiB tmpfs mounted for the test (root only; skipped where mounting is not
    allowed), where writing more than that fails with ENOSPC; unmounted afterwards."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory: pytest.TempPathFactory):
    """entry -> the corpus file, decompressed once per session where stored compressed."""
    if corpus_dir() is None:
        pytest.skip(NO_CORPUS)
    cache = tmp_path_factory.mktemp("corpus")
    return lambda entry: corpus_file(entry, cache)


@pytest.fixture(scope="session")
def regipy_hives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus's registry hives (regipy/: SYSTEM, SYSTEM_B with its .LOG1/.LOG2, BCD), decompressed
    into a temporary folder (the corpus stays read-only, and none of it is copied into the repository)."""
    corpus = corpus_dir()
    if corpus is None or not (corpus / "regipy").is_dir():
        pytest.skip("the shared corpus (regipy/) is not here")
    target = tmp_path_factory.mktemp("regipy")
    for name in ("SYSTEM", "SYSTEM_B", "SYSTEM_B.LOG1", "SYSTEM_B.LOG2", "BCD"):
        (target / name).write_bytes(lzma.decompress((corpus / "regipy" / f"{name}.xz").read_bytes()))
    return target


@pytest.fixture
def lvm_tools(tmp_path: Path) -> Iterator[LoopLvm]:
    """LVM2's tools over loop devices this test attaches (detached after it)."""
    tools = LoopLvm(tmp_path)
    try:
        yield tools
    finally:
        tools.close()


@pytest.fixture
def two_disks(lvm_tools: LoopLvm, tmp_path: Path) -> TwoDisks:
    """A system and a data disk whose volume group spans both, with linear, striped, raid1, mirror, thin and
    snapshot LVs (see ``support.lvm.build_two_disks``)."""
    return build_two_disks(lvm_tools, tmp_path)
