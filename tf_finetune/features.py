"""Frozen-backbone feature caching: run the backbone once per image, train the head on features.

With the backbone frozen and no random augmentation, every epoch would push the same pixels
through the same backbone to get the same features. Computing them once (one pass at inference
speed) and training only the head on them makes later epochs cost ~1% of an uncached epoch.

The head trained here is made of the *same layer objects* as the full classifier
(`output_dropout`, `predictions`), so the full model is trained too and is what is exported.
A run that ends head-only scores its val and test reports from their features (scoring.Cached)
and exports with the feature pass's compiled backbone (`traced_forward`): the same function as
the full model on pixels, without decoding val/test or tracing the backbone again.

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
    """Features and one-hot labels of one split (arrays may be memory-mapped).

    With `views` (--cache_views) each kept example has 1 + views rows in a row: its clean
    view, then its augmented views, all with its label.
    """

    features: np.ndarray  # float32 [n, dim]
    labels: np.ndarray  # float32 [n, classes]
    # Indices (in the split's order) of examples that failed to decode: not in the arrays.
    dropped: tuple[int, ...] = ()
    views: int = 0

    @property
    def count(self) -> int:
        """Rows: examples kept x (1 + views)."""
        return len(self.labels)


def split_classifier(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(extractor: pixels -> pooled features, head: features -> probabilities), sharing layers.

    The same pair for the same model every time: the extractor's compiled forward (traced by
    the feature pass) serves the test split's pass and the export (`traced_forward`).
    """
    if model in _SPLITS:
        return _SPLITS[model]
    extractor = keras.Model(model.inputs, model.get_layer(POOLER).output, name="feature_extractor")
    features_in = keras.Input(shape=extractor.output_shape[1:], name="features")
    x = model.get_layer(DROPOUT)(features_in)
    head = keras.Model(features_in, model.get_layer(PREDICTIONS)(x), name="head")
    _SPLITS[model] = extractor, head
    return extractor, head


def traced_forward(model: keras.Model, spec: tf.TensorSpec):
    """`model`'s forward as (compiled extractor forward, head) when a feature pass has traced
    the extractor for inputs of `spec` in this process, else None: calling that forward inside
    another tf.function reuses its graph instead of tracing the backbone again."""
    if model not in _SPLITS:
        return None
    extractor, head = _SPLITS[model]
    forward = _FORWARD.get(extractor, {}).get((tuple(spec.shape), spec.dtype))
    return (forward, head) if forward is not None else None


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
_SPLITS = weakref.WeakKeyDictionary()  # model -> split_classifier(model)


# The feature pass's batch: chosen for inference throughput, not the training batch size. A
# forward of MobileNetV2-0.35 at 128 px on 2 (loaded) cores, best of 5: 407 images/s at 32,
# 531 at 64, 486 at 128 (scripts/feature_pass.py measures the pass with it).
INFERENCE_BATCH = 64


def _batches(pipeline: tf.data.Dataset, extractor: keras.Model):
    """(indices or None, features, labels) per batch; a pipeline of (x, y) has no indices."""
    # One compiled graph for the whole pass: calling the model eagerly runs op by op. Traced
    # once, for any batch size (a trace per shape would trace the short last batch again).
    spec = pipeline.element_spec[-2]
    forwards = _FORWARD.setdefault(extractor, {})
    key = (tuple(spec.shape), spec.dtype)
    if key not in forwards:
        signature = [tf.TensorSpec(spec.shape, spec.dtype)]
        forwards[key] = tf.function(
            lambda x: extractor(x, training=False), input_signature=signature
        )
    forward = forwards[key]
    for batch in pipeline:
        index, x, y = batch if len(batch) == 3 else (None, *batch)
        index = None if index is None else index.numpy()
        yield index, forward(x).numpy(), y.numpy()


def _dropped(seen: np.ndarray, count: int) -> tuple[int, ...]:
    """Indices of 0..count-1 that the pass did not yield (examples that failed to decode)."""
    mask = np.ones(count, bool)
    mask[seen] = False
    return tuple(int(i) for i in np.flatnonzero(mask))


def extract(
    extractor: keras.Model,
    pipeline: tf.data.Dataset,
    count: int,
    path: str | None = None,
    verbose: int = 1,
    views: int = 0,
) -> Features:
    """Runs the extractor over a batched, unshuffled pipeline once.

    Args:
      extractor: from `split_classifier`.
      pipeline: `data.feature_pipeline` (index, pixels, one-hot: examples that fail to decode
        are left out and listed in the result's `dropped`) or `data.make_pipeline(...,
        training=False)` (pixels, one-hot).
      count: number of examples (for the progress bar and the arrays' size).
      path: a folder to write `features.npy`/`labels.npy` into (memory-mapped, never all in
        RAM); None keeps them in memory.
      views: augmented views per example in the pipeline (`data.feature_pipeline(...,
        views)`): it yields 1 + views rows per example, each with the example's index.
    """
    if views and len(pipeline.element_spec) != 3:
        raise ValueError("views need a pipeline of (index, pixels, labels)")
    rows = count * (1 + views)
    progress = keras.utils.Progbar(rows, unit_name="image") if verbose else _Silent()
    tmp = None
    if path is not None:
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    # Filled in place: no list of batches, no concatenation.
    classes = pipeline.element_spec[-1].shape[-1]
    feats, labels = _arrays(tmp, rows, extractor.output_shape[-1], classes)
    start, seen = 0, []
    for index, f, y in _batches(pipeline, extractor):
        if start + len(y) > rows:
            raise ValueError(f"expected {rows} rows, the pipeline gave more")
        feats[start : start + len(y)] = f
        labels[start : start + len(y)] = y
        seen.append(index if index is not None else np.arange(start, start + len(y)))
        start += len(y)
        progress.add(len(y))
    dropped = _dropped(np.concatenate(seen) if seen else np.zeros(0, int), count)
    if start != (count - len(dropped)) * (1 + views):
        raise ValueError(f"expected {rows} rows, the pipeline gave {start}")
    if tmp is None:
        return Features(feats[:start], labels[:start], dropped, views)
    return _publish(tmp, path, feats, labels, start, dropped, views)


def _arrays(tmp: str | None, count: int, dim: int, classes: int):
    if tmp is None:
        return np.empty((count, dim), np.float32), np.empty((count, classes), np.float32)
    return (
        np.lib.format.open_memmap(
            os.path.join(tmp, "features.npy"), "w+", np.float32, (count, dim)
        ),
        np.lib.format.open_memmap(
            os.path.join(tmp, "labels.npy"), "w+", np.float32, (count, classes)
        ),
    )


def _publish(tmp: str, path: str, feats, labels, rows: int, dropped: tuple, views: int) -> Features:
    """The written arrays (cut to `rows` when examples were dropped) and `dropped.json`, moved
    into `path` at once."""
    feats.flush()
    labels.flush()
    if rows < len(feats):  # rare: a file failed to decode; rewrite the arrays at their size
        for name, array in (("features.npy", feats), ("labels.npy", labels)):
            np.save(os.path.join(tmp, "cut.npy"), array[:rows])
            os.replace(os.path.join(tmp, "cut.npy"), os.path.join(tmp, name))
    del feats, labels
    with open(os.path.join(tmp, "dropped.json"), "w", encoding="utf-8") as f:
        json.dump(list(dropped), f)
    os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)
    return load(path, views)


def load(path: str, views: int = 0) -> Features:
    """Features written by `extract` (`views`: as extracted; the cache key names them)."""
    dropped = os.path.join(path, "dropped.json")
    skipped = ()
    if os.path.exists(dropped):
        with open(dropped, encoding="utf-8") as f:
            skipped = tuple(json.load(f))
    return Features(
        np.load(os.path.join(path, "features.npy"), mmap_mode="r"),
        np.load(os.path.join(path, "labels.npy"), mmap_mode="r"),
        skipped,
        views,
    )


def cached_extract(
    extractor: keras.Model,
    pipeline: tf.data.Dataset,
    count: int,
    cache_dir: str | None,
    key: str,
    verbose: int = 1,
    views: int = 0,
) -> Features:
    """`extract`, reusing `<cache_dir>/<key>` when it is there (disk mode; `key` must name
    the views)."""
    if cache_dir is None:
        return extract(extractor, pipeline, count, verbose=verbose, views=views)
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "labels.npy")):
        logging.info("Reusing cached features %s", path)
        return load(path, views)
    os.makedirs(cache_dir, exist_ok=True)
    return extract(extractor, pipeline, count, path, verbose, views)


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
