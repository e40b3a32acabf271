"""--max_quantization_drop: a TFLite file that loses too much accuracy is refused, unwritten."""

import json
import types

import numpy as np
import pytest

from tests.helpers import tiny
from tf_finetune import cli, evaluate, export_run, input_pipeline, rundir, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.errors import QuantizationDropTooLarge


def _config(tmp_path, **overrides):
    return Config(model_dir=str(tmp_path / "run"), format="tflite", **overrides)


def _metrics(tmp_path, **metrics):
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / rundir.METRICS).write_text(json.dumps(metrics))


ROWS = [("float32", 100, 0.90), ("int8", 40, 0.86)]  # val accuracies, as _export_tflite measures


def test_off_by_default(tmp_path):
    dataset = types.SimpleNamespace(test=None, val=None)
    assert export_run.quantization_gate(_config(tmp_path), b"", ROWS, dataset, b"") is None


def test_val_gate_reuses_the_measured_accuracies(tmp_path):
    _metrics(tmp_path, val_accuracy=0.9)
    dataset = types.SimpleNamespace(test=None, val=None)
    config = _config(tmp_path, max_quantization_drop="0.05")
    gate = export_run.quantization_gate(config, b"", ROWS, dataset, b"")
    assert gate["split"] == "val" and gate["accuracy"] == 0.86 and gate["float_accuracy"] == 0.9
    with pytest.raises(
        QuantizationDropTooLarge, match=r"val accuracy of the int8 .* 0\.0400 below"
    ):
        export_run.quantization_gate(
            _config(tmp_path, max_quantization_drop="0.01"), b"", ROWS, dataset, b""
        )


def test_test_split_is_measured_and_compared_with_keras(tmp_path, monkeypatch):
    """With a test split the gate reads test accuracies: the Keras one from metrics.json, the
    TFLite file's measured on test (not the val rows)."""
    _metrics(tmp_path, val_accuracy=0.9, test_accuracy=0.8)
    measured = {b"quantized": 0.79, b"float": 0.5}
    monkeypatch.setattr(export_run, "tflite_accuracy", lambda content, split: measured[content])
    dataset = types.SimpleNamespace(test="test split", val=None)
    config = _config(tmp_path, max_quantization_drop="0.01")
    gate = export_run.quantization_gate(config, b"quantized", ROWS, dataset, b"float")
    assert (gate["split"], gate["accuracy"], gate["float_accuracy"]) == ("test", 0.79, 0.8)
    assert gate["float_accuracy_from"] == "keras"
    # Without the run's Keras accuracy, the float model through TFLite is the reference.
    _metrics(tmp_path)
    gate = export_run.quantization_gate(config, b"quantized", ROWS, dataset, b"float")
    assert gate["float_accuracy"] == 0.5 and gate["float_accuracy_from"] == "float32 tflite"


@pytest.mark.parametrize("value", ["-0.1", "2", "one"])
def test_bad_values_are_one_line(capsys, folder, tmp_path, value):
    argv = ["export", f"--model_dir={tmp_path}", "--format=tflite"]
    code = cli.main([*argv, f"--data={folder}", f"--max_quantization_drop={value}"])
    err = capsys.readouterr().err
    assert code == 2 and "--max_quantization_drop" in err and len(err.strip().splitlines()) == 1


def _break_int8_quantization(config, dataset) -> None:
    """Makes int8 weights lose the head, deterministically, while floats keep the model.

    One channel of the last conv block is switched off for every image (BatchNorm gamma 0,
    beta -1, then ReLU: exactly 0), and its row of the `predictions` kernel set to 1000: the
    float model multiplies it by 0, but int8 weights scaled to that outlier round every other
    head weight to 0, so the quantized model predicts one class whatever the image.
    """
    model = model_lib.restore_trained(config, dataset.num_classes)
    bn = model.get_layer("digits_cnn").get_layer("bn3")
    gamma, beta, mean, var = bn.get_weights()
    gamma[0], beta[0] = 0.0, -1.0
    bn.set_weights([gamma, beta, mean, var])
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    kernel[0, :] = 1000.0
    head.set_weights([kernel, bias])
    model.save_weights(rundir.trained_weights(config.model_dir))
    # The run's Keras test accuracy, of these weights (as `train` records it).
    pipelines = input_pipeline.make_pipelines(config, dataset)
    y, probabilities, _ = evaluate.predict_dataset(model, pipelines["test"], max_images=0)
    metrics = rundir.read_metrics(config.model_dir)
    metrics["test_accuracy"] = float(np.mean(probabilities.argmax(1) == y))
    rundir.write_metrics(config.model_dir, metrics)


@pytest.mark.slow
def test_a_lossy_export_is_refused_and_a_faithful_one_passes(folder, tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny(folder, run, test_percent=25)
    train.train_and_evaluate(config)
    dataset = input_pipeline.load_data(config)
    _break_int8_quantization(config, dataset)
    assert rundir.read_metrics(run)["test_accuracy"] == 1.0  # the float model still knows
    export = ["export", f"--model_dir={run}", "--format=tflite", "--max_quantization_drop=0.05"]
    capsys.readouterr()

    assert cli.main([*export, "--quantize=float16"]) == 0, capsys.readouterr().err
    card_before = (run / "tflite" / "model_card.json").read_bytes()
    entry = json.loads(card_before)["files"]["model_float16.tflite"]
    assert entry["quantization_gate"]["split"] == "test"
    assert entry["quantization_gate"]["accuracy"] == 1.0

    capsys.readouterr()
    assert cli.main([*export, "--quantize=int8"]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "test accuracy of the int8 TFLite model" in err and "not written" in err
    assert "below the float model's 1.0000" in err
    assert sorted(p.name for p in (run / "tflite").iterdir()) == [
        "labels.txt",
        "model_card.json",
        "model_float16.tflite",
    ]
    assert (run / "tflite" / "model_card.json").read_bytes() == card_before
