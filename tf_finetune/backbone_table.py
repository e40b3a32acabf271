"""The backbone table without TensorFlow: names, constructors (by name), preprocessing, sizes.

`tf-finetune backbones` and flag checks read it before TensorFlow is imported (importing it
costs seconds); `tf_finetune.backbones` builds the models and re-exports everything here.
"""

import dataclasses
import difflib
import functools
import json
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

# What a --backbone value names (`backbone_kind`).
KERAS_HUB = "keras_hub"  # keras_hub:PRESET, or a keras-hub preset folder
RUN = "run"  # a previous tf-finetune run dir: its trained weights are the start
HUB = "hub"  # a TF Hub module: a SavedModel with __call__, a URL or a handle
KERAS_EXPORT = "keras_export"  # a Keras 3 model.export() / ExportArchive SavedModel (`serve`)
KERAS_FILE = "keras_file"  # a Keras 3 .keras model file
APPLICATIONS = "applications"  # a keras.applications name from the table (or auto)
# Kinds that carry their own trained weights (own_model.py builds them; --weights is refused).
OWN_KINDS = (RUN, KERAS_EXPORT, KERAS_FILE)
# Where a run keeps its copy of an own source, so later commands do not need the original
# (written by own_model.keep_source; see rundir.py for the other files of a run dir).
SOURCE_DIR = "backbone_source"
SOURCE_RECORD = "source.json"


def backbone_kind(value: str, model_dir: str = "") -> str:
    """What `--backbone=value` names, in this order: `keras_hub:` prefix; a tf-finetune run dir
    (flags.cfg + checkpoints/); a keras-hub preset folder (config.json + metadata.json); a
    SavedModel with `__call__` (TF Hub); a SavedModel with `serve` (Keras export); a `.keras`
    file; a URL or handle; a keras.applications name. File checks only (no TensorFlow).

    Args:
      value: the flag's value.
      model_dir: the run's dir: when it holds a copy of `value` (own_model.keep_source), the
        copy is what is looked at, so a run outlives its source.
    """
    path = os.path.expanduser(source_path(value, model_dir))
    if is_keras_hub_backbone(value):
        return KERAS_HUB
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if "flags.cfg" in files and "checkpoints" in files:
            return RUN
        if {"config.json", "metadata.json"} <= files:
            return KERAS_HUB
        if "saved_model.pb" in files:
            children = saved_model_root_children(os.path.join(path, "saved_model.pb"))
            if "__call__" in children or "serve" not in children:
                return HUB  # hub_model refuses the ones without __call__ in one line
            return KERAS_EXPORT
    if value.endswith(".keras") and os.path.isfile(path):
        return KERAS_FILE
    if value.endswith(".keras"):
        raise UserError(f"--backbone={value}: no such .keras file.")
    if value.startswith(_HUB_PREFIXES) or os.sep in value:
        return HUB
    return APPLICATIONS


def source_record(model_dir: str) -> dict:
    """The run's backbone_source/source.json ({} when it keeps no copy of a source)."""
    try:
        with open(os.path.join(model_dir, SOURCE_DIR, SOURCE_RECORD), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def source_path(value: str, model_dir: str = "") -> str:
    """The run's copy of `value` when `model_dir` keeps one of it, else `value` itself."""
    saved = source_record(model_dir) if model_dir else {}
    if saved.get("backbone") != value or not saved.get("copy"):
        return value
    return os.path.join(model_dir, SOURCE_DIR, saved["copy"])


def is_hub_backbone(backbone: str, model_dir: str = "") -> bool:
    """True when `--backbone` names a TF Hub module (a URL, a gs:// path, a handle, or a folder
    holding a SavedModel with `__call__`); see `backbone_kind`."""
    return backbone_kind(backbone, model_dir) == HUB


def saved_model_root_children(pb_path: str) -> frozenset[str]:
    """The names of the root object's children in a saved_model.pb (`__call__`, `serve`,
    `signatures`, ...), read from the protobuf wire format: TensorFlow's own parser would
    import TensorFlow (seconds), and this runs before it is needed."""
    stat = os.stat(pb_path)
    return _root_children(pb_path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _root_children(pb_path: str, mtime_ns: int, size: int) -> frozenset[str]:
    """`saved_model_root_children`, read once per version of the file."""
    del mtime_ns, size  # the cache key: a rewritten file is read again
    with open(pb_path, "rb") as f:
        data = f.read()
    meta_graph = _field(data, 2)  # SavedModel.meta_graphs[0]
    graph = _field(meta_graph, 7) if meta_graph else None  # MetaGraphDef.object_graph_def
    root = _field(graph, 1) if graph else None  # SavedObjectGraph.nodes[0]
    names = set()
    for number, child in _fields(root or b""):
        if number == 1:  # SavedObject.children: ObjectReference (node_id=1, local_name=2)
            name = _field(child, 2)
            if name is not None:
                names.add(name.decode("utf-8", "replace"))
    return frozenset(names)


def _field(data: bytes, wanted: int) -> bytes | None:
    """The first length-delimited field numbered `wanted` in a protobuf message."""
    return next((value for number, value in _fields(data) if number == wanted), None)


def _fields(data: bytes):
    """(field number, bytes) of each length-delimited field of a message; others skipped."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            yield number, data[pos : pos + size]
            pos += size
        else:
            return  # groups: not in a SavedModel


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


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
