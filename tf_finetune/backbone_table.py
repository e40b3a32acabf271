"""The backbone table without TensorFlow: names, constructors (by name), preprocessing, sizes.

`tf-finetune backbones` and flag checks read it before TensorFlow is imported (importing it
costs seconds); `tf_finetune.backbones` builds the models and re-exports everything here.
"""

import dataclasses
import difflib
import os

from tf_finetune.errors import UserError
from tf_finetune.keras_hub_table import is_keras_hub_backbone

# How `keras.applications.<family>.preprocess_input` scales raw 0-255 RGB pixels.
#   tf:    x / 127.5 - 1                       (MobileNet, Inception, Xception, NASNet, ResNetV2)
#   torch: (x / 255 - ImageNet mean) / std     (DenseNet)
#   caffe: RGB->BGR, minus ImageNet BGR mean  (ResNet v1, VGG)
#   none:  the model scales its own inputs   (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3)
PREPROCESSING_MODES = ("tf", "torch", "caffe", "none")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it."""

    name: str
    constructor: str  # attribute of keras.applications, or "digits_cnn" (ours)
    preprocessing: str  # one of PREPROCESSING_MODES
    default_size: int
    min_size: int = 32
    has_alpha: bool = False  # accepts a MobileNet width multiplier
    # Extra keyword arguments for the constructor (e.g. keep preprocessing inside the model).
    kwargs: tuple[tuple[str, object], ...] = ()


def _table() -> dict[str, BackboneSpec]:
    specs = [
        BackboneSpec("mobilenet", "MobileNet", "tf", 224, has_alpha=True),
        BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 224, has_alpha=True),
        BackboneSpec(
            "mobilenet_v3_small",
            "MobileNetV3Small",
            "none",
            224,
            has_alpha=True,
            kwargs=(("include_preprocessing", True),),
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            "MobileNetV3Large",
            "none",
            224,
            has_alpha=True,
            kwargs=(("include_preprocessing", True),),
        ),
        BackboneSpec("resnet50", "ResNet50", "caffe", 224),
        BackboneSpec("resnet101", "ResNet101", "caffe", 224),
        BackboneSpec("resnet152", "ResNet152", "caffe", 224),
        BackboneSpec("resnet50_v2", "ResNet50V2", "tf", 224),
        BackboneSpec("resnet101_v2", "ResNet101V2", "tf", 224),
        BackboneSpec("resnet152_v2", "ResNet152V2", "tf", 224),
        BackboneSpec("densenet121", "DenseNet121", "torch", 224),
        BackboneSpec("densenet169", "DenseNet169", "torch", 224),
        BackboneSpec("densenet201", "DenseNet201", "torch", 224),
        BackboneSpec("inception_v3", "InceptionV3", "tf", 299, min_size=75),
        BackboneSpec("inception_resnet_v2", "InceptionResNetV2", "tf", 299, min_size=75),
        BackboneSpec("xception", "Xception", "tf", 299, min_size=71),
        BackboneSpec("nasnet_mobile", "NASNetMobile", "tf", 224),
        BackboneSpec("nasnet_large", "NASNetLarge", "tf", 331),
        BackboneSpec("vgg16", "VGG16", "caffe", 224),
        BackboneSpec("vgg19", "VGG19", "caffe", 224),
    ]
    for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600)):
        specs.append(BackboneSpec(f"efficientnet_b{i}", f"EfficientNetB{i}", "none", size))
    for suffix, size in (("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300), ("s", 384)):
        specs.append(
            BackboneSpec(
                f"efficientnetv2_{suffix}",
                f"EfficientNetV2{suffix.upper()}",
                "none",
                size,
                kwargs=(("include_preprocessing", True),),
            )
        )
    for suffix in ("m", "l"):
        specs.append(
            BackboneSpec(
                f"efficientnetv2_{suffix}",
                f"EfficientNetV2{suffix.upper()}",
                "none",
                480,
                kwargs=(("include_preprocessing", True),),
            )
        )
    for size, constructor in (
        ("tiny", "ConvNeXtTiny"),
        ("small", "ConvNeXtSmall"),
        ("base", "ConvNeXtBase"),
        ("large", "ConvNeXtLarge"),
        ("xlarge", "ConvNeXtXLarge"),
    ):
        specs.append(
            BackboneSpec(
                f"convnext_{size}",
                constructor,
                "none",
                224,
                kwargs=(("include_preprocessing", True),),
            )
        )
    # Ours: a small CNN pretrained offline on the digits 0-4 (see tf_finetune/digits.py).
    specs.append(BackboneSpec("digits_cnn", "digits_cnn", "tf", 32, min_size=8))
    return {s.name: s for s in specs}


BACKBONES: dict[str, BackboneSpec] = _table()


_HUB_PREFIXES = ("gs://", "http://", "https://", "/", ".", "~")


def is_hub_backbone(backbone: str) -> bool:
    """True when `--backbone` names a TF Hub module (a URL, a gs:// path, or a folder holding a
    SavedModel) rather than a Keras Applications model: those names never contain a `/`.
    A `keras_hub:` preset is neither (keras_hub_model.py), even when it names a folder."""
    if is_keras_hub_backbone(backbone):
        return False
    return (
        backbone.startswith(_HUB_PREFIXES)
        or os.sep in backbone
        or os.path.isfile(os.path.join(os.path.expanduser(backbone), "saved_model.pb"))
    )


def get_spec(name: str) -> BackboneSpec:
    """Returns the table entry for `name`, or a UserError listing the close matches."""
    try:
        return BACKBONES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(BACKBONES), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown --backbone={name!r}.{hint} Run 'tf-finetune backbones' for the full list,"
            " or pass a TF Hub handle."
        ) from None
