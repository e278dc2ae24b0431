"""Folders built once and reused: where they live (``cache_root``) and how a build gets there
(``build_once``): written in a temporary sibling and renamed into place, so a folder that is
there is complete, a build killed midway is simply done again, and processes racing to build the
same folder (two ranks, two jobs) keep the first complete one. Used for the synthetic worlds'
tiny backbones and for GGUF conversions."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where downloads and conversions live: ``$DTVG_SCALE_CACHE``, else ``$XDG_CACHE_HOME/dtvg_scale``,
    else ``~/.cache/dtvg_scale``. On a cluster, point it at a filesystem every node sees."""
    if os.environ.get("DTVG_SCALE_CACHE"):
        return Path(os.environ["DTVG_SCALE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dtvg_scale"


def build_once(out: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """``out`` if ``is_complete(out)``; else ``build`` into an empty temporary sibling and rename
    it to ``out``. Whatever incomplete or outdated folder was at ``out`` is replaced; if another
    process completed ``out`` meanwhile, its build is kept and this one discarded."""
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache is read by other users' jobs
        build(tmp)
        for _ in range(5):
            try:
                os.replace(tmp, out)  # succeeds if out is missing or an empty directory
                return out
            except OSError:
                if is_complete(out):  # another process finished the same build first
                    return out
                aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
                try:
                    os.replace(out, aside)  # incomplete, or built with other settings: move it aside
                except FileNotFoundError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
        raise RuntimeError(f"could not install the build at {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
