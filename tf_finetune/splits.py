"""Which split a carved example lands in, and which split an evaluation reports on.

No TensorFlow here: `validation.validate` uses these checks before anything heavy is imported.

A plain class folder or a single CSV/TSV has no splits of its own; each file (or row) gets a
stable position in [0, 100) from a hash of its path (or text), and the position alone picks its
split: validation below `validation_percent`, test at or above `100 - test_percent`, training
in between. Adding files never moves old ones, a file's split does not depend on which other
files exist, and the validation split does not change when a test split is added (nor the test
split when --validation_percent changes).
"""

import os

from tf_finetune.errors import UserError

SPLITS = ("train", "val", "test")


def split_of(position: float, validation_percent: float, test_percent: float = 0) -> str:
    """'train', 'val' or 'test' for an example at hash `position` in [0, 100)."""
    if test_percent > 0 and position >= 100 - test_percent:
        return "test"
    if position < validation_percent:
        return "val"
    return "train"


def own_splits(source: str) -> str | None:
    """What gives `source` splits of its own (so nothing is carved for test), else None."""
    if not source:
        return "the offline default has its own train/val/test split"
    if source.startswith("tfds:"):
        return "a TFDS data set keeps its own splits: pick one with --test_split"
    if os.path.isdir(os.path.join(source, "train")):
        return "the folder has its own train/ (val/ test/) subfolders: put held-out images in test/"
    if any(os.path.isfile(os.path.join(source, "train" + ext)) for ext in (".csv", ".tsv")):
        return "the folder has its own train/val/test files: put held-out rows in test.csv"
    return None


def check_test_percent(source: str, validation_percent: int, test_percent: int) -> None:
    """UserError (one line) unless `test_percent` is in range and `source` can be carved."""
    if test_percent < 0:
        raise UserError(f"--test_percent must be >= 0 (0: no test split), got {test_percent}.")
    if validation_percent + test_percent >= 100:
        raise UserError(
            f"--validation_percent={validation_percent} + --test_percent={test_percent} must be "
            "below 100: both are shares of all files and the rest trains (70/15/15 is "
            "--validation_percent=15 --test_percent=15)."
        )
    why = own_splits(source) if test_percent else None
    if why:
        raise UserError(
            f"--test_percent carves a test split from a plain class folder or a single CSV/TSV; "
            f"--data={source or '(offline default)'}: {why}."
        )


def choose_eval_split(requested: str, has_test: bool) -> tuple[str, str | None]:
    """(split to report on, a one-line note or None) for --split=auto|val|test.

    auto: test when the data has one, else val with a note that val is optimistic.
    Raises UserError when test is asked for and the data has none.
    """
    if requested not in ("auto", "val", "test"):
        raise UserError(f"--split={requested}: must be one of auto, val, test.")
    if requested == "test" and not has_test:
        raise UserError(
            "the data has no test split: retrain with --test_percent=15 (a plain folder or "
            "CSV; --test_split for TFDS) to hold one out, or use --split=val."
        )
    if requested == "test" or (requested == "auto" and has_test):
        return "test", None
    optimistic = "Reporting on the validation split: it chose the best checkpoint, so its "
    if has_test:  # asked for val although there is a test split
        return "val", optimistic + "numbers are optimistic; --split=test scores the untouched one."
    return "val", (
        optimistic + "numbers are optimistic; retrain with --test_percent (e.g. 15) for an "
        "untouched test split."
    )
