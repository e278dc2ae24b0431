"""Grouping cost, side by side in one run: ``select_group`` against the authors' loop semantics,
and the Stage-II step time over a plain prompt-tuning step on the same tiny model.

    .venv/bin/python benchmarks/grouping.py            # both tables, a few minutes on 2 cores
    .venv/bin/python benchmarks/grouping.py --quick    # smaller sizes

The two parts are also runnable alone: benchmarks/grouping_select.py, benchmarks/step_overhead.py.
"""

import argparse

import grouping_select
import step_overhead

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    grouping_select.main(["--quick"] if args.quick else [])
    step_overhead.main(["--steps", "20" if args.quick else "80"])
