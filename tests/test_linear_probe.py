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
    # Each point of the curve is the val loss of an independent (cold-started) solve at that
    # l2. At l2 = 1e-5 the objective is nearly flat along weakly penalised directions (its
    # curvature there is ~l2), so two solves that stop ~1e-11 apart in objective differ by
    # ~1e-4 in val loss (scipy 1.17); neighbouring grid points differ by > 10%, so 1e-3 still
    # ties each point to its own l2.
    for l2, loss in zip(grid, s.grid_val_losses):
        p = exact(x[tr], y[tr], 4, l2).predict_proba(x[va])
        assert mean_nll(p, y[va]) == pytest.approx(loss, rel=1e-3)
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


# ----------------------------------------------------------------------------- multi-label


def tagged(n: int, d: int, k: int, noise: float, seed: int = 0):
    """Features of uneven scale and offset, and multi-hot tags [n, k] from noisy linear scores
    (some labels rare, none never or always on)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    scores = x @ rng.normal(size=(d, k)) + noise * rng.normal(size=(n, k)) - np.linspace(0, 1.5, k)
    y = (scores > 0).astype(np.float32)
    scale = rng.uniform(0.1, 5.0, d)
    return (x * scale + rng.uniform(0, 3, d)).astype(np.float32), y


def sklearn_per_label(x, y, C, weight=None):
    """One scikit-learn binary LogisticRegression per label; `weight(j)` -> [n] sample weights
    of label j's examples. Returns kernel [d, k], bias [k]."""
    models = []
    for j in range(y.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=C, tol=1e-12, max_iter=20000)
            w = None if weight is None else weight(j)
            models.append(model.fit(x.astype(np.float64), y[:, j], sample_weight=w))
    return np.stack([m.coef_[0] for m in models], 1), np.array([m.intercept_[0] for m in models])


def bce(p, t, positive=1.0, negative=1.0):
    """Keras's binary_crossentropy (the mean over labels), averaged over examples."""
    return float(np.mean(-(positive * t * np.log(p) + negative * (1 - t) * np.log(1 - p))))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sigmoid_gradient_matches_finite_differences(smoothing):
    rng = np.random.default_rng(11)
    n, d, k = 40, 6, 3
    link = lp._link(True, (rng.uniform(0.5, 3, k), rng.uniform(0.5, 3, k)), k)
    t = link.targets(rng.integers(0, 2, (n, k)).astype(float), k, smoothing)
    problem = lp._Problem(
        rng.normal(size=(n, d)), t, rng.uniform(0.2, 3.0, n), rng.uniform(0.5, 2.0, d), link
    )
    problem.l2 = 0.3
    theta = rng.normal(size=d * k + k)
    error = optimize.check_grad(lambda t: problem(t)[0], lambda t: problem(t)[1], theta)
    assert error < 1e-6 * max(1.0, np.linalg.norm(problem(theta)[1]))
    # The value is Keras's weighted binary cross-entropy (sample-weighted mean) + the penalty.
    kernel, bias = problem.split(theta)
    p = sigmoid(problem.z @ kernel + bias)
    per_example = -(link.positive * t * np.log(p) + link.negative * (1 - t) * np.log(1 - p))
    data = np.average(per_example.mean(axis=1), weights=problem.w[:, 0])
    penalty = 0.5 * 0.3 * np.sum(problem.penalty[:, None] * kernel**2)
    assert problem(theta)[0] == pytest.approx(data + penalty, rel=1e-12)


@pytest.mark.parametrize("noise", [0.2, 2.0], ids=["separable", "noisy"])
def test_multi_label_is_sklearns_binary_solution_per_label(noise):
    x, y = tagged(300, 10, 4, noise)
    n, k, C = len(y), y.shape[1], 0.5
    ours = exact(x, y, k, 1.0 / (C * n * k), multi_label=True)  # the module's l2 = 1/(C n k)
    kernel, bias = sklearn_per_label(x, y, C)
    p_ref = sigmoid(x.astype(np.float64) @ kernel + bias)
    np.testing.assert_allclose(ours.predict_proba(x), p_ref, atol=1e-5)
    np.testing.assert_allclose(ours.kernel, kernel, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.bias, bias, rtol=1e-4, atol=1e-4)  # no shift: unpenalised
    # The fast default agrees to within what choosing an l2 needs.
    fast = lp.fit_head(x, y, k, 1.0 / (C * n * k), multi_label=True)
    assert bce(fast.predict_proba(x), y) == pytest.approx(bce(p_ref, y), abs=2e-4)


def test_multi_label_smoothing_is_sklearn_on_split_soft_targets():
    # BCE(t, p) = t BCE(1, p) + (1 - t) BCE(0, p): a smoothed target is a positive copy of the
    # example weighted t and a negative copy weighted 1 - t, which scikit-learn can fit.
    x, y = tagged(200, 8, 3, 0.3, seed=4)
    n, k, C, s = len(y), y.shape[1], 2.0, 0.2
    plain = exact(x, y, k, 1.0 / (C * n * k), multi_label=True)
    smooth = exact(x, y, k, 1.0 / (C * n * k), multi_label=True, label_smoothing=s)
    t = y * (1 - s) + 0.5 * s
    both = np.concatenate([x, x])
    ones = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    kernel, bias = sklearn_per_label(
        both, ones, C, weight=lambda j: np.concatenate([t[:, j], 1 - t[:, j]])
    )
    np.testing.assert_allclose(smooth.predict_proba(x), sigmoid(x @ kernel + bias), atol=1e-5)
    # Smoothing pulls every probability towards 1/2: less confident, a smaller kernel, and
    # (at the optimum, no example more confident than its target) no p beyond 1 - s/2 on average.
    p_plain, p_smooth = plain.predict_proba(x), smooth.predict_proba(x)
    assert np.abs(p_smooth - 0.5).mean() < np.abs(p_plain - 0.5).mean() - 0.02
    assert np.linalg.norm(smooth.kernel) < np.linalg.norm(plain.kernel)
    assert np.where(y > 0, p_smooth, 1 - p_smooth).mean() <= 1 - s / 2 + 1e-2


def test_multi_label_label_weights_are_per_label_sample_weights():
    x, y = tagged(200, 8, 3, 1.0, seed=5)
    n, k, C = len(y), y.shape[1], 1.0
    pos = n / (2 * y.sum(0))
    neg = n / (2 * (n - y.sum(0)))  # --class_weight=balanced's (data.balanced_label_weights)
    ours = exact(x, y, k, 1.0 / (C * n * k), multi_label=True, label_weights=(pos, neg))
    kernel, bias = sklearn_per_label(
        x, y, C, weight=lambda j: np.where(y[:, j] > 0, pos[j], neg[j])
    )
    np.testing.assert_allclose(ours.predict_proba(x), sigmoid(x @ kernel + bias), atol=1e-5)
    # Balancing moves the rare labels' biases up (the last label is the rarest).
    plain = exact(x, y, k, 1.0 / (C * n * k), multi_label=True)
    assert ours.predict_proba(x)[:, -1].mean() > plain.predict_proba(x)[:, -1].mean() + 0.05


def test_multi_label_l2_choice_is_the_minimum_of_keras_val_bce():
    import keras

    x, y = tagged(400, 30, 4, 1.5, seed=6)
    tr, va = slice(0, 120), slice(120, 400)
    grid = [10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    kwargs = dict(multi_label=True, dtype=np.float64, tol=1e-12, label_smoothing=0.1)
    s = lp.solve_head(x[tr], y[tr], x[va], y[va], 4, l2_grid=grid, patience=None, **kwargs)
    assert s.multi_label and s.l2 == grid[int(np.argmin(s.grid_val_losses))]
    assert 1e-5 < s.l2 < 10.0, "the curve should have an interior minimum on this data"
    del kwargs["tol"], kwargs["dtype"]
    for l2, loss in zip(grid, s.grid_val_losses):
        p = exact(x[tr], y[tr], 4, l2, **kwargs).predict_proba(x[va])
        assert bce(p, y[va]) == pytest.approx(loss, rel=1e-4)  # unsmoothed on val
    # The val loss and accuracy are Keras's binary cross-entropy and binary accuracy.
    p = s.predict_proba(x[va]).astype(np.float32)
    keras_loss = float(keras.losses.BinaryCrossentropy()(y[va], p))
    assert s.val_loss == pytest.approx(keras_loss, rel=1e-4)
    accuracy = keras.metrics.BinaryAccuracy()
    accuracy.update_state(y[va], p)
    assert s.val_accuracy == pytest.approx(float(accuracy.result()), abs=1e-6)
    assert s.val_accuracy == pytest.approx(s.grid_val_accuracies[grid.index(s.l2)])


def test_multi_label_val_loss_is_weighted_as_the_compiled_loss_is():
    from tf_finetune import model as model_lib

    x, y = tagged(300, 12, 3, 1.0, seed=7)
    pos, neg = 150 / (2 * y[:150].sum(0)), 150 / (2 * (150 - y[:150].sum(0)))
    s = lp.solve_head(
        x[:150], y[:150], x[150:], y[150:], 3, multi_label=True, label_weights=(pos, neg)
    )
    p = s.predict_proba(x[150:]).astype(np.float32)
    compiled = model_lib.WeightedBinaryCrossentropy(pos, neg)
    assert s.val_loss == pytest.approx(float(compiled(y[150:], p)), rel=1e-4)
    assert s.val_loss == pytest.approx(bce(p, y[150:], pos, neg), rel=1e-5)


def test_multi_label_solution_written_into_a_dense_sigmoid_layer():
    import keras

    x, y = tagged(60, 7, 3, 0.5, seed=8)
    s = lp.fit_head(x, y, 3, 1e-2, multi_label=True)
    layer = keras.layers.Dense(3, activation="sigmoid", name="predictions")
    layer.build((None, 7))
    lp.assign_to_dense(layer, s)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), s.predict_proba(x), rtol=1e-4, atol=1e-6
    )
    assert not np.allclose(s.predict_proba(x).sum(axis=1), 1.0)  # not a softmax


@pytest.mark.parametrize(
    "labels, kwargs",
    [
        (np.zeros(10, np.int64), dict(multi_label=True)),  # int labels, not multi-hot
        (np.full((10, 3), 2.0), dict(multi_label=True)),  # not in [0, 1]
        (np.zeros((10, 4)), dict(multi_label=True)),  # the wrong number of labels
        (np.zeros(10, np.int64), dict(label_weights=([1.0] * 3, [1.0] * 3))),  # softmax
        (np.zeros((10, 3)), dict(multi_label=True, label_weights=([1.0] * 2, [1.0] * 2))),
    ],
)
def test_multi_label_refuses_what_is_not_its_problem(labels, kwargs):
    with pytest.raises(ValueError):
        lp.fit_head(np.ones((10, 2), np.float32), labels, 3, 1e-2, **kwargs)
