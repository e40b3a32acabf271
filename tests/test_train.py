"""Training: frozen vs unfrozen weights, MirroredStrategy, resume, determinism, the export."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import Crash, Epochs, history_epochs, run_python, tiny
from tests.images import class_image, encode, write_class_folders
from tf_finetune import backbones, data, distribute, rundir, train
from tf_finetune import model as model_lib
from tf_finetune.errors import UserError


def _values(weights):
    return [np.array(w) for w in weights]


def _fit_one_epoch(model, folder):
    dataset = data.load_image_folder(str(folder), 16, 20)
    model.fit(data.make_pipeline(dataset.train, 3, 8, True, 0), epochs=1, verbose=0)


def test_frozen_backbone_is_unchanged_by_fit_and_the_head_learns(folder, tmp_path):
    config = tiny(folder, tmp_path, unfreeze="0")
    model = model_lib.build_model(config, 3)
    backbone = model_lib.get_backbone(model)
    before_backbone = _values(backbone.weights)  # kernels and BatchNorm statistics
    before_head = _values(model.get_layer("predictions").weights)
    _fit_one_epoch(model, folder)
    for a, b in zip(before_backbone, _values(backbone.weights)):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(before_head, _values(model.get_layer("predictions").weights))
    )


@pytest.mark.slow
def test_unfreeze_top_n_trains_exactly_those_layers_and_never_batchnorm(folder, tmp_path):
    spec = backbones.get_spec("mobilenet_v2")
    model = model_lib.build_classifier(spec, 3, 32, None, 0.0, alpha=0.35)
    names = model_lib.unfreeze(model, 3)
    # MobileNetV2's top three layers with weights; Conv_1_bn and block_16_project_BN between
    # them are skipped.
    assert names == ["block_16_depthwise", "block_16_project", "Conv_1"]
    backbone = model_lib.get_backbone(model)
    expected = {w.path for n in names for w in backbone.get_layer(n).trainable_weights}
    trainable_paths = {w.path for w in model.trainable_weights}
    assert trainable_paths == expected | {"predictions/kernel", "predictions/bias"}
    model_lib.compile_model(model, tiny(folder, tmp_path), 3)
    before = {w.path: np.array(w) for w in backbone.weights}
    dataset = data.load_image_folder(str(folder), 32, 20)
    model.fit(data.make_pipeline(dataset.train, 3, 8, True, 0), epochs=1, verbose=0)
    changed = {w.path for w in backbone.weights if not np.array_equal(before[w.path], np.array(w))}
    assert changed == expected  # BN moving statistics included: inference mode throughout

    everything = model_lib.unfreeze(model, None)
    assert len(everything) == 52 and everything[-3:] == names  # convs and depthwise convs
    batchnorm = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert batchnorm and not any(l.trainable or l.name in everything for l in batchnorm)
    assert model_lib.unfreeze(model, 0) == [] and not backbone.trainable


@pytest.mark.slow
def test_mirrored_strategy_with_two_cpu_replicas(folder, tmp_path):
    metrics = train.train_and_evaluate(tiny(folder, tmp_path, cpu_replicas=2))
    assert metrics["replicas"] == 2
    assert metrics["val_accuracy"] > 0.6  # three solid colours: easy when training works


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_two_replicas_evaluate_every_image_of_splits_that_split_unevenly(tmp_path, cache):
    # val and test: 9 images, batch 8 -> a last batch of 1 leaves a replica nothing (its
    # forward pass fails); an odd batch (7 here) splits 4/3, which Keras' symbolic build
    # cannot reduce (keras#19246). Both must work, and every image must be evaluated.
    for split, per_class in (("train", 8), ("val", 3), ("test", 3)):
        write_class_folders(tmp_path / "data" / split, num_classes=3, per_class=per_class)
    for batch_size in (8, 7):
        run = tmp_path / f"run_{batch_size}"
        config = tiny(
            tmp_path / "data",
            run,
            cpu_replicas=2,
            batch_size=batch_size,
            epochs=1,
            cache=cache,
            unfreeze="all" if cache == "none" else "0",  # memory: the feature-cache path
        )
        metrics = train.train_and_evaluate(config)
        assert metrics["replicas"] == 2
        for split in ("val", "test"):
            report = json.loads((run / f"report_{split}.json").read_text())
            assert report["num_examples"] == 9, (batch_size, split)


def test_eval_batch_size_gives_every_replica_an_example_and_keeps_every_example():
    for replicas in (2, 3, 4):
        for count in range(replicas, 80):
            for batch_size in (replicas, 7, 8, 32):
                size = distribute.eval_batch_size(count, batch_size, replicas)
                assert size >= 1 and (count % size == 0 or count % size >= replicas)
                if count % batch_size == 0 or count % batch_size >= replicas:
                    assert size == batch_size  # unchanged when it already works
    assert distribute.eval_batch_size(9, 8, 1) == 8
    with pytest.raises(UserError, match="cannot be evaluated on 2 replicas"):
        distribute.eval_batch_size(1, 8, 2)


@pytest.mark.slow
def test_killed_run_resumes_from_its_backup(folder, tmp_path):
    config = tiny(folder, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(Crash(),))
    assert os.path.isdir(tmp_path / "backup")
    epochs = Epochs()
    metrics = train.train_and_evaluate(config, extra_callbacks=(epochs,))
    assert epochs.seen == [1, 2]  # resumed after the first epoch, not from scratch
    assert metrics["epochs"] == 3
    assert history_epochs(tmp_path) == [0, 1, 2]
    assert not os.path.exists(tmp_path / "backup")  # removed once training completed


@pytest.mark.slow
def test_same_seed_same_numbers(folder, tmp_path):
    # --deterministic is what an explicit --seed turns on (tests/test_cli.py).
    def history(name, **overrides):
        train.train_and_evaluate(tiny(folder, tmp_path / name, deterministic=True, **overrides))
        return (tmp_path / name / "history.csv").read_text()

    a, b, c = history("a"), history("b"), history("c", seed=7)
    assert a == b  # every epoch's loss and accuracy, to the last digit
    assert a != c


@pytest.fixture(scope="module")
def tiny_run(folder, tmp_path_factory):
    """One finished tiny run, shared: (its run dir, its metrics). Tests never change it."""
    run = tmp_path_factory.mktemp("tiny_run")
    return run, train.train_and_evaluate(tiny(folder, run))


def test_run_dir_contents_and_flagfile_rerun(folder, tiny_run, tmp_path):
    shutil.copytree(tiny_run[0], tmp_path / "run")
    run, metrics = tmp_path / "run", tiny_run[1]
    config = tiny(folder, run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("accuracy", "loss", "val_accuracy", "val_loss", "wall_time_seconds"):
        assert isinstance(saved[key], float)
    assert saved["class_names"] == ["class_0", "class_1", "class_2"]
    assert saved["train_images"] + saved["val_images"] == 48 and saved["skipped_files"] == []
    assert (run / "checkpoints" / "best.weights.h5").exists()
    assert any((run / "logs").rglob("events.out.tfevents.*"))
    assert "--backbone=digits_cnn" in (run / "flags.cfg").read_text()
    # A second run exports the next version and never touches the first.
    first = os.path.join(run, "export", "1")
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    assert train.train_and_evaluate(config)["export_path"] == os.path.join(run, "export", "2")
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp
    assert sorted(os.listdir(run / "export")) == ["1", "2"]  # no temporary folder left behind


RELOAD = r"""
import json, sys
import numpy as np, tensorflow as tf
export, inputs = sys.argv[1], np.load(sys.argv[2], allow_pickle=True)
loaded = tf.saved_model.load(export, tags=["serve"])
out = {}
fn = loaded.signatures["serving_default"]
assert set(fn.structured_input_signature[1]) == {"image_bytes"}, fn.structured_input_signature
for fmt in ("jpeg", "png"):
    res = fn(image_bytes=tf.constant(list(inputs[fmt])))
    out[fmt] = res["probabilities"].numpy().tolist()
    out[fmt + "_names"] = [[n.decode() for n in row] for row in res["top_k_names"].numpy()]
res = loaded.signatures["predict_images"](images=tf.constant(inputs["pixels"]))
out["pixels"] = res["probabilities"].numpy().tolist()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_export_serves_jpeg_and_png_bytes_like_the_keras_model(folder, tiny_run, tmp_path):
    run, metrics = tiny_run
    export = metrics["export_path"]
    model = model_lib.build_model(tiny(folder, run), 3)
    model.load_weights(run / rundir.BEST_WEIGHTS)

    images = [class_image(label, (30, 22), seed=100 + label) for label in (0, 1, 2)]
    jpegs = [encode(im, "JPEG") for im in images]
    pngs = [encode(im, "PNG") for im in images]
    expected = {}
    for fmt, blobs in (("jpeg", jpegs), ("png", pngs)):
        pixels = np.stack([data.decode_and_resize(tf.constant(b), 16).numpy() for b in blobs])
        expected[fmt] = model.predict(pixels.astype("float32"), verbose=0)
    inputs = tmp_path / "inputs.npz"
    raw = np.stack([np.asarray(im, dtype="float32") for im in images])
    np.savez(
        inputs, jpeg=np.array(jpegs, dtype=object), png=np.array(pngs, dtype=object), pixels=raw
    )
    served = run_python(RELOAD, export, inputs)
    for fmt in ("jpeg", "png"):
        np.testing.assert_allclose(served[fmt], expected[fmt], atol=1e-5)
        assert [row[0] for row in served[fmt + "_names"]] == [
            f"class_{i}" for i in np.argmax(expected[fmt], 1)
        ]
    # Raw pixels of another size go through the same resize as the bytes.
    np.testing.assert_allclose(served["pixels"], expected["png"], atol=1e-5)
    assert metrics["val_accuracy"] > 0.6
    assert open(os.path.join(export, "assets", "labels.txt")).read().split() == [
        "class_0",
        "class_1",
        "class_2",
    ]
