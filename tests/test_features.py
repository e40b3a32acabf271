"""Feature caching: the head trains on features computed once; the full model is what's trained."""

import dataclasses
import os
import re

import numpy as np
import pytest

from tests.helpers import tiny
from tf_finetune import data, evaluate, evaluate_run, feature_fit, features, phases, rundir, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.errors import UserError
from tf_finetune.resolve import resolve


def frozen(folder, model_dir, **overrides) -> Config:
    """A tiny run with a frozen backbone: random conv features still tell the colours apart."""
    return tiny(
        folder, model_dir, **{"unfreeze": "0", "epochs": 8, "learning_rate": 0.05, **overrides}
    )


def test_head_shares_layers_with_the_full_model(folder, tmp_path):
    model = model_lib.build_model(frozen(folder, tmp_path), 3)
    extractor, head = features.split_classifier(model)
    assert extractor.output_shape == (None, model.get_layer("pooler").output.shape[-1])
    kernel = model.get_layer("predictions").kernel
    assert head.get_layer("predictions").kernel is kernel
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(
        head(extractor(pixels), training=False), model(pixels, training=False), atol=1e-6
    )


def test_memory_and_disk_features_match_and_disk_is_reused(folder, tmp_path):
    config = frozen(folder, tmp_path)
    model = model_lib.build_model(config, 3)
    extractor, _ = features.split_classifier(model)
    dataset = data.load_image_folder(str(folder), 16, 20)
    pipeline = data.make_pipeline(dataset.train, 3, 8, False, 0)
    in_memory = features.extract(extractor, pipeline, dataset.train.count)
    key = feature_fit.cache_key(config, dataset.train, "train")
    on_disk = features.cached_extract(
        extractor, pipeline, dataset.train.count, str(tmp_path / "c"), key
    )
    assert isinstance(on_disk.features, np.memmap)
    np.testing.assert_allclose(in_memory.features, on_disk.features, atol=1e-6)
    np.testing.assert_array_equal(in_memory.labels, on_disk.labels)
    # Every pass of one extractor (train, val, test) shares one compiled forward pass, traced
    # once for any batch size (a short last batch is not traced again), not per pass.
    val = data.make_pipeline(dataset.val, 3, 8, False, 0)
    features.extract(extractor, val, dataset.val.count, verbose=0)
    (forward,) = features._FORWARD[extractor].values()
    assert forward.experimental_get_tracing_count() == 1
    stamp = os.path.getmtime(tmp_path / "c" / key / "features.npy")
    features.cached_extract(extractor, pipeline, dataset.train.count, str(tmp_path / "c"), key)
    assert os.path.getmtime(tmp_path / "c" / key / "features.npy") == stamp  # reused, not rewritten
    # Batches from the memory-mapped arrays hold every example once per epoch.
    batches = list(features.dataset(on_disk, 5, True, seed=1))
    seen = np.concatenate([f for f, _ in batches])
    assert sorted(map(tuple, np.round(seen, 5))) == sorted(
        map(tuple, np.round(in_memory.features, 5))
    )


def test_cache_key_changes_with_everything_that_changes_a_feature(folder, tmp_path):
    config = frozen(folder, tmp_path)
    split = data.load_image_folder(str(folder), 16, 20).train
    key = feature_fit.cache_key(config, split, "train")
    assert feature_fit.cache_key(config, split, "train") == key
    assert re.fullmatch(r"train_[0-9a-f]{16}", key)  # a hash: safe for URLs and paths
    for changed in (
        {"image_size": 48},
        {"precision": "mixed_bfloat16"},
        {"backbone": "mobilenet_v2", "image_size": 32},  # other layers and preprocessing
    ):
        assert feature_fit.cache_key(dataclasses.replace(config, **changed), split, "train") != key
    # A weights file: a new file at the same path (new mtime or size) is another key.
    weights = tmp_path / "w.weights.h5"
    model_lib.build_model(config, 3).save_weights(weights)
    with_file = dataclasses.replace(config, weights=str(weights))
    file_key = feature_fit.cache_key(with_file, split, "train")
    assert file_key != key
    os.utime(weights, ns=(1, 1))
    assert feature_fit.cache_key(with_file, split, "train") != file_key
    photo = next(p for p in split.source.map(lambda k, _: k).as_numpy_iterator()).decode()
    with open(photo, "ab") as f:
        f.write(b"\0")  # still decodes: JPEG/PNG readers ignore trailing bytes
    try:
        assert feature_fit.cache_key(config, split, "train") != key
    finally:
        with open(photo, "rb+") as f:
            f.truncate(os.path.getsize(photo) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_training_trains_the_full_model(folder, tmp_path, cache):
    config = frozen(folder, tmp_path, cache=cache, head_solver="fit")
    metrics = train.train_and_evaluate(config)
    assert metrics["val_accuracy"] > 0.6, metrics  # evaluated by the full model on pixels
    assert (tmp_path / "checkpoints" / "head_best.weights.h5").exists()
    # The usual full-model checkpoint exists, so `evaluate` and `export` work after caching.
    model = model_lib.build_model(config, 3)
    model.load_weights(tmp_path / rundir.BEST_WEIGHTS)
    report = evaluate_run.evaluate_run(config, "val")
    assert report["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)


def test_cache_modes_follow_the_backbone_and_size(folder, tmp_path):
    def mode(config, dim, count):
        return feature_fit.cache_mode(config, dim, count, phases.plan(config)[-1])

    assert mode(frozen(folder, tmp_path), 1280, 1000) == "memory"
    assert mode(frozen(folder, tmp_path), 1280, 10**6) == "disk"
    assert mode(frozen(folder, tmp_path, unfreeze="all"), 1280, 10) == "none"
    assert mode(frozen(folder, tmp_path, cache="none"), 1280, 10) == "none"
    with pytest.raises(UserError, match="needs a frozen backbone"):
        frozen(folder, tmp_path, cache="memory", unfreeze="3")


def test_cache_key_follows_a_hub_modules_files(folder, tmp_path):
    from tests import hub_fixtures

    module = hub_fixtures.save_feature_vector_module(tmp_path / "module", image_size=16)
    config = resolve(Config(data=str(folder), backbone=module, model_dir=str(tmp_path / "run")))
    split = data.load_image_folder(str(folder), 16, 20).train
    key = feature_fit.cache_key(config, split, "train")
    os.utime(os.path.join(module, "saved_model.pb"), ns=(1, 1))  # the module was replaced
    assert feature_fit.cache_key(config, split, "train") != key


def test_reports_of_a_head_only_run_come_from_the_cached_features(folder, tmp_path, monkeypatch):
    """val and test are scored by the head on their features (no pass of the whole model over
    their pixels), and score as the whole model does on pixels (`evaluate` reads pixels)."""
    config = frozen(folder, tmp_path, test_percent=20)

    def no_pixel_pass(*args, **kwargs):
        raise AssertionError("a head-only run decoded val/test again for its reports")

    with monkeypatch.context() as m:
        m.setattr(evaluate.__name__ + ".predict_split", no_pixel_pass)
        metrics = train.train_and_evaluate(config)
    assert metrics["test_images"] > 0
    assert (tmp_path / "mistakes_test.png").stat().st_size > 0
    with open(tmp_path / "predictions_test.csv") as f:
        cached_csv = f.read()
    on_pixels = evaluate_run.evaluate_run(config, "test")
    assert on_pixels["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    # evaluate rewrote the CSV from its pixel pass: the same rows, probabilities within float
    # noise of the features' (compare the predicted class column).
    with open(tmp_path / "predictions_test.csv") as f:
        pixel_csv = f.read()
    column = lambda text: [row.split(",")[2] for row in text.splitlines()]  # noqa: E731
    assert column(cached_csv) == column(pixel_csv)


@pytest.mark.slow
def test_a_head_only_export_reuses_the_traced_backbone_and_equals_the_model(
    folder, tmp_path, monkeypatch
):
    import tensorflow as tf

    reused = []
    real = features.traced_forward
    monkeypatch.setattr(
        features, "traced_forward", lambda *a: reused.append(real(*a)) or reused[-1]
    )
    config = frozen(folder, tmp_path)
    metrics = train.train_and_evaluate(config)
    assert reused and reused[0] is not None  # the feature pass's compiled forward
    model = model_lib.build_model(config, 3)
    model.load_weights(tmp_path / rundir.BEST_WEIGHTS)
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    served = tf.saved_model.load(metrics["export_path"]).signatures["predict_images"]
    np.testing.assert_allclose(
        served(images=tf.constant(pixels))["probabilities"], model(pixels), atol=1e-5
    )
