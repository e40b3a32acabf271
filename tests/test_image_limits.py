"""Decompression bombs: refused from their headers by training, the export and `predict`.

tests/bombs.py crafts each one (a tiny real file whose header declares a huge image). The
Python header parser (tf_finetune.headers, shared by training and the predict client) and the
in-graph one (data.image_info_tensor, in every export) must read the same numbers.
"""

import json
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import bombs
from tests.fake_tf_serving import FakeModelStore, FakeRestServer
from tests.images import class_image, encode
from tf_finetune import cli, data, export, headers
from tf_finetune.serving import LocalPredictor, RestPredictor, predict_files

SIZE = 16
LIMIT = f"{headers.MAX_IMAGE_PIXELS:,}"
BOMBS = bombs.all_bombs()


def _good() -> list[bytes]:
    formats = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
    return [encode(class_image(i % 3, (30 + i, 20), seed=i), f) for i, f in enumerate(formats)]


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("limits") / "export"
    path = export.export_saved_model(model, ["a", "b", "c"], SIZE, str(base))
    return base, tf.saved_model.load(path).signatures["serving_default"]


def test_python_and_graph_header_parsers_agree_on_bombs_and_good_images():
    info = tf.function(data.image_info_tensor, input_signature=[tf.TensorSpec([], tf.string)])
    cases = {name: blob for name, (blob, _) in BOMBS.items()}
    cases.update({f"good{i}": blob for i, blob in enumerate(_good())})
    cases["two-frame gif"] = bombs.animation("GIF", 2, (9, 5))
    for name, blob in cases.items():
        parsed = headers.parse(blob)
        graph = info(tf.constant(blob)).numpy().tolist()
        assert [parsed.width, parsed.height, parsed.frames] == graph, name
        if name in BOMBS:
            assert (parsed.format, parsed.width, parsed.height, parsed.frames) == BOMBS[name][1]
    assert info(tf.constant(b"not an image")).numpy().tolist() == [0, 0, 0]
    assert info(tf.constant(b"")).numpy().tolist() == [0, 0, 0]
    assert headers.parse(cases["two-frame gif"]).frames == 2


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_export_refuses_each_bomb_before_decoding(exported, name):
    _, serve = exported
    good = _good()
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        serve(image_bytes=tf.constant(good[:2] + [BOMBS[name][0]] + good[2:]))
    message = err.value.message
    assert "image 3 of 6 in the request" in message and "refused before decoding" in message
    assert (LIMIT in message) if "frames" not in name else ("100 frames" in message)


def test_export_outputs_within_the_limit_are_unchanged(exported, model):
    _, serve = exported
    good = _good()
    served = serve(image_bytes=tf.constant(good))["probabilities"].numpy()
    before = model(tf.stack([data.decode_and_resize(b, SIZE) for b in good])).numpy()
    np.testing.assert_array_equal(served, before)  # the header check changes nothing
    assert serve(image_bytes=tf.constant([], tf.string))["probabilities"].shape == (0, 3)


@pytest.mark.slow
def test_a_real_bomb_is_refused_in_milliseconds(exported):
    _, serve = exported
    real = bombs.real_png_bomb(20000)  # 1.2 MB, decodes to 1.2 GB
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match="20000x20000"):
        serve(image_bytes=tf.constant([real]))
    assert time.perf_counter() - start < 1.0  # a full decode takes seconds


@pytest.mark.slow
def test_the_limit_is_a_knob_and_the_model_card_records_it(model, tmp_path):
    small = export.export_saved_model(
        model, ["a", "b", "c"], SIZE, str(tmp_path), max_image_pixels=1000
    )
    card = json.loads((tmp_path / "1" / export.MODEL_CARD).read_text())
    assert card["max_image_pixels"] == 1000 and card["max_animation_frames"] == 100
    serve = tf.saved_model.load(small).signatures["serving_default"]
    fits = encode(class_image(0, (40, 25)), "PNG")  # exactly 1,000 pixels
    serve(image_bytes=tf.constant([fits]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="41x25 pixels .* limit of 1,000"):
        serve(image_bytes=tf.constant([encode(class_image(0, (41, 25)), "PNG")]))
    # The limit comes from the run's card when not given (what `train` and `export` pass).
    card_limit = export.export_saved_model(
        model, ["a", "b", "c"], SIZE, str(tmp_path), card={"max_image_pixels": 500}
    )
    assert json.loads((tmp_path / "2" / export.MODEL_CARD).read_text())["max_image_pixels"] == 500
    serve = tf.saved_model.load(card_limit).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="limit of 500 pixels"):
        serve(image_bytes=tf.constant([fits]))


def test_training_skips_bombs_of_every_format_from_their_headers(tmp_path):
    for label in range(2):
        folder = tmp_path / f"class_{label}"
        folder.mkdir()
        for j in range(6):
            (folder / f"ok_{j}.png").write_bytes(encode(class_image(label, seed=j), "PNG"))
    for name, (blob, _) in BOMBS.items():
        suffix = {"JPEG": "jpg", "WEBP": "webp"}.get(BOMBS[name][1][0], BOMBS[name][1][0].lower())
        (tmp_path / "class_0" / f"bomb_{name}.{suffix}").write_bytes(blob)
        reason = data.precheck(str(tmp_path / "class_0" / f"bomb_{name}.{suffix}"))
        assert reason and ("too large to decode safely" in reason or "frames" in reason), name
    dataset = data.load_image_folder(str(tmp_path), 8, 30)
    skipped = {p.rsplit("/", 1)[1] for p, _ in dataset.skipped_files}
    # .webp files are not training images (IMAGE_EXTENSIONS); every other bomb is skipped.
    assert skipped == {f"bomb_{n}.{s}" for n, s in _suffixes().items() if s != "webp"}
    # max_image_pixels reaches the header check: the 24x20 (480-pixel) images fit 1000, not 400.
    tight = data.load_image_folder(str(tmp_path), 8, 30, max_image_pixels=1000)
    assert len(tight.skipped_files) == len(dataset.skipped_files)
    with pytest.raises(Exception, match="no readable training image"):
        data.load_image_folder(str(tmp_path), 8, 30, max_image_pixels=400)


def _suffixes() -> dict:
    return {
        n: {"JPEG": "jpg", "WEBP": "webp"}.get(fmt, fmt.lower())
        for n, (_, (fmt, *_)) in BOMBS.items()
    }


def test_predict_names_the_one_bomb_and_predicts_the_rest(exported, tmp_path):
    base, _ = exported
    files = []
    for i, blob in enumerate(_good()[:3]):
        files.append(tmp_path / f"good_{i}.img")
        files[-1].write_bytes(blob)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(BOMBS["png"][0])
    files.insert(1, bomb)
    store = FakeModelStore("m", base)
    for predictor in (LocalPredictor(base), None):
        if predictor is None:
            server = FakeRestServer(store).start()
            predictor = RestPredictor(server.url, "m", timeout=30)
        results = predict_files(predictor, [str(f) for f in files], batch_size=8)
        assert [r.error is None for r in results] == [True, False, True, True]
        assert results[1].error.startswith("PNG too large to decode safely: 20000x20000 pixels")
        assert LIMIT in results[1].error
    server.stop()
    assert store.predict_calls == 1  # the bomb was never sent: one batch of the three others


def test_max_image_pixels_flag_is_checked(capsys):
    code = cli.main(["train", "--max_image_pixels=0"])
    err = capsys.readouterr().err
    assert code == 2 and "--max_image_pixels must be at least 1, got 0" in err
    assert len(err.strip().splitlines()) == 1


def test_gif_walk_gives_up_on_a_file_crafted_to_make_the_check_slow(exported):
    _, serve = exported
    blob = bytearray(bombs.animation("GIF", 1, (4, 4)))
    # 30,000 one-byte sub-blocks of a comment extension, before the trailer: a walk that
    # followed them one by one would take seconds; it stops and refuses instead.
    comment = b"\x21\xfe" + b"\x01x" * 30_000 + b"\x00"
    blob[-1:-1] = comment
    assert blob[-1] == 0x3B
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 100 frames"):
        serve(image_bytes=tf.constant([bytes(blob)]))
    assert time.perf_counter() - start < 5.0


def test_a_server_refusal_of_a_mixed_batch_still_names_the_one_file(exported, tmp_path):
    base, _ = exported
    files = [tmp_path / f"good_{i}.img" for i in range(3)]
    for path, blob in zip(files, _good()):
        path.write_bytes(blob)
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(BOMBS["gif_descriptor"][0])
    files.insert(2, bomb)
    store = FakeModelStore("m", base)
    with FakeRestServer(store) as server:
        predictor = RestPredictor(server.url, "m", timeout=30)
        # A client that believes the server allows more sends the bomb: the server refuses
        # the whole batch (HTTP 400), the retry file by file names the bomb only.
        results = predict_files(predictor, [str(f) for f in files], max_image_pixels=10**12)
        assert [r.error is None for r in results] == [True, True, False, True]
        assert "image 1 of 1 in the request is too large to decode safely: 60000x60000" in (
            results[2].error
        )
        assert store.batch_sizes[0] == 4  # the mixed batch went out and failed as a whole
        # A client told a lower limit refuses more, itself.
        tight = predict_files(predictor, [str(files[0])], max_image_pixels=100)
        assert "limit 100 pixels" in tight[0].error
