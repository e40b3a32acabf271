"""--task=multi_label end to end: tagged images -> sigmoid head -> thresholds chosen on val ->
test report -> an export that returns the labels above their thresholds."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import images
from tests.helpers import run_python, tiny, tiny_flags
from tf_finetune import cli, data, export_run, rundir
from tf_finetune import multilabel_metrics as mlm

NAMES = ["blue", "green", "red"]
FLAGS = (
    "--task=multi_label",
    "--image_size=32",
    "--epochs=20",
    "--batch_size=16",
    "--learning_rate=0.003",
    # Seeded, so bit-reproducible: the exported model's labels for fresh images are checked
    # exactly, and unseeded runs left a patch-free image 0.06-0.2 from a threshold.
    "--seed=0",
    "--unfreeze=all",
    "--test_percent=20",
)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return images.write_tagged_csv(tmp_path_factory.mktemp("tagged"), count=120)


@pytest.fixture(scope="module")
def run(tmp_path_factory, table):
    run_dir = tmp_path_factory.mktemp("ml") / "run"
    flags = [f for f in tiny_flags(table, run_dir, *FLAGS) if f != "--image_size=16"]
    assert cli.main(["train", *flags]) == 0
    return run_dir


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_training_learns_the_tags_and_test_is_scored_with_val_thresholds(run):
    metrics = _json(run / rundir.METRICS)
    assert metrics["task"] == "multi_label" and metrics["class_names"] == NAMES
    assert metrics["test_map"] > 0.9  # chance is each tag's frequency, ~0.45
    chosen = _json(run / rundir.THRESHOLDS)
    assert chosen["chosen_on"] == "val" and list(chosen["labels"]) == NAMES
    report = _json(run / "report_test.json")
    assert report["thresholds"] == [chosen["labels"][n] for n in NAMES]
    assert report["map"] == pytest.approx(metrics["test_map"])
    assert metrics["test_accuracy"] == report["subset_accuracy"]
    for name in ("pr_curves_test.png", "label_confusion_test.png", "pr_curves_val.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"


RELOAD = r"""
import json, sys
import numpy as np, tensorflow as tf
blobs = np.load(sys.argv[2], allow_pickle=True)
serve = tf.saved_model.load(sys.argv[1], tags=["serve"]).signatures["serving_default"]
res = serve(image_bytes=tf.constant(list(blobs["encoded"])))
print("RESULT " + json.dumps({
    "probabilities": res["probabilities"].numpy().tolist(),
    "labels": [[n.decode() for n in row] for row in res["labels"].numpy()],
    "count": res["label_count"].numpy().tolist(),
    "above": res["above_threshold"].numpy().tolist(),
}))
"""


@pytest.mark.slow
def test_export_in_a_fresh_process_returns_the_labels_the_keras_model_gives(run, table, tmp_path):
    card = _json(run / "export" / "1" / "model_card.json")
    thresholds = np.array([card["thresholds"][n] for n in NAMES])
    assert card["task"] == "multi_label" and "labels" in card["signatures"]["outputs"]
    tags = [(), (0,), (1, 2), (0, 1, 2)]
    encoded = [
        images.encode(images.tagged_image(t, seed=900 + i), "PNG") for i, t in enumerate(tags)
    ]
    blobs = tmp_path / "blobs.npz"
    np.savez(blobs, encoded=np.array(encoded, dtype=object))
    served = run_python(RELOAD, run / "export" / "1", blobs)

    config = tiny(table, run, task="multi_label", image_size=32, unfreeze="all", test_percent=20)
    model = export_run.load_best_model(config, NAMES)
    pixels = tf.stack([tf.image.decode_png(e, channels=3) for e in encoded])
    keras_probs = model(tf.cast(pixels, tf.float32), training=False).numpy()
    np.testing.assert_allclose(served["probabilities"], keras_probs, atol=1e-5)
    above = keras_probs >= thresholds
    assert served["above"] == above.tolist()
    assert served["count"] == above.sum(axis=1).tolist()
    for row, mask in zip(served["labels"], above):
        assert row == [n for n, on in zip(NAMES, mask) if on] + [""] * (3 - mask.sum())
    # The tags the images were drawn with come back (the patches are easy to learn).
    names = ("red", "green", "blue")
    want = [sorted(names[t] for t in ts) for ts in tags]
    assert [sorted(n for n in row if n) for row in served["labels"]] == want


def test_thresholds_in_the_graph_are_the_card_s_in_label_order():
    card = {"thresholds": {"red": 0.7, "blue": 0.2, "green": 0.5}}
    from tf_finetune import export

    assert export.card_thresholds(card, NAMES) == [0.2, 0.5, 0.7]
    assert export.card_thresholds({}, NAMES) is None
    probs = tf.constant([[0.3, 0.4, 0.9], [0.1, 0.6, 0.2]])
    out = export._outputs(probs, tf.constant(NAMES), 2, [0.2, 0.5, 0.7])
    assert out["labels"].numpy().tolist() == [[b"blue", b"red", b""], [b"green", b"", b""]]
    assert out["label_count"].numpy().tolist() == [2, 1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mixup=0.2"], "--mixup/--cutmix with --task=multi_label is not supported: it "),
        (
            ["--mixup=0.2", "--sampling=balanced"],
            "--sampling=balanced with --task=multi_label is not supported: they ",
        ),
        (["--data="], "--task=multi_label needs --data"),
    ],
)
def test_what_multi_label_does_not_take_is_one_line(table, tmp_path, capsys, flags, message):
    argv = ["train", *tiny_flags(table, tmp_path / "r", "--task=multi_label"), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_metrics_module_and_scoring_agree_on_the_loss():
    from tf_finetune import multilabel_scoring

    y = np.array([[1, 0], [0, 1]], np.float32)
    p = np.array([[0.9, 0.2], [0.3, 0.6]], np.float32)
    keras_bce = float(keras.losses.binary_crossentropy(y, p).numpy().mean())
    assert multilabel_scoring.binary_cross_entropy(y, p) == pytest.approx(keras_bce, rel=1e-5)
    assert mlm.multi_label_report(y, p, ["a", "b"], [0.5, 0.5])["subset_accuracy"] == 1.0


@pytest.fixture(scope="module")
def tagged_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tagged_photos")
    tags = {"none.png": (), "red.png": (0,), "green_blue.png": (1, 2)}
    for i, (name, t) in enumerate(tags.items()):
        (folder / name).write_bytes(images.encode(images.tagged_image(t, seed=700 + i), "PNG"))
    return folder


WANT_TAGS = {"none.png": [], "red.png": ["red"], "green_blue.png": ["blue", "green"]}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "rest", "grpc"])
def test_predict_prints_every_label_above_its_threshold(
    run, tagged_photos, capsys, tf_serving, backend
):
    flag = f"--model={run}"
    if backend != "local":
        flag = tf_serving("tags", run / "export", backend).flag
    code = cli.main(["predict", flag, "--model_name=tags", "--json", str(tagged_photos)])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = {row["file"].split("/")[-1]: row["labels"] for row in json.loads(out)}
    assert got == WANT_TAGS
    cli.main(["predict", flag, "--model_name=tags", str(tagged_photos / "green_blue.png")])
    out, err = capsys.readouterr()
    assert "tags  blue, green" in out
    assert "top_k" not in err  # 3 labels < the default --top_k=5: no note for tags


@pytest.mark.slow
def test_text_multi_label_table_trains_and_exports_labels(tmp_path):
    from tests import hub_fixtures as fx
    from tf_finetune import train
    from tf_finetune.config import Config
    from tf_finetune.resolve import resolve

    module = fx.save_text_module(tmp_path / "module")
    phrases = {
        "cat": ["the cat sat", "cat on the mat", "the mat cat"],
        "dog": ["dog ran fast", "the dog ran", "fast dog"],
    }
    rows = ["text,label"]
    for i in range(60):
        tags = [("cat", "dog")[t] for t in images.tag_sets(60, seed=3)[i] if t < 2]
        words = [phrases[t][i % 3] for t in tags] or ["on the mat"]
        rows.append(" ".join(words) + " the" * (i % 5) + "," + "|".join(tags))
    (tmp_path / "texts.csv").write_text("\n".join(rows) + "\n")
    values = dict(
        data=str(tmp_path / "texts.csv"),
        backbone=str(module),
        task="multi_label",
        unfreeze="all",
        epochs=6,
        batch_size=8,
        learning_rate=0.1,
        dropout=0.0,
        test_percent=20,
        model_dir=str(tmp_path / "run"),
    )
    metrics = train.train_and_evaluate(resolve(Config(**values), frozenset(values)))
    assert metrics["class_names"] == ["cat", "dog"]
    assert metrics["val_map"] > 0.9 and metrics["test_map"] > 0.9
    served = run_python(
        r"""
import json, sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = serve(text=tf.constant(["the cat sat", "the cat sat dog ran fast", "on the mat"]))
print("RESULT " + json.dumps({
    "labels": [[n.decode() for n in row if n] for row in out["labels"].numpy()],
    "probabilities": out["probabilities"].numpy().tolist(),
}))
""",
        metrics["export_path"],
    )
    # "on the mat" has neither word: its labels depend on the thresholds, checked below.
    assert served["labels"][:2] == [["cat"], ["cat", "dog"]]
    card = json.loads((tmp_path / "run" / "export" / "1" / "model_card.json").read_text())
    above = np.array(served["probabilities"]) >= [card["thresholds"][n] for n in ("cat", "dog")]
    assert [[n for n, on in zip(("cat", "dog"), row) if on] for row in above] == served["labels"]


def test_an_empty_text_label_cell_is_no_label_and_labels_are_split(tmp_path):
    from tf_finetune import text_data

    table = tmp_path / "t.csv"
    filler = "".join(f"w{i},x\n" for i in range(30))
    table.write_text("text,label\na b,x|y\nc d,\ne f, y | y\n" + filler)
    dataset = text_data.load_multi_label_table(str(table), "text", "label", "|", 20)
    rows = {
        t.decode(): y.tolist()
        for split in (dataset.train, dataset.val)
        for t, y in split.source.as_numpy_iterator()
    }
    assert dataset.class_names == ("x", "y") and len(rows) == 33
    assert [rows[t] for t in ("a b", "c d", "e f")] == [[1, 1], [0, 0], [0, 1]]


@pytest.mark.slow
def test_the_checkpoint_is_the_epoch_with_the_best_val_map(run):
    import csv

    with open(run / rundir.HISTORY) as f:
        val_map = [float(row["val_map"]) for row in csv.DictReader(f)]
    best = _json(run / "checkpoints" / "best.json")
    assert best["monitor"] == "val_map"
    assert best["epoch"] == int(np.argmax(val_map))  # the first of equal maxima
    assert best["best"] == pytest.approx(max(val_map))


@pytest.mark.slow
def test_tune_ranks_multi_label_trials_by_val_map(table, tmp_path, capsys):
    from tf_finetune import tune

    run = tmp_path / "search"
    flags = [f for f in tiny_flags(table, run, *FLAGS) if f != "--image_size=16"]
    flags = [f for f in flags if not f.startswith("--epochs")] + ["--epochs=3"]
    argv = ["tune", *flags, "--tuner=random", "--max_trials=2", "--tune_learning_rate=1e-3:1e-1"]
    assert cli.main(argv) == 0
    results = json.loads((run / tune.RESULTS).read_text())
    assert results["objective"] == "val_map"
    scores = [r["val_map"] for r in results["trials"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert "val_map" in capsys.readouterr().out
    assert "val_map" in (run / tune.BEST_FLAGFILE).read_text().splitlines()[0]


@pytest.mark.slow
def test_the_predictions_csv_rows_match_the_report(run, table):
    import csv

    report = _json(run / "report_test.json")
    with open(run / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["num_examples"]
    tagged = {line.split(",")[0]: line.split(",")[1] for line in table.read_text().splitlines()[1:]}
    for row in rows:  # the true labels are the table's, in label order
        relative = row["file"].split(str(table.parent) + "/")[1]
        assert row["true_label"] == "|".join(sorted(tagged[relative].split("|"))).strip("|")
    thresholds = report["thresholds"]
    for row in rows:  # (the CSV rounds to 6 decimals: rows that close to a threshold aside)
        p = [float(row[f"p:{n}"]) for n in NAMES]
        if min(abs(a - t) for a, t in zip(p, thresholds)) > 1e-6:
            chosen = [n for n, a, t in zip(NAMES, p, thresholds) if a >= t]
            assert row["predicted_label"] == "|".join(chosen)
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(
        report["subset_accuracy"]
    )


@pytest.mark.slow
def test_evaluate_rescores_test_with_the_thresholds_chosen_in_training(run, capsys):
    before = _json(run / rundir.METRICS)
    chosen = (run / rundir.THRESHOLDS).read_text()
    assert cli.main(["evaluate", f"--model_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "subset accuracy" in out
    report = _json(run / "report_test.json")
    assert report["map"] == pytest.approx(before["test_map"], abs=1e-6)
    assert (run / rundir.THRESHOLDS).read_text() == chosen  # never re-chosen on test


@pytest.mark.slow
def test_the_report_page_shows_each_label_and_the_subset_accuracy(run):
    page = (run / "report.html").read_text()
    for name in NAMES:
        assert f'data-class="{name}"' in page
    report = _json(run / "report_test.json")
    subset = report["subset_accuracy"]
    assert f'id="accuracy-test" data-value="{subset}"' in page
    # A multi-label page: mAP first, each label's AP and threshold, supports summed over the
    # labels (positives, not examples), the label confusion, the headline named exact match.
    assert f'id="map-test" data-value="{report["map"]}"' in page
    assert '<h2 id="classes">Per label: test split</h2>' in page
    assert "<th>AP</th><th>threshold</th>" in page and "<h3>Label confusion (test)</h3>" in page
    for row in report["per_label"].values():
        assert f'data-sort="{row["threshold"]}"' in page
    positives = sum(row["support"] for row in report["per_label"].values())
    assert f"<td>{positives}</td></tr>" in page and positives != report["num_examples"]
    assert "test exact-match accuracy" in page


@pytest.mark.slow
def test_tflite_has_the_threshold_mask_and_predict_reads_its_labels(run, tagged_photos, capsys):
    from tf_finetune.serving import probability_output, tflite_interpreter

    argv = ["export", f"--model_dir={run}", "--format=tflite", "--max_quantization_drop=0.2"]
    assert cli.main(argv) == 0
    assert "val mAP" in capsys.readouterr().out
    path = run / "tflite" / "model_float32.tflite"
    card = _json(run / "tflite" / "model_card.json")
    thresholds = np.array([card["thresholds"][n] for n in NAMES])
    assert card["files"]["model_float32.tflite"]["val_accuracy_is"] == "mAP"
    interpreter = tflite_interpreter(model_path=str(path))
    outputs = interpreter.get_output_details()
    assert sorted(str(o["dtype"].__name__) for o in outputs) == ["bool", "float32"]
    pixels = np.stack(
        [
            np.asarray(images.tagged_image(t, seed=800 + i), np.float32)
            for i, t in enumerate([(), (0, 2)])
        ]
    )
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(pixels.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels)
    interpreter.invoke()
    probs = interpreter.get_tensor(probability_output(interpreter)["index"])
    mask = next(interpreter.get_tensor(o["index"]) for o in outputs if o["dtype"] == np.bool_)
    assert mask.tolist() == (probs >= thresholds).tolist()
    assert cli.main(["predict", f"--model={path}", "--json", str(tagged_photos)]) == 0
    got = {r["file"].split("/")[-1]: r["labels"] for r in json.loads(capsys.readouterr().out)}
    assert got == WANT_TAGS


def test_a_frozen_backbone_trains_the_sigmoid_head_on_cached_features(table, tmp_path, monkeypatch):
    from tf_finetune import evaluate, train

    config = tiny(table, tmp_path / "run", task="multi_label", image_size=32, unfreeze="0")
    # Fit's epochs on the features (the default solves the head: tests/test_head_solver.py).
    config = dataclasses.replace(config, epochs=2, cache="memory", head_solver="fit")
    scores, plot_curves = [], evaluate.plot_curves

    def spy(*args, score="accuracy"):
        scores.append(score)
        return plot_curves(*args, score=score)

    monkeypatch.setattr(evaluate, "plot_curves", spy)
    metrics = train.train_and_evaluate(config)
    # curves.png as a single-label run draws it, with the run's score (mAP) beside the loss.
    assert scores == ["map"] and (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert metrics["timings"]["feature_images_per_second"] > 0  # the cached-feature path ran
    assert metrics["epochs"] == 2 and "head_solver" not in metrics
    assert 0.0 <= metrics["val_map"] <= 1.0 and (tmp_path / "run" / rundir.THRESHOLDS).exists()


def test_balanced_label_weights_and_the_weighted_loss():
    from tf_finetune import data
    from tf_finetune import model as model_lib

    y = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    split = data.Split(tf.data.Dataset.from_tensor_slices((tf.zeros(4), y)), lambda k: k, 4)
    positive, negative = data.balanced_label_weights(split)
    assert positive == pytest.approx([4 / 6, 4 / 2, 4 / 2])
    assert negative == pytest.approx([4 / 2, 4 / 6, 4 / 6])
    p = np.array([[0.9, 0.2, 0.6], [0.7, 0.1, 0.3], [0.8, 0.4, 0.2], [0.1, 0.3, 0.5]], np.float32)
    loss = model_lib.WeightedBinaryCrossentropy(positive, negative)
    want = -(positive * y * np.log(p) + negative * (1 - y) * np.log(1 - p)).mean(axis=1).mean()
    assert float(loss(y, p)) == pytest.approx(want, rel=1e-5)
    plain = model_lib.WeightedBinaryCrossentropy([1.0] * 3, [1.0] * 3)
    assert float(plain(y, p)) == pytest.approx(
        float(keras.losses.BinaryCrossentropy()(y, p)), rel=1e-5
    )
    again = model_lib.WeightedBinaryCrossentropy.from_config(loss.get_config())
    assert float(again(y, p)) == pytest.approx(want, rel=1e-5)


def test_class_weight_balanced_trains_multi_label_with_the_weighted_loss(table, tmp_path):
    from tf_finetune import train

    seen = {}

    class Loss(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["loss"] = type(self.model.loss).__name__

    config = tiny(table, tmp_path / "run", task="multi_label", image_size=32, unfreeze="all")
    config = dataclasses.replace(config, epochs=1, class_weight="balanced")
    metrics = train.train_and_evaluate(config, extra_callbacks=(Loss(),))
    assert seen["loss"] == "WeightedBinaryCrossentropy" and "val_map" in metrics


@pytest.mark.slow
def test_two_phase_under_two_replicas_and_compare_report_val_map(table, tmp_path, capsys):
    flags = [f for f in tiny_flags(table, tmp_path / "cmp", *FLAGS) if f != "--image_size=16"]
    flags = [f for f in flags if not f.startswith(("--epochs", "--unfreeze"))]
    argv = ["compare", *flags, "--epochs=3", "--warmup_epochs=1", "--unfreeze=0,all"]
    argv += ["--cpu_replicas=2", "--strategy=mirrored"]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["variants"]
    assert [r["unfreeze"] for r in rows] == ["0", "all"]
    assert all(0.0 <= r["val_map"] <= 1.0 for r in rows)
    header = capsys.readouterr().out
    assert "val_map" in header
    two_phase = _json(tmp_path / "cmp" / "compare" / "unfreeze_all" / "checkpoints" / "best.json")
    assert two_phase["monitor"] == "val_map"


@pytest.mark.slow
def test_a_killed_multi_label_run_resumes_with_its_best_val_map(table, tmp_path):
    from tests.helpers import Crash, Epochs, history_epochs
    from tf_finetune import train

    config = tiny(table, tmp_path, task="multi_label", image_size=32, unfreeze="all")
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(Crash(),))
    before = _json(tmp_path / "checkpoints" / "best.json")
    assert before["monitor"] == "val_map" and before["epoch"] == 0
    epochs = Epochs()
    metrics = train.train_and_evaluate(config, extra_callbacks=(epochs,))
    assert epochs.seen == [1, 2] and history_epochs(tmp_path) == [0, 1, 2]
    after = _json(tmp_path / "checkpoints" / "best.json")
    assert after["best"] >= before["best"]  # only a better val mAP replaced it
    assert metrics["task"] == "multi_label" and (tmp_path / rundir.THRESHOLDS).exists()


@pytest.mark.slow
def test_a_head_only_multi_label_run_decodes_once_and_scores_from_features(tmp_path, monkeypatch):
    """Tagged sources decode nothing up front in a head-only run (the feature passes name the
    corrupt file), and the reports' scores from features equal `evaluate`'s on pixels."""
    from tf_finetune import evaluate_run, train

    table = images.write_tagged_csv(tmp_path / "t", count=60)
    (tmp_path / "t" / "images" / "img_007.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    config = tiny(
        table, tmp_path / "run", task="multi_label", image_size=32, unfreeze="0", test_percent=20
    )
    config = dataclasses.replace(config, epochs=2)
    with monkeypatch.context() as m:
        m.setattr(data, "find_unreadable", lambda *a: pytest.fail("decoded up front"))
        metrics = train.train_and_evaluate(config)
    assert [os.path.basename(s["file"]) for s in metrics["skipped_files"]] == ["img_007.png"]
    assert metrics["train_images"] + metrics["val_images"] + metrics["test_images"] == 59
    on_pixels = evaluate_run.evaluate_run(config, "test")
    assert on_pixels["map"] == pytest.approx(metrics["test_map"], abs=1e-5)
