"""keras-hub presets as backbones (`--backbone=keras_hub:PRESET`), offline.

The presets are tiny keras-hub models built from config and written with `save_to_preset`
(tests/keras_hub_fixtures.py): a ResNet with BatchNorm and its image converter, a ViT (fixed
input size), a 2-layer BERT with its WordPiece preprocessor.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import keras_hub_fixtures as fx
from tests.helpers import Crash as _Crash  # a kill after epoch 0
from tests.helpers import Epochs as _Epochs  # the epochs run
from tests.images import class_image, encode, write_class_folders
from tf_finetune import backbone_table, cli, data, evaluate_run, export_run, keras_hub_model, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.errors import UserError
from tf_finetune.keras_hub_table import PRESETS
from tf_finetune.resolve import resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras_hub_presets")
    return {
        "image": fx.save_image_preset(root / "image"),
        "vit": fx.save_vit_preset(root / "vit"),
        "text": fx.save_text_preset(root / "text"),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 3 x 12 images: 28 train / 8 val (28 % 8 = 4 >= 2 replicas).
    return write_class_folders(tmp_path_factory.mktemp("photos"), num_classes=3, per_class=12)


CAT = ["the cat sat on the mat", "the cat sat", "cat on the mat", "the mat cat"]
DOG = ["dog ran fast", "the dog ran", "fast dog", "dog ran on"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rows = ["text,label"]
    for i in range(20):
        rows += [f"{CAT[i % 4]} {'the ' * (i % 3)}".strip() + ",cat"]
        rows += [f"{DOG[i % 4]} {'fast ' * (i % 3)}".strip() + ",dog"]
    path = tmp_path_factory.mktemp("texts") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def own(preset, tmp_path) -> str:
    """A copy of a preset this test may delete."""
    return shutil.copytree(preset, tmp_path / "preset")


def config_for(model_dir, **overrides) -> Config:
    values = dict(epochs=2, batch_size=8, learning_rate=0.05, dropout=0.0, model_dir=str(model_dir))
    values.update(overrides)
    return resolve(Config(**values), frozenset(values))


def _changed_layers(before: dict, after: dict) -> set[str]:
    return {
        name
        for name in before
        if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))
    }


def _batchnorm_layers(backbone) -> set[str]:
    return {
        layer.name
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


# ----------------------------------------------------------------------------- names, config
def test_keras_hub_values_are_not_hub_modules(presets):
    for value in (f"keras_hub:{presets['image']}", "keras_hub:resnet_50_imagenet"):
        assert not backbone_table.is_hub_backbone(value)
    # A bare preset folder is recognised as one too (the order: before SavedModels).
    assert backbone_table.backbone_kind(presets["image"]) == backbone_table.KERAS_HUB
    assert not backbone_table.is_hub_backbone(presets["image"])
    assert {p.kind for p in PRESETS.values()} == {"image", "text"}


def test_the_static_table_matches_keras_hub_and_is_listed(capsys):
    keras_hub = keras_hub_model.import_keras_hub()
    # keras_hub.src: the name -> handle registry (as keras_hub_model reads it).
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    for name, preset in PRESETS.items():
        assert BUILTIN_PRESETS[name]["kaggle_handle"] == f"kaggle://{preset.kaggle_handle}"
        task = keras_hub.models.ImageClassifier if preset.kind == "image" else None
        task = task or keras_hub.models.TextClassifier
        assert name in task.presets, name
    assert cli.main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "keras_hub:NAME" in out and "vit_base_patch16_224_imagenet" in out
    assert "224 only" in out and "bert_base_en_uncased" in out


@pytest.mark.parametrize("family", ["efficientnet", "resnet_v2", "vit", "distil_bert"])
def test_every_listed_family_builds_unfreezes_and_predicts(family, tmp_path):
    preset = fx.save_family_preset(tmp_path / family, family)
    text = family == "distil_bert"
    config = Config(
        backbone=f"keras_hub:{preset}", image_size=0 if text else 32, model_dir=str(tmp_path)
    )
    model = keras_hub_model.build_classifier(config, 3)
    assert model_lib.unfreeze(model, None)
    backbone = model_lib.get_backbone(model)
    assert not {w.path for w in model.trainable_weights} & {
        w.path for layer in _batchnorm_layers(backbone) for w in backbone.get_layer(layer).weights
    }
    inputs = tf.constant(["the cat sat", "a dog"]) if text else np.full((2, 32, 32, 3), 128.0)
    probabilities = model.predict(inputs, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_image_size_comes_from_the_converter(presets, folder, tmp_path):
    image = f"keras_hub:{presets['image']}"
    config = config_for(tmp_path, backbone=image, data=str(folder))
    assert config.image_size == fx.IMAGE_SIZE
    assert config_for(tmp_path, backbone=image, data=str(folder), image_size=40).image_size == 40
    vit = f"keras_hub:{presets['vit']}"
    assert config_for(tmp_path, backbone=vit, data=str(folder)).image_size == fx.IMAGE_SIZE
    with pytest.raises(UserError, match=r"takes only 32x32 images .* use --image_size=32"):
        config_for(tmp_path, backbone=vit, data=str(folder), image_size=40)


def test_text_preset_resolves_to_a_text_model(presets, table, folder, tmp_path):
    text = f"keras_hub:{presets['text']}"
    config = config_for(tmp_path, backbone=text, data=str(table))
    assert config.image_size == 0 and keras_hub_model.is_text_model(config)
    with pytest.raises(UserError, match="--image_size does not apply"):
        config_for(tmp_path, backbone=text, data=str(table), image_size=32)
    with pytest.raises(UserError, match="holds images"):
        config_for(tmp_path, backbone=text, data=str(folder))
    with pytest.raises(UserError, match="--format=tflite: .* use saved_model"):
        config_for(tmp_path, backbone=text, data=str(table), format="tflite")
    with pytest.raises(UserError, match="--format=keras: .* use saved_model"):
        config_for(tmp_path, backbone=text, data=str(table), format="keras")


@pytest.mark.parametrize(
    "backbone, overrides, message",
    [
        ("keras_hub:/no/such/preset", {}, "keras-hub preset folder /no/such/preset does not"),
        ("keras_hub:resnet_50_imagenett", {}, "unknown keras-hub preset.*resnet_50_imagenet"),
        ("keras_hub:hf://x/y", {}, "only keras-hub presets from Kaggle"),
        ("IMAGE", {"weights": "FILE"}, "brings its own weights"),
        ("IMAGE", {"preprocessor": "x"}, "a keras-hub preset brings its own"),
    ],
)
def test_flag_mistakes_are_one_line(presets, tmp_path, backbone, overrides, message):
    backbone = backbone.replace("IMAGE", f"keras_hub:{presets['image']}")
    if overrides.get("weights") == "FILE":
        (tmp_path / "w.weights.h5").write_bytes(b"")
        overrides = {"weights": str(tmp_path / "w.weights.h5")}
    with pytest.raises(UserError, match=message):
        config_for(tmp_path, backbone=backbone, **overrides)


def test_a_preset_name_resolves_offline_from_the_kagglehub_cache(
    presets, folder, tmp_path, monkeypatch
):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    name = "resnet_18_imagenet"
    with pytest.raises(UserError, match="cannot download Kaggle model.*KAGGLEHUB_CACHE"):
        _offline(monkeypatch)
        config_for(tmp_path, backbone=f"keras_hub:{name}", data=str(folder))
    cached = fx.place_in_kaggle_cache(
        tmp_path / "kaggle", PRESETS[name].kaggle_handle, presets["image"]
    )
    config = config_for(tmp_path / "run", backbone=f"keras_hub:{name}", data=str(folder))
    assert config.image_size == fx.IMAGE_SIZE
    # A finished run reads its own copy once the cache is gone: no download for evaluate.
    keras_hub_model.keep_in_run_dir(str(cached), config)
    assert not (tmp_path / "run" / "keras_hub_preset" / "model.weights.h5").exists()
    shutil.rmtree(tmp_path / "kaggle")
    again = config_for(tmp_path / "run", backbone=f"keras_hub:{name}", data=str(folder))
    assert again.image_size == fx.IMAGE_SIZE


def _offline(monkeypatch):
    import kagglehub

    def offline(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(kagglehub, "model_download", offline)


# ----------------------------------------------------------------------------- images
@pytest.mark.slow
def test_frozen_preset_caches_features_under_two_replicas(presets, folder, tmp_path):
    preset = own(presets["image"], tmp_path)
    config = config_for(
        tmp_path / "run", backbone=f"keras_hub:{preset}", data=str(folder), cpu_replicas=2
    )
    metrics = train.train_and_evaluate(config)
    assert metrics["replicas"] == 2
    assert "features" in metrics["timings"]  # the head trained on cached features
    assert metrics["val_accuracy"] > 0.6  # three solid colours
    expected = fx.preset_layer_weights(preset)
    shutil.rmtree(preset)  # evaluate and export must not need the preset any more
    model = model_lib.restore_trained(config, 3)
    assert _changed_layers(expected, fx.layer_weights(model_lib.get_backbone(model))) == set()
    report = evaluate_run.evaluate_run(config, "val")
    assert report["num_examples"] == metrics["val_images"]
    _check_served_images(metrics["export_path"], model)


@pytest.mark.slow
def test_finetuned_preset_moves_all_but_batchnorm(presets, folder, tmp_path):
    preset = own(presets["image"], tmp_path)
    config = config_for(
        tmp_path / "run",
        backbone=f"keras_hub:{preset}",
        data=str(folder),
        unfreeze="all",
        image_size=36,  # not the converter's 32: the one resize is the pipeline's
    )
    metrics = train.train_and_evaluate(config)
    assert "features" not in metrics["timings"]
    expected = fx.preset_layer_weights(preset)
    shutil.rmtree(preset)
    model = model_lib.restore_trained(config, 3)
    backbone = model_lib.get_backbone(model)
    changed = _changed_layers(expected, fx.layer_weights(backbone))
    weighted = {layer.name for layer in backbone.layers if layer.weights}
    assert changed == weighted - _batchnorm_layers(backbone)
    assert _batchnorm_layers(backbone) and model.input_shape == (None, 36, 36, 3)
    _check_served_images(metrics["export_path"], model)
    result = export_run.export_run(
        dataclasses.replace(config, format="tflite", export_dir=str(tmp_path / "tfl"))
    )
    assert result["rows"][0][0] == "float32" and result["rows"][0][1] > 0


class _Block(keras.layers.Layer):
    """A composite layer holding BatchNorm, as keras-hub's EfficientNetV2 MBConv blocks do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)


def test_unfreeze_keeps_batchnorm_inside_composite_layers_frozen():
    pixels = keras.Input((8, 8, 3))
    backbone = keras.Model(pixels, _Block(name="block")(pixels), name="backbone")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(backbone(inputs)))
    assert model_lib.unfreeze(model, None) == ["block"]
    trainable = {w.path for w in model.trainable_weights}
    assert trainable and not any("batch_normalization" in path for path in trainable)


@pytest.mark.slow
def test_two_phase_run_resumes_with_the_preset(presets, folder, tmp_path):
    preset = own(presets["image"], tmp_path)
    config = config_for(
        tmp_path / "run",
        backbone=f"keras_hub:{preset}",
        data=str(folder),
        unfreeze="2",
        warmup_epochs=1,
        epochs=3,
        layer_lr_decay=0.8,
        head_solver="fit",  # a crash inside the head phase's epochs
    )
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(_Crash(),))
    epochs = _Epochs()
    metrics = train.train_and_evaluate(config, extra_callbacks=(epochs,))
    assert metrics["epochs"] == 3 and epochs.seen[-1] == 2


SERVE_IMAGES = r"""
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
blobs = [bytes.fromhex(h) for h in json.loads(sys.argv[2])]
out = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
print("RESULT " + json.dumps({"probabilities": out["probabilities"].numpy().tolist()}))
"""

SERVE_TEXT = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # the WordPiece tokenizer's ops (model_card.json's non_core_ops)
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["serving_default"](text=tf.constant(json.loads(sys.argv[2])))
print("RESULT " + json.dumps({"probabilities": out["probabilities"].numpy().tolist()}))
"""


def _serve(script, export, payload):
    """Runs `script` in a fresh interpreter (no tf_finetune, no keras_hub: TF Serving's view)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), export, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])["probabilities"]


def _check_served_images(export, model):
    size = model.input_shape[1]
    blobs = [encode(class_image(label, (30, 22), seed=7 + label), "PNG") for label in (0, 1, 2)]
    pixels = np.stack([data.decode_and_resize(tf.constant(b), size).numpy() for b in blobs])
    expected = model.predict(pixels.astype("float32"), verbose=0)
    served = _serve(SERVE_IMAGES, export, [b.hex() for b in blobs])
    np.testing.assert_allclose(served, expected, atol=1e-5)


# ----------------------------------------------------------------------------- text
def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tf_finetune", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
        cwd=REPO,
    )


@pytest.mark.slow
def test_cli_fine_tunes_a_text_preset_and_the_run_outlives_it(presets, table, tmp_path):
    preset = own(presets["text"], tmp_path)
    run = tmp_path / "run"
    done = _cli(
        "train",
        f"--backbone=keras_hub:{preset}",
        f"--data={table}",
        "--unfreeze=all",
        "--epochs=3",
        "--batch_size=8",
        "--learning_rate=0.01",
        "--dropout=0",
        "--cpu_replicas=2",  # strings through the preprocessor on 2 replicas
        f"--model_dir={run}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog"] and metrics["val_accuracy"] >= 0.75
    assert metrics["replicas"] == 2
    card = json.loads((pathlib.Path(metrics["export_path"]) / "model_card.json").read_text())
    assert card["non_core_ops"]  # WordPiece: TF Text ops, listed for TF Serving
    expected = fx.preset_layer_weights(preset)
    shutil.rmtree(preset)
    config = resolve(Config(backbone=f"keras_hub:{preset}", data=str(table), model_dir=str(run)))
    model = model_lib.restore_trained(config, 2)
    assert _changed_layers(expected, fx.layer_weights(model_lib.get_backbone(model)))
    texts = ["the cat sat on the mat", "dog ran fast", "a zebra"]
    served = _serve(SERVE_TEXT, metrics["export_path"], texts)
    np.testing.assert_allclose(served, model.predict(tf.constant(texts), verbose=0), atol=1e-5)
    assert np.argmax(served[0]) == 0 and np.argmax(served[1]) == 1
    evaluated = _cli("evaluate", f"--model_dir={run}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Traceback" not in evaluated.stderr
    (tmp_path / "review.txt").write_text("the cat sat on the mat")
    predicted = _cli("predict", f"--model={run}", str(tmp_path / "review.txt"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "cat" in predicted.stdout


def test_cli_missing_preset_is_one_line(tmp_path, capsys):
    code = cli.main(["train", "--backbone=keras_hub:/no/such/preset", f"--model_dir={tmp_path}"])
    _, err = capsys.readouterr()
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_disk_cache_key_follows_the_preset_files(presets, folder, tmp_path):
    from tf_finetune import feature_fit

    preset = own(presets["image"], tmp_path)
    config = config_for(tmp_path / "run", backbone=f"keras_hub:{preset}", data=str(folder))
    split = data.load_image_folder(str(folder), config.image_size, 20).train
    key = feature_fit.cache_key(config, split, "train")
    assert feature_fit.cache_key(config, split, "train") == key
    os.utime(os.path.join(preset, "config.json"), ns=(1, 1))  # the preset was replaced
    assert feature_fit.cache_key(config, split, "train") != key
