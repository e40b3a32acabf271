"""`--sampling=balanced`: training examples drawn class by class with equal probability.

One stream per class, each shuffled and repeated, and `tf.data.Dataset.sample_from_datasets`
picking the next class uniformly: a minority class's examples come round more often, a
majority class's less, and nothing is copied (the streams hold file paths, texts or row
indices; images are decoded, or features read, only once drawn). An epoch stays the split's
size (`take(count)`), so steps per epoch, schedules and resumes are unchanged: a balanced epoch
is as many draws as the split has examples, not one pass over each of them.

Used on the pixel path (input_pipeline.py, over a split's keys) and on the cached-feature path
(features.dataset, over feature rows) alike.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

MAX_SHUFFLE = 50_000  # per class, as data.make_pipeline caps its key shuffle


def balanced(per_class: Sequence[tf.data.Dataset], counts: Sequence[int], seed: int):
    """An endless stream drawing each class (with examples) with equal probability.

    Args:
      per_class: one dataset per class, in label order.
      counts: the examples of each (classes with none are left out).
      seed: fixes the draws; each epoch (each new iterator) draws anew.
    """
    streams = [
        ds.shuffle(min(n, MAX_SHUFFLE), seed=seed + c, reshuffle_each_iteration=True).repeat()
        for c, (ds, n) in enumerate(zip(per_class, counts))
        if n > 0
    ]
    if not streams:
        raise ValueError("no class has training examples to sample")
    return tf.data.Dataset.sample_from_datasets(
        streams,
        weights=[1.0 / len(streams)] * len(streams),
        seed=seed,
        rerandomize_each_iteration=True,
    )


def balanced_keys(source: tf.data.Dataset, counts: Sequence[int], seed: int) -> tf.data.Dataset:
    """A split's `(key, label)` source as an endless class-balanced stream (filtered per
    class: keys are paths, texts or encoded bytes, cheap to scan)."""

    def of_class(c: int) -> tf.data.Dataset:
        return source.filter(lambda _, y: tf.equal(tf.cast(y, tf.int64), c))

    return balanced([of_class(c) for c in range(len(counts))], counts, seed)


def balanced_indices(labels: np.ndarray, seed: int) -> tf.data.Dataset:
    """Row indices into `labels` (one-hot [n, C], may be memory-mapped) as an endless
    class-balanced stream."""
    label_of = np.argmax(np.asarray(labels), axis=1)
    rows = [np.flatnonzero(label_of == c).astype(np.int64) for c in range(labels.shape[1])]
    per_class = [tf.data.Dataset.from_tensor_slices(r) for r in rows]
    return balanced(per_class, [len(r) for r in rows], seed)
