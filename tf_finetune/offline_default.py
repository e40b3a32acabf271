"""The offline default: real transfer learning with nothing to download.

Weights and data sets cannot be downloaded on an offline machine, so the default run uses the
real handwritten digits that scikit-learn ships (1,797 8x8 scans, UCI "optdigits"):

- source task: `digits_cnn` (digits.py) is pretrained on the digits 0-4 (all of them), once,
  and its weights are kept in Keras' cache like any downloaded weights file (`pretrain`, an
  explicit step of the run, before it seeds anything);
- target task: the digits 5-9, with only a few labelled training images per class, written as
  PNG class folders (train/ val/ test/) so they go through the same folder pipeline as a
  user's photos (`target_folder`);
- baseline: the same network trained from scratch on the same few images (`scratch_baseline`).
"""

import dataclasses
import os
import shutil

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import atomic, backbones, data, digits, head, scoring
from tf_finetune import model as model_lib

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
CLASS_NAMES = ("five", "six", "seven", "eight", "nine")
SHOTS_PER_CLASS = 10  # labelled training images per target class
PRETRAIN_SIZE = 32
PRETRAIN_EPOCHS = 15
PRETRAIN_SEED = 1234


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits as uint8 grayscale [n, 8, 8] in 0-255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def pretrain() -> str:
    """The cached source-task weights; pretrains on digits 0-4 (a few seconds) when missing.

    Seeds the global RNGs: call it before the run seeds its own.
    """
    path = backbones.digits_weights_file()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _pretrain(path)
    return path


def _pretrain(path: str) -> None:
    logging.info("Pretraining digits_cnn on the digits 0-4 (once; cached in %s)", path)
    images, labels = _digits_uint8()
    keep = np.isin(labels, SOURCE_DIGITS)
    x = np.repeat(images[keep][..., None], 3, axis=-1)
    x = data.to_uint8(data.resize(tf.constant(x), PRETRAIN_SIZE)).numpy().astype("float32")
    y = labels[keep]
    # Callers run this before choosing their strategy and seed (train.py does).
    keras.utils.set_random_seed(PRETRAIN_SEED)
    backbone = digits.build_digits_backbone(PRETRAIN_SIZE, None)
    inputs = keras.Input((PRETRAIN_SIZE, PRETRAIN_SIZE, 3))
    features = backbone(backbones.Preprocessing("tf")(inputs))
    outputs = head.add_head(features, len(SOURCE_DIGITS), dropout=0.0)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x, y, batch_size=64, epochs=PRETRAIN_EPOCHS, verbose=0, validation_split=0.1
    )
    logging.info(
        "digits_cnn source task: val accuracy %.3f on digits 0-4",
        history.history["val_accuracy"][-1],
    )
    atomic.save_weights(backbone, path)


def write_target_folder(root: str, shots: int = SHOTS_PER_CLASS, seed: int = 0) -> str:
    """Writes the digits 5-9 as PNGs in root/{train,val,test}/<class>/ and returns root.

    `shots` images per class for training; of the rest, a third for validation and two
    thirds for the test. Idempotent: an existing complete folder is reused.
    """
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return root
    images, labels = _digits_uint8()
    rng = np.random.default_rng(seed)
    tmp = root + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for digit, name in zip(TARGET_DIGITS, CLASS_NAMES):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        rest = idx[shots:]
        n_val = len(rest) // 3
        parts = {"train": idx[:shots], "val": rest[:n_val], "test": rest[n_val:]}
        for split, indices in parts.items():
            folder = os.path.join(tmp, split, name)
            os.makedirs(folder)
            for i in indices:
                png = tf.io.encode_png(images[i][..., None]).numpy()
                with open(os.path.join(folder, f"digit_{i:04d}.png"), "wb") as f:
                    f.write(png)
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.rename(tmp, root)
    return root


def data_dir() -> str:
    """Where the offline default's PNG folders are written (Keras' datasets cache)."""
    name = f"tf_finetune_digits_5to9_{SHOTS_PER_CLASS}shot"
    return os.path.join(backbones.keras_home(), "datasets", name)


def data_folder(config) -> str | None:
    """The target task's image folder when `config` is the offline default (written on first
    use), else None (the run reads --data)."""
    return write_target_folder(data_dir()) if config.is_offline_default else None


# Seeds of the comparison with training from scratch: the run's own, then the next ones.
COMPARISON_SEEDS = 3
SCRATCH_BATCHNORM_MOMENTUM = 0.9


class KeepBest(keras.callbacks.Callback):
    """Restores the weights of the epoch with the lowest val_loss when fit ends: the rule the
    run's own best checkpoint follows, so both sides of the comparison are selected alike."""

    def on_train_begin(self, logs=None):
        self.best, self.weights = np.inf, None

    def on_epoch_end(self, epoch, logs=None):
        if logs["val_loss"] < self.best:
            self.best, self.weights = logs["val_loss"], self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


def scratch_model(config, num_classes: int) -> keras.Model:
    """The same network from random init, every layer trained, BatchNormalization included
    and in training mode while fitting: from scratch there are no statistics worth keeping
    frozen (the fine-tuned model keeps its pretrained ones, see model.build_classifier)."""
    spec = backbones.get_spec(config.backbone)
    inputs = keras.Input((config.image_size, config.image_size, 3), name="pixels")
    x = backbones.Preprocessing(spec.preprocessing, name="preprocessing")(inputs)
    backbone = backbones.build_backbone(spec, config.image_size, None, config.backbone_alpha)
    backbone.trainable = True
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Keras' 0.99 leaves the moving statistics mostly at their initial values after
            # the few hundred steps a small data set gives; 0.9 lets them reach the data's.
            layer.momentum = SCRATCH_BATCHNORM_MOMENTUM
    outputs = head.add_head(backbone(x), num_classes, config.dropout)
    model = keras.Model(inputs, outputs, name="scratch_classifier")
    model_lib.compile_model(model, config, num_classes)
    return model


def _fit_and_score(model: keras.Model, config, pipelines: dict) -> dict[str, float]:
    model.fit(
        pipelines["train"],
        validation_data=pipelines["val"],
        epochs=config.epochs,
        callbacks=[KeepBest()],
        verbose=0,
        shuffle=False,
    )
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    return scoring.evaluate_splits(model, evaluated)


def _summary(runs: list[dict[str, float]]) -> dict:
    return {
        key: {
            "runs": [round(r[key], 4) for r in runs],
            "mean": float(np.mean([r[key] for r in runs])),
            "sd": float(np.std([r[key] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
        }
        for key in runs[0]
    }


def compare_with_scratch(
    config, pipelines: dict, num_classes: int, strategy: tf.distribute.Strategy, run: dict
) -> dict:
    """Fine-tuned vs from scratch over COMPARISON_SEEDS seeds, each side with the same data,
    epochs and checkpoint selection (lowest val_loss).

    Args:
      run: this run's own val/test metrics (the fine-tuned side's first seed).

    Returns:
      metrics.json entries: `offline_comparison` (per seed, mean and sd of each side) and
      `scratch_<metric>` (the scratch side's means).
    """
    seeds = [config.seed + i for i in range(COMPARISON_SEEDS)]
    keys = [k for k in run if k.split("_", 1)[0] in ("val", "test")]
    fine_tuned, scratch = [{k: run[k] for k in keys}], []
    for seed in seeds:
        seeded = dataclasses.replace(config, seed=seed)
        if seed != config.seed:
            keras.utils.set_random_seed(seed)
            with strategy.scope():
                model = model_lib.build_model(seeded, num_classes)
            fine_tuned.append(_fit_and_score(model, seeded, pipelines))
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = scratch_model(seeded, num_classes)
        scratch.append(_fit_and_score(model, seeded, pipelines))
    fine_tuned = [{k: r[k] for k in scratch[0]} for r in fine_tuned]
    comparison = {"seeds": seeds, "fine_tuned": _summary(fine_tuned), "scratch": _summary(scratch)}
    means = {f"scratch_{k}": v["mean"] for k, v in comparison["scratch"].items()}
    return {"offline_comparison": comparison, **means}
