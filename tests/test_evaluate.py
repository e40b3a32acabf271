"""Tests of tf_finetune.evaluate: metrics on hand-computed cases, text, plots, end to end."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf
from matplotlib import image as mpimg
from sklearn import metrics as skm

from tf_finetune import evaluate

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["cat", "dog", "bird"]

# 8 examples, 3 classes. Predicted (argmax):  0 0 1 | 1 1 0 | 2 1
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # cat  -> cat
        [0.60, 0.30, 0.10],  # cat  -> cat
        [0.30, 0.60, 0.10],  # cat  -> dog   (true class 2nd)
        [0.15, 0.80, 0.05],  # dog  -> dog
        [0.20, 0.50, 0.30],  # dog  -> dog
        [0.90, 0.02, 0.08],  # dog  -> cat   (true class 3rd; the most confident mistake)
        [0.10, 0.20, 0.70],  # bird -> bird
        [0.05, 0.55, 0.40],  # bird -> dog   (true class 2nd)
    ]
)
# By hand: rows = true, columns = predicted.
HAND_MATRIX = [[2, 1, 0], [1, 2, 0], [0, 1, 1]]
# precision = diag / column sums (3, 4, 1); recall = diag / row sums (3, 3, 2).
HAND_PRECISION = [Fraction(2, 3), Fraction(2, 4), Fraction(1, 1)]
HAND_RECALL = [Fraction(2, 3), Fraction(2, 3), Fraction(1, 2)]
HAND_F1 = [Fraction(2, 3), Fraction(4, 7), Fraction(2, 3)]
HAND_MACRO_F1 = Fraction(40, 63)  # (2/3 + 4/7 + 2/3) / 3
HAND_WEIGHTED_F1 = Fraction(53, 84)  # (3 * 2/3 + 3 * 4/7 + 2 * 2/3) / 8


def assert_png(path, height=None, width=None):
    """A non-empty, decodable PNG (optionally of the given size); returns its pixels."""
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    if height is not None:
        assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # something was drawn
    return pixels


# ----------------------------------------------------------------------------- metrics
def test_report_matches_hand_computed_matrix_and_scores():
    report = evaluate.classification_report(Y_TRUE, PROBS, NAMES, top_k=(1, 2, 5))

    assert report["confusion_matrix"] == HAND_MATRIX
    assert report["num_examples"] == 8
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["top1_accuracy"] == pytest.approx(5 / 8)
    assert report["top2_accuracy"] == pytest.approx(7 / 8)  # only the dog -> cat row misses
    assert "top5_accuracy" not in report  # k >= num_classes is meaningless
    assert list(report["per_class"]) == NAMES
    for i, name in enumerate(NAMES):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(float(HAND_PRECISION[i]))
        assert row["recall"] == pytest.approx(float(HAND_RECALL[i]))
        assert row["f1"] == pytest.approx(float(HAND_F1[i]))
    assert [report["per_class"][n]["support"] for n in NAMES] == [3, 3, 2]
    assert report["macro_f1"] == pytest.approx(float(HAND_MACRO_F1))
    assert report["weighted_f1"] == pytest.approx(float(HAND_WEIGHTED_F1))
    json.dumps(report)  # plain Python types only


def test_one_hot_labels_give_the_same_report():
    one_hot = np.eye(3, dtype=np.float32)[Y_TRUE]
    assert evaluate.classification_report(one_hot, PROBS, NAMES) == evaluate.classification_report(
        Y_TRUE, PROBS, NAMES
    )


def _sklearn_view(y, probs, num_classes, top_k):
    labels = list(range(num_classes))
    pred = probs.argmax(axis=1)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    view = {
        "matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "accuracy": skm.accuracy_score(y, pred),
        "precision": p,
        "recall": r,
        "f1": f,
        "support": s,
        "macro_f1": skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0),
        "weighted_f1": skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0),
    }
    for k in top_k:
        view[f"top{k}"] = skm.top_k_accuracy_score(y, probs, k=k, labels=labels)
    return view


@pytest.mark.parametrize("seed", [0, 1])
def test_report_agrees_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    num_classes, n = 7, 300
    y = rng.integers(0, num_classes - 1, n)  # the last class has no examples
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), y] += 1.0  # better than chance, far from perfect
    logits[:, 2] -= 10.0  # class 2 is never predicted
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"class_{i}" for i in range(num_classes)]

    report = evaluate.classification_report(y, probs, names, top_k=(1, 3, 5))
    expected = _sklearn_view(y, probs, num_classes, (3, 5))

    assert report["confusion_matrix"] == expected["matrix"]
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    assert report["top3_accuracy"] == pytest.approx(expected["top3"])
    assert report["top5_accuracy"] == pytest.approx(expected["top5"])
    for i, name in enumerate(names):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(expected["precision"][i])
        assert row["recall"] == pytest.approx(expected["recall"][i])
        assert row["f1"] == pytest.approx(expected["f1"][i])
        assert row["support"] == expected["support"][i]
    assert report["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert report["weighted_f1"] == pytest.approx(expected["weighted_f1"])


def test_top_k_on_a_hand_made_case():
    # 6 classes; the true class (label) sits at rank 1, 2, 3, 5, 6 in the five rows.
    probs = np.array(
        [
            [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],  # true 0: rank 1
            [0.40, 0.30, 0.10, 0.10, 0.05, 0.05],  # true 1: rank 2
            [0.40, 0.30, 0.20, 0.05, 0.03, 0.02],  # true 2: rank 3
            [0.40, 0.30, 0.15, 0.10, 0.04, 0.01],  # true 4: rank 5
            [0.40, 0.30, 0.15, 0.10, 0.04, 0.01],  # true 5: rank 6
        ]
    )
    y = np.array([0, 1, 2, 4, 5])
    report = evaluate.classification_report(y, probs, list("abcdef"), top_k=(1, 2, 5, 6))
    assert report["accuracy"] == pytest.approx(1 / 5)
    assert report["top1_accuracy"] == pytest.approx(1 / 5)
    assert report["top2_accuracy"] == pytest.approx(2 / 5)
    assert report["top5_accuracy"] == pytest.approx(4 / 5)
    assert "top6_accuracy" not in report


def test_top_k_ties_are_broken_like_the_prediction():
    # Every class equally likely: argmax says class 0, so top-1 must agree with accuracy.
    probs = np.full((3, 4), 0.25)
    y = np.array([0, 1, 3])
    report = evaluate.classification_report(y, probs, list("abcd"), top_k=(1, 2, 3))
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert report["top1_accuracy"] == report["accuracy"]
    assert report["top2_accuracy"] == pytest.approx(2 / 3)  # classes 0 and 1
    assert report["top3_accuracy"] == pytest.approx(2 / 3)  # class 3 is always last


def test_never_predicted_class_has_zero_precision_not_nan():
    # "bird" has two examples but is never predicted; "fish" has none and is never predicted.
    probs = np.array(
        [
            [0.9, 0.05, 0.03, 0.02],
            [0.1, 0.8, 0.05, 0.05],
            [0.6, 0.3, 0.05, 0.05],
            [0.2, 0.7, 0.05, 0.05],
        ]
    )
    y = np.array([0, 1, 2, 2])
    names = ["cat", "dog", "bird", "fish"]
    report = evaluate.classification_report(y, probs, names)

    assert report["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["per_class"]["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # cat: predicted twice, right once; dog: predicted twice, right once.
    assert report["per_class"]["cat"]["precision"] == pytest.approx(0.5)
    assert report["per_class"]["dog"]["recall"] == pytest.approx(1.0)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)
    assert report["weighted_f1"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    assert not any(np.isnan(v) for v in (report["macro_f1"], report["weighted_f1"]))


@pytest.mark.parametrize(
    "y, probs, names, message",
    [
        (np.array([0, 3]), np.eye(3)[:2], NAMES, "outside"),
        (np.array([0, 1, 2]), np.eye(3)[:2], NAMES, "labels but"),
        (np.array([0, 1]), np.eye(3)[:2], ["a", "b"], "columns"),
        (np.array([0]), np.array([[np.nan, 0.5, 0.5]]), NAMES, "NaN"),
        (np.zeros((0,), int), np.zeros((0, 3)), NAMES, "no examples"),
        (np.array([0, 1]), np.eye(3)[:2], ["a", "a", "b"], "unique"),
    ],
)
def test_bad_inputs_are_rejected(y, probs, names, message):
    with pytest.raises(ValueError, match=message):
        evaluate.classification_report(y, probs, names)


# ----------------------------------------------------------------------------- text
def test_format_report_has_every_class_the_accuracy_and_the_matrix():
    report = evaluate.classification_report(Y_TRUE, PROBS, NAMES, top_k=(1, 2))
    text = evaluate.format_report(report, NAMES)
    lines = text.splitlines()

    for name in NAMES:
        assert any(line.startswith(name) for line in lines), name
    accuracy_line = next(line for line in lines if line.startswith("accuracy"))
    assert "0.6250" in accuracy_line and "(5/8 correct)" in accuracy_line
    assert any(line.startswith("top2 accuracy") and "0.8750" in line for line in lines)
    assert any(line.startswith("macro avg") and f"{40 / 63:.4f}" in line for line in lines)
    assert any(line.startswith("weighted avg") and f"{53 / 84:.4f}" in line for line in lines)
    dog_row = next(line for line in lines if line.startswith("dog  ") and "0.5000" in line)
    assert dog_row.split()[1:] == ["0.5000", "0.6667", "0.5714", "3"]
    matrix_start = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix"))
    header, *rows = lines[matrix_start + 1 : matrix_start + 5]
    assert header.split() == NAMES
    assert [row.split()[1:] for row in rows] == [[str(c) for c in r] for r in HAND_MATRIX]


def _matrix_lines(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix"))
    return lines[start + 1 :]


def test_format_report_cuts_long_names_but_keeps_them_distinct_and_aligned():
    names = ["a_really_long_class_name_number_one", "a_really_long_class_name_number_two", "x"]
    report = evaluate.classification_report(Y_TRUE, PROBS, names)
    text = evaluate.format_report(report, names)

    assert names[0] not in text and "~" in text
    assert max(len(line) for line in text.splitlines()) < 100
    rows = [line.split()[0] for line in text.splitlines()[1:4]]
    assert len(set(rows)) == 3 and rows[0].endswith("one") and rows[1].endswith("two")
    header, *matrix_rows = _matrix_lines(text)
    assert header.split() == ["a_re~one", "a_re~two", "x"]  # cut in the middle: ends differ
    assert len({len(line) for line in [header, *matrix_rows]}) == 1  # a rectangular table


def test_format_report_numbers_the_matrix_when_names_collide_or_are_many():
    names = ["same_prefix_A_then_a_shared_ending", "same_prefix_B_then_a_shared_ending", "x"]
    text = evaluate.format_report(evaluate.classification_report(Y_TRUE, PROBS, names), names)
    header, *rows = _matrix_lines(text)
    assert header.split() == ["0", "1", "2"]
    assert [row.split()[0] for row in rows] == ["0", "1", "2"]
    assert [row.split()[-3:] for row in rows] == [[str(c) for c in r] for r in HAND_MATRIX]

    many = [f"flower_{i}" for i in range(12)]
    rng = np.random.default_rng(0)
    report = evaluate.classification_report(rng.integers(0, 12, 50), rng.random((50, 12)), many)
    header, *rows = _matrix_lines(evaluate.format_report(report, many))
    assert header.split() == [str(i) for i in range(12)]
    assert rows[11].split()[:2] == ["11", "flower_11"]
    assert len(header) < 80


# ----------------------------------------------------------------------------- plots
HISTORY_CSV = """epoch,accuracy,learning_rate,loss,val_accuracy,val_loss
0,0.40,0.001,1.50,0.45,1.40
1,0.55,0.001,1.20,0.50,1.30
2,0.60,0.001,1.10,0.52,1.25
1,0.56,0.001,1.19,0.51,1.29
2,0.62,0.001,1.05,0.55,1.20
3,0.70,0.0001,0.90,0.60,1.10
4,0.75,0.0001,0.80,NA,1.00
"""


def test_read_history_keeps_the_last_row_of_a_repeated_epoch(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(HISTORY_CSV)
    history = evaluate.read_history(str(path))
    assert history["epoch"] == [0, 1, 2, 3, 4]
    assert history["accuracy"] == [0.40, 0.56, 0.62, 0.70, 0.75]
    assert history["val_loss"] == [1.40, 1.29, 1.20, 1.10, 1.00]
    assert np.isnan(history["val_accuracy"][-1])  # CSVLogger's "NA"
    assert set(history) == {
        "epoch",
        "accuracy",
        "learning_rate",
        "loss",
        "val_accuracy",
        "val_loss",
    }


def test_plot_curves_writes_a_valid_png(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(HISTORY_CSV)
    plain = tmp_path / "plain.png"
    marked = tmp_path / "marked.png"

    assert evaluate.plot_curves(str(path), str(plain)) == str(plain)
    evaluate.plot_curves(str(path), str(marked), phase_boundary_epoch=3)

    a = assert_png(plain, 420, 1100)  # figsize 11 x 4.2 at 100 dpi
    b = assert_png(marked, 420, 1100)
    assert not np.array_equal(a, b)  # the unfreeze line (and its legend entry) was drawn
    assert not list(tmp_path.glob("*.tmp*"))  # no temporary file left behind


def _dashed_gray_columns(png):
    """x positions of full-height lines of matplotlib's "gray" (the unfreeze marker)."""
    rgb = mpimg.imread(png)[..., :3]
    gray = (np.abs(rgb - 128 / 255).max(axis=2) < 0.06).sum(axis=0)
    return sorted(np.nonzero(gray > 100)[0].tolist())


def test_plot_curves_draws_the_unfreeze_line_at_the_boundary(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(HISTORY_CSV)
    columns = {}
    for boundary in (None, 1, 2):
        out = tmp_path / f"curves_{boundary}.png"
        evaluate.plot_curves(str(path), str(out), phase_boundary_epoch=boundary)
        columns[boundary] = _dashed_gray_columns(out)
    assert columns[None] == []
    left = [min(columns[b]) for b in (1, 2)]
    right = [max(columns[b]) for b in (1, 2)]
    assert right[0] > 550 and left[0] < 550  # one line per panel (the panels split at 550 px)
    step = left[1] - left[0]
    assert 90 < step < 130  # one epoch further right: 4 epochs span ~450 px of a panel
    assert right[1] - right[0] == pytest.approx(step, abs=2)


def test_read_history_skips_a_repeated_header(tmp_path):
    path = tmp_path / "history.csv"
    lines = HISTORY_CSV.splitlines()
    path.write_text("\n".join(lines[:3] + lines[:1] + lines[3:]) + "\n")
    assert evaluate.read_history(str(path))["epoch"] == [0, 1, 2, 3, 4]


def test_plot_curves_rejects_a_file_without_epochs(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("loss,accuracy\n1.0,0.5\n")
    with pytest.raises(ValueError, match="epoch"):
        evaluate.plot_curves(str(path), str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("num_classes", [3, 30])
def test_plot_confusion_matrix_writes_a_valid_png(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    y = rng.integers(0, num_classes, 200)
    probs = rng.random((200, num_classes))
    names = [f"class with a long name {i}" for i in range(num_classes)]
    report = evaluate.classification_report(y, probs, names)
    out = tmp_path / "sub" / "confusion.png"  # the folder is created
    evaluate.plot_confusion_matrix(report, names, str(out))
    pixels = assert_png(out)
    assert pixels.shape[0] >= 500


def test_most_confident_mistakes_order():
    assert evaluate.most_confident_mistakes(Y_TRUE, PROBS).tolist() == [5, 2, 7]
    assert evaluate.most_confident_mistakes(Y_TRUE, PROBS, 2).tolist() == [5, 2]
    assert evaluate.most_confident_mistakes(Y_TRUE[:2], PROBS[:2]).tolist() == []


def test_plot_mistakes_writes_a_grid_and_a_no_mistakes_image(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.float32)
    grid = tmp_path / "mistakes.png"
    evaluate.plot_mistakes(images, Y_TRUE, PROBS, NAMES, str(grid))
    grid_pixels = assert_png(grid)

    none = tmp_path / "none.png"
    perfect = np.eye(3)[Y_TRUE]
    evaluate.plot_mistakes(images, Y_TRUE, perfect, NAMES, str(none))
    none_pixels = assert_png(none)
    assert none_pixels.shape != grid_pixels.shape  # a message, not a grid of images

    one = tmp_path / "one.png"
    evaluate.plot_mistakes(images, Y_TRUE, PROBS, NAMES, str(one), max_images=1)
    assert assert_png(one).shape[1] < grid_pixels.shape[1]  # 1 column instead of 2

    with pytest.raises(ValueError, match="same length"):
        evaluate.plot_mistakes(images[:3], Y_TRUE, PROBS, NAMES, str(tmp_path / "bad.png"))


# ----------------------------------------------------------------------------- model
def color_model(num_classes: int = 3) -> keras.Model:
    """16x16 RGB -> GAP -> Dense softmax; class i scores the mean of channel i (untrained)."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, num_classes), np.float32)
    kernel[np.arange(3), np.arange(3) % num_classes] = 0.05
    model.layers[-1].set_weights([kernel, np.zeros(num_classes, np.float32)])
    return model


def color_dataset(batch_size: int = 3):
    """10 solid-colour images like make_pipeline(training=False) yields: float pixels, one-hot.

    Image i is pure channel `pred[i]` with brightness `bright[i]`, so the model predicts
    `pred[i]`, more confidently the brighter it is; labels are `y[i]`.
    """
    pred = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    y = np.array([0, 1, 2, 1, 1, 0, 0, 2, 2, 2])  # mistakes at 3, 5, 7, 9
    bright = np.array([100, 120, 140, 250, 160, 180, 200, 220, 240, 60], np.float32)
    pixels = np.zeros((10, 16, 16, 3), np.float32)
    pixels[np.arange(10), :, :, pred] = bright[:, None, None]
    labels = np.eye(3, dtype=np.float32)[y]
    ds = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(batch_size)
    return ds, pixels, y, pred


def test_predict_dataset_returns_labels_probabilities_and_the_worst_mistakes():
    model = color_model()
    ds, pixels, y, pred = color_dataset()

    y_true, probs, kept = evaluate.predict_dataset(model, ds, max_images=2)

    assert y_true.tolist() == y.tolist()
    np.testing.assert_allclose(probs, model.predict(pixels, verbose=0), rtol=1e-5)
    assert probs.argmax(axis=1).tolist() == pred.tolist()
    # Mistakes 3 (brightness 250), 5 (180), 7 (220), 9 (60): the two most confident kept,
    # though they come from different batches.
    assert kept.indices.tolist() == [3, 7]
    assert kept.images.dtype == np.uint8 and kept.images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(kept.images, pixels[[3, 7]].astype(np.uint8))

    _, _, everything = evaluate.predict_dataset(model, ds)
    assert everything.indices.tolist() == [3, 7, 5, 9]
    assert evaluate.predict_dataset(model, ds, max_images=0)[2] is None


def test_write_report_end_to_end(tmp_path):
    model = color_model()
    ds, _, y, pred = color_dataset(batch_size=4)
    history = tmp_path / "history.csv"
    history.write_text(HISTORY_CSV)
    run_dir = tmp_path / "run"

    report = evaluate.write_report(
        model, ds, NAMES, str(run_dir), history_csv=str(history), phase_boundary_epoch=2
    )

    expected = {
        "curves.png",
        "confusion_matrix_val.png",
        "mistakes_val.png",
        "predictions_val.csv",
        "report_val.json",
    }
    assert {os.path.basename(f) for f in report["files"]} == expected
    assert report["files"][-1] == str(run_dir / "report_val.json")
    assert set(os.listdir(run_dir)) == expected  # nothing else, no temporary files
    for name in expected - {"report_val.json", "predictions_val.csv"}:
        assert_png(run_dir / name)
    assert report["split"] == "val"
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    with open(run_dir / "report_val.json", encoding="utf-8") as f:
        assert json.load(f) == report

    # A second split with no history: its own files, no curves, the val files untouched.
    test_report = evaluate.write_report(model, ds, NAMES, str(run_dir), split_name="test")
    assert {os.path.basename(f) for f in test_report["files"]} == {
        "confusion_matrix_test.png",
        "mistakes_test.png",
        "predictions_test.csv",
        "report_test.json",
    }
    assert (run_dir / "confusion_matrix_val.png").exists()
    assert evaluate.write_report(
        model, ds, NAMES, str(run_dir), split_name="x", history_csv=str(tmp_path / "missing")
    )["files"][0] != str(run_dir / "curves.png")


def test_predict_dataset_reads_what_make_pipeline_yields():
    from tf_finetune import data

    _, pixels, y, pred = color_dataset()
    images = tf.constant(pixels.astype(np.uint8))
    split = data.Split(
        source=tf.data.Dataset.from_tensor_slices((tf.range(10), tf.constant(y, tf.int32))),
        load=lambda i: tf.gather(images, i),
        count=10,
    )
    pipeline = data.make_pipeline(split, 3, batch_size=4, training=False, seed=0)

    y_true, probs, kept = evaluate.predict_dataset(color_model(), pipeline)

    assert y_true.tolist() == y.tolist()
    assert probs.argmax(axis=1).tolist() == pred.tolist()
    assert kept.indices.tolist() == [3, 7, 5, 9]


def test_predict_dataset_accepts_a_callable_returning_a_dict():
    model = color_model()
    ds, pixels, y, _ = color_dataset()

    def signature(images):  # like a SavedModel signature: a dict of outputs
        return {"probabilities": model(images, training=False), "top_k_indices": None}

    y_true, probs, kept = evaluate.predict_dataset(signature, ds, max_images=1)
    assert y_true.tolist() == y.tolist()
    np.testing.assert_allclose(probs, model.predict(pixels, verbose=0), rtol=1e-5)
    assert kept.indices.tolist() == [3]
