"""The one decode: JPEG's reduced-size decode, and each image decoded once per run (a file that
fails is named by the run's first decode of it, the feature pass)."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers import tiny
from tests.images import class_image, encode, write_class_folders
from tf_finetune import data, feature_fit, features, input_pipeline, train


def _photo(width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (gradients and a disc), quality 90."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2) * 80.0
    pixels = np.stack([255 * x / width, 255 * y / height, 60 + disc], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "size, expected_ratio",
    [
        ((1200, 800), 4),
        ((800, 1200), 4),
        ((500, 256), 2),
        ((255, 400), 2),
        ((254, 400), 1),
        ((2100, 1040), 8),
    ],
)
def test_the_largest_ratio_that_keeps_both_sides_at_the_target(size, expected_ratio):
    blob = tf.constant(_photo(*size))
    ratio = data.JPEG_RATIOS[int(data.jpeg_ratio_index(blob, 128))]
    assert ratio == expected_ratio
    scaled = tf.io.decode_jpeg(blob, ratio=ratio)
    assert min(scaled.shape[:2]) >= 128  # never decoded below the target


def test_reduced_decode_is_within_two_grey_levels_of_a_full_decode():
    blob = tf.constant(_photo(1600, 1000))
    assert data.JPEG_RATIOS[int(data.jpeg_ratio_index(blob, 96))] == 8
    full = data.resize(tf.io.decode_jpeg(blob, channels=3), 96).numpy()
    ours = data.decode_and_resize(blob, 96).numpy()
    assert ours.shape == (96, 96, 3)
    assert 0 < np.abs(ours - full).mean() < 2  # a different decode, the same picture


def test_other_formats_and_small_jpegs_decode_in_full():
    image = class_image(1, (300, 200))
    for fmt in ("PNG", "BMP", "GIF"):
        blob = encode(image, fmt)
        full = data.resize(tf.io.decode_image(blob, channels=3, expand_animations=False), 16)
        np.testing.assert_array_equal(data.decode_and_resize(blob, 16), full, err_msg=fmt)
    small = encode(class_image(0, (24, 20)), "JPEG")
    full = data.resize(tf.io.decode_jpeg(small, channels=3), 16)
    np.testing.assert_array_equal(data.decode_and_resize(small, 16), full)


def test_the_feature_cache_key_names_the_decode():
    assert "jpeg_ratio1248" in feature_fit.DECODE_MODE
    assert feature_fit.CACHE_FORMAT >= 4


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_head_only_run_decodes_once_and_names_corrupt_files(
    corrupt_folder, tmp_path, monkeypatch, cache
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    decoded = []
    real = data.find_unreadable
    monkeypatch.setattr(
        data, "find_unreadable", lambda paths, *a: decoded.extend(paths) or real(paths, *a)
    )
    config = tiny(corrupt_folder, tmp_path / "run", unfreeze="0", epochs=2, cache=cache)
    assert input_pipeline.decode_check(config) == ()
    metrics = train.train_and_evaluate(config)
    assert decoded == []  # no decoding pre-pass: the feature pass was the first decode
    skipped = {os.path.basename(s["file"]): s["reason"] for s in metrics["skipped_files"]}
    assert set(skipped) == {"truncated.jpg", "garbage.png"}, skipped
    assert "corrupt or truncated JPEG" in skipped["truncated.jpg"]
    assert metrics["train_images"] + metrics["val_images"] == 48  # 50 files, 2 undecodable


@pytest.mark.slow
def test_a_head_only_run_finds_a_corrupt_test_file_in_the_test_feature_pass(tmp_path, monkeypatch):
    for split, per_class in (("train", 10), ("val", 4), ("test", 4)):
        write_class_folders(tmp_path / "tree" / split, num_classes=3, per_class=per_class)
    good = (tmp_path / "tree" / "test" / "class_1" / "img_000.jpg").read_bytes()
    (tmp_path / "tree" / "test" / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(data, "find_unreadable", lambda *a: pytest.fail("decoded up front"))
    config = tiny(tmp_path / "tree", tmp_path / "run", unfreeze="0", epochs=2)
    assert input_pipeline.decode_check(config) == ()
    metrics = train.train_and_evaluate(config)
    assert [os.path.basename(s["file"]) for s in metrics["skipped_files"]] == ["truncated.jpg"]
    assert metrics["test_images"] == 12
    with open(tmp_path / "run" / "predictions_test.csv") as f:
        assert len(f.read().splitlines()) == 1 + 12


def test_two_phases_decode_test_up_front(corrupt_folder, tmp_path):
    config = tiny(corrupt_folder, tmp_path / "run", unfreeze="all", warmup_epochs=1)
    assert input_pipeline.decode_check(config) == ("test",)


def test_a_pixel_run_still_checks_every_file_up_front(corrupt_folder, tmp_path):
    config = tiny(corrupt_folder, tmp_path / "run", epochs=1)
    assert input_pipeline.decode_check(config) == data.ALL_SPLITS
    dataset = input_pipeline.load_data(config, training=True)
    names = {os.path.basename(p) for p, _ in dataset.skipped_files}
    assert names == {"truncated.jpg", "garbage.png"}


def test_the_feature_pass_leaves_out_what_fails_and_says_which(corrupt_folder, tmp_path):
    dataset = data.load_image_folder(str(corrupt_folder), 16, 20, decode_check=())
    assert dataset.skipped_files == ()  # headers alone pass both
    split = dataset.train if dataset.train.count > 40 else dataset.val
    keys = [k.decode() for k, _ in split.source.as_numpy_iterator()]
    model = tiny(corrupt_folder, tmp_path, unfreeze="0")
    from tf_finetune import model as model_lib

    extractor, _ = features.split_classifier(model_lib.build_model(model, 3))
    pipeline = data.feature_pipeline(split, 3, 8)
    on_disk = features.extract(extractor, pipeline, split.count, str(tmp_path / "f"), verbose=0)
    in_memory = features.extract(extractor, pipeline, split.count, verbose=0)
    bad = [i for i, k in enumerate(keys) if k.endswith(("truncated.jpg", "garbage.png"))]
    assert list(in_memory.dropped) == bad == list(features.load(str(tmp_path / "f")).dropped)
    assert in_memory.count == on_disk.count == split.count - len(bad)
    np.testing.assert_allclose(in_memory.features, on_disk.features, atol=1e-6)
    named = data.undecodable(split, in_memory.dropped)
    assert [os.path.basename(p) for p, _ in named] == [os.path.basename(keys[i]) for i in bad]
    before = split.count
    data.forget_undecodable(dataset, "train" if split is dataset.train else "val", named)
    after = dataset.train if split is dataset.train else dataset.val
    assert after.count == before - len(bad) == len(list(after.source))
    assert len(dataset.skipped_files) == len(bad)


def test_a_truncated_photo_fails_its_reduced_decode_too(tmp_path):
    blob = _photo(1600, 1000)
    (tmp_path / "half.jpg").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "whole.jpg").write_bytes(blob)
    paths = [str(tmp_path / "half.jpg"), str(tmp_path / "whole.jpg")]
    found = data.find_unreadable(paths, image_size=96)  # decoded at 1/8 of each side
    assert [os.path.basename(p) for p, _ in found] == ["half.jpg"]
    assert "corrupt or truncated JPEG" in found[0][1]
