"""TF Text preprocessors, ops beyond core TensorFlow, and Kaggle models: offline.

The BERT-style preprocessor fixture is made of TF Text ops (like TF Hub's
bert_en_uncased_preprocess); the CLI runs in fresh subprocesses, so nothing the test process
imported (tensorflow_text included) helps it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests import hub_fixtures as fx
from tf_finetune import cli, hub
from tf_finetune.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFTEXT_OPS = [
    "CaseFoldUTF8",
    "NormalizeUTF8",
    "RegexSplitWithOffsets",
    "WordpieceTokenizeWithOffsets",
]
MADE_UP_OP = "MadeUpOpForTests"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("tftext_modules")
    made_up = fx.save_feature_vector_module(root / "made_up")
    fx.rename_op(made_up, "Relu", MADE_UP_OP)
    return {
        "pre": fx.save_tftext_bert_preprocessor(root / "pre"),
        "bert": fx.save_bert_encoder(root / "bert"),
        "vector": fx.save_feature_vector_module(root / "vector"),
        "made_up": made_up,
    }


def _run(args, *, cwd, env=None, timeout=600):
    """`python -c ...` or `python -m tf_finetune ...` in a fresh interpreter."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def _one_line_error(proc):
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("tf-finetune: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- op analysis
def test_tftext_fixture_needs_the_tftext_ops_and_core_modules_need_none(modules):
    assert hub.non_core_ops(modules["pre"]) == TFTEXT_OPS
    assert hub.non_core_ops(modules["bert"]) == []
    assert hub.missing_ops(modules["pre"]) == []  # tensorflow_text is installed
    assert hub.missing_ops(modules["made_up"]) == [MADE_UP_OP]
    assert {hub.op_provider(op) for op in TFTEXT_OPS} == {"tensorflow-text"}
    assert hub.op_provider("SentencepieceOp") == "tensorflow-text"
    assert hub.op_provider("Relu") is None and hub.op_provider(MADE_UP_OP) is None


def test_made_up_op_is_one_line_naming_it(modules):
    with pytest.raises(UserError) as info:
        hub.load_module(modules["made_up"])
    message = str(info.value)
    assert MADE_UP_OP in message and "an op library not installed here" in message
    assert "\n" not in message and "download" not in message


def test_op_of_a_known_package_that_its_release_lacks(modules, tmp_path):
    module = fx.rename_op(
        shutil.copytree(modules["pre"], tmp_path / "pre"), "CaseFoldUTF8", "TFText>NotARealOp"
    )
    with pytest.raises(UserError, match=r"'TFText>NotARealOp'.*tensorflow-text.*does not register"):
        hub.check_ops(module)


def test_cli_made_up_op_in_the_backbone_is_one_line(modules, tmp_path, capsys):
    photos = tmp_path / "photos"
    for name in ("a", "b"):
        (photos / name).mkdir(parents=True)
    code = cli.main(
        [
            "train",
            f"--backbone={modules['made_up']}",
            f"--data={photos}",
            f"--model_dir={tmp_path}/r",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert MADE_UP_OP in err and "an op library not installed here" in err


@pytest.mark.slow
def test_tftext_missing_is_one_line_in_a_fresh_cli(modules, tmp_path):
    """The issue's case: tensorflow_text cannot be imported -> one line naming CaseFoldUTF8."""
    table = tmp_path / "t.csv"
    table.write_text("text,label\nthe cat,cat\nthe dog,dog\n")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow_text"] = None  # as if tensorflow-text were not importable
        from tf_finetune import cli
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    proc = _run(
        [
            "-c",
            script,
            "train",
            f"--backbone={modules['bert']}",
            f"--preprocessor={modules['pre']}",
            f"--data={table}",
            f"--model_dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    line = _one_line_error(proc)
    assert "'CaseFoldUTF8'" in line and "tensorflow-text" in line, line
    assert "--preprocessor=" in line and "download" not in line


# ----------------------------------------------------------------------------- end to end
CAT = ["the cat sat on the mat", "the cat sat", "cat on the mat", "the mat cat"]
DOG = ["dog ran fast", "the dog ran", "fast dog", "dog ran on"]

SERVE = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  what any server of this export needs (docs/serving.md)
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = fn(text=tf.constant(json.loads(sys.argv[2])))
print("RESULT " + json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
      "names": [[n.decode() for n in row] for row in out["top_k_names"].numpy()]}))
"""


@pytest.mark.slow
def test_tftext_preprocessor_trains_exports_and_serves_without_the_fixtures(modules, tmp_path):
    pre = shutil.copytree(modules["pre"], tmp_path / "pre")
    bert = shutil.copytree(modules["bert"], tmp_path / "bert")
    rows = [(f"{CAT[i % 4]}{' the' * (i % 3)}", "cat") for i in range(16)]
    rows += [(f"{DOG[i % 4]}{' fast' * (i % 3)}", "dog") for i in range(16)]
    table = tmp_path / "reviews.csv"
    table.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    run = tmp_path / "run"
    proc = _run(
        [
            "-m",
            "tf_finetune",
            "train",
            f"--backbone={bert}",
            f"--preprocessor={pre}",
            f"--data={table}",
            "--unfreeze=all",
            "--epochs=3",
            "--batch_size=8",
            "--learning_rate=0.05",
            "--dropout=0",
            f"--model_dir={run}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "beyond core TensorFlow" in proc.stderr and "CaseFoldUTF8" in proc.stderr
    export = run / "export" / "1"
    card = json.loads((export / "model_card.json").read_text())
    assert card["non_core_ops"] == TFTEXT_OPS

    shutil.rmtree(pre)
    shutil.rmtree(bert)  # the export carries the vocabulary and the fine-tuned weights
    texts = ["the cat sat on the mat", "dog ran fast", "zebra"]
    proc = _run(["-c", SERVE, str(export), json.dumps(texts)], cwd="/")
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    probabilities = np.array(served["probabilities"])
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [row[0] for row in served["names"]][:2] == ["cat", "dog"]

    # `tf-finetune predict` in yet another fresh process registers the TF Text ops itself.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.txt").write_text("the cat sat on the mat")
    proc = _run(
        ["-m", "tf_finetune", "predict", f"--model={export}", "--json", str(inputs)], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '"cat"' in proc.stdout


# ----------------------------------------------------------------------------- Kaggle
KAGGLE_HANDLE = "google/tiny-vector/tensorFlow2/16-feature-vector/3"
KAGGLE_URLS = [
    "https://www.kaggle.com/models/google/tiny-vector/TensorFlow2/16-feature-vector/3",
    "https://www.kaggle.com/models/Google/tiny-vector/frameworks/tensorFlow2/"
    "variations/16-feature-vector/versions/3",
    "google/tiny-vector/TENSORFLOW2/16-feature-vector/3",
]


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails (and is counted): a versioned cached model needs none."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def kaggle_cache(monkeypatch, tmp_path, modules):
    """A kagglehub cache holding KAGGLE_HANDLE, laid out as kagglehub 1.0 writes it."""
    cache = tmp_path / "kagglehub"
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    base = cache / "models" / "google" / "tiny-vector" / "tensorFlow2" / "16-feature-vector"
    shutil.copytree(modules["vector"], base / "3")
    (base / "3.complete").touch()
    return base


@pytest.mark.parametrize("name", KAGGLE_URLS)
def test_kaggle_forms_map_to_one_handle(name):
    assert hub.is_hub_handle(name)
    if name.startswith("https://"):
        assert hub.kaggle_url_to_handle(name) == KAGGLE_HANDLE
    else:
        assert hub.is_kaggle_handle(name)
        assert hub.normalize_kaggle_handle(name) == KAGGLE_HANDLE


def test_kaggle_handle_needs_a_known_framework():
    assert hub.is_kaggle_handle("google/tiny-vector/tensorFlow2/16-feature-vector")
    assert not hub.is_kaggle_handle("runs/a/b/c")
    assert not hub.is_kaggle_handle("google/tiny/tensorFlow2/v/latest")


@pytest.mark.parametrize("name", KAGGLE_URLS)
def test_kaggle_model_resolves_from_a_prefilled_cache_offline(name, kaggle_cache, no_network):
    assert hub.resolve_handle(name) == str(kaggle_cache / "3")
    module = hub.load_module(name)
    images = np.zeros((2, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3), "float32")
    assert module(tf.constant(images)).shape == (2, fx.FEATURE_DIM)
    assert not no_network


def test_the_cache_layout_is_the_one_kagglehub_reads(kaggle_cache, no_network):
    import kagglehub

    assert kagglehub.model_download(KAGGLE_HANDLE) == str(kaggle_cache / "3")
    assert not no_network


def test_kaggle_offline_not_cached_says_how_to_predownload(kaggle_cache, no_network):
    (kaggle_cache / "3.complete").unlink()  # an unfinished download is not a cached model
    with pytest.raises(UserError) as info:
        hub.resolve_handle(KAGGLE_URLS[0])
    message = str(info.value)
    assert str(kaggle_cache.parents[4]) in message and "KAGGLEHUB_CACHE" in message
    assert f"kagglehub.model_download('{KAGGLE_HANDLE}')" in message
    assert "\n" not in message


def test_kaggle_unversioned_offline_says_to_pin_a_version(kaggle_cache, no_network):
    with pytest.raises(UserError) as info:
        hub.resolve_handle(KAGGLE_HANDLE.rsplit("/", 1)[0])
    message = str(info.value)
    assert "pin a version" in message and f"{KAGGLE_HANDLE}" in message
    assert "cached here: version 3" in message and "\n" not in message


def test_cli_kaggle_url_offline_is_one_line(monkeypatch, tmp_path, capsys, no_network):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    code = cli.main(["train", f"--backbone={KAGGLE_URLS[0]}", f"--model_dir={tmp_path}/run"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "kagglehub") in err and "kagglehub.model_download(" in err


def test_predict_on_an_export_needing_an_unknown_op_is_one_line(modules):
    from tf_finetune.serving import LocalPredictor

    with pytest.raises(UserError) as info:
        LocalPredictor(modules["made_up"])
    message = str(info.value)
    assert message.startswith("--model ") and MADE_UP_OP in message and "\n" not in message
