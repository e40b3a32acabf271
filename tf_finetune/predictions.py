"""Per-sample results: `predictions_<split>.csv`, one row per evaluated example.

Columns, in order: what the example is (`file`: its path; `text`: the text itself; or
`example`: its position in the split, for TFDS images), `true_label`, `predicted_label`,
`confidence` (the predicted class's probability), `correct` (1 or 0), then one `p:<class>`
probability column per class in label order. A spreadsheet sorts it as is; `csv.DictReader`
reads it. Label cells hold class names, so a multi-label version can keep the same columns with
several names in a cell (and add its own, e.g. per-label thresholds) without moving these.
"""

import csv
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tf_finetune import atomic

FIXED_COLUMNS = ("true_label", "predicted_label", "confidence", "correct")
PROBABILITY_PREFIX = "p:"


def file_name(run_dir: str, split: str) -> str:
    return os.path.join(run_dir, f"predictions_{split}.csv")


def example_column(split) -> tuple[str, list[str] | None]:
    """What identifies each example of a `data.Split`, in its order: ("file", paths),
    ("text", texts), or ("example", None) when the keys are encoded images (TFDS).

    Only file paths and texts are read (the keys of a folder or a text table); encoded
    images are never iterated.
    """
    first = next(iter(split.source.take(1).as_numpy_iterator()), None)
    if first is None:
        return "example", None
    key = first[0]
    is_file = isinstance(key, bytes) and len(key) < 4096 and os.path.isfile(key)
    if not is_file and split.load(tf.constant(key)).dtype != tf.string:
        return "example", None  # encoded image bytes: no name to show
    keys = split.source.map(lambda k, _: k).as_numpy_iterator()
    return ("file" if is_file else "text"), [_text(k) for k in keys]


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def write_csv(
    path: str,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    examples: tuple[str, list[str] | None] = ("example", None),
) -> str:
    """Writes the per-sample CSV atomically (the previous file stays whole until the rename).

    Args:
      y_true: integer labels [n].
      probabilities: [n, C], rows aligned with `y_true`.
      examples: (column name, one value per row or None for the row's position), as
        `example_column` returns.
    """
    names = [str(c) for c in class_names]
    column, values = examples
    n = len(y_true)
    if values is not None and len(values) != n:
        raise ValueError(f"{len(values)} {column} values for {n} predictions")
    predicted = np.argmax(probabilities, axis=1) if n else np.zeros((0,), np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow([column, *FIXED_COLUMNS, *(PROBABILITY_PREFIX + c for c in names)])
            for i in range(n):
                true, pred = int(y_true[i]), int(predicted[i])
                out.writerow(
                    [
                        values[i] if values is not None else i,
                        names[true],
                        names[pred],
                        f"{probabilities[i, pred]:.6f}",
                        int(true == pred),
                        *(f"{p:.6f}" for p in probabilities[i]),
                    ]
                )

    atomic.write(path, write, what="predictions")
    return path


LABEL_SEPARATOR = "|"


def write_multi_label_csv(
    path: str,
    targets: np.ndarray,
    probabilities: np.ndarray,
    label_names: Sequence[str],
    thresholds: Sequence[float],
    examples: tuple[str, list[str] | None] = ("example", None),
) -> str:
    """The multi-label CSV, same columns: `true_label` and `predicted_label` hold every label
    of the example joined by "|" (empty: none), `predicted_label` the labels at or above their
    thresholds, `confidence` the highest label probability, `correct` 1 when the two label sets
    are equal; then `p:<label>` per label."""
    names = [str(c) for c in label_names]
    column, values = examples
    n = len(targets)
    if values is not None and len(values) != n:
        raise ValueError(f"{len(values)} {column} values for {n} predictions")
    truth = np.asarray(targets) > 0
    chosen = np.asarray(probabilities) >= np.asarray(thresholds)

    def joined(mask) -> str:
        return LABEL_SEPARATOR.join(name for name, on in zip(names, mask) if on)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow([column, *FIXED_COLUMNS, *(PROBABILITY_PREFIX + c for c in names)])
            for i in range(n):
                out.writerow(
                    [
                        values[i] if values is not None else i,
                        joined(truth[i]),
                        joined(chosen[i]),
                        f"{probabilities[i].max():.6f}" if len(names) else "",
                        int(np.array_equal(truth[i], chosen[i])),
                        *(f"{p:.6f}" for p in probabilities[i]),
                    ]
                )

    atomic.write(path, write, what="predictions")
    return path
