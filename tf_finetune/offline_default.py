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


def scratch_baseline(
    config, pipelines: dict, num_classes: int, strategy: tf.distribute.Strategy
) -> dict[str, float]:
    """The same network trained from random init on the same data, epochs and seed."""
    scratch = dataclasses.replace(config, weights="none", unfreeze="all", warmup_epochs=0)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = model_lib.build_model(scratch, num_classes)
    model.fit(pipelines["train"], epochs=config.epochs, verbose=0, shuffle=False)
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    return {f"scratch_{k}": v for k, v in scoring.evaluate_splits(model, evaluated).items()}
