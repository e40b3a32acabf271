"""Your own models as the starting point: a previous tf-finetune run, a Keras 3 `.keras` file,
or a Keras 3 `model.export()` folder (`backbone_table.backbone_kind` says which a --backbone
value names).

* A run dir: the parent's classifier is rebuilt from its flags.cfg and trained weights
  (`model.restore_trained`). Same class names as the new data: it is kept whole, head too, and
  training continues (domain adaptation). Otherwise a new head sits on the parent's features
  (the input of its `pooler`) and the parent's backbone, with its fine-tuned weights, is frozen
  or unfrozen per --unfreeze like any other.
* A `.keras` file: a tf-finetune classifier (it has a `pooler`; `tf-finetune export
  --format=keras` writes one, with labels.txt beside it) is treated like a run. Any other model
  is cut at --backbone_layer, else at its last global-pooling or Flatten layer: the layers up to
  there become the backbone. It takes raw 0-255 RGB pixels (scaling belongs inside the model,
  as in tf-finetune's own exports).
* A Keras export: `hub.HubLayer` calls its `serve` endpoint; its trainable variables train
  with --unfreeze=all (Adam included). Its output is the features, whatever it is.

When training starts (`keep_source`), the run copies what it needs into
`<model_dir>/backbone_source/` with `source.json` (the value it copies, the data's class
names, the lineage); from then on the run is rebuilt from the copy
(`backbone_table.source_path`), so evaluate, export, predict and resume do not need the source.
"""

import dataclasses
import json
import os
import shutil
import zipfile

import keras
from absl import logging

from tf_finetune import atomic, backbone_table, head, hub, hub_model, rundir, validation
from tf_finetune.backbone_table import KERAS_EXPORT, KERAS_FILE, RUN
from tf_finetune.config import Config
from tf_finetune.errors import UserError

# The layers whose output is a feature vector: where a .keras model is cut by default.
FEATURE_LAYERS = (
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "Flatten",
)
KERAS_COPY, EXPORT_COPY, RUN_COPY = "model.keras", "saved_model", "run"


# ----------------------------------------------------------------------------- reading
def local_path(config: Config) -> str:
    """Where the source is read from: the run's copy once it has one, else the value."""
    return os.path.expanduser(backbone_table.source_path(config.backbone, config.model_dir))


def read_run_config(run_dir: str) -> Config:
    """The Config a run's flags.cfg describes, with `model_dir` set to `run_dir`.

    Flags this version does not know are skipped (a run of another version).
    """
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    with open(os.path.join(run_dir, rundir.FLAGS_FILE), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("--"):
                continue
            name, has_value, value = line[2:].partition("=")
            if not has_value:  # --flag / --noflag
                value = name in fields
                name = name if name in fields else name.removeprefix("no")
            if name not in fields:
                continue
            kind = fields[name].type
            values[name] = value if kind in (bool, str) else kind(value)
    return Config(**{**values, "model_dir": run_dir})


@dataclasses.dataclass(frozen=True)
class Parent:
    """A finished run to start from: its config (model_dir = where it is read) and classes."""

    config: Config
    class_names: tuple[str, ...]


def parent_run(config: Config) -> Parent:
    """The run --backbone names (or the run's copy of it)."""
    path = local_path(config)
    rundir.trained_weights(path)  # no checkpoint: one line
    class_names = rundir.read_metrics(path).get("class_names")
    if not class_names:
        raise UserError(
            f"--backbone={config.backbone}: the run has no metrics.json with its classes; "
            "let it finish (or rerun it) first."
        )
    return Parent(read_run_config(path), tuple(class_names))


def _keras_config(path: str) -> dict:
    """config.json inside a .keras file (a zip), read without building the model."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"--backbone={path} is not a Keras 3 .keras file ({e}).") from None


def _layers(model_config: dict) -> list[tuple[str, str]]:
    """(name, class name) of a saved Functional or Sequential model's top-level layers."""
    return [
        (entry.get("config", {}).get("name", entry.get("name", "")), entry.get("class_name", ""))
        for entry in model_config.get("config", {}).get("layers", [])
    ]


def cut_layer(layers: list[tuple[str, str]], wanted: str, source: str) -> str:
    """The layer whose output becomes the features: `wanted` (--backbone_layer), else
    tf-finetune's `pooler`, else the last global-pooling or Flatten layer.

    Raises:
      UserError: `wanted` is not a layer, or no cut point is found.
    """
    names = [name for name, _ in layers]
    if wanted:
        if wanted not in names:
            raise UserError(
                f"--backbone_layer={wanted} is not a layer of {source}; its last layers: "
                f"{', '.join(names[-6:])}."
            )
        return wanted
    if "pooler" in names:
        return "pooler"
    pooling = [name for name, kind in layers if kind in FEATURE_LAYERS]
    if not pooling:
        raise UserError(
            f"--backbone={source} has no global-pooling or Flatten layer to cut at; name the "
            f"features layer with --backbone_layer=NAME (its last layers: "
            f"{', '.join(names[-6:])})."
        )
    return pooling[-1]


def _input_size(batch_shape, source: str) -> int | None:
    """The fixed square image size of an image input [batch, h, w, 3] (None: any size)."""
    if not batch_shape or len(batch_shape) != 4 or batch_shape[-1] != 3:
        raise UserError(
            f"--backbone={source} takes inputs of shape {batch_shape}; an image model takes "
            "[batch, height, width, 3] RGB pixels."
        )
    height, width = batch_shape[1], batch_shape[2]
    return int(height) if height is not None and height == width else None


def _keras_file_size(path: str, config: Config) -> int | None:
    """Checks the .keras file's cut point; returns its fixed input size, if any."""
    model_config = _keras_config(path)
    layers = _layers(model_config)
    cut_layer(layers, config.backbone_layer, config.backbone)
    inputs = [
        e
        for e in model_config.get("config", {}).get("layers", [])
        if e.get("class_name") == "InputLayer"
    ]
    batch_shape = inputs[0]["config"].get("batch_shape") if inputs else None
    if batch_shape is None:  # a Sequential model records its build shape
        batch_shape = model_config.get("build_config", {}).get("input_shape")
    return _input_size(batch_shape, config.backbone)


def _run_is_one_layer(run_dir: str) -> tuple[int, bool]:
    """A run's image size (0: text) and whether its backbone is one opaque layer (a TF Hub
    module or a Keras export, through however many runs)."""
    parent = read_run_config(run_dir)
    kind = backbone_table.backbone_kind(parent.backbone, run_dir)
    if kind == RUN:
        return parent.image_size, _run_is_one_layer(local_path(parent))[1]
    return parent.image_size, kind in (backbone_table.HUB, KERAS_EXPORT)


def _export_size(path: str, config: Config) -> int | None:
    """Checks the export's `serve` signature; returns its fixed image size (0: text)."""
    hub.check_ops(path, f"--backbone={config.backbone}")
    signature = hub_model.read_signature(path, "serve")
    if signature.takes_text:
        return 0
    if not signature.takes_images:
        raise UserError(
            f"--backbone={config.backbone}: its serve endpoint takes {signature.input}; need "
            "images (float32 [batch, h, w, 3]) or text (tf.string [batch])."
        )
    return signature.image_size


# ----------------------------------------------------------------------------- resolve
def resolve(config: Config) -> Config:
    """Checks the flags against the source and fills the image size it takes."""
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    path = local_path(config)
    one_layer = kind == KERAS_EXPORT
    if kind == RUN:
        size, one_layer = _run_is_one_layer(path)
        parent_run(config)  # a finished run, or one line
    elif kind == KERAS_FILE:
        size = _keras_file_size(path, config)
    else:
        size = _export_size(path, config)
    if one_layer:
        validation.hub_backbone_options(config)
    else:
        validation.keras_backbone_options(config)
        if config.backbone_alpha != 1.0:
            raise UserError("--backbone_alpha only applies to Keras MobileNet backbones.")
    if size == 0 and config.image_size:
        raise UserError(f"--image_size does not apply to --backbone={config.backbone} (text).")
    if size and config.image_size and config.image_size != size:
        raise UserError(
            f"--image_size={config.image_size}, but --backbone={config.backbone} takes "
            f"{size}x{size} images; use --image_size={size} (or leave it unset)."
        )
    if size is None:
        size = config.image_size or hub_model.DEFAULT_IMAGE_SIZE
    return dataclasses.replace(config, image_size=size or config.image_size)


# ----------------------------------------------------------------------------- build
def keeps_head(config: Config, class_names) -> bool:
    """Whether the run's data has the source's class names (recorded by `keep_source`): then
    the source's head is kept and training continues. Without a record (tune and compare
    trials) the head is replaced."""
    record = backbone_table.source_record(config.model_dir)
    return record.get("backbone") == config.backbone and record.get("class_names") == list(
        class_names
    )


def adapt(parent: keras.Model, class_names, config: Config, num_classes: int) -> keras.Model:
    """A trained tf-finetune classifier for this run: kept whole for the same classes, else
    its features (its `pooler`'s input) under a new head."""
    if keeps_head(config, class_names) and len(class_names) == num_classes:
        logging.info("Same classes as --backbone=%s: its head is kept.", config.backbone)
        return parent
    features = parent.get_layer("pooler").input
    outputs = head.add_head(
        features,
        num_classes,
        config.dropout,
        f"--backbone={config.backbone}",
        config.task == "multi_label",
    )
    return keras.Model(parent.inputs, outputs, name=f"{parent.name}_adapted")


def build_classifier(config: Config, num_classes: int) -> keras.Model:
    """The classifier on a .keras file or a Keras export (a run: `adapt` on the parent model
    `model.restore_trained` rebuilds); call inside `strategy.scope()`."""
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    if kind == KERAS_FILE:
        return _from_keras_file(config, num_classes)
    return _from_export(config, num_classes)


def _from_keras_file(config: Config, num_classes: int) -> keras.Model:
    path = local_path(config)
    from tf_finetune import backbones  # noqa: F401 - registers tf-finetune's layers for loading

    try:
        loaded = keras.saving.load_model(path, compile=False)
    except (TypeError, ValueError, OSError) as e:  # e.g. a custom layer Keras cannot find
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load --backbone={config.backbone} ({first}); a model with custom layers "
            "needs them registered (keras.saving.register_keras_serializable)."
        ) from None
    layers = [(layer.name, type(layer).__name__) for layer in loaded.layers]
    cut = cut_layer(layers, config.backbone_layer, config.backbone)
    if cut == "pooler" and "predictions" in dict(layers):  # a tf-finetune classifier
        return adapt(loaded, _labels_beside(path), config, num_classes)
    backbone = keras.Model(loaded.inputs, loaded.get_layer(cut).output, name="backbone")
    backbone.trainable = False
    inputs = keras.Input((config.image_size, config.image_size, 3), name="pixels")
    # training=False: BatchNormalization stays in inference mode when unfrozen (model.py).
    x = backbone(inputs, training=False)
    outputs = head.add_head(
        x,
        num_classes,
        config.dropout,
        f"--backbone={config.backbone}",
        config.task == "multi_label",
    )
    return keras.Model(inputs, outputs, name="own_classifier")


def _labels_beside(path: str) -> list[str]:
    labels = os.path.join(os.path.dirname(path), "labels.txt")
    if not os.path.exists(labels):
        return []
    with open(labels, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _from_export(config: Config, num_classes: int) -> keras.Model:
    path = local_path(config)
    if config.image_size:
        inputs = keras.Input((config.image_size, config.image_size, 3), name="pixels")
    else:
        inputs = keras.Input((), dtype="string", name="text")
    trainable = config.unfreeze == "all"
    backbone = hub.HubLayer(path, trainable=trainable, endpoint="serve", name="backbone")
    if _ends_in_probabilities(backbone.module.serve):
        logging.warning(
            "--backbone=%s returns a classifier's probabilities: they are the features the "
            "new head learns from.",
            config.backbone,
        )
    x = backbone(inputs)
    outputs = head.add_head(
        x,
        num_classes,
        config.dropout,
        f"--backbone={config.backbone}",
        config.task == "multi_label",
    )
    return keras.Model(inputs, outputs, name="export_classifier")


def _ends_in_probabilities(function) -> bool:
    """Whether a restored tf.function's output is a Softmax/Sigmoid (through Identity ops)."""
    for concrete in getattr(function, "concrete_functions", None) or ():
        op = concrete.outputs[0].op if concrete.outputs else None
        while op is not None and op.type == "Identity" and op.inputs:
            op = op.inputs[0].op
        return op is not None and op.type in ("Softmax", "Sigmoid")
    return False


# ----------------------------------------------------------------------------- the copy
def keep_source(config: Config, class_names) -> None:
    """Copies what rebuilding the model needs into `<model_dir>/backbone_source/`, with
    source.json (the value, the data's class names, the lineage); called as training starts.

    A run whose source is gone keeps the copy it has (a resume; a rerun of its flags.cfg).
    """
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    original = os.path.expanduser(config.backbone)
    if kind not in backbone_table.OWN_KINDS or not os.path.exists(original):
        return
    if os.path.abspath(original) == os.path.abspath(config.model_dir):
        raise UserError("--backbone names this run's own --model_dir; train into another one.")
    folder = os.path.join(config.model_dir, backbone_table.SOURCE_DIR)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    copy = {RUN: _copy_run, KERAS_FILE: _copy_keras_file, KERAS_EXPORT: _copy_export}[kind](
        original, tmp
    )
    record = {
        "backbone": config.backbone,
        "kind": kind,
        "copy": copy,
        "class_names": list(class_names),
        "lineage": _lineage(kind, original, os.path.join(tmp, copy), class_names),
    }
    atomic.write_json(os.path.join(tmp, backbone_table.SOURCE_RECORD), record)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    logging.info("Kept a copy of --backbone=%s in %s", config.backbone, folder)


def _copy_run(original: str, dest: str) -> str:
    """flags.cfg, metrics.json, the trained weights and the run's own source copy."""
    target = os.path.join(dest, RUN_COPY)
    os.makedirs(os.path.join(target, "checkpoints"))
    for name in (rundir.FLAGS_FILE, rundir.METRICS):
        shutil.copy2(os.path.join(original, name), target)
    weights = rundir.trained_weights(original)
    shutil.copy2(weights, os.path.join(target, os.path.relpath(weights, original)))
    parent_source = os.path.join(original, backbone_table.SOURCE_DIR)
    if os.path.isdir(parent_source):
        shutil.copytree(parent_source, os.path.join(target, backbone_table.SOURCE_DIR))
    return RUN_COPY


def _copy_keras_file(original: str, dest: str) -> str:
    """The file, and the labels.txt and model_card.json beside it (tf-finetune's export)."""
    shutil.copy2(original, os.path.join(dest, KERAS_COPY))
    for name in ("labels.txt", "model_card.json"):
        beside = os.path.join(os.path.dirname(original), name)
        if os.path.exists(beside):
            shutil.copy2(beside, dest)
    return KERAS_COPY


def _copy_export(original: str, dest: str) -> str:
    shutil.copytree(original, os.path.join(dest, EXPORT_COPY))
    return EXPORT_COPY


def _lineage(kind: str, original: str, copy: str, class_names) -> dict:
    """What the model started from, for the model card: the source, its data and classes."""
    lineage = {"kind": kind, "source": os.path.abspath(original)}
    parent_classes = None
    if kind == RUN:
        parent, metrics = read_run_config(copy), rundir.read_metrics(copy)
        parent_classes = metrics.get("class_names")
        lineage.update(
            backbone=parent.backbone,
            data=parent.data or "offline default (scikit-learn digits 5-9)",
            class_names=parent_classes,
            metrics={k: v for k, v in metrics.items() if k.endswith("accuracy")},
            parent=backbone_table.source_record(copy).get("lineage"),
        )
    elif kind == KERAS_FILE:
        card_path = os.path.join(os.path.dirname(copy), "model_card.json")
        if os.path.exists(card_path):
            with open(card_path, encoding="utf-8") as f:
                card = json.load(f)
            parent_classes = card.get("class_names")
            lineage.update({k: card.get(k) for k in ("backbone", "data", "class_names")})
    lineage["head"] = "kept" if parent_classes == list(class_names) else "new"
    return lineage
