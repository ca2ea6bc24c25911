"""The project around the code: what a fresh machine installs, what the README shows, what the
test suite says when something it needs is missing, how the package is layered."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from typing import get_args

import tomllib

from diskimg.archives.export import ARCHIVES
from diskimg.choices import ArchiveKind, CloudTarget, DiskFormat, FormatName
from diskimg.formats import READERS, WRITERS
from diskimg.formats.probing import FORMAT_ALIASES
from diskimg.validation.rules import TARGETS

from .support.tools import ROOT, qemu_compare, qemu_io, requires_qemu, run

LOCAL_MODULES = {"diskimg", "tests", "support"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def _modules_the_tests_import() -> set[str]:
    """Top-level modules named by the tests' imports and ``pytest.importorskip`` calls."""
    modules = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                modules.add(node.args[0].value.split(".")[0])
    return modules - LOCAL_MODULES - set(sys.stdlib_module_names)


def test_test_extras_install_every_module_the_tests_import():
    """`pip install -e .[test]` (scripts/test.sh) must bring every third-party module a test
    imports: one left out makes its test skip on a fresh machine (PyYAML did)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    providers = importlib.metadata.packages_distributions()
    missing = {module: providers.get(module) for module in _modules_the_tests_import()
               if not {name.lower() for name in providers.get(module, [])} & declared}
    assert not missing, f"imported by tests, not in pyproject's dependencies or test extras: {missing}"


def test_corpus_tests_name_the_missing_corpus(tmp_path):
    """Without the third-party corpus, each corpus test skips saying so (not pytest's bare
    "got empty parameter set", which says nothing of what is missing)."""
    env = {**os.environ, "DISKIMG_CORPUS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", "corpus",
         "tests/test_check.py", "tests/test_detect.py", "tests/test_qcow2.py", "tests/test_vhd.py",
         "tests/test_validate.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) >= 8, proc.stdout[-3000:]
    assert all("no corpus: set DISKIMG_CORPUS" in line for line in skips), skips


def test_test_script_waits_for_the_dpkg_lock():
    """On a fresh machine an apt process started at boot holds the dpkg lock: every apt-get call
    of scripts/test.sh waits for it instead of failing at once."""
    calls = [line for line in (ROOT / "scripts" / "test.sh").read_text().splitlines()
             if re.search(r"\bapt-get\b", line) and not line.lstrip().startswith(("#", "command -v", "if "))]
    assert calls and all("Lock::Timeout" in line or "wait_lock" in line for line in calls), calls


@requires_qemu
def test_readme_python_api_block_runs_as_written(tmp_path):
    """The README's Python API block, extracted from README.md, run unchanged in a folder holding
    the disk.vhd it names (made by qemu-img, with data written by qemu-io)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run("qemu-img", "create", "-q", "-f", "vpc", tmp_path / "disk.vhd", "64M")
    qemu_io(tmp_path / "disk.vhd", "vpc", "write -P 0x5a 1M 3M")
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "format='vhd'" in proc.stdout
    qemu_compare(tmp_path / "disk.vhd", "vpc", tmp_path / "disk.qcow2", "qcow2")
    qemu_compare(tmp_path / "disk.vhd", "vpc", tmp_path / "restored" / "m1_system.qcow2", "qcow2")


#: the packages of diskimg, bottom-up: a module may import its own package and those of lower layers only
#: ("" is the package itself: the public API, over everything but the command line)
LAYERS = (
    {"errors", "version"},
    {"units", "words", "jsonlimits", "choices", "bitmaps"},
    {"host", "inspection"},
    {"formats"},
    {"streams"},
    {"detection"},
    {"conversion"},
    {"archives"},
    {"validation"},
    {"fleet"},
    {""},
    {"cli"},
    {"__main__"},
)
#: packages held to fewer dependencies than their layer allows: inspection reads through a Disk
#: protocol, so that partition tables and file systems can be read from any source
ONLY = {"inspection": {"errors", "units", "jsonlimits", "bitmaps"}}


def _package_of(module: str) -> str:
    """The top-level package of a diskimg module: "formats" for diskimg.formats.vhdx.reader."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports_of(path, module: str) -> list[tuple[int, str]]:
    """(line, module) of every diskimg module ``path`` imports: at the top, in functions, under
    TYPE_CHECKING; ``from . import name`` counts as importing the module ``name`` when it is one."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if (ROOT / (f"{target}.{alias.name}".replace(".", "/") + ".py")).exists()
                      or (ROOT / f"{target}.{alias.name}".replace(".", "/")).is_dir()]
    return [(line, name) for line, name in found if name == "diskimg" or name.startswith("diskimg.")]


def test_no_module_imports_a_layer_above_its_own():
    """Data flows one way (detect -> open -> convert / inspect / validate / export): every import,
    even one made inside a function or only for type checking, goes down the layers, never up."""
    layer = {package: number for number, packages in enumerate(LAYERS) for package in packages}
    packages = {path.name.removesuffix(".py") for path in (ROOT / "diskimg").iterdir()
                if path.suffix == ".py" or (path / "__init__.py").exists()} - {"__init__"}
    assert packages | {""} == set(layer), f"packages missing from LAYERS or gone: {packages ^ (set(layer) - {''})}"
    upward = []
    for path in sorted((ROOT / "diskimg").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        own = _package_of(module)
        for line, imported in _imports_of(path, module):
            target = _package_of(imported)
            allowed = target == own or (layer[target] < layer[own] and target in ONLY.get(own, {target}))
            if not allowed:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)
USER_PROJECT = '''"""A migration tool's use of diskimg, as its own project would write it."""

from __future__ import annotations

import diskimg
from diskimg import DiskImageError, FormatName, convert, open_image


def first_sector(path: str) -> bytes:
    with open_image(path, "vhd") as disk:
        return disk.read_at(0, 512)


def to_cloud(source: str, target: str, output_format: FormatName = "qcow2") -> int:
    try:
        result = convert(source, target, output_format, source_format="vpc", backend="native", vhd_size="auto")
    except DiskImageError as exc:
        raise SystemExit(str(exc)) from exc
    return result.bytes_read + result.allocated_bytes


def importable(path: str) -> bool:
    return diskimg.validate(path, role="system", boot_mode="UEFI").importable
'''

USER_MISTAKES = '''from __future__ import annotations

from diskimg import convert, export

convert("a.vhd", "b.qcow2", output_format="qcow3")
convert("a.vhd", "b.qcow2", format="qcow2")
export("m1", "a.vhd", archive="zip")
'''


def _mypy_strict(directory: object, module: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` over a user's module, diskimg found as an installed package is: its own
    modules are read for their types, their errors are not the user's (``--follow-imports=silent``)."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", os.devnull, module],
        cwd=directory, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )


def test_a_users_project_passes_mypy_strict(tmp_path):
    """`from diskimg import open_image, convert, DiskImageError` and the rest of the public API pass
    `mypy --strict` in a user's project (every name explicitly exported, lazily loaded all the same),
    and mypy sees the API's closed sets of strings: a misspelled format or archive is caught."""
    (tmp_path / "migrate.py").write_text(USER_PROJECT)
    (tmp_path / "mistakes.py").write_text(USER_MISTAKES)
    clean = _mypy_strict(tmp_path, "migrate.py")
    assert clean.returncode == 0 and "Success: no issues found" in clean.stdout, clean.stdout + clean.stderr
    caught = _mypy_strict(tmp_path, "mistakes.py")
    assert caught.returncode == 1, caught.stdout + caught.stderr
    errors = [line for line in caught.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["5", "6", "7"], caught.stdout
    assert '"output_format" to "convert" has incompatible type "Literal[\'qcow3\']"' in errors[0]
    assert 'Unexpected keyword argument "format" for "convert"' in errors[1]
    assert '"archive" to "export" has incompatible type "Literal[\'zip\']"' in errors[2]


def test_the_public_names_load_lazily_and_all_of_them_exist():
    """`import diskimg` loads neither the converter nor the validator (start-up time); every name of
    the literal __all__ resolves on first use."""
    code = ("import sys, diskimg; loaded = set(sys.modules);"
            "assert not {'diskimg.conversion.pipeline', 'diskimg.validation', 'diskimg.archives.export'} & loaded;"
            "[getattr(diskimg, name) for name in diskimg.__all__]; print(len(diskimg.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(set(ast.literal_eval(_all_literal())))


def _all_literal() -> str:
    """The text of the list assigned to __all__ in diskimg/__init__.py (a literal, not a computation)."""
    tree = ast.parse((ROOT / "diskimg" / "__init__.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert isinstance(value, ast.List) and all(isinstance(e, ast.Constant) for e in value.elts)
    return ast.unparse(value)


def test_the_literal_types_are_the_sets_the_code_takes():
    """Each closed set of the API's annotations is the set its registry takes at run time."""
    assert set(FORMAT_ALIASES) == set(get_args(FormatName))
    assert set(FORMAT_ALIASES.values()) == set(READERS) == set(WRITERS) == set(get_args(DiskFormat))
    assert tuple(ARCHIVES) == get_args(ArchiveKind)
    assert get_args(CloudTarget) == TARGETS


def test_tests_share_builders_through_the_support_package_only():
    """A test module imports shared helpers from tests/support, never from conftest (fixtures only) or from
    another test module, so that moving or deleting one test never breaks another."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module is not None:
                first = node.module.split(".")[0]
                if first == "conftest" or first.startswith("test_"):
                    offenders.append(f"{path.name}:{node.lineno} from .{node.module}")
            elif isinstance(node, ast.ImportFrom) and node.level and node.module is None:
                offenders += [f"{path.name}:{node.lineno} from . import {alias.name}" for alias in node.names
                              if alias.name == "conftest" or alias.name.startswith("test_")]
    assert offenders == []
