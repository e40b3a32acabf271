"""`digits_cnn`: the small CNN behind the offline default (see offline_default.py).

A leaf constructor, like a `keras.applications` function: it builds the network and loads
weights; it never trains. Its "imagenet" weights are those of its pretraining on the digits
0-4, kept in Keras' cache like a downloaded weights file (offline_default.pretrain writes them).
"""

import os

import keras

from tf_finetune.errors import UserError

WEIGHTS_FILE = "tf_finetune_digits_cnn_0to4_v1.weights.h5"


def pretrained_weights_file() -> str:
    """Where the pretrained weights live: Keras' weights cache ($KERAS_HOME/models)."""
    # keras.src: Keras has no public accessor for KERAS_HOME, where it caches weights itself.
    from keras.src.backend import config as keras_config

    return os.path.join(keras_config.keras_home(), "models", WEIGHTS_FILE)


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
        path = pretrained_weights_file()
        if not os.path.exists(path):
            raise UserError(
                f"digits_cnn has no pretrained weights at {path}: run the offline default "
                "(tf-finetune train with no --data) once, or pass --weights=none."
            )
        model.load_weights(path)
    elif weights:
        model.load_weights(weights)
    return model
