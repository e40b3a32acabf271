"""A multi-label model's scores on the run's splits: thresholds chosen on val, then every
split's report (multilabel_metrics) written into the run dir.

Writes `thresholds.json` ({"metric", "labels": {name: threshold}}), `pr_curves_<split>.png`,
`label_confusion_<split>.png`, `predictions_<split>.csv` and (last) `report_<split>.json`;
returns flat metrics for metrics.json: `<split>_loss` (binary cross-entropy), `<split>_map`,
`<split>_accuracy` (subset accuracy: the whole label set right), micro/macro/weighted F1 and
the Hamming loss. Validation chose the checkpoint and the thresholds, so only test is unbiased.
"""

import os

import numpy as np
from absl import logging

from tf_finetune import atomic, evaluate, predictions, rundir
from tf_finetune import multilabel_metrics as mlm
from tf_finetune.config import Config


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(multi-hot targets [n, L], probabilities [n, L]) of `model` over a batched split."""
    targets, probabilities = [], []
    for element in dataset:
        probabilities.append(evaluate.batch_probabilities(model, element[0])[0])
        targets.append(np.asarray(element[1], dtype=np.float32))
    return np.concatenate(targets), np.concatenate(probabilities)


def binary_cross_entropy(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy over every (example, label), from the probabilities clipped to
    [1e-7, 1 - 1e-7] (Keras reads the logits when it has them: equal unless saturated)."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def evaluate_and_report(
    model,
    config: Config,
    dataset,
    pipelines: dict,
    passed: dict | None = None,
    phase_boundary_epoch: int | None = None,
) -> dict:
    """curves.png from history.csv (loss and mAP; `phase_boundary_epoch` as
    `evaluate.plot_curves` takes it), thresholds from val, then each split's report and
    predictions CSV; metrics.json's flat scores. `passed`: (targets, probabilities) of the
    splits already predicted (e.g. from cached features); the others get a pass of `model`."""
    passed = passed or {}
    passes = {
        s: passed[s] if s in passed else predict(model, pipelines[s])
        for s in pipelines
        if s != "train"
    }
    thresholds = mlm.choose_thresholds(
        *passes["val"], metric=config.threshold_metric, fixed=config.threshold
    )
    names = list(dataset.class_names)
    atomic.write_json(
        os.path.join(config.model_dir, rundir.THRESHOLDS),
        {
            "metric": config.threshold_metric,
            "chosen_on": "val",
            "labels": dict(zip(names, (float(t) for t in thresholds))),
        },
    )
    history = os.path.join(config.model_dir, rundir.HISTORY)
    if os.path.exists(history):  # as a single-label run's, with the run's score: mAP
        curves = os.path.join(config.model_dir, "curves.png")
        evaluate.plot_curves(history, curves, phase_boundary_epoch, score="map")
    results = {"task": "multi_label"}
    for split, (targets, probabilities) in passes.items():
        report = write_split_report(
            (targets, probabilities), config.model_dir, dataset, split, thresholds
        )
        logging.info("%s report:\n%s", split, mlm.format_report(report))
        results[f"{split}_loss"] = binary_cross_entropy(targets, probabilities)
        results[f"{split}_accuracy"] = report["subset_accuracy"]
        for key in ("map", "micro_f1", "macro_f1", "weighted_f1", "hamming_loss"):
            results[f"{split}_{key}"] = report[key]
    return results


def write_split_report(passed, run_dir: str, dataset, split: str, thresholds) -> dict:
    """One split's report with `thresholds`: plots, predictions CSV, then report_<split>.json.

    `passed`: (multi-hot targets, probabilities) of the split, as `predict` returns them.
    """
    targets, probabilities = passed
    names = list(dataset.class_names)
    report = mlm.multi_label_report(targets, probabilities, names, thresholds)
    report["split"] = split
    report["files"] = [
        plot(targets, probabilities, names, thresholds, os.path.join(run_dir, name))
        for plot, name in (
            (plot_pr_curves, f"pr_curves_{split}.png"),
            (plot_label_confusion, f"label_confusion_{split}.png"),
        )
    ]
    report["files"].append(
        predictions.write_multi_label_csv(
            predictions.file_name(run_dir, split),
            targets,
            probabilities,
            names,
            thresholds,
            predictions.example_column(getattr(dataset, split)),
        )
    )
    path = os.path.join(run_dir, f"report_{split}.json")
    report["files"].append(path)
    atomic.write_json(path, report)
    return report


def plot_pr_curves(targets, probabilities, names, thresholds, path: str) -> str:
    """Each label's precision-recall curve, its AP in the legend and its threshold marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    for j, name in enumerate(names):
        y, p = targets[:, j] > 0, probabilities[:, j]
        if not y.any():
            continue
        precision, recall = mlm.precision_recall_curve(y, p)
        ap = mlm.average_precision(y, p)
        (line,) = ax.step(recall, precision, where="post", label=f"{name} (AP {ap:.3f})")
        chosen = p >= thresholds[j]
        tp = float((chosen & y).sum())
        if chosen.any():
            ax.plot(tp / y.sum(), tp / chosen.sum(), "o", color=line.get_color())
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall per label (dots: the thresholds chosen on val)")
    ax.legend(fontsize=8, loc="lower left")
    return atomic.save_figure(fig, path)


def plot_label_confusion(targets, probabilities, names, thresholds, path: str) -> str:
    """`multilabel_metrics.label_confusion` as a heat map with the shares written in."""
    from matplotlib.figure import Figure

    shares = mlm.label_confusion(targets > 0, probabilities >= np.asarray(thresholds))
    side = min(max(5.0, 0.45 * len(names) + 2.5), 20.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("Labels predicted for each true label (diagonal: recall)")
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                colour = "white" if shares[i, j] > 0.6 else "black"
                ax.text(
                    j, i, f"{shares[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=7
                )
    return atomic.save_figure(fig, path)
