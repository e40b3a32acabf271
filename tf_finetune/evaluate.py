"""The evaluation report: how good the model really is, per class, with plots.

Pure numpy metrics (`classification_report`, `format_report`), one pass of a model over a
batched dataset (`predict_dataset`), three matplotlib plots written atomically (`plot_curves`,
`plot_confusion_matrix`, `plot_mistakes`) and `write_report`, which ties them together for one
split of a run directory.

Plots use matplotlib's object API (`Figure`, no pyplot), so nothing needs a display and no
global figure state leaks between calls.
"""

import csv
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tf_finetune import atomic, predictions

DEFAULT_TOP_K = (1, 5)
DEFAULT_KEPT_IMAGES = 256
MISTAKES_SHOWN = 16  # images in mistakes_<split>.png


# ----------------------------------------------------------------------------- metrics
def _as_labels(y_true: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels [n] from integer labels [n] or one-hot / probability rows [n, C]."""
    y = np.asarray(y_true)
    if y.ndim == 2:
        if y.shape[1] != num_classes:
            raise ValueError(f"y_true has {y.shape[1]} columns, expected {num_classes} classes")
        y = np.argmax(y, axis=1)
    if y.ndim != 1:
        raise ValueError(f"y_true must be labels [n] or one-hot [n, C], got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true holds non-integer labels")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y_true has labels outside [0, {num_classes})")
    return y


def _check_probabilities(probabilities: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [n, C], got shape {p.shape}")
    if p.shape[1] != len(class_names):
        raise ValueError(
            f"probabilities have {p.shape[1]} columns but there are {len(class_names)} class names"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinity")
    return p


def _ranking(probabilities: np.ndarray) -> np.ndarray:
    """Class indices per row, most probable first; ties go to the lower index (like argmax)."""
    return np.argsort(-probabilities, axis=1, kind="stable")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C]: rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def classification_report(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    top_k: Sequence[int] = DEFAULT_TOP_K,
) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1, averages and the confusion matrix.

    The prediction is the most probable class (ties: the lower class index, as `np.argmax`).

    Conventions (the same as scikit-learn's `zero_division=0`):
      * a class that is never predicted has precision 0 (not undefined);
      * a class with no examples (support 0) has recall 0;
      * F1 is 0 when precision + recall is 0.
    `macro_f1` averages F1 over all classes, including classes without examples;
    `weighted_f1` weights each class's F1 by its support.

    Top-k: `top{k}_accuracy` for every k in `top_k` with k < num_classes (top-C would always be
    1). The true class must be among the k most probable, ties broken like the prediction, so
    `top1_accuracy == accuracy`.

    Args:
      y_true: integer labels [n], or one-hot labels [n, C].
      probabilities: scores [n, C] (softmax outputs; only their order matters).
      class_names: C names, in label order.
      top_k: the k's to report.

    Returns:
      A JSON-serializable dict: num_examples, num_classes, class_names, accuracy,
      top{k}_accuracy, per_class {name: {precision, recall, f1, support}},
      macro_{precision,recall,f1}, weighted_{precision,recall,f1}, confusion_matrix (list of
      lists, rows = true class, columns = predicted class).

    Raises:
      ValueError: on no examples, mismatched shapes, labels out of range or non-finite scores.
    """
    class_names, y, p = _checked_inputs(y_true, probabilities, class_names)
    n, num_classes = y.shape[0], len(class_names)
    ranking = _ranking(p)
    matrix = confusion_matrix(y, ranking[:, 0], num_classes)
    report = {
        "num_examples": int(n),
        "num_classes": num_classes,
        "class_names": class_names,
        "accuracy": float(np.trace(matrix) / n),
    }
    report.update(_top_k_accuracies(ranking, y, top_k))
    report.update(_class_scores(class_names, *_per_class_scores(matrix)))
    report["confusion_matrix"] = matrix.tolist()
    return report


def _checked_inputs(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names as str, int64 labels [n], float64 probabilities [n, C]), or ValueError."""
    class_names = [str(n) for n in class_names]
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names are not unique: {class_names}")
    p = _check_probabilities(probabilities, class_names)
    y = _as_labels(y_true, len(class_names))
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {p.shape[0]} rows of probabilities")
    if y.shape[0] == 0:
        raise ValueError("no examples to evaluate")
    return class_names, y, p


def _per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, ...]:
    """(precision, recall, f1, support) per class from a confusion matrix; 0 where undefined."""
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = _safe_divide(true_positives, matrix.sum(axis=0))
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return precision, recall, f1, support


def _class_scores(
    class_names: Sequence[str],
    precision: np.ndarray,
    recall: np.ndarray,
    f1: np.ndarray,
    support: np.ndarray,
) -> dict:
    """The report's per_class entry, then macro (plain mean) and weighted (by support) averages."""
    n = support.sum()
    return {
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_precision": float(np.sum(precision * support) / n),
        "weighted_recall": float(np.sum(recall * support) / n),  # equals accuracy
        "weighted_f1": float(np.sum(f1 * support) / n),
    }


def _top_k_accuracies(ranking: np.ndarray, y: np.ndarray, top_k: Sequence[int]) -> dict:
    """{"top{k}_accuracy": ...} for each distinct k in [1, C), k ascending."""
    num_classes = ranking.shape[1]
    # Position of the true class in each row's ranking.
    true_rank = np.argmax(ranking == y[:, None], axis=1)
    return {
        f"top{k}_accuracy": float(np.mean(true_rank < k))
        for k in sorted(set(int(k) for k in top_k))
        if 1 <= k < num_classes
    }


# ----------------------------------------------------------------------------- text
def _truncate(name: str, width: int) -> str:
    """`name` cut to `width` characters, a trailing '~' marking the cut."""
    name = str(name)
    if len(name) <= width:
        return name
    return name[: width - 1] + "~" if width > 1 else name[:width]


def _middle_truncate(name: str, width: int) -> str:
    """`name` cut in the middle to `width` characters ("flower~_12"), keeping its end."""
    name = str(name)
    if len(name) <= width or width < 4:
        return _truncate(name, width)
    head = width // 2
    tail = width - 1 - head
    return name[:head] + "~" + name[len(name) - tail :]


def _short_names(names: Sequence[str], width: int) -> list[str] | None:
    """Names of at most `width` characters that still tell the classes apart, or None.

    Cut at the end, else in the middle (class names often differ only by a suffix).
    """
    for cut in (_truncate, _middle_truncate):
        short = [cut(n, width) for n in names]
        if len(set(short)) == len(short):
            return short
    return None


NAME_WIDTH = 28  # longest class name shown in full in the per-class rows
COLUMN_NAME_WIDTH = 8  # confusion-matrix column headers
MAX_NAMED_COLUMNS = 10  # more classes: the matrix columns are numbered, to keep it narrow


def format_report(report: dict, class_names: Sequence[str]) -> str:
    """The report as a plain-text table for stdout.

    Per-class precision/recall/F1/support rows, then accuracy (with the counts), top-k, macro
    and weighted averages, then the confusion matrix (rows = true, columns = predicted).
    Long names are cut ('~' marks a cut); when cut names would collide, or the matrix has more
    than MAX_NAMED_COLUMNS classes, rows carry the class index and the columns are numbered.

    Args:
      report: what `classification_report` returned.
      class_names: the names, in label order (the keys of `report["per_class"]`).

    Returns:
      The text, without a final newline.
    """
    names = [str(n) for n in class_names]
    top_keys = _top_k_keys(report)
    # Row labels: the names, cut short while that keeps them distinct, else index + name.
    numbered = _numbered_names(names)
    labels = _short_names(names, min(_longest(names), NAME_WIDTH)) or numbered
    summary_labels = ["accuracy", "macro avg", "weighted avg"] + [
        k.replace("_", " ") for k in top_keys
    ]
    width = max(max(len(label) for label in labels), *(len(s) for s in summary_labels))
    return "\n".join(
        _score_lines(report, names, labels, width)
        + _summary_lines(report, len(names), top_keys, width)
        + _matrix_lines(report["confusion_matrix"], names, labels)
    )


def _top_k_keys(report: dict) -> list[str]:
    """The report's "top{k}_accuracy" keys, k ascending (as numbers: top10 after top5)."""
    return sorted(
        (k for k in report if k.startswith("top") and k.endswith("_accuracy")),
        key=lambda k: int(k[3 : -len("_accuracy")]),
    )


def _longest(names: Sequence[str]) -> int:
    return max(len(n) for n in names)


def _index_digits(names: Sequence[str]) -> int:
    """Characters of the largest class index, so numbered labels line up."""
    return len(str(len(names) - 1))


def _numbered_names(names: Sequence[str]) -> list[str]:
    """Labels "<index> <name>" cut to NAME_WIDTH: distinct however the names collide."""
    digits = _index_digits(names)
    return [_truncate(f"{i:>{digits}d} {n}", NAME_WIDTH) for i, n in enumerate(names)]


_BLANK_SCORE = " " * 9  # a missing score keeps its column


def _score(value: float) -> str:
    return f"{value:9.4f}"


def _row(label: str, width: int, *cells: str) -> str:
    return f"{label:<{width}s}  " + " ".join(cells)


def _score_lines(
    report: dict, names: Sequence[str], labels: Sequence[str], width: int
) -> list[str]:
    """The header and one precision/recall/F1/support row per class."""
    lines = [
        _row("class", width, f"{'precision':>9s}", f"{'recall':>9s}", f"{'f1':>9s}", "support")
    ]
    for name, label in zip(names, labels):
        row = report["per_class"][name]
        scores = [_score(row[k]) for k in ("precision", "recall", "f1")]
        lines.append(_row(label, width, *scores, f"{row['support']:7d}"))
    return lines


def _summary_lines(report: dict, num_classes: int, top_keys: list[str], width: int) -> list[str]:
    """Accuracy with the counts behind it, top-k, then the macro and weighted averages."""
    n = report["num_examples"]
    correct = sum(report["confusion_matrix"][i][i] for i in range(num_classes))
    lines = ["", _row("accuracy", width, _score(report["accuracy"]), f" ({correct}/{n} correct)")]
    for key in top_keys:
        lines.append(_row(key.replace("_", " "), width, _score(report[key])))
    for kind in ("macro", "weighted"):
        optional = [f"{kind}_precision", f"{kind}_recall"]  # a report may carry only F1
        cells = [_score(report[k]) if k in report else _BLANK_SCORE for k in optional]
        lines.append(_row(f"{kind} avg", width, *cells, _score(report[f"{kind}_f1"]), f"{n:7d}"))
    return lines


def _matrix_lines(
    matrix: list[list[int]], names: Sequence[str], labels: Sequence[str]
) -> list[str]:
    """The confusion matrix, rows = true class, columns = predicted class.

    Columns are headed by short names, or by class indices when short names would collide or
    there are more than MAX_NAMED_COLUMNS classes (the rows then carry the index too).
    """
    biggest = max((c for row in matrix for c in row), default=0)
    column = max(len(str(biggest)), min(_longest(names), COLUMN_NAME_WIDTH))
    headers = _short_names(names, column) if len(names) <= MAX_NAMED_COLUMNS else None
    row_labels = labels
    if headers is None:
        headers = [str(i) for i in range(len(names))]
        column = max(len(str(biggest)), _index_digits(names))
        row_labels = _numbered_names(names)
    row_width = max(len(label) for label in row_labels)
    lines = ["", "confusion matrix (rows: true class, columns: predicted class)"]
    lines.append(f"{'':<{row_width}s}  " + " ".join(f"{h:>{column}s}" for h in headers))
    for label, row in zip(row_labels, matrix):
        lines.append(f"{label:<{row_width}s}  " + " ".join(f"{c:>{column}d}" for c in row))
    return lines


# ----------------------------------------------------------------------------- predictions
class MistakeImages:
    """The most confidently misclassified images kept by `predict_dataset`.

    `images` is uint8 [m, h, w, c]; `indices` [m] are their positions in the returned
    `y_true` / `probabilities`, most confident mistake first.
    """

    def __init__(self, indices: np.ndarray, images: np.ndarray):
        self.indices = indices
        self.images = images

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def _is_text(inputs: np.ndarray) -> bool:
    return inputs.dtype.kind in ("O", "S", "U")


def keep_inputs(inputs) -> np.ndarray:
    """What is kept of misclassified inputs: uint8 pixels, or the texts (bytes) as they are."""
    inputs = np.asarray(inputs)
    return inputs.astype(object) if _is_text(inputs) else _to_uint8(inputs)


_FORWARD: dict = {}  # the compiled forward pass of the last model seen
_EPSILON = 1e-7  # keras.config.epsilon(): Keras clips probabilities it takes logs of


def _with_logits(probabilities: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(probabilities, the logits Keras' cross-entropy reads for them): the softmax's input, as
    Keras finds it (`_keras_logits`, or the Softmax op's input), else the clipped log."""
    logits = getattr(probabilities, "_keras_logits", None)
    op = getattr(probabilities, "op", None)
    if logits is None and op is not None and op.type == "Softmax" and len(op.inputs) == 1:
        logits = op.inputs[0]
    if logits is None:
        logits = tf.math.log(tf.clip_by_value(probabilities, _EPSILON, 1.0 - _EPSILON))
    return probabilities, tf.cast(logits, tf.float32)


def _probabilities(model, pixels) -> tuple[np.ndarray, np.ndarray]:
    """One batch of (probabilities, logits) from a Keras model, or any callable (e.g. a
    SavedModel signature wrapped in a lambda) returning probabilities or a dict holding them
    (its logits are then the clipped log of the probabilities)."""
    if isinstance(model, keras.Model):
        # Not predict_on_batch: under MirroredStrategy (Keras 3.15) it returns each replica's
        # rows twice. A plain compiled forward pass runs on one device and is exact.
        forward = _FORWARD.get(id(model))
        if forward is None:
            forward = tf.function(
                lambda x: _with_logits(model(x, training=False)), reduce_retracing=True
            )
            _FORWARD.clear()
            _FORWARD[id(model)] = forward
        pixels = tf.convert_to_tensor(pixels)
        if pixels.dtype != tf.string:  # text models take strings as they are
            pixels = tf.cast(pixels, tf.float32)
        out, logits = forward(pixels)
    else:
        out = model(pixels)
        if isinstance(out, dict):
            out = out["probabilities"]
        out, logits = _with_logits(tf.convert_to_tensor(out, tf.float32))
    return np.asarray(out, dtype=np.float32), np.asarray(logits, dtype=np.float32)


class Predictions(NamedTuple):
    """One pass of a model over a split: int64 labels [n], float32 probabilities and logits
    [n, C] (rows in the split's order), and the worst mistakes' inputs (None if not kept)."""

    y_true: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    kept: "MistakeImages | None"


batch_probabilities = _probabilities  # one batch (probabilities, logits): multi-label scoring


def predict_dataset(
    model, dataset, max_images: int = DEFAULT_KEPT_IMAGES
) -> tuple[np.ndarray, np.ndarray, MistakeImages | None]:
    """`predict_split` as (y_true, probabilities, kept)."""
    y_true, probabilities, _, kept = predict_split(model, dataset, max_images)
    return y_true, probabilities, kept


def predict_split(model, dataset, max_images: int = DEFAULT_KEPT_IMAGES) -> Predictions:
    """Runs `model` over a batched dataset once; keeps the worst mistakes' pixels.

    Args:
      model: a Keras model mapping float32 pixels [b, h, w, 3] (0-255) to probabilities [b, C]
        (run as one compiled forward pass per batch), or any callable doing so; a dict result
        is read at "probabilities", so
        `lambda x: loaded.signatures["predict_images"](images=x)` evaluates an exported
        SavedModel.
      dataset: batched `(pixels, labels)` (extra elements, e.g. sample weights, are ignored),
        labels one-hot [b, C] or integer [b] -- what `data.make_pipeline(training=False)` yields.
      max_images: misclassified images to keep (those with the highest predicted-class
        probability, as uint8); memory stays bounded by max_images + one batch. 0 keeps none.

    Returns:
      Predictions; `kept` is None when max_images is 0, empty when nothing was misclassified.
    """
    labels, probs, logits = [], [], []
    worst = _WorstMistakes(max_images)
    offset = 0  # position of the batch's first example in the returned arrays
    for element in dataset:
        x = element[0]
        batch_probs, batch_logits = _probabilities(model, x)
        batch_labels = _batch_labels(element[1], batch_probs)
        labels.append(batch_labels)
        probs.append(batch_probs)
        logits.append(batch_logits)
        if max_images > 0:
            worst.add(x, batch_labels, batch_probs, offset)
        offset += batch_labels.shape[0]

    if probs:
        arrays = np.concatenate(labels), np.concatenate(probs), np.concatenate(logits)
    else:
        arrays = np.zeros((0,), np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0))
    return Predictions(*arrays, worst.result() if max_images > 0 else None)


def _batch_labels(y, batch_probs: np.ndarray) -> np.ndarray:
    """A batch's labels (one-hot or integer) as int64 [b], checked against the model's output."""
    y = np.asarray(y)
    if batch_probs.ndim != 2 or batch_probs.shape[0] != y.shape[0]:
        raise ValueError(
            f"model output shape {batch_probs.shape} does not match a batch of {y.shape[0]}"
        )
    return (np.argmax(y, axis=1) if y.ndim == 2 else y).astype(np.int64)


class _WorstMistakes:
    """The `limit` most confident mistakes seen so far, batch by batch.

    Memory stays bounded by `limit` + one batch: after each batch only the `limit` most
    confident mistakes are kept (ties: dataset order), so the dataset never has to fit.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.inputs = self.indices = self.confidence = None
        self.text = False  # whether the last batch held texts (for the empty result's dtype)

    def add(self, x, labels: np.ndarray, probabilities: np.ndarray, offset: int) -> None:
        """Considers one batch; `offset` is the position of its first example."""
        self.text = _is_text(np.asarray(x))
        wrong, confidence = _mistakes(labels, probabilities)
        full = self.confidence is not None and len(self.confidence) >= self.limit
        if not wrong.size or (full and confidence.max() < self.confidence.min()):
            return  # nothing in this batch beats the mistakes kept (skips copying its inputs)
        inputs = keep_inputs(np.asarray(x)[wrong])
        if self.inputs is None:
            self.inputs, self.indices, self.confidence = inputs, wrong + offset, confidence
        else:
            self.inputs = np.concatenate([self.inputs, inputs])
            self.indices = np.concatenate([self.indices, wrong + offset])
            self.confidence = np.concatenate([self.confidence, confidence])
        order = _most_confident_first(self.indices, self.confidence)[: self.limit]
        self.inputs = self.inputs[order]
        self.indices = self.indices[order]
        self.confidence = self.confidence[order]

    def result(self) -> MistakeImages:
        if self.inputs is None:
            empty = np.zeros((0,), object if self.text else np.uint8)
            return MistakeImages(np.zeros((0,), np.int64), empty)
        return MistakeImages(self.indices, self.inputs)


# ----------------------------------------------------------------------------- plots
def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # Keras writes "NA" for a metric missing from an epoch's logs


def read_history(history_csv_path: str) -> dict[str, list[float]]:
    """A `keras.callbacks.CSVLogger` file as columns, one value per epoch, epochs ascending.

    When an epoch appears more than once (a resumed run appends its rows again), its last row
    wins. Repeated header lines are skipped; missing or unreadable values become NaN.
    """
    rows: dict[int, dict] = {}
    with open(history_csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "epoch" not in reader.fieldnames:
            raise ValueError(f"{history_csv_path} has no 'epoch' column (not a CSVLogger file?)")
        for row in reader:
            epoch = _float(row.get("epoch"))
            if math.isnan(epoch):
                continue  # a header written again, or a broken line
            rows[int(epoch)] = row
    columns = [c for c in reader.fieldnames if c != "epoch"]
    epochs = sorted(rows)
    history = {"epoch": [float(e) for e in epochs]}
    for column in columns:
        history[column] = [_float(rows[e].get(column)) for e in epochs]
    return history


def plot_curves(
    history_csv_path: str,
    out_png: str,
    phase_boundary_epoch: int | None = None,
    score: str = "accuracy",
) -> str:
    """Loss and `score` per epoch, train and validation, from a CSVLogger file.

    The x axis counts completed epochs (CSV epoch 0 is plotted at 1).

    Args:
      history_csv_path: the CSV `keras.callbacks.CSVLogger` wrote.
      out_png: where to write the PNG.
      phase_boundary_epoch: the first epoch (0-based, as in the CSV and Keras' `initial_epoch`)
        of the fine-tuning phase; a dashed line labelled "unfreeze" is drawn just before it.
      score: the history's column for the second panel, a score in [0, 1] (multi-label: map).

    Returns:
      out_png.
    """
    from matplotlib.figure import Figure

    history = read_history(history_csv_path)
    x = [e + 1 for e in history["epoch"]]
    fig = Figure(figsize=(11, 4.2))
    panels = fig.subplots(1, 2)
    for ax, metric in zip(panels, ("loss", score)):
        plotted = False
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "val", "-s")):
            if key in history and not all(math.isnan(v) for v in history[key]):
                ax.plot(x, history[key], style, markersize=3, label=label)
                plotted = True
        if not plotted:
            ax.text(
                0.5,
                0.5,
                f"no {metric} in the history",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if phase_boundary_epoch is not None:
            ax.axvline(phase_boundary_epoch + 0.5, color="gray", linestyle="--", label="unfreeze")
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if metric == score and plotted:
            ax.set_ylim(0, 1.02)
        if x:
            ax.xaxis.get_major_locator().set_params(integer=True)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend()
    fig.tight_layout()
    return atomic.save_figure(fig, out_png)


def plot_confusion_matrix(report: dict, class_names: Sequence[str], out_png: str) -> str:
    """The confusion matrix, each row normalized by its class's support, counts annotated.

    Colours show the row fraction (recall on the diagonal); the numbers are raw counts. Sized
    and rotated to stay readable up to about 30 classes; past 40 the counts are left out.
    """
    from matplotlib.figure import Figure

    names = _short_names(class_names, 20) or [
        f"{i}: {_middle_truncate(n, 16)}" for i, n in enumerate(class_names)
    ]
    counts = np.asarray(report["confusion_matrix"], dtype=np.int64)
    num_classes = counts.shape[0]
    support = counts.sum(axis=1, keepdims=True)
    normalized = _safe_divide(counts, np.broadcast_to(support, counts.shape))

    side = min(max(5.0, 0.4 * num_classes + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    label_size = 10 if num_classes <= 10 else 8 if num_classes <= 20 else 7
    ax.set_xticks(range(num_classes))
    ax.set_yticks(range(num_classes))
    ax.set_xticklabels(
        names,
        rotation=45 if num_classes <= 10 else 90,
        ha="right" if num_classes <= 10 else "center",
        fontsize=label_size,
    )
    ax.set_yticklabels(names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = report.get("accuracy")
    title = "Confusion matrix"
    if accuracy is not None:
        title += (
            f" (accuracy {accuracy:.3f}, {report.get('num_examples', int(counts.sum()))} images)"
        )
    ax.set_title(title)
    if num_classes <= 40:
        count_size = 9 if num_classes <= 10 else 7 if num_classes <= 20 else 6
        for i in range(num_classes):
            for j in range(num_classes):
                if counts[i, j] == 0 and num_classes > 15:
                    continue  # many classes: leave zeros blank to keep the grid readable
                color = "white" if normalized[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=count_size,
                )
    fig.tight_layout()
    return atomic.save_figure(fig, out_png)


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An image matplotlib shows faithfully: uint8 as is, 0-255 floats scaled to [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        image = np.clip(image / 255.0 if image.max(initial=0) > 1.0 else image, 0.0, 1.0)
    return image, ("gray" if image.ndim == 2 else None)


def most_confident_mistakes(
    y_true: np.ndarray, probabilities: np.ndarray, limit: int | None = None
) -> np.ndarray:
    """Indices of the misclassified examples, highest predicted-class probability first.

    Equal confidences keep their order in the data. At most `limit` indices (None: all).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape[0] == 0:
        return np.zeros((0,), np.int64)
    wrong, confidence = _mistakes(np.asarray(y_true), probs)
    return wrong[_most_confident_first(wrong, confidence)][:limit]


def _mistakes(y: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the misclassified rows, their predicted-class probability)."""
    predicted = _ranking(probabilities)[:, 0]
    wrong = np.nonzero(predicted != y)[0]
    return wrong, probabilities[wrong, predicted[wrong]]


def _most_confident_first(indices: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """The order putting the highest confidence first; equal ones by index (dataset order)."""
    return np.lexsort((indices, -confidence))


def plot_mistakes(
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    out_png: str,
    max_images: int = MISTAKES_SHOWN,
    total_mistakes: int | None = None,
) -> str:
    """A grid of the most confidently misclassified images, titled "true: X / pred: Y (0.93)".

    `images`, `y_true` and `probabilities` are aligned (same first dimension); only the
    misclassified ones are shown, highest predicted-class probability first. Without any
    mistake, the PNG says so.

    Args:
      total_mistakes: the number of mistakes in the whole split, for the title, when the arrays
        hold only a subset (as `predict_dataset` keeps). Default: the mistakes in the arrays.
    """
    names = [str(n) for n in class_names]
    probs = np.asarray(probabilities, dtype=np.float64)
    y = _as_labels(y_true, len(names))
    n = y.shape[0]
    if probs.shape[0] != n or len(images) != n:
        raise ValueError("images, y_true and probabilities must have the same length")
    predicted = _ranking(probs)[:, 0] if n else np.zeros((0,), np.int64)
    order = most_confident_mistakes(y, probs, max_images)
    total = int(np.sum(predicted != y)) if total_mistakes is None else total_mistakes
    if len(order) == 0:
        message = "No misclassified images" if total == 0 else "No misclassified images kept"
        return atomic.save_figure(_message_figure(f"{message}\n({n} examples)"), out_png)

    titles = [
        f"true: {_truncate(names[y[i]], 14)}\npred: {_truncate(names[predicted[i]], 14)} "
        f"({probs[i, predicted[i]]:.2f})"
        for i in order
    ]
    fig = _image_grid([images[i] for i in order], titles)
    fig.suptitle(f"Most confident mistakes: {len(order)} shown of {total}")
    return atomic.save_figure(fig, out_png)


def _message_figure(message: str):
    """A small figure holding only `message`, centred (a plot with nothing to show)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.5))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    return fig


def _image_grid(images: Sequence[np.ndarray], titles: Sequence[str], top: float = 0.5):
    """A near-square grid of `images`, each with its title above it; spare cells stay blank.
    `top`: inches left free above the grid (for a suptitle).

    One axes showing one mosaic, the titles as text: an axes per image (with its tick
    machinery) plus tight_layout took ~0.6 s of a 16-image grid's ~1 s on 2 cores.
    """
    from matplotlib.figure import Figure

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    shown = [_display_rgb(image) for image in images]
    height = max(im.shape[0] for im in shown)
    width = max(im.shape[1] for im in shown)
    band = max(1, round(height * 0.3))  # above each image: its two-line title
    gap = max(1, round(width * 0.08))
    mosaic = np.ones((rows * (band + height), cols * (width + gap) - gap, 3), np.float32)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + top))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98 - top / (2.9 * rows + top)))
    ax.axis("off")
    for n, (image, title) in enumerate(zip(shown, titles)):
        row, col = divmod(n, cols)
        y = row * (band + height) + band + (height - image.shape[0]) // 2
        x = col * (width + gap) + (width - image.shape[1]) // 2
        mosaic[y : y + image.shape[0], x : x + image.shape[1]] = image
        ax.text(
            col * (width + gap) + width / 2,
            row * (band + height) + band * 0.95,
            title,
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.imshow(mosaic, interpolation="nearest")
    return fig


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """`_display_image`'s pixels as float32 RGB in [0, 1] (grey repeated), for a mosaic."""
    pixels, _ = _display_image(image)
    pixels = pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 1.0)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return pixels[..., :3]


def write_text_mistakes(
    texts: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    out_txt: str,
    max_texts: int = DEFAULT_KEPT_IMAGES,
    total_mistakes: int | None = None,
) -> str:
    """The most confidently misclassified texts, one per line: true, predicted, score, text.

    The text counterpart of `plot_mistakes` (same arguments); `out_txt` may end in .png (the
    name `write_report` uses for the image grid), it is written with a .txt extension.
    """
    out_txt = os.path.splitext(out_txt)[0] + ".txt"
    y = np.asarray(y_true)
    probs = np.asarray(probabilities)
    order = most_confident_mistakes(y, probs, max_texts)
    total = len(most_confident_mistakes(y, probs)) if total_mistakes is None else total_mistakes
    lines = [
        f"# Most confident mistakes: {len(order)} shown of {total}",
        "true\tpredicted\tscore\ttext",
    ]
    for i in order:
        predicted = int(np.argmax(probs[i]))
        text = texts[i].decode("utf-8", "replace") if isinstance(texts[i], bytes) else str(texts[i])
        text = " ".join(text.split())  # one line per example
        lines.append(
            f"{class_names[int(y[i])]}\t{class_names[predicted]}\t{probs[i, predicted]:.3f}\t{text}"
        )
    atomic.write_text(out_txt, "\n".join(lines) + "\n")
    return out_txt


# ----------------------------------------------------------------------------- report
def write_report(
    model, dataset, class_names: Sequence[str], run_dir: str, split_name: str = "val", **options
) -> dict:
    """Evaluates `model` on one split (one pass, `predict_dataset`) and writes the report,
    the plots and the per-sample CSV into `run_dir`; `options` are `report_predictions`'s
    (history_csv, phase_boundary_epoch, examples)."""
    y_true, probabilities, kept = predict_dataset(model, dataset)
    return report_predictions(
        y_true, probabilities, kept, class_names, run_dir, split_name, **options
    )


def report_predictions(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    kept: MistakeImages,
    class_names: Sequence[str],
    run_dir: str,
    split_name: str = "val",
    *,
    history_csv: str | None = None,
    phase_boundary_epoch: int | None = None,
    examples: tuple[str, list[str] | None] = ("example", None),
) -> dict:
    """The report, plots and per-sample CSV of one split, all from one set of predictions.

    Writes `curves.png` (only when `history_csv` exists), `confusion_matrix_<split>.png`,
    `mistakes_<split>.png` (texts: .txt), `predictions_<split>.csv` (predictions.py), and last
    `report_<split>.json` (so the JSON's presence means the rest is complete). Per-split
    names keep a val and a test report from overwriting each other.

    Args:
      y_true, probabilities, kept: what `predict_dataset` returned.
      examples: the CSV's first column (predictions.example_column).

    Returns:
      The `classification_report` dict plus `split` and `files` (the paths written, the JSON
      last); the JSON file holds the same dict.
    """
    if y_true.shape[0] == 0:
        raise ValueError(f"the {split_name} split has no examples to evaluate")
    os.makedirs(run_dir, exist_ok=True)
    report = classification_report(y_true, probabilities, class_names)
    report["split"] = split_name
    files = []
    if history_csv and os.path.exists(history_csv):
        files.append(
            plot_curves(history_csv, os.path.join(run_dir, "curves.png"), phase_boundary_epoch)
        )
    files.append(
        plot_confusion_matrix(
            report, class_names, os.path.join(run_dir, f"confusion_matrix_{split_name}.png")
        )
    )
    total_mistakes = report["num_examples"] - int(np.trace(np.asarray(report["confusion_matrix"])))
    plot = write_text_mistakes if _is_text(np.asarray(kept.images)) else plot_mistakes
    files.append(
        plot(
            kept.images,
            y_true[kept.indices],
            probabilities[kept.indices],
            class_names,
            os.path.join(run_dir, f"mistakes_{split_name}.png"),
            total_mistakes=total_mistakes,
        )
    )
    csv_path = predictions.file_name(run_dir, split_name)
    files.append(predictions.write_csv(csv_path, y_true, probabilities, class_names, examples))
    report_path = os.path.join(run_dir, f"report_{split_name}.json")
    files.append(report_path)
    report["files"] = files
    atomic.write_json(report_path, report)
    return report
