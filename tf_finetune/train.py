"""Training: strategy, data, model compiled under `strategy.scope()`, `fit`, evaluate, export.

A flat list of small functions ending in `train_and_evaluate(config)`.
"""

import csv
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import (
    augment,
    averaging,
    data,
    digits,
    distribute,
    evaluate,
    export,
    faults,
    features,
    hub_model,
    phases,
    schedules,
    text_data,
)
from tf_finetune import config as config_lib
from tf_finetune import model as model_lib
from tf_finetune import multiworker as mw
from tf_finetune.config import Config
from tf_finetune.errors import BelowMinAccuracy, UserError

BEST_WEIGHTS = os.path.join("checkpoints", "best.weights.h5")
# The weights that were evaluated and exported, when they are not the best checkpoint's
# (an EMA or an average won on val_loss); `evaluate` prefers them.
FINAL_WEIGHTS = os.path.join("checkpoints", "final.weights.h5")
TOP_CHECKPOINTS = os.path.join("checkpoints", "top")


# ----------------------------------------------------------------------------- data
def load_data(config: Config) -> data.DataSet:
    """The configured source as a DataSet (the offline default writes its PNG folders first)."""
    if text_data.is_text_source(config):
        dataset = text_data.load(config)
        if not hub_model.is_text_model(config):
            raise UserError(
                f"--data={config.data} is text; pass a TF Hub text module as --backbone "
                "(e.g. https://tfhub.dev/google/nnlm-en-dim50/2), see configs/imdb_nnlm.cfg."
            )
        return dataset
    if hub_model.is_text_model(config):
        raise UserError(
            f"--backbone={config.backbone} is a text module but --data={config.data or '(digits)'} "
            "holds images; pass a .csv/.tsv file or a TFDS text data set."
        )
    if config.is_offline_default:
        root = digits.write_target_folder(digits.default_data_dir())
        return data.load_image_folder(root, config.image_size, config.validation_percent)
    if config.data.startswith("tfds:"):
        return data.load_tfds(
            config.data[len("tfds:") :],
            config.image_size,
            config.train_split,
            config.val_split,
            config.test_split,
            config.validation_percent,
            config.seed,
        )
    return data.load_image_folder(config.data, config.image_size, config.validation_percent)


# ----------------------------------------------------------------------------- fit
class _SaveRunState(keras.callbacks.Callback):
    """Records the running phase in backup/state.json (two-phase runs), with a copy of the
    best val_loss so far for the record (the checkpoint's best.json is what a resume reads).

    Runs after the best checkpoint and before the backup marks the epoch done.
    """

    def __init__(self, model_dir: str, phase: int, checkpoint: faults.BestCheckpoint):
        super().__init__()
        self.model_dir, self.phase, self.checkpoint = model_dir, phase, checkpoint

    def on_epoch_end(self, epoch, logs=None):
        best = self.checkpoint.best
        best = float(best) if best is not None and np.isfinite(best) else None
        phases.save_state(self.model_dir, phases.State(self.phase, best))


def make_callbacks(
    config: Config,
    verbose: int,
    guard: faults.SignalGuard | None = None,
    best_weights: str = BEST_WEIGHTS,
    backup_name: str = "backup",
    multi_worker: bool = False,
    *,
    phase: phases.Phase | None = None,
    best_val_loss: float | None = None,
    last_phase: bool = True,
) -> list[keras.callbacks.Callback]:
    """NaN and signal stops, CSV history, best checkpoint, backup, TensorBoard, stoppers.

    The order matters at each epoch end: history row, then best checkpoint, then the run
    state (two-phase runs), then the backup that marks the epoch done. A kill in between
    reruns the epoch, which only repeats a row (`truncate_history` drops it) and never loses
    a better checkpoint.

    Args:
      guard: turns SIGINT/SIGTERM into a backup and a clean stop (None: signals are not
        handled, e.g. under tune and compare).
      best_weights: where the best checkpoint goes (the head's own file on cached features).
      backup_name: the backup folder, relative to the run (`phase_backup` of the phase).
      multi_worker: checks that every worker resumes from the same epoch.
      phase: the fit call these are for (default: a one-phase run).
      best_val_loss: the best so far in this run when this fit starts without a backup of
        its own (phase 2 after phase 1): only a better epoch replaces the best checkpoint.
        With a backup, the checkpoint's best.json carries the best (faults.BestCheckpoint).
      last_phase: EarlyStopping only stops the last phase (the head warmup always runs out).
    """
    run = config.model_dir
    phase = phase or phases.plan(config)[-1]
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    # Saved every epoch (and on SIGINT/SIGTERM); a rerun of the same command resumes from it.
    # Deleted at the end of the run (after the export), not of the phase.
    backup = faults.AtomicBackup(os.path.join(run, backup_name))
    best = faults.BestCheckpoint(
        os.path.join(run, best_weights),
        backup,
        monitor="val_loss",
        initial_value_threshold=best_val_loss,
    )
    two_phase = len(phases.plan(config)) > 1
    callbacks = [
        faults.StopOnNaN(best),
        faults.StopOnSignal(guard or faults.SignalGuard(run), backup),
        keras.callbacks.CSVLogger(os.path.join(run, "history.csv"), append=True),
        best,
        *([_SaveRunState(run, phase.index, best)] if two_phase else []),
        backup,
        *([mw.resume_epoch_check()] if multi_worker else []),
        keras.callbacks.TensorBoard(os.path.join(run, "logs")),
    ]
    if config.average_checkpoints:
        callbacks.append(
            averaging.KeepBestCheckpoints(
                os.path.join(run, TOP_CHECKPOINTS), config.average_checkpoints
            )
        )
    if config.early_stopping_patience and last_phase:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.early_stopping_patience, verbose=verbose
            )
        )
    if config.reduce_lr_patience:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.1, patience=config.reduce_lr_patience, verbose=verbose
            )
        )
    return callbacks


def truncate_history(history_csv: str, epochs_done: int) -> None:
    """Drops rows of epochs a resumed run will redo (a kill between the row and the backup)."""
    if not os.path.exists(history_csv):
        return
    with open(history_csv, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept = lines[:1] + [
        ln
        for ln in lines[1:]
        if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) < epochs_done
    ]
    if len(kept) != len(lines):
        tmp = history_csv + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, history_csv)


# Features above this size go to disk with --cache=auto.
MEMORY_CACHE_BYTES = 2 * 1024**3
HEAD_BEST_WEIGHTS = os.path.join("checkpoints", "head_best.weights.h5")


def cache_mode(
    config: Config, feature_dim: int, count: int, phase: phases.Phase | None = None
) -> str:
    """none, memory or disk: whether (and where) `phase` trains the head on cached features.

    Only a head-only phase (a frozen backbone: `--unfreeze=0`, or phase 1 of `--warmup_epochs`)
    whose training images are never changed (no augmentation, mixup, cutmix) and that needs
    no whole-model state (EMA, checkpoint averaging) can. Default phase: the run's last.
    """
    phase = phase or phases.plan(config)[-1]
    if phase.unfreeze != 0 or not config_lib.augmentation_free(config):
        if config.cache == "auto":
            logging.info("Phase %s trains end to end on pixels (no feature cache).", phase.name)
        return "none"
    if config.cache == "auto":
        return "memory" if feature_dim * count * 4 <= MEMORY_CACHE_BYTES else "disk"
    return config.cache


def _cache_key(config: Config, split: data.Split, name: str) -> str:
    weights = config.weights
    if os.path.isfile(weights):
        stat = os.stat(weights)
        weights = f"{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"
    parts = {
        "backbone": config.backbone,
        "alpha": config.backbone_alpha,
        "weights": weights,
        "image_size": config.image_size,
        "split": name,
        "format": 2,  # 2: float32 pixels after the resize (1 rounded them to uint8)
    }
    return f"{config.backbone}_{config.image_size}_{name}_" + features.fingerprint(
        parts, split.source.map(lambda key, _: key)
    )


def fit_on_cached_features(
    model: keras.Model,
    config: Config,
    dataset: data.DataSet,
    strategy: tf.distribute.Strategy,
    mode: str,
    verbose: int,
    guard: faults.SignalGuard | None = None,
    extra_callbacks=(),
    *,
    callbacks: list[keras.callbacks.Callback] | None = None,
    phase: phases.Phase | None = None,
    steps_per_epoch: int = 1,
    class_weight: dict | None = None,
) -> keras.callbacks.History:
    """Trains the head of `model` on backbone features computed once (see features.py).

    Runs `phase`'s epochs (default: the run's only phase) with `callbacks` (default:
    `make_callbacks(best_weights=HEAD_BEST_WEIGHTS)` plus `extra_callbacks`). Leaves `model`
    (which shares the head's layers) with the best head weights, and writes them as the full
    model's best checkpoint so `evaluate`, `export` and a following fine-tuning phase find the
    usual file.
    """
    phase = phase or phases.plan(config)[-1]
    if callbacks is None:
        callbacks = make_callbacks(
            config, verbose, guard, HEAD_BEST_WEIGHTS, phase_backup(config, phase, "memory")
        )
        callbacks += list(extra_callbacks)
    with strategy.scope():
        extractor, head = features.split_classifier(model)
        steps = steps_per_epoch * (phase.epochs - phase.initial_epoch)
        rate = schedules.learning_rate(
            phase.learning_rate, config.lr_schedule, steps, config.warmup_steps
        )
        model_lib.compile_model(head, config, dataset.num_classes, rate)
    cache_dir = None
    if mode == "disk":
        from keras.src.backend import config as keras_config

        cache_dir = os.path.join(keras_config.keras_home(), "tf_finetune_features")
    logging.info("Computing backbone features once (--cache=%s)", mode)
    cached = {}
    for name, split in (("train", dataset.train), ("val", dataset.val)):
        pipeline = data.make_pipeline(
            split, dataset.num_classes, config.batch_size, False, config.seed
        )
        key = _cache_key(config, split, name) if cache_dir else ""
        cached[name] = features.cached_extract(
            extractor, pipeline, split.count, cache_dir, key, verbose=1 if verbose == 1 else 0
        )
    head._initial_epoch = None  # see fit_phases
    replicas = strategy.num_replicas_in_sync
    history = head.fit(
        distribute.skip_batches_smaller_than(
            features.dataset(cached["train"], config.batch_size, True, config.seed),
            replicas,
            cached["train"].count,
            config.batch_size,
        ),
        validation_data=features.dataset(
            cached["val"],
            distribute.eval_batch_size(cached["val"].count, config.batch_size, replicas),
            False,
            config.seed,
        ),
        initial_epoch=phase.initial_epoch,
        epochs=phase.epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,
    )
    head_best = os.path.join(config.model_dir, HEAD_BEST_WEIGHTS)
    if os.path.exists(head_best):
        head.load_weights(head_best)
        best = os.path.join(config.model_dir, BEST_WEIGHTS)
        tmp = best.replace(".weights.h5", ".tmp.weights.h5")  # a kill leaves old or new
        model.save_weights(tmp)
        os.replace(tmp, best)
        # best.json describes best.weights.h5: a following phase (or its resume) compares with it.
        head_json = head_best.removesuffix(".weights.h5") + ".json"
        if os.path.exists(head_json):
            with open(head_json, encoding="utf-8") as f:
                faults.write_json_atomic(best.removesuffix(".weights.h5") + ".json", json.load(f))
    return history


def phase_backup(config: Config, phase: phases.Phase, mode: str) -> str:
    """The backup folder of `phase`, relative to the run dir.

    A one-phase run keeps the plain layout (`backup`, or `backup_head` for the head on cached
    features); a two-phase run has one folder per phase beside its state.json.
    """
    if len(phases.plan(config)) == 1:
        return BACKUPS[1] if mode != "none" else BACKUPS[0]
    return os.path.relpath(phases.backup_dir(config.model_dir, phase.index), config.model_dir)


# The backup folders of a one-phase run (pixels end to end; the head on cached features).
# A two-phase run's live under backup/ (phases.backup_dir).
BACKUPS = ("backup", "backup_head")


def remove_backups(model_dir: str) -> None:
    """Deletes a finished run's backups (each one's metadata first, see faults.remove_backup)."""
    root = phases.backup_dir(model_dir)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if os.path.isdir(os.path.join(root, name)):
                faults.remove_backup(os.path.join(root, name))
    for name in BACKUPS:
        faults.remove_backup(os.path.join(model_dir, name))
    phases.finish(model_dir)


def evaluate_splits(model: keras.Model, pipelines: dict) -> dict[str, float]:
    """Keras metrics of `model` on each split, flat: val_accuracy, test_loss, ..."""
    results = {}
    for split, ds in pipelines.items():
        for name, value in model.evaluate(ds, return_dict=True, verbose=0).items():
            results[f"{split}_{name}"] = float(value)
    return results


def evaluate_and_report(
    model: keras.Model,
    config: Config,
    dataset: data.DataSet,
    pipelines: dict,
    phase_boundary_epoch: int | None = None,
) -> dict:
    """Keras metrics plus the per-class report and plots for val and test, into the run dir.

    Validation picked the best checkpoint, so only the test numbers are unbiased.
    """
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    results = evaluate_splits(model, evaluated)
    for split, ds in evaluated.items():
        report = _write_split_report(model, ds, dataset, config, split, phase_boundary_epoch)
        results[f"{split}_macro_f1"] = report["macro_f1"]
        results[f"{split}_weighted_f1"] = report["weighted_f1"]
        logging.info("%s report:\n%s", split, evaluate.format_report(report, dataset.class_names))
    return results


def _write_split_report(model, ds, dataset, config: Config, split: str, boundary) -> dict:
    """evaluate.write_report for one split into the run dir (curves from history.csv if any)."""
    history_csv = os.path.join(config.model_dir, "history.csv")
    return evaluate.write_report(
        model,
        ds,
        list(dataset.class_names),
        config.model_dir,
        split_name=split,
        history_csv=history_csv if os.path.exists(history_csv) else None,
        phase_boundary_epoch=boundary,
    )


def phase_boundary(config: Config) -> int | None:
    """The first fine-tuning epoch of a two-phase run (curves.png marks it), else None."""
    return config.warmup_epochs if config.two_phase else None


def evaluate_run(config: Config, split: str) -> dict:
    """Re-evaluates a finished run's final weights on `split` (val or test) of `config.data`."""
    best = os.path.join(config.model_dir, BEST_WEIGHTS)
    final = os.path.join(config.model_dir, FINAL_WEIGHTS)
    if not os.path.exists(best):
        raise UserError(f"no checkpoint at {best}: train first, or point --model_dir at a run.")
    # A multi-worker run is evaluated in one process.
    kind = "auto" if config.strategy == "multi_worker" else config.strategy
    strategy = distribute.make_strategy(kind, config.cpu_replicas)
    dataset = load_data(config)
    chosen = {"val": dataset.val, "test": dataset.test}[split]
    if chosen is None:
        raise UserError(f"the data has no {split} split; use --split=val.")
    with strategy.scope():
        model = model_lib.build_model(config, dataset.num_classes)
    with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed here
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(final if os.path.exists(final) else best)
    batch_size = distribute.eval_batch_size(
        chosen.count, config.batch_size, strategy.num_replicas_in_sync
    )
    pipeline = data.make_pipeline(chosen, dataset.num_classes, batch_size, False, config.seed)
    report = _write_split_report(model, pipeline, dataset, config, split, phase_boundary(config))
    report["text"] = evaluate.format_report(report, dataset.class_names)
    return report


def check_supported(config: Config) -> None:
    """Option combinations this backbone or data cannot take: one line, before any work."""
    phases.plan(config)  # a list of --unfreeze values ('compare' takes those)
    if hub_model.is_hub_backbone(config.backbone) and (
        config.two_phase or config.layer_lr_decay < 1.0 or isinstance(config.unfreeze_layers, float)
    ):
        raise UserError(
            "--warmup_epochs, --layer_lr_decay and --unfreeze fractions need a Keras "
            "Applications backbone: a TF Hub module is one layer (--unfreeze=0 or all)."
        )
    if text_data.is_text_source(config) and (
        config.augment != "none" or config.mixup or config.cutmix
    ):
        raise UserError("--augment, --mixup and --cutmix transform images; text data takes none.")


def make_pipelines(
    config: Config, dataset: data.DataSet, replicas: int = 1
) -> dict[str, tf.data.Dataset]:
    """train (shuffled, augmented per the flags), val and, if any, test batches."""
    # Training on pixels (a backbone that trains, or augmented images): decode each image once
    # and keep it in RAM when the split fits. A frozen phase trains on cached features instead.
    on_pixels = config.unfreeze != "0" or not config_lib.augmentation_free(config)
    keep = on_pixels and config.cache != "none"

    def batch_size(split, training):
        if training:  # skip_batches_smaller_than drops the few examples left over
            return config.batch_size
        return distribute.eval_batch_size(split.count, config.batch_size, replicas)

    train_ds, val_ds = (
        data.make_pipeline(
            split,
            dataset.num_classes,
            batch_size(split, training),
            training,
            config.seed,
            keep and data.fits_in_memory(split, config.image_size, data.IMAGE_CACHE_BYTES // 2),
            config.deterministic,
        )
        for split, training in ((dataset.train, True), (dataset.val, False))
    )
    train_ds = augment.augment_training_pipeline(
        train_ds, config.augment, config.mixup, config.cutmix, config.seed
    )
    pipelines = {
        "train": distribute.skip_batches_smaller_than(
            train_ds, replicas, dataset.train.count, config.batch_size
        ),
        "val": val_ds,
    }
    if dataset.test:
        pipelines["test"] = data.make_pipeline(
            dataset.test, dataset.num_classes, batch_size(dataset.test, False), False, config.seed
        )
    return pipelines


def _load_quietly(model: keras.Model, path: str) -> None:
    with warnings.catch_warnings():  # optimizer state of another compile is not needed
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch (training and validation), by epoch number."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[int, float] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds[epoch] = round(time.perf_counter() - self._start, 2)


@dataclasses.dataclass
class Fit:
    """What `fit_phases` leaves: the model as fit left it (with `--ema`, holding the EMA
    weights), one History per phase run in this call, each epoch's seconds, and the epochs
    the last phase had done before this call (a resumed run; 0 otherwise)."""

    model: keras.Model
    histories: list[keras.callbacks.History]
    epoch_seconds: dict[int, float]
    epochs_before: int = 0

    @property
    def epochs(self) -> int:
        """Epochs the run has done in all (the last phase's end, or where it resumed)."""
        epochs = self.histories[-1].epoch if self.histories else []
        return epochs[-1] + 1 if epochs else self.epochs_before


def _resume_point(config: Config, plan: list[phases.Phase]) -> tuple[phases.State | None, int]:
    """The state of an unfinished run (None: a new run) and the epochs it had completed."""
    state = phases.load_state(config.model_dir) if len(plan) > 1 else None
    if state is not None and state.phase > len(plan):
        logging.warning("The unfinished run in %s had more phases: starting anew", config.model_dir)
        remove_backups(config.model_dir)
        state = None
    phase = plan[state.phase - 1] if state else plan[0]
    for mode in ("none", "memory"):  # whichever way the phase trains, its backup says
        meta = faults.read_backup(os.path.join(config.model_dir, phase_backup(config, phase, mode)))
        if meta is not None:
            return state or phases.State(), meta["epoch"]
    return state, phase.initial_epoch if state else 0


def fit_phases(
    config: Config,
    dataset: data.DataSet,
    pipelines: dict,
    strategy: tf.distribute.Strategy,
    extra_callbacks: tuple[keras.callbacks.Callback, ...] = (),
    verbose: int = 2,
    *,
    guard: faults.SignalGuard | None = None,
    keep_backups: bool = False,
    fit_inputs: tuple[tf.data.Dataset, tf.data.Dataset, dict] | None = None,
) -> Fit:
    """Builds the model and runs the phases of `config`, resuming an unfinished run.

    Args:
      guard: SIGINT/SIGTERM handling (see faults.SignalGuard); None under tune and compare.
      keep_backups: leave the backups for the caller to delete once everything the run owes
        is written (train_and_evaluate: after the export); else deleted when fit ends.
      fit_inputs: train and val inputs and fit's step counts when they are not the
        pipelines' (multi-worker: endless inputs; tf.data service). The feature cache is
        not used then (it is computed in this process).
    """
    plan = phases.plan(config)
    multi_worker = config.strategy == "multi_worker"
    state, epochs_done = _resume_point(config, plan)
    if state is None:  # a new run: nothing of an earlier run in this dir may leak in
        shutil.rmtree(os.path.join(config.model_dir, TOP_CHECKPOINTS), ignore_errors=True)
    else:
        logging.info("Resuming an unfinished run in phase %d of %d", state.phase, len(plan))
    resumed = state is not None
    state = state or phases.State()
    # Rows of epochs this run (re)does go: a fresh run starts history.csv over, like the best
    # checkpoint; a resumed one drops rows written after its backup.
    truncate_history(os.path.join(config.model_dir, "history.csv"), epochs_done)
    steps = phases.steps_per_epoch(dataset.train.count, config.batch_size)
    class_weight = (
        data.balanced_class_weights(data.class_counts(dataset.train, dataset.num_classes))
        if config.class_weight == "balanced"
        else None
    )
    with strategy.scope():
        model = model_lib.build_model(config, dataset.num_classes, plan[state.phase - 1], steps)
    if state.phase > 1:
        # Where phase 1 ended; this phase's own backup (if any) then restores later epochs.
        _load_quietly(model, phases.phase_end_weights(config.model_dir, state.phase - 1))
    histories = []
    timer = EpochTimer()
    # The best val_loss so far, for a phase that starts without a backup of its own (a phase
    # with one reads it from best.json itself): none in a new run.
    best_val_loss = _best_so_far(config.model_dir) if state.phase > 1 else None
    for phase in plan[state.phase - 1 :]:
        last = phase is plan[-1]
        if histories:  # the first phase of this call was prepared by build_model
            with strategy.scope():
                model_lib.prepare_phase(model, config, dataset.num_classes, phase, steps)
        model._initial_epoch = None  # set by an earlier fit's backup restore; not ours
        feature_dim = model.get_layer("pooler").output.shape[-1]
        mode = cache_mode(config, feature_dim, dataset.train.count, phase)
        if mode != "none" and fit_inputs is not None:
            logging.info("--cache=%s is not used with multi_worker / --data_service.", mode)
            mode = "none"
        best_weights = HEAD_BEST_WEIGHTS if mode != "none" else BEST_WEIGHTS
        callbacks = make_callbacks(
            config,
            verbose,
            guard,
            best_weights,
            phase_backup(config, phase, mode),
            multi_worker,
            phase=phase,
            best_val_loss=best_val_loss,
            last_phase=last,
        )
        if mode != "none":
            history = fit_on_cached_features(
                model,
                config,
                dataset,
                strategy,
                mode,
                verbose,
                callbacks=[timer, *callbacks, *extra_callbacks],
                phase=phase,
                steps_per_epoch=steps,
                class_weight=class_weight,
            )
        else:
            train_ds, val_ds, fit_steps = fit_inputs or (pipelines["train"], pipelines["val"], {})
            history = model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=phase.initial_epoch,
                epochs=phase.epochs,
                class_weight=class_weight,
                callbacks=[timer, *callbacks, *extra_callbacks],
                verbose=verbose,
                shuffle=False,  # the pipeline shuffles with the seed; Keras cannot shuffle a Dataset
                **fit_steps,
            )
        histories.append(history)
        best = _best_checkpoint(callbacks).best
        best_val_loss = float(best) if best is not None and np.isfinite(best) else best_val_loss
        if not last:
            # Order matters for a kill at any point: weights, then the state, then the backup.
            phases.save_phase_end(model, config.model_dir, phase.index)
            phases.save_state(config.model_dir, phases.State(phase.index + 1, best_val_loss))
            faults.remove_backup(phases.backup_dir(config.model_dir, phase.index))
    if not keep_backups:
        remove_backups(config.model_dir)
    before = epochs_done if resumed and state.phase == plan[-1].index else 0
    return Fit(model, histories, timer.seconds, before)


def _best_checkpoint(callbacks: list[keras.callbacks.Callback]) -> faults.BestCheckpoint:
    return next(c for c in callbacks if isinstance(c, faults.BestCheckpoint))


def _best_so_far(model_dir: str) -> float | None:
    """The best val_loss of the run's best checkpoint (its best.json), if any."""
    path = os.path.join(model_dir, BEST_WEIGHTS).removesuffix(".weights.h5") + ".json"
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return float(saved["best"]) if saved.get("monitor") == "val_loss" else None


def best_checkpoint_scores(model: keras.Model, config: Config, pipelines: dict) -> dict:
    """val_* metrics of the run's best checkpoint (loaded into `model`), for tune and compare."""
    best = os.path.join(config.model_dir, BEST_WEIGHTS)
    if os.path.exists(best):
        _load_quietly(model, best)
    return evaluate_splits(model, {"val": pipelines["val"]})


def candidate_weights(
    model: keras.Model, config: Config, pipelines: dict
) -> tuple[str, dict[str, dict[str, float]]]:
    """Evaluates the best checkpoint, the EMA and the best-K average side by side.

    Leaves the winner (lowest val_loss: validation chooses, test stays honest) in `model`.

    Returns:
      The winner's name and each candidate's val/test metrics.
    """
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    final = os.path.join(config.model_dir, FINAL_WEIGHTS)
    if os.path.exists(final):
        os.remove(final)  # an earlier run's choice; rewritten below if this run's differs
    weights, results = {}, {}
    if config.ema:  # fit has just swapped the EMA into the model
        weights["ema"] = model.get_weights()
        results["ema"] = evaluate_splits(model, evaluated)
    if config.average_checkpoints:
        keeper = averaging.KeepBestCheckpoints(
            os.path.join(config.model_dir, TOP_CHECKPOINTS), config.average_checkpoints
        )
        if keeper.paths():
            averaging.average_weights(model, keeper.paths())
            name = f"average_of_best_{len(keeper.paths())}"
            weights[name] = model.get_weights()
            results[name] = evaluate_splits(model, evaluated)
    best = os.path.join(config.model_dir, BEST_WEIGHTS)
    if os.path.exists(best):
        _load_quietly(model, best)  # the exported model is the best one on val_loss
        weights["best_checkpoint"] = model.get_weights()
        if results:
            results["best_checkpoint"] = evaluate_splits(model, evaluated)
    if not results:
        return "best_checkpoint", {}
    winner = min(results, key=lambda name: results[name]["val_loss"])
    model.set_weights(weights[winner])
    if winner != "best_checkpoint":
        tmp = final.replace(".weights.h5", ".tmp.weights.h5")
        model.save_weights(tmp)
        os.replace(tmp, final)
    return winner, results


def gate_accuracy(metrics: dict) -> tuple[str, float]:
    """The accuracy --min_accuracy checks: test's when there is a test split, else val's."""
    split = "test" if "test_accuracy" in metrics else "val"
    return split, metrics[f"{split}_accuracy"]


def scratch_baseline(
    config: Config, pipelines: dict, num_classes: int, strategy: tf.distribute.Strategy
) -> dict[str, float]:
    """The same network trained from random init on the same data, epochs and seed."""
    scratch = dataclasses.replace(config, weights="none", unfreeze="all", warmup_epochs=0)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = model_lib.build_model(scratch, num_classes)
    model.fit(pipelines["train"], epochs=config.epochs, verbose=0, shuffle=False)
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    return {f"scratch_{k}": v for k, v in evaluate_splits(model, evaluated).items()}


def seed_everything(config: Config) -> None:
    """Seeds Python, NumPy and TF; with --deterministic, op determinism on CPU unless XLA is
    asked for or a fine-tuned hub module has unseeded random ops (can_be_deterministic).

    Keras silently drops `jit_compile=True` while op determinism is on (not every XLA kernel
    is deterministic), so `--jit_compile` turns it off, also after an earlier run in this
    process turned it on (TF has no public switch back).
    """
    from tensorflow.python.framework import config as tf_config

    keras.utils.set_random_seed(config.seed)
    if (
        config.deterministic
        and not config.jit_compile
        and not tf.config.list_physical_devices("GPU")
        and hub_model.can_be_deterministic(config)
    ):
        # Same seed, same numbers on CPU. Not on GPUs: some kernels have no deterministic
        # version there and would raise, and the deterministic ones are slower.
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()  # a previous run in this process may have enabled it


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def train_and_evaluate(
    config: Config, extra_callbacks: tuple[keras.callbacks.Callback, ...] = ()
) -> dict:
    """Runs one configured training job end to end and returns metrics.json's content.

    Holds a lock on the run directory, turns SIGINT/SIGTERM into a clean stop with a backup,
    and deletes the backups only once the export exists, so a run killed at any point resumes
    from its last saved state (see faults.py) in the phase it was in (see phases.py).

    Args:
      config: a resolved config (`config.resolve`).
      extra_callbacks: added to fit's callbacks (tests use it to interrupt a run).

    Raises:
      BelowMinAccuracy: the model missed --min_accuracy (metrics.json written, not exported).
    """
    start = time.time()
    check_supported(config)
    multi_worker = config.strategy == "multi_worker"
    if multi_worker:
        # Every worker runs the same code; only the chief writes into model_dir, the others
        # into a private scratch dir (removed once the run succeeds).
        out_dir = mw.scratch_dir_for(config.model_dir)
        if out_dir != config.model_dir:
            config = dataclasses.replace(
                config, model_dir=out_dir, export_dir=os.path.join(out_dir, "export")
            )
    with faults.RunLock(config.model_dir), faults.SignalGuard(config.model_dir) as guard:
        # The strategy comes first: MultiWorkerMirroredStrategy must precede any other TF op.
        strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
        metrics = _train_and_evaluate(config, strategy, guard, extra_callbacks)
        metrics["wall_time_seconds"] = round(time.time() - start, 1)
        _write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
        remove_backups(config.model_dir)  # only now: everything the run owes is written
    if multi_worker and not mw.is_chief():
        shutil.rmtree(config.model_dir, ignore_errors=True)
    gate = metrics.get("min_accuracy")
    if gate and gate["accuracy"] < gate["bar"]:
        raise BelowMinAccuracy(
            f"{gate['split']} accuracy {gate['accuracy']:.4f} is below --min_accuracy="
            f"{gate['bar']}: not exported; the run is kept in {config.model_dir}."
        )
    return metrics


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of all weights: equal on every worker of a multi-worker run."""
    import hashlib

    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(w.tobytes())
    return digest.hexdigest()[:16]


def _train_and_evaluate(
    config: Config,
    strategy: tf.distribute.Strategy,
    guard: faults.SignalGuard,
    extra_callbacks: tuple[keras.callbacks.Callback, ...],
) -> dict:
    multi_worker = config.strategy == "multi_worker"
    chief = mw.is_chief()
    logging.info(
        "Strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync
    )
    os.makedirs(config.model_dir, exist_ok=True)
    with open(os.path.join(config.model_dir, "flags.cfg"), "w", encoding="utf-8") as f:
        f.write(config.to_flagfile())
    if config.backbone == "digits_cnn" and config.weights == "imagenet":
        digits.pretrained_weights_path()  # pretrain the source task before seeding this run
    seed_everything(config)

    dataset = load_data(config)
    logging.info(
        "Data: %d classes, %d train / %d val / %s test images",
        dataset.num_classes,
        dataset.train.count,
        dataset.val.count,
        dataset.test.count if dataset.test else 0,
    )
    pipelines = make_pipelines(config, dataset, strategy.num_replicas_in_sync)
    fit_inputs = None
    if multi_worker:
        # Endless input and a fixed number of steps: every worker runs exactly the same steps
        # (a worker that ran out of batches first would leave the others hanging).
        fit_inputs = _multi_worker_inputs(dataset, config)
    elif config.data_service:
        fit_inputs = (
            with_data_service(pipelines["train"], config.data_service),
            pipelines["val"],
            {},
        )
    verbose = 1 if sys.stdout.isatty() else 2
    fit = fit_phases(
        config,
        dataset,
        pipelines,
        strategy,
        extra_callbacks,
        verbose,
        guard=guard,
        keep_backups=True,
        fit_inputs=fit_inputs,
    )
    model = fit.model
    replicas = strategy.num_replicas_in_sync
    if multi_worker:
        logging.info("Final weights fingerprint %s", weights_fingerprint(model))
        # Evaluate and export in this process alone (no collectives): a plain copy of the
        # model. Only the chief's results are kept; the others have nothing more to do.
        if not chief:
            return {"epochs": fit.epochs, "replicas": replicas, "chief": False}
        trained = model
        model = model_lib.build_model(config, dataset.num_classes)
        model.set_weights(trained.get_weights())
        strategy = tf.distribute.get_strategy()
    exported_weights, candidates = candidate_weights(model, config, pipelines)

    metrics = {
        **_last_epoch(fit.histories[-1], config.model_dir),
        **evaluate_and_report(model, config, dataset, pipelines, phase_boundary(config)),
        "class_names": list(dataset.class_names),
        "train_images": dataset.train.count,
        "val_images": dataset.val.count,
        "test_images": dataset.test.count if dataset.test else 0,
        "skipped_files": [{"file": p, "reason": r} for p, r in dataset.skipped_files],
        "epochs": fit.epochs,
        "phase_boundary_epoch": phase_boundary(config),
        "backbone": config.backbone,
        "replicas": replicas,
        "trainable_parameters": count_parameters(model.trainable_weights),
        # This call's epochs only (a resumed run did not time the earlier ones).
        "epoch_seconds": {str(e): t for e, t in sorted(fit.epoch_seconds.items())},
    }
    if candidates:
        metrics["candidates"] = candidates
        metrics["exported_weights"] = exported_weights
    if config.is_offline_default and not hub_model.is_hub_backbone(config.backbone):
        metrics.update(scratch_baseline(config, pipelines, dataset.num_classes, strategy))
    if config.min_accuracy:
        split, accuracy = gate_accuracy(metrics)
        metrics["min_accuracy"] = {"split": split, "accuracy": accuracy, "bar": config.min_accuracy}
        if accuracy < config.min_accuracy:
            metrics["export_path"] = None  # train_and_evaluate raises BelowMinAccuracy
            return metrics
    metrics["export_path"] = export.export_saved_model(
        model,
        list(dataset.class_names),
        config.image_size,
        config.export_base,
        version=config.export_version,
        card=export.run_card(config, list(dataset.class_names), metrics),
    )
    return metrics


def count_parameters(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


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


def _multi_worker_inputs(dataset: data.DataSet, config: Config):
    """Repeated train/val pipelines and the step counts that make one epoch of each."""
    options = tf.data.Options()
    # Folder pipelines start from a list of paths, not files: shard by data.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    def endless(split, training):
        repeated = dataclasses.replace(split, source=split.source.repeat())
        ds = data.make_pipeline(
            repeated, dataset.num_classes, config.batch_size, training, config.seed
        )
        return ds.with_options(options)

    def steps(split):
        return max(1, -(-split.count // config.batch_size))

    train_ds = augment.augment_training_pipeline(
        endless(dataset.train, True), config.augment, config.mixup, config.cutmix, config.seed
    )
    return (
        train_ds,
        endless(dataset.val, False),
        {"steps_per_epoch": steps(dataset.train), "validation_steps": steps(dataset.val)},
    )


def _last_epoch(history: keras.callbacks.History, model_dir: str) -> dict[str, float]:
    """The last epoch's training loss and accuracy (from history.csv when fit had none left)."""
    rows = {k: v for k, v in history.history.items() if v}
    if not rows:
        path = os.path.join(model_dir, "history.csv")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                last = list(csv.DictReader(f))[-1:]
            rows = {k: [float(v)] for row in last for k, v in row.items() if v}
    return {k: float(rows[k][-1]) for k in ("loss", "accuracy") if k in rows}
