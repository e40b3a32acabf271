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
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(state), f)
    os.replace(tmp, path)


def save_phase_end(model, model_dir: str, phase: int) -> None:
    """The model's weights at the end of `phase`, written atomically."""
    final = phase_end_weights(model_dir, phase)
    tmp = final.replace(".weights.h5", ".tmp.weights.h5")  # Keras wants the .weights.h5 suffix
    model.save_weights(tmp)
    os.replace(tmp, final)


def finish(model_dir: str) -> None:
    """The run completed: a rerun starts a new run."""
    shutil.rmtree(backup_dir(model_dir), ignore_errors=True)
