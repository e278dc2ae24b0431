"""Running prompt tuning on a frozen backbone, whatever the method: the process group and the
environment (``distributed``), loading the backbone, GGUF files included, and the model with a
soft prompt in front (``backbone``, ``gguf_backbone``), the DeepSpeed engine and the training loop
(``engine``), checkpoints (``checkpoint``), sharded evaluation (``evaluation``) and progress
lines (``progress``). The loop trains any prompt module; DTVG lives in ``dtvg_scale.method``."""
