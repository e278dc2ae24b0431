"""The suite runs on two pytest-xdist workers (pyproject.toml's addopts): most of its time is
one process at a time (imports, launches, a lone rank), so one worker left a core of the CI
machine idle. Each test file runs on one worker as a whole (its module fixtures are built once,
its tests keep their order), and the files that start Ray clusters share a group, so two Ray
clusters never run at once (they would compete for Ray's fixed ports and the trials' CPUs)."""

import pytest

RAY_FILES = {"test_tune.py", "test_sweep_faults.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name.removesuffix(".py")))
