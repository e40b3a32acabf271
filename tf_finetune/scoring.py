"""A model's scores on the run's splits: Keras metrics, and the per-class report and plots of
val and test written into the run dir (evaluate.py computes and draws them)."""

import os

import keras
from absl import logging

from tf_finetune import data, evaluate, multilabel_scoring, rundir
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
    """evaluate.write_report for one split into the run dir (curves from history.csv if any)."""
    history_csv = os.path.join(config.model_dir, rundir.HISTORY)
    return evaluate.write_report(
        model,
        ds,
        list(dataset.class_names),
        config.model_dir,
        split_name=split,
        history_csv=history_csv if os.path.exists(history_csv) else None,
        phase_boundary_epoch=phase_boundary(config),
    )


def evaluate_and_report(
    model: keras.Model, config: Config, dataset: data.DataSet, pipelines: dict
) -> dict:
    """Keras metrics plus the per-class report and plots for val and test, into the run dir.

    Validation picked the best checkpoint, so only the test numbers are unbiased.
    """
    if config.task == "multi_label":
        return multilabel_scoring.evaluate_and_report(model, config, dataset.class_names, pipelines)
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    results = evaluate_splits(model, evaluated)
    for split, ds in evaluated.items():
        report = write_split_report(model, ds, dataset, config, split)
        results[f"{split}_macro_f1"] = report["macro_f1"]
        results[f"{split}_weighted_f1"] = report["weighted_f1"]
        logging.info("%s report:\n%s", split, evaluate.format_report(report, dataset.class_names))
    return results
