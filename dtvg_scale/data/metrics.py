"""The benchmark's metrics as pure functions of prediction and target strings.

They reproduce the metrics of the prior code the DTVG protocol comes from (ATTEMPT
``attempt/metrics/metrics.py`` and ``qa_utils.py``, themselves taken from T5's
``t5/evaluation``), so numbers compare with the papers' tables. Differences are deliberate and
listed where they occur.

Scale: every function returns a fraction in 0..1 (correlations in -1..1), not the papers'
0..100, because the pipeline's model selection and the embedded suite use fractions; multiply
by 100 to compare with a table.

Predictions are compared as given; strip them first (the prior code's post-processor strips
decoded predictions and targets, and ``benchmark_tasks.score`` does that).
"""

from __future__ import annotations

import collections
import math
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import regex

__all__ = [
    "Scorer",
    "accuracy",
    "accuracy_scorer",
    "binary_f1",
    "grouped_exact_match",
    "macro_f1",
    "matthews",
    "multirc_f1",
    "normalize_squad",
    "pearson",
    "spearman",
    "squad_em_f1",
    "string_to_float",
]


Scorer = Callable[[list[str], Sequence], dict[str, float]]
"""(predictions, examples) -> metrics, "mean" among them: what a task scores a split with."""


def accuracy_scorer(predictions: list[str], examples: Sequence) -> dict[str, float]:
    """Exact string match against each example's ``target``; the metric of the synthetic worlds' tasks."""
    hits = sum(p.strip() == e.target.strip() for p, e in zip(predictions, examples, strict=True))
    value = hits / max(len(examples), 1)
    return {"accuracy": value, "mean": value}


def _check(predictions: Sequence, targets: Sequence) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Exact string match; 0.0 for no examples."""
    _check(predictions, targets)
    if not targets:
        return 0.0
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)


def binary_f1(predictions: Sequence[str], targets: Sequence[str], positive: str = "1", negative: str = "0") -> float:
    """F1 of the positive class. A prediction that is neither label counts as wrong: it is
    replaced by the opposite of its target, as the prior code's ``f1_score_with_invalid`` does
    (so garbage output costs a false positive or a false negative, never nothing)."""
    _check(predictions, targets)
    if not targets:
        return 0.0
    fixed = [p if p in (positive, negative) else (negative if t == positive else positive)
             for p, t in zip(predictions, targets)]
    import sklearn.metrics  # here, not at the top: with scipy, ~0.5 s of import most runs never need
    return float(sklearn.metrics.f1_score(list(targets), fixed, pos_label=positive, average="binary",
                                          zero_division=0.0))


def matthews(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Matthews correlation on the label strings (an invalid prediction is one more class, as in
    the prior code, which passes the strings to sklearn unchanged)."""
    _check(predictions, targets)
    if not targets:
        return 0.0
    import sklearn.metrics
    return float(sklearn.metrics.matthews_corrcoef(list(targets), list(predictions)))


def string_to_float(text: str, default: float = -1.0) -> float:
    """A prediction as a number; ``default`` (-1, as in the prior code) when it does not parse."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def _correlation(fn, predictions: Sequence[str], targets: Sequence[str]) -> float:
    _check(predictions, targets)
    if len(targets) < 2:
        return 0.0
    x = [string_to_float(t) for t in targets]
    y = [string_to_float(p) for p in predictions]
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan
        warnings.simplefilter("ignore")
        value = float(fn(x, y)[0])
    return 0.0 if math.isnan(value) else value  # the prior code's guard: nan -> 0


def pearson(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Pearson r of the numbers in the strings; unparseable predictions count as -1, and a
    constant prediction (r undefined) scores 0, as in the prior code."""
    import scipy.stats  # here, not at the top (see binary_f1)
    return _correlation(scipy.stats.pearsonr, predictions, targets)


def spearman(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Spearman rho, with the same conventions as :func:`pearson`."""
    import scipy.stats
    return _correlation(scipy.stats.spearmanr, predictions, targets)


def macro_f1(predictions: Sequence[str], targets: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of the per-class F1 over ``labels`` (CB's second metric). A prediction
    outside ``labels`` is a miss for its example's true class."""
    _check(predictions, targets)
    if not targets:
        return 0.0
    import sklearn.metrics
    return float(sklearn.metrics.f1_score(list(targets), list(predictions), labels=list(labels),
                                          average="macro", zero_division=0.0))


def multirc_f1(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """MultiRC F1a: binary F1 over all answer options (each option is one example)."""
    return binary_f1(predictions, targets)


def grouped_exact_match(predictions: Sequence[str], targets: Sequence[str], groups: Sequence[str]) -> float:
    """MultiRC EM: a question counts as right when every one of its answer options is; the mean
    over questions. Only the examples present are grouped (the prior code's warning: with the
    validation set halved, a question's options may be split between validation and test)."""
    _check(predictions, targets)
    _check(groups, targets)
    if not targets:
        return 0.0
    right: dict[str, bool] = {}
    for p, t, g in zip(predictions, targets, groups):
        right[g] = right.get(g, True) and p == t
    return sum(right.values()) / len(right)


_ARTICLES = regex.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_squad(text: str) -> str:
    """The SQuAD v1.1 normalisation T5 uses: lowercase, drop ASCII punctuation, replace the
    articles a/an/the by a space, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(target: str, prediction: str) -> float:
    """Token-overlap F1 of two normalised strings. No common token -> 0, also when both are
    empty (T5's ``_f1_score``; the official SQuAD v2 script would give 1 there)."""
    pred_tokens, target_tokens = prediction.split(), target.split()
    same = sum((collections.Counter(pred_tokens) & collections.Counter(target_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD-style exact match and token F1, each the max over an example's gold answers, then
    the mean over examples: ``{"em": ..., "f1": ...}``. Used for SQuAD, MRQA and ReCoRD."""
    _check(predictions, answers)
    if not answers:
        return {"em": 0.0, "f1": 0.0}
    em, f1 = [], []
    for prediction, golds in zip(predictions, answers):
        if not golds:
            raise ValueError("an example has no gold answer")
        p = normalize_squad(prediction)
        gold = [normalize_squad(g) for g in golds]
        em.append(max(float(p == g) for g in gold))
        f1.append(max(_token_f1(g, p) for g in gold))
    return {"em": float(np.mean(em)), "f1": float(np.mean(f1))}
