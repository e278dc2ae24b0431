"""Search DTVG's grouping knobs with Ray Tune: ``python tune/sweep.py --help``.

The sweep lives in the package (``dtvg_scale/recipes/sweep.py``, installed as the ``dtvg-sweep`` console
script); this path stays because ``slurm/tune.sbatch`` and existing job scripts call it.
"""

import sys

from dtvg_scale.recipes.sweep import main

if __name__ == "__main__":
    sys.exit(main())
