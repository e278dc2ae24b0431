"""What a run leaves behind and who reads it: the Stage-II group trace (``group_trace``: its one
schema, writer rows, readers and summaries), a job's summary and ``results.json`` (``summary``),
MLflow tracking (``tracking``), plots of a trace (``plots``) and the archive of finished runs
(``run_archive``). Nothing here trains; the runtime and the recipes call it."""
