"""Every preset in configs/ runs end to end with --smoke, offline.

Each source is made reachable where a user's machine would keep it: Keras Applications weights
under their cache names in a fresh KERAS_HOME (random weights of the right shapes: no real file
exists here), TF Hub modules in TFHUB_CACHE_DIR at the handle's cache folder (modules built by
tests/hub_fixtures.py from the same kinds of ops as the real ones), keras-hub presets in
KAGGLEHUB_CACHE at their handle's folder (tiny keras-hub models of tests/keras_hub_fixtures.py),
TFDS via mock_data (in tests/smoke_driver.py). The presets on ../shared use its real photos and weights.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import hub_fixtures, keras_hub_fixtures
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.cfg"))

# The Keras Applications weights the presets ask for, by file name in $KERAS_HOME/models.
KERAS_WEIGHTS = {
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5": ("MobileNetV2", {}),
    "efficientnetb0_notop.h5": ("EfficientNetB0", {}),
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": ("ResNet50", {}),
}


def _flags(config: pathlib.Path) -> dict[str, str]:
    flags = {}
    for line in config.read_text().splitlines():
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            flags[name] = value
    return flags


def _place_keras_weights(keras_home: pathlib.Path) -> None:
    import h5py
    import keras

    # keras.src: the legacy .h5 weights layout keras.applications loads has no public writer.
    from keras.src.legacy.saving import legacy_h5_format

    models = keras_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name, (constructor, kwargs) in KERAS_WEIGHTS.items():
        model = getattr(keras.applications, constructor)(
            include_top=False, weights=None, input_shape=(32, 32, 3), **kwargs
        )
        with h5py.File(models / name, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)


def _place_hub_module(cache: pathlib.Path, handle: str, kind: str) -> None:
    folder = cache / hashlib.sha1(handle.encode("utf8")).hexdigest()
    if folder.exists():
        return
    if kind == "image":
        hub_fixtures.save_feature_vector_module(folder, image_size=224)
    elif kind == "text":
        hub_fixtures.save_text_module(folder)
    elif kind == "preprocessor":
        hub_fixtures.save_bert_preprocessor(folder)
    else:
        hub_fixtures.save_bert_encoder(folder)


def _place_keras_hub_preset(cache: pathlib.Path, backbone: str, scratch: pathlib.Path) -> None:
    """A tiny stand-in of the named preset where kagglehub caches the real one."""
    from tf_finetune.keras_hub_table import PRESETS, preset_of

    preset = PRESETS[preset_of(backbone)]
    folder = scratch / preset.name
    if preset.kind == "image":  # at the real converter's size, as --image_size defaults to it
        keras_hub_fixtures.save_image_preset(folder, image_size=preset.image_size)
    else:
        keras_hub_fixtures.save_text_preset(folder)
    keras_hub_fixtures.place_in_kaggle_cache(cache, preset.kaggle_handle, folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A KERAS_HOME, a TFHUB_CACHE_DIR and a KAGGLEHUB_CACHE holding what the presets need."""
    root = tmp_path_factory.mktemp("sources")
    _place_keras_weights(root / "keras")
    cache = root / "tfhub"
    for config in CONFIGS:
        flags = _flags(config)
        backbone = flags.get("backbone", "")
        if backbone.startswith("https://"):
            kind = "encoder" if "preprocessor" in flags else "text"
            kind = "image" if "imagenet" in backbone else kind
            _place_hub_module(cache, backbone, kind)
        if flags.get("preprocessor"):
            _place_hub_module(cache, flags["preprocessor"], "preprocessor")
        if backbone.startswith("keras_hub:"):
            _place_keras_hub_preset(root / "kaggle", backbone, root / "keras_hub")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_preset_runs_with_smoke(config, sources, tmp_path, request):
    if "../shared" in config.read_text() or "flowers128_shared" in config.read_text():
        request.getfixturevalue("shared_dir")  # skips on a user's clone, fails in CI
    env = {
        **os.environ,
        "KERAS_HOME": str(sources / "keras"),
        "TFHUB_CACHE_DIR": str(sources / "tfhub"),
        "KAGGLEHUB_CACHE": str(sources / "kaggle"),
        "PYTHONPATH": str(REPO),
    }
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "tests/smoke_driver.py", str(config.relative_to(REPO)), str(run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["train_images"] <= 16 and 0 < metrics["val_images"] <= 8
    assert metrics["export_path"] and os.path.isdir(metrics["export_path"])
    flags = (run / "flags.cfg").read_text()
    assert "--smoke" in flags.splitlines()
