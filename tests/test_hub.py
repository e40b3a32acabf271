"""HubLayer and friends, offline: every module is a tiny SavedModel built in a tmp dir."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import types
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import hub_fixtures as fx
from tests.helpers import run_python
from tf_finetune import hub
from tf_finetune.errors import UserError
from tf_finetune.hub import HubLayer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOBILENET_URL = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
MOBILENET_KAGGLE = "google/mobilenet-v2/tensorFlow2/100-224-feature-vector/5"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_modules")
    return {
        "vector": fx.save_feature_vector_module(root / "vector"),
        "logits": fx.save_feature_vector_module(root / "logits", output="logits"),
        "dict": fx.save_feature_vector_module(root / "dict", output="dict"),
        "dynamic": fx.save_feature_vector_module(root / "dynamic", image_size=None),
        "no_l2": fx.save_feature_vector_module(root / "no_l2", l2=0.0),
        "bn": fx.save_batchnorm_module(root / "bn"),
        "text": fx.save_text_module(root / "text"),
        "signature": fx.save_signature_only_module(root / "signature"),
    }


def _images(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3), dtype=np.float32)


def _labels(n=32, seed=0):
    return np.random.default_rng(seed + 1).integers(0, 2, n)


# Keras refuses numpy "<U..." arrays; object arrays (or tf tensors, tf.data) work.
SENTENCES = np.array(
    ["the cat sat on the mat", "dog ran fast", "zebra", "", "The Dog sat"] * 4, dtype=object
)
TEXT_LABELS = np.array([1.0, 0.0, 1.0, 0.0, 1.0] * 4, dtype="float32")


def _image_model(layer):
    inputs = keras.Input((fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3))
    outputs = keras.layers.Dense(2, name="head")(layer(inputs))
    return keras.Model(inputs, outputs)


def _compile(model, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _values(layer):
    return {w.name: w.numpy().copy() for w in layer.weights}


def _changed(before, after):
    return {k for k in before if np.max(np.abs(before[k] - after[k])) > 1e-7}


# --------------------------------------------------------------------------- handles


@pytest.mark.parametrize(
    "name",
    [
        MOBILENET_URL,
        "https://tfhub.dev/google/nnlm-en-dim50/2",
        "https://www.kaggle.com/models/google/mobilenet-v2/TensorFlow2/100-224-feature-vector/2",
        "https://www.kaggle.com/models/google/mobilenet-v2/frameworks/tensorFlow2/"
        "variations/100-224-feature-vector/versions/2",
        "gs://my-bucket/modules/mobilenet",
    ],
)
def test_is_hub_handle_accepts_hub_urls(name):
    assert hub.is_hub_handle(name)


@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v2",
        "efficientnet_b0",
        "https://example.com/model.tar.gz",
        "https://www.kaggle.com/datasets/foo/bar",
        "https://tfhub.dev/",
        "gs://",
        "/definitely/not/here",
        None,
    ],
)
def test_is_hub_handle_rejects_other_names(name):
    assert not hub.is_hub_handle(name)


def test_is_hub_handle_local_dir_needs_saved_model(modules, tmp_path):
    assert hub.is_hub_handle(modules["vector"])
    (tmp_path / "empty").mkdir()
    assert not hub.is_hub_handle(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("url", "kaggle"),
    [
        (MOBILENET_URL, MOBILENET_KAGGLE),
        (MOBILENET_URL + "?tf-hub-format=compressed", MOBILENET_KAGGLE),
        (
            "https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5",
            "google/resnet-v2/tensorFlow2/50-feature-vector/5",
        ),
        (
            "https://tfhub.dev/google/imagenet/efficientnet_v2_imagenet1k_b0/feature_vector/2",
            "google/efficientnet-v2/tensorFlow2/imagenet1k-b0-feature-vector/2",
        ),
        (
            "https://tfhub.dev/google/imagenet/mobilenet_v1_100_224/classification/5",
            "google/mobilenet-v1/tensorFlow2/100-224-classification/5",
        ),
        (
            "https://tfhub.dev/google/imagenet/inception_resnet_v2/feature_vector/5",
            "google/inception-resnet-v2/tensorFlow2/feature-vector/5",
        ),
        (
            "https://tfhub.dev/google/movenet/singlepose/lightning/4",
            "google/movenet/tensorFlow2/singlepose-lightning/4",
        ),
        (
            "https://tfhub.dev/tensorflow/efficientnet/b0/feature-vector/1",
            "tensorflow/efficientnet/tensorFlow2/b0-feature-vector/1",
        ),
        ("https://tfhub.dev/google/yamnet/1", "google/yamnet/tensorFlow2/yamnet/1"),
    ],
)
def test_tfhub_to_kaggle_handle(url, kaggle):
    assert hub.tfhub_to_kaggle_handle(url) == kaggle


def test_tfhub_to_kaggle_handle_ignores_other_urls():
    assert hub.tfhub_to_kaggle_handle("https://example.com/google/imagenet/x/1") is None
    assert hub.tfhub_to_kaggle_handle("/local/dir") is None


@pytest.mark.parametrize(
    "url",
    [
        "https://www.kaggle.com/models/google/mobilenet-v2/TensorFlow2/100-224-feature-vector/5",
        "https://www.kaggle.com/models/google/mobilenet-v2/frameworks/TensorFlow2/"
        "variations/100-224-feature-vector/versions/5",
    ],
)
def test_kaggle_url_to_handle_both_forms(url):
    # Normalised: Kaggle paths are case-sensitive, both forms must share one cache folder.
    assert hub.kaggle_url_to_handle(url) == (
        "google/mobilenet-v2/tensorFlow2/100-224-feature-vector/5"
    )


# --------------------------------------------------------------------------- loading


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Point TFHUB_CACHE_DIR at a tmp dir and make every urlopen fail like `error`."""
    cache = tmp_path / "hub_cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    state = {"error": urllib.error.URLError("[Errno -3] Temporary failure in name resolution")}
    calls = []

    def fake_urlopen(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise state["error"]

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return types.SimpleNamespace(cache=str(cache), state=state, calls=calls)


def _http_error(code):
    return urllib.error.HTTPError(MOBILENET_URL, code, "refused", {}, None)


def test_load_module_offline_names_cache_dir(offline):
    with pytest.raises(UserError) as info:
        hub.load_module(MOBILENET_URL)
    message = str(info.value)
    assert offline.calls, "the real tensorflow_hub resolver should have tried to download"
    assert offline.cache in message
    assert "TFHUB_CACHE_DIR" in message
    assert "saved_model.pb" in message and "local directory" in message
    assert "\n" not in message


def test_load_module_offline_default_cache_dir(offline, monkeypatch, tmp_path):
    monkeypatch.delenv("TFHUB_CACHE_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # hub's default: <tmp>/tfhub_modules
    default = os.path.join(str(tmp_path), "tfhub_modules")
    assert hub.hub_cache_dir() == default
    with pytest.raises(UserError) as info:
        hub.load_module("https://tfhub.dev/google/nonexistent/feature_vector/1")
    assert default in str(info.value)


def test_load_module_404_is_user_error(offline):
    offline.state["error"] = _http_error(404)
    with pytest.raises(UserError, match=r"HTTP 404.*" + ".*".join(["cached in", "hub_cache"])):
        hub.load_module("https://tfhub.dev/google/no-such-module/1")


def _fake_kagglehub(monkeypatch, result):
    calls = []

    def model_download(handle):
        calls.append(handle)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setitem(
        sys.modules, "kagglehub", types.SimpleNamespace(model_download=model_download)
    )
    return calls


def test_403_falls_back_to_kagglehub(offline, monkeypatch, modules, caplog):
    offline.state["error"] = _http_error(403)
    calls = _fake_kagglehub(monkeypatch, modules["vector"])
    with caplog.at_level(logging.WARNING):
        module = hub.load_module(MOBILENET_URL)
    assert calls == [MOBILENET_KAGGLE]
    assert "kagglehub" in caplog.text and "hub#932" in caplog.text
    assert module(_images(2)).shape == (2, fx.FEATURE_DIM)


def test_403_kagglehub_retries_latest_version(offline, monkeypatch):
    offline.state["error"] = _http_error(403)
    calls = _fake_kagglehub(monkeypatch, RuntimeError("404 version not found"))
    with pytest.raises(UserError, match="kagglehub could not download") as info:
        hub.load_module(MOBILENET_URL)
    assert calls == [MOBILENET_KAGGLE, MOBILENET_KAGGLE.rsplit("/", 1)[0]]
    assert "pip install" not in str(info.value)


def test_403_without_kagglehub_says_what_to_do(offline, monkeypatch):
    offline.state["error"] = _http_error(403)
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import kagglehub -> ImportError
    with pytest.raises(UserError) as info:
        hub.load_module(MOBILENET_URL)
    assert "pip install kagglehub" in str(info.value)
    assert offline.cache in str(info.value)


def test_load_module_missing_local_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="does not exist.*" + str(tmp_path / "cache")):
        hub.load_module(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no saved_model.pb"):
        hub.load_module(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- inspection


def test_module_introspection(modules):
    assert hub.module_image_size(modules["vector"]) == fx.IMAGE_SIZE
    assert hub.module_image_size(hub.load_module(modules["bn"])) == fx.IMAGE_SIZE
    assert hub.module_image_size(modules["dynamic"]) is None
    assert hub.module_image_size(modules["text"]) is None
    assert hub.module_output_rank(modules["vector"]) == 2
    assert hub.module_output_shape(modules["logits"]) == (None, 5)
    assert hub.module_output_shape(modules["dict"]) == (None, fx.FEATURE_DIM)
    assert hub.module_output_rank(modules["dict"], output_key="sequence_output") == 4
    spec = hub.module_input_spec(modules["text"])
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    assert hub.module_kind(MOBILENET_URL) == "feature_vector"
    assert hub.module_kind(MOBILENET_URL.replace("feature_vector", "classification")) == (
        "classification"
    )
    assert hub.module_kind(modules["vector"]) == "unknown"


def test_output_key_selection(modules):
    x = _images(3)
    pooled = HubLayer(modules["dict"])(x).numpy()
    default = HubLayer(modules["dict"], output_key="default")(x).numpy()
    np.testing.assert_allclose(default, 2.0 * pooled, rtol=1e-6)
    with pytest.raises(UserError, match="no output 'bogus'"):
        HubLayer(modules["dict"], output_key="bogus")(x)


def test_signature_module(modules):
    layer = HubLayer(modules["signature"], signature="serving_default", output_key="features")
    out = layer(_images(2))
    assert out.shape == (2, 4)
    assert [w.name for w in layer.weights] == ["w"]
    with pytest.raises(UserError, match="cannot be fine-tuned"):
        HubLayer(modules["signature"], signature="serving_default", trainable=True)
    with pytest.raises(UserError, match="not callable"):
        HubLayer(modules["signature"])


def test_integer_images_are_refused(modules):
    layer = HubLayer(modules["vector"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        layer(np.zeros((1, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3), dtype="uint8"))
    # float64 is cast to the module's float32
    assert layer(_images(1).astype("float64")).dtype == tf.float32


def test_wrong_image_size_is_user_error_at_model_build(modules):
    layer = HubLayer(modules["vector"])
    with pytest.raises(UserError, match="resize images to 16x16"):
        layer(keras.Input((32, 32, 3)))
    # a module with a dynamic size takes any size
    assert HubLayer(modules["dynamic"])(np.zeros((1, 24, 24, 3), "float32")).shape == (1, 8)


def test_mixed_precision_policy(modules):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = HubLayer(modules["bn"], trainable=True)
        model = _compile(_image_model(layer))
        assert layer.compute_dtype == "float32"
        before = _values(layer)
        model.fit(_images(16), _labels(16), epochs=1, batch_size=8, verbose=0)
        assert "conv_kernel" in _changed(before, _values(layer))
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- training


def test_weights_are_the_module_variables_with_clean_names(modules):
    layer = HubLayer(modules["bn"], trainable=True, name="backbone")
    module_vars = {id(v) for v in layer.module.variables}
    assert {id(w.value) for w in layer.weights} == module_vars  # wrapped, not copied
    assert [w.path for w in layer.trainable_weights] == [
        "backbone/conv_kernel",
        "backbone/bn_gamma",
        "backbone/bn_beta",
    ]
    assert sorted(w.name for w in layer.non_trainable_weights) == [
        "bn_moving_mean",
        "bn_moving_variance",
    ]
    assert all(":" not in w.path for w in layer.weights)


def test_frozen_layer_does_not_change_in_fit(modules):
    layer = HubLayer(modules["bn"])  # frozen by default
    model = _compile(_image_model(layer))
    assert layer.trainable_weights == []
    assert {w.path for w in model.trainable_weights} == {"head/kernel", "head/bias"}
    head = model.get_layer("head").kernel.numpy().copy()
    before = _values(layer)
    model.fit(_images(), _labels(), epochs=2, batch_size=8, verbose=0)
    assert _changed(before, _values(layer)) == set()  # moving stats included
    assert not np.allclose(head, model.get_layer("head").kernel.numpy())
    assert model.losses == []


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.Adam(0.01),
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd"],
)
def test_finetune_changes_weights(modules, make_optimizer):
    layer = HubLayer(modules["bn"], trainable=True)
    model = _compile(_image_model(layer), make_optimizer())
    before = _values(layer)
    model.fit(_images(), _labels(), epochs=1, batch_size=8, verbose=0)
    after = _values(layer)
    # trainable variables got gradients, moving stats got training-mode updates
    assert _changed(before, after) == set(before)
    trainable_paths = {w.path for w in model.trainable_weights}
    assert not any("moving" in p for p in trainable_paths)
    assert {f"{layer.name}/conv_kernel", f"{layer.name}/bn_gamma"} <= trainable_paths


def test_unfreezing_never_makes_moving_stats_trainable(modules):
    layer = HubLayer(modules["bn"], trainable=False)
    assert layer.trainable_weights == []
    layer.trainable = True
    assert sorted(w.name for w in layer.trainable_weights) == ["bn_beta", "bn_gamma", "conv_kernel"]
    assert not any(w.trainable for w in layer.non_trainable_weights)


def test_inference_does_not_update_moving_stats(modules):
    layer = HubLayer(modules["bn"], trainable=True)
    model = _image_model(layer)
    before = _values(layer)
    model.predict(_images(), verbose=0)
    layer(_images(4), training=False)
    assert _changed(before, _values(layer)) == set()
    layer(_images(4), training=True)
    assert _changed(before, _values(layer)) == {"bn_moving_mean", "bn_moving_variance"}


def test_regularization_losses_reach_fit(modules):
    x, y = _images(8), _labels(8)
    layer = HubLayer(modules["vector"], trainable=True)
    model = _compile(_image_model(layer), keras.optimizers.SGD(0.0))  # lr 0: weights fixed
    model(x[:1])
    kernel = layer.module.variables[0].numpy()
    expected = 0.01 * np.sum(kernel**2)
    assert expected > 1e-3
    assert len(model.losses) == 1
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-5)

    data_loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x)))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], data_loss + expected, rtol=1e-4)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), data_loss + expected, rtol=1e-4)

    frozen = _compile(_image_model(HubLayer(modules["vector"])))
    frozen(x[:1])
    assert frozen.losses == []


def test_regularization_pulls_weights_down(modules):
    """Same data and seed: with the L2 term the kernel ends smaller than without."""
    norms = {}
    for key in ("vector", "no_l2"):
        keras.utils.set_random_seed(0)
        layer = HubLayer(modules[key], trainable=True)
        model = _compile(_image_model(layer), keras.optimizers.SGD(0.5))
        model.fit(_images(), _labels(), epochs=3, batch_size=32, verbose=0, shuffle=False)
        norms[key] = float(np.sum(layer.module.variables[0].numpy() ** 2))
    assert norms["vector"] < norms["no_l2"] - 1e-3


def test_text_module_finetunes_on_strings(modules):
    layer = HubLayer(modules["text"], trainable=True)
    inputs = keras.Input((), dtype="string")
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(keras.optimizers.Adam(0.05), "mse")
    before = _values(layer)
    pred_before = model.predict(SENTENCES, verbose=0)
    model.fit(SENTENCES, TEXT_LABELS, epochs=3, batch_size=5, verbose=0)
    assert _changed(before, _values(layer)) == {"embeddings"}
    assert not np.allclose(pred_before, model.predict(SENTENCES, verbose=0))
    assert layer(tf.constant(["cat", "unknown words here"])).shape == (2, fx.TEXT_DIM)


# --------------------------------------------------------------------------- saving


def test_save_weights_roundtrip_into_fresh_model(modules, tmp_path):
    model = _compile(_image_model(HubLayer(modules["bn"], trainable=True)))
    model.fit(_images(), _labels(), epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "tuned.weights.h5")
    model.save_weights(path)

    fresh_layer = HubLayer(modules["bn"], trainable=True)  # handle -> fresh copy
    fresh = _image_model(fresh_layer)
    tuned = _values(model.layers[1])
    assert _changed(tuned, _values(fresh_layer)) == set(tuned)  # really different before
    fresh.load_weights(path)
    assert _changed(tuned, _values(fresh_layer)) == set()
    x = _images(4, seed=5)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.slow
def test_keras_file_roundtrip(modules, tmp_path):
    model = _compile(_image_model(HubLayer(modules["vector"], trainable=True)))
    model.fit(_images(), _labels(), epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = _images(4, seed=6)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_backup_and_restore_resumes(modules, tmp_path):
    backup_dir = str(tmp_path / "backup")
    x, y = _images(), _labels()

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("preempted")

    layer = HubLayer(modules["bn"], trainable=True)
    model = _compile(_image_model(layer))
    with pytest.raises(RuntimeError, match="preempted"):
        model.fit(
            x,
            y,
            epochs=4,
            batch_size=8,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup_dir), Interrupt()],
        )
    at_interrupt = _values(layer)

    class Record(keras.callbacks.Callback):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.epochs, self.start = layer, [], None

        def on_train_begin(self, logs=None):
            self.start = _values(self.layer)

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append(epoch)

    resumed_layer = HubLayer(modules["bn"], trainable=True)
    resumed = _compile(_image_model(resumed_layer))
    record = Record(resumed_layer)
    resumed.fit(
        x,
        y,
        epochs=4,
        batch_size=8,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir), record],
    )
    assert record.epochs == [2, 3]
    assert _changed(at_interrupt, record.start) == set()
    assert resumed.optimizer.iterations.numpy() == 4 * 4  # 2 restored + 2 new epochs


EXPORT_CHECK = """
    import json, sys
    import numpy as np
    import tensorflow as tf
    out = {}
    for name, path, x in json.loads(sys.argv[1]):
        x = np.array(x, dtype=object if name == "text" else np.float32)
        loaded = tf.saved_model.load(path)
        out[name] = loaded.serve(tf.constant(x)).numpy().tolist()
    print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_export_archive_is_self_contained(modules, tmp_path):
    jobs, expected = [], {}

    # image module with moving stats, fine-tuned
    bn_dir = shutil.copytree(modules["bn"], tmp_path / "bn_module")
    image_model = _compile(_image_model(HubLayer(str(bn_dir), trainable=True)))
    image_model.fit(_images(), _labels(), epochs=2, batch_size=8, verbose=0)
    assert any(_changed(_values(HubLayer(modules["bn"])), _values(image_model.layers[1])))

    # text module (lookup table + vocabulary asset), fine-tuned
    text_dir = shutil.copytree(modules["text"], tmp_path / "text_module")
    text_layer = HubLayer(str(text_dir), trainable=True)
    inputs = keras.Input((), dtype="string")
    text_model = keras.Model(inputs, keras.layers.Dense(1)(text_layer(inputs)))
    text_model.compile(keras.optimizers.Adam(0.05), "mse")
    text_model.fit(SENTENCES, TEXT_LABELS, epochs=2, batch_size=5, verbose=0)

    for name, model, x, spec in [
        ("image", image_model, _images(5, seed=9), tf.TensorSpec([None, 16, 16, 3], tf.float32)),
        ("text", text_model, SENTENCES[:5], tf.TensorSpec([None], tf.string)),
    ]:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", model.call, input_signature=[spec])
        out_dir = str(tmp_path / f"export_{name}")
        archive.write_out(out_dir, verbose=False)
        expected[name] = model.predict(x if name == "image" else tf.constant(x), verbose=0)
        jobs.append([name, out_dir, x.tolist()])

    shutil.rmtree(bn_dir)
    shutil.rmtree(text_dir)
    result = run_python(EXPORT_CHECK, json.dumps(jobs), cwd=tmp_path, import_ours=True)
    for name, want in expected.items():
        got = np.array(result[name])
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) < 1e-5, name


# --------------------------------------------------------------------------- distribution

MIRRORED = """
    import json, sys
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from tf_finetune.hub import HubLayer, load_module

    handle = sys.argv[1]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.random((32, 16, 16, 3), dtype=np.float32)
    y = rng.integers(0, 2, 32)
    out = {"replicas": strategy.num_replicas_in_sync}
    for trainable in (False, True):
        with strategy.scope():
            layer = HubLayer(handle, trainable=trainable)
            inputs = keras.Input((16, 16, 3))
            model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
            model.compile(
                keras.optimizers.Adam(0.01),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        before = {w.name: w.numpy().copy() for w in layer.weights}
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        changed = sorted(
            w.name for w in layer.weights if np.max(np.abs(w.numpy() - before[w.name])) > 1e-7
        )
        kernel = layer.module.variables[0]
        wrapped = [w.value is v for w, v in zip(layer.weights, layer.module.variables)]
        replicas_equal = all(
            np.array_equal(v.numpy(), kernel.values[0].numpy()) for v in kernel.values
        )
        out[str(trainable)] = {
            "changed": changed,
            "kernel_type": type(kernel).__name__,
            "replicas_in_sync": bool(replicas_equal),
            "wrapped": all(wrapped) and len(wrapped) == 5,
            "trainable": sorted(w.name for w in layer.trainable_weights),
            "finite": bool(np.isfinite(model.predict(x[:4], verbose=0)).all()),
        }
    outside = load_module(handle)
    try:
        with strategy.scope():
            HubLayer(outside)
        out["outside_scope_error"] = None
    except ValueError as error:
        out["outside_scope_error"] = str(error)
    print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_mirrored_strategy_two_replicas(modules):
    out = run_python(MIRRORED, modules["bn"], cwd=REPO, import_ours=True)
    assert out["replicas"] == 2
    frozen, tuned = out["False"], out["True"]
    assert frozen["kernel_type"] == tuned["kernel_type"] == "MirroredVariable"
    assert frozen["changed"] == [] and frozen["trainable"] == []
    assert tuned["changed"] == sorted(
        ["conv_kernel", "bn_gamma", "bn_beta", "bn_moving_mean", "bn_moving_variance"]
    )
    assert tuned["trainable"] == ["bn_beta", "bn_gamma", "conv_kernel"]
    assert tuned["replicas_in_sync"] and frozen["finite"] and tuned["finite"]
    assert frozen["wrapped"] and tuned["wrapped"]
    assert "strategy.scope()" in out["outside_scope_error"]
