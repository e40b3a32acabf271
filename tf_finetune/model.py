"""Model assembly: raw pixels -> preprocessing -> frozen backbone -> named head layers."""

import math

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


def unfreeze(model: keras.Model, top_layers: int | float | None) -> list[str]:
    """Makes the top backbone layers that have weights trainable.

    BatchNormalization layers stay frozen whatever the depth: trainable BN would update its
    moving statistics from the new task's small batches, and unfreezing them would also let
    the optimizer move gamma/beta away from the statistics the upper layers were trained
    with; the backbone is called with training=False (see `build_classifier`), so BN runs in
    inference mode and the pretrained features are not wrecked in the first fine-tuning steps
    (the Keras transfer-learning guide's advice).

    Args:
      model: built by `build_classifier`.
      top_layers: 0 = frozen, N = the top N weighted non-BN layers, a float in (0, 1] = that
        fraction of them (rounded up), None = all of them.

    Returns:
      The names of the backbone layers that are now trainable.
    """
    backbone = get_backbone(model)
    if top_layers == 0:
        backbone.trainable = False
        return []
    if isinstance(top_layers, float):
        weighted = [
            layer
            for layer in backbone.layers
            if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
        ]
        top_layers = max(1, math.ceil(top_layers * len(weighted)))
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
