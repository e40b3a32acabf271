"""Training-time augmentation: Keras preprocessing layers, MixUp and CutMix, on tf.data batches.

The layers run in the training input pipeline (`augment_training_pipeline`), not inside the
model: the exported SavedModel is built from the model alone, so it has no random op and gives
identical outputs for identical inputs, and checkpoints look the same with or without
augmentation (the `evaluate` command loads them without knowing the flag). On a CPU host the
pipeline also augments the next batches while the accelerator trains on the current one (the
Keras guide's "option 2").
"""

import keras
import tensorflow as tf

# Each level: the Keras layers and their ranges (fractions of a full turn / of the size).
LEVELS = {
    "none": (),
    "light": (
        lambda seed: keras.layers.RandomFlip("horizontal", seed=seed),
        lambda seed: keras.layers.RandomRotation(0.05, fill_mode="reflect", seed=seed + 1),
        lambda seed: keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 2),
    ),
    "strong": (
        lambda seed: keras.layers.RandomFlip("horizontal", seed=seed),
        lambda seed: keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
        lambda seed: keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed + 2),
        lambda seed: keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 3),
        # value_range: the pipeline carries 0-255 pixels (preprocessing is inside the model).
        lambda seed: keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed + 4),
    ),
}


def make_augmentation(level: str, seed: int) -> keras.Sequential | None:
    """The `--augment` layers as one Sequential (None for `none`)."""
    layers = [make(seed) for make in LEVELS[level]]
    if not layers:
        return None
    return keras.Sequential(layers, name=f"augment_{level}")


def make_mixing(mixup: float, cutmix: float, seed: int):
    """A batch function (images, one-hot labels) -> mixed images and labels, or None.

    Uses `keras.layers.MixUp` / `keras.layers.CutMix`, which mix each image with another one of
    the batch and its one-hot label by the same weight, so each label row still sums to 1.
    With both on, each batch uses one of the two, chosen at random (as timm does).
    """
    mixers = []
    if mixup > 0:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed + 10))
    if cutmix > 0:
        mixers.append(keras.layers.CutMix(factor=cutmix, seed=seed + 11))
    if not mixers:
        return None

    def apply(layer, images, labels):
        out = layer({"images": images, "labels": labels}, training=True)
        return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

    if len(mixers) == 1:
        return lambda images, labels: apply(mixers[0], images, labels)

    def either(images, labels):
        coin = tf.random.uniform([], seed=seed + 12)
        return tf.cond(
            coin < 0.5,
            lambda: apply(mixers[0], images, labels),
            lambda: apply(mixers[1], images, labels),
        )

    return either


def augment_training_pipeline(
    ds: tf.data.Dataset, level: str, mixup: float, cutmix: float, seed: int
) -> tf.data.Dataset:
    """Applies `--augment`, then MixUp/CutMix, to batches of (float32 pixels, one-hot labels).

    Returns `ds` unchanged when everything is off.
    """
    augmentation = make_augmentation(level, seed)
    mixing = make_mixing(mixup, cutmix, seed)
    if augmentation is None and mixing is None:
        return ds

    def transform(images, labels):
        if augmentation is not None:
            images = tf.cast(augmentation(images, training=True), tf.float32)
            # Rotation/zoom interpolate and contrast stretches: keep valid 0-255 pixels.
            images = tf.clip_by_value(images, 0.0, 255.0)
        if mixing is not None:
            images, labels = mixing(images, labels)
        return images, labels

    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
