"""The linear-probe protocol for a softmax head on frozen features.

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
    val_accuracy: float
    grid: np.ndarray  # the l2 values tried, strong to weak
    grid_val_losses: np.ndarray  # val loss at each grid point (NaN where not solved)
    grid_val_accuracies: np.ndarray
    iterations: int  # L-BFGS iterations over the whole grid
    seconds: float  # wall time of the whole solve

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of the head for raw features `x` [n, d] (float64)."""
        return np.asarray(x, np.float64) @ self.kernel.astype(np.float64) + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities [n, num_classes] for raw features `x` [n, d]."""
        return np.exp(log_softmax(self.logits(x)))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits [n, k], exact for any magnitude."""
    # Subtracting the row max keeps exp() from overflowing; the result is exact.
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


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


class _Problem:
    """The objective and its gradient on prepared (centred, scaled) features.

    Parameters are one flat float64 vector: the kernel [d, k] row-major, then the bias [k].
    """

    def __init__(self, z: np.ndarray, t: np.ndarray, w: np.ndarray, penalty: np.ndarray):
        self.z, self.t, self.penalty = z, t, penalty  # penalty: per-feature factor [d]
        self.w = (w / w.sum())[:, None]  # normalised once: the data term is a weighted mean
        self.d, self.k = z.shape[1], t.shape[1]
        self.l2 = 0.0

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[: self.d * self.k].reshape(self.d, self.k), theta[self.d * self.k :]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        kernel, bias = self.split(theta)
        # The two big products run in the features' dtype (float32 BLAS is ~2x float64); the
        # softmax and the sums over examples are float64, so the objective stays accurate.
        logits = (self.z @ kernel.astype(self.z.dtype)).astype(np.float64) + bias
        log_p = log_softmax(logits)
        data = -float(np.sum(self.w * self.t * log_p))
        # d(CE)/d(logits) = p * sum(t) - t; sum(t) = 1 for every target used here.
        g_logits = self.w * (np.exp(log_p) - self.t)
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
    # Zero kernel, bias = log class priors: the optimum of the infinitely regularised problem.
    prior = np.clip((problem.w * t).sum(axis=0), 1e-12, None)
    return np.concatenate([np.zeros(problem.d * problem.k), np.log(prior) - np.log(prior).mean()])


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


def _val_scores(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
    nll = -log_softmax(logits)[np.arange(len(y)), y]
    correct = (logits.argmax(axis=1) == y).astype(np.float64)
    return float(np.average(nll, weights=w)), float(np.average(correct, weights=w))


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
    l2_grid: Sequence[float] | None = None,
    patience: int | None = 2,
    standardize: bool = False,
    tol: float = 1e-6,
    max_iter: int = 500,
    dtype=np.float32,
    blas_threads: int | None = 1,
) -> Solution:
    """Solves the softmax head for every L2 strength of a grid, keeps the best on validation.

    Args:
      train_x: float features [n, d] (raw: not standardised; memory-mapped arrays are fine).
      train_y: int labels [n] (one-hot [n, num_classes] is accepted too).
      val_x, val_y: the same for the validation split that picks the L2 strength. With no
        validation examples (`len(val_y) == 0`) the grid must have one point.
      num_classes: columns of the head (2 for binary: a two-column softmax, kernel[:, 0] ==
        -kernel[:, 1] at the optimum).
      label_smoothing: as Keras's `label_smoothing` of categorical cross-entropy, training only;
        the validation loss is always the plain cross-entropy of the given labels.
      sample_weight: per-example weights [n] (for balanced class weights: the weight of each
        example's class). The data term is their weighted mean.
      val_sample_weight: optional weights of the validation loss and accuracy.
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
    val_y = _as_labels(val_y, num_classes)
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
        standardize=standardize,
        tol=tol,
        max_iter=max_iter,
        dtype=dtype,
        blas_threads=blas_threads,
    )
    best, losses, accuracies, iterations = _walk_grid(
        path, len(grid), val_x, val_y, val_sample_weight, patience
    )
    index, kernel, bias = best
    return Solution(
        kernel=kernel.astype(np.float32),
        bias=(bias - bias.mean()).astype(np.float32),  # softmax ignores a shared shift
        l2=float(grid[index]),
        val_loss=float(losses[index]),
        val_accuracy=float(accuracies[index]),
        grid=grid,
        grid_val_losses=losses,
        grid_val_accuracies=accuracies,
        iterations=iterations,
        seconds=time.perf_counter() - start,
    )


def _walk_grid(path, size: int, val_x, val_y, val_sample_weight, patience: int | None):
    """Scores each solution of the path on validation, stopping `patience` points past the
    minimum; returns (best index, kernel, bias), the val losses and accuracies, iterations."""
    losses, accuracies = np.full(size, np.nan), np.full(size, np.nan)
    best, iterations = None, 0
    for i, (kernel, bias, nit) in enumerate(path):
        iterations += nit
        if len(val_y):
            logits = val_x @ kernel + bias
            losses[i], accuracies[i] = _val_scores(logits, val_y, val_sample_weight)
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
    y = _as_labels(y, num_classes)
    x = np.asarray(x)
    scaling = _Scaling.of(x)
    t = targets(y, num_classes, label_smoothing)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if w.shape != y.shape or np.any(w < 0) or w.sum() <= 0:
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
        c = 1.0 / np.sqrt(scaling.scale**2 / num_classes + l2 * q)
        problem = _Problem((centred * c.astype(x.dtype)).astype(dtype), t, w, q * c**2)
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
    return solve_head(x, y, empty, np.zeros(0, np.int64), num_classes, l2_grid=[l2], **kwargs)


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
