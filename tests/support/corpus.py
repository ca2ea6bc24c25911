"""The shared corpus: images made by other tools and projects, described by its manifest.json and
read in place (decompressed into the test's folder where stored compressed; never copied into the
repository). Tests over it skip, saying why, where it is absent."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import pytest

from .tools import ROOT

NO_CORPUS = "no corpus: set DISKIMG_CORPUS to the folder of its manifest.json, or place it at ../shared/corpus"


def corpus_dir() -> Path | None:
    """The shared corpus: $DISKIMG_CORPUS when set (and then only there), else ../shared/corpus
    beside the checkout."""
    env = os.environ.get("DISKIMG_CORPUS")
    candidate = Path(env) if env else ROOT.parent / "shared" / "corpus"
    return candidate if (candidate / "manifest.json").is_file() else None


def corpus_params(entries: list[dict]) -> list:
    """Parameters for a test over corpus entries: one skipped case naming the missing corpus when
    there is none (an empty list would skip with pytest's bare "got empty parameter set")."""
    if entries:
        return [pytest.param(entry, id=entry["file"]) for entry in entries]
    return [pytest.param(None, id="no-corpus", marks=pytest.mark.skip(reason=NO_CORPUS))]


def corpus_manifest() -> list[dict]:
    directory = corpus_dir()
    if directory is None:
        return []
    return json.loads((directory / "manifest.json").read_text())["files"]


def corpus_entries(formats: tuple[str, ...]) -> list[dict]:
    """The manifest entries of the corpus files of these formats."""
    return [entry for entry in corpus_manifest() if entry.get("format") in formats]


_DECOMPRESSED: dict[str, Path] = {}


def corpus_file(entry: dict, tmp_path: Path) -> Path:
    """The corpus file, decompressed into tmp_path when stored compressed (the corpus stays read-only);
    decompressed once per session."""
    source = corpus_dir() / entry["file"]
    wrapper = entry.get("compression_wrapper")
    if not wrapper:
        return source
    cached = _DECOMPRESSED.get(entry["file"])
    if cached is not None and cached.exists():
        return cached
    opener = {"gzip": gzip.open, "bzip2": bz2.open}[wrapper]
    target = tmp_path / "corpus" / entry["file"].rsplit(".", 1)[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    with opener(source, "rb") as f, open(target, "wb") as out:
        while True:  # keep zero runs as holes: some of these images are large and mostly empty
            chunk = f.read(1 << 20)
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate()
    _DECOMPRESSED[entry["file"]] = target
    return target
