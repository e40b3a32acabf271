"""Suspected label errors: flipped labels are found, clean data is left alone, the outputs."""

import dataclasses
import json
import os

import numpy as np
import pytest

from tests.images import write_class_folders
from tf_finetune import evaluate_run, input_pipeline, report, train
from tf_finetune import label_issues as li
from tf_finetune.config import Config
from tf_finetune.resolve import resolve

CLASSES = ("daisy", "rose", "tulip", "sunflower")


def clusters(per_class: int = 60, d: int = 16, seed: int = 0):
    """Four separated, noisy clusters of features of uneven scale; int labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d)) * 2.0
    y = np.repeat(np.arange(4), per_class)
    x = (centers[y] + rng.normal(size=(len(y), d))) * rng.uniform(0.5, 2.0, d)
    return x.astype(np.float32), y


def flip(y: np.ndarray, count: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(y), count, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 4, count)) % 4
    return noisy, flipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flipped_labels_are_the_top_suspects(seed):
    x, y = clusters(seed=seed)
    noisy, flipped = flip(y, 6, seed=seed + 10)
    suspects = li.find_label_issues(x, noisy, 4, folds=5, seed=0)
    top = {s.index for s in suspects[:10]}
    assert len(top & set(flipped.tolist())) >= 5
    for s in suspects:
        if s.index in set(flipped.tolist()):
            assert s.suggested == y[s.index], "the suggestion is the true label"
    margins = [s.margin for s in suspects]
    assert margins == sorted(margins, reverse=True)
    by_confidence = li.find_label_issues(x, noisy, 4, rank_by="self_confidence")
    assert len({s.index for s in by_confidence[:10]} & set(flipped.tolist())) >= 5
    assert {s.index for s in by_confidence} == {s.index for s in suspects}
    p_given = [s.p_given for s in by_confidence]
    assert p_given == sorted(p_given)


def test_clean_data_has_few_suspects():
    x, y = clusters(seed=2)
    assert len(li.find_label_issues(x, y, 4)) <= 3  # of 240


def test_deterministic_given_the_seed():
    x, y = clusters(seed=3)
    noisy, _ = flip(y, 6, seed=4)
    first = li.find_label_issues(x, noisy, 4, seed=7)
    assert first == li.find_label_issues(x, noisy, 4, seed=7)
    folds = li.stratified_folds(noisy, 5, seed=7)
    assert np.array_equal(folds, li.stratified_folds(noisy, 5, seed=7))
    assert set(np.bincount(folds)) == {48}  # 240 / 5, every fold the same size


def test_confident_learning_thresholds():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],
            [0.50, 0.45, 0.05],  # no class confident, given at 0.5 (> t0 / 2): borderline, kept
            [0.80, 0.10, 0.10],
            [0.05, 0.90, 0.05],
            [0.30, 0.60, 0.10],  # given below t1 but above t1 / 2: kept
            [0.15, 0.75, 0.10],  # class 1 reaches t1 = 0.75: suspect (strict rule)
            [0.10, 0.10, 0.80],
            [0.55, 0.20, 0.25],  # no class confident, given under t2 / 2: the argmax
        ]
    )
    y = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    # Thresholds: t0 = mean(.9, .5, .8, .15) = .5875, t1 = mean(.9, .6) = .75, t2 = .525.
    suspects = li.confident_suspects(probs, y)
    assert [(s.index, s.given, s.suggested) for s in suspects] == [(5, 0, 1), (7, 2, 0)]
    assert suspects[0].confidence == pytest.approx(0.75)
    assert suspects[0].p_given == pytest.approx(0.15)
    assert suspects[1].margin == pytest.approx(0.3)
    with pytest.raises(ValueError, match="rank_by"):
        li.confident_suspects(probs, y, rank_by="loss")


def test_plot_and_json_are_written(tmp_path):
    x, y = clusters()
    noisy, _ = flip(y, 6)
    suspects = li.find_label_issues(x, noisy, 4, l2=1e-2)
    images = np.random.default_rng(0).uniform(0, 255, (len(y), 12, 12, 3)).astype(np.float32)
    path = li.plot_label_issues(suspects, images.__getitem__, CLASSES, str(tmp_path / "l.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    empty = li.plot_label_issues([], images.__getitem__, CLASSES, str(tmp_path / "empty.png"))
    assert (tmp_path / "empty.png").stat().st_size > 0 and empty.endswith("empty.png")

    files = [f"/photos/{i}.jpg".encode() for i in range(len(y))]
    li.write_label_issues_json(str(tmp_path / "l.json"), suspects, files, CLASSES)
    written = json.loads((tmp_path / "l.json").read_text())
    assert written["count"] == len(suspects)
    first = written["suspects"][0]
    assert first["file"] == f"/photos/{suspects[0].index}.jpg"
    assert first["given"] == CLASSES[suspects[0].given] and first["rank"] == 1


# ----------------------------------------------------------------------------- evaluate --label_issues
@pytest.mark.slow
def test_evaluate_finds_images_moved_to_the_wrong_class_folder(tmp_path):
    folder = write_class_folders(tmp_path / "photos", num_classes=3, per_class=16)
    moved = {}  # new path -> the class it really is
    for label in range(3):
        for j in (2, 5):
            source = folder / f"class_{label}" / f"img_{j:03d}.{('jpg', 'png')[j % 2]}"
            target = folder / f"class_{(label + 1) % 3}" / f"flip_{label}_{j}{source.suffix}"
            source.rename(target)
            moved[str(target)] = f"class_{label}"
    config = resolve(
        Config(
            data=str(folder),
            backbone="digits_cnn",
            weights="none",
            image_size=16,
            epochs=2,
            batch_size=8,
            head_solver="lbfgs",
            model_dir=str(tmp_path / "run"),
        )
    )
    train.train_and_evaluate(config)
    dataset = input_pipeline.load_data(config, None)
    in_train = {
        k.decode() for k in dataset.train.source.map(lambda k, _: k).as_numpy_iterator()
    } & set(moved)
    assert in_train  # 6 moved files, each in train with p = 0.8

    result = evaluate_run.evaluate_run(dataclasses.replace(config, label_issues=True), "val")
    written = json.loads((tmp_path / "run" / "label_issues.json").read_text())
    found = {row["file"]: row for row in written["suspects"]}
    assert set(found) == in_train  # every flip in train, nothing else (solid colours)
    for path, row in found.items():
        assert row["given"] == os.path.basename(os.path.dirname(path))
        assert row["suggested"] == moved[path] and row["confidence"] > 0.5
    assert "Suspected label errors" in result["text"] and "suggested" in result["text"]
    first = written["suspects"][0]["file"]
    assert os.path.relpath(first, folder) in result["text"]  # relative to the data folder
    png = tmp_path / "run" / "label_issues.png"
    assert str(png) in result["files"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".tmp-")]
    # The report page lists them (its table reads label_issues.json's keys).
    page = open(report.write_report(str(tmp_path / "run")), encoding="utf-8").read()
    assert 'id="label-issues"' in page and os.path.basename(next(iter(found))) in page
