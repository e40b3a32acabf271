"""The run directory: the names of the files a run leaves, and reading them back.

Everything that reads or writes a run dir (the trainer, `evaluate`, `export`, `predict`, the
report) takes the names from here, so a file is named once.

    <model_dir>/flags.cfg                      the resolved flags: --flagfile reruns the run
    <model_dir>/metrics.json                   the run's results (written last)
    <model_dir>/history.csv                    one row per epoch (both phases)
    <model_dir>/checkpoints/best.weights.h5    the best epoch on val_loss (+ best.json)
    <model_dir>/checkpoints/final.weights.h5   the exported weights when an EMA/average won
    <model_dir>/checkpoints/top/               the best K epochs (--average_checkpoints)
    <model_dir>/backup*/                       resume points (see phases.py), removed at the end
    <model_dir>/backbone_source/               the copy of a run / .keras / export --backbone
                                               (named in backbone_table, see own_model.py)
"""

import csv
import json
import os
import warnings

from tf_finetune import atomic
from tf_finetune.errors import UserError

FLAGS_FILE = "flags.cfg"
METRICS = "metrics.json"
HISTORY = "history.csv"
THRESHOLDS = "thresholds.json"  # a multi-label run's per-label thresholds, chosen on val
BEST_WEIGHTS = os.path.join("checkpoints", "best.weights.h5")
# The weights that were evaluated and exported, when they are not the best checkpoint's
# (an EMA or an average won on val_loss); `evaluate` and `export` prefer them.
FINAL_WEIGHTS = os.path.join("checkpoints", "final.weights.h5")
# The head's own best checkpoint while it trains on cached features (see feature_fit.py).
HEAD_BEST_WEIGHTS = os.path.join("checkpoints", "head_best.weights.h5")
TOP_CHECKPOINTS = os.path.join("checkpoints", "top")


def state_file(weights_file: str) -> str:
    """best.weights.h5 -> best.json: what faults.BestCheckpoint records about the file."""
    return weights_file.removesuffix(".weights.h5") + ".json"


def write_flagfile(model_dir: str, flagfile: str) -> None:
    os.makedirs(model_dir, exist_ok=True)
    atomic.write_text(os.path.join(model_dir, FLAGS_FILE), flagfile)


def write_metrics(model_dir: str, metrics: dict) -> None:
    atomic.write_json(os.path.join(model_dir, METRICS), metrics)


def read_metrics(model_dir: str) -> dict:
    """metrics.json of a finished run ({} when the run has none yet)."""
    path = os.path.join(model_dir, METRICS)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def trained_weights(model_dir: str) -> str:
    """The weights the run evaluated and exported: final.weights.h5 if an EMA or checkpoint
    average won on val_loss, else the best checkpoint.

    Raises:
      UserError: the run has no checkpoint (never trained, or not a run dir).
    """
    final = os.path.join(model_dir, FINAL_WEIGHTS)
    if os.path.exists(final):
        return final
    best = os.path.join(model_dir, BEST_WEIGHTS)
    if not os.path.exists(best):
        raise UserError(f"no checkpoint at {best}: train first, or point --model_dir at a run.")
    return best


def load_weights_quietly(model, path: str) -> None:
    """`model.load_weights(path)` without Keras' warning about the optimizer state of another
    compile (a checkpoint written during training holds it; evaluation does not need it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


def best_so_far(model_dir: str, monitor: str = "val_loss") -> float | None:
    """The best `monitor` value of the run's best checkpoint (its best.json), if any."""
    path = state_file(os.path.join(model_dir, BEST_WEIGHTS))
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return float(saved["best"]) if saved.get("monitor") == monitor else None


def truncate_history(model_dir: str, epochs_done: int) -> None:
    """Drops history rows of epochs a resumed run will redo (a kill between the row and the
    backup); a new run (`epochs_done` 0) starts the file over."""
    path = os.path.join(model_dir, HISTORY)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept = lines[:1] + [
        ln
        for ln in lines[1:]
        if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) < epochs_done
    ]
    if len(kept) != len(lines):
        atomic.write_text(path, "".join(kept))


def last_epoch(history, model_dir: str) -> dict[str, float]:
    """The last epoch's training loss and accuracy: from fit's History, or from history.csv
    when fit had no epoch left to run (a resumed, finished run)."""
    rows = {k: v for k, v in history.history.items() if v}
    if not rows:
        path = os.path.join(model_dir, HISTORY)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                last = list(csv.DictReader(f))[-1:]
            rows = {k: [float(v)] for row in last for k, v in row.items() if v}
    return {k: float(rows[k][-1]) for k in ("loss", "accuracy") if k in rows}


def read_thresholds(run_dir: str) -> dict[str, float] | None:
    """{label: threshold} of a multi-label run (thresholds.json), or None when it has none."""
    path = os.path.join(run_dir, THRESHOLDS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return {str(k): float(v) for k, v in json.load(f)["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is unreadable ({error}); rerun 'tf-finetune evaluate'.") from None
