"""Real English text for evaluation and calibration: the Canterbury corpus.

It ships inside the source archive of the PyPI package `brotli` (tests/testdata/), so it is fetched
with pip -- a package registry this project may use -- once, then cached. Nothing else is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgellm.errors import DataUnavailableError, unknown_name

BROTLI_SDIST = "brotli==1.2.1"
# The Canterbury texts brotli's test data carries (its archive has no cp.html, fields.c, grammar.lsp, xargs.1).
CANTERBURY_FILES = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")


def cache_dir() -> Path:
    root = os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm"
    return Path(root) / "canterbury"


def canterbury_path(name: str = "alice29.txt") -> Path:
    """Path of one corpus file, fetching the archive once if it is not cached."""
    if name not in CANTERBURY_FILES:
        raise unknown_name("corpus file", name, CANTERBURY_FILES)
    target = cache_dir() / name
    if not target.is_file():
        _fetch_all()
    if not target.is_file():
        raise DataUnavailableError(f"{name} is not in {BROTLI_SDIST}'s source archive")
    return target


def _fetch_all() -> None:
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
               "--no-build-isolation", BROTLI_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise DataUnavailableError(
                f"could not fetch the Canterbury corpus ({' '.join(cmd)}): {done.stderr.strip()[-300:]}"
            )
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if "/tests/testdata/" in member.name and base in CANTERBURY_FILES and member.isfile():
                    data = tar.extractfile(member).read()
                    partial = dest / (base + ".part")
                    partial.write_bytes(data)
                    partial.replace(dest / base)  # atomic: a half-written file is never seen
