"""Frozen-backbone feature caching: run the backbone once per image, train the head on features.

With the backbone frozen and no random augmentation, every epoch would push the same pixels
through the same backbone to get the same features. Computing them once (one pass at inference
speed) and training only the head on them makes later epochs cost ~1% of an uncached epoch.

The head trained here is made of the *same layer objects* as the full classifier
(`output_dropout`, `predictions`), so the full model is trained too: evaluation and export run
the full model, pixels in, exactly as without the cache.

Modes: `memory` keeps the features in RAM (the default: they are small, e.g. 1,280 floats per
image for MobileNetV2); `disk` writes them as .npy files keyed by a fingerprint of backbone,
weights, image size and the exact inputs, reads them back memory-mapped (bounded RSS) and reuses
them across runs until any of those change.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import sampling

POOLER, DROPOUT, PREDICTIONS = "pooler", "output_dropout", "predictions"


@dataclasses.dataclass(frozen=True)
class Features:
    """Features and one-hot labels of one split (arrays may be memory-mapped)."""

    features: np.ndarray  # float32 [n, dim]
    labels: np.ndarray  # float32 [n, classes]

    @property
    def count(self) -> int:
        return len(self.labels)


def split_classifier(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(extractor: pixels -> pooled features, head: features -> probabilities), sharing layers."""
    extractor = keras.Model(model.inputs, model.get_layer(POOLER).output, name="feature_extractor")
    features_in = keras.Input(shape=extractor.output_shape[1:], name="features")
    x = model.get_layer(DROPOUT)(features_in)
    head = keras.Model(features_in, model.get_layer(PREDICTIONS)(x), name="head")
    return extractor, head


def fingerprint(parts: dict, split_keys: tf.data.Dataset) -> str:
    """A key for the cache: the given facts plus every input of the split, in order.

    File paths are hashed with their size and modification time, so an edited photo
    invalidates the cache; encoded images (TFDS) are hashed by content.
    """
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode())
    for key in split_keys.as_numpy_iterator():
        digest.update(key)
        if isinstance(key, bytes) and len(key) < 4096 and os.path.exists(key):
            stat = os.stat(key)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class _Silent:
    def add(self, n: int) -> None:
        pass


# extractor -> its compiled forward pass, so train, val and test share one trace (tracing a
# backbone takes seconds: a quarter of a feature pass over a few thousand small images).
_FORWARD = weakref.WeakKeyDictionary()


def _batches(pipeline: tf.data.Dataset, extractor: keras.Model):
    # One compiled graph for the whole pass: calling the model eagerly runs op by op.
    forward = _FORWARD.get(extractor)
    if forward is None:
        forward = tf.function(lambda x: extractor(x, training=False), reduce_retracing=True)
        _FORWARD[extractor] = forward
    for x, y in pipeline:
        yield np.asarray(forward(x), np.float32), np.asarray(y, np.float32)


def extract(
    extractor: keras.Model,
    pipeline: tf.data.Dataset,
    count: int,
    path: str | None = None,
    verbose: int = 1,
) -> Features:
    """Runs the extractor over a batched, unshuffled (pixels, one-hot) pipeline once.

    Args:
      extractor: from `split_classifier`.
      pipeline: `data.make_pipeline(..., training=False)`.
      count: number of examples (for the progress bar and the disk arrays).
      path: a folder to write `features.npy`/`labels.npy` into (memory-mapped, never all in
        RAM); None keeps them in memory.
    """
    progress = keras.utils.Progbar(count, unit_name="image") if verbose else _Silent()
    if path is None:
        feats, labels = [], []
        for f, y in _batches(pipeline, extractor):
            feats.append(f)
            labels.append(y)
            progress.add(len(y))
        return Features(np.concatenate(feats), np.concatenate(labels))
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    feats = labels = None
    start = 0
    for f, y in _batches(pipeline, extractor):
        if feats is None:
            feats = np.lib.format.open_memmap(
                os.path.join(tmp, "features.npy"), "w+", np.float32, (count, f.shape[1])
            )
            labels = np.lib.format.open_memmap(
                os.path.join(tmp, "labels.npy"), "w+", np.float32, (count, y.shape[1])
            )
        feats[start : start + len(y)] = f
        labels[start : start + len(y)] = y
        start += len(y)
        progress.add(len(y))
    if start != count:
        raise ValueError(f"expected {count} examples, the pipeline gave {start}")
    feats.flush()
    labels.flush()
    del feats, labels
    os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)
    return load(path)


def load(path: str) -> Features:
    return Features(
        np.load(os.path.join(path, "features.npy"), mmap_mode="r"),
        np.load(os.path.join(path, "labels.npy"), mmap_mode="r"),
    )


def cached_extract(
    extractor: keras.Model,
    pipeline: tf.data.Dataset,
    count: int,
    cache_dir: str | None,
    key: str,
    verbose: int = 1,
) -> Features:
    """`extract`, reusing `<cache_dir>/<key>` when it is there (disk mode)."""
    if cache_dir is None:
        return extract(extractor, pipeline, count, verbose=verbose)
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "labels.npy")):
        logging.info("Reusing cached features %s", path)
        return load(path)
    os.makedirs(cache_dir, exist_ok=True)
    return extract(extractor, pipeline, count, path, verbose)


def dataset(
    features: Features, batch_size: int, training: bool, seed: int, balanced: bool = False
) -> tf.data.Dataset:
    """Batches of (features, one-hot); shuffled by index each epoch when training.

    Index-based so a memory-mapped array is read a batch at a time, never copied whole.
    `balanced` (training only, --sampling=balanced): rows drawn class-balanced
    (sampling.balanced_indices), as many per epoch as there are rows.
    """
    n = features.count
    balanced = balanced and training
    indices = tf.data.Dataset.range(n)
    if balanced:
        indices = sampling.balanced_indices(features.labels, seed).take(n)
    elif training:
        indices = indices.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    dim, classes = features.features.shape[1], features.labels.shape[1]

    def gather(idx):
        idx = np.sort(idx)  # memory-mapped reads are fastest in order; the batch is a set
        return features.features[idx], features.labels[idx]

    def read(idx):
        f, y = tf.numpy_function(gather, [idx], (tf.float32, tf.float32), stateful=False)
        f.set_shape([None, dim])
        y.set_shape([None, classes])
        return f, y

    if balanced or isinstance(features.features, np.memmap):
        return indices.batch(batch_size).map(read).prefetch(tf.data.AUTOTUNE)
    ds = tf.data.Dataset.from_tensor_slices((features.features, features.labels))
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
