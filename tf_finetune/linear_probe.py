"""The linear-probe protocol for a softmax (or multi-label sigmoid) head on frozen features.

Multinomial logistic regression with L2 on the kernel (not the bias), solved to optimum by
full-batch L-BFGS, the L2 strength chosen by validation loss from a log-spaced grid walked from
strong to weak regularisation, each solve warm-started from the previous one (CLIP's protocol,
Kornblith et al. 2019). Unlike scikit-learn's `LogisticRegression` it takes soft targets (label
smoothing) and per-example weights (class weights) in one objective.

The objective for L2 strength `l2` (the "lambda" of this module) is

    sum_i w_i * CE(t_i, softmax(x_i K + b)) / sum_i w_i  +  l2 / 2 * ||K||^2

with t_i the (optionally smoothed) one-hot target and w_i the example's weight (1 by default).
The data term is a weighted *mean*, so `l2` does not scale with the data set size, weights that
are all equal change nothing, and integer weights equal duplicating examples. It is
scikit-learn's objective divided by `C * sum_i w_i`: `l2 = 1 / (C * n)` for n unweighted examples.

Features are centred (exact: the bias absorbs the shift and is not penalised) and each feature
is rescaled per grid point so the Hessian's diagonal is ~1 (a change of variables: the optimum is
that of the raw problem; it cuts L-BFGS iterations ~7x on features of uneven scale).
`standardize=True` penalises the kernel of standardised features instead of the raw kernel (a
scale-invariant regulariser). Either way the result is the kernel and bias of a plain Dense layer
on the raw features.

The grid is the L2 strength `l2` above, 10 .. 1e-6 by decades (`DEFAULT_L2_GRID`); walking it
stops once the val loss has risen `patience` points in a row past its minimum.

Multi-label (`multi_label=True`: one independent sigmoid per label, multi-hot targets [n, k]) is
the same problem with another link: the data term is Keras's `binary_crossentropy` (the mean
over the k labels of each label's binary cross-entropy; label smoothing t * (1 - s) + s / 2),
averaged over examples as above:

    sum_i w_i * mean_j BCE(t_ij, sigmoid(x_i K_j + b_j)) / sum_i w_i  +  l2 / 2 * ||K||^2

so its val loss is the `val_loss` Keras logs for the compiled head. Per label this is
scikit-learn's binary `LogisticRegression` with `C = 1 / (l2 * n * k)` (the mean over labels
divides each label's data term by k). `label_weights` (`--class_weight=balanced`: per label,
n / (2 * positives) on its positives' terms and n / (2 * negatives) on its negatives') weigh
each label's two terms as `model.WeightedBinaryCrossentropy` does, in training and in the val
loss that picks l2 (the loss a fit of that run compiles and logs as val_loss). Its
`val_accuracy` is Keras's `BinaryAccuracy`: the share of (example, label) pairs whose
probability is on the right side of 0.5 (per-label accuracy, not exact match).

No TensorFlow here: numpy and scipy only (keras is imported lazily by `assign_to_dense`, and
scipy by the solve: ~0.2 s that a run with `--head_solver=fit` does not pay).
"""

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np

# Strong to weak: 10 .. 1e-6, one point per decade. For ~3,000 examples this spans scikit-learn's
# C from ~3e-5 to ~300, which brackets the optimum of every feature set we have tried.
DEFAULT_L2_GRID = tuple(10.0**-k for k in range(-1, 7))


@dataclasses.dataclass
class Solution:
    """A solved head: Dense weights on the raw features, and how the L2 strength was chosen."""

    kernel: np.ndarray  # float32 [d, num_classes]
    bias: np.ndarray  # float32 [num_classes]
    l2: float  # the chosen L2 strength (see the module docstring for its scale)
    val_loss: float  # mean cross-entropy on validation (unsmoothed), at the chosen l2
    val_accuracy: float  # multi-label: per (example, label) pair, as Keras's BinaryAccuracy
    grid: np.ndarray  # the l2 values tried, strong to weak
    grid_val_losses: np.ndarray  # val loss at each grid point (NaN where not solved)
    grid_val_accuracies: np.ndarray
    iterations: int  # L-BFGS iterations over the whole grid
    seconds: float  # wall time of the whole solve
    multi_label: bool = False  # one sigmoid per label, not a softmax over classes

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of the head for raw features `x` [n, d] (float64)."""
        return np.asarray(x, np.float64) @ self.kernel.astype(np.float64) + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [n, num_classes] for raw features `x` [n, d]: the softmax over the
        classes, or (multi-label) each label's sigmoid."""
        logits = self.logits(x)
        return np.exp(log_sigmoid(logits) if self.multi_label else log_softmax(logits))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits [n, k], exact for any magnitude."""
    # Subtracting the row max keeps exp() from overflowing; the result is exact.
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """Element-wise log(sigmoid(z)), exact for any magnitude."""
    return -np.logaddexp(0.0, -z)


def targets(
    y: np.ndarray, num_classes: int, label_smoothing: float = 0.0, dtype=np.float64
) -> np.ndarray:
    """One-hot targets [n, num_classes], smoothed as Keras does: t * (1 - s) + s / num_classes."""
    t = np.zeros((len(y), num_classes), dtype)
    t[np.arange(len(y)), y] = 1.0
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / num_classes
    return t


def _as_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2:  # one-hot, as features.Features stores them
        y = y.argmax(axis=1)
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    return y


class _Softmax:
    """One label per example: a softmax over the classes, categorical cross-entropy."""

    # The data term's Hessian diagonal for a feature of unit scale is ~ this / k (p(1 - p)
    # summed over the classes' logits, p ~ 1/k).
    curvature = 1.0

    def labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        return _as_labels(y, num_classes)

    def targets(self, labels: np.ndarray, num_classes: int, label_smoothing: float) -> np.ndarray:
        return targets(labels, num_classes, label_smoothing)

    def losses(self, logits: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each example's loss [n] and its gradient with respect to the logits [n, k]."""
        log_p = log_softmax(logits)
        # d(CE)/d(logits) = p * sum(t) - t; sum(t) = 1 for every target used here.
        return -np.sum(t * log_p, axis=1), np.exp(log_p) - t

    def correct(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return (logits.argmax(axis=1) == labels).astype(np.float64)

    def initial_bias(self, mean_target: np.ndarray) -> np.ndarray:
        """The bias of the infinitely regularised problem: log class priors."""
        log_prior = np.log(np.clip(mean_target, 1e-12, None))
        return log_prior - log_prior.mean()

    def final_bias(self, bias: np.ndarray) -> np.ndarray:
        return bias - bias.mean()  # softmax ignores a shared shift


class _Sigmoid:
    """Multi-label: one sigmoid per label, Keras's binary cross-entropy (the mean over labels),
    each label's positive and negative terms weighted by `positive` / `negative` [k]."""

    curvature = 0.25  # p(1 - p) <= 1/4 per label, the mean over labels dividing it by k

    def __init__(self, positive: np.ndarray, negative: np.ndarray):
        self.positive, self.negative = positive, negative

    def labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        y = np.asarray(y, np.float64)
        if y.ndim != 2 or y.shape[1] != num_classes or (y.size and (y.min() < 0 or y.max() > 1)):
            raise ValueError(
                f"multi-label targets must be [n, {num_classes}] in [0, 1], got {y.shape}"
            )
        return y

    def targets(self, labels: np.ndarray, num_classes: int, label_smoothing: float) -> np.ndarray:
        return labels * (1.0 - label_smoothing) + 0.5 * label_smoothing

    def losses(self, logits: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each example's loss [n] and its gradient with respect to the logits [n, k]."""
        log_p, log_q = log_sigmoid(logits), log_sigmoid(-logits)  # log p, log(1 - p)
        pos, neg = self.positive * t, self.negative * (1.0 - t)
        k = logits.shape[1]
        return -(pos * log_p + neg * log_q).mean(axis=1), (
            neg * np.exp(log_p) - pos * np.exp(log_q)
        ) / k

    def correct(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        # Keras's BinaryAccuracy: p > 0.5, i.e. logit > 0, per (example, label) pair.
        return ((logits > 0) == (labels > 0.5)).mean(axis=1)

    def initial_bias(self, mean_target: np.ndarray) -> np.ndarray:
        """Each label's optimal bias with a zero kernel: p = a m / (a m + b (1 - m))."""
        positive = np.clip(self.positive * mean_target, 1e-12, None)
        negative = np.clip(self.negative * (1.0 - mean_target), 1e-12, None)
        return np.log(positive) - np.log(negative)

    def final_bias(self, bias: np.ndarray) -> np.ndarray:
        return bias


def _link(multi_label: bool, label_weights, num_classes: int) -> "_Softmax | _Sigmoid":
    if not multi_label:
        if label_weights is not None:
            raise ValueError("label_weights are for multi_label heads")
        return _Softmax()
    positive, negative = label_weights or (np.ones(num_classes), np.ones(num_classes))
    positive, negative = (np.asarray(v, np.float64) for v in (positive, negative))
    if positive.shape != (num_classes,) or negative.shape != (num_classes,):
        raise ValueError(f"label_weights must be two [{num_classes}] vectors")
    return _Sigmoid(positive, negative)


class _Problem:
    """The objective and its gradient on prepared (centred, scaled) features.

    Parameters are one flat float64 vector: the kernel [d, k] row-major, then the bias [k].
    """

    def __init__(
        self,
        z: np.ndarray,
        t: np.ndarray,
        w: np.ndarray,
        penalty: np.ndarray,
        link: "_Softmax | _Sigmoid | None" = None,
    ):
        self.z, self.t, self.penalty = z, t, penalty  # penalty: per-feature factor [d]
        self.w = (w / w.sum())[:, None]  # normalised once: the data term is a weighted mean
        self.link = link or _Softmax()
        self.d, self.k = z.shape[1], t.shape[1]
        self.l2 = 0.0

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[: self.d * self.k].reshape(self.d, self.k), theta[self.d * self.k :]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        kernel, bias = self.split(theta)
        # The two big products run in the features' dtype (float32 BLAS is ~2x float64); the
        # link and the sums over examples are float64, so the objective stays accurate.
        logits = (self.z @ kernel.astype(self.z.dtype)).astype(np.float64) + bias
        losses, g_logits = self.link.losses(logits, self.t)
        data = float(np.sum(self.w[:, 0] * losses))
        g_logits = self.w * g_logits
        weighted = self.penalty[:, None] * kernel
        g_kernel = (self.z.T @ g_logits.astype(self.z.dtype)).astype(np.float64)
        g_kernel += self.l2 * weighted
        value = data + 0.5 * self.l2 * float(np.sum(weighted * kernel))
        return value, np.concatenate([g_kernel.ravel(), g_logits.sum(axis=0)])


@dataclasses.dataclass(frozen=True)
class _Scaling:
    mean: np.ndarray  # [d] float64
    scale: np.ndarray  # [d] float64, 1 where a feature is constant

    @classmethod
    def of(cls, x: np.ndarray) -> "_Scaling":
        mean = x.mean(axis=0, dtype=np.float64)
        scale = x.std(axis=0, dtype=np.float64)
        return cls(mean, np.where(scale > 1e-12 * max(1.0, scale.max(initial=0.0)), scale, 1.0))


def _initial(problem: _Problem, t: np.ndarray) -> np.ndarray:
    # Zero kernel, the bias of the priors: the optimum of the infinitely regularised problem.
    bias = problem.link.initial_bias((problem.w * t).sum(axis=0))
    return np.concatenate([np.zeros(problem.d * problem.k), bias])


def _minimize(problem: _Problem, theta0: np.ndarray, tol: float, max_iter: int):
    from scipy import optimize

    result = optimize.minimize(
        problem,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "ftol": tol, "gtol": tol * 1e-1, "maxcor": 20},
    )
    return result.x, int(result.nit)


def _blas_threads(count: int | None):
    """Limits BLAS threads for the solve (a no-op without threadpoolctl or with None).

    The products here are thin ([n, d] x [d, k], k small): memory-bound, so a second thread buys
    little, while OpenBLAS's spin-waiting threads are ~9x slower when the cores are shared
    (measured on 2 busy cores: 5 ms vs 15 ms per product, 13 ms vs 1 ms per L-BFGS step).
    """
    try:
        import threadpoolctl  # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    if count is None:
        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(count, user_api="blas")


def _val_scores(link, logits: np.ndarray, labels: np.ndarray, w: np.ndarray | None):
    """(loss, accuracy) on validation: the unsmoothed loss, weighted by `w` if given."""
    losses, _ = link.losses(logits, link.targets(labels, logits.shape[1], 0.0))
    correct = link.correct(logits, labels)
    return float(np.average(losses, weights=w)), float(np.average(correct, weights=w))


def solve_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    *,
    label_smoothing: float = 0.0,
    sample_weight: np.ndarray | None = None,
    val_sample_weight: np.ndarray | None = None,
    multi_label: bool = False,
    label_weights: tuple[Sequence[float], Sequence[float]] | None = None,
    l2_grid: Sequence[float] | None = None,
    patience: int | None = 2,
    standardize: bool = False,
    tol: float = 1e-6,
    max_iter: int = 500,
    dtype=np.float32,
    blas_threads: int | None = 1,
) -> Solution:
    """Solves the head for every L2 strength of a grid, keeps the best on validation.

    Args:
      train_x: float features [n, d] (raw: not standardised; memory-mapped arrays are fine).
      train_y: int labels [n] (one-hot [n, num_classes] is accepted too); multi-label: multi-hot
        targets [n, num_classes].
      val_x, val_y: the same for the validation split that picks the L2 strength. With no
        validation examples (`len(val_y) == 0`) the grid must have one point.
      num_classes: columns of the head (2 for binary: a two-column softmax, kernel[:, 0] ==
        -kernel[:, 1] at the optimum).
      label_smoothing: as Keras's `label_smoothing` of categorical (multi-label: binary)
        cross-entropy, training only; the validation loss is always the plain cross-entropy of
        the given labels.
      sample_weight: per-example weights [n] (for balanced class weights: the weight of each
        example's class). The data term is their weighted mean.
      val_sample_weight: optional weights of the validation loss and accuracy.
      multi_label: one sigmoid per label (binary cross-entropy averaged over the labels, as
        Keras's `binary_crossentropy`) instead of a softmax over the classes.
      label_weights: multi-label only: (positive [k], negative [k]) weights of each label's
        two terms, in training and in the validation loss (`model.WeightedBinaryCrossentropy`,
        what `--class_weight=balanced` compiles); None weighs them 1.
      l2_grid: L2 strengths to try (any order; walked strong to weak); `DEFAULT_L2_GRID` if None.
      patience: stop walking the grid after this many points in a row whose val loss is above
        the best so far (the curve is U-shaped; its weakly regularised end is the costly part,
        ~3/4 of the iterations on real features). None walks the whole grid. Skipped points
        have NaN val losses.
      standardize: penalise the kernel of standardised features instead of the raw kernel.
      tol: L-BFGS relative tolerance on the objective (the gradient tolerance is tol / 10).
      max_iter: L-BFGS iterations per grid point.
      dtype: dtype of the two large matrix products (float32 is ~2x faster and accurate to
        ~1e-6 in the loss; float64 for reference solutions).
      blas_threads: BLAS threads during the solve (None: leave as is); see `_blas_threads`.

    Returns:
      The `Solution` at the L2 strength with the lowest validation loss (ties: the stronger).
    """
    start = time.perf_counter()
    link = _link(multi_label, label_weights, num_classes)
    val_y = link.labels(val_y, num_classes)
    grid = np.array(sorted(l2_grid or DEFAULT_L2_GRID, reverse=True), np.float64)
    if len(val_y) == 0 and len(grid) > 1:
        raise ValueError("choosing the L2 strength needs validation examples")
    val_x = np.asarray(val_x, np.float64)
    path = regularization_path(
        train_x,
        train_y,
        num_classes,
        grid,
        label_smoothing=label_smoothing,
        sample_weight=sample_weight,
        multi_label=multi_label,
        label_weights=label_weights,
        standardize=standardize,
        tol=tol,
        max_iter=max_iter,
        dtype=dtype,
        blas_threads=blas_threads,
    )
    score = lambda logits: _val_scores(link, logits, val_y, val_sample_weight)  # noqa: E731
    best, losses, accuracies, iterations = _walk_grid(path, len(grid), val_x, score, patience)
    index, kernel, bias = best
    return Solution(
        kernel=kernel.astype(np.float32),
        bias=link.final_bias(bias).astype(np.float32),
        l2=float(grid[index]),
        val_loss=float(losses[index]),
        val_accuracy=float(accuracies[index]),
        grid=grid,
        grid_val_losses=losses,
        grid_val_accuracies=accuracies,
        iterations=iterations,
        seconds=time.perf_counter() - start,
        multi_label=multi_label,
    )


def _walk_grid(path, size: int, val_x, score, patience: int | None):
    """Scores each solution of the path on validation (`score`: logits -> (loss, accuracy)),
    stopping `patience` points past the minimum; returns (best index, kernel, bias), the val
    losses and accuracies, iterations."""
    losses, accuracies = np.full(size, np.nan), np.full(size, np.nan)
    best, iterations = None, 0
    for i, (kernel, bias, nit) in enumerate(path):
        iterations += nit
        if len(val_x):
            losses[i], accuracies[i] = score(val_x @ kernel + bias)
        if best is None or losses[i] < losses[best[0]]:
            best = (i, kernel, bias)
        elif patience is not None and i - best[0] >= patience:
            break
    return best, losses, accuracies, iterations


def regularization_path(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    grid: Sequence[float],
    *,
    label_smoothing: float = 0.0,
    sample_weight: np.ndarray | None = None,
    multi_label: bool = False,
    label_weights: tuple[Sequence[float], Sequence[float]] | None = None,
    standardize: bool = False,
    tol: float = 1e-6,
    max_iter: int = 500,
    dtype=np.float32,
    blas_threads: int | None = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yields (kernel [d, k], bias [k], iterations) on raw features for each L2 of `grid`.

    The grid is walked in the given order, each solve starting from the previous optimum (give it
    strong to weak: the path is smooth that way, and the strongly regularised solves are cheap).
    Arguments as `solve_head`; the arrays are float64.
    """
    link = _link(multi_label, label_weights, num_classes)
    y = link.labels(y, num_classes)
    x = np.asarray(x)
    scaling = _Scaling.of(x)
    t = link.targets(y, num_classes, label_smoothing)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if w.shape != (len(y),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("sample_weight must be [n], non-negative, not all zero")
    # The penalty per feature on the raw kernel: 1, or scale^2 for the standardised kernel.
    q = scaling.scale**2 if standardize else np.ones(x.shape[1])
    centred = x - scaling.mean.astype(x.dtype)
    kernel = np.zeros((x.shape[1], num_classes))  # raw coordinates, on centred features
    bias = None
    for l2 in grid:
        # Variables rescaled so the Hessian's diagonal is ~1 for every feature at this l2:
        # data curvature ~ scale^2 / k, penalty curvature l2 * q. Without it, features of very
        # different scale (ReLU features: dead to large) cost ~25x the iterations.
        c = 1.0 / np.sqrt(link.curvature * scaling.scale**2 / num_classes + l2 * q)
        z = (centred * c.astype(x.dtype)).astype(dtype)
        problem = _Problem(z, t, w, q * c**2, link)
        problem.l2 = float(l2)
        theta0 = _initial(problem, t)
        if bias is not None:  # warm start: the previous optimum in this l2's coordinates
            theta0 = np.concatenate([(kernel / c[:, None]).ravel(), bias])
        with _blas_threads(blas_threads):
            theta, nit = _minimize(problem, theta0, tol, max_iter)
        kernel_z, bias = problem.split(theta)
        kernel = kernel_z * c[:, None]
        yield kernel, bias - scaling.mean @ kernel, nit


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, **kwargs) -> Solution:
    """Solves the head at one fixed L2 strength (no validation); kwargs as `solve_head`."""
    empty = np.zeros((0, np.shape(x)[1]), np.float32)
    no_labels = np.zeros((0, num_classes), np.float32)
    return solve_head(x, y, empty, no_labels, num_classes, l2_grid=[l2], **kwargs)


def balanced_sample_weight(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-example weights of `--class_weight=balanced`: n / (num_classes * count of its class)."""
    y = _as_labels(y, num_classes)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    per_class = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return per_class[y]


def assign_to_dense(layer, solution: Solution) -> None:
    """Writes a solution into a built Keras Dense layer (its kernel [d, k] and bias [k]).

    Raises:
      ValueError: the layer has no bias or its shapes differ from the solution's.
    """
    import keras  # lazily: this module must not pull TensorFlow in at import time

    if not getattr(layer, "use_bias", False) or layer.bias is None:
        raise ValueError(f"layer {layer.name!r} has no bias")
    if tuple(layer.kernel.shape) != solution.kernel.shape:
        raise ValueError(
            f"layer {layer.name!r} kernel is {tuple(layer.kernel.shape)}, "
            f"the solution's is {solution.kernel.shape}"
        )
    dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    layer.kernel.assign(solution.kernel.astype(dtype))
    layer.bias.assign(solution.bias.astype(dtype))
