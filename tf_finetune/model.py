"""Model assembly: raw pixels -> preprocessing -> frozen backbone -> named head layers."""

import keras

from tf_finetune import backbones


def build_classifier(
    spec: backbones.BackboneSpec,
    num_classes: int,
    image_size: int,
    weights: str | None,
    dropout: float,
    alpha: float = 1.0,
) -> keras.Model:
    """Builds the classifier; the backbone starts frozen (`trainable=False`).

    The model takes raw 0-255 RGB pixels [batch, size, size, 3] and returns softmax
    probabilities (float32 even under mixed precision).
    """
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = backbones.Preprocessing(spec.preprocessing, name="preprocessing")(inputs)
    backbone = backbones.build_backbone(spec, image_size, weights, alpha)
    backbone.trainable = False
    # training=False keeps BatchNormalization in inference mode even when the backbone is
    # unfrozen later: its statistics were learned on far more data than the new task has.
    x = backbone(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pooler")(x)
    x = keras.layers.Dropout(dropout, name="output_dropout")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def get_backbone(model: keras.Model) -> keras.Model:
    """The backbone inside a classifier built by `build_classifier`."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one backbone model inside {model.name}, found {len(nested)}")
    return nested[0]


def unfreeze(model: keras.Model, top_layers: int | None) -> list[str]:
    """Makes the top `top_layers` backbone layers that have weights trainable (None: all).

    BatchNormalization layers stay frozen whatever the depth (see `build_classifier`).

    Returns:
      The names of the backbone layers that are now trainable.
    """
    backbone = get_backbone(model)
    if top_layers == 0:
        backbone.trainable = False
        return []
    backbone.trainable = True
    chosen = []
    for layer in reversed(backbone.layers):
        trainable = (
            bool(layer.weights)
            and not isinstance(layer, keras.layers.BatchNormalization)
            and (top_layers is None or len(chosen) < top_layers)
        )
        layer.trainable = trainable
        if trainable:
            chosen.append(layer.name)
    return chosen[::-1]
