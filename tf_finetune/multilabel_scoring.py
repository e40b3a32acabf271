"""A multi-label model's scores on the run's splits: thresholds chosen on val, then every
split's report (multilabel_metrics) written into the run dir.

Writes `thresholds.json` ({"metric", "labels": {name: threshold}}) and `report_<split>.json`;
returns flat metrics for metrics.json: `<split>_loss` (binary cross-entropy), `<split>_map`,
`<split>_accuracy` (subset accuracy: the whole label set right), micro/macro/weighted F1 and
the Hamming loss. Validation chose the checkpoint and the thresholds, so only test is unbiased.
"""

import os

import numpy as np
from absl import logging

from tf_finetune import atomic, evaluate, rundir
from tf_finetune import multilabel_metrics as mlm
from tf_finetune.config import Config


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(multi-hot targets [n, L], probabilities [n, L]) of `model` over a batched split."""
    targets, probabilities = [], []
    for element in dataset:
        probabilities.append(evaluate.batch_probabilities(model, element[0]))
        targets.append(np.asarray(element[1], dtype=np.float32))
    return np.concatenate(targets), np.concatenate(probabilities)


def binary_cross_entropy(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy over every (example, label), as Keras computes it."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def evaluate_and_report(model, config: Config, class_names, pipelines: dict) -> dict:
    """Thresholds from val, then each split's report; metrics.json's flat scores."""
    predictions = {s: predict(model, ds) for s, ds in pipelines.items() if s != "train"}
    thresholds = mlm.choose_thresholds(
        *predictions["val"], metric=config.threshold_metric, fixed=config.threshold
    )
    names = list(class_names)
    atomic.write_json(
        os.path.join(config.model_dir, rundir.THRESHOLDS),
        {
            "metric": config.threshold_metric,
            "chosen_on": "val",
            "labels": dict(zip(names, (float(t) for t in thresholds))),
        },
    )
    results = {"task": "multi_label"}
    for split, (targets, probabilities) in predictions.items():
        report = mlm.multi_label_report(targets, probabilities, names, thresholds)
        report["split"] = split
        atomic.write_json(os.path.join(config.model_dir, f"report_{split}.json"), report)
        logging.info("%s report:\n%s", split, mlm.format_report(report))
        results[f"{split}_loss"] = binary_cross_entropy(targets, probabilities)
        results[f"{split}_accuracy"] = report["subset_accuracy"]
        for key in ("map", "micro_f1", "macro_f1", "weighted_f1", "hamming_loss"):
            results[f"{split}_{key}"] = report[key]
    return results
