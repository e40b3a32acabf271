"""Tiny keras-hub presets for tests: real keras-hub classes built from small configs (random
weights), written with `save_to_preset` exactly as a downloaded preset is laid out.

* image: a ResNet (basic blocks, BatchNorm) with its ResNetImageConverter (ImageNet mean/std);
* vit: a one-layer ViT whose position embeddings fix its input size;
* text: a 2-layer BERT with its BertTextClassifierPreprocessor (WordPiece over a tiny vocabulary).
"""

import os
import pathlib
import shutil

from tf_finetune import hub

IMAGE_SIZE = 32
SEQ_LENGTH = 16
VOCABULARY = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"the cat sat on mat dog ran fast a".split(),
]
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _keras_hub():
    hub.load_op_libraries()  # before keras_hub imports tensorflow_text
    import keras_hub

    return keras_hub


def save_image_preset(path, image_size: int = IMAGE_SIZE) -> str:
    keras_hub = _keras_hub()
    import keras

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],  # ResNetBackbone insists the stem and first stack match
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(None, None, 3),
    )
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(image_size, image_size),
        scale=[1.0 / (255.0 * s) for s in _STD],
        offset=[-m / s for m, s in zip(_MEAN, _STD)],
        crop_to_aspect_ratio=True,
    )
    backbone.save_to_preset(str(path))
    converter.save_to_preset(str(path))
    return str(path)


def save_vit_preset(path, image_size: int = IMAGE_SIZE) -> str:
    keras_hub = _keras_hub()
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
    )
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(image_size, image_size), scale=1 / 127.5, offset=-1.0
    )
    backbone.save_to_preset(str(path))
    converter.save_to_preset(str(path))
    return str(path)


def save_text_preset(path, seq_length: int = SEQ_LENGTH) -> str:
    keras_hub = _keras_hub()
    import keras

    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCABULARY, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=seq_length
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCABULARY),
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=seq_length,
    )
    backbone.save_to_preset(str(path))
    preprocessor.save_to_preset(str(path))
    return str(path)


def save_family_preset(path, family: str) -> str:
    """A tiny preset of each other family tf-finetune lists (tf-finetune backbones)."""
    keras_hub = _keras_hub()
    if family == "efficientnet":  # B0's "v1" blocks
        backbone = keras_hub.models.EfficientNetBackbone(
            stackwise_width_coefficients=[1.0] * 2,
            stackwise_depth_coefficients=[1.0] * 2,
            stackwise_kernel_sizes=[3, 3],
            stackwise_num_repeats=[1, 1],
            stackwise_input_filters=[8, 8],
            stackwise_output_filters=[8, 16],
            stackwise_expansion_ratios=[1, 2],
            stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
            stackwise_strides=[1, 2],
            stackwise_block_types=["v1", "v1"],
        )
        extra = keras_hub.layers.EfficientNetImageConverter(image_size=(32, 32), scale=1 / 255)
    elif family == "resnet_v2":
        backbone = keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 16],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="basic_block",
            use_pre_activation=True,
            image_shape=(None, None, 3),
        )
        extra = keras_hub.layers.ResNetImageConverter(image_size=(32, 32), scale=1 / 255)
    elif family == "vit":
        return save_vit_preset(path)
    else:  # distil_bert
        tokenizer = keras_hub.models.DistilBertTokenizer(vocabulary=VOCABULARY, lowercase=True)
        extra = keras_hub.models.DistilBertTextClassifierPreprocessor(
            tokenizer, sequence_length=SEQ_LENGTH
        )
        backbone = keras_hub.models.DistilBertBackbone(
            vocabulary_size=len(VOCABULARY),
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=SEQ_LENGTH,
        )
    backbone.save_to_preset(str(path))
    extra.save_to_preset(str(path))
    return str(path)


def place_in_kaggle_cache(cache, handle: str, preset: str) -> pathlib.Path:
    """Copies `preset` where kagglehub keeps a downloaded model: KAGGLEHUB_CACHE/models/OWNER/
    MODEL/FRAMEWORK/VARIATION/N/ plus the `N.complete` marker it writes once complete."""
    owner, model, framework, variation, version = handle.split("/")
    base = pathlib.Path(cache) / "models" / owner / model / framework / variation
    folder = base / version
    if not folder.exists():
        shutil.copytree(preset, folder)
        (base / f"{version}.complete").touch()
    return folder


def layer_weights(backbone) -> dict:
    """{layer name: [weight arrays]} of a backbone (same config -> same layer names)."""
    import numpy as np

    return {
        layer.name: [np.array(w) for w in layer.weights]
        for layer in backbone.layers
        if layer.weights
    }


def preset_layer_weights(folder) -> dict:
    """`layer_weights` of the backbone saved in a preset folder."""
    keras_hub = _keras_hub()
    return layer_weights(keras_hub.models.Backbone.from_preset(os.fspath(folder)))
