"""The callbacks of a `fit` call: stops (NaN, signals), history, best checkpoint, backup,
TensorBoard, and the optional stoppers and averaging keeper."""

import os
import time

import keras
import numpy as np

from tf_finetune import averaging, faults, phases, rundir
from tf_finetune import multiworker as mw
from tf_finetune.config import Config


class SaveRunState(keras.callbacks.Callback):
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


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch (training and validation), by epoch number."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[int, float] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds[epoch] = round(time.perf_counter() - self._start, 2)


def make_callbacks(
    config: Config,
    phase: phases.Phase,
    verbose: int,
    *,
    guard: faults.SignalGuard | None = None,
    on_features: bool = False,
    best_val_loss: float | None = None,
) -> list[keras.callbacks.Callback]:
    """NaN and signal stops, CSV history, best checkpoint, backup, TensorBoard, stoppers.

    The order matters at each epoch end: history row, then best checkpoint, then the run
    state (two-phase runs), then the backup that marks the epoch done. A kill in between
    reruns the epoch, which only repeats a row (`rundir.truncate_history` drops it) and never
    loses a better checkpoint.

    Args:
      config: the run.
      phase: the fit call these are for.
      verbose: fit's verbosity (the stoppers log at it).
      guard: turns SIGINT/SIGTERM into a backup and a clean stop (None: signals are not
        handled, e.g. under tune and compare).
      on_features: the head trains on cached features (its own checkpoint and backup).
      best_val_loss: the best so far in this run when this fit starts without a backup of
        its own (phase 2 after phase 1): only a better epoch replaces the best checkpoint.
        With a backup, the checkpoint's best.json carries the best (faults.BestCheckpoint).
    """
    run = config.model_dir
    plan = phases.plan(config)
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    # Saved every epoch (and on SIGINT/SIGTERM); a rerun of the same command resumes from it.
    # Deleted at the end of the run (after the export), not of the phase.
    backup = faults.AtomicBackup(os.path.join(run, phases.phase_backup(config, phase, on_features)))
    best_file = rundir.HEAD_BEST_WEIGHTS if on_features else rundir.BEST_WEIGHTS
    monitor, mode = config.monitor
    best = faults.BestCheckpoint(
        os.path.join(run, best_file),
        backup,
        monitor=monitor,
        initial_value_threshold=best_val_loss,
        mode=mode,
    )
    callbacks = [
        faults.StopOnNaN(best),
        faults.StopOnSignal(guard or faults.SignalGuard(run), backup),
        keras.callbacks.CSVLogger(os.path.join(run, rundir.HISTORY), append=True),
        best,
        *([SaveRunState(run, phase.index, best)] if len(plan) > 1 else []),
        backup,
        *([mw.resume_epoch_check()] if config.strategy == "multi_worker" else []),
        keras.callbacks.TensorBoard(os.path.join(run, "logs")),
    ]
    return callbacks + _optional_callbacks(config, verbose, last_phase=phase is plan[-1])


def _optional_callbacks(config: Config, verbose: int, last_phase: bool) -> list:
    """Checkpoint averaging's keeper, EarlyStopping (last phase only: the head warmup always
    runs out) and ReduceLROnPlateau, as the flags ask."""
    callbacks = []
    monitor, mode = config.monitor
    if config.average_checkpoints:
        callbacks.append(
            averaging.KeepBestCheckpoints(
                os.path.join(config.model_dir, rundir.TOP_CHECKPOINTS),
                config.average_checkpoints,
                monitor,
                mode,
            )
        )
    if config.early_stopping_patience and last_phase:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, mode=mode, patience=config.early_stopping_patience, verbose=verbose
            )
        )
    if config.reduce_lr_patience:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor,
                mode=mode,
                factor=0.1,
                patience=config.reduce_lr_patience,
                verbose=verbose,
            )
        )
    return callbacks


def best_checkpoint(callbacks: list[keras.callbacks.Callback]) -> faults.BestCheckpoint:
    return next(c for c in callbacks if isinstance(c, faults.BestCheckpoint))
