"""Training: strategy, data, model compiled under `strategy.scope()`, `fit`, evaluate, export.

A flat list of small functions ending in `train_and_evaluate(config)`.
"""

import csv
import dataclasses
import functools
import json
import os
import sys
import time
import warnings

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import (
    backbones,
    data,
    digits,
    evaluate,
    export,
    faults,
    features,
    hub_model,
    text_data,
)
from tf_finetune import model as model_lib
from tf_finetune import multiworker as mw
from tf_finetune.config import Config
from tf_finetune.errors import UserError

BEST_WEIGHTS = os.path.join("checkpoints", "best.weights.h5")


# ----------------------------------------------------------------------------- devices
def configure_cpu_replicas(cpu_replicas: int) -> None:
    """Splits the CPU into `cpu_replicas` logical devices (only without GPUs).

    Must run before TensorFlow initializes its devices; a second call with a number that is
    already in place is a no-op.
    """
    if cpu_replicas <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) >= cpu_replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
        )
    except RuntimeError as e:
        raise RuntimeError(
            "--cpu_replicas must be applied before TensorFlow initializes its devices"
        ) from e


def make_strategy(kind: str, cpu_replicas: int) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs (or `cpu_replicas` logical CPUs); else one device.

    `multi_worker`: MultiWorkerMirroredStrategy from TF_CONFIG, with the Keras 3 workarounds
    (keras-team/keras#20585); must be the first TensorFlow op of the process.
    """
    if kind == "multi_worker":
        strategy = mw.make_multi_worker_strategy()
        mw.apply_keras_workarounds()
        return strategy
    configure_cpu_replicas(cpu_replicas)
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    devices = gpus or cpus[: max(cpu_replicas, 1)]
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0])
    if kind == "mirrored" or len(devices) > 1:
        return _mirrored(tuple(devices))
    return tf.distribute.get_strategy()


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per device set and process.

    A second MirroredStrategy over the same devices restarts the collective instance keys,
    which then collide with the first one's ("Shape mismatch in the collective instance
    100") when a process trains twice (tests, notebooks).
    """
    return tf.distribute.MirroredStrategy(list(devices))


def skip_batches_smaller_than(
    ds: tf.data.Dataset, replicas: int, count: int, batch_size: int
) -> tf.data.Dataset:
    """Drops training batches too small to give every replica an example.

    MirroredStrategy splits each batch across replicas; a last batch smaller than the
    number of replicas leaves one empty and its backward pass fails (`Matrix size-incompatible:
    In[0]: [0,C]`, tensorflow#45594). At most replicas-1 examples are skipped per epoch, and
    the reshuffle puts different ones last each epoch.
    """
    last = count % batch_size
    if replicas <= 1 or last == 0 or last >= replicas:
        return ds
    # Keras needs the number of steps up front (else it warns that the data ran out).
    ds = ds.filter(lambda x, y: tf.shape(y)[0] >= replicas)
    return ds.apply(tf.data.experimental.assert_cardinality(count // batch_size))


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


# ----------------------------------------------------------------------------- model
def weights_arg(config: Config) -> str | None:
    return None if config.weights == "none" else config.weights


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, momentum=0.9)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
    return keras.optimizers.Adam(config.learning_rate)


def compile_model(model: keras.Model, config: Config, num_classes: int) -> None:
    metrics = ["accuracy"]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(
        optimizer=make_optimizer(config),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=metrics,
    )


def build_model(config: Config, num_classes: int) -> keras.Model:
    """Builds and compiles the classifier; call inside `strategy.scope()`."""
    if hub_model.is_hub_backbone(config.backbone):
        model = hub_model.build_classifier(config, num_classes)
        compile_model(model, config, num_classes)
        return model
    spec = backbones.get_spec(config.backbone)
    model = model_lib.build_classifier(
        spec,
        num_classes,
        config.image_size,
        weights_arg(config),
        config.dropout,
        config.backbone_alpha,
    )
    trainable = model_lib.unfreeze(model, config.unfreeze_layers)
    if trainable:
        logging.info(
            "Training %d backbone layers: %s ...", len(trainable), ", ".join(trainable[:5])
        )
    compile_model(model, config, num_classes)
    return model


# ----------------------------------------------------------------------------- fit
def make_callbacks(
    config: Config,
    verbose: int,
    guard: faults.SignalGuard,
    best_weights: str = BEST_WEIGHTS,
    backup_name: str = "backup",
    multi_worker: bool = False,
) -> list[keras.callbacks.Callback]:
    """NaN and signal stops, CSV history, best checkpoint, backup, TensorBoard, stoppers.

    The order matters at each epoch end: history row, then best checkpoint, then the backup
    that marks the epoch done. A kill in between reruns the epoch, which only repeats a row
    (`truncate_history` drops it) and never loses a better checkpoint.
    """
    run = config.model_dir
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    # Saved every epoch (and on SIGINT/SIGTERM); a rerun of the same command resumes from it.
    backup = faults.AtomicBackup(os.path.join(run, backup_name))
    best = faults.BestCheckpoint(os.path.join(run, best_weights), backup, monitor="val_loss")
    callbacks = [
        faults.StopOnNaN(best),
        faults.StopOnSignal(guard, backup),
        keras.callbacks.CSVLogger(os.path.join(run, "history.csv"), append=True),
        best,
        backup,
        *([mw.resume_epoch_check()] if multi_worker else []),
        keras.callbacks.TensorBoard(os.path.join(run, "logs")),
    ]
    if config.early_stopping_patience:
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


def cache_mode(config: Config, feature_dim: int, count: int) -> str:
    """none, memory or disk: whether (and where) to train the head on cached features."""
    if config.unfreeze != "0":
        if config.cache == "auto":
            logging.info("Backbone unfrozen: training end to end on pixels (no feature cache).")
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
        "format": 1,
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
    guard: faults.SignalGuard,
    extra_callbacks=(),
) -> keras.callbacks.History:
    """Trains the head of `model` on backbone features computed once (see features.py).

    Leaves `model` (which shares the head's layers) with the best head weights, and writes them
    as the full model's best checkpoint so `evaluate` and `export` find the usual file.
    """
    with strategy.scope():
        extractor, head = features.split_classifier(model)
        compile_model(head, config, dataset.num_classes)
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
    replicas = strategy.num_replicas_in_sync
    history = head.fit(
        skip_batches_smaller_than(
            features.dataset(cached["train"], config.batch_size, True, config.seed),
            replicas,
            cached["train"].count,
            config.batch_size,
        ),
        validation_data=features.dataset(cached["val"], config.batch_size, False, config.seed),
        epochs=config.epochs,
        callbacks=make_callbacks(config, verbose, guard, HEAD_BEST_WEIGHTS, "backup_head")
        + list(extra_callbacks),
        verbose=verbose,
        shuffle=False,
    )
    head_best = os.path.join(config.model_dir, HEAD_BEST_WEIGHTS)
    if os.path.exists(head_best):
        head.load_weights(head_best)
        model.save_weights(os.path.join(config.model_dir, BEST_WEIGHTS))
    return history


def evaluate_splits(model: keras.Model, pipelines: dict) -> dict[str, float]:
    """Keras metrics of `model` on each split, flat: val_accuracy, test_loss, ..."""
    results = {}
    for split, ds in pipelines.items():
        for name, value in model.evaluate(ds, return_dict=True, verbose=0).items():
            results[f"{split}_{name}"] = float(value)
    return results


def evaluate_and_report(
    model: keras.Model, config: Config, dataset: data.DataSet, pipelines: dict
) -> dict:
    """Keras metrics plus the per-class report and plots for val and test, into the run dir.

    Validation picked the best checkpoint, so only the test numbers are unbiased.
    """
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    results = evaluate_splits(model, evaluated)
    history_csv = os.path.join(config.model_dir, "history.csv")
    for split, ds in evaluated.items():
        report = evaluate.write_report(
            model,
            ds,
            list(dataset.class_names),
            config.model_dir,
            split_name=split,
            history_csv=history_csv if os.path.exists(history_csv) else None,
        )
        results[f"{split}_macro_f1"] = report["macro_f1"]
        results[f"{split}_weighted_f1"] = report["weighted_f1"]
        logging.info("%s report:\n%s", split, evaluate.format_report(report, dataset.class_names))
    return results


def evaluate_run(config: Config, split: str) -> dict:
    """Re-evaluates a finished run's best checkpoint on `split` (val or test) of `config.data`."""
    best = os.path.join(config.model_dir, BEST_WEIGHTS)
    if not os.path.exists(best):
        raise UserError(f"no checkpoint at {best}: train first, or point --model_dir at a run.")
    # A multi-worker run is evaluated in one process.
    kind = "auto" if config.strategy == "multi_worker" else config.strategy
    strategy = make_strategy(kind, config.cpu_replicas)
    dataset = load_data(config)
    chosen = {"val": dataset.val, "test": dataset.test}[split]
    if chosen is None:
        raise UserError(f"the data has no {split} split; use --split=val.")
    with strategy.scope():
        model = build_model(config, dataset.num_classes)
    with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed here
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best)
    pipeline = data.make_pipeline(
        chosen, dataset.num_classes, config.batch_size, False, config.seed
    )
    history_csv = os.path.join(config.model_dir, "history.csv")
    report = evaluate.write_report(
        model,
        pipeline,
        list(dataset.class_names),
        config.model_dir,
        split_name=split,
        history_csv=history_csv if os.path.exists(history_csv) else None,
    )
    report["text"] = evaluate.format_report(report, dataset.class_names)
    return report


def scratch_baseline(
    config: Config, pipelines: dict, num_classes: int, strategy: tf.distribute.Strategy
) -> dict[str, float]:
    """The same network trained from random init on the same data, epochs and seed."""
    scratch = dataclasses.replace(config, weights="none", unfreeze="all")
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(scratch, num_classes)
    model.fit(pipelines["train"], epochs=config.epochs, verbose=0, shuffle=False)
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    return {f"scratch_{k}": v for k, v in evaluate_splits(model, evaluated).items()}


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
    from its last saved state (see faults.py).

    Args:
      config: a resolved config (`config.resolve`).
      extra_callbacks: added to fit's callbacks (tests use it to interrupt a run).
    """
    start = time.time()
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
        strategy = make_strategy(config.strategy, config.cpu_replicas)
        metrics = _train_and_evaluate(config, strategy, guard, extra_callbacks)
        metrics["wall_time_seconds"] = round(time.time() - start, 1)
        _write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
        for name in BACKUPS:  # only now: everything the run owes is written
            faults.remove_backup(os.path.join(config.model_dir, name))
    if multi_worker and not mw.is_chief():
        import shutil

        shutil.rmtree(config.model_dir, ignore_errors=True)
    return metrics


# The backup folders of the two ways to train (pixels end to end; the head on cached features).
BACKUPS = ("backup", "backup_head")


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
    keras.utils.set_random_seed(config.seed)
    if not tf.config.list_physical_devices("GPU") and hub_model.can_be_deterministic(config):
        # Same seed, same numbers on CPU. Not on GPUs: some kernels have no deterministic
        # version there and would raise, and the deterministic ones are slower.
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()  # a previous run in this process may have enabled it

    dataset = load_data(config)
    logging.info(
        "Data: %d classes, %d train / %d val / %s test images",
        dataset.num_classes,
        dataset.train.count,
        dataset.val.count,
        dataset.test.count if dataset.test else 0,
    )
    # Training on pixels (a backbone that trains): decode each image once and keep it in RAM
    # when the split fits. A frozen backbone trains on cached features instead.
    keep = config.unfreeze != "0" and config.cache != "none"
    pipelines = {
        name: data.make_pipeline(
            split,
            dataset.num_classes,
            config.batch_size,
            name == "train",
            config.seed,
            keep and data.fits_in_memory(split, config.image_size, data.IMAGE_CACHE_BYTES // 2),
        )
        for name, split in (("train", dataset.train), ("val", dataset.val))
    }
    if dataset.test:
        pipelines["test"] = data.make_pipeline(
            dataset.test, dataset.num_classes, config.batch_size, False, config.seed
        )
    pipelines["train"] = skip_batches_smaller_than(
        pipelines["train"], strategy.num_replicas_in_sync, dataset.train.count, config.batch_size
    )
    fit_train, fit_val, steps = pipelines["train"], pipelines["val"], {}
    if config.data_service:
        fit_train = with_data_service(fit_train, config.data_service)
    if multi_worker:
        # Endless input and a fixed number of steps: every worker runs exactly the same steps
        # (a worker that ran out of batches first would leave the others hanging).
        fit_train, fit_val, steps = _multi_worker_inputs(dataset, config)

    with strategy.scope():
        model = build_model(config, dataset.num_classes)
    verbose = 1 if sys.stdout.isatty() else 2
    mode = cache_mode(config, model.get_layer("pooler").output.shape[-1], dataset.train.count)
    if mode != "none" and (multi_worker or config.data_service):
        # The feature cache is computed in this process; these two train on pixels throughout.
        logging.info("--cache=%s is not used with multi_worker / --data_service.", mode)
        mode = "none"
    resumed = faults.read_backup(
        os.path.join(config.model_dir, "backup_head" if mode != "none" else "backup")
    )
    # Rows of epochs this run (re)does go: a fresh run starts history.csv over, like the best
    # checkpoint; a resumed one drops rows written after its backup.
    truncate_history(
        os.path.join(config.model_dir, "history.csv"), resumed["epoch"] if resumed else 0
    )
    if mode != "none":
        history = fit_on_cached_features(
            model, config, dataset, strategy, mode, verbose, guard, extra_callbacks
        )
    else:
        history = model.fit(
            fit_train,
            validation_data=fit_val,
            epochs=config.epochs,
            callbacks=make_callbacks(config, verbose, guard, multi_worker=multi_worker)
            + list(extra_callbacks),
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles (with the seed); Keras cannot shuffle a Dataset
            **steps,
        )
    replicas = strategy.num_replicas_in_sync
    if multi_worker:
        logging.info("Final weights fingerprint %s", weights_fingerprint(model))
        # Evaluate and export in this process alone (no collectives): a plain copy of the
        # model. Only the chief's results are kept; the others have nothing more to do.
        if not chief:
            return {"epochs": _epochs_done(history, resumed), "replicas": replicas, "chief": False}
        trained = model
        model = build_model(config, dataset.num_classes)
        model.set_weights(trained.get_weights())
        strategy = tf.distribute.get_strategy()
    best = os.path.join(config.model_dir, BEST_WEIGHTS)
    if os.path.exists(best):
        model.load_weights(best)  # the exported model is the best one on val_loss

    metrics = {
        **_last_epoch(history, config.model_dir),
        **evaluate_and_report(model, config, dataset, pipelines),
        "class_names": list(dataset.class_names),
        "train_images": dataset.train.count,
        "val_images": dataset.val.count,
        "test_images": dataset.test.count if dataset.test else 0,
        "skipped_files": [{"file": p, "reason": r} for p, r in dataset.skipped_files],
        "epochs": _epochs_done(history, resumed),
        "backbone": config.backbone,
        "replicas": replicas,
    }
    if config.is_offline_default and not hub_model.is_hub_backbone(config.backbone):
        metrics.update(scratch_baseline(config, pipelines, dataset.num_classes, strategy))
    metrics["export_path"] = export.export_saved_model(
        model,
        list(dataset.class_names),
        config.image_size,
        config.export_base,
        version=config.export_version,
        card=export.run_card(config, list(dataset.class_names), metrics),
    )
    return metrics


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

    return (
        endless(dataset.train, True),
        endless(dataset.val, False),
        {"steps_per_epoch": steps(dataset.train), "validation_steps": steps(dataset.val)},
    )


def _epochs_done(history: keras.callbacks.History, resumed: dict | None) -> int:
    if history.epoch:
        return history.epoch[-1] + 1
    return resumed["epoch"] if resumed else 0  # resumed after the last epoch: nothing to run


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
