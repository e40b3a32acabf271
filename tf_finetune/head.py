"""The classification head every classifier here ends in (Keras Applications, TF Hub, the
offline default's pretraining): `pooler` -> `output_dropout` -> `predictions`.

The names are a contract: feature caching (features.py) cuts the model at `pooler`, and the
head trained on cached features is made of the `output_dropout` and `predictions` layers.
"""

import keras

from tf_finetune.errors import UserError


def add_head(
    features,
    num_classes: int,
    dropout: float,
    source: str = "the backbone",
    multi_label: bool = False,
):
    """Pools `features` (a feature map, a sequence or a vector) and classifies them.

    Returns probabilities, float32 even under mixed precision: softmax over the classes, or
    (`multi_label`) one independent sigmoid per label.
    """
    rank = len(features.shape)
    if rank == 4:
        pooler = keras.layers.GlobalAveragePooling2D(name="pooler")
    elif rank == 3:
        pooler = keras.layers.GlobalAveragePooling1D(name="pooler")
    elif rank == 2:  # feature vectors, pooled outputs and logits: nothing to pool
        pooler = keras.layers.Identity(name="pooler")
    else:
        raise UserError(
            f"{source} returns shape {features.shape}; need [batch, n] or a feature map."
        )
    x = pooler(features)
    x = keras.layers.Dropout(dropout, name="output_dropout")(x)
    return keras.layers.Dense(
        num_classes,
        activation="sigmoid" if multi_label else "softmax",
        dtype="float32",
        name="predictions",
    )(x)
