"""The typed, frozen run configuration: every knob is declared here, once.

The CLI turns each field into an absl flag (name, type, default, help and topic come from the
field), parses the command line into a `Config`, and the library only ever sees the `Config`.
`Config.to_flagfile()` writes the resolved values as a flagfile: `--flagfile=<it>` reruns the run.
"""

import dataclasses
import os

from tf_finetune.errors import UserError

# Topics, in the order `--help` shows them.
GROUPS = ("data", "model", "training", "distribution", "output", "export", "predict")
# Groups of knobs that act on a finished run, not on how it trains: flags.cfg leaves them out.
NOT_IN_FLAGFILE = ("export", "predict")


def _field(default, help: str, group: str, choices: tuple[str, ...] | None = None):
    return dataclasses.field(
        default=default, metadata={"help": help, "group": group, "choices": choices}
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run, fully resolved (see `resolve`)."""

    # --- data ---
    data: str = _field(
        "",
        "A folder of class subfolders (or with train/ val/ test/ inside), tfds:NAME, or for "
        "text a .csv/.tsv file (or a folder with train.csv, val.csv, test.csv). "
        "Empty: the offline default (real handwritten digits shipped with scikit-learn).",
        "data",
    )
    train_split: str = _field("train", "TFDS split (slicing syntax) to train on.", "data")
    val_split: str = _field(
        "",
        "TFDS validation split. Empty: 'validation' when the dataset has one, else carved "
        "from the train split with --seed.",
        "data",
    )
    test_split: str = _field(
        "", "TFDS test split. Empty: 'test' when the dataset has one, else none.", "data"
    )
    validation_percent: int = _field(
        20,
        "Percent of images held out for validation when the data has no validation split "
        "(image folders: by a hash of each file's path, so adding images never moves old ones).",
        "data",
    )
    image_size: int = _field(0, "Square input size in pixels. 0: the backbone's default.", "data")
    split: str = _field(
        "test", "The split 'tf-finetune evaluate' reports on.", "data", ("val", "test")
    )
    text_column: str = _field(
        "text",
        "Text data: the CSV/TSV column (or TFDS feature) holding the text; several, "
        "comma-separated, are joined with a space (e.g. title,description).",
        "data",
    )
    label_column: str = _field(
        "label", "Text data: the CSV/TSV column (or TFDS feature) holding the label.", "data"
    )

    data_service: str = _field(
        "",
        "grpc://HOST:PORT of a tf.data service dispatcher: its workers read, decode and batch "
        "the training images (each example once per epoch), for input pipelines that outgrow "
        "this machine. The workers must see --data at the same path. Empty: local input.",
        "data",
    )

    # --- model ---
    backbone: str = _field(
        "auto",
        "A Keras Applications name (mobilenet_v2, efficientnet_b0, resnet50, ...; "
        "'tf-finetune backbones' lists them), or a TF Hub module: a https://tfhub.dev/... or "
        "https://www.kaggle.com/models/... URL, a gs:// path or a local SavedModel folder "
        "(image or text). auto: digits_cnn for the offline default, mobilenet_v2 otherwise.",
        "model",
    )
    backbone_alpha: float = _field(1.0, "Width multiplier of MobileNet backbones.", "model")
    weights: str = _field(
        "imagenet",
        "imagenet (the backbone's pretrained weights; for digits_cnn its offline pretraining "
        "on digits 0-4), none (random init), or a path to a weights file.",
        "model",
    )
    preprocessor: str = _field(
        "",
        "TF Hub text preprocessing module (handle) for a BERT-style --backbone encoder: "
        "strings -> token ids; the encoder's pooled_output feeds the head.",
        "model",
    )
    dropout: float = _field(0.2, "Dropout rate before the classification layer.", "model")
    unfreeze: str = _field(
        "0",
        "0: backbone frozen (the default); N: also train the top N backbone layers that have "
        "weights; all: train the whole backbone. BatchNormalization always stays frozen.",
        "model",
    )

    # --- training ---
    epochs: int = _field(10, "Number of epochs.", "training")
    batch_size: int = _field(32, "Global batch size (split across replicas).", "training")
    learning_rate: float = _field(1e-3, "Learning rate.", "training")
    optimizer: str = _field("adam", "Optimizer.", "training", ("adam", "sgd", "adamw"))
    weight_decay: float = _field(1e-4, "Weight decay for --optimizer=adamw.", "training")
    label_smoothing: float = _field(0.0, "Label smoothing (0 to 1).", "training")
    seed: int = _field(42, "Random seed: the same seed gives the same numbers on CPU.", "training")
    cache: str = _field(
        "auto",
        "Frozen backbone and no augmentation: compute its features once and train the head on "
        "them (memory: in RAM; disk: memory-mapped files in $KERAS_HOME/tf_finetune_features, "
        "reused across runs). auto: memory when they fit in 2 GB, else disk; none: never.",
        "training",
        ("auto", "memory", "disk", "none"),
    )
    early_stopping_patience: int = _field(
        0, "Stop after N epochs without val_loss improvement (0: off).", "training"
    )
    reduce_lr_patience: int = _field(
        0, "Divide the learning rate by 10 after N epochs without improvement (0: off).", "training"
    )

    # --- distribution ---
    strategy: str = _field(
        "auto",
        "auto: MirroredStrategy over all GPUs, or over --cpu_replicas logical CPUs; "
        "one_device: a single device; mirrored: MirroredStrategy even with one replica; "
        "multi_worker: MultiWorkerMirroredStrategy across the machines in TF_CONFIG.",
        "distribution",
        ("auto", "mirrored", "one_device", "multi_worker"),
    )
    cpu_replicas: int = _field(
        1,
        "Without GPUs, split the CPU into N logical devices and mirror over them.",
        "distribution",
    )

    # --- output ---
    model_dir: str = _field(
        "runs/default",
        "Run directory: flags.cfg, checkpoints, backup (a rerun resumes), logs, metrics.json.",
        "output",
    )
    export_dir: str = _field(
        "", "Base directory of the SavedModel versions. Empty: <model_dir>/export.", "output"
    )

    # --- export (tf-finetune export) ---
    format: str = _field(
        "saved_model",
        "What 'tf-finetune export' writes from the run's best checkpoint: a SavedModel version "
        "for TF Serving, a .keras file, or a .tflite file (in <model_dir>/keras or /tflite).",
        "export",
        ("saved_model", "keras", "tflite"),
    )
    quantize: str = _field(
        "none",
        "TFLite quantization: dynamic (int8 weights), float16, or int8 (full integer, "
        "calibrated on training images). Prints size and validation accuracy beside float's.",
        "export",
        ("none", "dynamic", "float16", "int8"),
    )
    export_version: int = _field(
        0, "SavedModel version to write (never overwrites one). 0: the next free version.", "export"
    )
    serving_config: str = _field(
        "",
        "Also write TF Serving's models.config here, serving the export base as "
        "/models/<model_name> (the layout scripts/serve.sh mounts).",
        "export",
    )

    # --- predict (tf-finetune predict [inputs ...]) ---
    model: str = _field(
        "",
        "An export dir (a version dir, or the base holding 1/, 2/ ...) or a run dir (its latest "
        "export), predicted in process.",
        "predict",
    )
    server: str = _field(
        "", "TF Serving REST URL (e.g. http://localhost:8501) to send the images to.", "predict"
    )
    grpc: str = _field("", "TF Serving gRPC host:port (e.g. localhost:8500).", "predict")
    model_name: str = _field(
        "model",
        "The name TF Serving serves the model as (--server, --grpc, --serving_config).",
        "predict",
    )
    model_version: str = _field(
        "",
        "TF Serving version number or label to ask for (--server, --grpc). Empty: latest.",
        "predict",
    )
    top_k: int = _field(5, "How many classes to show per image.", "predict")
    json: bool = _field(False, "Print the predictions as JSON.", "predict")

    # ---------------------------------------------------------------- derived values
    @property
    def is_offline_default(self) -> bool:
        return not self.data

    @property
    def export_base(self) -> str:
        return self.export_dir or os.path.join(self.model_dir, "export")

    @property
    def unfreeze_layers(self) -> int | None:
        """Top backbone layers to train: 0 = frozen, None = all."""
        return None if self.unfreeze == "all" else int(self.unfreeze)

    def to_flagfile(self) -> str:
        """The resolved config as absl flagfile lines: `--flagfile=<it>` reruns the run."""
        lines = ["# Written by tf-finetune: rerun with --flagfile=<this file>."]
        for f in dataclasses.fields(self):
            if f.metadata["group"] in NOT_IN_FLAGFILE:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool):
                lines.append(f"--{f.name}" if value else f"--no{f.name}")
            else:
                lines.append(f"--{f.name}={value}")
        return "\n".join(lines) + "\n"


def is_table_file(path: str) -> bool:
    """A CSV/TSV file of text examples (the delimiter comes from the extension)."""
    return path.lower().endswith((".csv", ".tsv"))


def validate(config: Config) -> None:
    """Checks every value a user can get wrong, before anything heavy runs.

    Raises:
      UserError: one line saying what is wrong and what to do.
    """
    positive = ("epochs", "batch_size", "cpu_replicas")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {config.learning_rate}.")
    for name in ("dropout", "label_smoothing"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {value}.")
    if not 0 < config.validation_percent < 100:
        raise UserError(
            f"--validation_percent must be between 1 and 99, got {config.validation_percent}."
        )
    if config.image_size < 0:
        raise UserError("--image_size must be positive (or 0 for the backbone's default).")
    if config.backbone_alpha <= 0:
        raise UserError(f"--backbone_alpha must be positive, got {config.backbone_alpha}.")
    if config.weight_decay < 0:
        raise UserError(f"--weight_decay must be >= 0, got {config.weight_decay}.")
    if config.unfreeze != "all" and not (config.unfreeze.isdigit()):
        raise UserError(
            f"--unfreeze must be 0, a number of top layers, or all; got {config.unfreeze!r}."
        )
    if config.cache in ("memory", "disk") and config.unfreeze != "0":
        raise UserError(
            f"--cache={config.cache} needs a frozen backbone (--unfreeze=0): the features of a "
            "backbone that trains change every step. Use --cache=auto or none."
        )
    for name in ("early_stopping_patience", "reduce_lr_patience"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name} must be >= 0 (0 turns it off).")
    if config.data and not config.data.startswith("tfds:"):
        if not os.path.exists(config.data):
            raise UserError(f"--data={config.data}: no such folder.")
        if not os.path.isdir(config.data) and not is_table_file(config.data):
            raise UserError(
                f"--data={config.data} is a file; pass the folder that holds one subfolder per "
                "class (or, for text, a .csv or .tsv file)."
            )
    if config.data and os.path.isdir(config.data):
        visible = [n for n in os.listdir(config.data) if not n.startswith(".")]
        if not visible:
            raise UserError(
                f"--data={config.data} is an empty folder; put one subfolder of images per class "
                "in it (or train/ val/ test/ folders that each hold them)."
            )
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        tfds_only = [
            n
            for n in ("train_split", "val_split", "test_split")
            if getattr(config, n) != defaults[n]
        ]
        if tfds_only:
            raise UserError(
                f"--{tfds_only[0]} selects a TFDS split, but --data={config.data} is a folder: "
                "a folder's splits are its train/ val/ test/ subfolders (or --validation_percent)."
            )
    if config.weight_decay != Config.weight_decay and config.optimizer != "adamw":
        raise UserError(
            f"--weight_decay only applies to --optimizer=adamw (got --optimizer={config.optimizer}); "
            "add --optimizer=adamw or drop --weight_decay."
        )
    if config.cpu_replicas > 1 and config.strategy in ("one_device", "multi_worker"):
        raise UserError(
            f"--cpu_replicas={config.cpu_replicas} splits the CPU for MirroredStrategy; it "
            f"conflicts with --strategy={config.strategy} (use --strategy=auto or mirrored)."
        )
    if config.data_service:
        host, _, port = config.data_service.removeprefix("grpc://").rpartition(":")
        if not config.data_service.startswith("grpc://") or not host or not port.isdigit():
            raise UserError(
                f"--data_service={config.data_service} must look like grpc://HOST:PORT "
                "(the tf.data service dispatcher)."
            )
        if config.strategy == "multi_worker":
            raise UserError(
                "--data_service with --strategy=multi_worker is not supported; use one of them."
            )
    if config.strategy == "multi_worker":
        from tf_finetune import multiworker

        multiworker.parse_tf_config()  # a missing or malformed TF_CONFIG, before any TF op
    if config.data.startswith("tfds:") and not config.data[5:]:
        raise UserError("--data=tfds:NAME needs a dataset name, e.g. tfds:tf_flowers.")
    if config.quantize != "none" and config.format != "tflite":
        raise UserError(f"--quantize={config.quantize} needs --format=tflite.")
    if config.export_version < 0:
        raise UserError(
            f"--export_version must be >= 1 (0: the next free one), got {config.export_version}."
        )
    if config.export_version and config.format == "saved_model":
        pinned = os.path.join(config.export_base, str(config.export_version))
        if os.path.exists(pinned):
            raise UserError(
                f"export version {pinned} exists and versions are never overwritten; pass "
                "another --export_version, or none for the next free one."
            )
    if config.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {config.top_k}.")
    weights = config.weights
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise UserError(f"--weights={weights}: not imagenet, none, or an existing weights file.")


# The offline default's own settings, used where the user did not set the flag. The digits
# 0-4 features do not separate the digits 5-9 linearly well enough for a frozen backbone to
# shine from 10 images per class (a linear probe reaches ~0.70); fine-tuning the whole
# pretrained CNN does (~0.79 test accuracy vs ~0.50 for the same net from scratch), in seconds.
OFFLINE_DEFAULT_PRESET = {"unfreeze": "all", "epochs": 30, "batch_size": 16}


def resolve(config: Config, explicit: frozenset[str] = frozenset()) -> Config:
    """Fills the `auto`/0 defaults that depend on other values, and validates.

    Args:
      config: as parsed.
      explicit: names of the flags the user set; the offline default's preset fills the rest.

    Returns:
      What the run uses and what `flags.cfg` records.
    """
    from tf_finetune import backbones, hub_model

    if config.is_offline_default:
        preset = {k: v for k, v in OFFLINE_DEFAULT_PRESET.items() if k not in explicit}
        config = dataclasses.replace(config, **preset)
    validate(config)
    if hub_model.is_hub_backbone(config.backbone):
        return hub_model.resolve(config)
    if config.preprocessor:
        raise UserError(
            "--preprocessor only applies to a TF Hub --backbone (a BERT-style encoder)."
        )
    backbone = config.backbone
    if backbone == "auto":
        backbone = "digits_cnn" if config.is_offline_default else "mobilenet_v2"
    spec = backbones.get_spec(backbone)
    image_size = config.image_size or spec.default_size
    if image_size < spec.min_size:
        raise UserError(
            f"--image_size={image_size} is too small for {backbone}: at least {spec.min_size}."
        )
    if config.backbone_alpha != 1.0 and not spec.has_alpha:
        raise UserError(f"--backbone_alpha only applies to MobileNet backbones, not {backbone}.")
    return dataclasses.replace(config, backbone=backbone, image_size=image_size)
