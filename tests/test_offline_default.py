"""`tf-finetune train` with no flags: offline, real digits, pretrained backbone, export."""

import json
import os
import subprocess
import sys

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
    assert lines[-1].startswith("Export:") and lines[-2].startswith("Run directory:")
    run = tmp_path / "runs" / "default"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone"] == "digits_cnn"
    assert metrics["class_names"] == ["eight", "five", "nine", "seven", "six"]
    assert metrics["train_images"] == 50  # ten labelled images per class
    # A real transfer result: well above chance (0.2), and above the same net from scratch.
    assert metrics["test_accuracy"] > 0.55, metrics
    assert metrics["test_accuracy"] > metrics["scratch_test_accuracy"] + 0.05, metrics
    assert (run / "export" / "1" / "saved_model.pb").exists()
    # The pretrained source-task weights landed in Keras' cache, like a download.
    assert list((tmp_path / "keras" / "models").glob("tf_finetune_digits_cnn_*.weights.h5"))
