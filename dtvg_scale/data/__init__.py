"""The tasks and their examples: the example type (``examples``), the task registry and loading
(``tasks``), the benchmark's task specs, templates and split rules over the hub's files
(``benchmark_tasks``) and tasks defined by a file (``task_files``), metrics (``metrics``), token
ids and padded batches (``encoding``), and the synthetic worlds that need no download: the shared
machinery (``synthetic``), the random world of ``embedded:<family>`` (``random_world``) and the
controlled world with planted relations of the default job (``controlled``)."""
