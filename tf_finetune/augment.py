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


def _beta(alpha: float, shape, seed: int) -> tf.Tensor:
    """Beta(alpha, alpha) samples from two Gamma draws."""
    a = tf.random.gamma(shape, alpha, seed=seed)
    b = tf.random.gamma(shape, alpha, seed=seed + 1)
    return a / (a + b)


def cutmix(images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: int):
    """CutMix (Yun et al. 2019) on a batch: each image gets a box pasted from another image of
    the batch; its label becomes the two one-hot labels weighted by the pixels' true areas.

    Not `keras.layers.CutMix`: it weights labels by the box's fractional area while whole pixels
    are pasted (up to ~10% off at 16 px), and draws alpha from U(0, factor) rather than
    Beta(alpha, alpha). Here, as timm's `correct_lam`, the label weight is the pasted area.
    """
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    lam = _beta(alpha, [n], seed)
    cut = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.round(cut * tf.cast(h, tf.float32)), tf.int32)
    cut_w = tf.cast(tf.round(cut * tf.cast(w, tf.float32)), tf.int32)
    cy = tf.random.uniform([n], 0, h, tf.int32, seed=seed + 2)
    cx = tf.random.uniform([n], 0, w, tf.int32, seed=seed + 3)
    y0, y1 = (
        tf.clip_by_value(cy - cut_h // 2, 0, h),
        tf.clip_by_value(cy + cut_h - cut_h // 2, 0, h),
    )
    x0, x1 = (
        tf.clip_by_value(cx - cut_w // 2, 0, w),
        tf.clip_by_value(cx + cut_w - cut_w // 2, 0, w),
    )
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]
    inside = (
        (rows >= y0[:, None, None])
        & (rows < y1[:, None, None])
        & (cols >= x0[:, None, None])
        & (cols < x1[:, None, None])
    )
    partner = tf.random.shuffle(tf.range(n), seed=seed + 4)
    mixed = tf.where(inside[..., None], tf.gather(images, partner), images)
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
    labels = (1.0 - area[:, None]) * labels + area[:, None] * tf.gather(labels, partner)
    return mixed, labels


def make_mixing(mixup: float, cutmix_alpha: float, seed: int):
    """A batch function (images, one-hot labels) -> mixed images and labels, or None.

    MixUp is `keras.layers.MixUp` (image and label blended by the same weight); CutMix is
    `cutmix`. Either way each label row still sums to 1. With both on, each batch uses one of
    the two, chosen at random (as timm does).
    """
    mixers = []
    if mixup > 0:
        layer = keras.layers.MixUp(alpha=mixup, seed=seed + 10)

        def apply_mixup(images, labels):
            out = layer({"images": images, "labels": labels}, training=True)
            return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

        mixers.append(apply_mixup)
    if cutmix_alpha > 0:
        mixers.append(lambda images, labels: cutmix(images, labels, cutmix_alpha, seed + 20))
    if not mixers:
        return None
    if len(mixers) == 1:
        return mixers[0]

    def either(images, labels):
        coin = tf.random.uniform([], seed=seed + 12)
        return tf.cond(
            coin < 0.5, lambda: mixers[0](images, labels), lambda: mixers[1](images, labels)
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
