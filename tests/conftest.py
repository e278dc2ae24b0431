"""Settings for every test process (the pytest workers and what they start).

The suite runs on two pytest-xdist workers (pyproject's addopts: ``-n 2 --dist loadfile``, a
test file per worker at a time, so module fixtures such as the sweep run once). Each process
then keeps to one thread: two workers on two cores each running two-thread matmuls on tiny
models spin against each other and run several times slower. A run that chose its threads
(``OMP_NUM_THREADS`` set) keeps them; the 2-rank launches take one thread per rank anyway.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
