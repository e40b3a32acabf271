"""`tf-finetune export`: re-export a finished run's best checkpoint as SavedModel, .keras or TFLite.

The model is rebuilt from the run's flags (cli.py reads its flags.cfg first) and the weights of
`checkpoints/best.weights.h5`. TFLite files are converted from the Keras model (float pixels in,
probabilities out) and, when quantized, measured against the float conversion on the validation
split with the LiteRT interpreter (`ai_edge_litert`, what phones and edge boxes run; TF 2.21's
`tf.lite.Interpreter` is deprecated): the size / accuracy trade-off is printed and kept in the
model card beside the file, with `labels.txt` (read by `tf-finetune predict --model=X.tflite`).

Pruning (tensorflow-model-optimization) is not offered: its `prune_low_magnitude` only accepts
tf_keras (Keras 2) objects and rejects every Keras 3 model and layer (checked with 0.8.1).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import (
    atomic,
    data,
    export,
    input_pipeline,
    multilabel_metrics,
    offline_default,
    rundir,
)
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.errors import QuantizationDropTooLarge, UserError
from tf_finetune.serving import tflite_interpreter, tflite_predict  # noqa: F401 (re-exported)

# Training images the int8 converter calibrates activation ranges on (TFLite's guide: ~100-500).
REPRESENTATIVE_IMAGES = 200
SERVED_AS = "/models/{name}"  # where scripts/serve.sh and the docker examples mount the base


# ----------------------------------------------------------------------------- the run
def load_best_model(config: Config, class_names: list[str]) -> keras.Model:
    """The run's model with the weights it evaluated and exported."""
    return model_lib.restore_trained(config, len(class_names))


# ----------------------------------------------------------------------------- TFLite
def representative_images(split: data.Split, seed: int, count: int = REPRESENTATIVE_IMAGES):
    """A generator of [1, h, w, 3] float32 training images for int8 calibration.

    Shuffled with the seed so a folder sorted by class still calibrates on every class.
    """
    ds = split.source.shuffle(max(split.count, 1), seed=seed).take(count)
    load = split.load
    ds = ds.map(lambda key, _: load(key)[None])

    def generate() -> Iterator[list[np.ndarray]]:
        for image in ds.as_numpy_iterator():
            yield [image]

    return generate


def with_threshold_mask(model: keras.Model, thresholds: list[float]) -> keras.Model:
    """A multi-label model with a second output, `above_threshold` (bool [batch, labels]:
    each probability at or above its label's threshold), for TFLite: builtin ops only (the
    label names, strings, would need Select TF ops, which LiteRT refuses)."""
    limits = keras.ops.convert_to_tensor(np.asarray(thresholds, np.float32))
    probabilities = model.outputs[0]
    above = keras.layers.Lambda(
        lambda p: keras.ops.greater_equal(p, limits), name="above_threshold"
    )(probabilities)
    return keras.Model(model.inputs, [probabilities, above], name=f"{model.name}_thresholded")


def convert_tflite(
    model: keras.Model,
    quantize: str = "none",
    representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
) -> bytes:
    """The model as a .tflite flatbuffer: float pixels [batch, s, s, 3] in, probabilities out
    (and a bool mask for a `with_threshold_mask` model).

    Args:
      model: the Keras classifier (takes float32 0-255 pixels).
      quantize: none; dynamic (int8 weights, float activations); float16 (float16 weights);
        int8 (int8 weights and activations, uint8 pixels in, calibrated on `representative`).
      representative: for int8, yields [image batch] lists of float32 pixels.
    """
    with tempfile.TemporaryDirectory() as saved:
        # from_keras_model does the same but prints every captured variable to stdout.
        model.export(saved, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serve"])
        _configure(converter, quantize, representative)
        return converter.convert()


def _configure(converter, quantize: str, representative) -> None:
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if representative is None:
            raise ValueError("int8 quantization needs a representative dataset")
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Pixels are 0-255 already: a uint8 input takes them as they are (scale ~1, zero 0).
        converter.inference_input_type = tf.uint8


def tflite_accuracy(tflite_model: bytes, split: data.Split, batch_size: int = 32) -> float:
    """Top-1 accuracy of a TFLite model on a split (mAP for multi-hot labels), run with
    LiteRT (`ai_edge_litert`)."""
    interpreter = tflite_interpreter(model_content=tflite_model)
    labels, probabilities = [], []
    for pixels, y in split.examples().batch(batch_size).as_numpy_iterator():
        probabilities.append(tflite_predict(interpreter, pixels.astype(np.float32)))
        labels.append(y)
    if not labels:
        return 0.0
    y, p = np.concatenate(labels), np.concatenate(probabilities)
    if y.ndim == 2:  # multi-label: the mean AP over labels with a positive example
        aps = [
            multilabel_metrics.average_precision(y[:, j] > 0, p[:, j]) for j in range(y.shape[1])
        ]
        aps = [ap for ap in aps if ap is not None]
        return float(np.mean(aps)) if aps else 0.0
    return float(np.mean(np.argmax(p, axis=1) == y))


def quantization_gate(
    config: Config, content: bytes, rows: list, dataset: data.DataSet, float_model: bytes
) -> dict | None:
    """--max_quantization_drop: the TFLite file's accuracy against the float Keras model's on
    the split --min_accuracy uses (test when there is one, else val), before anything is
    written. The Keras accuracy is the run's own (metrics.json, measured when the run
    evaluated); without it, the float model's through TFLite on that split. Val accuracies
    come from `rows` (measured already), test ones are measured here.

    Returns:
      The gate's facts for the model card, or None when the flag is off.

    Raises:
      QuantizationDropTooLarge: the drop is over the limit (one line; nothing written).
    """
    limit = config.quantization_drop_limit
    if limit is None:
        return None
    split = "test" if dataset.test is not None else "val"
    accuracy = tflite_accuracy(content, dataset.test) if split == "test" else rows[-1][2]
    score = "map" if config.task == "multi_label" else "accuracy"
    reference = rundir.read_metrics(config.model_dir).get(f"{split}_{score}")
    source = "keras"
    if reference is None:
        source = "float32 tflite"
        reference = tflite_accuracy(float_model, dataset.test) if split == "test" else rows[0][2]
    drop = reference - accuracy
    if drop > limit + 1e-6:  # float32 accuracies of older runs' metrics.json
        raise QuantizationDropTooLarge(
            f"{split} accuracy of the {rows[-1][0]} TFLite model is {accuracy:.4f}, "
            f"{drop:.4f} below the float model's {reference:.4f} (--max_quantization_drop="
            f"{config.max_quantization_drop}): not written; earlier exports are untouched."
        )
    logging.info(
        "--max_quantization_drop=%s: %s accuracy %.4f, float %.4f: kept",
        config.max_quantization_drop,
        split,
        accuracy,
        reference,
    )
    return {
        "split": split,
        "accuracy": accuracy,
        "float_accuracy": reference,
        "float_accuracy_from": source,
        "max_drop": limit,
    }


# ----------------------------------------------------------------------------- writing
def _default_dir(config: Config, fmt: str) -> str:
    return config.export_dir or os.path.join(config.model_dir, fmt)


def _ensure_new(path: str) -> None:
    if os.path.exists(path):
        raise UserError(
            f"{path} exists and exports are never overwritten; move it away or pass another "
            "--export_dir."
        )


def _write_new(path: str, write: Callable[[str], None]) -> None:
    """Writes a file through a temporary name; never replaces an existing export."""
    _ensure_new(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.tmp-{os.getpid()}-{os.path.basename(path)}"
    try:
        write(tmp)
        os.rename(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _write_bytes(content: bytes) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(content)

    return write


def _side_files(folder: str, class_names: list[str], card: dict, entry: dict | None) -> str:
    """labels.txt and model_card.json beside a .keras/.tflite file; entries accumulate."""
    with open(os.path.join(folder, export.LABELS_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(class_names) + "\n")
    path = os.path.join(folder, export.MODEL_CARD)
    files = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            files = json.load(f).get("files", {})
    if entry:
        files[entry["file"]] = entry
    atomic.write_json(path, {**card, "files": files})
    return path


def serving_config(config: Config) -> str:
    """Writes TF Serving's models.config serving the export base as /models/<model_name>."""
    from tf_finetune.serving import write_models_config

    path = write_models_config(
        config.serving_config, {config.model_name: SERVED_AS.format(name=config.model_name)}
    )
    return str(path)


# ----------------------------------------------------------------------------- the command
def export_run(config: Config) -> dict:
    """Re-exports `config.model_dir`'s best checkpoint in `config.format`.

    Returns:
      {"path": what was written, "format": ..., "rows": [(name, size bytes, val accuracy)]
      for TFLite (float first), "card": the model card path, "serving_config": path or None}.
    """
    rundir.trained_weights(config.model_dir)  # no checkpoint: one line before any data is read
    metrics = rundir.read_metrics(config.model_dir)
    need_data = config.format == "tflite" or "class_names" not in metrics
    folder = offline_default.data_folder(config)
    dataset = input_pipeline.load_data(config, folder) if need_data else None
    class_names = list(dataset.class_names if dataset else metrics["class_names"])
    if metrics.get("class_names") not in (None, class_names):
        raise UserError(
            f"the classes of --data differ from the run's ({config.model_dir}/metrics.json); "
            "export with the run's own data."
        )
    model = load_best_model(config, class_names)
    card = export.run_card(config, class_names, metrics)
    result = {"format": config.format, "rows": [], "serving_config": None}

    if config.format == "saved_model":
        result["path"] = export.export_saved_model(
            model,
            class_names,
            config.image_size,
            config.export_base,
            version=config.export_version,
            card=card,
        )
        result["card"] = os.path.join(result["path"], export.MODEL_CARD)
    elif config.format == "keras":
        folder = _default_dir(config, "keras")
        result["path"] = os.path.join(folder, "model.keras")
        # A built optimizer, so the file reloads without an optimizer-mismatch warning.
        model.optimizer.build(model.trainable_variables)
        _write_new(result["path"], model.save)
        entry = {"file": "model.keras", "size_bytes": os.path.getsize(result["path"])}
        result["card"] = _side_files(folder, class_names, card, entry)
    else:
        result.update(_export_tflite(config, model, dataset, class_names, card))

    if config.serving_config:
        result["serving_config"] = serving_config(config)
    logging.info("Exported %s to %s", config.format, result["path"])
    return result


def _export_tflite(
    config: Config, model: keras.Model, dataset: data.DataSet, class_names: list[str], card: dict
) -> dict:
    folder = _default_dir(config, "tflite")
    name = (
        "model_float32.tflite" if config.quantize == "none" else f"model_{config.quantize}.tflite"
    )
    path = os.path.join(folder, name)
    _ensure_new(path)  # fail before the conversions, not after them
    thresholds = export.card_thresholds(card, class_names)
    if thresholds is not None:
        model = with_threshold_mask(model, thresholds)
    float_model = convert_tflite(model)
    rows = [("float32", len(float_model), tflite_accuracy(float_model, dataset.val))]
    content = float_model
    if config.quantize != "none":
        representative = representative_images(dataset.train, config.seed)
        content = convert_tflite(model, config.quantize, representative)
        rows.append((config.quantize, len(content), tflite_accuracy(content, dataset.val)))
    gate = quantization_gate(config, content, rows, dataset, float_model)
    _write_new(path, _write_bytes(content))
    entry = {
        "file": name,
        "quantize": config.quantize,
        "size_bytes": len(content),
        "val_accuracy": rows[-1][2],
        "float32_size_bytes": rows[0][1],
        "float32_val_accuracy": rows[0][2],
        "val_images": dataset.val.count,
        "val_accuracy_is": "mAP" if thresholds is not None else "top-1 accuracy",
        "input": "uint8 pixels [batch, s, s, 3]"
        if config.quantize == "int8"
        else "float32 pixels 0-255 [batch, s, s, 3]",
        "output": "float32 probabilities [batch, classes]"
        + (", bool above_threshold [batch, labels]" if thresholds is not None else ""),
        **({"quantization_gate": gate} if gate else {}),
    }
    return {"path": path, "rows": rows, "card": _side_files(folder, class_names, card, entry)}
