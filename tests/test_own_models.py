"""Your own models as the starting point (issue 13, item 4): a previous run, a .keras file,
a Keras model.export() folder; the run keeps a copy so it outlives its source."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.images import write_class_folders
from tf_finetune import backbone_table, cli, own_model, rundir
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.resolve import resolve

TINY = ["--image_size=16", "--batch_size=8", "--learning_rate=0.01", "--epochs=3"]


def _train(capsys, *flags) -> int:
    code = cli.main(["train", *TINY, *flags])
    capsys.readouterr()
    return code


def _renamed(root, names):
    """The class folders of `root` under other names (other classes for run B)."""
    for old, new in zip(sorted(os.listdir(root)), names, strict=True):
        os.rename(root / old, root / new)
    return root


@pytest.fixture(scope="module")
def data_a(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("a"), num_classes=3, per_class=12)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory):
    root = write_class_folders(tmp_path_factory.mktemp("b"), num_classes=4, per_class=10)
    return _renamed(root, ["red", "green", "blue", "yellow"])


@pytest.fixture(scope="module")
def run_a(data_a, tmp_path_factory):
    """Run A: digits_cnn from random weights, trained whole on 3 classes."""
    run = tmp_path_factory.mktemp("run_a")
    flags = [f"--data={data_a}", "--backbone=digits_cnn", "--weights=none", "--unfreeze=all"]
    assert cli.main(["train", *TINY, *flags, f"--model_dir={run}"]) == 0
    return run


def _restored(run) -> keras.Model:
    metrics = rundir.read_metrics(str(run))
    config = own_model.read_run_config(str(run))
    return model_lib.restore_trained(resolve(config), len(metrics["class_names"]))


def _backbone_weights(model) -> list[np.ndarray]:
    return [np.array(w) for w in model_lib.get_backbone(model).weights]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _flag(run, name) -> str:
    return getattr(own_model.read_run_config(str(run)), name)


def _in_export(arrays, run) -> bool:
    """Whether every array is one of the variables of the run's latest SavedModel export."""
    export_base = os.path.join(run, "export")
    saved = tf.saved_model.load(os.path.join(export_base, max(os.listdir(export_base), key=int)))
    exported = [v.numpy() for v in saved.variables]
    return all(any(np.array_equal(a, e) for e in exported if e.shape == a.shape) for a in arrays)


def _card(run) -> dict:
    export_base = os.path.join(run, "export")
    version = max(os.listdir(export_base), key=int)
    with open(os.path.join(export_base, version, "model_card.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- recognition
def test_backbone_kind_order(run_a, tmp_path):
    assert backbone_table.backbone_kind("keras_hub:resnet_18_imagenet") == "keras_hub"
    assert backbone_table.backbone_kind(str(run_a)) == "run"
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "config.json").write_text("{}")
    (preset / "metadata.json").write_text("{}")
    assert backbone_table.backbone_kind(str(preset)) == "keras_hub"
    assert backbone_table.backbone_kind("https://tfhub.dev/google/x/1") == "hub"
    assert backbone_table.backbone_kind("mobilenet_v2") == "applications"
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"")
    assert backbone_table.backbone_kind(str(keras_file)) == "keras_file"


def test_keras_export_is_told_from_a_hub_module(tmp_path):
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
    keras.Model(inputs, outputs).export(str(tmp_path / "exp"), verbose=False)
    assert backbone_table.backbone_kind(str(tmp_path / "exp")) == "keras_export"
    from tests import hub_fixtures

    hub_fixtures.save_feature_vector_module(str(tmp_path / "hub"))
    assert backbone_table.backbone_kind(str(tmp_path / "hub")) == "hub"


# ----------------------------------------------------------------------------- a run
@pytest.mark.slow
def test_run_dir_other_classes_starts_from_the_fine_tuned_backbone(run_a, data_b, tmp_path, capsys):
    source = tmp_path / "a"
    shutil.copytree(run_a, source)
    run_b = tmp_path / "b"
    flags = [f"--data={data_b}", f"--backbone={source}", "--unfreeze=0"]
    assert _train(capsys, *flags, f"--model_dir={run_b}") == 0
    shutil.rmtree(source)  # later commands read the run's copy
    assert cli.main(["evaluate", f"--model_dir={run_b}"]) == 0
    assert cli.main(["export", f"--model_dir={run_b}"]) == 0
    assert cli.main(["train", f"--flagfile={run_b / 'flags.cfg'}"]) == 0  # flags.cfg reruns it
    capsys.readouterr()
    a, b = _restored(run_a), _restored(run_b)
    assert _same(_backbone_weights(a), _backbone_weights(b))  # frozen: A's weights
    assert b.get_layer("predictions").output.shape[-1] == 4
    assert _in_export(_backbone_weights(a), run_b)  # and the export carries them
    card = _card(run_b)
    assert card["lineage"]["kind"] == "run"
    assert card["lineage"]["source"] == str(source)
    assert card["lineage"]["data"] == os.path.abspath(_flag(run_a, "data"))
    assert card["lineage"]["class_names"] == ["class_0", "class_1", "class_2"]
    assert card["lineage"]["head"] == "new"
    assert "val_accuracy" in card["lineage"]["metrics"]


def test_run_dir_same_classes_keeps_the_head_and_starts_from_its_accuracy(run_a, data_a, tmp_path):
    from tf_finetune import input_pipeline

    config_b = resolve(
        Config(data=str(data_a), backbone=str(run_a), model_dir=str(tmp_path / "b"), batch_size=8)
    )
    assert config_b.image_size == 16  # A's
    dataset = input_pipeline.load_data(config_b, str(data_a))
    own_model.keep_source(config_b, dataset.class_names)  # what training does first
    b = model_lib.build_model(config_b, dataset.num_classes)  # B's model before any epoch
    a = _restored(run_a)
    val = input_pipeline.make_pipelines(config_b, dataset, 1)["val"]
    accuracy_a = a.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    accuracy_b = b.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    assert accuracy_b == accuracy_a
    assert accuracy_a == pytest.approx(rundir.read_metrics(str(run_a))["val_accuracy"])
    assert _same(
        [np.array(w) for w in a.get_layer("predictions").weights],
        [np.array(w) for w in b.get_layer("predictions").weights],
    )


def test_weights_with_a_run_dir_is_refused_in_one_line(run_a, data_b, tmp_path, capsys):
    flags = [f"--data={data_b}", f"--backbone={run_a}", "--weights=none"]
    assert cli.main(["train", *flags, f"--model_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carries its own trained weights" in err


# ----------------------------------------------------------------------------- a .keras file
@pytest.mark.slow
def test_keras_export_of_a_run_is_a_backbone_and_b_outlives_it(run_a, data_b, tmp_path, capsys):
    folder = tmp_path / "keras_a"
    assert (
        cli.main(["export", f"--model_dir={run_a}", "--format=keras", f"--export_dir={folder}"])
        == 0
    )
    run_b = tmp_path / "b"
    flags = [f"--data={data_b}", f"--backbone={folder / 'model.keras'}"]
    assert _train(capsys, *flags, f"--model_dir={run_b}") == 0
    a = _restored(run_a)
    assert _in_export(_backbone_weights(a), run_b)
    assert _card(run_b)["lineage"]["kind"] == "keras_file"
    shutil.rmtree(folder)  # later commands read the run's copy
    assert cli.main(["evaluate", f"--model_dir={run_b}"]) == 0
    assert cli.main(["export", f"--model_dir={run_b}"]) == 0
    assert _same(_backbone_weights(a), _backbone_weights(_restored(run_b)))


def test_keras_file_cut_point(tmp_path, data_b, capsys):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    flat = keras.models.Model(inputs, keras.layers.Dense(2, name="out")(x))
    flat.save(tmp_path / "no_cut.keras")
    base = [f"--data={data_b}", f"--backbone={tmp_path / 'no_cut.keras'}"]
    assert cli.main(["train", *base, f"--model_dir={tmp_path / 'r1'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backbone_layer=NAME" in err
    config = resolve(
        Config(data=str(data_b), backbone=str(tmp_path / "no_cut.keras"), backbone_layer="conv")
    )
    model = model_lib.build_model(config, 4)
    assert model.get_layer("pooler").input.shape[1:] == (14, 14, 4)  # cut at conv


# ----------------------------------------------------------------------------- a Keras export
@pytest.fixture(scope="module")
def keras_export(tmp_path_factory):
    """A small classifier's model.export(): pixels in, softmax out (a BN layer inside)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs)
    path = tmp_path_factory.mktemp("export") / "saved"
    model.export(str(path), verbose=False)
    return path, {w.path: np.array(w) for w in model.weights}


def _export_backbone(run) -> dict[str, np.ndarray]:
    return {w.name: np.array(w) for w in _restored(run).get_layer("backbone").weights}


@pytest.mark.slow
@pytest.mark.parametrize("unfreeze", ["0", "all"])
def test_keras_export_trains_frozen_and_fine_tuned_with_adam(
    keras_export, data_b, tmp_path, capsys, unfreeze
):
    path, original = keras_export
    source = tmp_path / "source"
    shutil.copytree(path, source)
    run = tmp_path / "run"
    flags = [f"--data={data_b}", f"--backbone={source}", f"--unfreeze={unfreeze}"]
    assert _train(capsys, *flags, "--optimizer=adam", f"--model_dir={run}") == 0
    after = _export_backbone(run)
    kernel = next(v for k, v in after.items() if "conv" in k and "kernel" in k)
    assert np.array_equal(kernel, original["conv/kernel"]) == (unfreeze == "0")
    moving = next(v for k, v in after.items() if "moving_mean" in k)
    assert np.array_equal(moving, original["bn/moving_mean"])  # never trained
    assert _card(run)["lineage"]["kind"] == "keras_export"
    shutil.rmtree(source)
    assert cli.main(["evaluate", f"--model_dir={run}"]) == 0
    assert cli.main(["export", f"--model_dir={run}"]) == 0
    capsys.readouterr()
    # The export is self-contained: it serves with the run's copy of the source gone too.
    shutil.rmtree(run / backbone_table.SOURCE_DIR)
    served = tf.saved_model.load(str(run / "export" / "2"))
    outputs = served.signatures["predict_images"](images=tf.zeros([2, 20, 24, 3]))
    assert outputs["probabilities"].shape == (2, 4)


def test_keras_export_probabilities_get_a_note(keras_export, data_b, tmp_path, caplog):
    config = resolve(Config(data=str(data_b), backbone=str(keras_export[0])))
    assert config.image_size == 16
    model_lib.build_model(config, 4)
    assert "a classifier's probabilities" in caplog.text


@pytest.mark.slow
def test_a_run_on_a_keras_export_is_itself_a_backbone(
    keras_export, data_a, data_b, tmp_path, capsys
):
    source = tmp_path / "source"
    shutil.copytree(keras_export[0], source)
    first, second = tmp_path / "first", tmp_path / "second"
    assert _train(capsys, f"--data={data_a}", f"--backbone={source}", f"--model_dir={first}") == 0
    flags = [f"--data={data_b}", f"--backbone={first}", "--unfreeze=all"]
    assert _train(capsys, *flags, f"--model_dir={second}") == 0
    shutil.rmtree(source)
    shutil.rmtree(first)  # the second run keeps both: the first run and its export
    assert cli.main(["evaluate", f"--model_dir={second}"]) == 0
    capsys.readouterr()
    kernel = next(v for k, v in _export_backbone(second).items() if "conv" in k and "kernel" in k)
    assert not np.array_equal(kernel, keras_export[1]["conv/kernel"])  # fine-tuned whole
    lineage = _card(second)["lineage"]
    assert lineage["kind"] == "run" and lineage["parent"]["kind"] == "keras_export"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backbone=mobilenet_v2", "--backbone_layer=pool"], "is not one: drop --backbone_layer"),
        (["--backbone=/nowhere/model.keras"], "no such .keras file"),
    ],
)
def test_own_model_flags_are_refused_in_one_line(data_b, tmp_path, capsys, flags, message):
    assert cli.main(["train", f"--data={data_b}", *flags, f"--model_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
