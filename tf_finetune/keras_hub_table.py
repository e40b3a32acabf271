"""keras-hub presets without keras-hub: the `keras_hub:` prefix and the presets we list.

`tf-finetune backbones` and the flag checks read this before TensorFlow is imported (importing
keras_hub costs ~4-6 s). The table is static on purpose: it names the image and text presets
whose architectures tf-finetune has run end to end (tiny configs of the same classes in
tests/test_keras_hub.py: frozen, fine-tuned, cached features, exported); the real weights are
downloaded (once, into kagglehub's cache) only when a run names one.
"""

import dataclasses

PREFIX = "keras_hub:"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One keras-hub preset tf-finetune lists."""

    name: str
    kind: str  # image or text
    kaggle_handle: str  # owner/model/framework/variation/version (kagglehub's cache layout)
    image_size: int  # the image converter's size (0 for text)
    fixed_size: bool  # True: the model takes only image_size (ViT position embeddings)
    parameters: str


def _image(name: str, model: str, version: int, size: int, params: str, fixed=False) -> Preset:
    return Preset(name, "image", f"keras/{model}/keras/{name}/{version}", size, fixed, params)


def _text(name: str, model: str, version: int, params: str) -> Preset:
    return Preset(name, "text", f"keras/{model}/keras/{name}/{version}", 0, False, params)


# Handles as keras-hub 0.29 registers them (keras_hub.src.utils.preset_utils.BUILTIN_PRESETS).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _image("resnet_18_imagenet", "resnetv1", 3, 224, "11M"),
        _image("resnet_50_imagenet", "resnetv1", 3, 224, "24M"),
        _image("resnet_101_imagenet", "resnetv1", 3, 224, "43M"),
        _image("resnet_v2_50_imagenet", "resnetv2", 3, 224, "24M"),
        _image("efficientnet_b0_ra_imagenet", "efficientnet", 2, 224, "5M"),
        _image("vit_base_patch16_224_imagenet", "vit", 4, 224, "86M", fixed=True),
        _image("vit_base_patch16_384_imagenet", "vit", 4, 384, "86M", fixed=True),
        _text("bert_tiny_en_uncased", "bert", 3, "4M"),
        _text("bert_small_en_uncased", "bert", 3, "29M"),
        _text("bert_medium_en_uncased", "bert", 3, "41M"),
        _text("bert_base_en_uncased", "bert", 3, "109M"),
        _text("distil_bert_base_en_uncased", "distil_bert", 3, "66M"),
    )
}


def is_keras_hub_backbone(backbone: str) -> bool:
    """True when `--backbone` names a keras-hub preset (`keras_hub:NAME` or `keras_hub:DIR`)."""
    return backbone.startswith(PREFIX)


def preset_of(backbone: str) -> str:
    """The preset name or folder after the `keras_hub:` prefix."""
    return backbone[len(PREFIX) :]
