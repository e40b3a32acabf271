"""Per-sample results: predictions_<split>.csv from the same prediction pass as the report."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import tiny
from tf_finetune import data, evaluate, evaluate_run, predictions, scoring, train


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """One tiny run with a test split, stopped early enough to make some mistakes; counts
    the prediction passes (evaluate.predict_split) and Keras evaluations it makes."""
    run_dir = tmp_path_factory.mktemp("predictions_run")
    config = tiny(folder, run_dir, epochs=1, learning_rate=1e-6, test_percent=25)
    calls = {"predict": 0, "evaluate": 0}
    real_predict, real_evaluate = evaluate.predict_split, scoring.evaluate_splits

    def predict(*args, **kwargs):
        calls["predict"] += 1
        return real_predict(*args, **kwargs)

    def keras_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        return real_evaluate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "predict_split", predict)
        patch.setattr(scoring, "evaluate_splits", keras_evaluate)
        metrics = train.train_and_evaluate(config)
    return config, metrics, calls


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _report(run_dir, split):
    with open(os.path.join(run_dir, f"report_{split}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("split", ["val", "test"])
def test_csv_rows_match_the_confusion_matrix(run, split):
    config = run[0]
    report = _report(config.model_dir, split)
    names = report["class_names"]
    rows = _rows(os.path.join(config.model_dir, f"predictions_{split}.csv"))
    assert len(rows) == report["num_examples"]
    matrix = np.zeros((len(names), len(names)), np.int64)
    for row in rows:
        matrix[names.index(row["true_label"]), names.index(row["predicted_label"])] += 1
        probs = np.array([float(row[f"p:{n}"]) for n in names])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert float(row["confidence"]) == pytest.approx(probs.max(), abs=1e-6)
        assert names[int(np.argmax(probs))] == row["predicted_label"]
        assert row["correct"] == str(int(row["true_label"] == row["predicted_label"]))
        # The file column names the photo, under its true class's folder.
        assert os.path.isfile(row["file"])
        assert os.path.basename(os.path.dirname(row["file"])) == row["true_label"]
    assert matrix.tolist() == report["confusion_matrix"]
    assert os.path.join(config.model_dir, f"predictions_{split}.csv") in report["files"]


def test_scores_from_the_one_pass_match_keras_evaluate(run, folder):
    """metrics.json's loss and accuracy come from the report's predictions, no second pass:
    they equal what model.evaluate computes on the same split."""
    config, metrics = run[0], run[1]
    assert metrics["test_accuracy"] == _report(config.model_dir, "test")["accuracy"]
    from tf_finetune import input_pipeline
    from tf_finetune import model as model_lib

    dataset = input_pipeline.load_data(config)
    model = model_lib.restore_trained(config, dataset.num_classes)
    pipelines = input_pipeline.make_pipelines(config, dataset)
    keras_scores = scoring.evaluate_splits(model, {"test": pipelines["test"]})
    assert metrics["test_loss"] == pytest.approx(keras_scores["test_loss"], rel=1e-4)
    assert metrics["test_accuracy"] == pytest.approx(keras_scores["test_accuracy"])


def test_evaluate_command_writes_the_same_rows(run, tmp_path):
    config = run[0]
    path = os.path.join(config.model_dir, "predictions_test.csv")
    before = _rows(path)
    os.remove(path)
    report = evaluate_run.evaluate_run(config, "test")
    assert path in report["files"]
    after = _rows(path)
    assert [r["file"] for r in after] == [r["file"] for r in before]
    assert [r["predicted_label"] for r in after] == [r["predicted_label"] for r in before]


def test_train_predicts_each_split_once(run):
    """One prediction pass per evaluated split (val, test) feeds the report, the plots, the
    CSV and metrics.json's scores; no model.evaluate after fit."""
    assert run[2] == {"predict": 2, "evaluate": 0}


def test_the_run_made_mistakes_to_check(run):
    assert 0 < run[1]["val_accuracy"] < 1 or 0 < run[1]["test_accuracy"] < 1


def test_text_rows_hold_the_text(tmp_path):
    texts = ["a good film", 'bad, "very" bad\nreally', "fine"]
    split = data.Split(
        tf.data.Dataset.from_tensor_slices((texts, tf.constant([1, 0, 1], tf.int32))),
        lambda text: text,
        len(texts),
    )
    examples = predictions.example_column(split)
    assert examples == ("text", texts)
    probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]], np.float32)
    y = np.array([1, 0, 1])
    kept = evaluate.MistakeImages(np.array([2, 1]), np.array(texts[2:0:-1], object))
    evaluate.report_predictions(y, probs, kept, ["neg", "pos"], str(tmp_path), examples=examples)
    rows = _rows(tmp_path / "predictions_val.csv")
    assert [r["text"] for r in rows] == texts
    assert [r["correct"] for r in rows] == ["1", "0", "0"]
    assert rows[1]["predicted_label"] == "pos" and rows[1]["true_label"] == "neg"
    assert list(rows[0])[:5] == ["text", "true_label", "predicted_label", "confidence", "correct"]


def test_encoded_images_are_numbered():
    """TFDS keys are encoded images: the column is the example's position, never the bytes."""
    png = tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8))
    split = data.Split(
        tf.data.Dataset.from_tensor_slices(([png, png], tf.constant([0, 1], tf.int32))),
        lambda key: tf.cast(tf.io.decode_png(key, 3), tf.float32),
        2,
    )
    assert predictions.example_column(split) == ("example", None)


def test_report_page_links_the_csv(run):
    page = open(os.path.join(run[0].model_dir, "report.html"), encoding="utf-8").read()
    assert 'href="predictions_test.csv"' in page and 'href="predictions_val.csv"' in page


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_from_logits_matches_keras_even_when_probabilities_underflow(smoothing):
    """Keras reads a softmax output's logits: a confidently wrong example costs far more than
    -log(1e-7), and a confidently right one exactly 0. The one pass keeps the logits too."""
    import keras

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.layers[-1].set_weights([np.array([[300.0, 0, 0], [0, 300.0, 0]]), np.zeros(3)])
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    model.compile(loss=loss)
    x = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [0.5, 0.5]], np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]  # right, right, wrong by 300, wrong
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    predicted = evaluate.predict_split(model, ds)
    assert predicted.probabilities[2, 1] == 0.0  # underflowed: its log is no use
    keras_loss = model.evaluate(ds, verbose=0)
    ours = scoring.cross_entropy(predicted.y_true, predicted.logits, smoothing)
    assert ours == pytest.approx(keras_loss, rel=1e-5) and ours > 50
