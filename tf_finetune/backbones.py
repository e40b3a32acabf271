"""The table of backbones: name -> constructor, preprocessing and default input size.

Preprocessing facts live with the weights (as in timm's `_cfg`): each entry says how the
raw 0-255 pixels must be scaled for the weights it was trained with, so the model can take
raw pixels and do the scaling inside its own graph (and so does the export).
"""

import dataclasses
import difflib
import os
from collections.abc import Callable

import keras

from tf_finetune import digits
from tf_finetune.errors import UserError

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


def build_backbone(
    spec: BackboneSpec, image_size: int, weights: str | None, alpha: float = 1.0
) -> keras.Model:
    """Builds the backbone without its classification top.

    Args:
      spec: the table entry.
      image_size: square input size in pixels.
      weights: "imagenet" (the pretrained weights; for keras.applications this downloads
        them into the Keras cache on first use), None (random init) or a path to a weights file.
      alpha: MobileNet width multiplier (only for backbones with `has_alpha`).

    Returns:
      A functional model from (image_size, image_size, 3) preprocessed pixels to a feature map.
    """
    if spec.constructor == "digits_cnn":
        if weights == "imagenet":
            weights = digits_weights_file()
            if not os.path.exists(weights):
                raise UserError(
                    f"digits_cnn has no pretrained weights at {weights}: run the offline default "
                    "(tf-finetune train with no --data) once, or pass --weights=none."
                )
        return digits.build_digits_backbone(image_size, weights)
    kwargs = dict(spec.kwargs)
    if spec.has_alpha:
        kwargs["alpha"] = alpha
    constructor: Callable[..., keras.Model] = getattr(keras.applications, spec.constructor)
    try:
        return constructor(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            **kwargs,
        )
    except ValueError as e:
        # keras.applications raises ValueError for unsupported alpha/size/weights combinations.
        raise UserError(f"cannot build {spec.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - download failures come in many types
        if weights == "imagenet":
            raise UserError(
                f"could not get the ImageNet weights for {spec.name} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Offline? Put the weights file in "
                f"{keras_cache_dir()} (Keras' cache, set by KERAS_HOME) or pass --weights=<path>."
            ) from None
        raise


def keras_home() -> str:
    """Keras' cache folder ($KERAS_HOME, default ~/.keras)."""
    # keras.src: Keras has no public accessor for the folder it caches weights in itself.
    from keras.src.backend import config as keras_config

    return keras_config.keras_home()


def keras_cache_dir() -> str:
    """Where keras.applications looks for (and downloads) weights files."""
    return os.path.join(keras_home(), "models")


def digits_weights_file() -> str:
    """Where digits_cnn's pretrained ("imagenet") weights are cached (offline_default.py)."""
    return os.path.join(keras_cache_dir(), digits.WEIGHTS_FILE)


@keras.saving.register_keras_serializable(package="tf_finetune")
class Preprocessing(keras.layers.Layer):
    """Scales raw 0-255 RGB pixels the way the backbone's weights expect.

    Lives inside the model so training, evaluation and every export take raw pixels.
    """

    _MEAN = (0.485, 0.456, 0.406)
    _STD = (0.229, 0.224, 0.225)
    _CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = keras.ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor(self._MEAN, self.compute_dtype)
            std = keras.ops.convert_to_tensor(self._STD, self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = keras.ops.convert_to_tensor(self._CAFFE_BGR_MEAN, self.compute_dtype)
            return keras.ops.flip(x, axis=-1) - mean
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
