"""`tf-finetune train` with no flags: offline, real digits, pretrained backbone, export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO


@pytest.mark.slow  # pretraining, fine-tuning and a scratch baseline: ~30 s of CPU
def test_offline_default_end_to_end(tmp_path):
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = str(REPO)  # this checkout, not whichever one is installed
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tf_finetune", "train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("Export:") and lines[-3].startswith("Run directory:")
    run = tmp_path / "runs" / "default"
    assert lines[-1] == f"Report:        {os.path.join('runs', 'default', 'report.html')}"
    assert (run / "report.html").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone"] == "digits_cnn"
    assert metrics["class_names"] == ["eight", "five", "nine", "seven", "six"]
    assert metrics["train_images"] == 50  # ten labelled images per class
    # Real results, well above chance (0.2), on both sides of the comparison.
    assert metrics["test_accuracy"] > 0.55, metrics
    assert metrics["scratch_test_accuracy"] > 0.55, metrics
    # Fine-tuned vs from scratch over 3 seeds, both selected on val_loss; the run itself is
    # the fine-tuned side's first seed, and scratch_* are the scratch side's means.
    comparison = metrics["offline_comparison"]
    assert comparison["seeds"] == [42, 43, 44]
    fine, scratch = comparison["fine_tuned"], comparison["scratch"]
    assert fine["test_accuracy"]["runs"][0] == round(metrics["test_accuracy"], 4)
    assert len(fine["test_accuracy"]["runs"]) == len(scratch["test_accuracy"]["runs"]) == 3
    assert metrics["scratch_test_accuracy"] == scratch["test_accuracy"]["mean"]
    assert "± " in proc.stdout and "mean ± sd over seeds 42, 43, 44" in proc.stdout
    assert (run / "export" / "1" / "saved_model.pb").exists()
    # The pretrained source-task weights landed in Keras' cache, like a download.
    assert list((tmp_path / "keras" / "models").glob("tf_finetune_digits_cnn_*.weights.h5"))


def test_scratch_baseline_trains_every_layer_and_batchnorm_in_training_mode():
    import keras

    from tf_finetune import offline_default
    from tf_finetune.config import Config
    from tf_finetune.resolve import resolve

    config = resolve(Config())
    model = offline_default.scratch_model(config, 5)
    norms = [
        lay for lay in model.layers[2].layers if isinstance(lay, keras.layers.BatchNormalization)
    ]
    assert norms and all(lay.trainable for lay in norms)
    # BatchNorm follows the learning phase: a training call moves its moving statistics.
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    before = np.array(norms[0].moving_mean)
    model(pixels, training=True)
    assert not np.allclose(before, np.array(norms[0].moving_mean))
    assert len(model.trainable_weights) == len(model.weights) - 2 * len(norms)


def test_keep_best_restores_the_lowest_val_loss_epoch():
    from tf_finetune import offline_default

    class Fake:
        weights = 0

        def get_weights(self):
            return self.weights

        def set_weights(self, w):
            self.weights = w

    keep, model = offline_default.KeepBest(), Fake()
    keep.set_model(model)
    keep.on_train_begin()
    for epoch, loss in enumerate([1.0, 0.5, 0.7]):
        model.weights = epoch
        keep.on_epoch_end(epoch, {"val_loss": loss})
    keep.on_train_end()
    assert model.weights == 1
