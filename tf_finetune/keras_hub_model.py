"""keras-hub presets as backbones: `--backbone=keras_hub:PRESET`.

PRESET is a keras-hub preset name (`resnet_50_imagenet`, `bert_base_en_uncased`; see
`tf-finetune backbones`), a `kaggle://owner/model/keras/variation/version` handle, or a local
preset folder (what `save_to_preset` writes: config.json, metadata.json, the weights and, for
the preprocessing, image_converter.json or tokenizer.json + preprocessor.json + assets/).
Names resolve to a Kaggle handle and download once into kagglehub's cache through
`hub.resolve_kaggle` (KAGGLEHUB_CACHE respected; a pre-filled cache works offline).

* images: float32 0-255 pixels [batch, s, s, 3] -> the preset's image converter (its scale
  and offset; its resize is dropped: the data pipeline and the export already resize to
  --image_size, which defaults to the converter's size, so there is one resize, never two)
  -> the backbone's feature map -> `head.add_head` pools it. A backbone whose config fixes
  its input size (ViT: position embeddings per patch) refuses any other --image_size.
* text: tf.string [batch] -> the preset's TextClassifierPreprocessor (its tokenizer and
  sequence length) -> the backbone -> `pooled_output` when it has one, else the first
  token's vector (what keras-hub's own classifiers use) -> the head.

Both are called with training=False: keras' `Resizing` and BatchNormalization default to
training mode, and the BatchNorm rule (model.unfreeze) needs inference mode even when the
backbone is fine-tuned. The backbone is a keras.Model, so `model.get_backbone`/`unfreeze`
(--unfreeze=N|fraction|all) and feature caching work as for Keras Applications.

Self-contained runs: building with pretrained weights copies the preset's files other than
its weights (config, converter, tokenizer, vocabulary) into `<model_dir>/keras_hub_preset/`;
every later build of the run (evaluate, export, predict: weights from the run's checkpoint)
reads that copy, so the preset folder or cache may be deleted after training.

keras_hub imports tensorflow_text; it is imported only inside functions, after
`hub.load_op_libraries()` has recorded the core ops (see its docstring).
"""

import dataclasses
import difflib
import json
import os
import shutil

import keras

from tf_finetune import head, hub
from tf_finetune.errors import UserError
from tf_finetune.keras_hub_table import PRESETS, is_keras_hub_backbone, preset_of

RUN_COPY = "keras_hub_preset"  # in the run dir
SOURCE_FILE = "tf_finetune_source.json"  # in the copy: which --backbone it was made from
DEFAULT_IMAGE_SIZE = 224
_KAGGLE_SCHEME = "kaggle://"


def import_keras_hub():
    """keras_hub, imported after the op libraries are registered (it imports tensorflow_text)."""
    hub.load_op_libraries()
    import keras_hub

    return keras_hub


# ----------------------------------------------------------------------------- the preset
def _looks_like_path(preset: str) -> bool:
    return preset.startswith(("/", ".", "~")) or os.sep in preset


def _kaggle_handle(preset: str) -> str:
    """The Kaggle handle of a preset name (our table first: no keras_hub import needed)."""
    if preset.startswith(_KAGGLE_SCHEME):
        return preset[len(_KAGGLE_SCHEME) :]
    if preset in PRESETS:
        return PRESETS[preset].kaggle_handle
    import_keras_hub()
    # keras_hub.src: the name -> handle registry has no public accessor (`Backbone.presets`
    # lists only one class's presets).
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    if preset in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[preset]["kaggle_handle"][len(_KAGGLE_SCHEME) :]
    close = difflib.get_close_matches(preset, [*PRESETS, *BUILTIN_PRESETS], n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown keras-hub preset {preset!r}.{hint} Run 'tf-finetune backbones' for the "
        "presets known to work, or pass a preset folder (keras_hub:/path/to/preset)."
    )


def source_folder(backbone: str) -> str:
    """The local folder of `--backbone=keras_hub:PRESET`, downloading a named preset once."""
    preset = preset_of(backbone)
    path = os.path.expanduser(preset)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(
                f"{path} is not a keras-hub preset folder (no config.json); pass the folder "
                "save_to_preset wrote, or a preset name."
            )
        return path
    if "://" in preset and not preset.startswith(_KAGGLE_SCHEME):
        raise UserError(
            f"--backbone={backbone}: only keras-hub presets from Kaggle (a name or kaggle://"
            "...) or a local folder are supported."
        )
    if _looks_like_path(preset):
        raise UserError(f"keras-hub preset folder {path} does not exist.")
    return hub.resolve_kaggle(_kaggle_handle(preset))


def run_copy(model_dir: str) -> str:
    return os.path.join(model_dir, RUN_COPY)


def _copy_of(config) -> str | None:
    """The run dir's copy of the preset when it was made from this --backbone."""
    copy = run_copy(config.model_dir)
    try:
        with open(os.path.join(copy, SOURCE_FILE), encoding="utf-8") as f:
            source = json.load(f).get("backbone")
    except (OSError, ValueError):
        return None
    return copy if source == config.backbone else None


def preset_folder(config, need_weights: bool) -> str:
    """Where to read the preset: the run's copy when it has one and no weights are needed."""
    copy = None if need_weights else _copy_of(config)
    return copy or source_folder(config.backbone)


def _is_weights(name: str) -> bool:
    return name.endswith((".weights.h5", ".weights.json", ".safetensors"))


def keep_in_run_dir(folder: str, config) -> str:
    """Copies the preset's files except its weights into the run dir (atomically)."""
    copy = run_copy(config.model_dir)
    if os.path.realpath(folder) == os.path.realpath(copy):
        return copy
    tmp = f"{copy}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=lambda _, names: [n for n in names if _is_weights(n)])
    with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump({"backbone": config.backbone, "source": os.path.abspath(folder)}, f)
    shutil.rmtree(copy, ignore_errors=True)
    os.replace(tmp, copy)
    return copy


def _read_json(folder: str, name: str) -> dict:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the keras-hub preset file {folder}/{name} ({e}).") from None


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    """What a preset takes, read from its JSON files (nothing is built)."""

    folder: str
    kind: str  # image or text
    image_size: int | None  # the image converter's square size
    fixed_size: int | None  # the only size the backbone takes (ViT), else None


def _square(size) -> int | None:
    if isinstance(size, list | tuple) and len(size) >= 2 and size[0] and size[0] == size[1]:
        return int(size[0])
    return None


def read_info(folder: str) -> PresetInfo:
    """The kind and image sizes of the preset in `folder`."""
    backbone = _read_json(folder, "config.json").get("config", {})
    if os.path.isfile(os.path.join(folder, "image_converter.json")):
        converter = _read_json(folder, "image_converter.json").get("config", {})
        return PresetInfo(
            folder,
            "image",
            _square(converter.get("image_size")),
            # image_shape (ViT, ResNet), input_shape (EfficientNet): None when any size goes.
            _square(backbone.get("image_shape") or backbone.get("input_shape")),
        )
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return PresetInfo(folder, "text", None, None)
    raise UserError(
        f"the keras-hub preset in {folder} has neither image_converter.json nor tokenizer.json: "
        "tf-finetune needs an image or a text classifier preset."
    )


# ----------------------------------------------------------------------------- config
def check_options(config) -> None:
    """The flags a keras-hub preset cannot take (no I/O)."""
    if config.preprocessor:
        raise UserError("--preprocessor is for TF Hub encoders; a keras-hub preset brings its own.")
    if config.weights not in ("imagenet", "none"):
        raise UserError(
            f"--weights={config.weights} does not apply to a keras-hub preset: it brings its "
            "own weights (--weights=none: random init)."
        )
    if config.backbone_alpha != 1.0:
        raise UserError("--backbone_alpha only applies to Keras MobileNet backbones.")


def _folder_to_read(config) -> str:
    """A local preset folder as it is now; else the run's copy (no download for a finished
    run whose preset left the cache); else the preset, downloaded if needed."""
    local = os.path.expanduser(preset_of(config.backbone))
    if os.path.isdir(local):
        return source_folder(config.backbone)
    return _copy_of(config) or source_folder(config.backbone)


def resolve(config):
    """Reads the preset (downloading a named one once) and fills the image size; returns the
    resolved config (image_size 0 for a text preset)."""
    check_options(config)
    info = read_info(_folder_to_read(config))
    if info.kind == "text":
        if config.image_size:
            raise UserError("--image_size does not apply to a text backbone; drop it.")
        _check_text_format(config)
        return dataclasses.replace(config, image_size=0)
    size = config.image_size or info.image_size or info.fixed_size or DEFAULT_IMAGE_SIZE
    if info.fixed_size and size != info.fixed_size:
        raise UserError(
            f"--image_size={size}, but {config.backbone} takes only {info.fixed_size}x"
            f"{info.fixed_size} images (its position embeddings fix it); use "
            f"--image_size={info.fixed_size} (or leave it unset)."
        )
    return dataclasses.replace(config, image_size=size)


def _check_text_format(config) -> None:
    if config.format == "tflite":
        raise UserError(
            f"--format=tflite: {config.backbone} is a text model whose tokenizer needs "
            "TF Text ops and string inputs TFLite has no kernels for; use saved_model."
        )
    if config.format == "keras":
        # Loading a .keras file builds the functional model before the tokenizer's vocabulary
        # asset is restored, so keras-hub's tokenizer fails ("No vocabulary has been set").
        raise UserError(
            f"--format=keras: a .keras file of {config.backbone} does not load again (keras-hub "
            "restores the tokenizer's vocabulary too late); use saved_model."
        )


def is_text_model(config) -> bool:
    """Whether a resolved config describes a keras-hub text classifier (strings in)."""
    return is_keras_hub_backbone(config.backbone) and config.image_size == 0


# ----------------------------------------------------------------------------- model
@keras.saving.register_keras_serializable(package="tf_finetune")
class FirstToken(keras.layers.Layer):
    """[batch, tokens, dim] -> [batch, dim]: the first ([CLS]) token's vector."""

    def call(self, inputs):
        return inputs[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def _text_features(outputs):
    if isinstance(outputs, dict):
        outputs = outputs.get("pooled_output", outputs.get("sequence_output"))
    if len(outputs.shape) == 3:
        outputs = FirstToken(name="cls_token")(outputs)
    return outputs


def build_classifier(config, num_classes: int) -> keras.Model:
    """The classifier for a resolved config; call inside `strategy.scope()`.

    Pretrained weights (--weights=imagenet) come from the preset; its other files are kept in
    the run dir, and --weights=none (random, or a checkpoint loaded next) reads that copy.
    Returns softmax probabilities (float32); the backbone starts frozen.
    """
    keras_hub = import_keras_hub()
    pretrained = config.weights != "none"
    folder = preset_folder(config, need_weights=pretrained)
    keep_in_run_dir(folder, config)  # a no-op when `folder` is the run's copy
    backbone = keras_hub.models.Backbone.from_preset(folder, load_weights=pretrained)
    backbone.trainable = False
    if config.image_size:
        inputs = keras.Input((config.image_size, config.image_size, 3), name="pixels")
        # image_size=None: no resize inside the model (see the module docstring).
        converter = keras_hub.layers.ImageConverter.from_preset(
            folder, image_size=None, name="preprocessing"
        )
        x = backbone(converter(inputs, training=False), training=False)
    else:
        inputs = keras.Input((), dtype="string", name="text")
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
            folder, name="preprocessor"
        )
        x = _text_features(backbone(preprocessor(inputs), training=False))
    outputs = head.add_head(
        x,
        num_classes,
        config.dropout,
        f"--backbone={config.backbone}",
        config.task == "multi_label",
    )
    return keras.Model(inputs, outputs, name="keras_hub_classifier")
