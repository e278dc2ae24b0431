"""The ``report`` command by path, as the README runs it::

    deepspeed --num_gpus 2 dtvg_scale/report.py --ds_config ds_configs/zero3.json --runs ...

(the deepspeed launcher takes a script path). The command itself is ``dtvg_scale/recipes/report.py``
(console script ``dtvg-report``; ``deepspeed --module dtvg_scale.recipes.report`` works too)."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run by path, Python puts this folder first on sys.path and the package's subpackages would
    # become top-level names (``data``, ``runtime``, ``method``, ... shadowing any package of that
    # name a library imports): import the package from the repository root instead.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

from dtvg_scale.recipes.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
