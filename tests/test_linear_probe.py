"""The linear-probe solver: scikit-learn's optimum, exact gradients, warm starts, the l2 choice."""

import warnings

import numpy as np
import pytest
from scipy import optimize
from sklearn.linear_model import LogisticRegression

from tf_finetune import linear_probe as lp


def blobs(n: int, d: int, k: int, spread: float, seed: int = 0):
    """Clustered features of uneven scale and offset (like pooled ReLU features), int labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    y = np.arange(n) % k
    scale = rng.uniform(0.1, 5.0, d)
    x = (centers[y] + spread * rng.normal(size=(n, d))) * scale + rng.uniform(0, 3, d)
    return x.astype(np.float32), y


def sklearn_fit(x, y, C):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=C, tol=1e-12, max_iter=20000).fit(x.astype(np.float64), y)
    return model


def mean_nll(p, y):
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def exact(x, y, k, l2, **kwargs):
    return lp.fit_head(x, y, k, l2, dtype=np.float64, tol=1e-13, max_iter=5000, **kwargs)


@pytest.mark.parametrize("spread", [0.3, 2.0], ids=["separable", "noisy"])
def test_matches_sklearn_multinomial(spread):
    x, y = blobs(300, 12, 4, spread)
    C = 0.5
    ours = exact(x, y, 4, 1.0 / (C * len(y)))  # the module's l2 = 1 / (C n)
    ref = sklearn_fit(x, y, C)
    p_ref = ref.predict_proba(x)
    np.testing.assert_allclose(ours.predict_proba(x), p_ref, atol=2e-5)
    assert mean_nll(ours.predict_proba(x), y) == pytest.approx(mean_nll(p_ref, y), rel=1e-6)
    np.testing.assert_allclose(ours.kernel, ref.coef_.T, rtol=1e-3, atol=1e-4)
    # The fast default (float32 products, tol 1e-6: the objective to ~1e-6 absolute) agrees to
    # within what choosing an l2 needs.
    fast = lp.fit_head(x, y, 4, 1.0 / (C * len(y)))
    assert mean_nll(fast.predict_proba(x), y) == pytest.approx(mean_nll(p_ref, y), abs=2e-4)
    np.testing.assert_array_equal(fast.predict_proba(x).argmax(1), ref.predict(x))


def test_two_classes_is_sklearns_binary_solution_in_two_columns():
    x, y = blobs(200, 8, 2, 1.5, seed=3)
    C = 2.0
    # Two symmetric columns: the binary weight w = k1 - k0 carries l2/4 ||w||^2, so l2 = 2/(Cn).
    ours = exact(x, y, 2, 2.0 / (C * len(y)))
    ref = sklearn_fit(x, y, C)
    np.testing.assert_allclose(ours.kernel[:, 0], -ours.kernel[:, 1], atol=1e-6)
    np.testing.assert_allclose(ours.kernel[:, 1] - ours.kernel[:, 0], ref.coef_[0], rtol=1e-3)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), atol=2e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_gradient_matches_finite_differences(smoothing):
    rng = np.random.default_rng(1)
    n, d, k = 40, 6, 3
    y = rng.integers(0, k, n)
    problem = lp._Problem(
        rng.normal(size=(n, d)), lp.targets(y, k, smoothing), rng.uniform(0.2, 3.0, n),
        rng.uniform(0.5, 2.0, d),
    )  # fmt: skip
    problem.l2 = 0.3
    theta = rng.normal(size=d * k + k)
    error = optimize.check_grad(lambda t: problem(t)[0], lambda t: problem(t)[1], theta)
    assert error < 1e-5 * max(1.0, np.linalg.norm(problem(theta)[1]))


def test_warm_start_reaches_the_cold_start_optimum():
    x, y = blobs(240, 10, 3, 1.0, seed=2)
    kwargs = dict(dtype=np.float64, tol=1e-13, max_iter=5000)
    warm = lp.solve_head(x, y, x[:30], y[:30], 3, l2_grid=[1.0, 1e-2, 1e-4], **kwargs)
    path = list(lp.regularization_path(x, y, 3, [1.0, 1e-2, 1e-4], **kwargs))
    cold = exact(x, y, 3, 1e-4)
    np.testing.assert_allclose(path[-1][0], cold.kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exact(x, y, 3, warm.l2).kernel, warm.kernel, rtol=1e-4, atol=1e-5)


def test_label_smoothing_makes_the_head_less_confident():
    x, y = blobs(200, 8, 4, 0.8, seed=4)
    plain = lp.fit_head(x, y, 4, 1e-3)
    smooth = lp.fit_head(x, y, 4, 1e-3, label_smoothing=0.2)
    p_plain, p_smooth = plain.predict_proba(x), smooth.predict_proba(x)
    assert p_smooth.max(1).mean() < p_plain.max(1).mean() - 0.02
    assert np.linalg.norm(smooth.kernel) < np.linalg.norm(plain.kernel)
    # At the optimum the smoothed head predicts ~ the smoothed targets' mean confidence or less.
    assert p_smooth.max(1).mean() <= 1 - 0.2 + 0.2 / 4 + 1e-2


def test_sample_weights_equal_duplicated_examples():
    x, y = blobs(90, 6, 3, 1.2, seed=5)
    counts = np.random.default_rng(0).integers(0, 4, len(y))
    counts[:3] = 1  # every class keeps examples
    weighted = exact(x, y, 3, 1e-3, sample_weight=counts.astype(float), label_smoothing=0.1)
    dup = exact(np.repeat(x, counts, 0), np.repeat(y, counts), 3, 1e-3, label_smoothing=0.1)
    np.testing.assert_allclose(weighted.kernel, dup.kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weighted.predict_proba(x), dup.predict_proba(x), atol=1e-6)


def test_balanced_weights_are_keras_balanced_class_weights():
    y = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(lp.balanced_sample_weight(y, 3), [2 / 3] * 3 + [2.0] + [1.0] * 2)


def test_l2_choice_is_the_minimum_of_the_val_loss_curve():
    x, y = blobs(400, 30, 4, 1.2, seed=6)
    tr, va = slice(0, 120), slice(120, 400)  # few training examples: strong l2 must win some
    grid = [10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    s = lp.solve_head(
        x[tr], y[tr], x[va], y[va], 4, l2_grid=grid, patience=None, dtype=np.float64, tol=1e-12
    )
    assert s.l2 == grid[int(np.argmin(s.grid_val_losses))]
    assert s.val_loss == pytest.approx(np.min(s.grid_val_losses))
    assert 1e-5 < s.l2 < 10.0, "the curve should have an interior minimum on this data"
    # Each point of the curve is the val loss of an independent solve at that l2.
    for l2, loss in zip(grid, s.grid_val_losses):
        p = exact(x[tr], y[tr], 4, l2).predict_proba(x[va])
        assert mean_nll(p, y[va]) == pytest.approx(loss, rel=1e-4)
    assert s.val_loss == pytest.approx(mean_nll(s.predict_proba(x[va]), y[va]), rel=1e-5)


def test_patience_stops_past_the_minimum_with_the_same_choice():
    x, y = blobs(400, 30, 4, 1.2, seed=6)
    grid = [10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    full = lp.solve_head(x[:120], y[:120], x[120:], y[120:], 4, l2_grid=grid, patience=None)
    short = lp.solve_head(x[:120], y[:120], x[120:], y[120:], 4, l2_grid=grid, patience=2)
    assert short.l2 == full.l2 and short.iterations < full.iterations
    best = grid.index(full.l2)
    np.testing.assert_array_equal(np.isnan(short.grid_val_losses), np.arange(7) > best + 2)
    np.testing.assert_allclose(short.kernel, full.kernel)


def test_standardize_penalises_the_standardised_kernel():
    x, y = blobs(150, 5, 3, 1.0, seed=7)
    z = (x - x.mean(0)) / x.std(0)
    on_raw = exact(x, y, 3, 1e-2, standardize=True)
    on_z = exact(z, y, 3, 1e-2)
    np.testing.assert_allclose(on_raw.predict_proba(x), on_z.predict_proba(z), atol=1e-6)


def test_solution_written_into_a_dense_softmax_layer():
    import keras

    x, y = blobs(60, 7, 3, 1.0, seed=8)
    s = lp.fit_head(x, y, 3, 1e-2)
    layer = keras.layers.Dense(3, activation="softmax", name="predictions")
    layer.build((None, 7))
    lp.assign_to_dense(layer, s)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), s.predict_proba(x), rtol=1e-4, atol=1e-6
    )
    wrong = keras.layers.Dense(4)
    wrong.build((None, 7))
    with pytest.raises(ValueError, match="kernel"):
        lp.assign_to_dense(wrong, s)
