"""--cache_views=N (issue 14 item 5): N augmented views of each training image, made from its
one decode, go through the frozen backbone once each and are cached with the clean view; the
head (either solver) trains on all of them, val stays clean."""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import tiny, train_error
from tf_finetune import backbones, data, feature_fit, features, linear_probe, phases, train
from tf_finetune import model as model_lib
from tf_finetune.errors import UserError
from tf_finetune.timings import Timings


def views_config(folder, model_dir, **overrides):
    """A tiny head-only run (digits_cnn from random weights, 16 px) with 2 views."""
    values = {"unfreeze": "0", "epochs": 3, "learning_rate": 0.05, "cache_views": 2}
    return tiny(folder, model_dir, **{**values, **overrides})


def _load(folder):
    return data.load_image_folder(str(folder), 16, 20, decode_check=())


def _by_image(cached: features.Features) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels as [image, view, ...]: each image's rows come clean view first."""
    n = cached.count // (1 + cached.views)
    return (
        np.asarray(cached.features).reshape(n, 1 + cached.views, -1),
        np.asarray(cached.labels).reshape(n, 1 + cached.views, -1),
    )


@pytest.fixture(scope="module")
def model(folder):
    """One backbone's feature extractor for the feature-level tests (traced once)."""
    keras.utils.set_random_seed(0)
    return features.split_classifier(model_lib.build_model(views_config(folder, "unused"), 3))[0]


def _pass(extractor, config, dataset, mode="memory"):
    return feature_fit.extract_splits(extractor, config, dataset, mode, verbose=0)


def test_train_rows_hold_every_view_and_val_stays_clean(folder, tmp_path, model):
    dataset = _load(folder)
    train_count, val_count = dataset.train.count, dataset.val.count
    cached = _pass(model, views_config(folder, tmp_path, cache_views=3), dataset)
    assert cached["train"].views == 3 and cached["train"].count == 4 * train_count
    assert cached["val"].views == 0 and cached["val"].count == val_count
    feats, labels = _by_image(cached["train"])
    for view in (1, 2, 3):
        # Each view is another image than the clean one (a crop, maybe mirrored) ...
        assert (np.abs(feats[:, view] - feats[:, 0]).max(axis=1) > 1e-6).all()
        # ... with its image's label.
        np.testing.assert_array_equal(labels[:, view], labels[:, 0])
    assert (np.abs(feats[:, 1] - feats[:, 2]).max(axis=1) > 1e-6).all()
    # The first row of each image is its clean view: the features a run without views caches.
    clean = _pass(model, views_config(folder, tmp_path, cache_views=0), _load(folder))
    np.testing.assert_allclose(feats[:, 0], clean["train"].features, atol=1e-5)
    np.testing.assert_array_equal(labels[:, 0], clean["train"].labels)
    np.testing.assert_allclose(cached["val"].features, clean["val"].features, atol=1e-5)


def test_views_are_deterministic_per_seed(folder, tmp_path, model):
    def views(seed):
        return _by_image(
            _pass(model, views_config(folder, tmp_path, seed=seed), _load(folder))["train"]
        )[0]

    first, again, other = views(1), views(1), views(2)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(other[:, 0], first[:, 0], atol=1e-5)  # clean: no seed
    assert (np.abs(other[:, 1:] - first[:, 1:]).reshape(len(first), -1).max(axis=1) > 1e-6).all()


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_an_undecodable_file_drops_all_its_views_and_is_named_once(
    corrupt_folder, tmp_path, monkeypatch, model, mode
):
    monkeypatch.setattr(backbones, "keras_home", lambda: str(tmp_path / "keras_home"))
    dataset = _load(corrupt_folder)
    keys = {
        name: [
            os.path.basename(k.decode())
            for k, _ in getattr(dataset, name).source.as_numpy_iterator()
        ]
        for name in ("train", "val")
    }
    bad = {"truncated.jpg", "garbage.png"}
    counts = {name: getattr(dataset, name).count for name in ("train", "val")}
    cached = _pass(model, views_config(corrupt_folder, tmp_path), dataset, mode)
    train_bad = [i for i, k in enumerate(keys["train"]) if k in bad]
    val_bad = [i for i, k in enumerate(keys["val"]) if k in bad]
    assert train_bad, "the split should put a bad file in train"
    assert list(cached["train"].dropped) == train_bad  # indices per image, not per row
    assert cached["train"].count == 3 * (counts["train"] - len(train_bad))
    assert cached["val"].count == counts["val"] - len(val_bad)
    named = sorted(os.path.basename(p) for p, _ in dataset.skipped_files)
    assert named == sorted(bad)  # each named once, not once per view
    assert dataset.train.count == counts["train"] - len(train_bad)
    feats, labels = _by_image(cached["train"])
    assert (np.abs(feats[:, 1] - feats[:, 0]).max(axis=1) > 1e-6).all()  # rows still grouped
    np.testing.assert_array_equal(labels[:, 2], labels[:, 0])


def test_the_disk_cache_key_names_the_views_and_their_seed(folder, tmp_path, monkeypatch, model):
    config = views_config(folder, tmp_path)
    split = _load(folder).train
    key = feature_fit.cache_key(config, split, "train", 2)
    assert feature_fit.cache_key(config, split, "train", 2) == key
    clean = feature_fit.cache_key(config, split, "train")
    assert len({key, clean, feature_fit.cache_key(config, split, "train", 3)}) == 3
    other_seed = dataclasses.replace(config, seed=7)
    assert feature_fit.cache_key(other_seed, split, "train", 2) != key
    assert feature_fit.cache_key(other_seed, split, "train") == clean  # clean: no seed
    # A real run of passes: the same flags hit the cache, another N or seed misses it.
    monkeypatch.setattr(backbones, "keras_home", lambda: str(tmp_path / "keras_home"))
    root = tmp_path / "keras_home" / "tf_finetune_features"

    def run(**overrides):
        _pass(model, views_config(folder, tmp_path, **overrides), _load(folder), "disk")
        return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/features.npy")}

    first = run()
    assert len(first) == 2  # train (with views) and val
    assert run() == first  # a hit: nothing written again
    assert len(run(cache_views=3)) == 3  # a miss: new train features, val reused
    assert len(run(seed=7)) == 4
    assert len(run(seed=7, cache_views=0)) == 5  # the clean train cache


class _Batches(keras.callbacks.Callback):
    """Steps run per epoch: the last batch hook's step number (the head runs an epoch's steps
    in one execution, so batch hooks see the last step of each)."""

    def __init__(self):
        super().__init__()
        self.per_epoch = []

    def on_epoch_begin(self, epoch, logs=None):
        self.per_epoch.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.per_epoch[-1] = batch + 1


@pytest.mark.slow
def test_fit_trains_on_every_view_and_the_run_exports_and_evaluates(folder, tmp_path):
    config = views_config(folder, tmp_path, epochs=2, sampling="balanced", test_percent=20)
    batches = _Batches()
    metrics = train.train_and_evaluate(config, extra_callbacks=(batches,))
    rows = 3 * metrics["train_images"]
    assert batches.per_epoch == [-(-rows // config.batch_size)] * 2  # all views, each epoch
    assert metrics["val_accuracy"] > 0.9 and metrics["test_accuracy"] > 0.9
    assert metrics["export_path"] and os.path.isdir(metrics["export_path"])


@pytest.mark.slow
def test_lbfgs_solves_on_every_view_and_the_run_exports_and_evaluates(
    folder, tmp_path, monkeypatch
):
    seen = []
    real = linear_probe.solve_head

    def record(train_x, train_y, *args, **kwargs):
        seen.append((len(train_x), kwargs.get("sample_weight")))
        return real(train_x, train_y, *args, **kwargs)

    monkeypatch.setattr(linear_probe, "solve_head", record)
    config = views_config(
        folder, tmp_path, head_solver="lbfgs", class_weight="balanced", test_percent=20
    )
    metrics = train.train_and_evaluate(config)
    ((rows, weight),) = seen
    assert rows == 3 * metrics["train_images"] and len(weight) == rows
    assert metrics["head_solver"]["solver"] == "lbfgs"
    assert metrics["val_accuracy"] > 0.9 and metrics["test_accuracy"] > 0.9
    assert metrics["export_path"] and os.path.isdir(metrics["export_path"])


def test_the_pass_counts_every_view_it_puts_through_the_backbone(folder, tmp_path):
    config = views_config(folder, tmp_path, head_solver="lbfgs")
    dataset = _load(folder)
    model = model_lib.build_model(config, 3)
    timings = Timings()
    feature_fit.solve_head(
        model,
        config,
        dataset,
        tf.distribute.get_strategy(),
        "memory",
        phase=phases.plan(config)[0],
        timings=timings,
    )
    assert timings.feature_images == 3 * dataset.train.count + dataset.val.count


def test_multi_label_views_keep_the_tags(tmp_path, model):
    from tests.images import write_tagged_csv

    write_tagged_csv(tmp_path / "tags")
    config = views_config(
        tmp_path / "tags" / "tags.csv", tmp_path / "run", task="multi_label", image_size=16
    )
    from tf_finetune import input_pipeline

    dataset = input_pipeline.load_data(config, training=True)
    multi = model_lib.build_model(config, dataset.num_classes)
    extractor, _ = features.split_classifier(multi)
    cached = feature_fit.extract_splits(extractor, config, dataset, "memory", verbose=0)
    feats, labels = _by_image(cached["train"])
    assert labels.shape[1] == 3 and (labels.sum(axis=-1)[:, 0] != 1).any()  # multi-hot rows
    np.testing.assert_array_equal(labels[:, 1], labels[:, 0])
    np.testing.assert_array_equal(labels[:, 2], labels[:, 0])
    assert (np.abs(feats[:, 1] - feats[:, 0]).max(axis=1) > 1e-6).all()


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--unfreeze=all"], "--unfreeze=all trains the backbone in the only phase"),
        (["--unfreeze=0", "--augment=light"], "--augment=light augments images every step"),
        (["--unfreeze=0", "--mixup=0.2"], "--mixup mixes images"),
        (["--unfreeze=0", "--ema=0.99"], "--ema averages the weights of every training step"),
        (["--unfreeze=0", "--cache=none"], "--cache=none turns the feature cache off"),
    ],
)
def test_views_without_a_cached_head_phase_are_refused_in_one_line(
    capsys, folder, tmp_path, flags, message
):
    err = train_error(
        capsys,
        f"--data={folder}",
        "--backbone=digits_cnn",
        "--weights=none",
        f"--model_dir={tmp_path}/run",
        "--cache_views=2",
        *flags,
    )
    assert "--cache_views augments the cached features" in err and message in err


@pytest.mark.parametrize("value", ["-1", "17"])
def test_the_number_of_views_is_bounded(capsys, folder, tmp_path, value):
    err = train_error(capsys, f"--data={folder}", "--unfreeze=0", f"--cache_views={value}")
    assert "--cache_views must be in [0, 16]" in err


def test_text_data_takes_no_views(capsys, tmp_path):
    from tests import hub_fixtures

    module = hub_fixtures.save_text_module(tmp_path / "text")
    rows = ["text,label"] + [f"{w} cat sat,cat\n{w} dog ran,dog" for w in ("the", "a", "one")]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    err = train_error(
        capsys,
        f"--data={tmp_path / 't.csv'}",
        f"--backbone={module}",
        "--unfreeze=0",
        "--cache_views=2",
        f"--model_dir={tmp_path}/run",
    )
    assert "--cache_views transform images; text data takes none" in err


def test_a_warmup_phase_takes_views_and_the_default_is_none(folder, tmp_path):
    from tf_finetune.config import Config

    assert Config().cache_views == 0
    views_config(folder, tmp_path, unfreeze="all", warmup_epochs=1, epochs=2)  # no refusal
    with pytest.raises(UserError, match="add --warmup_epochs"):
        views_config(folder, tmp_path, unfreeze="3")
