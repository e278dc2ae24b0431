"""Function-space relatedness (``stage2.ranking=transfer``): how well each source's own Stage-I
prompt already does on the target's training examples.

Task-vector similarity compares prompts as points in embedding space. On the controlled
benchmark no such similarity (the paper's or any variant) ranked the planted helpful sources
above the unrelated ones, while the target's loss under each source's prompt ``P_init + T_k``
put the helpful pair on top in every run (docs/results.md, "Why the group misses"). This signal is
measured once, before Stage II trains (``dtvg_scale.runtime.transfer_losses``):

    gain_k = L_target(P_init) - L_target(P_init + T_k)

the drop in the target's mean label-token loss when the untrained prompt is replaced by source
k's trained one. A positive gain means the source's prompt already helps on the target's task.
``DTVGPrompt.set_transfer_gain`` takes the gains; ``decide(target_sim=...)`` ranks by them.
"""

from __future__ import annotations

from torch import Tensor


def transfer_gains(init_loss: Tensor, source_losses: Tensor) -> Tensor:
    """``L(P_init) - L(P_init + T_k)`` [K] from the losses of ``target_losses``."""
    return init_loss - source_losses
