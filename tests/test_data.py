"""Image folders and TFDS -> tf.data: formats, modes, sizes, bad files, stable splits."""

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import tiny
from tests.images import class_image, encode, write_class_folders
from tf_finetune import data, input_pipeline
from tf_finetune.errors import UserError


def _decoded(split):
    images, labels = zip(*split.examples().as_numpy_iterator())
    return np.stack(images), np.array(labels)


def test_mixed_formats_modes_and_sizes_decode_to_rgb(tmp_path):
    cases = [
        ("a.jpg", "RGB", "JPEG", (40, 30)),
        ("b.PNG", "L", "PNG", (17, 33)),  # grayscale, upper-case extension
        ("c.png", "RGBA", "PNG", (64, 64)),
        ("d.gif", "P", "GIF", (20, 20)),  # palette
        ("e.bmp", "RGB", "BMP", (9, 50)),
        ("f.JPEG", "L", "JPEG", (128, 96)),
    ]
    for label, folder in enumerate(["cats", "dogs"]):
        (tmp_path / folder).mkdir()
        for name, mode, fmt, size in cases:
            (tmp_path / folder / name).write_bytes(encode(class_image(label, size, mode=mode), fmt))
    # An animated GIF: only its first frame is used.
    frames = [class_image(0, (16, 16)), class_image(1, (16, 16))]
    buf = tmp_path / "cats" / "anim.gif"
    frames[0].save(buf, save_all=True, append_images=frames[1:], format="GIF")
    (tmp_path / "cats" / "notes.txt").write_text("not an image, ignored")
    (tmp_path / "cats" / ".DS_Store").write_bytes(b"\0\0")

    dataset = data.load_image_folder(str(tmp_path), image_size=24, validation_percent=30)
    assert dataset.class_names == ("cats", "dogs")
    assert dataset.train.count + dataset.val.count == 2 * len(cases) + 1
    assert dataset.skipped_files == ()
    images, labels = _decoded(dataset.train)
    assert images.shape[1:] == (24, 24, 3) and images.dtype == np.float32
    # Solid colours survive every format and mode: cats are red-dominant or grey, never blue.
    for image, label in zip(images, labels):
        r, g, b = image.reshape(-1, 3).mean(axis=0)
        if label == 1:
            assert g >= r - 2, (r, g, b)


def test_corrupt_and_empty_files_are_skipped_and_reported(tmp_path):
    write_class_folders(tmp_path, num_classes=2, per_class=6)
    (tmp_path / "class_0" / "broken.jpg").write_bytes(encode(class_image(0), "JPEG")[:60])
    (tmp_path / "class_1" / "empty.png").write_bytes(b"")
    (tmp_path / "class_1" / "text.jpg").write_text("hello, I am not a JPEG")
    dataset = data.load_image_folder(str(tmp_path), image_size=16, validation_percent=25)
    skipped = dict(dataset.skipped_files)
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == ["broken.jpg", "empty.png", "text.jpg"]
    assert "empty file" in skipped[str(tmp_path / "class_1" / "empty.png")]
    assert all(reason for reason in skipped.values())
    assert dataset.train.count + dataset.val.count == 12
    _decoded(dataset.train)  # the pipeline itself never meets a bad file
    _decoded(dataset.val)


def test_hash_split_is_stable_when_images_are_added(tmp_path):
    write_class_folders(tmp_path, num_classes=2, per_class=30)
    before = data.list_image_folder(str(tmp_path), 20).splits["val"][0]
    assert 0 < len(before) < 30
    for j in range(30, 60):
        (tmp_path / "class_0" / f"new_{j}.png").write_bytes(encode(class_image(0, seed=j), "PNG"))
    after = data.list_image_folder(str(tmp_path), 20).splits["val"][0]
    assert set(before) <= set(after)
    assert data.hash_percent("a/b_nohash_1.jpg") == data.hash_percent("a/b_nohash_2.jpg")


def test_train_val_test_layout_is_used_as_given(tmp_path):
    for split, n in (("train", 5), ("val", 3), ("test", 4)):
        write_class_folders(tmp_path / split, num_classes=2, per_class=n)
    dataset = data.load_image_folder(str(tmp_path), image_size=16, validation_percent=20)
    assert (dataset.train.count, dataset.val.count, dataset.test.count) == (10, 6, 8)
    assert dataset.class_names == ("class_0", "class_1")


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no class subfolders"),
        ({"only": 3}, "single class"),
        ({"a": 3, "b": 0}, "holds no images"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, layout, message):
    for name, n in layout.items():
        (tmp_path / name).mkdir()
        for j in range(n):
            (tmp_path / name / f"{j}.png").write_bytes(encode(class_image(0, seed=j), "PNG"))
    if layout == {"a": 3, "b": 0}:
        for j in range(3):
            (tmp_path / "a" / f"{j}.png").unlink()
    with pytest.raises(UserError, match=message):
        data.load_image_folder(str(tmp_path), image_size=16, validation_percent=20)


def test_class_with_only_unreadable_images_is_an_error(tmp_path):
    write_class_folders(tmp_path, num_classes=2, per_class=4)
    for path in (tmp_path / "class_1").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="class_1 have no readable training image"):
        data.load_image_folder(str(tmp_path), image_size=16, validation_percent=20)


def test_pipeline_shuffles_with_seed_and_evaluates_in_order(tmp_path):
    write_class_folders(tmp_path, num_classes=3, per_class=10)
    dataset = data.load_image_folder(str(tmp_path), image_size=8, validation_percent=20)

    def labels(training, seed):
        ds = data.make_pipeline(dataset.train, 3, 4, training, seed)
        return np.concatenate([y.numpy().argmax(1) for _, y in ds])

    assert np.array_equal(labels(True, 1), labels(True, 1))
    assert not np.array_equal(labels(True, 1), labels(True, 2))
    assert np.array_equal(labels(False, 1), labels(False, 2))
    # Without --deterministic, parallel decoding may hand over images out of order (training
    # only: evaluation keeps the split's order, which reports rely on).
    options = data.make_pipeline(dataset.train, 3, 4, True, 0, deterministic=False).options()
    assert options.deterministic is False
    assert data.make_pipeline(dataset.train, 3, 4, True, 0).options().deterministic is not False
    evaluation = data.make_pipeline(dataset.val, 3, 4, False, 0, deterministic=False)
    assert evaluation.options().deterministic is not False
    x, y = next(iter(data.make_pipeline(dataset.train, 3, 4, True, 0)))
    assert x.dtype == tf.float32 and y.shape == (4, 3)
    assert float(tf.reduce_max(x)) > 1.0  # raw 0-255 pixels: scaling is the model's job


@pytest.mark.slow
def test_tfds_with_mock_data_carves_validation_with_the_seed():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        dataset = data.load_tfds("tf_flowers", 16, "train", "", "", 25, seed=3)
        assert dataset.class_names == ("dandelion", "daisy", "tulips", "sunflowers", "roses")
        assert dataset.test is None  # tf_flowers has only a train split
        assert dataset.train.count + dataset.val.count == 40
        images, _ = _decoded(dataset.val)
        assert len(images) == dataset.val.count and images.shape[1:] == (16, 16, 3)
        assert len(_decoded(dataset.train)[0]) == dataset.train.count
        again = data.load_tfds("tf_flowers", 16, "train", "", "", 25, seed=3)
        assert again.val.count == dataset.val.count


def test_tfds_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="tfds:no_such_dataset_xyz"):
        data.load_tfds("no_such_dataset_xyz", 16, "train", "", "", 20, seed=0)


def test_pipeline_pixels_are_what_the_export_decodes_and_the_image_cache_rounds_them(tmp_path):
    write_class_folders(tmp_path, num_classes=2, per_class=6, size=(37, 23))  # a real resize
    dataset = data.load_image_folder(str(tmp_path), image_size=16, validation_percent=20)
    paths = [p.decode() for p, _ in dataset.val.source.as_numpy_iterator()]
    # decode_and_resize is what the exported serving_default runs on each image's bytes.
    expected = np.stack([data.decode_and_resize(tf.io.read_file(p), 16).numpy() for p in paths])
    assert not np.array_equal(expected, np.round(expected))  # bilinear gives fractions

    def batches(cache_images):
        ds = data.make_pipeline(dataset.val, 2, 64, False, 0, cache_images=cache_images)
        return np.concatenate([x.numpy() for x, _ in ds])

    streamed = batches(False)
    assert streamed.dtype == np.float32
    np.testing.assert_array_equal(streamed, expected)
    cached = batches(True)  # kept as uint8: within half a grey level
    np.testing.assert_array_equal(cached, np.round(expected))


def test_a_pixel_run_scores_val_and_test_on_the_pixels_it_serves(tmp_path):
    """A run that trains the backbone keeps its decoded train images in memory as uint8; the
    val and test batches (checkpoint choice, the reports, predictions_<split>.csv) must be the
    unrounded pixels the export decodes from the same files, or the reported scores are not
    the served model's (a fine-tuned MobileNetV2 moved probabilities by up to 0.03)."""
    # 24x20 photos with noise resized to 16 px: bilinear pixels between grey levels.
    folder = write_class_folders(tmp_path / "photos", per_class=10, size=(24, 20))
    config = tiny(folder, tmp_path / "run", test_percent=25, validation_percent=25)
    assert input_pipeline.trains_on_pixels(config)
    dataset = input_pipeline.load_data(config, training=True)
    pipelines = input_pipeline.make_pipelines(config, dataset)
    for name in ("val", "test"):
        split = getattr(dataset, name)
        served = [data.decode_and_resize(tf.io.read_file(key), 16) for key, _ in split.source]
        batches = np.concatenate([x.numpy() for x, _ in pipelines[name]])
        assert np.any(np.abs(np.round(batches) - batches) > 0.01), "the pixels are fractional"
        np.testing.assert_allclose(batches, np.stack(served), atol=1e-4, err_msg=name)
    train = np.concatenate([x.numpy() for x, _ in pipelines["train"].take(2)])
    assert np.all(train == np.round(train)), "train images are cached as uint8"
