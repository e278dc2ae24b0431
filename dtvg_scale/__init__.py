"""dtvg_scale: Dynamic Task Vector Grouping (Zhang et al., ACL Findings 2025) on large frozen backbones.

The package is five parts and the commands over them, read from the method outwards:

- ``method/``: DTVG itself, pure tensor code (torch only): similarities, group selection, the
  merge, the strategies, the prompt modules and ``DTVGConfig`` with every knob. A new similarity
  is a function in ``method/similarities.py`` named in its registry, and nothing else.
- ``data/``: the tasks and their examples: the registry, the benchmark's specs and templates over
  the hub's files, tasks from a file, metrics, token ids, and the synthetic worlds.
- ``runtime/``: any prompt module on a frozen backbone: the process group, loading the backbone
  (ZeRO-3 partitions it), the DeepSpeed engine, the training loop, checkpoints, evaluation. The
  loop knows nothing of DTVG: a prompt module hands it its rows and a record of each step.
- ``outputs/``: what a run leaves and who reads it: the group trace (one schema), a job's summary,
  MLflow tracking, plots, the archive of finished runs.
- ``recipes/``: the commands (``dtvg-train``, ``dtvg-report``, ``dtvg-sweep``, ``dtvg-export``,
  ``dtvg-fetch-model``), thin scripts over the parts; ``recipes/config.py`` is the job's options,
  ``recipes/pipeline.py`` Stage I then Stage II of a job.

``options.py`` is what an option is (its help, its range, ``ConfigError``); the sections live
beside what they configure. ``train.py`` and ``report.py`` here only let the deepspeed launcher
run the commands by path (``deepspeed --num_gpus 2 dtvg_scale/train.py --ds_config
ds_configs/zero3.json``). The parts never import a recipe (``tests/test_layout.py``).
"""

__version__ = "0.1.0"
