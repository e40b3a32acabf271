"""Two-phase fine-tuning, training-quality options, gates and weight averages (issue 4)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tests.helpers import Crash, Epochs, history_epochs, tiny, tiny_flags
from tests.images import class_image, write_class_folders
from tf_finetune import (
    augment,
    averaging,
    backbones,
    cli,
    data,
    distribute,
    phases,
    rundir,
    schedules,
    train,
    validation,
)
from tf_finetune import model as model_lib
from tf_finetune.config import Config, parse_unfreeze
from tf_finetune.errors import UserError


# ----------------------------------------------------------------------------- unfreeze
@pytest.mark.parametrize(
    "unfreeze, expected",
    [("1", ["conv3"]), ("0.5", ["conv2", "conv3"]), ("all", ["conv1", "conv2", "conv3"])],
)
def test_unfreeze_policies_train_exactly_the_intended_variables(
    folder, tmp_path, unfreeze, expected
):
    config = tiny(folder, tmp_path, unfreeze=unfreeze, learning_rate=0.05)
    model = model_lib.build_model(config, 3)
    backbone = model_lib.get_backbone(model)
    expected_paths = {w.path for n in expected for w in backbone.get_layer(n).weights}
    assert {w.path for w in model.trainable_weights} == expected_paths | {
        "predictions/kernel",
        "predictions/bias",
    }
    before = {w.path: np.array(w) for w in backbone.weights}
    dataset = data.load_image_folder(str(folder), 16, 20)
    model.fit(data.make_pipeline(dataset.train, 3, 8, True, 0), epochs=1, verbose=0)
    changed = {w.path for w in backbone.weights if not np.array_equal(before[w.path], np.array(w))}
    assert changed == expected_paths  # BN gamma/beta and moving statistics never move


def test_unfreeze_fraction_rounds_up_and_lists_are_only_for_compare():
    spec = backbones.get_spec("mobilenet_v2")
    spec_model = model_lib.build_classifier(spec, 3, 32, None, 0.0, 0.35)
    # MobileNetV2 has 52 layers with weights besides BatchNorm; 30% of them, rounded up: 16.
    assert len(model_lib.unfreeze(spec_model, 0.3)) == 16
    assert model_lib.unfreeze(spec_model, 1.0) == model_lib.unfreeze(spec_model, None)
    assert len(model_lib.unfreeze(spec_model, None)) == 52
    with pytest.raises(UserError, match="compare"):
        parse_unfreeze("0,all")
    for bad in ("1.5", "-0.2", "x"):
        with pytest.raises(UserError, match="--unfreeze must be"):
            parse_unfreeze(bad)
    assert [parse_unfreeze(v) for v in ("0", "20", "0.3", "all")] == [0, 20, 0.3, None]


# ----------------------------------------------------------------------------- two phases
class _Trainable(keras.callbacks.Callback):
    """Records, per epoch, which backbone layers are trainable and the backbone's weights."""

    def __init__(self):
        super().__init__()
        self.trainable = {}
        self.kernels = {}

    def on_epoch_end(self, epoch, logs=None):
        if not any(isinstance(l, keras.Model) for l in self.model.layers):
            return  # the head alone, training on cached features
        backbone = model_lib.get_backbone(self.model)
        self.trainable[epoch] = sorted(
            l.name for l in backbone.layers if l.trainable and l.weights and backbone.trainable
        )
        self.kernels[epoch] = [np.array(w) for w in backbone.weights]


@pytest.mark.slow
def test_two_phase_freezes_then_unfreezes_and_continues_the_epochs(folder, tmp_path):
    # On pixels in both phases, to watch the backbone in phase 1 (see the cached test below).
    config = tiny(folder, tmp_path, epochs=4, warmup_epochs=2, unfreeze="1", cache="none")
    seen = _Trainable()
    metrics = train.train_and_evaluate(config, extra_callbacks=(seen,))
    assert sorted(seen.trainable) == [0, 1, 2, 3]
    assert seen.trainable[0] == seen.trainable[1] == []
    assert seen.trainable[2] == seen.trainable[3] == ["conv3"]
    # Phase 1 left the backbone alone; phase 2 moved conv3's kernel only.
    for a, b in zip(seen.kernels[0], seen.kernels[1]):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(seen.kernels[1], seen.kernels[3])]
    paths = [w.path for w in model_lib.get_backbone(model_lib.build_model(config, 3)).weights]
    assert [p for p, m in zip(paths, moved) if m] == ["conv3/kernel"]
    assert history_epochs(tmp_path) == [0, 1, 2, 3]
    assert metrics["epochs"] == 4 and metrics["phase_boundary_epoch"] == 2
    assert os.path.getsize(tmp_path / "curves.png") > 0
    assert not os.path.exists(tmp_path / "backup")
    # One TensorBoard run continued: the validation events hold epochs 0-3.
    steps = set()
    for path in (tmp_path / "logs" / "validation").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            if any(v.tag == "epoch_loss" for v in event.summary.value):
                steps.add(event.step)
    assert steps == {0, 1, 2, 3}


def test_phase_two_learning_rate_defaults_to_a_tenth(folder, tmp_path):
    plan = phases.plan(tiny(folder, tmp_path, epochs=5, warmup_epochs=2, learning_rate=0.01))
    assert [(p.name, p.initial_epoch, p.epochs, p.unfreeze) for p in plan] == [
        ("head", 0, 2, 0),
        ("fine_tune", 2, 5, None),
    ]
    assert plan[1].learning_rate == pytest.approx(0.001)
    assert len(phases.plan(tiny(folder, tmp_path, warmup_epochs=2, unfreeze="0"))) == 1
    with pytest.raises(UserError, match="no fine-tuning epoch"):
        tiny(folder, tmp_path, epochs=2, warmup_epochs=2)


@pytest.mark.parametrize(
    "crash_epoch, resumed_phase, cache", [(2, 2, "none"), (0, 1, "none"), (0, 1, "memory")]
)
@pytest.mark.slow
def test_killed_run_resumes_in_the_phase_it_was_in(
    folder, tmp_path, crash_epoch, resumed_phase, cache
):
    # cache=memory: phase 1 trains the head on cached backbone features (for its epochs).
    config = tiny(
        folder, tmp_path, epochs=4, warmup_epochs=2, unfreeze="1", cache=cache, head_solver="fit"
    )
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(Crash(crash_epoch),))
    state = phases.load_state(str(tmp_path))
    assert state.phase == resumed_phase and state.best_val_loss is not None
    epochs, seen = Epochs(), _Trainable()
    metrics = train.train_and_evaluate(config, extra_callbacks=(epochs, seen))
    assert epochs.seen == list(range(crash_epoch + 1, 4))  # nothing redone, nothing skipped
    assert seen.trainable[3] == ["conv3"]  # the resumed phase 2 trains what phase 2 trains
    assert history_epochs(tmp_path) == [0, 1, 2, 3]
    assert metrics["epochs"] == 4
    assert not os.path.exists(tmp_path / "backup")


@pytest.mark.slow
def test_resumed_phase_two_starts_from_phase_one_weights(folder, tmp_path):
    config = tiny(folder, tmp_path, epochs=4, warmup_epochs=2, unfreeze="1", cache="none")
    seen = _Trainable()
    # Killed during phase 2's first epoch, before its backup: phase 2 restarts from phase 1's end.
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(seen, Crash(2, at_begin=True)))
    assert phases.load_state(str(tmp_path)).phase == 2
    assert not os.path.exists(phases.backup_dir(str(tmp_path), 1))  # phase 1's backup is gone
    phase1_end = seen.kernels[1]
    start = _Start()
    train.train_and_evaluate(config, extra_callbacks=(start,))
    for a, b in zip(phase1_end, start.kernels):
        np.testing.assert_array_equal(a, b)


class _Start(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        # Callbacks run in order: BackupAndRestore (earlier in the list) has restored by now.
        self.kernels = [np.array(w) for w in model_lib.get_backbone(self.model).weights]


# ----------------------------------------------------------------------------- augmentation
RANDOM_OPS = ("Random", "Rng", "Multinomial", "TruncatedNormal")


def _op_types(saved_model_dir) -> set[str]:
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta in proto.meta_graphs:
        ops.update(n.op for n in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return ops


def _random_ops(saved_model_dir) -> set[str]:
    return {op for op in _op_types(saved_model_dir) if any(r in op for r in RANDOM_OPS)}


@pytest.mark.slow
def test_augmentation_trains_but_never_reaches_the_export(folder, tmp_path):
    config = tiny(folder, tmp_path, augment="strong", mixup=0.2, cutmix=1.0)
    metrics = train.train_and_evaluate(config)
    export = metrics["export_path"]
    assert _random_ops(export) == set()
    loaded = tf.saved_model.load(export)
    images = tf.constant(
        np.stack([np.asarray(class_image(i, (16, 16), seed=7 + i), "float32") for i in range(3)])
    )
    first = loaded.signatures["predict_images"](images=images)["probabilities"].numpy()
    second = loaded.signatures["predict_images"](images=images)["probabilities"].numpy()
    np.testing.assert_array_equal(first, second)
    model = model_lib.build_model(config, 3)
    model.load_weights(tmp_path / rundir.BEST_WEIGHTS)
    np.testing.assert_allclose(first, model.predict(images, verbose=0), atol=1e-5)

    # The op scan does see random ops when augmentation is inside an exported model.
    augmented = keras.Sequential([augment.make_augmentation("strong", 0), model])
    augmented(images, training=True)  # builds it
    archive = keras.export.ExportArchive()
    archive.track(augmented)
    archive.add_endpoint(
        "serve",
        tf.function(
            lambda x: augmented(x, training=True),
            input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)],
        ),
    )
    archive.write_out(str(tmp_path / "control"), verbose=False)
    assert _random_ops(tmp_path / "control")


def test_augmentation_levels_change_training_batches_within_pixel_range():
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)), tf.float32)
    labels = tf.one_hot([0, 1, 2, 0], 3)
    ds = tf.data.Dataset.from_tensors((images, labels))
    assert augment.augment_training_pipeline(ds, "none", 0, 0, 0) is ds
    for level in ("light", "strong"):
        out_images, out_labels = next(iter(augment.augment_training_pipeline(ds, level, 0, 0, 1)))
        assert out_images.shape == images.shape
        assert 0.0 <= float(tf.reduce_min(out_images)) and float(tf.reduce_max(out_images)) <= 255
        assert not np.allclose(out_images, images)
        np.testing.assert_array_equal(out_labels, labels)  # no mixing: labels untouched


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_labels_sum_to_one_and_match_the_pixels(mixup, cutmix):
    # Image i is the constant value 10 * (i + 1), label i one-hot: each mixed pixel and each
    # mixed label must come from the same pair and the same proportion.
    n = 8
    values = 10.0 * (np.arange(n) + 1)
    images = tf.constant(np.broadcast_to(values[:, None, None, None], (n, 16, 16, 3)), tf.float32)
    labels = tf.one_hot(np.arange(n), n)
    mix = augment.make_mixing(mixup, cutmix, seed=3)
    mixed_any = False
    for _ in range(4):
        out_images, out_labels = (np.asarray(t) for t in mix(images, labels))
        np.testing.assert_allclose(out_labels.sum(axis=1), 1.0, atol=1e-5)
        assert (out_labels >= -1e-6).all()
        # The mean pixel equals the label-weighted mean of the source values.
        np.testing.assert_allclose(
            out_images.mean(axis=(1, 2, 3)), out_labels @ values, rtol=1e-3, atol=0.05
        )
        mixed_any |= bool((out_labels.max(axis=1) < 0.999).any())
    assert mixed_any
    assert augment.make_mixing(0.0, 0.0, 0) is None


# ----------------------------------------------------------------------------- class weights
def test_balanced_class_weights_from_the_train_split(tmp_path):
    root = write_class_folders(tmp_path / "imbalanced", num_classes=3, per_class=30)
    for j in range(20):  # class_1 keeps 10 files, class_2 keeps 30, class_0 keeps 25
        (root / "class_1" / f"img_{j:03d}.{('jpg', 'png')[j % 2]}").unlink()
    for j in range(5):
        (root / "class_0" / f"img_{j:03d}.{('jpg', 'png')[j % 2]}").unlink()
    dataset = data.load_image_folder(str(root), 16, 20)
    listing = data.list_image_folder(str(root), 20)
    expected_counts = [listing.splits["train"][1].count(c) for c in range(3)]
    counts = data.class_counts(dataset.train, 3)
    assert counts == expected_counts and counts[1] < counts[0] < counts[2]
    weights = data.balanced_class_weights(counts)
    total = sum(counts)
    for c in range(3):
        assert weights[c] == pytest.approx(total / (3 * counts[c]))
    # Every class then carries the same total weight in the loss.
    assert len({round(weights[c] * counts[c], 6) for c in range(3)}) == 1
    assert data.balanced_class_weights([4, 0]) == {0: 0.5, 1: 0.0}


# ----------------------------------------------------------------------------- schedules
def test_warmup_schedules_and_serialization():
    cosine = schedules.WarmupSchedule(1.0, "cosine", total_steps=110, warmup_steps=10)
    assert float(cosine(0)) == pytest.approx(0.1)
    assert float(cosine(9)) == pytest.approx(1.0)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    exponential = schedules.WarmupSchedule(2.0, "exponential", total_steps=100)
    assert float(exponential(0)) == pytest.approx(2.0)
    assert float(exponential(100)) == pytest.approx(0.02)
    assert schedules.learning_rate(0.1, "constant", 100, 0) == 0.1
    restored = keras.optimizers.schedules.deserialize(
        json.loads(json.dumps(keras.optimizers.schedules.serialize(cosine)))
    )
    assert isinstance(restored, schedules.WarmupSchedule)
    assert float(restored(60)) == float(cosine(60))


def test_reduce_lr_on_plateau_and_a_schedule_conflict_is_explained(capsys):
    code = cli.main(["train", "--lr_schedule=cosine", "--reduce_lr_patience=2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot change a scheduled learning rate" in err
    assert len(err.strip().splitlines()) == 1


def test_mixed_precision_computes_in_bfloat16_with_a_float32_output(folder, tmp_path):
    config = tiny(folder, tmp_path, precision="mixed_bfloat16")
    model = model_lib.build_model(config, 3)
    assert model_lib.get_backbone(model).get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    dataset = data.load_image_folder(str(folder), 16, 20)
    model.fit(data.make_pipeline(dataset.train, 3, 8, True, 0), epochs=1, verbose=0)
    out = model.predict(np.zeros((2, 16, 16, 3), "float32"), verbose=0)
    assert out.dtype == np.float32 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)


# ----------------------------------------------------------------------------- gates, averages
@pytest.mark.slow
def test_min_accuracy_gate_exits_3_keeps_the_run_and_exports_nothing(folder, tmp_path, capsys):
    run = tmp_path / "run"
    # --learning_rate=1e-9 learns nothing with fit: chance accuracy.
    flags = ["--epochs=1", "--learning_rate=1e-9", "--head_solver=fit", "--min_accuracy=0.99"]
    code = cli.main(["train", *tiny_flags(folder, run, *flags)])
    err = capsys.readouterr().err
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "below --min_accuracy=0.99" in err
    assert "Traceback" not in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["export_path"] is None and metrics["min_accuracy"]["accuracy"] < 0.99
    assert (run / "checkpoints" / "best.weights.h5").exists()
    assert not os.path.exists(run / "export") or os.listdir(run / "export") == []


@pytest.mark.slow
def test_ema_and_checkpoint_average_are_evaluated_beside_the_best(folder, tmp_path):
    # A low rate: the losses stay apart from 0, so the three models can differ.
    config = tiny(folder, tmp_path, epochs=4, learning_rate=0.001, ema=0.9, average_checkpoints=2)
    metrics = train.train_and_evaluate(config)
    candidates = metrics["candidates"]
    assert set(candidates) == {"best_checkpoint", "ema", "average_of_best_2"}
    losses = {name: c["val_loss"] for name, c in candidates.items()}
    assert len(set(losses.values())) == 3, losses  # three different models
    assert metrics["exported_weights"] == min(losses, key=losses.get)
    assert metrics["val_loss"] == pytest.approx(losses[metrics["exported_weights"]], rel=1e-5)
    # `evaluate` finds the exported weights when they are not the best checkpoint's.
    final_exists = (tmp_path / rundir.FINAL_WEIGHTS).exists()
    assert final_exists == (metrics["exported_weights"] != "best_checkpoint")

    # The average is the element-wise mean of the two kept files.
    top = tmp_path / rundir.TOP_CHECKPOINTS
    index = json.loads((top / "index.json").read_text())
    assert len(index) == 2 and sorted(os.listdir(top)) == sorted([*index, "index.json"])
    model = model_lib.build_model(config, 3)
    files = [str(top / name) for name in index]
    values = []
    for path in files:
        model.load_weights(path)
        values.append([np.array(w) for w in model.weights])
    averaging.average_weights(model, files)
    for w, a, b in zip(model.weights, *values):
        np.testing.assert_allclose(np.array(w), (a + b) / 2, rtol=1e-6, atol=1e-7)


def test_jit_compile_turns_op_determinism_off_so_keras_keeps_xla(folder, tmp_path):
    from tensorflow.python.framework import config as tf_config

    try:
        train.seed_everything(tiny(folder, tmp_path, jit_compile=True))
        assert not tf_config.is_op_determinism_enabled()
        assert (
            model_lib.build_model(tiny(folder, tmp_path, jit_compile=True), 3).jit_compile is True
        )
    finally:
        train.seed_everything(tiny(folder, tmp_path, deterministic=True))
    assert tf_config.is_op_determinism_enabled()
    assert model_lib.build_model(tiny(folder, tmp_path), 3).jit_compile is False


def test_op_determinism_only_with_deterministic(folder, tmp_path):
    from tensorflow.python.framework import config as tf_config

    try:
        train.seed_everything(tiny(folder, tmp_path, deterministic=False))
        assert not tf_config.is_op_determinism_enabled()
        train.seed_everything(tiny(folder, tmp_path, deterministic=True))
        assert tf_config.is_op_determinism_enabled()
    finally:
        tf_config.disable_op_determinism()


def test_layer_lr_decay_scales_each_layers_rate_under_mirrored_strategy(folder, tmp_path):
    config = tiny(folder, tmp_path, unfreeze="all", learning_rate=0.01, layer_lr_decay=0.5)
    strategy = distribute.make_strategy("mirrored", 2)
    with strategy.scope():
        model = model_lib.build_model(config, 3)
    backbone = model_lib.get_backbone(model)
    kernels = {
        "predictions": model.get_layer("predictions").kernel,
        **{n: backbone.get_layer(n).kernel for n in ("conv1", "conv2", "conv3")},
    }
    before = {n: np.array(k) for n, k in kernels.items()}
    dataset = data.load_image_folder(str(folder), 16, 20)
    model.fit(
        data.make_pipeline(dataset.train, 3, 8, True, 0), epochs=1, steps_per_epoch=1, verbose=0
    )
    # Adam's first step moves each weight by ~rate (g / |g|): the median shows each layer's rate.
    rate = {n: float(np.median(np.abs(np.array(k) - before[n]))) for n, k in kernels.items()}
    assert rate["predictions"] == pytest.approx(0.01, rel=0.05)
    assert rate["conv3"] == pytest.approx(0.005, rel=0.05)
    assert rate["conv2"] == pytest.approx(0.0025, rel=0.05)
    assert rate["conv1"] == pytest.approx(0.00125, rel=0.05)


def test_hub_modules_and_text_refuse_what_they_cannot_do(tmp_path):
    hub = "https://tfhub.dev/google/nnlm-en-dim50/2"
    for overrides in ({"warmup_epochs": 1, "unfreeze": "all"}, {"layer_lr_decay": 0.9}):
        with pytest.raises(UserError, match="TF Hub module is one layer"):
            validation.hub_backbone_options(Config(backbone=hub, epochs=3, **overrides))
    table = tmp_path / "reviews.csv"
    table.write_text("text,label\ngood,pos\nbad,neg\n")
    with pytest.raises(UserError, match="text data takes none"):
        validation.text_takes_no_augmentation(
            Config(backbone=hub, data=str(table), augment="light")
        )
    validation.hub_backbone_options(Config(backbone=hub, data=str(table)))  # the defaults pass
    validation.text_takes_no_augmentation(Config(backbone=hub, data=str(table)))
