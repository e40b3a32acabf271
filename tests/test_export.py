"""The export contract, the `export` command (SavedModel, .keras, TFLite) and `predict`.

One tiny run (digits_cnn, random init, 16 px, 3 colour classes) is trained once through the
CLI; every test exports or predicts from it. TF Serving itself cannot be installed here: its
signatures are read from the MetaGraphDef as `saved_model_cli show --all` does, and the REST
and gRPC paths run against tests/fake_tf_serving.py (a test double).
"""

import base64
import json
import os
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from google.protobuf import text_format
from tensorflow.python.tools import saved_model_utils
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from tests import bombs
from tests.helpers import run_python, tiny, tiny_flags
from tests.images import class_image, encode
from tf_finetune import cli, data, export, export_run

SIZE = 16
CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder):
    run_dir = tmp_path_factory.mktemp("export_run") / "run"
    flags = ["--epochs=3", "--batch_size=8", "--learning_rate=0.01", "--unfreeze=all"]
    code = cli.main(["train", *tiny_flags(folder, run_dir, *flags)])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def config(run, folder):
    return tiny(folder, run)


@pytest.fixture(scope="module")
def keras_model(config):
    return export_run.load_best_model(config, CLASSES)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _dims(info):
    return [d.size for d in info.tensor_shape.dim]


# ----------------------------------------------------------------------------- the contract
def test_signatures_as_tf_serving_reads_them(run):
    version = str(run / "export" / "1")
    assert saved_model_utils.get_saved_model_tag_sets(version) == [["serve"]]
    meta = saved_model_utils.get_meta_graph_def(version, "serve")
    signatures = meta.signature_def
    assert {"serving_default", "predict_images"} <= set(signatures)
    outputs = {
        "probabilities": (tf.float32, [-1, 3]),
        "top_k_indices": (tf.int32, [-1, 3]),
        "top_k_names": (tf.string, [-1, 3]),
        "top_k_scores": (tf.float32, [-1, 3]),
    }
    inputs = {
        "serving_default": {"image_bytes": (tf.string, [-1])},
        "predict_images": {"images": (tf.float32, [-1, -1, -1, 3])},
    }
    for name, expected_inputs in inputs.items():
        sig = signatures[name]
        assert sig.method_name == "tensorflow/serving/predict"
        got_in = {k: (tf.as_dtype(v.dtype), _dims(v)) for k, v in sig.inputs.items()}
        assert got_in == expected_inputs
        got_out = {k: (tf.as_dtype(v.dtype), _dims(v)) for k, v in sig.outputs.items()}
        assert got_out == outputs
    # No function of the serving graph is XLA-compiled (DecodeImage has no XLA kernel).
    functions = meta.graph_def.library.function
    assert functions and not any(
        f.attr["_XlaMustCompile"].b for f in functions if "_XlaMustCompile" in f.attr
    )


def test_model_card_beside_the_saved_model(run, folder):
    card = json.loads((run / "export" / "1" / "model_card.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert card["class_names"] == CLASSES
    assert card["image_size"] == SIZE and card["backbone"] == "digits_cnn"
    assert card["data"] == str(folder)
    assert card["metrics"]["val_accuracy"] == metrics["val_accuracy"]
    assert card["metrics"]["train_images"] == metrics["train_images"]
    assert "--backbone=digits_cnn" in card["flags"] and "--epochs=3" in card["flags"]
    assert card["tensorflow_version"] == tf.__version__
    assert card["keras_version"] == keras.__version__
    assert card["version"] == 1


def test_warmup_request_parses_and_runs_against_the_saved_model(run):
    version = run / "export" / "1"
    records = list(tf.data.TFRecordDataset(str(version / export.WARMUP_FILE)).as_numpy_iterator())
    assert len(records) == 1
    log = prediction_log_pb2.PredictionLog.FromString(records[0])
    request = log.predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    images = tf.make_ndarray(request.inputs["image_bytes"])
    assert images.shape == (1,) and images[0][:3] == b"\xff\xd8\xff"  # a real JPEG
    loaded = tf.saved_model.load(str(version), tags=["serve"])
    out = loaded.signatures[request.model_spec.signature_name](
        image_bytes=tf.constant(list(images))
    )
    assert out["probabilities"].shape == (1, 3)
    assert float(tf.reduce_sum(out["probabilities"])) == pytest.approx(1.0, abs=1e-5)


RELOAD = r"""
import json, sys
import numpy as np, tensorflow as tf
blobs = np.load(sys.argv[2], allow_pickle=True)
loaded = tf.saved_model.load(sys.argv[1], tags=["serve"])
by_bytes, by_pixels = loaded.signatures["serving_default"], loaded.signatures["predict_images"]
out = {}
res = by_bytes(image_bytes=tf.constant(list(blobs["encoded"])))
out["bytes"] = res["probabilities"].numpy().tolist()
out["names"] = [[n.decode() for n in row] for row in res["top_k_names"].numpy()]
out["pixels"] = [
    by_pixels(images=tf.constant(p[None], tf.float32))["probabilities"].numpy()[0].tolist()
    for p in blobs["pixels"]
]
empty = by_bytes(image_bytes=tf.constant([], tf.string))
out["empty"] = {k: list(v.shape) for k, v in empty.items()}
empty = by_pixels(images=tf.zeros([0, 9, 7, 3]))
out["empty_pixels"] = list(empty["probabilities"].shape)
try:
    by_bytes(image_bytes=tf.constant([blobs["encoded"][0], b"not an image"]))
    out["bad"] = None
except tf.errors.InvalidArgumentError as e:
    out["bad"] = e.message
print("RESULT " + json.dumps(out))
"""


def _decoded(blob: bytes) -> np.ndarray:
    return data.decode_and_resize(tf.constant(blob), SIZE).numpy().astype("float32")


@pytest.mark.slow
def test_fresh_process_serves_every_signature_like_keras(run, keras_model, tmp_path):
    images = [
        encode(class_image(0, (30, 22), seed=1), "JPEG"),
        encode(class_image(1, (16, 16), seed=2), "PNG"),
        encode(class_image(2, (7, 50), seed=3, mode="L"), "PNG"),  # grayscale
        encode(class_image(0, (40, 33), seed=4, mode="RGBA"), "PNG"),
        encode(class_image(1, (64, 64), seed=5, mode="L"), "JPEG"),
        encode(class_image(2, (4000, 3000), seed=6), "JPEG"),  # huge: resized in the graph
    ]
    pixels = [np.asarray(class_image(i % 3, (20 + i, 31), seed=i), "float32") for i in range(3)]
    ragged = np.empty(len(pixels), dtype=object)  # images of different sizes
    ragged[:] = pixels
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, encoded=np.array(images, dtype=object), pixels=ragged)
    served = run_python(RELOAD, run / "export" / "1", inputs)

    expected = keras_model.predict(np.stack([_decoded(b) for b in images]), verbose=0)
    assert np.max(np.abs(np.array(served["bytes"]) - expected)) < 1e-5
    assert [row[0] for row in served["names"]] == [CLASSES[i] for i in expected.argmax(1)]
    resized = np.stack([data.resize(tf.constant(p), SIZE).numpy() for p in pixels])
    np.testing.assert_allclose(served["pixels"], keras_model.predict(resized, verbose=0), atol=1e-5)
    assert served["empty"] == {
        "probabilities": [0, 3],
        "top_k_indices": [0, 3],
        "top_k_names": [0, 3],
        "top_k_scores": [0, 3],
    }
    assert served["empty_pixels"] == [0, 3]
    assert "Unknown image file format" in served["bad"]


# ----------------------------------------------------------------------------- export command
@pytest.mark.slow
def test_export_pinned_version_model_card_and_serving_config(run, capsys, tmp_path):
    models_config = tmp_path / "models.config"
    code, out, err = _cli(
        capsys,
        "export",
        f"--model_dir={run}",
        "--export_version=7",
        f"--serving_config={models_config}",
        "--model_name=colours",
    )
    assert code == 0, err
    version = run / "export" / "7"
    assert str(version) in out
    assert (version / "saved_model.pb").exists()
    assert (version / export.WARMUP_FILE).exists()
    card = json.loads((version / "model_card.json").read_text())
    assert card["version"] == 7 and card["class_names"] == CLASSES
    parsed = text_format.Parse(
        models_config.read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (entry,) = parsed.model_config_list.config
    assert (entry.name, entry.base_path) == ("colours", "/models/colours")

    stamp = os.path.getmtime(version / "saved_model.pb")
    code, _, err = _cli(capsys, "export", f"--model_dir={run}", "--export_version=7")
    assert code == 2 and "exists and versions are never overwritten" in err
    assert len(err.strip().splitlines()) == 1
    assert os.path.getmtime(version / "saved_model.pb") == stamp
    assert not [d for d in os.listdir(run / "export") if d.startswith(".")]


def test_export_keras_reloads_with_the_same_outputs(run, keras_model, capsys, tmp_path):
    code, out, err = _cli(
        capsys, "export", f"--model_dir={run}", "--format=keras", f"--export_dir={tmp_path}"
    )
    assert code == 0, err
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    pixels = np.stack([_decoded(encode(class_image(i, (20, 20), seed=i), "PNG")) for i in range(3)])
    np.testing.assert_allclose(reloaded.predict(pixels, verbose=0), keras_model(pixels), atol=1e-6)
    assert (tmp_path / "labels.txt").read_text().split() == CLASSES
    code, _, err = _cli(
        capsys, "export", f"--model_dir={run}", "--format=keras", f"--export_dir={tmp_path}"
    )
    assert code == 2 and "never overwritten" in err


@pytest.mark.slow
def test_export_tflite_float_and_quantized_reports_size_and_accuracy(
    run, config, keras_model, capsys
):
    folder = run / "tflite"
    val = data.load_image_folder(config.data, SIZE, config.validation_percent).val
    pixels, labels = next(val.examples().batch(100).as_numpy_iterator())
    keras_top1 = keras_model.predict(pixels.astype("float32"), verbose=0).argmax(1)
    for quantize in ("none", "dynamic", "float16", "int8"):
        code, out, err = _cli(
            capsys, "export", f"--model_dir={run}", "--format=tflite", f"--quantize={quantize}"
        )
        assert code == 0, err
        name = "float32" if quantize == "none" else quantize
        path = folder / f"model_{name}.tflite"
        card = json.loads((folder / "model_card.json").read_text())
        entry = card["files"][path.name]
        assert entry["size_bytes"] == path.stat().st_size
        assert f"{entry['val_accuracy']:.3f}" in out and "float32" in out
        if quantize != "none":
            assert f"{entry['float32_val_accuracy']:.3f}" in out
        interpreter = Interpreter(model_path=str(path))  # LiteRT, what devices run
        interpreter.allocate_tensors()
        probabilities = export_run.tflite_predict(interpreter, pixels.astype("float32"))
        accuracy = float(np.mean(probabilities.argmax(1) == labels))
        assert entry["val_accuracy"] == pytest.approx(accuracy)  # measured, not copied
        agree = np.mean(probabilities.argmax(1) == keras_top1)
        assert agree >= (0.99 if quantize in ("none", "float16") else 0.8), (quantize, agree)
        if quantize == "int8":
            assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    card = json.loads((folder / "model_card.json").read_text())
    assert set(card["files"]) == {
        "model_float32.tflite",
        "model_dynamic.tflite",
        "model_float16.tflite",
        "model_int8.tflite",
    }
    sizes = {k: v["size_bytes"] for k, v in card["files"].items()}
    assert sizes["model_int8.tflite"] < sizes["model_float32.tflite"]
    assert sizes["model_float16.tflite"] < sizes["model_float32.tflite"]
    code, _, err = _cli(capsys, "export", f"--model_dir={run}", "--format=tflite")
    assert code == 2 and "never overwritten" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "--quantize=int8"], "--quantize=int8 needs --format=tflite"),
        (["export", "stray.jpg"], "unexpected argument"),
        (["export", "--model_dir=/no/such/run"], "no checkpoint at"),
        (["predict", "--model=/no/such/dir", "a.jpg"], "no such directory"),
        (["predict", "--top_k=0", "a.jpg"], "--top_k must be at least 1"),
        (["predict", "a.jpg"], "pass exactly one of --model"),
    ],
)
def test_export_and_predict_user_errors(capsys, argv, message):
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- predict command
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("to_predict")
    for label in range(3):
        (folder / f"c{label}.jpg").write_bytes(encode(class_image(label, (25, 18), seed=9), "JPEG"))
    gray = class_image(1, (12, 40), seed=3, mode="L")
    (folder / "gray.png").write_bytes(encode(gray, "PNG"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _expected_top1(keras_model, photos) -> dict:
    names = ["c0.jpg", "c1.jpg", "c2.jpg", "gray.png"]
    pixels = np.stack([_decoded((photos / n).read_bytes()) for n in names])
    top = keras_model.predict(pixels, verbose=0).argmax(1)
    return {str(photos / n): CLASSES[i] for n, i in zip(names, top)}


def _check_json(out: str, expected: dict, photos) -> None:
    results = {r["file"]: r for r in json.loads(out)}
    for path, label in expected.items():
        assert results[path]["error"] is None and results[path]["top_k"][0]["label"] == label
        assert len(results[path]["top_k"]) == 2
    assert "Invalid PNG" in results[str(photos / "broken.png")]["error"]
    assert results[str(photos / "missing.jpg")]["error"] == "no such file or directory"


@pytest.mark.slow
def test_predict_local_from_a_run_dir(run, keras_model, photos, capsys):
    code, out, err = _cli(
        capsys,
        "predict",
        f"--model={run}",  # a run dir: its latest export
        str(photos),
        "--json",
        "--top_k=2",
        str(photos / "missing.jpg"),
    )
    assert code == 1  # some inputs failed; the others are predicted
    _check_json(out, _expected_top1(keras_model, photos), photos)
    assert "2 of 6 inputs failed" in err

    code, out, _ = _cli(capsys, "predict", f"--model={run / 'export'}", str(photos / "c0.jpg"))
    assert code == 0 and "c0.jpg" in out and "rank" in out


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_predict_against_tf_serving_test_double(
    run, keras_model, photos, capsys, tf_serving, protocol
):
    fake = tf_serving("colours", run / "export", protocol)
    code, out, err = _cli(
        capsys,
        "predict",
        fake.flag,
        "--model_name=colours",
        "--json",
        "--top_k=2",
        str(photos),
        str(photos / "missing.jpg"),
    )
    assert code == 1, err
    _check_json(out, _expected_top1(keras_model, photos), photos)
    assert fake.store.predict_calls >= 2  # the rejected batch was retried file by file


def test_help_lists_export_and_predict_groups(capsys):
    code, out, _ = _cli(capsys, "--help")
    assert code == 0
    assert out.index("export flags:") < out.index("--quantize=") < out.index("predict flags:")
    assert out.index("predict flags:") < out.index("\n  --server=")
    assert "predict --model=EXPORT_OR_RUN_DIR" in out


def test_flagfile_leaves_out_export_and_predict_knobs(config):
    text = config.to_flagfile()
    assert "--backbone=digits_cnn" in text
    assert "--quantize" not in text and "--server" not in text and "--json" not in text


@pytest.mark.slow
def test_readme_curl_body_is_answered_by_the_rest_test_double(run, keras_model, photos, tf_serving):
    blob = (photos / "c1.jpg").read_bytes()
    body = json.dumps({"instances": [{"b64": base64.b64encode(blob).decode()}]}).encode()
    fake = tf_serving("photos", run / "export")
    request = urllib.request.Request(f"{fake.url}/v1/models/photos:predict", data=body)
    with urllib.request.urlopen(request, timeout=30) as response:
        (prediction,) = json.loads(response.read())["predictions"]
    expected = keras_model.predict(_decoded(blob)[None], verbose=0)[0]
    np.testing.assert_allclose(prediction["probabilities"], expected, atol=1e-5)
    assert prediction["top_k_names"][0] == CLASSES[int(expected.argmax())]


@pytest.mark.slow
def test_predict_a_tflite_file_with_litert_and_the_labels_beside_it(
    run, keras_model, tmp_path, capsys
):
    folder = tmp_path / "tflite"
    code, _, err = _cli(
        capsys, "export", f"--model_dir={run}", "--format=tflite", f"--export_dir={folder}"
    )
    assert code == 0, err
    tflite = folder / "model_float32.tflite"
    assert (folder / "labels.txt").read_text().split() == CLASSES
    card = json.loads((folder / "model_card.json").read_text())
    assert card["max_image_pixels"] == 89_478_485
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["c0.jpg", "c1.png", "c2.bmp", "gray.gif"]
    for i, (name, fmt) in enumerate(zip(names, ("JPEG", "PNG", "BMP", "GIF"))):
        mode = "L" if name.startswith("gray") else "RGB"
        (photos / name).write_bytes(encode(class_image(i % 3, (23, 31), seed=i, mode=mode), fmt))
    (photos / "bomb.png").write_bytes(bombs.png())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    code, out, err = _cli(capsys, "predict", f"--model={tflite}", "--json", str(photos))
    assert code == 1 and "2 of 6 inputs failed" in err, err
    results = {os.path.basename(r["file"]): r for r in json.loads(out)}
    # Decoded and resized by the export's own function: the Keras model's answer.
    pixels = np.stack([_decoded((photos / n).read_bytes()) for n in names])
    expected = keras_model.predict(pixels, verbose=0)
    for name, probs in zip(names, expected):
        top = results[name]["top_k"]
        assert top[0]["label"] == CLASSES[int(probs.argmax())], name
        assert top[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert results["bomb.png"]["error"].startswith("PNG too large to decode safely: 20000x20000")
    assert "JPEG" in results["broken.jpg"]["error"]
    (folder / "labels.txt").unlink()
    code, _, err = _cli(capsys, "predict", f"--model={tflite}", str(photos / "c0.jpg"))
    assert code == 2 and "no labels.txt beside it" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, "predict", f"--model={folder}/nope.tflite", "a.jpg")
    assert code == 2 and "no such file" in err
