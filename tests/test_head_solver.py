"""--head_solver=lbfgs: one linear-probe solve in place of a head phase's epochs, leaving the
run's files as a fit on cached features leaves them; the flags it cannot take refused."""

import csv
import dataclasses
import json
import os
import signal

import keras
import numpy as np
import pytest

from tests.images import write_class_folders
from tests.test_faults import _At
from tf_finetune import evaluate_run, faults, feature_fit, features, phases, rundir, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.errors import UserError
from tf_finetune.resolve import resolve


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("photos"), num_classes=3, per_class=16)


def lbfgs(folder, model_dir, **overrides) -> Config:
    values = dict(
        data=str(folder),
        backbone="digits_cnn",
        weights="none",  # random conv features still tell solid colours apart
        image_size=16,
        epochs=4,
        batch_size=8,
        learning_rate=0.01,
        head_solver="lbfgs",
        model_dir=str(model_dir),
    )
    values.update(overrides)
    return resolve(Config(**values))


def _history(run) -> list[dict]:
    with open(os.path.join(run, rundir.HISTORY)) as f:
        return list(csv.DictReader(f))


def _best(run) -> dict:
    return json.loads((run / "checkpoints" / "best.json").read_text())


@pytest.mark.slow
def test_one_solve_replaces_the_head_epochs_and_leaves_the_usual_files(folder, tmp_path, caplog):
    config = lbfgs(folder, tmp_path, label_smoothing=0.1, class_weight="balanced")
    with caplog.at_level("INFO", logger="absl"):
        metrics = train.train_and_evaluate(config)
    assert "--head_solver=lbfgs solves the head once by L-BFGS" in caplog.text
    assert "--epochs, --learning_rate and --batch_size do not apply" in caplog.text
    assert metrics["val_accuracy"] > 0.9, metrics  # scored by the full model on pixels
    solver = metrics["head_solver"]
    assert solver["solver"] == "lbfgs" and solver["l2"] in solver["grid"]
    assert solver["iterations"] > 0 and solver["seconds"] >= 0
    # One history row, one best checkpoint whose best.json holds the compiled val_loss.
    rows = _history(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [0] and metrics["epochs"] == 1
    best = _best(tmp_path)
    assert best["monitor"] == "val_loss" and best["epoch"] == 0
    assert best["best"] == pytest.approx(float(rows[0]["val_loss"]))
    assert metrics["val_loss"] == pytest.approx(best["best"], rel=1e-4, abs=1e-5)
    # The checkpoint is the whole classifier: evaluate (no trainer) scores it the same.
    model = model_lib.restore_trained(config, 3)
    assert np.abs(model.get_layer(features.PREDICTIONS).kernel.numpy()).sum() > 0
    report = evaluate_run.evaluate_run(config, "val")
    assert report["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert metrics["export_path"] and os.path.isdir(metrics["export_path"])


@pytest.mark.slow
def test_two_phases_fine_tune_after_the_solved_head(folder, tmp_path, recwarn):
    config = lbfgs(folder, tmp_path, unfreeze="all", warmup_epochs=2, epochs=4)
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
    # Keras's spurious "ran out of data" warning (keras#23360) on the first epoch of a fit
    # whose input length it has not counted yet: every epoch ran whole, a user must not see it.
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]
    assert seen == [2, 3]  # phase 1 ran no fit epoch; phase 2 is numbered as with fit
    assert [int(r["epoch"]) for r in _history(tmp_path)] == [0, 2, 3]
    assert metrics["epochs"] == 4 and metrics["head_solver"]["solver"] == "lbfgs"
    assert metrics["val_accuracy"] > 0.9, metrics


@pytest.mark.slow
def test_a_kill_in_phase_two_resumes_there_from_the_solved_head(folder, tmp_path):
    config = lbfgs(folder, tmp_path, unfreeze="all", warmup_epochs=2, epochs=4)
    interrupt = _At(2, 0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(faults.Stopped):
        train.train_and_evaluate(config, extra_callbacks=(interrupt,))
    assert phases.load_state(str(tmp_path)).phase == 2
    solved = _best(tmp_path)
    assert solved["epoch"] == 0  # the solve's checkpoint, unless a phase-2 epoch beat it
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
    assert seen == [2, 3] and metrics["epochs"] == 4
    assert [int(r["epoch"]) for r in _history(tmp_path)] == [0, 2, 3]
    assert _best(tmp_path)["best"] <= solved["best"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ema=0.99), "--ema"),
        (dict(average_checkpoints=2), "--average_checkpoints"),
        (dict(mixup=0.2), "--mixup"),
        (dict(cutmix=1.0), "--cutmix"),
        (dict(augment="light"), "--augment=light"),
        (dict(cache="none"), "--cache=none"),
        (dict(unfreeze="all"), "--unfreeze=all trains the backbone in the only phase"),
        (dict(unfreeze="3"), "add --warmup_epochs"),
        (dict(sampling="balanced"), "use --class_weight=balanced with it"),
        (dict(sampling="balanced", class_weight="balanced"), "drop --sampling"),
        (dict(backbone="https://tfhub.dev/google/nnlm-en-dim50/2", unfreeze="all"), "hub module"),
    ],
)
def test_lbfgs_refuses_what_needs_pixels_or_a_training_backbone(
    folder, tmp_path, overrides, message
):
    with pytest.raises(UserError, match="--head_solver=lbfgs") as raised:
        lbfgs(folder, tmp_path, **overrides)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_fit_takes_every_flag_lbfgs_refuses(folder, tmp_path):
    lbfgs(folder, tmp_path, head_solver="fit", ema=0.99, unfreeze="all")  # no refusal


AUTO_FITS = [
    dict(ema=0.99),
    dict(average_checkpoints=2),
    dict(mixup=0.2),
    dict(augment="light"),
    dict(cache="none"),
    dict(sampling="balanced"),
]


FEATURE_DIM = 128  # digits_cnn's pooled features


def _phases(config, mode, count=48):
    return [
        feature_fit.head_solver(config, p, mode, FEATURE_DIM, count) for p in phases.plan(config)
    ]


def test_auto_is_the_default_and_solves_every_head_only_phase_on_cached_features(folder, tmp_path):
    assert Config().head_solver == "auto"
    config = lbfgs(folder, tmp_path, head_solver="auto")
    assert _phases(config, "memory") == ["lbfgs"] and _phases(config, "disk") == ["lbfgs"]
    assert _phases(config, "none") == ["fit"]  # e.g. multi-worker: no feature cache at run time
    # Features beyond the memory cache's budget: a fit streams them, a full-batch solve cannot.
    at_budget = feature_fit.MEMORY_CACHE_BYTES // (FEATURE_DIM * 4)
    assert _phases(config, "disk", at_budget) == ["lbfgs"]
    assert _phases(config, "disk", at_budget + 1) == ["fit"]
    two = lbfgs(folder, tmp_path, head_solver="auto", unfreeze="all", warmup_epochs=2)
    assert _phases(two, "memory") == ["lbfgs", "fit"]  # the fine-tune phase trains the backbone
    assert _phases(lbfgs(folder, tmp_path, head_solver="auto", unfreeze="all"), "none") == ["fit"]
    explicit = lbfgs(folder, tmp_path, head_solver="fit")
    assert _phases(explicit, "memory") == ["fit"]


@pytest.mark.parametrize("overrides", AUTO_FITS, ids=lambda o: next(iter(o)))
def test_auto_falls_back_to_fit_where_lbfgs_is_refused(folder, tmp_path, overrides):
    with pytest.raises(UserError):  # what an explicit --head_solver=lbfgs refuses ...
        lbfgs(folder, tmp_path, **overrides)
    config = dataclasses.replace(
        lbfgs(folder, tmp_path, head_solver="fit", **overrides), head_solver="auto"
    )
    resolve(config)  # ... auto takes, and trains with fit, whatever the cache mode
    assert _phases(config, "memory") == ["fit"]


def test_tune_trials_fit_the_head_under_auto(folder, tmp_path):
    from tf_finetune import tune

    base = lbfgs(folder, tmp_path, head_solver="auto")
    trial = tune.trial_config(base, {"learning_rate": 0.1}, 3, str(tmp_path / "t"))
    assert trial.head_solver == "fit"  # the knobs a trial varies are fit's
    explicit = tune.trial_config(
        dataclasses.replace(base, head_solver="lbfgs"), {}, 3, str(tmp_path / "t")
    )
    assert explicit.head_solver == "lbfgs"


@pytest.mark.slow
def test_the_default_run_solves_its_head_and_says_so(folder, tmp_path, caplog):
    config = lbfgs(folder, tmp_path, head_solver="auto")
    with caplog.at_level("INFO", logger="absl"):
        metrics = train.train_and_evaluate(config)
    assert metrics["head_solver"]["solver"] == "lbfgs" and metrics["epochs"] == 1
    assert "--head_solver=auto solves the head once by L-BFGS" in caplog.text
    with_ema = dataclasses.replace(config, model_dir=str(tmp_path / "ema"), ema=0.99)
    metrics = train.train_and_evaluate(with_ema)
    assert "head_solver" not in metrics and metrics["epochs"] == 4
    assert len(_history(tmp_path / "ema")) == 4


# ----------------------------------------------------------------------------- multi-label


@pytest.fixture(scope="module")
def tags(tmp_path_factory):
    from tests.images import write_tagged_csv

    return write_tagged_csv(tmp_path_factory.mktemp("tags"), count=60)


def multi_label(tags, model_dir, **overrides) -> Config:
    values = dict(task="multi_label", head_solver="auto", unfreeze="0", test_percent=20)
    return lbfgs(tags, model_dir, **{**values, "image_size": 32, **overrides})  # 32: the patches


def test_auto_solves_a_multi_label_head_and_lbfgs_takes_it(tags, tmp_path):
    config = multi_label(tags, tmp_path)
    assert _phases(config, "memory") == ["lbfgs"]
    multi_label(tags, tmp_path, head_solver="lbfgs", class_weight="balanced")  # no refusal


@pytest.mark.parametrize("class_weight", ["none", "balanced"])
def test_the_default_multi_label_run_solves_a_sigmoid_head_and_exports_it(
    tags, tmp_path, caplog, monkeypatch, class_weight
):
    import tensorflow as tf

    from tests import images

    solved = []
    solve = feature_fit._solve
    monkeypatch.setattr(feature_fit, "_solve", lambda *a: solved.append(solve(*a)) or solved[-1])
    config = multi_label(tags, tmp_path, class_weight=class_weight)
    with caplog.at_level("INFO", logger="absl"):
        metrics = train.train_and_evaluate(config)
    assert "--head_solver=auto solves the head once by L-BFGS" in caplog.text
    assert "L-BFGS head: l2=" in caplog.text and "val_map" in caplog.text
    (solution,) = solved
    assert solution.multi_label and metrics["head_solver"]["l2"] == solution.l2
    assert metrics["epochs"] == 1 and metrics["task"] == "multi_label"
    # The logged val_loss is the compiled loss (weighted BCE under balanced) of the solved head:
    # the loss the solver chose l2 on.
    (row,) = _history(tmp_path)
    assert float(row["val_loss"]) == pytest.approx(solution.val_loss, rel=1e-4, abs=1e-5)
    assert float(row["val_accuracy"]) == pytest.approx(solution.val_accuracy, abs=1e-6)
    # The best checkpoint is on the multi-label monitor (val_map), as fit's would be.
    best = _best(tmp_path)
    assert best["monitor"] == "val_map" and best["best"] == pytest.approx(float(row["val_map"]))
    assert metrics["test_map"] > 0.8  # the patches are easy; chance is each tag's frequency
    # The export's probabilities are the solution's sigmoids of the backbone's features.
    model = model_lib.restore_trained(config, 3)
    kernel = model.get_layer(features.PREDICTIONS).kernel.numpy()
    np.testing.assert_array_equal(kernel, solution.kernel)
    extractor, _ = features.split_classifier(model)
    tagged = [images.tagged_image(t, seed=500 + i) for i, t in enumerate([(), (0,), (1, 2)])]
    pixels = np.stack([np.asarray(image, np.float32) for image in tagged])
    want = solution.predict_proba(extractor([pixels], training=False).numpy())
    serve = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"]
    encoded = tf.constant([images.encode(image, "PNG") for image in tagged])
    served = serve(image_bytes=encoded)["probabilities"].numpy()
    np.testing.assert_allclose(served, want, atol=1e-5)
    assert not np.allclose(served.sum(axis=1), 1.0)  # a sigmoid per label, not a softmax
