"""A model's scores on the run's splits: Keras metrics, and the per-class report and plots of
val and test written into the run dir (evaluate.py computes and draws them).

A head-only run passes its splits' cached backbone features (`Cached`): their predictions
then come from the head alone, and only the worst mistakes' images are decoded again (for
mistakes_<split>.png), not every image of val and test.
"""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import data, evaluate, features, multilabel_scoring, predictions, rundir
from tf_finetune.config import Config


@dataclasses.dataclass(frozen=True)
class Cached:
    """Backbone features of a head-only run's splits, and the head that reads them (sharing
    the final model's head layers)."""

    head: keras.Model
    splits: dict[str, features.Features]
    text: bool = False  # a text model: the mistakes' texts are kept, not images

    def predictions(self, dataset: data.DataSet, split: str) -> evaluate.Predictions | None:
        """The split's predictions from its features; None when it has none cached."""
        if split not in self.splits:
            return None
        return predict_features(self.head, self.splits[split], getattr(dataset, split), self.text)

    def multi_label_passes(self) -> dict:
        """{split: (multi-hot targets, probabilities)} from the features."""
        return {
            name: (np.asarray(f.labels), feature_probabilities(self.head, f)[0])
            for name, f in self.splits.items()
        }


def feature_probabilities(head: keras.Model, cached: features.Features, batch: int = 1024):
    """(probabilities, logits) of the head over a split's cached features, in row order.

    The head runs eagerly: a layer or two, op by op, in a few milliseconds, where compiling it
    (what `batch_probabilities` does with a Keras model) took ~0.15 s per split."""
    eager = lambda x: head(x, training=False)  # noqa: E731
    parts = [
        evaluate.batch_probabilities(eager, np.asarray(cached.features[i : i + batch]))
        for i in range(0, cached.count, batch)
    ]
    if not parts:
        return np.zeros((0, cached.labels.shape[1]), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate([p for p, _ in parts]), np.concatenate([lg for _, lg in parts])


def predict_features(
    head: keras.Model, cached: features.Features, split: data.Split, text: bool = False
) -> evaluate.Predictions:
    """`evaluate.predict_split` from cached features: the head's predictions, and the inputs
    of the worst mistakes the report shows (images: decoded again) or lists (texts)."""
    probabilities, logits = feature_probabilities(head, cached)
    y_true = np.asarray(cached.labels).argmax(axis=1).astype(np.int64)
    limit = evaluate.DEFAULT_KEPT_IMAGES if text else evaluate.MISTAKES_SHOWN
    order = evaluate.most_confident_mistakes(y_true, probabilities, limit)
    inputs = _load(split, order)
    kept = evaluate.keep_inputs(
        np.array(inputs, dtype=object) if text else np.stack(inputs) if inputs else np.zeros(0)
    )
    return evaluate.Predictions(y_true, probabilities, logits, evaluate.MistakeImages(order, kept))


def _load(split: data.Split, indices: np.ndarray) -> list:
    """The loaded inputs of `split` at `indices` (positions in its source), in that order.

    Loaded by one traced map: eagerly, op by op, a photo's decode took ~15 ms on 2 cores."""
    if not len(indices):
        return []
    keys = data.keys_at(split, indices)
    wanted = tf.data.Dataset.from_tensor_slices([keys[int(i)] for i in indices])
    return [x.numpy() for x in wanted.map(split.load, num_parallel_calls=data.AUTOTUNE)]


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
    model: keras.Model,
    ds,
    dataset: data.DataSet,
    config: Config,
    split: str,
    passed: evaluate.Predictions | None = None,
    curves: bool = True,
) -> dict:
    """One prediction pass over `ds` (the split's batches) and everything made from it: the
    report, plots and predictions CSV in the run dir (curves from history.csv if any and
    `curves`), and the Keras-style scores (`<split>_loss`, `_accuracy`, `_top5_accuracy`)
    under "scores". `passed`: the split's predictions when already made (no pass then)."""
    y_true, probabilities, logits, kept = passed or evaluate.predict_split(model, ds)
    history_csv = os.path.join(config.model_dir, rundir.HISTORY) if curves else ""
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
    model: keras.Model,
    config: Config,
    dataset: data.DataSet,
    pipelines: dict,
    cached: Cached | None = None,
) -> dict:
    """Keras-style scores plus the per-class report, plots and predictions CSV for val and
    test, into the run dir: one prediction pass per split feeds them all (none for a split
    with `cached` features: the head reads them).

    Validation picked the best checkpoint, so only the test numbers are unbiased.
    """
    if config.task == "multi_label":
        passes = cached.multi_label_passes() if cached else None
        return multilabel_scoring.evaluate_and_report(
            model, config, dataset, pipelines, passes, phase_boundary(config)
        )
    results = {}
    for n, split in enumerate(s for s in pipelines if s != "train"):
        passed = cached.predictions(dataset, split) if cached else None
        # curves.png (from history.csv) once, with the first split's report.
        ds = pipelines[split] if passed is None else None  # built only when it is read
        report = write_split_report(model, ds, dataset, config, split, passed, curves=n == 0)
        results.update(report.pop("scores"))
        results[f"{split}_macro_f1"] = report["macro_f1"]
        results[f"{split}_weighted_f1"] = report["weighted_f1"]
        logging.info("%s report:\n%s", split, evaluate.format_report(report, dataset.class_names))
    return results
