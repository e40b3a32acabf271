"""`digits_cnn`: the small CNN behind the offline default (see offline_default.py).

A leaf constructor, like a `keras.applications` function: it builds the network and loads
weights; it never trains. Its "imagenet" weights are those of its pretraining on the digits
0-4, kept in Keras' cache like a downloaded weights file (offline_default.pretrain writes them,
backbones.digits_weights_file names them).
"""

import keras

WEIGHTS_FILE = "tf_finetune_digits_cnn_0to4_v1.weights.h5"


def build_digits_backbone(image_size: int, weights: str | None) -> keras.Model:
    """The small CNN: three conv-BN-ReLU blocks, no top; `weights` a file path or None."""
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for i, filters in enumerate((32, 64, 128)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    model = keras.Model(inputs, x, name="digits_cnn")
    if weights:
        model.load_weights(weights)
    return model
