"""TF Hub backbones through `train_and_evaluate` and the CLI: images and text, offline.

The hub modules are tiny hub-format SavedModels built by tests/hub_fixtures.py.
"""

import json
import os
import shutil
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import hub_fixtures as fx
from tests.helpers import Crash, Epochs, run_python
from tests.images import class_image, encode
from tf_finetune import cli, data, distribute, evaluate_run, hub_model, rundir, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.errors import UserError
from tf_finetune.resolve import resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_modules")
    return {
        "bn": fx.save_batchnorm_module(root / "bn"),
        "vector": fx.save_feature_vector_module(root / "vector"),
        "dynamic": fx.save_feature_vector_module(root / "dynamic", image_size=None),
        "logits": fx.save_feature_vector_module(root / "logits", output="logits"),
        "text": fx.save_text_module(root / "text"),
        "bert_pre": fx.save_bert_preprocessor(root / "bert_pre"),
        "bert": fx.save_bert_encoder(root / "bert"),
    }


CAT = ["the cat sat on the mat", "the cat sat", "cat on the mat", "the mat cat"]
DOG = ["dog ran fast", "the dog ran", "fast dog", "dog ran on"]


def _rows(n_per_class, offset=0):
    rows = []
    for i in range(n_per_class):
        rows.append((f"{CAT[i % 4]} {'the ' * ((i + offset) % 3)}".strip(), "cat"))
        rows.append((f"{DOG[i % 4]} {'fast ' * ((i + offset) % 3)}".strip(), "dog"))
    return rows


def _write_table(path, rows, delimiter=",", header=("text", "label")):
    lines = [delimiter.join(header)] + [delimiter.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(model_dir, **overrides) -> Config:
    values = dict(
        epochs=2,
        batch_size=8,
        learning_rate=0.05,
        dropout=0.0,
        model_dir=str(model_dir),
    )
    values.update(overrides)
    return resolve(Config(**values), frozenset(values))


class Watch(keras.callbacks.Callback):
    """Keeps the backbone's variable values at the start and end of fit, and the model."""

    def on_train_begin(self, logs=None):
        self.before = _values(hub_model.get_backbone(self.model))

    def on_train_end(self, logs=None):
        self.after = _values(hub_model.get_backbone(self.model))


def _values(layer):
    return {w.name: np.array(w) for w in layer.weights}


def _changed(before, after):
    return {k for k in before if not np.array_equal(before[k], after[k])}


# ----------------------------------------------------------------------------- config
def test_image_size_comes_from_the_module_and_a_mismatch_is_one_line(modules, folder, tmp_path):
    config = config_for(tmp_path, backbone=modules["bn"], data=str(folder))
    assert config.image_size == fx.IMAGE_SIZE and config.unfreeze == "0"
    with pytest.raises(UserError, match=r"takes 16x16 images; use --image_size=16"):
        config_for(tmp_path, backbone=modules["bn"], data=str(folder), image_size=32)
    dynamic = config_for(tmp_path, backbone=modules["dynamic"], data=str(folder))
    assert dynamic.image_size == hub_model.DEFAULT_IMAGE_SIZE
    assert config_for(tmp_path, backbone=modules["dynamic"], image_size=24).image_size == 24


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"unfreeze": "3"}, "a hub module is a single layer"),
        ({"weights": "none"}, "brings its own weights"),
        ({"backbone_alpha": 0.5}, "--backbone_alpha only applies"),
        ({"preprocessor": "PRE"}, "drop --preprocessor"),
    ],
)
def test_hub_flag_mistakes(modules, tmp_path, overrides, message):
    overrides = {k: modules["bert_pre"] if v == "PRE" else v for k, v in overrides.items()}
    with pytest.raises(UserError, match=message):
        config_for(tmp_path, backbone=modules["bn"], **overrides)


def test_encoder_without_preprocessor_and_text_module_with_image_size(modules, tmp_path):
    with pytest.raises(UserError, match="--preprocessor=<handle>"):
        config_for(tmp_path, backbone=modules["bert"])
    with pytest.raises(UserError, match="--image_size does not apply"):
        config_for(tmp_path, backbone=modules["text"], image_size=16)
    with pytest.raises(UserError, match="--preprocessor only applies to a TF Hub"):
        config_for(tmp_path, backbone="digits_cnn", preprocessor=modules["bert_pre"])


def test_signature_is_read_without_loading(modules):
    # Reading must not initialise TensorFlow's devices (it runs before --cpu_replicas applies);
    # here we check what it reads.
    assert hub_model.read_signature(modules["bn"]).image_size == fx.IMAGE_SIZE
    assert hub_model.read_signature(modules["dynamic"]).image_size is None
    assert hub_model.read_signature(modules["text"]).takes_text
    assert hub_model.read_signature(modules["bert"]).takes_dict
    assert hub_model.unseeded_random_ops(modules["bert"])  # the encoder's dropout
    assert hub_model.unseeded_random_ops(modules["bn"]) == []


# ----------------------------------------------------------------------------- images
@pytest.mark.slow
def test_frozen_hub_module_is_unchanged_by_training(modules, folder, tmp_path):
    watch = Watch()
    # --cache=none: fit on pixels through the frozen module (the feature cache would only
    # train the head, see test_cli_trains_a_hub_image_backbone).
    config = config_for(tmp_path, backbone=modules["bn"], data=str(folder), epochs=3, cache="none")
    metrics = train.train_and_evaluate(config, extra_callbacks=(watch,))
    assert _changed(watch.before, watch.after) == set()  # kernels and moving statistics
    assert len(watch.before) == 5
    assert metrics["val_accuracy"] > 0.6  # the head alone learns three solid colours
    assert os.path.exists(tmp_path / "confusion_matrix_val.png")


@pytest.mark.slow
def test_finetuned_hub_module_changes_under_two_replicas(modules, folder, tmp_path):
    watch = Watch()
    config = config_for(
        tmp_path, backbone=modules["bn"], data=str(folder), unfreeze="all", cpu_replicas=2
    )
    metrics = train.train_and_evaluate(config, extra_callbacks=(watch,))
    assert metrics["replicas"] == 2
    # Trainable variables and (training=True) the moving statistics all move.
    assert _changed(watch.before, watch.after) == set(watch.before)
    backbone = hub_model.get_backbone(watch.model)
    assert sorted(w.name for w in backbone.trainable_weights) == [
        "bn_beta",
        "bn_gamma",
        "conv_kernel",
    ]
    assert type(backbone.module.variables[0]).__name__ == "MirroredVariable"


@pytest.mark.slow
def test_frozen_under_two_replicas(modules, folder, tmp_path):
    watch = Watch()
    config = config_for(
        tmp_path, backbone=modules["vector"], data=str(folder), cpu_replicas=2, cache="none"
    )
    metrics = train.train_and_evaluate(config, extra_callbacks=(watch,))
    assert metrics["replicas"] == 2 and _changed(watch.before, watch.after) == set()


@pytest.mark.slow
def test_finetuned_hub_run_resumes_and_restores_the_best_checkpoint(modules, folder, tmp_path):
    config = config_for(
        tmp_path, backbone=modules["vector"], data=str(folder), unfreeze="all", epochs=3
    )
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(Crash(),))
    epochs, watch = Epochs(), Watch()
    metrics = train.train_and_evaluate(config, extra_callbacks=(epochs, watch))
    assert epochs.seen == [1, 2] and metrics["epochs"] == 3
    # The model evaluated and exported is the best checkpoint, hub weights included.
    fresh = model_lib.build_model(config, 3)
    fresh.load_weights(tmp_path / rundir.BEST_WEIGHTS)
    for a, b in zip(fresh.weights, watch.model.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))


SERVE_IMAGES = r"""
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
blobs = [bytes.fromhex(h) for h in json.loads(sys.argv[2])]
out = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
print("RESULT " + json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
      "names": [[n.decode() for n in row] for row in out["top_k_names"].numpy()]}))
"""

SERVE_TEXT = r"""
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures["serving_default"]
assert set(fn.structured_input_signature[1]) == {"text"}, fn.structured_input_signature
out = fn(text=tf.constant(json.loads(sys.argv[2])))
print("RESULT " + json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
      "names": [[n.decode() for n in row] for row in out["top_k_names"].numpy()],
      "scores": out["top_k_scores"].numpy().tolist()}))
"""


@pytest.mark.slow
def test_image_export_serves_finetuned_hub_weights_without_the_module(modules, folder, tmp_path):
    module = shutil.copytree(modules["bn"], tmp_path / "module")
    watch = Watch()
    config = config_for(
        tmp_path / "run", backbone=str(module), data=str(folder), unfreeze="all", epochs=2
    )
    metrics = train.train_and_evaluate(config, extra_callbacks=(watch,))
    assert _changed(watch.before, watch.after)
    blobs = [encode(class_image(label, (30, 22), seed=7 + label), "PNG") for label in (0, 1, 2)]
    pixels = np.stack([data.decode_and_resize(tf.constant(b), 16).numpy() for b in blobs])
    expected = watch.model.predict(pixels.astype("float32"), verbose=0)
    shutil.rmtree(module)  # the export must not need the hub module (or its cache)
    served = run_python(SERVE_IMAGES, metrics["export_path"], json.dumps([b.hex() for b in blobs]))
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    assert [row[0] for row in served["names"]] == [
        f"class_{i}" for i in np.argmax(expected, axis=1)
    ]


# ----------------------------------------------------------------------------- text
@pytest.mark.slow
@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_text_module_end_to_end_on_a_table_and_export(modules, tmp_path, suffix, delimiter):
    module = shutil.copytree(modules["text"], tmp_path / "module")
    table = _write_table(tmp_path / f"reviews{suffix}", _rows(20), delimiter)
    watch = Watch()
    config = config_for(
        tmp_path / "run",
        backbone=str(module),
        data=str(table),
        unfreeze="all",
        epochs=4,
        learning_rate=0.1,
    )
    assert config.image_size == 0
    metrics = train.train_and_evaluate(config, extra_callbacks=(watch,))
    assert metrics["class_names"] == ["cat", "dog"]
    assert metrics["train_images"] + metrics["val_images"] == 40
    assert metrics["val_accuracy"] >= 0.75  # "cat" and "dog" are in the vocabulary
    assert _changed(watch.before, watch.after) == {"embeddings"}
    run = tmp_path / "run"
    assert (run / "report_val.json").exists() and (run / "mistakes_val.txt").exists()
    assert not (run / "mistakes_val.png").exists()
    texts = ["the cat sat on the mat", "dog ran fast", "a zebra"]
    expected = watch.model.predict(tf.constant(texts), verbose=0)
    shutil.rmtree(module)  # the vocabulary asset travels with the export
    served = run_python(SERVE_TEXT, metrics["export_path"], json.dumps(texts))
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    assert [row[0] for row in served["names"]][:2] == ["cat", "dog"]


@pytest.mark.slow
def test_bert_style_encoder_with_preprocessor_on_a_split_folder(modules, tmp_path):
    source = tmp_path / "reviews"
    source.mkdir()
    _write_table(source / "train.csv", _rows(16))
    _write_table(source / "val.csv", _rows(4, offset=1))
    _write_table(source / "test.tsv", _rows(4, offset=2), "\t")
    watch = Watch()
    config = config_for(
        tmp_path / "run",
        backbone=modules["bert"],
        preprocessor=modules["bert_pre"],
        data=str(source),
        unfreeze="all",
        epochs=3,
    )
    metrics = train.train_and_evaluate(config, extra_callbacks=(watch,))
    assert (metrics["train_images"], metrics["val_images"], metrics["test_images"]) == (32, 8, 8)
    assert _changed(watch.before, watch.after) == {"embeddings", "pooler_kernel"}
    assert "test_accuracy" in metrics
    report = evaluate_run.evaluate_run(config, "test")  # `tf-finetune evaluate` on a text run
    assert report["num_examples"] == 8


@pytest.mark.slow
def test_text_module_on_tfds_imdb_reviews_mock_data(modules, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        config = config_for(
            tmp_path, backbone=modules["text"], data="tfds:imdb_reviews", test_split="test"
        )
        metrics = train.train_and_evaluate(config)
    assert metrics["class_names"] == ["neg", "pos"]
    assert metrics["train_images"] + metrics["val_images"] == 24
    assert metrics["test_images"] == 24 and "test_accuracy" in metrics


def test_tfds_text_features_are_detected_and_named(tmp_path):
    import tensorflow_datasets as tfds

    from tf_finetune import text_data

    with tfds.testing.mock_data(num_examples=6):
        assert text_data.is_text_source(Config(data="tfds:ag_news_subset"))
        assert not text_data.is_text_source(Config(data="tfds:tf_flowers"))
        with pytest.raises(UserError, match="text features are title, description"):
            text_data.load_tfds_text("ag_news_subset", "text", "label", "train", "", "", 20, 0)
        dataset = text_data.load_tfds_text(
            "ag_news_subset", "title,description", "label", "train", "", "test", 20, 0
        )
        assert dataset.num_classes == 4 and dataset.test.count == 6
        texts, labels = next(iter(data.make_pipeline(dataset.test, 4, 6, False, 0)))
        assert texts.dtype == tf.string and labels.shape == (6, 4)


# ----------------------------------------------------------------------------- CSV errors
@pytest.mark.parametrize(
    "content, name, message",
    [
        ("text,label\nthe cat,cat\n,dog\n", "a.csv", r"a\.csv:3: missing text"),
        ("text,label\nthe cat,cat\ndog ran,\n", "a.csv", r"a\.csv:3: missing label"),
        ("text\tlabel\nthe cat\tcat\n", "a.csv", r"a\.csv:1: no column text.*name the file \.tsv"),
        ("text,label\nthe cat,cat\nthe dog\tdog\n", "a.csv", r"a\.csv:3: 1 field.*\.tsv"),
        ("text,label\nthe cat,cat\nthe, dog,dog\n", "a.csv", r"a\.csv:3: 3 field.*quote"),
        ("review,label\nthe cat,cat\n", "a.csv", r"a\.csv:1: no column text.*\['review'"),
        ("text\tlabel\nthe cat\tcat\nthe dog\tcat\n", "a.tsv", "a single label"),
    ],
)
def test_table_mistakes_name_the_line(tmp_path, content, name, message):
    from tf_finetune import text_data

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        text_data.load_table(str(path), "text", "label", 20)


def test_unknown_label_in_val_and_integer_labels(tmp_path):
    from tf_finetune import text_data

    (tmp_path / "train.csv").write_text("text,label\na,10\nb,2\nc,1\n\nd,02\n")
    (tmp_path / "val.csv").write_text('text,label\n"x, y",2\nz,3\n')
    with pytest.raises(UserError, match=r"val\.csv:3: unknown label '3'.*1, 2, 10"):
        text_data.load_table(str(tmp_path), "text", "label", 20)
    (tmp_path / "val.csv").write_text('text,label\n"x, y",2\n')
    dataset = text_data.load_table(str(tmp_path), "text", "label", 20)
    assert dataset.class_names == ("1", "2", "10")  # by value, "02" is class "2"
    texts, labels = zip(*dataset.val.examples().as_numpy_iterator())
    assert texts == (b"x, y",) and labels == (1,)
    assert sorted(y for _, y in dataset.train.examples().as_numpy_iterator()) == [0, 1, 1, 2]


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_trains_a_hub_image_backbone(modules, folder, tmp_path, capsys):
    code = cli.main(
        [
            "train",
            f"--backbone={modules['logits']}",  # a classification module: head on its logits
            f"--data={folder}",
            "--epochs=1",
            "--batch_size=8",
            f"--model_dir={tmp_path}",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Export:" in out and os.path.isdir(tmp_path / "export" / "1")
    assert f"--backbone={modules['logits']}" in (tmp_path / "flags.cfg").read_text()


@pytest.mark.parametrize(
    "backbone, expected",
    [
        ("/no/such/module", "hub module directory /no/such/module does not exist"),
        ("https://tfhub.dev/google/nnlm-en-dim50/2", "TFHUB_CACHE_DIR"),
    ],
)
def test_cli_unreachable_handle_is_one_line(monkeypatch, tmp_path, capsys, backbone, expected):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code = cli.main(["train", f"--backbone={backbone}", f"--model_dir={tmp_path}/run"])
    _, err = capsys.readouterr()
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_text_data_with_an_image_backbone_is_one_line(tmp_path, capsys):
    table = _write_table(tmp_path / "t.csv", _rows(4))
    code = cli.main(
        [
            "train",
            "--backbone=digits_cnn",
            f"--data={table}",
            "--weights=none",
            f"--model_dir={tmp_path}/run",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "is text; pass a TF Hub text module" in err


# ----------------------------------------------------------------------------- distribution
def test_a_last_batch_smaller_than_the_replicas_is_skipped_not_fatal():
    strategy = distribute.make_strategy("auto", 2)
    assert strategy is distribute.make_strategy("auto", 2)  # one strategy per device set
    x = np.random.default_rng(0).random((17, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(17) % 2]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 8, 8, 1: one replica gets none
    ds = distribute.skip_batches_smaller_than(ds, strategy.num_replicas_in_sync, 17, 8)
    assert int(ds.cardinality()) == 2 and [int(b[1].shape[0]) for b in ds] == [8, 8]
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile("sgd", "categorical_crossentropy")
    model.fit(ds, epochs=1, verbose=0)  # without the skip: "Matrix size-incompatible"
    unchanged = tf.data.Dataset.range(10).batch(4)
    assert distribute.skip_batches_smaller_than(unchanged, 2, 10, 4) is unchanged  # last batch: 2


@pytest.mark.parametrize(
    "name", ["flowers_hub_mobilenet_v2.cfg", "imdb_nnlm.cfg", "ag_news_bert.cfg"]
)
def test_hub_presets_parse_and_say_what_to_expect(name):
    path = os.path.join(REPO, "configs", name)
    text = open(path).read()
    assert "# Command: tf-finetune train --flagfile=configs/" + name in text
    assert "Expect:" in text and "Not run here" in text
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["tf-finetune", f"--flagfile={path}"])
    values = {f: cli.FLAGS[f].value for f in Config.__dataclass_fields__}
    cli.FLAGS.unparse_flags()
    config = Config(**values)
    assert hub_model.is_hub_backbone(config.backbone) and config.data.startswith("tfds:")
