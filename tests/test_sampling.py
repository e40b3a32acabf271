"""--sampling=balanced: class-balanced training batches on pixels and on cached features."""

import collections

import numpy as np
import pytest

from tests.helpers import tiny
from tf_finetune import cli, features, input_pipeline, sampling, train

# Examples per class of the imbalanced fixture: 80% / 15% / 5%.
COUNTS = (64, 12, 4)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    from tests.images import write_class_folders

    root = write_class_folders(tmp_path_factory.mktemp("imbalanced"), 3, max(COUNTS), (8, 8))
    for label, keep in enumerate(COUNTS):
        for path in sorted((root / f"class_{label}").iterdir())[keep:]:
            path.unlink()
    return root


def _frequencies(batches) -> np.ndarray:
    counts = collections.Counter()
    for _, y in batches:
        counts.update(np.argmax(np.asarray(y), axis=1).tolist())
    total = sum(counts.values())
    return np.array([counts[c] / total for c in range(len(COUNTS))])


def _epochs(ds, n: int) -> list:
    return [batch for _ in range(n) for batch in ds]


def test_pixel_batches_draw_classes_equally(imbalanced, tmp_path):
    config = tiny(imbalanced, tmp_path, sampling="balanced", validation_percent=10)
    dataset = input_pipeline.load_data(config)
    balanced = input_pipeline.make_pipelines(config, dataset)["train"]
    plain = input_pipeline.make_pipelines(tiny(imbalanced, tmp_path), dataset)["train"]
    first = list(balanced)
    # An epoch keeps the split's size: as many batches as without sampling.
    assert len(first) == len(list(plain))
    assert sum(len(y) for _, y in first) == dataset.train.count
    assert _frequencies(_epochs(plain, 5))[0] > 0.7  # the fixture is imbalanced
    assert np.allclose(_frequencies(_epochs(balanced, 5)), 1 / 3, atol=0.07)
    # Reproducible with the seed, and each epoch draws anew.
    again = input_pipeline.make_pipelines(config, dataset)["train"]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    second = list(balanced)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, second))


@pytest.mark.parametrize("memory_mapped", [False, True])
def test_feature_batches_draw_classes_equally(tmp_path, memory_mapped):
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    rows = np.arange(len(labels), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    onehot = np.eye(len(COUNTS), dtype=np.float32)[labels]
    if memory_mapped:
        np.save(tmp_path / "f.npy", rows)
        np.save(tmp_path / "l.npy", onehot)
        rows, onehot = (
            np.load(tmp_path / "f.npy", mmap_mode="r"),
            np.load(tmp_path / "l.npy", mmap_mode="r"),
        )
    cached = features.Features(rows, onehot)
    ds = features.dataset(cached, 8, True, seed=1, balanced=True)
    first = list(ds)
    assert sum(len(y) for _, y in first) == len(labels)
    for f, y in first:  # every drawn row keeps its own label
        assert np.array_equal(labels[np.asarray(f)[:, 0].astype(int)], np.argmax(y, axis=1))
    assert np.allclose(_frequencies(_epochs(ds, 5)), 1 / 3, atol=0.07)
    # Evaluation batches are untouched: every row once, in order.
    val = np.concatenate(
        [np.asarray(f)[:, 0] for f, _ in features.dataset(cached, 8, False, 1, True)]
    )
    assert val.tolist() == list(range(len(labels)))


def test_a_class_without_examples_is_left_out():
    onehot = np.eye(3, dtype=np.float32)[[0, 0, 0, 2]]
    drawn = list(sampling.balanced_indices(onehot, seed=0).take(200).as_numpy_iterator())
    assert set(drawn) == {0, 1, 2, 3}
    assert 0.35 < np.mean(np.array(drawn) == 3) < 0.65  # class 2's one row: half the draws


@pytest.mark.slow
def test_cached_feature_run_samples_balanced(imbalanced, tmp_path, monkeypatch):
    """A frozen-backbone run trains its head on balanced draws of the cached features."""
    calls = []
    real = sampling.balanced_indices
    monkeypatch.setattr(
        sampling, "balanced_indices", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    )
    config = tiny(imbalanced, tmp_path, sampling="balanced", unfreeze="0", epochs=1)
    metrics = train.train_and_evaluate(config)
    assert calls and calls[0][1] == len(COUNTS)
    assert metrics["train_images"] == calls[0][0]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--class_weight=balanced"], "--sampling=balanced and --class_weight=balanced"),
        (["--head_solver=lbfgs", "--unfreeze=0"], "use --class_weight=balanced with it"),
    ],
)
def test_conflicts_are_one_line(capsys, folder, flags, expected):
    code = cli.main(["train", f"--data={folder}", "--sampling=balanced", *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
