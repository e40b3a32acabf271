"""Multi-label scores against scikit-learn, and thresholds chosen on val."""

import numpy as np
import pytest
from sklearn import metrics as skm

from tf_finetune import multilabel_metrics as mlm

NAMES = ["cat", "dog", "sky", "rare"]


def _data(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    y = rng.random((n, 4)) < [0.5, 0.3, 0.2, 0.0]  # "rare" has no positive example
    noise = rng.normal(0, 0.35, size=y.shape)
    p = 1 / (1 + np.exp(-(2.5 * (y - 0.5) + noise)))
    p[:5, 2] = p[5, 2]  # ties in score
    return y.astype(np.int64), p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_scikit_learn(seed):
    y, p = _data(seed)
    thresholds = np.array([0.5, 0.4, 0.6, 0.5])
    report = mlm.multi_label_report(y, p, NAMES, thresholds)
    predicted = (p >= thresholds).astype(np.int64)
    kw = dict(zero_division=0)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, predicted, **kw)
    for j, name in enumerate(NAMES):
        row = report["per_label"][name]
        assert row["precision"] == pytest.approx(precision[j])
        assert row["recall"] == pytest.approx(recall[j])
        assert row["f1"] == pytest.approx(f1[j])
        assert row["support"] == support[j]
    for average in ("micro", "macro", "weighted"):
        want = skm.precision_recall_fscore_support(y, predicted, average=average, **kw)
        got = [report[f"{average}_{k}"] for k in ("precision", "recall", "f1")]
        assert got == pytest.approx(list(want[:3]))
    aps = [skm.average_precision_score(y[:, j], p[:, j]) for j in range(3)]
    assert [report["per_label"][n]["average_precision"] for n in NAMES[:3]] == pytest.approx(aps)
    assert report["per_label"]["rare"]["average_precision"] is None
    assert report["map"] == pytest.approx(np.mean(aps))  # over labels with positives
    assert report["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert report["hamming_loss"] == pytest.approx(skm.hamming_loss(y, predicted))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_thresholds_reach_the_best_f1_any_threshold_gives(seed):
    y, p = _data(seed)
    thresholds = mlm.choose_thresholds(y, p, metric="f1")
    for j in range(3):
        candidates = np.unique(np.concatenate([p[:, j], [0.0, 1.0]]))
        best = max(skm.f1_score(y[:, j], p[:, j] >= t, zero_division=0) for t in candidates)
        got = skm.f1_score(y[:, j], p[:, j] >= thresholds[j], zero_division=0)
        assert got == pytest.approx(best)
    assert thresholds[3] == mlm.DEFAULT_THRESHOLD  # no positives: the fixed threshold


def test_thresholds_fall_between_scores_and_never_split_ties():
    y = np.array([[1], [1], [0], [1], [0]])
    p = np.array([[0.9], [0.7], [0.7], [0.4], [0.1]])
    # Cutting after the tie at 0.7 (3 predicted, 2 right) gives F1 0.667; after 0.4, 0.857.
    (threshold,) = mlm.choose_thresholds(y, p)
    assert threshold == pytest.approx(0.25)
    assert mlm.choose_thresholds(y, p, metric="fixed", fixed=0.3).tolist() == [0.3]


def test_thresholds_from_val_are_applied_unchanged_to_test():
    y_val, p_val = _data(0)
    y_test, p_test = _data(1)
    thresholds = mlm.choose_thresholds(y_val, p_val)
    report = mlm.multi_label_report(y_test, p_test, NAMES, thresholds)
    assert report["thresholds"] == pytest.approx(list(thresholds))
    assert [report["per_label"][n]["threshold"] for n in NAMES] == pytest.approx(list(thresholds))


def test_co_occurrence_counts_pairs_and_the_report_counts_unlabelled_examples():
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    assert mlm.co_occurrence(y).tolist() == [[3, 2, 1], [2, 2, 1], [1, 1, 1]]
    report = mlm.multi_label_report(y, y * 0.9, ["a", "b", "c"], [0.5] * 3)
    assert report["examples_without_labels"] == 1
    assert report["subset_accuracy"] == 1.0 and report["hamming_loss"] == 0.0
    text = mlm.format_report(report)
    assert "mAP 1.0000" in text and text.count("\n") >= 7


@pytest.mark.parametrize(
    "y, p",
    [
        (np.zeros((0, 2)), np.zeros((0, 2))),
        (np.ones((3, 2)), np.ones((3, 3))),
        (np.full((2, 2), 2), np.ones((2, 2))),
        (np.ones((2, 2)), np.full((2, 2), np.nan)),
    ],
)
def test_bad_inputs_are_refused(y, p):
    with pytest.raises(ValueError):
        mlm.multi_label_report(y, p, ["a", "b"], [0.5, 0.5])


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_curve_matches_scikit_learn(seed):
    y, p = _data(seed)
    for j in range(3):
        precision, recall = mlm.precision_recall_curve(y[:, j], p[:, j])
        want_p, want_r, _ = skm.precision_recall_curve(y[:, j], p[:, j])
        # scikit-learn: lowest threshold first, then a final (precision 1, recall 0) point.
        np.testing.assert_allclose(precision, want_p[:-1][::-1])
        np.testing.assert_allclose(recall, want_r[:-1][::-1])


def test_label_confusion_rows_are_shares_of_each_true_label():
    y = np.array([[1, 0], [1, 1], [0, 1], [1, 0]])
    predicted = np.array([[1, 1], [0, 1], [0, 1], [1, 0]])
    shares = mlm.label_confusion(y, predicted)
    assert shares.tolist() == [[2 / 3, 2 / 3], [0.0, 1.0]]


def test_the_min_accuracy_gate_reads_map_for_multi_label():
    from tf_finetune import selection

    single = {"val_accuracy": 0.9, "test_accuracy": 0.8}
    multi = {"task": "multi_label", "val_accuracy": 0.1, "val_map": 0.7, "test_accuracy": 0.2}
    multi["test_map"] = 0.6
    assert selection.gate_accuracy(single) == ("test", 0.8)
    assert selection.gate_accuracy(multi) == ("test", 0.6)
    del multi["test_accuracy"], multi["test_map"]
    assert selection.gate_accuracy(multi) == ("val", 0.7)
