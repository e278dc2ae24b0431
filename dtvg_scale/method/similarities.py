"""Task-vector similarities: ``fn(target_tv [r, d], source_tvs [K, r, d]) -> (target_sim [K], pair_sim [K, K])``.

The paper compares task vectors with ``mean_dot``, a dot product of token means. In the
controlled experiment (``../shared/research/controlled_findings.md``) that similarity was
dominated by a component shared by every task: almost every source scored positive, KC was flat
and the planted helpful sources were rarely ranked first. The others here are knobs
(``stage2.similarity``) a sweep can search; ``mean_dot`` stays the default. To add one, write a
function below and name it in ``SIMILARITIES`` (and in ``POOLED_SIMILARITIES`` if it sees a task
vector only through its token mean): the config, the sweep's search space and the prompt pick it
up from there.

Every similarity is an inner product of a feature map of the task vectors, so ``pair_sim`` is a
symmetric positive semi-definite Gram matrix:

- ``mean_dot``: ``mean_d(mean_r(a) * mean_r(b))`` (the paper; its 1/d is ours, the ranking is the
  same). Not a cosine: longer task vectors count for more.
- ``mean_cosine``: cosine of the token means ``mean_r(a)`` and ``mean_r(b)``.
- ``flat_dot``: ``sum(a * b) / (r * d)`` over all entries (no mean-pooling).
- ``flat_cosine``: cosine of the flattened ``[r * d]`` vectors.
- ``centered_sources``: ``mean_cosine`` after ``center(..., include_target=False)``, i.e.
  after subtracting the mean of the K source task vectors from the target and every source.
- ``centered_all``: ``mean_cosine`` after ``center(..., include_target=True)``, i.e. after
  subtracting the mean of the K sources and the target (K + 1 vectors) from all of them.
- ``token_cosine``: ``mean_r cos(a[i], b[i])``: row-wise cosine, averaged over the r tokens.

A cosine with a zero vector (norm below ``EPS``) is 0, never NaN. Centering removes any
component shared by all the vectors it averages: adding the same vector to the target and to
every source changes neither centered similarity. Everything is pure tensor code (no I/O, no
loop over sources, no host sync) computed in at least float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12  # norms below this count as zero: the cosine with a zero vector is 0

SimilarityFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Prefix sums of similarities in bf16/fp16 would round away the differences that decide
    # the group, so decide in at least fp32 (fp64 stays fp64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_vectors(target_tv: Tensor, source_tvs: Tensor) -> None:
    """``target_tv`` must be [r, d] and ``source_tvs`` [K, r, d] of the same r and d."""
    if target_tv.dim() != 2:
        raise ValueError(f"target task vector must be [r, d], got shape {tuple(target_tv.shape)}")
    if source_tvs.dim() != 3 or source_tvs.shape[1:] != target_tv.shape:
        raise ValueError(
            f"source task vectors must be [K, r, d] = [K, {target_tv.shape[0]}, {target_tv.shape[1]}] "
            f"to match the target, got shape {tuple(source_tvs.shape)}"
        )


# -- similarities
def _prepare(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    check_vectors(target_tv, source_tvs)
    dtype = compute_dtype(source_tvs.dtype)
    return target_tv.to(dtype), source_tvs.to(dtype)


def _dot_gram(target_feat: Tensor, source_feats: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Inner products of features ``[D]`` / ``[K, D]``, divided by ``scale``."""
    return source_feats @ target_feat / scale, source_feats @ source_feats.T / scale


def _cosine_gram(target_feat: Tensor, source_feats: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines of features ``[D]`` / ``[K, D]``; a zero feature vector has cosine 0 with all."""
    target_unit = F.normalize(target_feat, dim=-1, eps=EPS)
    source_units = F.normalize(source_feats, dim=-1, eps=EPS)
    return source_units @ target_unit, source_units @ source_units.T


def mean_dot(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's similarity, ``mean_d(mean_r(a) * mean_r(b))``: a dot product of token-mean
    vectors divided by d (the paper omits the 1/d; the ranking is the same)."""
    target, sources = _prepare(target_tv, source_tvs)
    return _dot_gram(target.mean(dim=0), sources.mean(dim=1), target.shape[-1])


def mean_cosine(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of the token-mean vectors ``mean_r(a)`` and ``mean_r(b)``."""
    target, sources = _prepare(target_tv, source_tvs)
    return _cosine_gram(target.mean(dim=0), sources.mean(dim=1))


def flat_dot(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """Dot product over all ``r * d`` entries, divided by ``r * d`` (no mean-pooling)."""
    target, sources = _prepare(target_tv, source_tvs)
    return _dot_gram(target.flatten(), sources.flatten(start_dim=1), target.numel())


def flat_cosine(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of the flattened ``[r * d]`` vectors."""
    target, sources = _prepare(target_tv, source_tvs)
    return _cosine_gram(target.flatten(), sources.flatten(start_dim=1))


def center(target_tv: Tensor, source_tvs: Tensor, include_target: bool) -> tuple[Tensor, Tensor]:
    """Subtract one mean task vector ``mu`` [r, d] from the target and from every source.

    ``include_target=False``: ``mu = mean_k T_k`` over the K sources (the library);
    ``include_target=True``: ``mu = (T_t + sum_k T_k) / (K + 1)``.
    With no source and ``include_target=False``, ``mu = 0``. Returns the centered
    ``(target [r, d], sources [K, r, d])`` in the compute dtype (>= float32).
    """
    target, sources = _prepare(target_tv, source_tvs)
    total = sources.sum(dim=0)
    count = sources.shape[0]
    if include_target:
        total = total + target
        count += 1
    mu = total / max(count, 1)
    return target - mu, sources - mu


def centered_sources(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_cosine`` after subtracting the mean of the K source task vectors from all."""
    return mean_cosine(*center(target_tv, source_tvs, include_target=False))


def centered_all(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_cosine`` after subtracting the mean of the K sources and the target from all."""
    return mean_cosine(*center(target_tv, source_tvs, include_target=True))


def token_cosine(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_r cos(a[i, :], b[i, :])``: the row-wise cosine of the two prompts, averaged over
    the r tokens (a zero row contributes 0). One matmul over unit rows, flattened."""
    target, sources = _prepare(target_tv, source_tvs)
    length = target.shape[0]
    target_rows = F.normalize(target, dim=-1, eps=EPS).flatten()
    source_rows = F.normalize(sources, dim=-1, eps=EPS).flatten(start_dim=1)
    return _dot_gram(target_rows, source_rows, length)


SIMILARITIES: dict[str, SimilarityFn] = {
    "mean_dot": mean_dot,
    "mean_cosine": mean_cosine,
    "flat_dot": flat_dot,
    "flat_cosine": flat_cosine,
    "centered_sources": centered_sources,
    "centered_all": centered_all,
    "token_cosine": token_cosine,
}


# The similarities that see a task vector only through its token mean ``mean_r`` (centering is
# linear, so it commutes with the mean): for them ``scaled_token_means`` is an exact stand-in for
# the full scaled vectors, without materialising ``[K, r, d]`` (26 MB at K=128, r=200, d=256).
POOLED_SIMILARITIES: tuple[str, ...] = ("mean_dot", "mean_cosine", "centered_sources", "centered_all")


def scaled_token_means(scales: Tensor, vectors: Tensor) -> Tensor:
    """``mean_r(scales[..., r, None] * vectors)`` kept as one token: ``[..., 1, d]`` from scales
    ``[..., r]`` and vectors ``[..., r, d]``, in the compute dtype (>= float32). A pooled
    similarity gives (up to rounding) the same result on these as on the scaled vectors."""
    dtype = compute_dtype(vectors.dtype)
    pooled = torch.einsum("...r,...rd->...d", scales.to(dtype), vectors.to(dtype)) / vectors.shape[-2]
    return pooled.unsqueeze(-2)
