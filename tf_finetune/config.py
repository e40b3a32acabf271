"""The typed, frozen run configuration: every knob is declared here, once.

The CLI turns each field into an absl flag (name, type, default, help and topic come from the
field), parses the command line into a `Config`, and the library only ever sees the `Config`.
`Config.to_flagfile()` writes the resolved values as a flagfile: `--flagfile=<it>` reruns the run.
"""

import csv
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


def _field(
    default,
    help: str,
    group: str,
    choices: tuple[str, ...] | None = None,
    *,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    positive: bool = False,
):
    """A flag: its default, help, topic and simple constraints (checked by `check_fields`).

    Args:
      choices: the allowed values.
      at_least / at_most: inclusive bounds; below: an exclusive upper bound.
      positive: must be > 0.
    """
    bounds = {"at_least": at_least, "below": below, "at_most": at_most, "positive": positive}
    return dataclasses.field(
        default=default,
        metadata={"help": help, "group": group, "choices": choices, **bounds},
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
        at_least=1,
        at_most=99,
    )
    image_size: int = _field(
        0, "Square input size in pixels. 0: the backbone's default.", "data", at_least=0
    )
    test_percent: int = _field(
        0,
        "Percent of the files held out as a test split, from a plain class folder or a single "
        "CSV/TSV (by the same hash as validation, so adding files never moves old ones). Both "
        "percents are shares of all files: 70/15/15 is --validation_percent=15 --test_percent=15. "
        "0: no test split (train/ val/ test/ folders and TFDS keep their own).",
        "data",
        at_least=0,
    )
    max_image_pixels: int = _field(
        89_478_485,
        "Images whose header announces more pixels than this (width x height x frames) are "
        "never decoded: skipped in training, refused (INVALID_ARGUMENT) by the export. "
        "Default: PIL's decompression-bomb limit.",
        "data",
        at_least=1,
    )
    split: str = _field(
        "auto",
        "The split 'tf-finetune evaluate' reports on. auto: test when the data has one, else "
        "val (optimistic: it chose the checkpoint).",
        "data",
        ("auto", "val", "test"),
    )
    text_column: str = _field(
        "text",
        "Text data: the CSV/TSV column (or TFDS feature) holding the text; several, "
        "comma-separated, are joined with a space (e.g. title,description).",
        "data",
    )
    label_column: str = _field(
        "label",
        "The CSV/TSV column (or TFDS feature) holding the label (multi-label: the labels, "
        "joined by --label_separator).",
        "data",
    )
    label_key: str = _field(
        "label",
        "TFDS image data: the class-label feature; nested ones with '/' (COCO's objects/label). "
        "A Sequence of class labels (VOC's labels) needs --task=multi_label.",
        "data",
    )
    file_column: str = _field(
        "file",
        "Image CSV/TSV: the column naming each image file (relative to the CSV's folder). A "
        ".csv/.tsv --data with this column and no --text_column holds images.",
        "data",
    )
    task: str = _field(
        "single_label",
        "single_label: one class per example (softmax). multi_label: any number of labels per "
        "example (sigmoid, binary cross-entropy, per-label thresholds chosen on val); data: an "
        "image CSV with --label_separator-joined labels, or class folders where one file name "
        "appears under several label folders.",
        "data",
        ("single_label", "multi_label"),
    )
    label_separator: str = _field(
        "|", "Multi-label CSV/TSV: the separator between the labels of one cell.", "data"
    )
    threshold_metric: str = _field(
        "f1",
        "Multi-label: how each label's threshold is chosen on val. f1: the threshold that "
        "maximises that label's F1; fixed: --threshold for every label.",
        "output",
        ("f1", "fixed"),
    )
    threshold: float = _field(
        0.5,
        "Multi-label: the threshold of --threshold_metric=fixed, and of labels without a "
        "positive validation example.",
        "output",
        at_least=0.0,
        at_most=1.0,
    )

    data_service: str = _field(
        "",
        "grpc://HOST:PORT of a tf.data service dispatcher: its workers read, decode and batch "
        "the training images (each example once per epoch), for input pipelines that outgrow "
        "this machine. The workers must see --data at the same path. Empty: local input.",
        "distribution",
    )

    # --- model ---
    backbone: str = _field(
        "auto",
        "A Keras Applications name (mobilenet_v2, efficientnet_b0, resnet50, ...; "
        "'tf-finetune backbones' lists them), or a TF Hub module: a https://tfhub.dev/... or "
        "https://www.kaggle.com/models/... URL, a gs:// path or a local SavedModel folder "
        "(image or text). Or your own model: a previous tf-finetune run dir (its trained "
        "weights are the start; same classes keep its head), a Keras 3 .keras file, or a "
        "Keras model.export() folder. Or keras_hub:PRESET: a keras-hub preset name or folder. "
        "auto: digits_cnn for the offline default, mobilenet_v2 otherwise.",
        "model",
    )
    backbone_layer: str = _field(
        "",
        "For a .keras --backbone: the layer whose output is the features (the cut point). "
        "Empty: its last pooling/feature layer.",
        "model",
    )
    backbone_alpha: float = _field(
        1.0, "Width multiplier of MobileNet backbones.", "model", positive=True
    )
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
    dropout: float = _field(
        0.2, "Dropout rate before the classification layer.", "model", at_least=0.0, below=1.0
    )
    unfreeze: str = _field(
        "0",
        "0: backbone frozen (the default); N: also train the top N backbone layers that have "
        "weights; a fraction like 0.3: the top 30% of them (rounded up); all: the whole "
        "backbone. BatchNormalization always stays frozen. With --warmup_epochs this is "
        "phase 2. 'tf-finetune compare' takes a list (0,20,all).",
        "model",
    )

    # --- training ---
    epochs: int = _field(10, "Number of epochs.", "training", at_least=1)
    batch_size: int = _field(
        32, "Global batch size (split across replicas).", "training", at_least=1
    )
    learning_rate: float = _field(1e-3, "Learning rate.", "training", positive=True)
    optimizer: str = _field("adam", "Optimizer.", "training", ("adam", "sgd", "adamw"))
    weight_decay: float = _field(
        1e-4, "Weight decay for --optimizer=adamw.", "training", at_least=0.0
    )
    label_smoothing: float = _field(
        0.0, "Label smoothing (0 to 1).", "training", at_least=0.0, below=1.0
    )
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
        at_least=0,
    )
    fine_tune_learning_rate: float = _field(
        0.0,
        "Learning rate of phase 2 (after --warmup_epochs). 0: --learning_rate / 10.",
        "training",
        at_least=0.0,
    )
    layer_lr_decay: float = _field(
        1.0,
        "Discriminative fine-tuning: the k-th trainable backbone layer from the top learns at "
        "decay**k of the rate (e.g. 0.95); the head at the full rate. 1: off.",
        "training",
        positive=True,
        at_most=1.0,
    )
    lr_schedule: str = _field(
        "constant",
        "Learning rate over each phase: constant, cosine (to 0 at the phase's end) or "
        "exponential (to 1/100 at the phase's end); after --warmup_steps of linear warmup.",
        "training",
        ("constant", "cosine", "exponential"),
    )
    warmup_steps: int = _field(
        0,
        "Linear learning-rate warmup over the first N steps of each phase.",
        "training",
        at_least=0,
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
    head_solver: str = _field(
        "auto",
        "How a head-only phase (--unfreeze=0, or the --warmup_epochs phase) trains the head. "
        "lbfgs: the linear-probe protocol, one L2-regularised softmax regression (a sigmoid "
        "per label with --task=multi_label) solved to optimum by L-BFGS on the cached features, "
        "the L2 strength chosen on val_loss (it replaces the phase's epochs, --learning_rate "
        "and --batch_size); fit: Keras fit for the phase's epochs; auto: lbfgs wherever the "
        "phase runs on cached features and no flag needs per-step training (--augment, "
        "--mixup, --ema, --sampling=balanced, ...), else fit. `tune` searches fit's knobs, so "
        "auto is fit there.",
        "training",
        ("auto", "fit", "lbfgs"),
    )
    cache_views: int = _field(
        0,
        "Augmentation at cached speed: N augmented views of each training image (horizontal "
        "flip and random-resized-crop jitter, seeded per image and view, made from its one "
        "decode) go through the frozen backbone once each and are cached with the clean view; "
        "the head (either --head_solver) trains on all of them, an epoch passing over every "
        "view. val and test stay clean. Needs a head-only phase on cached features. 0: off.",
        "training",
        at_least=0,
        at_most=16,
    )
    smoke: bool = _field(
        False,
        "Shrink every size so the run finishes in seconds: at most 16 training and 8 val/test "
        "examples, 1 epoch per phase, batch 8, images at the backbone's smallest size (32 px "
        "where it allows), 2 tune trials. Sources are unchanged: a check that a preset or a "
        "data set works end to end, not a result.",
        "training",
    )
    early_stopping_patience: int = _field(
        0, "Stop after N epochs without val_loss improvement (0: off).", "training", at_least=0
    )
    reduce_lr_patience: int = _field(
        0,
        "Divide the learning rate by 10 after N epochs without improvement (0: off).",
        "training",
        at_least=0,
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
        at_least=0.0,
    )
    cutmix: float = _field(
        0.0,
        "CutMix alpha (e.g. 1.0): paste a box of another training image, labels by area. "
        "0: off. With --mixup too, each batch uses one of them at random.",
        "regularization",
        at_least=0.0,
    )
    class_weight: str = _field(
        "none",
        "balanced: weight each class's loss by n_images / (n_classes * n_images_of_class), "
        "for imbalanced folders.",
        "regularization",
        ("none", "balanced"),
    )
    sampling: str = _field(
        "none",
        "balanced: training batches draw every class with equal probability (per-class "
        "tf.data streams, nothing copied; an epoch stays as many draws as the training split "
        "has examples), on pixels and on cached features alike. An alternative to "
        "--class_weight for long-tailed data, not to combine with it.",
        "regularization",
        ("none", "balanced"),
    )
    ema: float = _field(
        0.0,
        "Keep an exponential moving average of the weights with this momentum (e.g. 0.999); "
        "it is evaluated beside the best checkpoint. 0: off.",
        "regularization",
        at_least=0.0,
        below=1.0,
    )
    average_checkpoints: int = _field(
        0,
        "Also average the weights of the best K epochs by val_loss (as timm does) and "
        "evaluate that model beside the best checkpoint. 0: off.",
        "regularization",
        at_least=0,
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
        at_least=1,
    )

    # --- output ---
    label_issues: bool = _field(
        False,
        "tf-finetune evaluate: also list training images whose given label looks wrong "
        "(out-of-fold linear probes on the run's backbone features, confident learning) in "
        "<model_dir>/label_issues.json and label_issues.png.",
        "output",
    )
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
        at_least=0.0,
        at_most=1.0,
    )

    # --- tune (tf-finetune tune; each a comma list of choices, or LOW:HIGH for a range) ---
    tuner: str = _field(
        "random",
        "Search algorithm of 'tf-finetune tune' (KerasTuner).",
        "tune",
        ("random", "grid", "bayesian", "hyperband"),
    )
    max_trials: int = _field(
        10, "Trials 'tf-finetune tune' runs (not for hyperband).", "tune", at_least=1
    )
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
    max_quantization_drop: str = _field(
        "",
        "Refuse a TFLite export whose accuracy falls more than this below the float Keras "
        "model's (e.g. 0.01), on the split --min_accuracy uses (test if any, else "
        "validation): one line, exit 3, nothing written. Empty: off.",
        "export",
    )
    export_version: int = _field(
        0,
        "SavedModel version to write (never overwrites one). 0: the next free version.",
        "export",
        at_least=0,
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
    top_k: int = _field(5, "How many classes to show per image.", "predict", at_least=1)
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
    def monitor(self) -> tuple[str, str]:
        """(metric, "min" | "max") that chooses checkpoints, stops early and lowers the rate:
        val_loss, or for multi-label the val mAP."""
        return ("val_map", "max") if self.task == "multi_label" else ("val_loss", "min")

    @property
    def two_phase(self) -> bool:
        """Head first with the backbone frozen, then fine-tuning (see `phases.plan`)."""
        return self.warmup_epochs > 0 and self.unfreeze_layers != 0

    @property
    def quantization_drop_limit(self) -> float | None:
        """--max_quantization_drop as a number (validation checked it), None when off."""
        return float(self.max_quantization_drop) if self.max_quantization_drop else None

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
    """A CSV/TSV file of examples (the delimiter comes from the extension)."""
    return path.lower().endswith((".csv", ".tsv"))


def table_holds_images(path: str, file_column: str, text_column: str) -> bool:
    """A CSV/TSV whose header names `file_column` and none of `text_column`'s columns: each
    row names an image file. Reads the header line only."""
    if not (is_table_file(path) and os.path.isfile(path)):
        return False
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = [h.strip() for h in next(csv.reader(f, delimiter=delimiter), [])]
    texts = [c.strip() for c in text_column.split(",") if c.strip()]
    return file_column in header and not any(c in header for c in texts)


def _bound_error(f: dataclasses.Field, value) -> str | None:
    """What is wrong with `value` for the field's declared bounds, or None."""
    meta = f.metadata
    low, below, high = meta.get("at_least"), meta.get("below"), meta.get("at_most")
    if meta.get("positive") and not value > 0:
        return "must be positive"
    if low is not None and value < low:
        if below is not None:
            return f"must be in [{low}, {below})"
        return f"must be at least {low}" if high is None else f"must be in [{low}, {high}]"
    if below is not None and not value < below:
        return f"must be in [{low}, {below})" if low is not None else f"must be below {below}"
    if high is not None and value > high:
        return f"must be in [{low}, {high}]" if low is not None else f"must be at most {high}"
    return None


def check_fields(config: Config) -> None:
    """Each flag's own constraints, as its field declares them (choices, bounds).

    Raises:
      UserError: one line naming the flag, the rule and the value.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"--{f.name}={value}: must be one of {', '.join(choices)}.")
        problem = None if isinstance(value, bool | str) else _bound_error(f, value)
        if problem:
            raise UserError(f"--{f.name} {problem}, got {value}.")


def augmentation_free(config: Config) -> bool:
    """Nothing changes the training images or needs the whole model at every step, so a
    head-only phase can train on cached backbone features (see feature_fit.cache_mode)."""
    return (
        config.augment == "none"
        and not config.mixup
        and not config.cutmix
        and not config.ema
        and not config.average_checkpoints
    )


# The offline default's own settings, used where the user did not set the flag. The digits
# 0-4 features do not separate the digits 5-9 linearly well enough for a frozen backbone to
# shine from 10 images per class (a linear probe reaches ~0.70); fine-tuning the whole
# pretrained CNN does (~0.70 test accuracy vs ~0.50 for the same net from scratch), in seconds.
# Deterministic, so the README's numbers come out to the digit.
OFFLINE_DEFAULT_PRESET = {"unfreeze": "all", "epochs": 30, "batch_size": 16, "deterministic": True}
