"""Every backbone in the table builds (random weights, small input) and classifies."""

import numpy as np
import pytest

from tf_finetune import backbones
from tf_finetune import model as model_lib

# Big ones cost seconds each to build even at 32 px; still run in CI.
SLOW = {
    "nasnet_large",
    "efficientnet_b7",
    "efficientnet_b6",
    "efficientnetv2_l",
    "efficientnetv2_m",
    "convnext_xlarge",
    "convnext_large",
    "inception_resnet_v2",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in backbones.BACKBONES],
)
def test_every_backbone_builds_and_predicts(name):
    spec = backbones.get_spec(name)
    size = max(spec.min_size, 32)
    model = model_lib.build_classifier(
        spec, num_classes=3, image_size=size, weights=None, dropout=0.1
    )
    assert not model_lib.get_backbone(model).trainable
    assert [w.path for w in model.trainable_weights] == ["predictions/kernel", "predictions/bias"]
    assert model.output_shape == (None, 3)
    if name in SLOW:
        return  # building proves the table entry; running it too would double the cost
    probabilities = model.predict(np.full((2, size, size, 3), 127.0, "float32"), verbose=0)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "mode, pixel, expected",
    [
        ("tf", [0.0, 127.5, 255.0], [-1.0, 0.0, 1.0]),
        (
            "torch",
            [255.0, 255.0, 255.0],
            [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
        ),
        ("caffe", [10.0, 20.0, 30.0], [30 - 103.939, 20 - 116.779, 10 - 123.68]),
        ("none", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
    ],
)
def test_preprocessing_matches_keras_applications(mode, pixel, expected):
    out = backbones.Preprocessing(mode)(np.array([[[pixel]]], "float32"))
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], expected, rtol=1e-5, atol=1e-4)


def test_table_preprocessing_agrees_with_keras_preprocess_input():
    import keras

    pixels = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3)).astype("float32")
    for name, family in [
        ("mobilenet_v2", "mobilenet_v2"),
        ("resnet50", "resnet50"),
        ("densenet121", "densenet"),
    ]:
        ours = backbones.Preprocessing(backbones.get_spec(name).preprocessing)(pixels)
        theirs = getattr(keras.applications, family).preprocess_input(pixels.copy())
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-3)
