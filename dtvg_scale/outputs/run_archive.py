"""Keep a long table's finished runs where they outlive the machine, and bring them back.

A table of many ``train.py`` processes (``benchmarks/real_fewshot``) may take longer than a
machine lives: on a machine that is reset between working sessions, a run folder on local disk
is lost with every process that wrote it. ``archive`` copies what a run folder holds of its
*finished* work into a folder that can be committed (a few MB per seed); ``restore`` copies it
back, and the runs' own resume logic (a run with a ``result.json`` is skipped) does the rest::

    restore(archive_dir, out)      # before the table starts: finished runs come back
    archive(out, archive_dir)      # after each process: its finished runs go out

What goes: every file of a run folder (``stage1/<task>``, ``stage2/<strategy>``, ``zero_shot``)
that has its ``result.json``, and the files beside them (``init_prompt.safetensors``, the
resolved configs, ``results.json``, logs), links kept as links. What stays: DeepSpeed's
``checkpoints/`` (the state of a run still going; a run without ``result.json`` starts over),
plots (remade from the traces) and unfinished run folders. Nothing is overwritten that is
already there with the same bytes, and nothing is ever deleted.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

RESULT_FILE = "result.json"  # a run folder holding it is finished (stages.py's rule)
RUN_PARENTS = ("stage1", "stage2")  # <process>/<parent>/<run>/ are run folders
SKIPPED_DIRS = ("checkpoints", "__pycache__")
SKIPPED_SUFFIXES = (".png",)


def _is_unfinished_run(folder: Path) -> bool:
    is_run = folder.parent.name in RUN_PARENTS or folder.name == "zero_shot"
    return is_run and not folder.is_symlink() and not (folder / RESULT_FILE).is_file()


def kept_files(root: Path) -> list[Path]:
    """Paths (relative to ``root``) of every file and link worth keeping, in a stable order."""
    kept = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in links and d not in SKIPPED_DIRS
                         and not _is_unfinished_run(here / d))
        for name in sorted(files + links):
            if not name.endswith(SKIPPED_SUFFIXES):
                kept.append((here / name).relative_to(root))
    return kept


def _copy(source: Path, dest: Path) -> bool:
    """Copy one file or link; False when ``dest`` already holds the same thing."""
    if source.is_symlink():
        target = os.readlink(source)
        if dest.is_symlink() and os.readlink(dest) == target:
            return False
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(target)
        return True
    if dest.is_file() and not dest.is_symlink() and filecmp.cmp(source, dest, shallow=False):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    shutil.copy2(source, partial)
    os.replace(partial, dest)  # a copy cut short never stands under the real name
    return True


def sync(source: Path, dest: Path) -> list[Path]:
    """Copy ``kept_files(source)`` into ``dest``; returns the paths that changed."""
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        return []
    return [rel for rel in kept_files(source) if _copy(source / rel, dest / rel)]


def archive(out: Path, archive_dir: Path) -> list[Path]:
    """The finished work of the run folder ``out`` into ``archive_dir``."""
    return sync(out, archive_dir)


def restore(archive_dir: Path, out: Path) -> list[Path]:
    """What ``archive`` kept, back into a run folder (which may be new or half there)."""
    return sync(archive_dir, out)
