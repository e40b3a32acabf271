"""The head-only phase on cached features: run the frozen backbone once per image
(features.py), then fit the head on the features.

Used for any head-only phase (`--unfreeze=0`, or phase 1 of `--warmup_epochs`) whose training
images never change (no augmentation, mixup, cutmix) and that needs no whole-model state
(EMA, checkpoint averaging). The head shares its layers with the classifier, so the classifier
leaves this phase trained, and its best checkpoint is written where the pixel path writes it.
"""

import os

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import (
    atomic,
    backbone_table,
    backbones,
    data,
    distribute,
    features,
    phases,
    rundir,
)
from tf_finetune import config as config_lib
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.timings import Timings

# Features above this size go to disk with --cache=auto.
MEMORY_CACHE_BYTES = 2 * 1024**3
# Bump when what a cached feature means changes, so older caches are recomputed rather than
# reused. 3: the key covers precision, preprocessing, decoding and module files; 2: float32
# pixels after the resize (1 rounded them to uint8).
CACHE_FORMAT = 3
# How an image becomes pixels (data.decode_and_resize); part of the key, so a change of the
# decode shared by training and the export invalidates the cache.
DECODE_MODE = "decode_and_resize:bilinear:float32"


def cache_mode(config: Config, feature_dim: int, count: int, phase: phases.Phase) -> str:
    """none, memory or disk: whether (and where) `phase` trains the head on cached features."""
    if phase.unfreeze != 0 or not config_lib.augmentation_free(config):
        if config.cache == "auto":
            logging.info("Phase %s trains end to end on pixels (no feature cache).", phase.name)
        return "none"
    if config.cache == "auto":
        return "memory" if feature_dim * count * 4 <= MEMORY_CACHE_BYTES else "disk"
    return config.cache


def _file_stamp(path: str) -> str:
    """A file's identity without reading it: path, size and modification time."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _module_files(handle: str) -> list[str]:
    """Stamps of a hub module's graph and variables (resolved from the local cache)."""
    from tf_finetune import hub

    root = hub.resolve_handle(handle)
    names = ("saved_model.pb", os.path.join("variables", "variables.index"))
    return [
        _file_stamp(os.path.join(root, n)) for n in names if os.path.exists(os.path.join(root, n))
    ]


def _backbone_facts(config: Config) -> dict:
    """What decides the backbone's function: its weights and preprocessing, or module files."""
    if backbone_table.is_hub_backbone(config.backbone):
        modules = [config.backbone] + ([config.preprocessor] if config.preprocessor else [])
        return {"module_files": [f for m in modules for f in _module_files(m)]}
    weights = config.weights
    if os.path.isfile(weights):
        weights = _file_stamp(weights)
    spec = backbone_table.get_spec(config.backbone)
    return {"alpha": config.backbone_alpha, "weights": weights, "preprocessing": spec.preprocessing}


def cache_key(config: Config, split: data.Split, name: str) -> str:
    """The disk cache's folder name for `split`: a hash of every fact that changes a feature
    (safe for any backbone string: URLs, paths), and of every input file."""
    parts = {
        "backbone": config.backbone,
        **_backbone_facts(config),
        "image_size": config.image_size,
        "precision": config.precision,
        "decode": DECODE_MODE,
        "split": name,
        "format": CACHE_FORMAT,
    }
    return f"{name}_" + features.fingerprint(parts, split.source.map(lambda key, _: key))


def _cache_dir(mode: str) -> str | None:
    if mode != "disk":
        return None
    return os.path.join(backbones.keras_home(), "tf_finetune_features")


def extract_splits(
    extractor: keras.Model, config: Config, dataset: data.DataSet, mode: str, verbose: int
) -> dict[str, features.Features]:
    """Backbone features of train and val (one pass each; disk mode reuses a cache)."""
    cache_dir = _cache_dir(mode)
    logging.info("Computing backbone features once (--cache=%s)", mode)
    cached = {}
    for name, split in (("train", dataset.train), ("val", dataset.val)):
        pipeline = data.make_pipeline(
            split, dataset.num_classes, config.batch_size, False, config.seed
        )
        key = cache_key(config, split, name) if cache_dir else ""
        cached[name] = features.cached_extract(
            extractor, pipeline, split.count, cache_dir, key, verbose=1 if verbose == 1 else 0
        )
    return cached


def fit_head(
    model: keras.Model,
    config: Config,
    dataset: data.DataSet,
    strategy: tf.distribute.Strategy,
    mode: str,
    *,
    phase: phases.Phase,
    callbacks: list[keras.callbacks.Callback],
    verbose: int = 0,
    class_weight: dict | None = None,
    timings: Timings | None = None,
) -> keras.callbacks.History:
    """Trains the head of `model` for `phase`'s epochs on features computed once.

    Leaves `model` (which shares the head's layers) with the best head weights, written as the
    run's best checkpoint so `evaluate`, `export` and a following fine-tuning phase find the
    usual file. `callbacks` come from `callbacks.make_callbacks(on_features=True)`.
    """
    steps = phases.steps_per_epoch(dataset.train.count, config.batch_size)
    with strategy.scope():
        extractor, head = features.split_classifier(model)
        rate = model_lib.phase_learning_rate(config, phase, steps)
        model_lib.compile_model(head, config, dataset.num_classes, rate)
    timings = timings or Timings()
    with timings.stage("features"):
        cached = extract_splits(extractor, config, dataset, mode, verbose)
    timings.feature_images += dataset.train.count + dataset.val.count
    head._initial_epoch = None  # see train.fit_phases
    replicas = strategy.num_replicas_in_sync
    train = distribute.skip_batches_smaller_than(
        features.dataset(cached["train"], config.batch_size, True, config.seed),
        replicas,
        cached["train"].count,
        config.batch_size,
    )
    val_batch = distribute.eval_batch_size(cached["val"].count, config.batch_size, replicas)
    with timings.stage("fit"):
        history = head.fit(
            train,
            validation_data=features.dataset(cached["val"], val_batch, False, config.seed),
            initial_epoch=phase.initial_epoch,
            epochs=phase.epochs,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )
    _publish_best(model, head, config.model_dir)
    return history


def _publish_best(model: keras.Model, head: keras.Model, model_dir: str) -> None:
    """The head's best checkpoint, as the whole classifier's best checkpoint (+ its best.json,
    which a following phase, or its resume, compares with)."""
    head_best = os.path.join(model_dir, rundir.HEAD_BEST_WEIGHTS)
    if not os.path.exists(head_best):
        return
    head.load_weights(head_best)
    best = os.path.join(model_dir, rundir.BEST_WEIGHTS)
    atomic.save_weights(model, best)
    head_json = rundir.state_file(head_best)
    if os.path.exists(head_json):
        with open(head_json, encoding="utf-8") as f:
            atomic.write_text(rundir.state_file(best), f.read())
