"""Settings for every test process (the pytest workers and what they start).

The suite runs on two pytest-xdist workers (pyproject's addopts: ``-n 2 --dist loadfile``, a
test file per worker at a time, so module fixtures such as the sweep run once; ``-n 0`` runs
it in one process). Each process keeps to one thread: two workers on two cores each running
two-thread matmuls on tiny models spin against each other and run several times slower. A run
that chose its threads (``OMP_NUM_THREADS`` set) keeps them.

The longest files are handed out first (a file's tests stay together): the workers then end
together instead of one running the longest file alone at the end.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

# Longest first: seconds of one worker on a 2-core machine (Intel Xeon, `--durations=0`, session 12)
LONGEST_FILES = ["test_distributed.py",  # 332
                 "test_cli.py",  # 312
                 "test_real_backbone.py",  # 185 (SmolLM2 on 2 ranks)
                 "test_controlled.py",  # 146
                 "test_tune.py",  # 123
                 "test_sweep_faults.py",  # 115
                 "test_two_nodes.py",  # 80
                 "test_real_data.py",  # 67
                 "test_export.py"]  # 42; every other file < 20


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept
