"""DTVG, the method: pure tensor code over task vectors (imports torch only; no I/O, no DeepSpeed).

Read in this order:

- ``similarities.py``: how a source's task vector compares with the target's (``mean_dot``, the
  paper's, and the variants); a new similarity is a function there, named in ``SIMILARITIES``.
- ``selection.py``: which sources join the group (the paper's greedy prefix by knowledge
  consistency, and the variants), as a ``GroupDecision``.
- ``merge.py``: ``P_mix = P_init + a_t*T_t + sum_k a_k*T_k`` and its variants; the starting scales.
- ``strategies.py``: DTVG and the paper's ablations as masks over the decision; SPoT's pick.
- ``prompts.py``: the trainable modules, ``SoftPrompt`` (Stage I, SPoT) and ``DTVGPrompt`` (Stage II).
- ``transfer.py``: the transfer gain ``stage2.ranking=transfer`` ranks by (measured in ``runtime``).
- ``config.py``: ``DTVGConfig`` (every knob of the merged prompt), the allowed values, the presets
  and the one check of them (the job's ``stage2`` options are these knobs).

The training loop, the backbones and DeepSpeed (``dtvg_scale.runtime``) live outside this package and
only call it.
"""
