"""The offline default: real transfer learning with nothing to download.

Weights and data sets cannot be downloaded on an offline machine, so the default run uses the
real handwritten digits that scikit-learn ships (1,797 8x8 scans, UCI "optdigits"):

- source task: a small CNN (`digits_cnn`) is pretrained on the digits 0-4 (all of them), once,
  and its weights are kept in Keras' cache like any downloaded weights file;
- target task: the digits 5-9, with only a few labelled training images per class, written as
  PNG class folders (train/ val/ test/) so they go through the same folder pipeline as a
  user's photos.

`tf-finetune train` then fine-tunes the frozen pretrained CNN on 5-9 and reports the result next
to the same network trained from scratch on the same few images.
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
CLASS_NAMES = ("five", "six", "seven", "eight", "nine")
SHOTS_PER_CLASS = 10  # labelled training images per target class
WEIGHTS_FILE = "tf_finetune_digits_cnn_0to4_v1.weights.h5"
PRETRAIN_SIZE = 32
PRETRAIN_EPOCHS = 15
PRETRAIN_SEED = 1234


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits as uint8 grayscale [n, 8, 8] in 0-255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def build_digits_backbone(image_size: int, weights: str | None) -> keras.Model:
    """The small CNN: three conv-BN-ReLU blocks, no top; weights 'imagenet' = its pretraining."""
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for i, filters in enumerate((32, 64, 128)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    model = keras.Model(inputs, x, name="digits_cnn")
    if weights == "imagenet":
        model.load_weights(pretrained_weights_path())
    elif weights:
        model.load_weights(weights)
    return model


def pretrained_weights_path() -> str:
    """The cached source-task weights; pretrains on digits 0-4 (a few seconds) when missing."""
    from tf_finetune.backbones import keras_cache_dir

    path = os.path.join(keras_cache_dir(), WEIGHTS_FILE)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _pretrain(path)
    return path


def _pretrain(path: str) -> None:
    from tf_finetune.backbones import Preprocessing
    from tf_finetune.data import resize, to_uint8

    logging.info("Pretraining digits_cnn on the digits 0-4 (once; cached in %s)", path)
    images, labels = _digits_uint8()
    keep = np.isin(labels, SOURCE_DIGITS)
    x = np.repeat(images[keep][..., None], 3, axis=-1)
    x = to_uint8(resize(tf.constant(x), PRETRAIN_SIZE)).numpy().astype("float32")
    y = labels[keep]
    # Callers run this before choosing their strategy and seed (train.py does).
    keras.utils.set_random_seed(PRETRAIN_SEED)
    backbone = build_digits_backbone(PRETRAIN_SIZE, None)
    inputs = keras.Input((PRETRAIN_SIZE, PRETRAIN_SIZE, 3))
    features = backbone(Preprocessing("tf")(inputs))
    outputs = keras.layers.Dense(len(SOURCE_DIGITS), activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(features)
    )
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
    # Write then rename: a killed pretraining never leaves a half-written weights file.
    fd, tmp = tempfile.mkstemp(suffix=".weights.h5", dir=os.path.dirname(path))
    os.close(fd)
    os.remove(tmp)
    backbone.save_weights(tmp)
    os.replace(tmp, path)


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


def default_data_dir() -> str:
    """Where the offline default's PNG folders are written (Keras' datasets cache)."""
    from keras.src.backend import config as keras_config

    return os.path.join(
        keras_config.keras_home(), "datasets", f"tf_finetune_digits_5to9_{SHOTS_PER_CLASS}shot"
    )
