"""The typed, frozen run configuration: every knob is declared here, once.

The CLI turns each field into an absl flag (name, type, default, help and topic come from the
field), parses the command line into a `Config`, and the library only ever sees the `Config`.
`Config.to_flagfile()` writes the resolved values as a flagfile: `--flagfile=<it>` reruns the run.
"""

import dataclasses
import os

from tf_finetune.errors import UserError

# Topics, in the order `--help` shows them.
GROUPS = (
    "data",
    "model",
    "training",
    "regularization",
    "distribution",
    "output",
    "tune",
    "export",
    "predict",
)
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
    max_image_pixels: int = _field(
        89_478_485,
        "Images whose header announces more pixels than this (width x height x frames) are "
        "never decoded: skipped in training, refused (INVALID_ARGUMENT) by the export. "
        "Default: PIL's decompression-bomb limit.",
        "data",
    )
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
        "weights; a fraction like 0.3: the top 30% of them (rounded up); all: the whole "
        "backbone. BatchNormalization always stays frozen. With --warmup_epochs this is "
        "phase 2. 'tf-finetune compare' takes a list (0,20,all).",
        "model",
    )

    # --- training ---
    epochs: int = _field(10, "Number of epochs.", "training")
    batch_size: int = _field(32, "Global batch size (split across replicas).", "training")
    learning_rate: float = _field(1e-3, "Learning rate.", "training")
    optimizer: str = _field("adam", "Optimizer.", "training", ("adam", "sgd", "adamw"))
    weight_decay: float = _field(1e-4, "Weight decay for --optimizer=adamw.", "training")
    label_smoothing: float = _field(0.0, "Label smoothing (0 to 1).", "training")
    seed: int = _field(
        42,
        "Random seed: fixes the splits carved from TFDS, the shuffle order, the initial weights "
        "and dropout. Given explicitly, it also turns on --deterministic.",
        "training",
    )
    deterministic: bool = _field(
        False,
        "Bit-reproducible runs on CPU: op determinism, and the input pipeline hands images to "
        "fit in order (otherwise a slow image does not hold up the ones behind it). "
        "Default: on when --seed is given, off otherwise.",
        "training",
    )
    warmup_epochs: int = _field(
        0,
        "Two-phase fine-tuning: train only the head (backbone frozen) for N epochs, then "
        "unfreeze per --unfreeze until --epochs (which counts both phases). 0: one phase.",
        "training",
    )
    fine_tune_learning_rate: float = _field(
        0.0,
        "Learning rate of phase 2 (after --warmup_epochs). 0: --learning_rate / 10.",
        "training",
    )
    layer_lr_decay: float = _field(
        1.0,
        "Discriminative fine-tuning: the k-th trainable backbone layer from the top learns at "
        "decay**k of the rate (e.g. 0.95); the head at the full rate. 1: off.",
        "training",
    )
    lr_schedule: str = _field(
        "constant",
        "Learning rate over each phase: constant, cosine (to 0 at the phase's end) or "
        "exponential (to 1/100 at the phase's end); after --warmup_steps of linear warmup.",
        "training",
        ("constant", "cosine", "exponential"),
    )
    warmup_steps: int = _field(
        0, "Linear learning-rate warmup over the first N steps of each phase.", "training"
    )
    precision: str = _field(
        "float32",
        "Compute precision (keras.mixed_precision policy); the output layer stays float32. "
        "mixed_float16 pays off on recent NVIDIA GPUs, mixed_bfloat16 on TPUs and new CPUs.",
        "training",
        ("float32", "mixed_float16", "mixed_bfloat16"),
    )
    jit_compile: bool = _field(
        False, "Compile the train step with XLA (turns op determinism off).", "training"
    )
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

    # --- regularization ---
    augment: str = _field(
        "none",
        "Random augmentation of training batches (Keras preprocessing layers in the training "
        "input pipeline, never in the export): light = flip, rotation, zoom; strong = also "
        "translation and contrast, larger ranges.",
        "regularization",
        ("none", "light", "strong"),
    )
    mixup: float = _field(
        0.0,
        "Mixup alpha (e.g. 0.2): blend pairs of training images and labels. 0: off.",
        "regularization",
    )
    cutmix: float = _field(
        0.0,
        "CutMix alpha (e.g. 1.0): paste a box of another training image, labels by area. "
        "0: off. With --mixup too, each batch uses one of them at random.",
        "regularization",
    )
    class_weight: str = _field(
        "none",
        "balanced: weight each class's loss by n_images / (n_classes * n_images_of_class), "
        "for imbalanced folders.",
        "regularization",
        ("none", "balanced"),
    )
    ema: float = _field(
        0.0,
        "Keep an exponential moving average of the weights with this momentum (e.g. 0.999); "
        "it is evaluated beside the best checkpoint. 0: off.",
        "regularization",
    )
    average_checkpoints: int = _field(
        0,
        "Also average the weights of the best K epochs by val_loss (as timm does) and "
        "evaluate that model beside the best checkpoint. 0: off.",
        "regularization",
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
    min_accuracy: float = _field(
        0.0,
        "Refuse to export when the final model's accuracy (test split if any, else "
        "validation) is below this, e.g. 0.9: exit 3, the run directory kept. 0: off.",
        "output",
    )

    # --- tune (tf-finetune tune; each a comma list of choices, or LOW:HIGH for a range) ---
    tuner: str = _field(
        "random",
        "Search algorithm of 'tf-finetune tune' (KerasTuner).",
        "tune",
        ("random", "grid", "bayesian", "hyperband"),
    )
    max_trials: int = _field(10, "Trials 'tf-finetune tune' runs (not for hyperband).", "tune")
    tune_learning_rate: str = _field(
        "", "Learning rates to try, e.g. 1e-4:1e-2 (log-uniform) or 1e-3,1e-2.", "tune"
    )
    tune_dropout: str = _field("", "Dropout rates to try, e.g. 0.1:0.5 or 0,0.2.", "tune")
    tune_unfreeze: str = _field("", "--unfreeze values to try, e.g. 0,20,all.", "tune")
    tune_augment: str = _field("", "--augment values to try, e.g. none,light.", "tune")
    tune_batch_size: str = _field("", "Batch sizes to try, e.g. 16,32,64.", "tune")
    tune_label_smoothing: str = _field("", "Label smoothing to try, e.g. 0,0.1.", "tune")

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
    def unfreeze_layers(self) -> int | float | None:
        """What to train in the backbone: 0 = frozen, N top layers, a float fraction, None = all."""
        return parse_unfreeze(self.unfreeze)

    @property
    def two_phase(self) -> bool:
        """Head first with the backbone frozen, then fine-tuning (see `phases.plan`)."""
        return self.warmup_epochs > 0 and self.unfreeze_layers != 0

    @property
    def fine_tune_lr(self) -> float:
        return self.fine_tune_learning_rate or self.learning_rate / 10

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


def parse_unfreeze(value: str) -> int | float | None:
    """'all' -> None, '20' -> 20, '0.3' -> 0.3 (a fraction of the layers).

    Raises:
      UserError: for anything else (including a list: only 'compare' takes one).
    """
    if value == "all":
        return None
    if value.isdigit():
        return int(value)
    if "," in value:
        raise UserError(
            f"--unfreeze={value} is a list: 'tf-finetune compare' runs one variant per value; "
            "train takes one (0, N, a fraction like 0.3, or all)."
        )
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise UserError(
            f"--unfreeze must be 0, a number of top layers, a fraction in (0, 1] like 0.3, "
            f"or all; got {value!r}."
        )
    return fraction


def is_table_file(path: str) -> bool:
    """A CSV/TSV file of text examples (the delimiter comes from the extension)."""
    return path.lower().endswith((".csv", ".tsv"))


def validate(config: Config) -> None:
    """Checks every value a user can get wrong, before anything heavy runs.

    Raises:
      UserError: one line saying what is wrong and what to do.
    """
    for f in dataclasses.fields(config):  # the CLI checks these; library callers may not
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise UserError(
                f"--{f.name}={getattr(config, f.name)}: must be one of {', '.join(choices)}."
            )
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
    if config.max_image_pixels < 1:
        raise UserError(f"--max_image_pixels must be at least 1, got {config.max_image_pixels}.")
    if config.backbone_alpha <= 0:
        raise UserError(f"--backbone_alpha must be positive, got {config.backbone_alpha}.")
    if config.weight_decay < 0:
        raise UserError(f"--weight_decay must be >= 0, got {config.weight_decay}.")
    for value in config.unfreeze.split(","):  # a list only reaches 'compare'
        parse_unfreeze(value)
    validate_training_options(config)
    has_head_only_phase = config.unfreeze == "0" or config.warmup_epochs > 0
    if config.cache in ("memory", "disk") and not (
        has_head_only_phase and augmentation_free(config)
    ):
        raise UserError(
            f"--cache={config.cache} needs a frozen backbone (--unfreeze=0, or the head-only "
            "phase of --warmup_epochs) and no --augment/--mixup/--cutmix/--ema/"
            "--average_checkpoints: the features of a backbone that trains, or of augmented "
            "images, change every step. Use --cache=auto or none."
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


def augmentation_free(config: Config) -> bool:
    """Nothing changes the training images or needs the whole model at every step, so a
    head-only phase can train on cached backbone features (see train.cache_mode)."""
    return (
        config.augment == "none"
        and not config.mixup
        and not config.cutmix
        and not config.ema
        and not config.average_checkpoints
    )


def validate_training_options(config: Config) -> None:
    """The fine-tuning, regularization, gate and search flags (issue 4)."""
    if config.warmup_epochs < 0 or config.warmup_steps < 0:
        raise UserError("--warmup_epochs and --warmup_steps must be >= 0 (0 turns them off).")
    # Each --unfreeze value (compare takes a list) that unfreezes anything makes two phases.
    unfreezes = any(parse_unfreeze(v) != 0 for v in config.unfreeze.split(","))
    if config.warmup_epochs and unfreezes and config.warmup_epochs >= config.epochs:
        raise UserError(
            f"--warmup_epochs={config.warmup_epochs} leaves no fine-tuning epoch: --epochs counts "
            f"both phases, so set it above {config.warmup_epochs}."
        )
    if not 0.0 < config.layer_lr_decay <= 1.0:
        raise UserError(
            f"--layer_lr_decay is in (0, 1] like 0.95 (1: off), got {config.layer_lr_decay}."
        )
    if config.fine_tune_learning_rate < 0:
        raise UserError("--fine_tune_learning_rate must be positive (0: --learning_rate / 10).")
    for name in ("mixup", "cutmix"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name} is a Beta distribution alpha: > 0 turns it on, 0 off.")
    if not 0.0 <= config.ema < 1.0:
        raise UserError(f"--ema is a momentum in [0, 1) like 0.999 (0: off), got {config.ema}.")
    if config.average_checkpoints < 0:
        raise UserError("--average_checkpoints must be >= 0 (0: off).")
    if not 0.0 <= config.min_accuracy <= 1.0:
        raise UserError(f"--min_accuracy is in [0, 1] like 0.9, got {config.min_accuracy}.")
    if config.reduce_lr_patience and (config.lr_schedule != "constant" or config.warmup_steps):
        raise UserError(
            "--reduce_lr_patience cannot change a scheduled learning rate (--lr_schedule="
            f"{config.lr_schedule}, --warmup_steps={config.warmup_steps}): the schedule sets it "
            "every step; use one or the other."
        )
    if config.max_trials < 1:
        raise UserError("--max_trials must be at least 1.")


# The offline default's own settings, used where the user did not set the flag. The digits
# 0-4 features do not separate the digits 5-9 linearly well enough for a frozen backbone to
# shine from 10 images per class (a linear probe reaches ~0.70); fine-tuning the whole
# pretrained CNN does (~0.70 test accuracy vs ~0.50 for the same net from scratch), in seconds.
# Deterministic, so the README's numbers come out to the digit.
OFFLINE_DEFAULT_PRESET = {"unfreeze": "all", "epochs": 30, "batch_size": 16, "deterministic": True}


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
    if "seed" in explicit and "deterministic" not in explicit:
        config = dataclasses.replace(config, deterministic=True)
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
