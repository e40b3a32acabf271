"""--head_solver=lbfgs: one linear-probe solve in place of a head phase's epochs, leaving the
run's files as a fit on cached features leaves them; the flags it cannot take refused."""

import csv
import json
import os
import signal

import keras
import numpy as np
import pytest

from tests.images import write_class_folders
from tests.test_faults import _At
from tf_finetune import evaluate_run, faults, features, phases, rundir, train
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
def test_one_solve_replaces_the_head_epochs_and_leaves_the_usual_files(folder, tmp_path):
    config = lbfgs(folder, tmp_path, label_smoothing=0.1, class_weight="balanced")
    metrics = train.train_and_evaluate(config)
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
def test_two_phases_fine_tune_after_the_solved_head(folder, tmp_path):
    config = lbfgs(folder, tmp_path, unfreeze="all", warmup_epochs=2, epochs=4)
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
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
        (dict(backbone="https://tfhub.dev/google/nnlm-en-dim50/2", unfreeze="all"), "hub module"),
    ],
)
def test_lbfgs_refuses_what_needs_pixels_or_a_training_backbone(
    folder, tmp_path, overrides, message
):
    with pytest.raises(UserError, match="--head_solver=lbfgs") as raised:
        lbfgs(folder, tmp_path, **overrides)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_fit_stays_the_default_and_takes_every_flag(folder, tmp_path):
    assert Config().head_solver == "fit"
    lbfgs(folder, tmp_path, head_solver="fit", ema=0.99, unfreeze="all")  # no refusal
