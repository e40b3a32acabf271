"""Every backbone in the table builds (random weights, small input) and classifies."""

import numpy as np
import pytest

from tf_finetune import backbones
from tf_finetune import model as model_lib

# The smallest member of each family runs in the quick suite (nasnet_mobile aside: ~10 s).
# The rest cost seconds to tens of seconds each to build even at 32 px: slow, run in CI.
QUICK = {
    "digits_cnn",
    "mobilenet",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "resnet50",
    "resnet50_v2",
    "densenet121",
    "inception_v3",
    "xception",
    "vgg16",
    "efficientnet_b0",
    "efficientnetv2_b0",
    "convnext_tiny",
}
# Big ones: building proves the table entry; running them too would double the cost.
BUILD_ONLY = {
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
    [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in backbones.BACKBONES],
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
    if name in BUILD_ONLY:
        return
    # A direct call: the same outputs as predict() without tracing a predict function.
    pixels = np.full((2, size, size, 3), 127.0, "float32")
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_table_preprocessing_agrees_with_keras_preprocess_input():
    import keras

    pixels = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3)).astype("float32")
    for name, family in [
        ("mobilenet_v2", "mobilenet_v2"),  # tf: [-1, 1]
        ("resnet50", "resnet50"),  # caffe: BGR, mean subtracted
        ("densenet121", "densenet"),  # torch: [0, 1], ImageNet mean and std
        ("efficientnet_b0", "efficientnet"),  # none: the model rescales inside
    ]:
        ours = backbones.Preprocessing(backbones.get_spec(name).preprocessing)(pixels)
        theirs = getattr(keras.applications, family).preprocess_input(pixels.copy())
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-3)
