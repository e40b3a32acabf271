"""A model's scores on the run's splits: Keras metrics, and the per-class report and plots of
val and test written into the run dir (evaluate.py computes and draws them)."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import data, evaluate, multilabel_scoring, predictions, rundir
from tf_finetune.config import Config


def evaluate_splits(model: keras.Model, pipelines: dict) -> dict[str, float]:
    """Keras metrics of `model` on each split, flat: val_accuracy, test_loss, ..."""
    results = {}
    for split, ds in pipelines.items():
        for name, value in model.evaluate(ds, return_dict=True, verbose=0).items():
            results[f"{split}_{name}"] = float(value)
    return results


def phase_boundary(config: Config) -> int | None:
    """The first fine-tuning epoch of a two-phase run (curves.png marks it), else None."""
    return config.warmup_epochs if config.two_phase else None


def write_split_report(
    model: keras.Model, ds, dataset: data.DataSet, config: Config, split: str
) -> dict:
    """One prediction pass over `ds` (the split's batches) and everything made from it: the
    report, plots and predictions CSV in the run dir (curves from history.csv if any), and
    the Keras-style scores (`<split>_loss`, `_accuracy`, `_top5_accuracy`) under "scores"."""
    y_true, probabilities, logits, kept = evaluate.predict_split(model, ds)
    history_csv = os.path.join(config.model_dir, rundir.HISTORY)
    report = evaluate.report_predictions(
        y_true,
        probabilities,
        kept,
        list(dataset.class_names),
        config.model_dir,
        split,
        history_csv=history_csv if os.path.exists(history_csv) else None,
        phase_boundary_epoch=phase_boundary(config),
        examples=predictions.example_column(getattr(dataset, split)),
    )
    loss = cross_entropy(y_true, logits, config.label_smoothing)
    report["scores"] = {f"{split}_loss": loss, f"{split}_accuracy": report["accuracy"]}
    if len(dataset.class_names) > 5:  # model.compile_model's metrics
        report["scores"][f"{split}_top5_accuracy"] = report["top5_accuracy"]
    return report


def cross_entropy(y_true: np.ndarray, logits: np.ndarray, label_smoothing: float = 0.0) -> float:
    """The mean categorical cross-entropy `model.evaluate` reports, from the logits of
    predictions already made: the op Keras uses for a softmax output, in float32 like Keras
    (per example), label smoothing included; averaged in float64."""
    num_classes = logits.shape[1]
    targets = np.eye(num_classes, dtype=np.float32)[y_true]
    targets = targets * np.float32(1.0 - label_smoothing) + np.float32(
        label_smoothing / num_classes
    )
    per_example = tf.nn.softmax_cross_entropy_with_logits(
        labels=targets, logits=np.asarray(logits, np.float32)
    )
    return float(np.mean(np.asarray(per_example, np.float64)))


def evaluate_and_report(
    model: keras.Model, config: Config, dataset: data.DataSet, pipelines: dict
) -> dict:
    """Keras-style scores plus the per-class report, plots and predictions CSV for val and
    test, into the run dir: one prediction pass per split feeds them all.

    Validation picked the best checkpoint, so only the test numbers are unbiased.
    """
    if config.task == "multi_label":
        return multilabel_scoring.evaluate_and_report(model, config, dataset, pipelines)
    results = {}
    for split, ds in pipelines.items():
        if split == "train":
            continue
        report = write_split_report(model, ds, dataset, config, split)
        results.update(report.pop("scores"))
        results[f"{split}_macro_f1"] = report["macro_f1"]
        results[f"{split}_weighted_f1"] = report["weighted_f1"]
        logging.info("%s report:\n%s", split, evaluate.format_report(report, dataset.class_names))
    return results
