"""The suite runs on two pytest-xdist workers (pyproject.toml's addopts): most of its time is one
process at a time (imports, launches, a lone rank), so a single worker left a core of the CI
machine idle (a serial run: 1,180 s of CPU in 1,111 s). Each test file runs on one worker as a
whole (its module fixtures are built once, its tests keep their order); the two files that start
Ray clusters are one unit, so two Ray clusters never run at once (their trials would compete for
the same two cores); the slowest files are handed out first, so that none starts last."""

from pathlib import Path

import pytest
from xdist.scheduler import LoadFileScheduling

RAY_FILES = {"test_sweep_faults.py", "test_tune.py"}
# by a serial run's --durations, slowest first
SLOW_FILES_FIRST = ("test_cli.py", "test_distributed.py", "test_sweep_faults.py", "test_tune.py",
                    "test_real_backbone.py", "test_two_nodes.py", "test_real_data.py", "test_export.py",
                    "test_controlled.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


class FilesWithRayTogether(LoadFileScheduling):
    """xdist's file-by-file scheduling (``--dist loadfile``), the Ray files as one unit.
    (``--dist loadgroup`` would say this with marks, but xdist 3.8 renames node ids in a way
    pytest 9.2 no longer reads, so its groups are silently ignored.)"""

    def _split_scope(self, nodeid: str) -> str:
        scope = super()._split_scope(nodeid)
        return "ray" if Path(scope).name in RAY_FILES else scope


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> FilesWithRayTogether:
    return FilesWithRayTogether(config, log)
