"""The benchmark metrics against values computed by hand (fractions, not percentages)."""

from __future__ import annotations

import math

import pytest

from dtvg_scale.data import metrics


def test_accuracy_is_exact_string_match():
    assert metrics.accuracy(["1", "0", "1 ", "2"], ["1", "0", "1", "1"]) == 0.5
    assert metrics.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metrics.accuracy(["1", "0"], ["1"])


def test_binary_f1_counts_invalid_predictions_as_wrong():
    # targets 1 1 0 0; predictions 1, garbage (-> 0: a miss), garbage (-> 1: a false alarm), 0
    # tp 1, fn 1, fp 1 -> precision 1/2, recall 1/2, F1 1/2
    assert metrics.binary_f1(["1", "yes", "maybe", "0"], ["1", "1", "0", "0"]) == pytest.approx(0.5)
    assert metrics.binary_f1(["1", "0", "0"], ["1", "1", "0"]) == pytest.approx(2 / 3)  # tp 1, fn 1
    assert metrics.binary_f1(["0", "0"], ["0", "0"]) == 0.0  # no positive anywhere


def test_matthews_on_a_tiny_case():
    # tp 1, tn 2, fp 1, fn 0: (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2) = 2 / sqrt(12)
    value = metrics.matthews(["1", "1", "0", "0"], ["1", "0", "0", "0"])
    assert value == pytest.approx(2 / math.sqrt(12))
    assert metrics.matthews(["1", "0"], ["1", "0"]) == pytest.approx(1.0)
    assert metrics.matthews(["0", "0", "0"], ["1", "0", "1"]) == 0.0  # constant prediction


def test_correlations_map_unparseable_predictions_to_minus_one():
    assert metrics.string_to_float("3.4") == 3.4 and metrics.string_to_float("three") == -1.0
    # "oops" -> -1: x = (1, 2, 3), y = (1, 2, -1); centred x (-1, 0, 1), y (1/3, 4/3, -5/3):
    # r = -2 / sqrt(2 * 42/9) = -6 / sqrt(84); ranks y (2, 3, 1): rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert metrics.pearson(["1.0", "2.0", "oops"], ["1", "2", "3"]) == pytest.approx(-6 / math.sqrt(84))
    assert metrics.spearman(["1.0", "2.0", "oops"], ["1", "2", "3"]) == pytest.approx(-0.5)
    assert metrics.pearson(["0.2", "0.4", "0.6"], ["1", "2", "3"]) == pytest.approx(1.0)
    assert metrics.pearson(["2.0", "2.0", "2.0"], ["1", "2", "3"]) == 0.0  # undefined -> 0, as the prior code
    assert metrics.pearson(["1.0"], ["1.0"]) == 0.0


def test_cb_macro_f1():
    # class 0: tp 1 fp 0 fn 0 -> 1; class 1: tp 1 fp 1 fn 0 -> 2/3; class 2: tp 0 -> 0 ("x" misses it)
    value = metrics.macro_f1(["0", "1", "1", "x"], ["0", "1", "2", "2"], ["0", "1", "2"])
    assert value == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_multirc_f1_and_em_grouped_by_question():
    predictions = ["1", "0", "1", "1", "0"]
    targets = ["1", "0", "0", "1", "0"]
    groups = ["q1", "q1", "q2", "q2", "q3"]
    # q1 all right, q2 one wrong, q3 right -> EM 2/3; over answers tp 2, fp 1, fn 0 -> F1 0.8
    assert metrics.grouped_exact_match(predictions, targets, groups) == pytest.approx(2 / 3)
    assert metrics.multirc_f1(predictions, targets) == pytest.approx(0.8)


def test_squad_normalisation():
    assert metrics.normalize_squad("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_squad("an apple, a pear and THE fig.") == "apple pear and fig"
    assert metrics.normalize_squad("theatre") == "theatre"  # articles only as whole words
    assert metrics.normalize_squad("24-10") == "2410"  # punctuation is dropped, not spaced


def test_squad_em_f1_max_over_gold_answers_and_empty_answers():
    result = metrics.squad_em_f1(["Denver Broncos", "the panthers won", ""],
                                 [["Broncos", "the Denver Broncos."], ["Carolina Panthers"], ["Seattle"]])
    # 1: EM with the second gold; 2: tokens {panthers, won} vs {carolina, panthers}: P 1/2 R 1/2 F1 1/2;
    # 3: empty prediction -> 0 and 0
    assert result["em"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    empty = metrics.squad_em_f1([""], [[""]])
    assert empty == {"em": 1.0, "f1": 0.0}  # T5's token F1 is 0 without a common token
    with pytest.raises(ValueError, match="no gold answer"):
        metrics.squad_em_f1(["x"], [[]])
