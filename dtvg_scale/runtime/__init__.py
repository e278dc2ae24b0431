"""Running prompt tuning on a frozen backbone, whatever the method: the process group and the
environment (``distributed``), loading the backbone, GGUF files included, and the model with a
soft prompt in front (``backbone``, ``gguf_backbone``), a run's DeepSpeed config (``ds_config``),
the engine around the prompted backbone (``engine``), the training loop (``loop``), what a job's
runs share (``session``: the backbone loaded once, P_init, one run trained and tracked), batches
and shards (``sampling``), checkpoints (``checkpoint``), sharded evaluation (``evaluation``), the
target's loss under given prompts (``transfer_losses``), folders built once (``cache``), progress
lines (``progress``) and the option sections of the backbone, the prompt and a loop
(``options``). The loop trains any prompt module; DTVG lives in ``dtvg_scale.method``."""
