"""Tests of tf_finetune.serving against a tiny export with the real contract.

The REST and gRPC predictors talk to tests/fake_tf_serving.py (a test double: the real TF
Serving binary cannot be installed here), which answers from the same SavedModel.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image
from tensorflow_serving.config import model_server_config_pb2

from tests.fake_tf_serving import FakeGrpcServer, FakeModelStore, FakeRestServer
from tf_finetune import serving
from tf_finetune.config import Config
from tf_finetune.errors import UserError
from tf_finetune.serving import (
    GrpcPredictor,
    LocalPredictor,
    Prediction,
    RestPredictor,
    collect_inputs,
    format_json,
    format_table,
    predict_files,
    predict_main,
    write_models_config,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
K = 3
LABELS = ["apple", "banana", "cherry", "damson", "elder"]
V1_LABELS = [f"old_{name}" for name in LABELS]
MODEL_NAME = "fruit"
GOOD = [
    "red.jpg",
    "noise.png",
    "gray.png",
    "rgba.png",
    "anim.gif",
    "pic.bmp",
    "sub/deep/UPPER.JPEG",
]
BAD = ["corrupt.png", "not_an_image.jpg"]


# --------------------------------------------------------------------------- fixtures


def _image_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    init = keras.initializers.RandomNormal(stddev=4.0, seed=seed)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax", kernel_initializer=init)(x)
    return keras.Model(inputs, outputs)


def _top_k_outputs(probs, labels):
    top = tf.math.top_k(probs, k=K)
    return {
        "probabilities": probs,
        "top_k_indices": tf.cast(top.indices, tf.int32),
        "top_k_names": tf.gather(tf.constant(labels), top.indices),
        "top_k_scores": top.values,
    }


def export_image_model(model: keras.Model, labels: list[str], version_dir: Path) -> None:
    """Export ``model`` with exactly the tf_finetune serving contract."""

    def decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.image.resize(tf.cast(image, tf.float32), (SIZE, SIZE))

    def serving_default(image_bytes):
        images = tf.map_fn(
            decode, image_bytes, fn_output_signature=tf.TensorSpec((SIZE, SIZE, 3), tf.float32)
        )
        return _top_k_outputs(model(images, training=False), labels)

    def predict_images(images):
        return _top_k_outputs(model(tf.image.resize(images, (SIZE, SIZE)), training=False), labels)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serving_default,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        "predict_images",
        predict_images,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")],
    )
    archive.write_out(str(version_dir), verbose=False)
    (version_dir / "assets").mkdir(exist_ok=True)
    (version_dir / "assets" / "labels.txt").write_text("\n".join(labels) + "\n")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export base dir with versions 1 and 2 (2 is the model under test)."""
    base = tmp_path_factory.mktemp("export") / MODEL_NAME
    model_v1 = _image_model(seed=1)
    export_image_model(model_v1, V1_LABELS, base / "1")
    model = _image_model(seed=2)
    export_image_model(model, LABELS, base / "2")
    (base / "not_a_version").mkdir()
    return {"base": base, "model": model}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("images")

    def noise(h, w, c):
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    red = np.zeros((30, 40, 3), np.uint8)
    red[..., 0] = 220
    red[5:20, 10:30, 1] = 180
    _write(d / "red.jpg", _encode(Image.fromarray(red), "JPEG", quality=95))
    _write(d / "noise.png", _encode(Image.fromarray(noise(16, 16, 3)), "PNG"))
    _write(d / "gray.png", _encode(Image.fromarray(noise(17, 23, 1), "L"), "PNG"))
    _write(d / "rgba.png", _encode(Image.fromarray(noise(20, 33, 4), "RGBA"), "PNG"))
    frames = [Image.fromarray(noise(12, 12, 3)).convert("P") for _ in range(2)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    _write(d / "anim.gif", gif.getvalue())
    _write(d / "pic.bmp", _encode(Image.fromarray(noise(12, 10, 3)), "BMP"))
    _write(d / "sub/deep/UPPER.JPEG", _encode(Image.fromarray(noise(50, 50, 3)), "JPEG"))
    png = _encode(Image.fromarray(noise(8, 8, 3)), "PNG")
    _write(d / "corrupt.png", png[:40] + b"\x00garbage" * 8)
    _write(d / "not_an_image.jpg", b"hello, I am a text file\n")
    _write(d / "notes.txt", b"not picked up when walking a directory\n")
    return d


@pytest.fixture(scope="module")
def store(export):
    return FakeModelStore(MODEL_NAME, export["base"], version_labels={"stable": 1, "canary": 2})


@pytest.fixture(scope="module")
def rest_server(store):
    with FakeRestServer(store) as server:
        yield server


@pytest.fixture(scope="module")
def grpc_server(store):
    with FakeGrpcServer(store) as server:
        yield server


@pytest.fixture(scope="module")
def local(export):
    return LocalPredictor(export["base"])


@pytest.fixture(scope="module")
def rest(rest_server):
    return RestPredictor(rest_server.url, MODEL_NAME, timeout=30)


@pytest.fixture(scope="module")
def grpc_predictor(grpc_server):
    with GrpcPredictor(grpc_server.target, MODEL_NAME, timeout=30) as predictor:
        yield predictor


@pytest.fixture
def backend(request, local, rest, grpc_predictor):
    return {"local": local, "rest": rest, "grpc": grpc_predictor}[request.param]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keras_reference(model, path: Path) -> np.ndarray:
    """Class probabilities of the Keras model on the decoded pixels.

    PNG/GIF/BMP are decoded independently with Pillow (lossless: identical pixels). JPEG is
    decoded with tf.io.decode_jpeg's default (libjpeg's fast integer IDCT, which is what the
    serving graph's decode_image does): Pillow's accurate IDCT differs by up to ~11 levels.
    """
    if path.suffix.lower() in (".jpg", ".jpeg"):
        pixels = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy().astype(np.float32)
    else:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    resized = tf.image.resize(pixels[None], (SIZE, SIZE))
    return np.asarray(model(resized, training=False))[0]


def _assert_matches_reference(top_k, probs, atol=1e-4):
    """Same scores as the reference, each the rank-th largest (ties may swap within atol)."""
    assert len(top_k) == K
    ranked = np.sort(probs)[::-1]
    for rank, (label, score) in enumerate(top_k):
        assert score == pytest.approx(float(probs[LABELS.index(label)]), abs=atol)
        assert score == pytest.approx(float(ranked[rank]), abs=atol)


# --------------------------------------------------------------------------- inputs


def test_collect_inputs_walks_dirs_and_reports_missing(images):
    files, errors = collect_inputs([str(images), str(images / "notes.txt"), "/nonexistent/x.png"])
    names = sorted(os.path.relpath(f, images) for f in files)
    assert names == sorted(GOOD + BAD + ["notes.txt"])  # .txt only because it was named
    assert errors == [("/nonexistent/x.png", "no such file or directory")]
    again, _ = collect_inputs([str(images), str(images / "red.jpg")])
    assert len(again) == len(GOOD + BAD)  # no duplicates


def test_unreadable_file_is_reported_per_file(images, local, tmp_path):
    if os.geteuid() == 0:
        # root reads everything: simulate with a file that vanishes between walk and read
        gone = tmp_path / "gone.png"
        gone.write_bytes(b"x")
        files = [str(images / "red.jpg"), str(gone)]
        gone.unlink()
    else:
        locked = tmp_path / "locked.png"
        locked.write_bytes((images / "noise.png").read_bytes())
        locked.chmod(0)
        files, errors = collect_inputs([str(images / "red.jpg"), str(locked)])
        assert errors == [(str(locked), "cannot read file: permission denied")]
        files.append(str(locked))
    results = predict_files(local, files, top_k=K)
    assert results[0].error is None and len(results[0].top_k) == K
    assert results[1].error.startswith("cannot read file")


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", ["local", "rest", "grpc"], indirect=True)
def test_backend_matches_keras_and_reports_bad_files(backend, images, export):
    files = [str(images / name) for name in GOOD + BAD]
    results = predict_files(backend, files, top_k=K, batch_size=4)
    assert [r.file for r in results] == files
    for result in results[: len(GOOD)]:
        assert result.error is None, result
        _assert_matches_reference(
            result.top_k, _keras_reference(export["model"], Path(result.file))
        )
    by_name = {Path(r.file).name: r for r in results}
    assert by_name["corrupt.png"].top_k == ()
    assert by_name["not_an_image.jpg"].top_k == ()
    assert "Unknown image file format" in by_name["not_an_image.jpg"].error
    assert by_name["corrupt.png"].error
    for r in results:  # errors are one short line, without graph noise
        assert r.error is None or ("\n" not in r.error and "[[" not in r.error)


def test_backends_agree_with_each_other(local, rest, grpc_predictor, images):
    files = [str(images / name) for name in GOOD + BAD]
    runs = [predict_files(p, files, top_k=K, batch_size=3) for p in (local, rest, grpc_predictor)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert a.file == b.file
            assert (a.error is None) == (b.error is None)
            assert [n for n, _ in a.top_k] == [n for n, _ in b.top_k]
            assert [s for _, s in a.top_k] == pytest.approx([s for _, s in b.top_k], abs=1e-6)


def test_failed_batch_is_retried_one_by_one(rest, store, images):
    files = [str(images / n) for n in ("red.jpg", "corrupt.png", "noise.png", "gray.png")]
    before = len(store.batch_sizes)
    results = predict_files(rest, files, top_k=2, batch_size=2)
    # batch [red, corrupt] fails -> 2 singles; batch [noise, gray] succeeds
    assert store.batch_sizes[before:] == [2, 1, 1, 2]
    assert [r.error is None for r in results] == [True, False, True, True]
    assert all(len(r.top_k) == 2 for r in results if r.error is None)


def test_batches_respect_byte_budget(rest, store, images):
    files = [str(images / n) for n in ("noise.png", "gray.png", "pic.bmp")]
    before = len(store.batch_sizes)
    predict_files(rest, files, batch_size=32, max_batch_bytes=1)
    assert store.batch_sizes[before:] == [1, 1, 1]


def test_local_picks_highest_version_or_the_given_one(export, images):
    jpg = [str(images / "red.jpg")]
    assert LocalPredictor(export["base"]).path.name == "2"
    v1 = predict_files(LocalPredictor(export["base"] / "1"), jpg)[0]
    assert all(name.startswith("old_") for name, _ in v1.top_k)


@pytest.mark.parametrize("version", [1, "stable"])
def test_remote_versions_and_labels(rest_server, grpc_server, images, version):
    jpg = [str(images / "red.jpg")]
    for predictor in (
        RestPredictor(rest_server.url, MODEL_NAME, version=version),
        GrpcPredictor(grpc_server.target, MODEL_NAME, version=version),
    ):
        with predictor:
            result = predict_files(predictor, jpg)[0]
        assert result.error is None
        assert all(name.startswith("old_") for name, _ in result.top_k)


def test_connection_refused_is_a_clear_user_error():
    port = _free_port()
    with pytest.raises(UserError, match=rf"is TF Serving running at http://127.0.0.1:{port}\?"):
        RestPredictor(f"127.0.0.1:{port}", MODEL_NAME, timeout=5).predict_batch([b"x"])
    with GrpcPredictor(f"127.0.0.1:{port}", MODEL_NAME, timeout=5) as predictor:
        with pytest.raises(UserError, match=rf"is TF Serving running at 127.0.0.1:{port}\?"):
            predictor.predict_batch([b"x"])


def test_unknown_model_or_version_is_a_user_error(rest_server, grpc_server):
    with pytest.raises(UserError, match="no model 'nope'.*--model_name"):
        RestPredictor(rest_server.url, "nope").predict_batch([b"x"])
    with pytest.raises(UserError, match="version 7"):
        RestPredictor(rest_server.url, MODEL_NAME, version=7).predict_batch([b"x"])
    with GrpcPredictor(grpc_server.target, "nope") as predictor:
        with pytest.raises(UserError, match="no model 'nope'.*--model_name"):
            predictor.predict_batch([b"x"])


def test_local_model_path_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        LocalPredictor(tmp_path / "missing")
    with pytest.raises(UserError, match="no SavedModel found"):
        LocalPredictor(tmp_path)


def test_tf_serving_error_body_parsing():
    assert serving._parse_error_body(b'{"error": "bad \\"x\\""}') == 'bad "x"'
    # TF Serving C-escapes messages, which can make the body invalid JSON
    assert serving._parse_error_body(b'{ "error": "can\\\'t decode\\n\\t [[{{node x}}]]" }') == (
        "can't decode\n\t [[{{node x}}]]"
    )
    assert serving._parse_error_body(b"<html>502</html>") == "<html>502</html>"
    noisy = (
        "Graph execution error:\n\nDetected at node map/DecodeImage defined at:\n"
        "<stack traces unavailable>\nInvalid PNG data, size 10\n\t [[{{node map/DecodeImage}}]] "
        "[Op:__inference_signature_wrapper_1]"
    )
    assert serving._short_error(noisy) == "Invalid PNG data, size 10"


# --------------------------------------------------------------------------- fake server wire format


def test_fake_rest_speaks_tf_serving_json(rest_server, images):
    """The documented curl request works as is, and errors look like TF Serving's."""
    payload = {
        "instances": [
            {"image_bytes": {"b64": base64.b64encode((images / "red.jpg").read_bytes()).decode()}}
        ]
    }
    req = urllib.request.Request(
        f"{rest_server.url}/v1/models/{MODEL_NAME}:predict",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.load(resp)
    row = body["predictions"][0]
    assert set(row) == {"probabilities", "top_k_indices", "top_k_names", "top_k_scores"}
    assert len(row["probabilities"]) == len(LABELS) and len(row["top_k_names"]) == K
    with urllib.request.urlopen(f"{rest_server.url}/v1/models/{MODEL_NAME}/metadata") as resp:
        meta = json.load(resp)
    sig = meta["metadata"]["signature_def"]["signature_def"]
    assert set(sig["serving_default"]["inputs"]) == {"image_bytes"}
    assert set(sig["predict_images"]["inputs"]) == {"images"}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(
                f"{rest_server.url}/v1/models/nope:predict", data=json.dumps(payload).encode()
            )
        )
    assert err.value.code == 404 and "error" in json.loads(err.value.read())


# --------------------------------------------------------------------------- predict_main / output


def _args(inputs=(), **options) -> tuple[Config, list[str]]:
    """The predict command's Config (its predict flags) and inputs."""
    return Config(**options), list(inputs)


def _run(args: tuple[Config, list[str]]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = predict_main(*args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_predict_main_json_output(export, images):
    code, out, err = _run(
        _args(model=str(export["base"]), inputs=[str(images)], top_k=2, json=True)
    )
    data = json.loads(out)
    assert code == 1 and "2 of 9 inputs failed" in err
    assert len(data) == len(GOOD + BAD)
    for entry in data:
        assert set(entry) == {"file", "top_k", "error"}
        if entry["error"] is None:
            assert len(entry["top_k"]) == 2
            assert all(set(t) == {"label", "score"} for t in entry["top_k"])
            assert entry["top_k"][0]["label"] in LABELS
        else:
            assert entry["top_k"] == []


def test_predict_main_table_rest_and_grpc(rest_server, grpc_server, images):
    good = [str(images / "red.jpg"), str(images / "sub")]
    for args in (
        _args(server=rest_server.url, model_name=MODEL_NAME, inputs=good, top_k=2),
        _args(grpc=grpc_server.target, model_name=MODEL_NAME, inputs=good, batch_size=1),
    ):
        code, out, err = _run(args)
        assert code == 0, err
        assert out.splitlines()[0].split() == ["file", "rank", "label", "score"]
        assert "red.jpg" in out and "UPPER.JPEG" in out
        assert len([line for line in out.splitlines()[1:] if line.strip()]) == 2 * min(
            args[0].top_k, K
        )


def test_top_k_larger_than_exported_is_capped_with_a_note(export, images):
    code, out, err = _run(
        _args(model=str(export["base"]), inputs=[str(images / "red.jpg")], top_k=10)
    )
    assert code == 0 and "returns its top 3 classes per image" in err and "--top_k=10" in err
    assert len([line for line in out.splitlines()[1:] if line.strip()]) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "m", "inputs": []}, "no inputs given"),
        ({"inputs": ["x.jpg"]}, "exactly one of --model"),
        ({"model": "m", "server": "http://h:1", "inputs": ["x.jpg"]}, "got --model and --server"),
        ({"server": "ftp://h", "inputs": ["x.jpg"]}, "not an http"),
        ({"grpc": "http://h:8500", "inputs": ["x.jpg"]}, "without a scheme"),
    ],
)
def test_predict_main_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        _run(_args(**kwargs))


def test_predict_main_empty_directory(export, tmp_path):
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(UserError, match="no image .* files found"):
        _run(_args(model=str(export["base"]), inputs=[str(tmp_path)]))


def test_predict_main_refused_server(images):
    with pytest.raises(UserError, match="is TF Serving running"):
        _run(_args(server=f"http://127.0.0.1:{_free_port()}", inputs=[str(images)]))


def test_format_table_and_json_shapes():
    results = [
        Prediction("a.jpg", (("cat", 0.9), ("dog", 0.05))),
        Prediction("b.jpg", error="Unknown image file format"),
    ]
    table = format_table(results).splitlines()
    assert table[1].split() == ["a.jpg", "1", "cat", "0.9000"]
    assert table[2].split() == ["2", "dog", "0.0500"]
    assert table[3].split()[:3] == ["b.jpg", "-", "ERROR"]
    assert json.loads(format_json(results)) == [
        {
            "file": "a.jpg",
            "top_k": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.05}],
            "error": None,
        },
        {"file": "b.jpg", "top_k": [], "error": "Unknown image file format"},
    ]


# --------------------------------------------------------------------------- text models


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(len(LABELS), activation="softmax")]
    )

    def serving_default(text):
        words = tf.strings.split(tf.strings.lower(text))
        ids = tf.strings.to_hash_bucket_fast(words, 16)
        bag = tf.reduce_sum(tf.one_hot(ids, 16), axis=1)
        return _top_k_outputs(model(bag, training=False), LABELS)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serving_default,
        input_signature=[tf.TensorSpec([None], tf.string, name="text")],
    )
    base = tmp_path_factory.mktemp("text_export") / "reviews"
    archive.write_out(str(base / "1"), verbose=False)
    return base


def test_text_model_local_and_rest(text_export, tmp_path, tf_serving):
    (tmp_path / "a.txt").write_text("great fruit, would buy again")
    (tmp_path / "b.TXT").write_text("rotten")
    (tmp_path / "ignored.jpg").write_bytes(b"\xff\xd8")
    local = LocalPredictor(text_export)
    assert local.input_key == "text"
    files, _ = collect_inputs([str(tmp_path)], serving.TEXT_EXTENSIONS)
    assert sorted(Path(f).name for f in files) == ["a.txt", "b.TXT"]
    expected = predict_files(local, files)
    server = tf_serving("reviews", text_export)
    code, out, _ = _run(
        _args(server=server.url, model_name="reviews", inputs=[str(tmp_path)], json=True)
    )
    assert code == 0
    got = json.loads(out)
    assert [e["top_k"][0]["label"] for e in got] == [r.top_k[0][0] for r in expected]


# --------------------------------------------------------------------------- server config + scripts


def test_write_models_config_parses_back(tmp_path):
    path = write_models_config(
        tmp_path / "conf" / "models.config",
        {"fruit": "/models/fruit", "reviews": "gs://bucket/reviews"},
        version_labels={"fruit": {"stable": 1, "canary": 2}},
    )
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    fruit, reviews = config.model_config_list.config
    assert (fruit.name, fruit.base_path, fruit.model_platform) == (
        "fruit",
        "/models/fruit",
        "tensorflow",
    )
    assert list(fruit.model_version_policy.specific.versions) == [1, 2]
    assert dict(fruit.version_labels) == {"stable": 1, "canary": 2}
    assert reviews.model_version_policy.latest.num_versions == 1
    assert not reviews.version_labels


@pytest.mark.parametrize(
    ("models", "labels", "message"),
    [
        ({}, None, "at least one"),
        ({"fruit": "relative/path"}, None, "must be absolute"),
        ({"a/b": "/models/x"}, None, "not usable in URLs"),
        ({"fruit": "/models/fruit"}, {"other": {"x": 1}}, "unknown models"),
        ({"fruit": "/models/fruit"}, {"fruit": {"1": 1}}, "non-numeric"),
        ({"fruit": "/models/fruit"}, {"fruit": {"stable": 0}}, "positive integer"),
    ],
)
def test_write_models_config_rejects_bad_input(tmp_path, models, labels, message):
    with pytest.raises(UserError, match=message):
        write_models_config(tmp_path / "m.config", models, labels)


SERVE_SH = ROOT / "scripts" / "serve.sh"


def test_serve_sh_syntax_and_dry_run(export, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where --batching writes its config
    subprocess.run(["bash", "-n", str(SERVE_SH)], check=True)
    usage = subprocess.run(["bash", str(SERVE_SH)], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage" in usage.stderr.lower()
    plain = subprocess.run(
        ["bash", str(SERVE_SH), "--dry-run", "--name", MODEL_NAME, str(export["base"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "docker run" in plain and "-p 8501:8501" in plain and "-p 8500:8500" in plain
    assert f"{export['base']}:/models/{MODEL_NAME}" in plain and f"MODEL_NAME={MODEL_NAME}" in plain
    assert "--enable_batching" not in plain
    batched = subprocess.run(
        ["bash", str(SERVE_SH), "--dry-run", "--batching", str(export["base"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--enable_batching" in batched and "--batching_parameters_file=" in batched
    assert "MODEL_NAME=model" in batched
    rendered = next(tmp_path.glob("tf_finetune/batching-*.config")).read_text()
    assert re.search(r"^num_batch_threads \{ value: [1-9]\d* \}", rendered, re.M)
    missing = subprocess.run(
        ["bash", str(SERVE_SH), "--dry-run", "/nonexistent/export"], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "no such directory" in missing.stderr


def test_batching_config_is_cpu_tuned():
    text = (ROOT / "scripts" / "batching.config").read_text()
    values = {k: int(v) for k, v in re.findall(r"^(\w+)\s*\{\s*value:\s*(\d+)\s*\}", text, re.M)}
    assert values["max_batch_size"] == 32
    assert 1000 <= values["batch_timeout_micros"] <= 5000
    assert values["num_batch_threads"] >= 1
    assert values["max_enqueued_batches"] >= 1


def test_docs_exist():
    doc = (ROOT / "docs" / "serving.md").read_text()
    for needle in ('"b64"', "serving_default", "predict_images", "serve.sh", "batching", '"error"'):
        assert needle in doc


# --------------------------------------------------------------------------- every REST form


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _b64(path: Path) -> dict:
    return {"b64": base64.b64encode(path.read_bytes()).decode()}


def test_fake_rest_columnar_inputs_match_row_instances(rest_server, images):
    url = f"{rest_server.url}/v1/models/{MODEL_NAME}:predict"
    files = [images / "red.jpg", images / "noise.png"]
    rows = _post(url, {"instances": [{"image_bytes": _b64(f)} for f in files]})["predictions"]
    named = _post(url, {"inputs": {"image_bytes": [_b64(f) for f in files]}})
    bare = _post(url, {"signature_name": "serving_default", "inputs": [_b64(f) for f in files]})
    for body in (named, bare):
        outputs = body["outputs"]  # several outputs: an object of whole tensors
        assert set(body) == {"outputs"} and set(outputs) == set(rows[0])
        for key in outputs:
            assert outputs[key] == [row[key] for row in rows]
    pixels = np.zeros((2, 9, 7, 3)).tolist()
    columns = _post(url, {"signature_name": "predict_images", "inputs": {"images": pixels}})
    assert np.asarray(columns["outputs"]["probabilities"]).shape == (2, len(LABELS))
    with pytest.raises(urllib.error.HTTPError) as err:  # both forms at once: TF Serving's 400
        _post(url, {"instances": [_b64(files[0])], "inputs": [_b64(files[0])]})
    assert err.value.code == 400 and "error" in json.loads(err.value.read())


def test_fake_rest_bare_value_instances_for_a_one_input_text_model(text_export):
    with FakeRestServer(FakeModelStore("reviews", text_export)) as server:
        url = f"{server.url}/v1/models/reviews:predict"
        bare = _post(url, {"instances": ["a great film", "dull"]})["predictions"]
        named = _post(url, {"instances": [{"text": "a great film"}, {"text": "dull"}]})
        columnar = _post(url, {"inputs": ["a great film", "dull"]})["outputs"]
    assert bare == named["predictions"] and len(bare) == 2
    assert columnar["top_k_names"] == [row["top_k_names"] for row in bare]


def test_fake_rest_model_status_route(rest_server):
    status = _get(f"{rest_server.url}/v1/models/{MODEL_NAME}")
    available = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    # TF Serving's JSON of GetModelStatusResponse: int64 versions as strings, all versions.
    assert status == {
        "model_version_status": [
            {"version": "2", **available},
            {"version": "1", **available},
        ]
    }
    one = _get(f"{rest_server.url}/v1/models/{MODEL_NAME}/versions/1")
    assert one == {"model_version_status": [{"version": "1", **available}]}
    labelled = _get(f"{rest_server.url}/v1/models/{MODEL_NAME}/labels/stable")
    assert labelled["model_version_status"][0]["version"] == "1"
    for path in ("/v1/models/nope", f"/v1/models/{MODEL_NAME}/versions/7"):
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(rest_server.url + path)
        assert err.value.code == 404
        assert "Servable not found" in json.loads(err.value.read())["error"]


def _doc_curl_commands() -> list[str]:
    """Every curl example of README.md and docs/serving.md, as the shell would run it."""
    commands = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "serving.md"):
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            if "curl" in block:  # the block's variable lines too (IMG=$(base64 ...))
                lines = [
                    line
                    for line in block.splitlines()
                    if not line.startswith(("scripts/", "docker ", "tf-finetune "))
                ]
                commands.append("\n".join(lines))
        commands += re.findall(r"`(curl [^`]*)`", text)
    return commands


def test_readme_and_docs_curl_examples_run_against_the_double(export, text_export, tmp_path):
    commands = _doc_curl_commands()
    assert len(commands) >= 3, commands
    (tmp_path / "photos").mkdir()
    blob = _encode(Image.fromarray(np.full((20, 30, 3), 200, np.uint8)), "JPEG")
    for name in ("cat.jpg", "photos/rose.jpg", "photos/daisy.png", "rose.jpg"):
        (tmp_path / name).write_bytes(blob)
    ran = set()
    for command in commands:
        name = re.search(r"/v1/models/(\w+)", command).group(1)
        base = text_export if name == "reviews" else export["base"]
        with FakeRestServer(FakeModelStore(name, base)) as server:
            host = server.url.removeprefix("http://")
            script = re.sub(r"(http://)?localhost:8501", f"http://{host}", command)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 0, (command, done.stderr)
        answer = json.loads(done.stdout)
        if ":predict" in command:
            (prediction,) = answer["predictions"]
            assert set(prediction) == {
                "probabilities",
                "top_k_indices",
                "top_k_names",
                "top_k_scores",
            }
        else:  # the status route
            assert answer["model_version_status"][0]["state"] == "AVAILABLE"
        ran.add(name)
    assert {"reviews", "photos", "flowers"} <= ran
