"""Real ImageNet weights and real photos from ../shared (skipped on a user's clone)."""

import os
import shutil

import numpy as np
import pytest

from tf_finetune import backbones, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config
from tf_finetune.resolve import resolve

WEIGHTS_035 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def _backbone_values(weights, size):
    spec = backbones.get_spec("mobilenet_v2")
    model = model_lib.build_classifier(spec, 5, size, weights, 0.0, alpha=0.35)
    return [np.array(w) for w in model_lib.get_backbone(model).weights]


def test_imagenet_weights_load_from_the_keras_cache_and_from_a_path(shared_dir):
    source = shared_dir / "weights" / "keras" / WEIGHTS_035
    cache = backbones.keras_cache_dir()
    os.makedirs(cache, exist_ok=True)
    shutil.copy(source, os.path.join(cache, WEIGHTS_035))  # what a finished download leaves
    from_cache = _backbone_values("imagenet", 224)
    from_path = _backbone_values(str(source), 128)  # a path loads at any input size
    random = _backbone_values(None, 224)
    assert len(from_cache) == len(from_path) == 260
    for a, b in zip(from_cache, from_path):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(from_cache[0], random[0])


@pytest.mark.slow
def test_short_run_on_real_flowers_beats_chance_by_far(shared_dir, tmp_path):
    config = resolve(
        Config(
            data=str(shared_dir / "data" / "flowers_128"),
            backbone="mobilenet_v2",
            backbone_alpha=0.35,
            weights=str(shared_dir / "weights" / "keras" / WEIGHTS_035),
            image_size=128,
            epochs=2,
            model_dir=str(tmp_path / "run"),
        )
    )
    metrics = train.train_and_evaluate(config)
    assert metrics["class_names"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert metrics["train_images"] + metrics["val_images"] == 4317
    assert 0.15 < metrics["val_images"] / 4317 < 0.25
    assert metrics["val_accuracy"] > 0.6, metrics  # chance is 0.2
    assert os.path.exists(os.path.join(metrics["export_path"], "saved_model.pb"))
