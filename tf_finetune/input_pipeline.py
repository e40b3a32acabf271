"""The run's data as `tf.data` pipelines: which source `--data` names, and the train / val /
test batches `fit` and the reports read.

Sources (folders, TFDS, text tables, image tables and tag folders) live in data.py,
text_data.py and multilabel_data.py; this module picks one
and batches it for a strategy. It never imports the model, the trainer or the export.
"""

import collections.abc
import dataclasses
import os
from collections.abc import Callable

import tensorflow as tf

from tf_finetune import (
    augment,
    data,
    distribute,
    multilabel_data,
    sampling,
    text_data,
    validation,
)
from tf_finetune import config as config_lib
from tf_finetune.config import Config, table_holds_images

# --smoke keeps at most this many examples of each split.
SMOKE_EXAMPLES = {"train": 16, "val": 8, "test": 8}


def load_data(config: Config, folder: str | None = None, *, training: bool = False) -> data.DataSet:
    """The configured source as a DataSet (shrunk under --smoke).

    Args:
      config: the run.
      folder: an image folder to read instead of --data (the offline default's target task).
      training: the caller trains: train and val are not decoded here when a feature pass
        comes first (their first decode there is their check; `decode_check`).
    """
    dataset = _load_source(config, folder, decode_check(config) if training else data.ALL_SPLITS)
    return shrink(dataset, config.seed) if config.smoke else dataset


def shrink(dataset: data.DataSet, seed: int) -> data.DataSet:
    """A few examples of each split (SMOKE_EXAMPLES), drawn by a seeded shuffle of the keys
    so a folder listed class by class still gives several classes; the same ones every epoch."""

    def small(split: data.Split | None, n: int) -> data.Split | None:
        if split is None:
            return None
        n = min(n, split.count)
        keys = split.source.shuffle(max(split.count, 1), seed=seed, reshuffle_each_iteration=False)
        return dataclasses.replace(split, source=keys.take(n), count=n)

    return dataclasses.replace(
        dataset,
        train=small(dataset.train, SMOKE_EXAMPLES["train"]),
        val=small(dataset.val, SMOKE_EXAMPLES["val"]),
        test=small(dataset.test, SMOKE_EXAMPLES["test"]),
    )


def feature_pass_first(config: Config) -> bool:
    """The run starts with a head-only phase on cached features (feature_fit.cache_mode), in
    this process: its feature pass decodes train and val first."""
    return (
        config.cache != "none"
        and config_lib.augmentation_free(config)
        and (config.unfreeze == "0" or config.warmup_epochs > 0)
        and config.strategy != "multi_worker"
        and not config.data_service
    )


def feature_pass_last(config: Config) -> bool:
    """The run ends with a head-only phase on cached features: its reports score val and test
    from features (train.py `_cached_splits`), so a feature pass decodes test first too."""
    return feature_pass_first(config) and config.unfreeze == "0"


def decode_check(config: Config) -> tuple[str, ...]:
    """The splits a training run decodes up front to find corrupt files: all of them, but
    those a feature pass decodes first (and finds those files then): train and val, and test
    too when the last phase trains on cached features."""
    if feature_pass_last(config):
        return ()
    return ("test",) if feature_pass_first(config) else data.ALL_SPLITS


def _load_source(config: Config, folder: str | None, check: tuple[str, ...]) -> data.DataSet:
    if folder is not None:  # the offline default's: train/ val/ test/ inside
        return data.load_image_folder(
            folder, config.image_size, config.validation_percent, 0, config.max_image_pixels, check
        )
    text = text_data.is_text_source(config)
    if config.data.startswith("tfds:"):
        validation.data_matches_backbone(config, text)
    if text:
        return text_data.load(config)
    if config.data.startswith("tfds:"):
        return data.load_tfds(
            config.data[len("tfds:") :],
            config.image_size,
            config.train_split,
            config.val_split,
            config.test_split,
            config.validation_percent,
            config.seed,
            label_key=config.label_key,
            multi_label=config.task == "multi_label",
        )
    if config.task == "multi_label" or table_holds_images(
        config.data, config.file_column, config.text_column
    ):
        return _load_tagged(config, check)
    return data.load_image_folder(
        config.data,
        config.image_size,
        config.validation_percent,
        config.test_percent,
        config.max_image_pixels,
        check,
    )


def _load_tagged(config: Config, check: tuple[str, ...]) -> data.DataSet:
    """An image CSV/TSV (either task) or a multi-label class folder; `check`: decode_check."""
    options = {
        "decode_check": check,
        "image_size": config.image_size,
        "validation_percent": config.validation_percent,
        "test_percent": config.test_percent,
        "max_image_pixels": config.max_image_pixels,
    }
    separator = config.label_separator if config.task == "multi_label" else None
    if os.path.isdir(config.data):
        return multilabel_data.load_folder(config.data, options)
    return multilabel_data.load_table(
        config.data, config.file_column, config.label_column, separator, options
    )


def trains_on_pixels(config: Config) -> bool:
    """The last phase trains the backbone or sees augmented images: no feature cache."""
    return config.unfreeze != "0" or not config_lib.augmentation_free(config)


def make_pipelines(
    config: Config, dataset: data.DataSet, replicas: int = 1, *, endless: bool = False
) -> "Pipelines":
    """train (shuffled, augmented per the flags), val and, if any, test batches.

    Args:
      config: the run.
      dataset: its splits.
      replicas: the strategy's replicas (evaluation batches keep every replica fed).
      endless: repeat train and val and shard them by data (multi-worker: every worker runs
        the same number of steps, `fit_steps`; no test split).
    """
    # Training on pixels: decode each train image once and keep it in RAM when it fits.
    keep = trains_on_pixels(config) and config.cache != "none" and not endless

    def pipeline(split: data.Split, training: bool, cache: bool = False) -> tf.data.Dataset:
        batch = config.batch_size
        if training and config.sampling == "balanced":
            split = balanced_split(split, dataset.num_classes, config.seed, endless)
            cache = False  # a cache would replay the first epoch's draws
        elif endless:
            split = dataclasses.replace(split, source=split.source.repeat())
        elif not training:
            batch = distribute.eval_batch_size(split.count, config.batch_size, replicas)
        cache = cache and data.fits_in_memory(split, config.image_size, data.IMAGE_CACHE_BYTES // 2)
        # Multi-worker input stays in order: every worker must see the same schedule.
        in_order = config.deterministic or endless
        ds = data.make_pipeline(
            split, dataset.num_classes, batch, training, config.seed, cache, in_order
        )
        return ds.with_options(_shard_by_data()) if endless else ds

    def train() -> tf.data.Dataset:
        ds = augment.augment_training_pipeline(
            pipeline(dataset.train, True, keep),
            config.augment,
            config.mixup,
            config.cutmix,
            config.seed,
        )
        if endless:
            return ds
        # skip_batches_smaller_than drops the few examples left over
        return distribute.skip_batches_smaller_than(
            ds, replicas, dataset.train.count, config.batch_size
        )

    # Val and test are decoded every pass, never cached: the cache rounds to uint8, and the
    # checkpoint choice and the reports must score the pixels the export decodes (a fine-tuned
    # MobileNetV2 moved val probabilities by up to 0.03 between the two). Decoding a val split
    # costs a fraction of a pixel epoch's forward and backward passes.
    builders = {"train": train, "val": lambda: pipeline(dataset.val, False)}
    if dataset.test and not endless:
        builders["test"] = lambda: pipeline(dataset.test, False)
    return Pipelines(builders)


class Pipelines(collections.abc.Mapping):
    """{split: its batches}, each pipeline built when first looked up: a head-only run reads
    none of them (its feature passes make their own), and building one traces its decode
    (~0.1 s each)."""

    def __init__(self, builders: dict[str, Callable[[], tf.data.Dataset]]):
        self._builders = builders
        self._built: dict[str, tf.data.Dataset] = {}

    def __getitem__(self, split: str) -> tf.data.Dataset:
        if split not in self._built:
            self._built[split] = self._builders[split]()
        return self._built[split]

    def __iter__(self):
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def balanced_split(split: data.Split, num_classes: int, seed: int, endless: bool) -> data.Split:
    """`split` with its keys drawn class-balanced (sampling.py); an epoch is still `count`
    draws, so steps per epoch stay those of the split (endless: drawn for ever)."""
    counts = data.class_counts(split, num_classes)
    source = sampling.balanced_keys(split.source, counts, seed)
    return dataclasses.replace(split, source=source if endless else source.take(split.count))


def _shard_by_data() -> tf.data.Options:
    options = tf.data.Options()
    # Folder pipelines start from a list of paths, not files: shard by data.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def fit_steps(config: Config, dataset: data.DataSet) -> dict[str, int]:
    """fit's step counts that make one epoch of the endless pipelines."""

    def steps(split):
        return max(1, -(-split.count // config.batch_size))

    return {"steps_per_epoch": steps(dataset.train), "validation_steps": steps(dataset.val)}


def with_data_service(ds: tf.data.Dataset, address: str) -> tf.data.Dataset:
    """Runs the whole training pipeline (read, decode, batch) on tf.data service workers.

    `distributed_epoch`: the workers split the list of files, so each example is seen once per
    epoch however many workers there are (in an order that is no longer reproducible).
    """
    distributed = ds.apply(
        tf.data.experimental.service.distribute(
            processing_mode="distributed_epoch", service=address
        )
    )
    return distributed.prefetch(data.AUTOTUNE)
