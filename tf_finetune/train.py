"""Training: one run end to end, read top to bottom as it happens.

`train_and_evaluate(config)` is a short sequence of named steps:

    prepare the run dir -> inputs -> fit the phases (model built, resumed if unfinished)
    -> choose the weights -> report -> gate -> export

Each step's work lives in its own module: rundir.py (the run's files), input_pipeline.py (data),
model.py (the classifier), callbacks.py, feature_fit.py (the head on cached features),
phases.py (two-phase plan, backups, resume), selection.py (best / EMA / average, the gate),
scoring.py (metrics and reports), export.py (the SavedModel).
"""

import dataclasses
import hashlib
import shutil
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import (
    backbone_table,
    callbacks,
    data,
    distribute,
    export,
    faults,
    feature_fit,
    features,
    hub_model,
    input_pipeline,
    offline_default,
    own_model,
    phases,
    report,
    rundir,
    scoring,
    selection,
)
from tf_finetune import model as model_lib
from tf_finetune import multiworker as mw
from tf_finetune.config import Config
from tf_finetune.errors import BelowMinAccuracy, UserError
from tf_finetune.timings import Timings


def train_and_evaluate(
    config: Config, extra_callbacks: tuple[keras.callbacks.Callback, ...] = ()
) -> dict:
    """Runs one configured training job end to end and returns metrics.json's content.

    Holds a lock on the run directory, turns SIGINT/SIGTERM into a clean stop with a backup,
    and deletes the backups only once the export exists, so a run killed at any point resumes
    from its last saved state (see faults.py) in the phase it was in (see phases.py).

    Args:
      config: a resolved config (`resolve.resolve`).
      extra_callbacks: added to fit's callbacks (tests use it to interrupt a run).

    Raises:
      BelowMinAccuracy: the model missed --min_accuracy (metrics.json written, not exported).
    """
    timings = Timings()
    config = _worker_config(config)
    with faults.RunLock(config.model_dir), faults.SignalGuard(config.model_dir) as guard:
        # The strategy comes first: MultiWorkerMirroredStrategy must precede any other TF op.
        strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
        metrics = _run(config, strategy, guard, extra_callbacks, timings)
        metrics["timings"] = timings.as_dict()
        # This call's own time (the timings' total also counts the process start-up).
        metrics["wall_time_seconds"] = round(timings.elapsed(), 1)
        rundir.write_metrics(config.model_dir, metrics)
        write_report_page(config.model_dir)
        phases.remove_backups(config.model_dir)  # only now: everything the run owes is written
    if config.strategy == "multi_worker" and not mw.is_chief():
        shutil.rmtree(config.model_dir, ignore_errors=True)
    _check_gate(metrics, config)
    return metrics


def _run(
    config: Config,
    strategy: tf.distribute.Strategy,
    guard: faults.SignalGuard,
    extra_callbacks: tuple[keras.callbacks.Callback, ...],
    timings: Timings,
) -> dict:
    """The steps between taking the run dir and writing metrics.json."""
    logging.info(
        "Strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync
    )
    with timings.stage("prepare"):
        prepare_run_dir(config)
    with timings.stage("data"):
        dataset, pipelines, fit_inputs = prepare_inputs(config, strategy)
    own_model.keep_source(config, dataset.class_names)  # a run dir / .keras / export: a copy
    fit = fit_phases(
        config,
        dataset,
        pipelines,
        strategy,
        extra_callbacks,
        _fit_verbosity(),
        guard=guard,
        keep_backups=True,
        fit_inputs=fit_inputs,
        timings=timings,
    )
    model, replicas = fit.model, strategy.num_replicas_in_sync  # the replicas that trained
    if config.strategy == "multi_worker":
        model = _chief_model(model, config, dataset.num_classes)
        if model is None:  # the other workers have nothing more to do
            return {"epochs": fit.epochs, "replicas": replicas, "chief": False}
        strategy = tf.distribute.get_strategy()  # evaluate alone, on a plain copy
    with timings.stage("evaluate"):
        # A head fit on cached features leaves the model holding its best checkpoint.
        holds_best = fit.features is not None
        chosen, candidates = selection.choose_weights(model, config, pipelines, holds_best)
        metrics = run_metrics(model, config, dataset, pipelines, fit, replicas)
        if candidates:
            metrics.update(candidates=candidates, exported_weights=chosen)
        kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
        if config.is_offline_default and kind == backbone_table.APPLICATIONS:
            comparison = offline_default.compare_with_scratch(
                config, pipelines, dataset.num_classes, strategy, metrics
            )
            metrics.update(comparison)
    if not _passes_gate(metrics, config):
        metrics["export_path"] = None  # train_and_evaluate raises BelowMinAccuracy
        return metrics
    with timings.stage("export"):
        metrics["export_path"] = export.export_saved_model(
            model,
            list(dataset.class_names),
            config.image_size,
            config.export_base,
            version=config.export_version,
            card=export.run_card(config, list(dataset.class_names), metrics),
        )
    return metrics


# ----------------------------------------------------------------------------- steps
def _worker_config(config: Config) -> Config:
    """Every worker of a multi-worker run runs the same code; only the chief writes into
    model_dir, the others into a private scratch dir (removed once the run succeeds)."""
    if config.strategy != "multi_worker":
        return config
    out_dir = mw.scratch_dir_for(config.model_dir)
    if out_dir == config.model_dir:
        return config
    return dataclasses.replace(config, model_dir=out_dir, export_dir=f"{out_dir}/export")


def prepare_run_dir(config: Config) -> None:
    """flags.cfg (reruns the run), the offline default's pretraining, then the seeds."""
    rundir.write_flagfile(config.model_dir, config.to_flagfile())
    if config.backbone == "digits_cnn" and config.weights == "imagenet":
        offline_default.pretrain()  # the source task, before this run seeds anything
    seed_everything(config)


def prepare_inputs(config: Config, strategy: tf.distribute.Strategy):
    """The data set, its pipelines, and fit's own inputs when they are not the pipelines'.

    Returns:
      (dataset, pipelines, fit_inputs): fit_inputs is None, or (train, val, fit step counts)
      for multi-worker (endless inputs, fixed steps: every worker runs exactly the same
      steps) and the tf.data service.
    """
    dataset = input_pipeline.load_data(config, offline_default.data_folder(config), training=True)
    logging.info(
        "Data: %d classes, %d train / %d val / %s test examples",
        dataset.num_classes,
        dataset.train.count,
        dataset.val.count,
        dataset.test.count if dataset.test else 0,
    )
    replicas = strategy.num_replicas_in_sync
    pipelines = input_pipeline.make_pipelines(config, dataset, replicas)
    fit_inputs = None
    if config.strategy == "multi_worker":
        endless = input_pipeline.make_pipelines(config, dataset, replicas, endless=True)
        fit_inputs = (endless["train"], endless["val"], input_pipeline.fit_steps(config, dataset))
    elif config.data_service:
        train = input_pipeline.with_data_service(pipelines["train"], config.data_service)
        fit_inputs = (train, pipelines["val"], {})
    return dataset, pipelines, fit_inputs


def _chief_model(model: keras.Model, config: Config, num_classes: int) -> keras.Model | None:
    """A plain copy of the trained model for evaluation and export in this process alone (no
    collectives), on the chief; None on the other workers."""
    logging.info("Final weights fingerprint %s", weights_fingerprint(model))
    if not mw.is_chief():
        return None
    copy = model_lib.build_model(config, num_classes)
    copy.set_weights(model.get_weights())
    return copy


def run_metrics(model, config, dataset, pipelines, fit, replicas: int) -> dict:
    """metrics.json's content: the last epoch, val/test scores and reports, the data."""
    boundary = scoring.phase_boundary(config)
    return {
        **rundir.last_epoch(fit.histories[-1], config.model_dir),
        **scoring.evaluate_and_report(
            model, config, dataset, pipelines, _cached_splits(model, config, dataset, fit)
        ),
        "class_names": list(dataset.class_names),
        "train_images": dataset.train.count,
        "val_images": dataset.val.count,
        "test_images": dataset.test.count if dataset.test else 0,
        "skipped_files": [{"file": p, "reason": r} for p, r in dataset.skipped_files],
        "epochs": fit.epochs,
        **({"head_solver": fit.head_solver} if fit.head_solver else {}),
        "phase_boundary_epoch": boundary,
        "backbone": config.backbone,
        "replicas": replicas,
        "trainable_parameters": count_parameters(model.trainable_weights),
        # This call's epochs only (a resumed run did not time the earlier ones).
        "epoch_seconds": {str(e): t for e, t in sorted(fit.epoch_seconds.items())},
    }


def _cached_splits(model, config: Config, dataset: data.DataSet, fit: "Fit"):
    """The reports' features when the last phase fit the head on cached features: val's from
    the fit, test's computed now (one pass, instead of decoding val and test for a pass of the
    whole model); None otherwise (the backbone changed, or no cache)."""
    if fit.features is None:
        return None
    mode, cached = fit.features
    splits = {"val": cached["val"]}
    test = feature_fit.test_features(model, config, dataset, mode)
    if test is not None:
        splits["test"] = test
    _, head = features.split_classifier(model)
    return scoring.Cached(head, splits, text=export.is_text_model(model))


def _passes_gate(metrics: dict, config: Config) -> bool:
    """Records the --min_accuracy check in `metrics`; False when the model misses it."""
    if not config.min_accuracy:
        return True
    split, accuracy = selection.gate_accuracy(metrics)
    metrics["min_accuracy"] = {
        "split": split,
        "accuracy": accuracy,
        "bar": config.min_accuracy,
        "score": "mAP" if config.task == "multi_label" else "accuracy",
    }
    return accuracy >= config.min_accuracy


def _check_gate(metrics: dict, config: Config) -> None:
    gate = metrics.get("min_accuracy")
    if gate and gate["accuracy"] < gate["bar"]:
        raise BelowMinAccuracy(
            f"{gate['split']} {gate.get('score', 'accuracy')} {gate['accuracy']:.4f} is below "
            "--min_accuracy="
            f"{gate['bar']}: not exported; the run is kept in {config.model_dir}."
        )


def write_report_page(model_dir: str) -> str | None:
    """report.html from the run dir's files; a failure is logged, never fails a finished run."""
    try:
        return report.write_report(model_dir)
    except Exception as e:  # noqa: BLE001 - the export and metrics are written already
        logging.warning("Could not write %s/report.html: %s", model_dir, e)
        return None


def _fit_verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2


# ----------------------------------------------------------------------------- fit
@dataclasses.dataclass
class Fit:
    """What `fit_phases` leaves: the model as fit left it (with `--ema`, holding the EMA
    weights), one History per phase run in this call, each epoch's seconds, and the epochs
    the last phase had done before this call (a resumed run; 0 otherwise)."""

    model: keras.Model
    histories: list[keras.callbacks.History]
    epoch_seconds: dict[int, float]
    epochs_before: int = 0
    head_solver: dict | None = None  # --head_solver=lbfgs: the solve's facts (this call's)
    # The last phase fit the head on cached features: (cache mode, train and val features).
    features: tuple[str, dict] | None = None

    @property
    def epochs(self) -> int:
        """Epochs the run has done in all (the last phase's end, or where it resumed)."""
        epochs = self.histories[-1].epoch if self.histories else []
        return epochs[-1] + 1 if epochs else self.epochs_before


@dataclasses.dataclass
class _FitContext:
    """What every phase's fit call shares."""

    config: Config
    dataset: data.DataSet
    pipelines: dict
    strategy: tf.distribute.Strategy
    extra_callbacks: tuple
    verbose: int
    guard: faults.SignalGuard | None
    fit_inputs: tuple | None
    timings: Timings
    class_weight: dict | None
    timer: callbacks.EpochTimer
    head_solver: dict | None = None
    label_weights: tuple[list[float], list[float]] | None = None  # multi-label --class_weight
    features: tuple[str, dict] | None = None  # the last phase's, see Fit


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
    timings: Timings | None = None,
) -> Fit:
    """Builds the model and runs the phases of `config`, resuming an unfinished run.

    Args:
      guard: SIGINT/SIGTERM handling (see faults.SignalGuard); None under tune and compare.
      keep_backups: leave the backups for the caller to delete once everything the run owes
        is written (train_and_evaluate: after the export); else deleted when fit ends.
      fit_inputs: train and val inputs and fit's step counts when they are not the
        pipelines' (multi-worker: endless inputs; tf.data service). The feature cache is
        not used then (it is computed in this process).
      timings: where the build, feature pass and fit seconds go.
    """
    plan = phases.plan(config)
    state, epochs_done = _start_or_resume(config)
    timings = timings or Timings()
    ctx = _FitContext(
        config,
        dataset,
        pipelines,
        strategy,
        extra_callbacks,
        verbose,
        guard,
        fit_inputs,
        timings,
        None if config.task == "multi_label" else _class_weight(config, dataset),
        callbacks.EpochTimer(),
        label_weights=_label_weights(config, dataset),
    )
    with timings.stage("build"):
        model = _build_for_phase(ctx, plan[state.phase - 1], resume_after=state.phase - 1)
    histories = []
    # The best val_loss so far, for a phase that starts without a backup of its own (a phase
    # with one reads it from best.json itself): none in a new run.
    best_val_loss = (
        rundir.best_so_far(config.model_dir, config.monitor[0]) if state.phase > 1 else None
    )
    for phase in plan[state.phase - 1 :]:
        if histories:  # the first phase of this call was prepared by build_model
            with strategy.scope():
                model_lib.prepare_phase(model, config, dataset.num_classes, phase, _steps(ctx))
        history, best_val_loss = _fit_phase(ctx, model, phase, best_val_loss)
        histories.append(history)
        if phase is not plan[-1]:
            _end_phase(model, config, phase, best_val_loss)
    if not keep_backups:
        phases.remove_backups(config.model_dir)
    before = epochs_done if state.resumed and state.phase == plan[-1].index else 0
    return Fit(model, histories, ctx.timer.seconds, before, ctx.head_solver, ctx.features)


@dataclasses.dataclass(frozen=True)
class _Start:
    phase: int
    resumed: bool


def _start_or_resume(config: Config) -> tuple[_Start, int]:
    """Where fit starts (phase, resumed?) and the epochs done; prepares the run dir's
    history and checkpoints for it."""
    state, epochs_done = phases.resume_point(config)
    if state is None:  # a new run: nothing of an earlier run in this dir may leak in
        shutil.rmtree(f"{config.model_dir}/{rundir.TOP_CHECKPOINTS}", ignore_errors=True)
    else:
        logging.info(
            "Resuming an unfinished run in phase %d of %d", state.phase, len(phases.plan(config))
        )
    # Rows of epochs this run (re)does go: a fresh run starts history.csv over, like the best
    # checkpoint; a resumed one drops rows written after its backup.
    rundir.truncate_history(config.model_dir, epochs_done)
    return _Start(state.phase if state else 1, state is not None), epochs_done


def _steps(ctx: _FitContext) -> int:
    return phases.steps_per_epoch(ctx.dataset.train.count, ctx.config.batch_size)


def _class_weight(config: Config, dataset: data.DataSet) -> dict | None:
    if config.class_weight != "balanced":
        return None
    return data.balanced_class_weights(data.class_counts(dataset.train, dataset.num_classes))


def _label_weights(config: Config, dataset: data.DataSet):
    """A multi-label run's (positive, negative) weight per label for --class_weight=balanced."""
    if config.task != "multi_label" or config.class_weight != "balanced":
        return None
    return data.balanced_label_weights(dataset.train)


def _build_for_phase(ctx: _FitContext, phase: phases.Phase, resume_after: int) -> keras.Model:
    """The classifier compiled for `phase`; a resumed later phase starts from the weights the
    previous phase ended with (its own backup, if any, then restores later epochs)."""
    config = ctx.config
    with ctx.strategy.scope():
        model = model_lib.build_model(
            config, ctx.dataset.num_classes, phase, _steps(ctx), ctx.label_weights
        )
    if resume_after:
        rundir.load_weights_quietly(model, phases.phase_end_weights(config.model_dir, resume_after))
    return model


def _fit_phase(
    ctx: _FitContext, model: keras.Model, phase: phases.Phase, best_val_loss: float | None
) -> tuple[keras.callbacks.History, float | None]:
    """One phase's fit, on cached features or on pixels; returns its History and the best
    val_loss so far."""
    config = ctx.config
    model._initial_epoch = None  # set by an earlier fit's backup restore; not ours
    feature_dim = model.get_layer("pooler").output.shape[-1]
    mode = feature_fit.cache_mode(config, feature_dim, ctx.dataset.train.count, phase)
    if mode != "none" and ctx.fit_inputs is not None:
        logging.info("--cache=%s is not used with multi_worker / --data_service.", mode)
        mode = "none"
    ctx.features = None
    solver = feature_fit.head_solver(config, phase, mode, feature_dim, ctx.dataset.train.count)
    if solver == "lbfgs":
        logging.info(
            "Phase %s: --head_solver=%s solves the head once by L-BFGS on the cached features "
            "(--epochs, --learning_rate and --batch_size do not apply to it; "
            "--head_solver=fit trains it for the phase's epochs).",
            phase.name,
            config.head_solver,
        )
        return _solve_phase(ctx, model, phase, mode)
    phase_callbacks = callbacks.make_callbacks(
        config,
        phase,
        ctx.verbose,
        guard=ctx.guard,
        on_features=mode != "none",
        best_val_loss=best_val_loss,
    )
    every = [ctx.timer, *phase_callbacks, *ctx.extra_callbacks]
    if mode != "none":
        history, cached = feature_fit.fit_head(
            model,
            config,
            ctx.dataset,
            ctx.strategy,
            mode,
            phase=phase,
            callbacks=every,
            verbose=ctx.verbose,
            class_weight=ctx.class_weight,
            timings=ctx.timings,
            label_weights=ctx.label_weights,
        )
        ctx.features = (mode, cached)
    else:
        with ctx.timings.stage("fit"):
            history = _fit_on_pixels(ctx, model, phase, every)
    best = callbacks.best_checkpoint(phase_callbacks).best
    return history, float(best) if best is not None and np.isfinite(best) else best_val_loss


def _solve_phase(
    ctx: _FitContext, model: keras.Model, phase: phases.Phase, mode: str
) -> tuple[keras.callbacks.History, float]:
    """A head-only phase with --head_solver=lbfgs: one solve on cached features (validation
    refuses every flag that would keep the features from being cached)."""
    if mode == "none":
        raise UserError("--head_solver=lbfgs needs the feature cache; use --head_solver=fit.")
    # The phase's one "epoch" is the solve and its scoring (the "fit" stage), not the feature
    # pass before it: a fit on cached features times its epochs the same way.
    fit_before = ctx.timings.seconds.get("fit", 0.0)
    history, best, ctx.head_solver, cached = feature_fit.solve_head(
        model,
        ctx.config,
        ctx.dataset,
        ctx.strategy,
        mode,
        phase=phase,
        verbose=ctx.verbose,
        timings=ctx.timings,
        label_weights=ctx.label_weights,
    )
    solve_seconds = ctx.timings.seconds.get("fit", 0.0) - fit_before
    ctx.timer.seconds[phase.initial_epoch] = round(solve_seconds, 3)
    ctx.features = (mode, cached)
    return history, best  # the monitored value: val_loss, or val_map for multi-label


def _fit_on_pixels(ctx: _FitContext, model, phase: phases.Phase, every: list):
    train_ds, val_ds, steps = ctx.fit_inputs or (ctx.pipelines["train"], ctx.pipelines["val"], {})
    with warnings.catch_warnings():
        if not steps:
            # Without steps_per_epoch Keras counts an input of unknown length by running it
            # out, and warns "Your input ran out of data; interrupting training" although
            # the epoch ran whole (keras#23360, fixed after Keras 3.15).
            warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
        return model.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=phase.initial_epoch,
            epochs=phase.epochs,
            class_weight=ctx.class_weight,
            callbacks=every,
            verbose=ctx.verbose,
            shuffle=False,  # the pipeline shuffles with the seed; Keras cannot shuffle a Dataset
            **steps,
        )


def _end_phase(
    model: keras.Model, config: Config, phase: phases.Phase, best_val_loss: float | None
) -> None:
    """Order matters for a kill at any point: weights, then the state, then the backup."""
    phases.save_phase_end(model, config.model_dir, phase.index)
    phases.save_state(config.model_dir, phases.State(phase.index + 1, best_val_loss))
    faults.remove_backup(phases.backup_dir(config.model_dir, phase.index))


# ----------------------------------------------------------------------------- helpers
def seed_everything(config: Config) -> None:
    """Seeds Python, NumPy and TF; with --deterministic, op determinism on CPU unless XLA is
    asked for or a fine-tuned hub module has unseeded random ops (can_be_deterministic).

    Keras silently drops `jit_compile=True` while op determinism is on (not every XLA kernel
    is deterministic), so `--jit_compile` turns it off, also after an earlier run in this
    process turned it on.
    """
    # tensorflow.python: TF has a public switch to enable op determinism but none back off.
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


def count_parameters(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of all weights: equal on every worker of a multi-worker run."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(w.tobytes())
    return digest.hexdigest()[:16]
