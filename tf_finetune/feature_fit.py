"""The head-only phase on cached features: run the frozen backbone once per image
(features.py), then fit the head on the features.

Used for any head-only phase (`--unfreeze=0`, or phase 1 of `--warmup_epochs`) whose training
images never change (no augmentation, mixup, cutmix) and that needs no whole-model state
(EMA, checkpoint averaging). The head shares its layers with the classifier, so the classifier
leaves this phase trained, and its best checkpoint is written where the pixel path writes it.

The head is trained by `fit_head` (Keras fit for the phase's epochs) or by `solve_head` (one
linear-probe solve, linear_probe.py): `head_solver` says which.

`--cache_views=N` is augmentation at cached speed: the pass also puts N augmented views of each
training image (data.augmented_view, made from its one decode) through the backbone, cached
with the clean view; either way of training the head sees all of them.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import (
    atomic,
    backbone_table,
    backbones,
    data,
    distribute,
    features,
    linear_probe,
    phases,
    rundir,
    validation,
)
from tf_finetune import config as config_lib
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.timings import Timings

# Features above this size go to disk with --cache=auto.
MEMORY_CACHE_BYTES = 2 * 1024**3
# The L-BFGS head's tolerance and grid patience (linear_probe.solve_head). Measured on the flower
# photos' MobileNetV2-0.35 features (3,021 train / 648 val, 2 busy cores): 1e-5 and 1 point past
# the minimum choose the same l2 at the same test accuracy as 1e-6 and 2 points, in 1.6 s
# instead of 3.8 s (123 L-BFGS iterations instead of 352); the val loss differs by 1e-4.
LBFGS_TOL, LBFGS_PATIENCE = 1e-5, 1
# Rows per eager test step when the solved head is scored (bounded memory on big splits).
SCORE_CHUNK = 8192
# Bump when what a cached feature means changes, so older caches are recomputed rather than
# reused. 4: JPEG's reduced-size decode, undecodable files left out (dropped.json); 3: the key
# covers precision, preprocessing, decoding and module files; 2: float32 pixels after the
# resize (1 rounded them to uint8).
CACHE_FORMAT = 4
# How an image becomes pixels (data.decode_and_resize); part of the key, so a change of the
# decode shared by training and the export invalidates the cache.
DECODE_MODE = (
    "decode_and_resize:jpeg_ratio" + "".join(map(str, data.JPEG_RATIOS)) + ":bilinear:float32"
)


def cache_mode(config: Config, feature_dim: int, count: int, phase: phases.Phase) -> str:
    """none, memory or disk: whether (and where) `phase` trains the head on cached features."""
    if phase.unfreeze != 0 or not config_lib.augmentation_free(config):
        if config.cache == "auto":
            logging.info("Phase %s trains end to end on pixels (no feature cache).", phase.name)
        return "none"
    if config.cache == "auto":
        return "memory" if fits_in_memory(feature_dim, count, config) else "disk"
    return config.cache


def head_solver(
    config: Config, phase: phases.Phase, mode: str, feature_dim: int, count: int
) -> str:
    """fit or lbfgs: how `phase` trains its head. `--head_solver=auto` is lbfgs where the
    phase is head-only on cached features (`mode`), no flag needs per-step training, and the
    train features fit the memory cache's budget: the full-batch solve holds them in RAM,
    where a fit streams them from disk."""
    if phase.unfreeze != 0:
        return "fit"
    if config.head_solver != "auto":
        return config.head_solver
    solvable = mode != "none" and fits_in_memory(feature_dim, count, config)
    return "lbfgs" if solvable and validation.lbfgs_obstacle(config) is None else "fit"


def fits_in_memory(feature_dim: int, count: int, config: Config) -> bool:
    """Whether a split's cached float32 features, augmented views included, fit the memory
    cache's budget."""
    return feature_dim * count * (1 + config.cache_views) * 4 <= MEMORY_CACHE_BYTES


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


def _preset_files(backbone: str) -> list[str]:
    """Stamps of a keras-hub preset's files (config, converter, weights)."""
    from tf_finetune import keras_hub_model

    root = keras_hub_model.source_folder(backbone)
    return [_file_stamp(os.path.join(root, n)) for n in sorted(os.listdir(root))]


def _own_source_files(config: Config) -> list[str]:
    """Stamps of a run dir's trained weights and flags, a .keras file, or an export's graph
    and variables (own_model.py's sources)."""
    path = backbone_table.source_path(config.backbone, config.model_dir)
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    if kind == backbone_table.RUN:
        files = [rundir.trained_weights(path), os.path.join(path, rundir.FLAGS_FILE)]
    elif os.path.isfile(path):
        files = [path]
    else:
        files = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
    return [_file_stamp(f) for f in sorted(files)]


def _backbone_facts(config: Config) -> dict:
    """What decides the backbone's function: its weights and preprocessing, or its files."""
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    if kind == backbone_table.KERAS_HUB:
        return {"preset_files": _preset_files(config.backbone)}
    if kind in backbone_table.OWN_KINDS:
        return {"source_files": _own_source_files(config)}
    if kind == backbone_table.HUB:
        modules = [config.backbone] + ([config.preprocessor] if config.preprocessor else [])
        return {"module_files": [f for m in modules for f in _module_files(m)]}
    weights = config.weights
    if os.path.isfile(weights):
        weights = _file_stamp(weights)
    spec = backbone_table.get_spec(config.backbone)
    return {"alpha": config.backbone_alpha, "weights": weights, "preprocessing": spec.preprocessing}


def cache_key(config: Config, split: data.Split, name: str, views: int = 0) -> str:
    """The disk cache's folder name for `split`: a hash of every fact that changes a feature
    (safe for any backbone string: URLs, paths), and of every input file.

    `views` (--cache_views, train only): the augmented views cached with the clean one; they
    depend on the seed and the views' ranges, so those are part of the key then (a clean
    cache does not depend on the seed, and keeps its key).
    """
    parts = {
        "backbone": config.backbone,
        **_backbone_facts(config),
        "image_size": config.image_size,
        "precision": config.precision,
        "decode": DECODE_MODE,
        "split": name,
        "format": CACHE_FORMAT,
    }
    if views:
        parts["views"] = {
            "count": views,
            "seed": config.seed,
            "area": data.VIEW_AREA,
            "aspect": data.VIEW_ASPECT,
        }
    return f"{name}_" + features.fingerprint(parts, split.source.map(lambda key, _: key))


def features_dir(mode: str) -> str | None:
    if mode != "disk":
        return None
    return os.path.join(backbones.keras_home(), "tf_finetune_features")


def extract_splits(
    extractor: keras.Model, config: Config, dataset: data.DataSet, mode: str, verbose: int
) -> dict[str, features.Features]:
    """Backbone features of train and val (one pass each; disk mode reuses a cache).

    The pass is the run's first decode of these images: a file that fails to decode is left
    out, named and dropped from `dataset` (`data.forget_undecodable`). With --cache_views=N
    each training image also gives N augmented views (made from that decode); val stays clean.
    """
    views = config.cache_views
    logging.info(
        "Computing backbone features once (--cache=%s%s)",
        mode,
        f", {views} augmented views of each training image" if views else "",
    )
    cached = {}
    for name in ("train", "val"):
        n = views if name == "train" else 0
        cached[name] = _extract_split(extractor, config, dataset, name, mode, n, verbose)
    return cached


def _extract_split(
    extractor: keras.Model,
    config: Config,
    dataset: data.DataSet,
    name: str,
    mode: str,
    views: int = 0,
    verbose: int = 0,
) -> features.Features:
    """One split's pass (disk mode reuses a cache); its undecodable files are named and
    dropped from `dataset`."""
    split = getattr(dataset, name)
    cache_dir = features_dir(mode)
    pipeline = data.feature_pipeline(
        split, dataset.num_classes, features.INFERENCE_BATCH, views, config.seed
    )
    key = cache_key(config, split, name, views) if cache_dir else ""
    cached = features.cached_extract(
        extractor, pipeline, split.count, cache_dir, key, 1 if verbose == 1 else 0, views
    )
    data.forget_undecodable(dataset, name, data.undecodable(split, cached.dropped))
    return cached


def test_features(
    model: keras.Model, config: Config, dataset: data.DataSet, mode: str
) -> features.Features | None:
    """The test split's backbone features (None without a test split), for its report: the
    pass is the run's first decode of these images (a file that fails is left out, named and
    dropped from `dataset`), and the disk cache serves a rerun."""
    if dataset.test is None:
        return None
    extractor, _ = features.split_classifier(model)
    return _extract_split(extractor, config, dataset, "test", mode)


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
    label_weights: tuple[list[float], list[float]] | None = None,
) -> tuple[keras.callbacks.History, dict[str, features.Features]]:
    """Trains the head of `model` for `phase`'s epochs on features computed once.

    Leaves `model` (which shares the head's layers) with the best head weights, written as the
    run's best checkpoint so `evaluate`, `export` and a following fine-tuning phase find the
    usual file. `callbacks` come from `callbacks.make_callbacks(on_features=True)`.

    Returns:
      (the History, the train and val features).
    """
    # An epoch passes over every cached row: with --cache_views, 1 + N per image.
    rows = dataset.train.count * (1 + config.cache_views)
    steps = phases.steps_per_epoch(rows, config.batch_size)
    with strategy.scope():
        extractor, head = features.split_classifier(model)
        rate = model_lib.phase_learning_rate(config, phase, steps)
        # A step on cached features is a few microseconds of math under ~1-2 ms of Keras'
        # Python per step: one execution per epoch runs them all in one graph call (1,000
        # steps on 2 cores: ~2.3 -> ~1.3 s). Batch callbacks (the NaN check, a stop on a
        # signal) then run at the end of each epoch's steps. One replica only: under
        # MirroredStrategy, Keras 3.15's multi-step loop fails ("You must feed a value for
        # placeholder tensor ... while/cond").
        per_execution = steps if strategy.num_replicas_in_sync == 1 else 1
        model_lib.compile_model(
            head, config, dataset.num_classes, rate, None, label_weights, per_execution
        )
    timings = timings or Timings()
    with timings.stage("features"):
        cached = extract_splits(extractor, config, dataset, mode, verbose)
    timings.feature_images += cached["train"].count + cached["val"].count  # views too
    head._initial_epoch = None  # see train.fit_phases
    replicas = strategy.num_replicas_in_sync
    train = distribute.skip_batches_smaller_than(
        features.dataset(
            cached["train"], config.batch_size, True, config.seed, config.sampling == "balanced"
        ),
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
    return history, cached


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


def solve_head(
    model: keras.Model,
    config: Config,
    dataset: data.DataSet,
    strategy: tf.distribute.Strategy,
    mode: str,
    *,
    phase: phases.Phase,
    verbose: int = 0,
    timings: Timings | None = None,
    label_weights: tuple[list[float], list[float]] | None = None,
) -> tuple[keras.callbacks.History, float, dict, dict[str, features.Features]]:
    """`--head_solver=lbfgs`: the head of `model` solved once on features computed once.

    One `linear_probe.solve_head` (L2 strength chosen on validation loss; label smoothing and
    balanced class weights as set) replaces the phase's epochs: a softmax head, or with
    --task=multi_label a sigmoid per label on the multi-hot targets (`label_weights`: the
    run's per-label weights of --class_weight=balanced, as `fit_head` takes them; they weigh
    the solve's objective and its val loss as they weigh the compiled loss). The solution goes
    into the `predictions` layer, and the run's files are left as a fit on features leaves
    them: the best checkpoint (+ best.json, its monitored value as Keras computes it: val_loss,
    or val_map for multi-label) and one history.csv row, numbered as the phase's first epoch.

    Returns:
      (a History of that one row, its monitored value (`config.monitor`), the solver's facts
      for metrics.json, the train and val features).
    """
    with strategy.scope():
        extractor, head = features.split_classifier(model)
        model_lib.compile_model(head, config, dataset.num_classes, label_weights=label_weights)
    timings = timings or Timings()
    with timings.stage("features"):
        cached = extract_splits(extractor, config, dataset, mode, verbose)
    timings.feature_images += cached["train"].count + cached["val"].count  # views too
    with timings.stage("fit"):
        solution = _solve(cached, config, dataset.num_classes, label_weights)
        linear_probe.assign_to_dense(model.get_layer(features.PREDICTIONS), solution)
        logs = _scores(head, cached, config, strategy.num_replicas_in_sync)
    monitor = config.monitor[0]
    shown = dict.fromkeys(("val_loss", "val_accuracy", monitor))
    logging.info(
        "L-BFGS head: l2=%g, %s (%d iterations, %.1f s)",
        solution.l2,
        ", ".join(f"{name} {logs[name]:.4f}" for name in shown),
        solution.iterations,
        solution.seconds,
    )
    _write_solved(model, head, config, phase.initial_epoch, logs)
    history = keras.callbacks.History()
    history.epoch = [phase.initial_epoch]
    history.history = {k: [v] for k, v in logs.items()}
    return history, logs[monitor], solver_facts(solution), cached


def _solve(
    cached: dict[str, features.Features],
    config: Config,
    num_classes: int,
    label_weights: tuple[list[float], list[float]] | None = None,
) -> linear_probe.Solution:
    """The solve on the cached features: int labels for a softmax head (balanced class weights
    as per-example weights), the multi-hot targets as cached for a multi-label head."""
    multi_label = config.task == "multi_label"
    train_y = np.asarray(cached["train"].labels)
    weight = None
    if not multi_label:
        train_y = train_y.argmax(axis=1)
        if config.class_weight == "balanced":
            weight = linear_probe.balanced_sample_weight(train_y, num_classes)
    elif config.class_weight == "balanced" and label_weights is None:
        raise ValueError("a balanced multi-label solve needs the run's label_weights")
    return linear_probe.solve_head(
        cached["train"].features,
        train_y,
        cached["val"].features,
        cached["val"].labels,
        num_classes,
        label_smoothing=config.label_smoothing,
        sample_weight=weight,
        multi_label=multi_label,
        label_weights=label_weights if multi_label else None,
        tol=LBFGS_TOL,
        patience=LBFGS_PATIENCE,
    )


def _scores(
    head: keras.Model, cached: dict[str, features.Features], config: Config, replicas: int
) -> dict[str, float]:
    """Train and val scores of the solved head as fit's logs name them (the val_loss is the
    compiled loss: what the best checkpoint of a following phase compares with).

    On one replica the compiled test step runs eagerly, a chunk of rows at a time: the same
    loss and metrics as `evaluate`, without tracing it (~0.3 s of a small run). Under
    MirroredStrategy, `evaluate` (its metric variables are updated per replica)."""
    logs = {}
    for name, prefix in (("train", ""), ("val", "val_")):
        split = cached[name]
        if replicas == 1:
            head.reset_metrics()
            scores = {}
            for i in range(0, split.count, SCORE_CHUNK):
                rows = slice(i, i + SCORE_CHUNK)
                batch = (np.asarray(split.features[rows]), np.asarray(split.labels[rows]))
                scores = head.test_step(batch)
        else:
            batch = distribute.eval_batch_size(split.count, config.batch_size, replicas)
            dataset = features.dataset(split, batch, False, config.seed)
            scores = head.evaluate(dataset, verbose=0, return_dict=True)
        logs.update({prefix + k: float(v) for k, v in scores.items()})
    return logs


def _write_solved(
    model: keras.Model, head: keras.Model, config: Config, epoch: int, logs: dict
) -> None:
    """The history row, then the best checkpoint and its best.json (in that order, as fit's
    callbacks write them), on the run's monitor (val_loss; val_map for multi-label)."""
    model_dir = config.model_dir
    os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)
    logger = keras.callbacks.CSVLogger(os.path.join(model_dir, rundir.HISTORY), append=True)
    logger.set_model(head)
    logger.on_train_begin()
    logger.on_epoch_end(epoch, dict(logs))
    logger.on_train_end()
    best = os.path.join(model_dir, rundir.BEST_WEIGHTS)
    atomic.save_weights(model, best, "best checkpoint")
    monitor = config.monitor[0]
    state = {"monitor": monitor, "best": logs[monitor], "epoch": epoch}
    atomic.write_json(rundir.state_file(best), state, "best checkpoint")


def solver_facts(solution: linear_probe.Solution) -> dict:
    """What metrics.json records about an L-BFGS head (grid points not solved: null)."""

    def number(v: float) -> float | None:
        return None if math.isnan(v) else round(float(v), 6)

    return {
        "solver": "lbfgs",
        "l2": solution.l2,
        "grid": [float(v) for v in solution.grid],
        "grid_val_losses": [number(v) for v in solution.grid_val_losses],
        "grid_val_accuracies": [number(v) for v in solution.grid_val_accuracies],
        "iterations": solution.iterations,
        "seconds": round(solution.seconds, 3),
    }
