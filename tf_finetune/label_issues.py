"""Suspected label errors from cached features (confident learning on out-of-fold predictions).

Every training example gets class probabilities from a linear probe that never saw it (k-fold,
stratified). Per class j, the threshold t_j is the mean probability of j over the examples
labelled j (how confident the probe is, on average, about a correct j). An example labelled i
is suspect when, among the classes whose probability reaches their threshold, the most probable
one is not i (Northcutt et al. 2021, "Confident learning": the off-diagonal of the confident
joint), or, when no class reaches its threshold and p_i is under half of t_i, when the most
probable class is not i.
Suspects are ranked by the margin p_suggested - p_given, or by low p_given.

numpy/scipy only (matplotlib is imported lazily by `plot_label_issues`).
"""

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np

from tf_finetune import atomic, linear_probe

RANKINGS = ("margin", "self_confidence")


@dataclasses.dataclass(frozen=True)
class Suspect:
    """One training example whose given label the out-of-fold probe finds unlikely."""

    index: int  # into the features (and the split's files), in their order
    given: int
    suggested: int
    confidence: float  # out-of-fold probability of the suggested class
    p_given: float  # out-of-fold probability of the given class

    @property
    def margin(self) -> float:
        return self.confidence - self.p_given


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number [n] of each example: every class spread evenly over the folds, seeded."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    offset = 0
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        # Continue the round-robin where the last class stopped, so fold sizes stay even.
        fold[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    return fold


def out_of_fold_probabilities(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    folds: int = 5,
    seed: int = 0,
    l2: float | None = None,
    patience: int | None = 2,
) -> tuple[np.ndarray, float]:
    """Probabilities [n, num_classes] of each example from a probe trained on the other folds.

    Args:
      x: float features [n, d]; y: int labels [n].
      num_classes: columns of the probabilities.
      folds: k of the k-fold split (stratified by label).
      seed: the split's seed: same seed, same result.
      l2: the probe's L2 strength (`linear_probe`'s scale). None: the point of
        `linear_probe.DEFAULT_L2_GRID` with the lowest out-of-fold loss, every fold walking the
        grid in step from strong to weak, warm-started, stopping `patience` points past the
        minimum.

    Returns:
      (probabilities, the l2 used).
    """
    y = np.asarray(y, np.int64)
    if folds < 2 or folds > len(y):
        raise ValueError(f"folds must be in [2, {len(y)}], got {folds}")
    fold = stratified_folds(y, folds, seed)
    grid = [l2] if l2 is not None else list(linear_probe.DEFAULT_L2_GRID)
    paths = [
        linear_probe.regularization_path(x[fold != f], y[fold != f], num_classes, grid)
        for f in range(folds)
    ]
    best_loss, best = np.inf, None
    for i, solutions in enumerate(zip(*paths)):  # one grid point, every fold
        probs = np.empty((len(y), num_classes))
        for f, (kernel, bias, _) in enumerate(solutions):
            held_out = fold == f
            probs[held_out] = np.exp(linear_probe.log_softmax(x[held_out] @ kernel + bias))
        loss = -np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-300)))
        if loss < best_loss:
            best_loss, best = loss, (probs, grid[i], i)
        elif patience is not None and i - best[2] >= patience:
            break
    return best[0], float(best[1])


def confident_suspects(probs: np.ndarray, y: np.ndarray, rank_by: str = "margin") -> list[Suspect]:
    """Confident-learning flags from out-of-fold probabilities, most suspicious first."""
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}")
    y = np.asarray(y, np.int64)
    n, k = probs.shape
    counts = np.bincount(y, minlength=k)
    # A class nobody is labelled with has no threshold: it can't be suggested.
    sums = np.bincount(y, weights=probs[np.arange(n), y], minlength=k)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    confident = np.where(probs >= thresholds, probs, -np.inf)
    suggested = confident.argmax(axis=1)
    flagged = np.isfinite(confident.max(axis=1)) & (suggested != y)
    # No class confident, and the given one at under half its threshold: the most probable
    # class. Strict confident learning leaves such examples out, but a well-regularised probe
    # is soft, its thresholds sit near the top, and a plain flip (p = 0.89 for the true class,
    # 0.05 for the given one) missed a 0.894 threshold. The "half" keeps some borderline
    # misclassifications of weak features out (MobileNetV2-0.35 flowers, 3,021 train images:
    # 331 flags by the strict rule, 874 with any argmax, 696 with this one).
    p_given_all = probs[np.arange(n), y]
    loose = ~np.isfinite(confident.max(axis=1)) & (p_given_all < 0.5 * thresholds[y])
    suggested = np.where(loose, probs.argmax(axis=1), suggested)
    flagged = np.flatnonzero(flagged | (loose & (suggested != y)))
    p_given = probs[flagged, y[flagged]]
    p_suggested = probs[flagged, suggested[flagged]]
    key = p_given if rank_by == "self_confidence" else p_given - p_suggested
    order = flagged[np.lexsort((flagged, key))]  # ascending key, ties by index: deterministic
    return [
        Suspect(
            int(i),
            int(y[i]),
            int(suggested[i]),
            float(probs[i, suggested[i]]),
            float(probs[i, y[i]]),
        )
        for i in order
    ]


def find_label_issues(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    folds: int = 5,
    seed: int = 0,
    l2: float | None = None,
    rank_by: str = "margin",
) -> list[Suspect]:
    """Training examples whose given label is suspect, most suspicious first.

    Args:
      x: float features [n, d] of the training split (cached features of a frozen backbone).
      y: int labels [n] (one-hot [n, num_classes] is accepted too).
      num_classes: number of classes.
      folds, seed, l2: as `out_of_fold_probabilities`.
      rank_by: "margin" (p_suggested - p_given, largest first) or "self_confidence" (p_given,
        smallest first).

    Returns:
      The suspects; `Suspect.index` indexes `x` (and so the split's file list).
    """
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    probs, _ = out_of_fold_probabilities(x, y, num_classes, folds=folds, seed=seed, l2=l2)
    return confident_suspects(probs, y, rank_by)


def _as_text(name) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def write_label_issues_json(
    path: str, suspects: Sequence[Suspect], files: Sequence | None, class_names: Sequence[str]
) -> None:
    """Writes the suspects as JSON: rank, index, file, given/suggested class names, probabilities.

    `files` are the split's file paths (str or bytes) in feature order, or None (TFDS data).
    """
    rows = [
        {
            "rank": rank,
            "index": s.index,
            "file": _as_text(files[s.index]) if files is not None else None,
            "given": class_names[s.given],
            "suggested": class_names[s.suggested],
            "confidence": round(s.confidence, 4),
            "p_given": round(s.p_given, 4),
        }
        for rank, s in enumerate(suspects, 1)
    ]
    with open(path, "w") as f:
        json.dump({"count": len(rows), "suspects": rows}, f, indent=1)


def _displayable(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    # 0-255 floats (the data pipeline's pixels) or 0-1 floats: both shown as they are.
    return np.clip(image / 255.0 if image.max(initial=0.0) > 1.0 else image, 0.0, 1.0)


def plot_label_issues(
    suspects: Sequence[Suspect],
    image_loader: Callable[[int], np.ndarray],
    class_names: Sequence[str],
    path: str,
    top: int = 16,
) -> str:
    """Writes a PNG grid of the top suspects: image, given label, suggested label, confidence.

    Args:
      suspects: as `find_label_issues` returns them (most suspicious first).
      image_loader: example index -> image [h, w, 3] (uint8, or floats in 0-255 or 0-1).
      class_names: names of the label ids.
      path: the PNG to write (e.g. `<model_dir>/label_issues.png`).
      top: how many suspects to show.

    Returns:
      `path`.
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = list(suspects[:top])
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    figure = Figure(figsize=(3.0 * cols, 3.4 * rows), dpi=80)
    FigureCanvasAgg(figure)
    if not shown:
        figure.text(0.5, 0.5, "no suspected label errors", ha="center", va="center")
    for i, s in enumerate(shown):
        ax = figure.add_subplot(rows, cols, i + 1)
        ax.imshow(_displayable(image_loader(s.index)))
        ax.set_axis_off()
        ax.set_title(
            f"#{s.index} given: {class_names[s.given]}\n"
            f"suggested: {class_names[s.suggested]} ({s.confidence:.2f})",
            fontsize=9,
        )
    figure.tight_layout()
    return atomic.save_figure(figure, path, dpi=figure.dpi)
