"""Multi-label scores: per-label thresholds chosen on val, and the report scored with them.

A multi-label model gives one independent probability per label (a sigmoid head); an example
carries a label when its probability reaches that label's threshold. The thresholds are chosen
on the validation split (`choose_thresholds`) and then applied unchanged to test
(`multi_label_report`), so test numbers stay honest.

Conventions match scikit-learn's with `zero_division=0` (tests cross-check them):
  * precision of a label never predicted is 0; recall of a label with no positives is 0;
  * average precision (AP) is the step-wise area under the precision-recall curve
    (`sklearn.metrics.average_precision_score`); a label without positives has no AP and is
    left out of mAP (mAP is over labels that have positives);
  * micro averages pool every (example, label) decision; macro is the plain mean over labels;
    weighted weights each label by its number of positives;
  * subset accuracy: the whole predicted label set equals the true one; Hamming loss: the
    share of wrong (example, label) decisions.
"""

from collections.abc import Sequence

import numpy as np

THRESHOLD_METRICS = ("f1", "fixed")
DEFAULT_THRESHOLD = 0.5


def _checked(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bool [n, L], float64 [n, L]), or ValueError on shapes, values or no examples."""
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must both be [n, labels]")
    if y.shape[0] == 0:
        raise ValueError("no examples to evaluate")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("multi-label targets must be 0/1 (multi-hot)")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinity")
    return y.astype(bool), p


def _best_f1_threshold(y: np.ndarray, p: np.ndarray, default: float) -> float:
    """The threshold maximising F1 of one label: halfway between the lowest score kept
    positive and the next lower distinct score (ties in score are never split). A label
    without positives keeps `default`."""
    positives = int(y.sum())
    if positives == 0:
        return default
    order = np.argsort(-p, kind="stable")
    scores, hits = p[order], y[order]
    true_positives = np.cumsum(hits)
    # Only cut after the last of a run of equal scores.
    cut = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    predicted = cut + 1
    f1 = 2 * true_positives[cut] / (predicted + positives)
    best = cut[int(np.argmax(f1))]  # the first maximum: the highest threshold among ties
    if best + 1 == len(scores):
        return float(scores[best]) / 2 if scores[best] > 0 else 0.0
    return float(scores[best] + scores[best + 1]) / 2


def choose_thresholds(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    metric: str = "f1",
    fixed: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """Per-label thresholds [L]: `f1` maximises each label's F1 on these (val) examples,
    `fixed` gives every label `fixed`. A label with no positive example keeps `fixed`."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"threshold metric must be one of {THRESHOLD_METRICS}, not {metric!r}")
    y, p = _checked(y_true, probabilities)
    if metric == "fixed":
        return np.full(y.shape[1], float(fixed))
    return np.array([_best_f1_threshold(y[:, j], p[:, j], fixed) for j in range(y.shape[1])])


def _divide(numerator, denominator) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def average_precision(y: np.ndarray, p: np.ndarray) -> float | None:
    """AP of one label (scikit-learn's definition); None when it has no positive example."""
    positives = int(y.sum())
    if positives == 0:
        return None
    order = np.argsort(-p, kind="stable")
    scores, hits = p[order], y[order]
    last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # one point per score
    true_positives = np.cumsum(hits)[last]
    precision = true_positives / (last + 1)
    recall = true_positives / positives
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * precision))


def precision_recall_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of one label at each distinct score as threshold, highest first."""
    order = np.argsort(-p, kind="stable")
    scores, hits = p[order], y[order].astype(np.float64)
    last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    true_positives = np.cumsum(hits)[last]
    return true_positives / (last + 1), true_positives / max(hits.sum(), 1.0)


def label_confusion(y_true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """[L, L]: row i, column j = the share of examples carrying label i that were given label j
    (the diagonal is each label's recall; off it, labels predicted alongside or instead)."""
    y = np.asarray(y_true).astype(np.float64)
    counts = y.T @ np.asarray(predicted).astype(np.float64)
    return _divide(counts, np.broadcast_to(y.sum(axis=0)[:, None], counts.shape))


def _counts(y: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, ...]:
    tp = np.sum(y & predicted, axis=0)
    fp = np.sum(~y & predicted, axis=0)
    fn = np.sum(y & ~predicted, axis=0)
    return tp, fp, fn


def _f1(precision, recall) -> np.ndarray:
    return _divide(2 * precision * recall, precision + recall)


def _averages(tp, fp, fn, support) -> dict:
    precision, recall = _divide(tp, tp + fp), _divide(tp, tp + fn)
    f1 = _f1(precision, recall)
    micro_p, micro_r = (
        _divide(tp.sum(), tp.sum() + fp.sum()),
        _divide(tp.sum(), tp.sum() + fn.sum()),
    )
    total = support.sum()
    weights = support / total if total else np.zeros_like(support, dtype=np.float64)
    return {
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        "micro_f1": float(_f1(micro_p, micro_r)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_precision": float(np.sum(precision * weights)),
        "weighted_recall": float(np.sum(recall * weights)),
        "weighted_f1": float(np.sum(f1 * weights)),
    }


def multi_label_report(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    label_names: Sequence[str],
    thresholds: Sequence[float],
) -> dict:
    """Every multi-label score of `probabilities` against multi-hot `y_true`, with `thresholds`.

    Returns a JSON-serialisable dict: num_examples, num_labels, label_names, thresholds,
    per_label {name: {precision, recall, f1, average_precision, support, threshold}}, map,
    micro/macro/weighted precision, recall and F1, subset_accuracy, hamming_loss,
    examples_without_labels.
    """
    y, p = _checked(y_true, probabilities)
    names = [str(n) for n in label_names]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if len(names) != y.shape[1] or thresholds.shape != (y.shape[1],):
        raise ValueError(f"{y.shape[1]} labels, {len(names)} names, {thresholds.shape} thresholds")
    predicted = p >= thresholds
    tp, fp, fn = _counts(y, predicted)
    support = y.sum(axis=0)
    precision, recall = _divide(tp, tp + fp), _divide(tp, tp + fn)
    f1 = _f1(precision, recall)
    aps = [average_precision(y[:, j], p[:, j]) for j in range(y.shape[1])]
    defined = [ap for ap in aps if ap is not None]
    per_label = {
        name: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "average_precision": aps[j],
            "support": int(support[j]),
            "threshold": float(thresholds[j]),
        }
        for j, name in enumerate(names)
    }
    return {
        "num_examples": int(y.shape[0]),
        "num_labels": len(names),
        "label_names": names,
        "thresholds": [float(t) for t in thresholds],
        "per_label": per_label,
        "map": float(np.mean(defined)) if defined else None,
        **_averages(tp, fp, fn, support),
        "subset_accuracy": float(np.mean(np.all(predicted == y, axis=1))),
        "hamming_loss": float(np.mean(predicted != y)),
        "examples_without_labels": int(np.sum(~y.any(axis=1))),
    }


def co_occurrence(y_true: np.ndarray) -> np.ndarray:
    """[L, L] counts of examples carrying both labels; the diagonal counts each label."""
    y = np.asarray(y_true).astype(np.int64)
    return y.T @ y


def format_report(report: dict) -> str:
    """The report as a fixed-width table: one row per label, then the averages."""
    names = report["label_names"]
    width = max([len(n) for n in names] + [16])
    head = f"{'label':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'AP':>9} "
    lines = [head + f"{'support':>8} {'threshold':>9}"]
    for name in names:
        s = report["per_label"][name]
        ap = "" if s["average_precision"] is None else f"{s['average_precision']:.4f}"
        lines.append(
            f"{name:<{width}} {s['precision']:>9.4f} {s['recall']:>9.4f} {s['f1']:>9.4f} "
            f"{ap:>9} {s['support']:>8d} {s['threshold']:>9.3f}"
        )
    lines.append("")
    for kind in ("micro", "macro", "weighted"):
        lines.append(
            f"{kind + ' avg':<{width}} {report[kind + '_precision']:>9.4f} "
            f"{report[kind + '_recall']:>9.4f} {report[kind + '_f1']:>9.4f}"
        )
    mean_ap = "n/a" if report["map"] is None else f"{report['map']:.4f}"
    lines.append(
        f"mAP {mean_ap}   subset accuracy {report['subset_accuracy']:.4f}   "
        f"Hamming loss {report['hamming_loss']:.4f}   "
        f"({report['num_examples']} examples, {report['examples_without_labels']} without labels)"
    )
    return "\n".join(lines)
