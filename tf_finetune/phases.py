"""Two-phase fine-tuning: the plan of phases and the resume state on disk.

Phase 1 ("head") trains the new head with the backbone frozen for `--warmup_epochs`; phase 2
("fine_tune") unfreezes per `--unfreeze` and recompiles with `--fine_tune_learning_rate`,
continuing the epoch numbering (`initial_epoch`) so history.csv and TensorBoard run on. Without
`--warmup_epochs` (or with `--unfreeze=0`) a run is one phase ("train").

Resuming: a backup (faults.AtomicBackup) covers one `fit` call, so each phase of a two-phase
run has its own backup folder (`backup/phase<i>`) and `backup/state.json` records which phase
is running (with a copy of the best val_loss so far, for the record: the best checkpoint's
`checkpoints/best.json` is what a resumed phase compares with, see faults.BestCheckpoint).
When a phase finishes, its final weights are saved to `backup/phase<i>_end.weights.h5` before
the state moves on, so a run killed early in the next phase restarts that phase from them.
All of `backup/` is removed when the run finishes (after the export). A one-phase run keeps
faults.py's plain layout (`backup/` or `backup_head/`, no state).
"""

import dataclasses
import json
import math
import os
import shutil

from absl import logging

from tf_finetune import atomic, faults
from tf_finetune.config import Config

BACKUP = "backup"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One `fit` call.

    Attributes:
      index: 1-based.
      name: head | fine_tune | train.
      initial_epoch: passed to fit (0-based, absolute).
      epochs: passed to fit (the absolute end, exclusive).
      learning_rate: the phase's base learning rate.
      unfreeze: 0 (backbone frozen), N layers, a fraction, or None (all).
    """

    index: int
    name: str
    initial_epoch: int
    epochs: int
    learning_rate: float
    unfreeze: int | float | None


def plan(config: Config) -> list[Phase]:
    """The phases `config` asks for."""
    if not config.two_phase:
        return [Phase(1, "train", 0, config.epochs, config.learning_rate, config.unfreeze_layers)]
    return [
        Phase(1, "head", 0, config.warmup_epochs, config.learning_rate, 0),
        Phase(
            2,
            "fine_tune",
            config.warmup_epochs,
            config.epochs,
            config.fine_tune_lr,
            config.unfreeze_layers,
        ),
    ]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(math.ceil(num_examples / batch_size), 1)


# ----------------------------------------------------------------------------- resume state
@dataclasses.dataclass(frozen=True)
class State:
    """What a rerun needs to continue: the running phase and the best val_loss so far."""

    phase: int = 1
    best_val_loss: float | None = None
    # Epoch where the running phase starts (phase 1 may stop early on EarlyStopping).
    initial_epoch: int = 0


def backup_dir(model_dir: str, phase: int | None = None) -> str:
    root = os.path.join(model_dir, BACKUP)
    return root if phase is None else os.path.join(root, f"phase{phase}")


def phase_end_weights(model_dir: str, phase: int) -> str:
    return os.path.join(backup_dir(model_dir), f"phase{phase}_end.weights.h5")


def _state_path(model_dir: str) -> str:
    return os.path.join(backup_dir(model_dir), "state.json")


def load_state(model_dir: str) -> State | None:
    """The state of an unfinished run in `model_dir`, or None (start from scratch)."""
    path = _state_path(model_dir)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    return State(**{k: values[k] for k in ("phase", "best_val_loss", "initial_epoch")})


def save_state(model_dir: str, state: State) -> None:
    """Writes the state atomically (temp file + rename): a kill leaves the old or the new one."""
    path = _state_path(model_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_json(path, dataclasses.asdict(state))


def save_phase_end(model, model_dir: str, phase: int) -> None:
    """The model's weights at the end of `phase`, written atomically (backup/ is made here
    when the phase had no backup of its own: an L-BFGS head phase runs no fit)."""
    os.makedirs(backup_dir(model_dir), exist_ok=True)
    atomic.save_weights(model, phase_end_weights(model_dir, phase))


def finish(model_dir: str) -> None:
    """The run completed: a rerun starts a new run."""
    shutil.rmtree(backup_dir(model_dir), ignore_errors=True)


# ----------------------------------------------------------------------------- backups
# The backup folders of a one-phase run (pixels end to end; the head on cached features).
# A two-phase run's live under backup/ (`backup_dir`).
BACKUPS = ("backup", "backup_head")


def phase_backup(config: Config, phase: Phase, on_features: bool) -> str:
    """The backup folder of `phase`, relative to the run dir.

    A one-phase run keeps the plain layout (`backup`, or `backup_head` for the head on cached
    features); a two-phase run has one folder per phase beside its state.json.
    """
    if len(plan(config)) == 1:
        return BACKUPS[1] if on_features else BACKUPS[0]
    return os.path.relpath(backup_dir(config.model_dir, phase.index), config.model_dir)


def remove_backups(model_dir: str) -> None:
    """Deletes a finished run's backups (each one's metadata first, see faults.remove_backup)."""
    root = backup_dir(model_dir)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if os.path.isdir(os.path.join(root, name)):
                faults.remove_backup(os.path.join(root, name))
    for name in BACKUPS:
        faults.remove_backup(os.path.join(model_dir, name))
    finish(model_dir)


def resume_point(config: Config) -> tuple[State | None, int]:
    """The state of an unfinished run (None: a new run) and the epochs it had completed."""
    phases = plan(config)
    state = load_state(config.model_dir) if len(phases) > 1 else None
    if state is not None and state.phase > len(phases):
        logging.warning("The unfinished run in %s had more phases: starting anew", config.model_dir)
        remove_backups(config.model_dir)
        state = None
    phase = phases[state.phase - 1] if state else phases[0]
    for on_features in (False, True):  # whichever way the phase trains, its backup says
        folder = os.path.join(config.model_dir, phase_backup(config, phase, on_features))
        meta = faults.read_backup(folder)
        if meta is not None:
            return state or State(), meta["epoch"]
    return state, phase.initial_epoch if state else 0
