"""The commands, each a thin script over the method, data, runtime and outputs: ``train`` (Stage I
then Stage II of a job: ``pipeline``), ``report`` (re-score saved prompts, the paper's table),
``sweep`` (Ray Tune over the grouping knobs), ``export`` (a run as a PEFT adapter) and
``fetch_model`` (SmolLM2-135M from its package). ``config`` is the job's options: every section,
read from YAML and ``key=value`` overrides."""
