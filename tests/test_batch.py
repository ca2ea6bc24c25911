"""diskimg batch: real batches over a fleet of images made by qemu-img, qemu-io, GNU tar and the guest
builders, a few corrupt or missing. Each job's journaled result is checked against the single
command's --json output (and exit code and error line) for the same inputs, and each converted disk
against its source with qemu-img compare. Faults: a worker killed mid-job, a batch interrupted with
SIGINT and resumed, a bad plan line; and the same plan on a real Dask LocalCluster over TCP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .support.disks import copy_in, write_boot_code
from .support.guests import ext4_image, mbr_disk, new_uuid, ubuntu_tree, write_tree
from .support.tools import ROOT, default_sigint, diskimg_cli, qemu_compare, qemu_img, qemu_io, requires_qemu, run
from .support.units import GiB, MiB

pytestmark = requires_qemu

#: what differs between two runs of the same job: times and the worker's I/O counters
VOLATILE = {"seconds", "finished", "read_bytes", "written_bytes"}
#: and an exported archive's file facts: its tar header holds the time of the export (the content
#: hash of the disk inside stays)
ARCHIVE_FILE = {"sha256", "crc64ecma", "size"}


def without_times(value: Any) -> Any:
    if isinstance(value, dict):
        archive = "member" in value and "content_hash" in value
        return {k: without_times(v) for k, v in value.items()
                if k not in VOLATILE and not (archive and k in ARCHIVE_FILE)}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source images: qcow2, dynamic and fixed VHD, sparse RAW, written by qemu-io; a Linux guest
    disk from the guest builders; two corrupt images; a tar.gz made by GNU tar; an export."""
    here = tmp_path_factory.mktemp("fleet")
    for number, (fmt, size) in enumerate([("qcow2", "24M"), ("vpc", "16M"), ("raw", "20M"), ("qcow2", "32M"),
                                          ("vpc", "8M"), ("raw", "12M")]):
        image = here / f"disk{number}.{fmt}"
        options = ["-o", "subformat=fixed"] if fmt == "vpc" and number == 4 else []
        qemu_img("create", "-q", "-f", fmt, *options, image, size)
        qemu_io(image, fmt, f"write -P 0x{number + 0x31:x} {number}M 1M", "write -P 0x5a 3M 64k")
    uuid = new_uuid()
    tree = write_tree(here / "tree", ubuntu_tree(here, uuid))
    part = ext4_image(here / "root.img", 64 * MiB, tree, uuid, "cloudimg-rootfs")
    disk = mbr_disk(here / "ubuntu.raw", 2 * GiB, [(MiB, 2 * GiB - 2 * MiB, "83")])
    copy_in(disk, part, MiB)
    write_boot_code(disk)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, here / "ubuntu.qcow2")
    for leftover in (tree, part, disk):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    # corrupt: a qcow2 whose L1 table offset points past the file, a VHD cut in its block table
    bad = here / "bad.qcow2"
    shutil.copy(here / "disk0.qcow2", bad)
    with open(bad, "r+b") as f:
        f.seek(40)
        f.write((1 << 50).to_bytes(8, "big"))
    cut = here / "cut.vpc"
    shutil.copy(here / "disk1.vpc", cut)
    os.truncate(cut, 1000)
    run("tar", "-C", here, "-czSf", here / "disk2.tar.gz", "disk2.raw")
    diskimg_cli("export", "--name", "m1", "--system", here / "disk0.qcow2", "--data", here / "disk1.vpc",
                "--out", here / "export", "--archive", "tar", check=True)
    tampered = here / "tampered"
    shutil.copytree(here / "export", tampered)
    archive = next(tampered.glob("m1_data*"))
    with open(archive, "r+b") as f:
        f.seek(2048)
        f.write(b"tampered")
    return here


def fleet_plan(src: Path, out: Path) -> list[dict[str, Any]]:
    """21 jobs over every operation: most succeed, some say no, a few fail."""
    jobs: list[dict[str, Any]] = []
    targets = ["qcow2", "vhd", "qcow2", "raw", "qcow2", "vhd"]
    for number, (source, fmt) in enumerate(zip(sorted(src.glob("disk[0-9].*[!z]")), targets)):
        jobs.append({"id": f"convert-{number}", "op": "convert", "source": str(source),
                     "target": str(out / f"{source.stem}.{fmt}"), "output_format": fmt})
    jobs.append({"id": "convert-bad", "op": "convert", "source": str(src / "bad.qcow2"), "target": str(out / "x.raw")})
    jobs.append({"id": "convert-cut", "op": "convert", "source": str(src / "cut.vpc"), "target": str(out / "y.raw")})
    jobs.append({"id": "convert-missing", "op": "convert", "source": str(src / "gone.qcow2"),
                 "target": str(out / "z.raw")})
    jobs.append({"id": "convert-checksum", "op": "convert", "source": str(src / "disk3.qcow2"),
                 "target": str(out / "sum.raw"), "checksum": True})
    jobs.append({"id": "validate-ubuntu", "op": "validate", "image": str(src / "ubuntu.qcow2")})
    jobs.append({"id": "validate-blank", "op": "validate", "image": str(src / "disk5.raw"), "role": "data"})
    jobs.append({"id": "validate-set", "op": "validate", "system": str(src / "ubuntu.qcow2"),
                 "data": [str(src / "disk0.qcow2"), str(src / "disk1.vpc")]})
    jobs.append({"id": "validate-bad", "op": "validate", "image": str(src / "bad.qcow2")})
    jobs.append({"id": "export-m2", "op": "export", "name": "m2", "system": str(src / "disk3.qcow2"),
                 "data": [str(src / "disk4.vpc")], "out": str(out / "m2"), "output_format": "qcow2"})
    jobs.append({"id": "export-missing", "op": "export", "name": "m3", "system": str(src / "gone.qcow2"),
                 "out": str(out / "m3")})
    jobs.append({"id": "verify-intact", "op": "verify", "path": str(src / "export" / "m1.manifest.json")})
    jobs.append({"id": "verify-tampered", "op": "verify", "path": str(src / "tampered"), "deep": True})
    jobs.append({"id": "unpack-tar", "op": "unpack", "source": str(src / "disk2.tar.gz"), "out": str(out / "u1")})
    jobs.append({"id": "unpack-export", "op": "unpack", "source": str(src / "export" / "m1.manifest.json"),
                 "out": str(out / "u2"), "output_format": "qcow2"})
    return jobs


def cli_args(job: dict[str, Any]) -> list[str]:
    """The single command that does what ``job`` does."""
    a = job
    if a["op"] == "convert":
        args = ["convert", a["source"], a["target"]] + (["-O", a["output_format"]] if "output_format" in a else [])
        return args + (["--checksum"] if a.get("checksum") else [])
    if a["op"] == "validate":
        if "image" in a:
            return ["validate", a["image"]] + (["--role", a["role"]] if "role" in a else [])
        return ["validate", "--system", a["system"]] + [f"--data={d}" for d in a.get("data", [])]
    if a["op"] == "export":
        args = ["export", "--name", a["name"], "--system", a["system"], "--out", a["out"]]
        args += [f"--data={d}" for d in a.get("data", [])]
        return args + (["--format", a["output_format"]] if "output_format" in a else [])
    if a["op"] == "verify":
        return ["verify", a["path"]] + (["--deep"] if a.get("deep") else [])
    return ["unpack", a["source"], "--out", a["out"]] + (["-O", a["output_format"]] if "output_format" in a else [])


def write_plan(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def read_entries(journal: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        assert entry["id"] not in entries, f"{entry['id']} journaled twice"
        entries[entry["id"]] = entry
    return entries


def remove_outputs(out: Path) -> None:
    shutil.rmtree(out)
    out.mkdir()


def test_fleet_matches_single_commands(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    jobs = fleet_plan(fleet, out)
    assert len(jobs) >= 20
    journal = tmp_path / "journal.jsonl"
    proc = diskimg_cli("batch", write_plan(tmp_path / "plan.jsonl", jobs), "--journal", journal, "--jobs", "2",
                       "--json", text=True)
    assert proc.returncode == 1, proc.stderr  # some said no, some failed
    summary = json.loads(proc.stdout)
    entries = read_entries(journal)
    assert set(entries) == {job["id"] for job in jobs}
    for job in jobs:
        if job["op"] == "convert" and entries[job["id"]]["outcome"] == "ok":
            qemu_compare(Path(job["source"]), qemu_img_format(job["source"]), Path(job["target"]),
                         "vpc" if job.get("output_format") == "vhd" else job.get("output_format", "raw"))
    batch_outputs = {p.relative_to(out) for p in out.rglob("*")}
    remove_outputs(out)
    expected_outcomes = {"ok": 0, "no": 0, "error": 0}
    for job in jobs:
        single = diskimg_cli(*cli_args(job), "--json", text=True)
        entry = entries[job["id"]]
        assert entry["exit_code"] == single.returncode, (job["id"], single.stderr)
        if single.returncode in (0, 1):
            assert without_times(entry["result"]) == without_times(json.loads(single.stdout)), job["id"]
            outcome = "ok" if single.returncode == 0 else "no"
        else:
            assert entry["error"] == single.stderr.strip().splitlines()[-1], job["id"]
            outcome = "error"
        assert entry["outcome"] == outcome
        expected_outcomes[outcome] += 1
    assert {p.relative_to(out) for p in out.rglob("*")} == batch_outputs  # the same files, no temporaries
    assert summary["outcomes"] == expected_outcomes
    assert expected_outcomes["ok"] >= 10 and expected_outcomes["no"] >= 2 and expected_outcomes["error"] >= 4
    assert summary["failed"] == [job["id"] for job in jobs if entries[job["id"]]["outcome"] != "ok"]
    assert summary["jobs"] == len(jobs) and summary["skipped"] == 0
    assert summary["written_bytes"] >= sum(os.path.getsize(p) for p in out.glob("*.qcow2"))


def qemu_img_format(path: str) -> str:
    """The source's format, as made (qemu-img would probe a fixed VHD as raw)."""
    return Path(path).suffix[1:]


@pytest.mark.parametrize("line, problem", [
    ('{"id": "x", "op": "convert", "source": "a", "target": "b", "colour": "red"}', "takes no 'colour'"),
    ('{"id": "x", "op": "convert", "source": "a", "target": "b", "output_format": "qed"}', "unknown format 'qed'"),
    ('{"id": "x", "op": "convert", "source": "a"}', "needs 'target'"),
    ('{"id": "x", "op": "convert", "source": "a", "target": "b", "compress": "yes"}', "'compress' must be true"),
    ('{"id": "x", "op": "shrink", "source": "a"}', "'op' must be one of"),
    ('{"id": "a", "op": "verify", "path": "p"}', "id 'a' is already the id of line 1"),
    ('{"id": "x", "op": "validate", "image": "a", "system": "b"}', "either 'image'"),
    ('{"id": "x", "op": "export", "name": "m", "system": "s", "threads": -1}', "'threads' must be a whole number"),
    ('{"id": "x", "op": "convert", "source": "a", "target": "' + "/tmp/w.raw" + '"}', "also written by line 1"),
    ('["convert"]', "not a JSON object"),
    ('{"id": "x", "op": "verify", "path": "' + "p" * 70000 + '"}', "longer than 65536 bytes"),
    ('{"id": "x", "op": "unpack", "source": "a", "out": ', "not a JSON object"),
])
def test_bad_line_refused_before_anything_runs(fleet: Path, tmp_path: Path, line: str, problem: str) -> None:
    first = {"id": "a", "op": "convert", "source": str(fleet / "disk0.qcow2"), "target": "/tmp/w.raw"}
    if "also written" not in problem:
        first["target"] = str(tmp_path / "first.raw")
    plan = tmp_path / "plan.jsonl"
    plan.write_text(json.dumps(first) + "\n\n" + line + "\n")
    journal = tmp_path / "journal.jsonl"
    proc = diskimg_cli("batch", plan, "--journal", journal, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"diskimg: error: {plan}: line 3: ") and problem in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not journal.exists() and not Path(first["target"]).exists()


def slow_sources(directory: Path, count: int, size: int = 48 * MiB) -> list[Path]:
    """RAW disks of random data: converting each to compressed qcow2 takes a moment."""
    sources = []
    for number in range(count):
        source = directory / f"slow{number}.raw"
        with open(source, "wb") as f:
            f.write(os.urandom(size))
        sources.append(source)
    return sources


def slow_batch(tmp_path: Path, count: int, *options: str, size: int = 48 * MiB
               ) -> tuple[list[Path], Path, Path, subprocess.Popen]:
    """``diskimg batch`` started in the background on ``count`` slow conversions (RAW of random
    data to compressed qcow2): the sources, the output folder, the journal, the process."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    sources = slow_sources(src, count, size)
    jobs = [{"id": s.stem, "op": "convert", "source": str(s), "target": str(out / f"{s.stem}.qcow2"),
             "compress": True} for s in sources]
    journal = tmp_path / "journal.jsonl"
    batch = subprocess.Popen([sys.executable, "-m", "diskimg", "batch", str(write_plan(tmp_path / "p.jsonl", jobs)),
                              "--journal", str(journal), "--json", *options],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    return sources, out, journal, batch


def test_killed_worker_job_reruns(tmp_path: Path) -> None:
    sources, out, journal, batch = slow_batch(tmp_path, 3, "--jobs", "2")
    kill_writers(out, ".slow1.qcow2.*.part", 1)
    stdout, stderr = batch.communicate(timeout=300)
    assert batch.returncode == 0 and stderr == "", stderr
    assert json.loads(stdout)["outcomes"] == {"ok": 3, "no": 0, "error": 0}
    assert set(read_entries(journal)) == {"slow0", "slow1", "slow2"}
    for source in sources:
        qemu_compare(source, "raw", out / f"{source.stem}.qcow2", "qcow2")
    assert sorted(p.name for p in out.iterdir()) == ["slow0.qcow2", "slow1.qcow2", "slow2.qcow2"]


def kill_writers(out: Path, pattern: str, times: int) -> None:
    """SIGKILL the process writing a temporary matching ``pattern`` in ``out``, ``times`` times
    (each time the job has started again)."""
    killed: set[int] = set()
    deadline = time.monotonic() + 120
    while len(killed) < times and time.monotonic() < deadline:
        for temporary in out.glob(pattern):
            victim = process_writing(temporary)
            if victim is not None and victim not in killed:
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
        time.sleep(0.02)
    assert len(killed) == times, f"killed {len(killed)} writers of {pattern}, not {times}"


def test_worker_dying_every_time_fails_its_job_only(tmp_path: Path) -> None:
    sources, out, journal, batch = slow_batch(tmp_path, 2, "--jobs", "2")
    kill_writers(out, ".slow1.qcow2.*.part", 3)
    stdout, stderr = batch.communicate(timeout=300)
    assert batch.returncode == 1, stderr
    assert json.loads(stdout)["failed"] == ["slow1"]
    entry = read_entries(journal)["slow1"]
    assert (entry["outcome"], entry["exit_code"]) == ("error", 70)
    assert entry["error"] == "diskimg: error: the worker process running job 'slow1' died 3 times (killed by signal 9)"
    qemu_compare(sources[0], "raw", out / "slow0.qcow2", "qcow2")
    assert [p.name for p in out.iterdir()] == ["slow0.qcow2"]  # nothing of slow1, not even a temporary


def test_dask_worker_killed_mid_job(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        sources, out, journal, batch = slow_batch(tmp_path, 3, "--scheduler", cluster.scheduler_address)
        kill_writers(out, ".slow1.qcow2.*.part", 1)
        stdout, _ = batch.communicate(timeout=300)
    assert batch.returncode == 0, stdout
    assert json.loads(stdout)["outcomes"] == {"ok": 3, "no": 0, "error": 0}
    assert set(read_entries(journal)) == {"slow0", "slow1", "slow2"}
    for source in sources:
        qemu_compare(source, "raw", out / f"{source.stem}.qcow2", "qcow2")
    assert sorted(p.name for p in out.iterdir()) == ["slow0.qcow2", "slow1.qcow2", "slow2.qcow2"]


def process_writing(path: Path) -> int | None:
    """The pid of the process holding ``path`` open, from /proc/*/fd."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == str(path):
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("ctrl_c_to", ["process", "terminal"])
def test_interrupted_batch_resumes(tmp_path: Path, ctrl_c_to: str) -> None:
    """SIGINT to the batch alone (kill -INT), or to its whole process group as a terminal's Ctrl-C."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    sources = slow_sources(src, 6, 24 * MiB)
    jobs = [{"id": s.stem, "op": "convert", "source": str(s), "target": str(out / f"{s.stem}.qcow2"),
             "compress": True} for s in sources]
    jobs.append({"id": "missing", "op": "convert", "source": str(src / "gone.raw"), "target": str(out / "g.qcow2")})
    plan = write_plan(tmp_path / "plan.jsonl", jobs)
    # the reference: an uninterrupted run
    reference = tmp_path / "reference.jsonl"
    assert diskimg_cli("batch", plan, "--journal", reference, "--jobs", "1").returncode == 1
    remove_outputs(out)
    journal = tmp_path / "journal.jsonl"
    batch = subprocess.Popen([sys.executable, "-m", "diskimg", "batch", str(plan), "--journal", str(journal),
                              "--jobs", "1"], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, start_new_session=True)
    deadline = time.monotonic() + 60
    while (not journal.exists() or journal.read_text().count("\n") < 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    if ctrl_c_to == "terminal":
        os.killpg(batch.pid, signal.SIGINT)
    else:
        batch.send_signal(signal.SIGINT)
    _, stderr = batch.communicate(timeout=120)
    assert batch.returncode == 130, stderr
    assert stderr.strip() == "diskimg: interrupted"  # one line, no worker's traceback
    first = read_entries(journal)
    assert 2 <= len(first) < len(jobs)
    # an interrupted job leaves nothing: every output there is a journaled job's
    assert {p.name for p in out.iterdir()} == {Path(job["target"]).name for i, job in enumerate(jobs)
                                               if job["id"] in first and first[job["id"]]["outcome"] == "ok"}
    resumed = diskimg_cli("batch", plan, "--journal", journal, "--json", text=True)
    assert resumed.returncode == 1  # the missing source, whichever run journaled it
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] == len(first) and summary["outcomes"] == {"ok": 6, "no": 0, "error": 1}
    final = read_entries(journal)  # each job once: finished jobs were not run again
    assert all(final[job_id] == entry for job_id, entry in first.items())
    assert without_times(final) == without_times(read_entries(reference))
    for source in sources:
        qemu_compare(source, "raw", out / f"{source.stem}.qcow2", "qcow2")


def test_edited_line_reruns(fleet: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    job = {"id": "one", "op": "validate", "image": str(fleet / "disk0.qcow2")}
    plan = write_plan(tmp_path / "plan.jsonl", [job])
    assert diskimg_cli("batch", plan, "--journal", journal).returncode == 1
    assert diskimg_cli("batch", plan, "--journal", journal).returncode == 1
    assert len(journal.read_text().splitlines()) == 1
    write_plan(plan, [{**job, "role": "data"}])  # a data disk may be blank: importable
    assert diskimg_cli("batch", plan, "--journal", journal).returncode == 0
    assert [json.loads(line)["outcome"] for line in journal.read_text().splitlines()] == ["no", "ok"]


def test_dask_cluster_same_results(fleet: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    out_local, out_dask = tmp_path / "local", tmp_path / "dask"
    out_local.mkdir(), out_dask.mkdir()
    jobs = fleet_plan(fleet, out_local)
    plan = write_plan(tmp_path / "plan.jsonl", jobs)
    local = tmp_path / "local.jsonl"
    assert diskimg_cli("batch", plan, "--journal", local, "--jobs", "2").returncode == 1
    remove_outputs(out_local)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        on_dask = tmp_path / "dask.jsonl"
        proc = diskimg_cli("batch", plan, "--journal", on_dask, "--scheduler", cluster.scheduler_address, "--json",
                           text=True)
    assert proc.returncode == 1, proc.stderr
    assert without_times(read_entries(on_dask)) == without_times(read_entries(local))


def small_plan(fleet: Path, out: Path) -> list[dict[str, Any]]:
    return [{"id": f"c{n}", "op": "convert", "source": str(fleet / "disk0.qcow2"), "target": str(out / f"c{n}.raw")}
            for n in range(4)] + [{"id": "v", "op": "validate", "image": str(fleet / "gone.qcow2")}]


def test_progress_json_names_each_job(fleet: Path, tmp_path: Path) -> None:
    jobs = small_plan(fleet, tmp_path)
    journal = tmp_path / "journal.jsonl"
    proc = diskimg_cli("batch", write_plan(tmp_path / "plan.jsonl", jobs), "--journal", journal, "--jobs", "2",
                       "--progress", "json", text=True)
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    entries = read_entries(journal)
    for job in jobs:
        mine = [e["event"] for e in events if e["id"] == job["id"]]
        assert mine == ["start", entries[job["id"]]["outcome"]], (job["id"], mine)
    finishing = [e for e in events if e["event"] != "start"]
    assert [e["finished"] for e in finishing] == list(range(1, len(jobs) + 1))
    assert all(e["total"] == len(jobs) for e in events)
    assert "5 jobs: 4 ok, 0 no, 1 error" in proc.stdout and "failed or said no: v" in proc.stdout


def test_torn_journal_line_runs_its_job_again(fleet: Path, tmp_path: Path) -> None:
    """A power cut in the middle of a journal line: that job runs again; the others are skipped."""
    jobs = small_plan(fleet, tmp_path)
    plan = write_plan(tmp_path / "plan.jsonl", jobs)
    journal = tmp_path / "journal.jsonl"
    assert diskimg_cli("batch", plan, "--journal", journal).returncode == 1
    lines = journal.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])["id"]
    journal.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    if torn.startswith("c"):
        (tmp_path / f"{torn}.raw").unlink()  # its output, lost with the machine
    proc = diskimg_cli("batch", plan, "--journal", journal, "--json", text=True)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["skipped"] == len(jobs) - 1
    after = journal.read_text().splitlines()
    assert len(after) == len(jobs) + 1 and json.loads(after[-1])["id"] == torn
    assert json.loads(after[-1])["outcome"] == json.loads(lines[-1])["outcome"]


def test_python_api(fleet: Path, tmp_path: Path) -> None:
    import importlib

    import diskimg

    importlib.import_module("diskimg.fleet.runner")  # as unpickling a task on Dask does
    assert callable(diskimg.batch)  # a subpackage named batch would have replaced the function

    events: list[tuple[str, str]] = []
    result = diskimg.batch(write_plan(tmp_path / "plan.jsonl", small_plan(fleet, tmp_path)), jobs=2,
                           progress=lambda event, job_id, finished, total: events.append((event, job_id)))
    assert isinstance(result, diskimg.BatchResult) and not result.succeeded
    assert result.outcomes == {"ok": 4, "no": 0, "error": 1} and result.failed == ["v"]
    assert [e["id"] for e in result.entries] == ["c0", "c1", "c2", "c3", "v"]
    assert result.entries[-1]["exit_code"] == 3 and "gone.qcow2" in result.entries[-1]["error"]
    assert sorted(events) == sorted([("start", i) for i in ("c0", "c1", "c2", "c3", "v")]
                                    + [("ok", f"c{n}") for n in range(4)] + [("error", "v")])
    qemu_compare(fleet / "disk0.qcow2", "qcow2", tmp_path / "c3.raw", "raw")


def test_one_batch_per_journal(fleet: Path, tmp_path: Path) -> None:
    import fcntl

    journal = tmp_path / "journal.jsonl"
    plan = write_plan(tmp_path / "plan.jsonl", small_plan(fleet, tmp_path))
    with open(journal, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a batch running on it holds it
        proc = diskimg_cli("batch", plan, "--journal", journal, text=True)
    assert proc.returncode == 4
    assert proc.stderr == f"diskimg: error: {journal}: the journal is in use by another batch\n"
    assert not list(tmp_path.glob("c*.raw"))


def test_cluster_plan_needs_absolute_paths(tmp_path: Path) -> None:
    """Workers on other machines do not share our working directory: refused before connecting."""
    plan = write_plan(tmp_path / "plan.jsonl", [{"id": "a", "op": "verify", "path": "exports/m1.manifest.json"}])
    proc = diskimg_cli("batch", plan, "--scheduler", "tcp://127.0.0.1:9", text=True)
    assert proc.returncode == 2
    assert proc.stderr == (f"diskimg: error: {plan}: line 1: 'path' 'exports/m1.manifest.json' must be an absolute "
                           "path when jobs run on a cluster\n")
