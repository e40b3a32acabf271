"""Every check of a run's flags, in one place, before anything heavy runs.

Each flag's own constraints (choices, ranges) are declared with its field in config.py and
checked by `config.check_fields`; the rules between flags are the small named functions below,
run in order by `validate`. A rule raises `UserError` with one line saying what is wrong and
what to do. Rules that look at the world (the data folder, TF_CONFIG) come last.
"""

import dataclasses
import os
from collections.abc import Callable

from tf_finetune import backbone_table, splits
from tf_finetune import config as config_lib
from tf_finetune.config import Config
from tf_finetune.errors import UserError


# ----------------------------------------------------------------------------- flags alone
def unfreeze_values(config: Config) -> None:
    for value in config.unfreeze.split(","):  # a list only reaches 'compare'
        config_lib.parse_unfreeze(value)


def warmup_leaves_fine_tuning(config: Config) -> None:
    # Each --unfreeze value (compare takes a list) that unfreezes anything makes two phases.
    unfreezes = any(config_lib.parse_unfreeze(v) != 0 for v in config.unfreeze.split(","))
    if config.warmup_epochs and unfreezes and config.warmup_epochs >= config.epochs:
        raise UserError(
            f"--warmup_epochs={config.warmup_epochs} leaves no fine-tuning epoch: --epochs counts "
            f"both phases, so set it above {config.warmup_epochs}."
        )


def cache_needs_frozen_features(config: Config) -> None:
    has_head_only_phase = config.unfreeze == "0" or config.warmup_epochs > 0
    if config.cache in ("memory", "disk") and not (
        has_head_only_phase and config_lib.augmentation_free(config)
    ):
        raise UserError(
            f"--cache={config.cache} needs a frozen backbone (--unfreeze=0, or the head-only "
            "phase of --warmup_epochs) and no --augment/--mixup/--cutmix/--ema/"
            "--average_checkpoints: the features of a backbone that trains, or of augmented "
            "images, change every step. Use --cache=auto or none."
        )


# --head_solver=lbfgs solves the head once on cached features of a frozen backbone: anything
# that changes the images, needs the whole model at every step, or trains the backbone is out.
_LBFGS = "--head_solver=lbfgs solves the head once on cached features of a frozen backbone"


def lbfgs_obstacle(config: Config) -> str | None:
    """Why this run's head-only phase cannot be solved by L-BFGS (one line saying what to do),
    or None. An explicit --head_solver=lbfgs is refused with it; `auto` falls back to fit."""
    if backbone_table.is_hub_backbone(config.backbone) and config.unfreeze == "all":
        return (
            f"{_LBFGS}; --unfreeze=all trains the hub module (e.g. a text encoder): use "
            "--unfreeze=0 with it, or --head_solver=fit."
        )
    if _only_phase_trains_the_backbone(config):
        return (
            f"{_LBFGS}; --unfreeze={config.unfreeze} trains the backbone in the only phase: "
            "use --unfreeze=0, add --warmup_epochs (lbfgs then solves the head phase), or "
            "--head_solver=fit."
        )
    conflicts = _without_feature_cache(config)
    if conflicts:
        flag, reason = conflicts[0]
        return f"{_LBFGS}; {flag} {reason}: drop it, or use --head_solver=fit."
    if config.sampling == "balanced":
        balanced = config.class_weight == "balanced"
        instead = "drop --sampling" if balanced else "use --class_weight=balanced with it"
        return (
            "--sampling=balanced draws training batches; --head_solver=lbfgs solves on every "
            f"feature at once: {instead}, or --head_solver=fit."
        )
    return None


def lbfgs_can_solve_the_head(config: Config) -> None:
    if config.head_solver == "lbfgs" and (obstacle := lbfgs_obstacle(config)):
        raise UserError(obstacle)


def _only_phase_trains_the_backbone(config: Config) -> bool:
    """No head-only phase: the run's one phase unfreezes some of the backbone."""
    unfreezes = any(config_lib.parse_unfreeze(v) != 0 for v in config.unfreeze.split(","))
    return unfreezes and not config.warmup_epochs


def _without_feature_cache(config: Config) -> list[tuple[str, str]]:
    """(flag, why) for each flag that keeps a head-only phase off cached features."""
    pixels = "every step, on pixels (no feature cache)"
    conflicts = (
        (f"--augment={config.augment}", config.augment != "none", f"augments images {pixels}"),
        ("--mixup", config.mixup, f"mixes images {pixels}"),
        ("--cutmix", config.cutmix, f"mixes images {pixels}"),
        ("--ema", config.ema, "averages the weights of every training step"),
        ("--average_checkpoints", config.average_checkpoints, "averages the weights of epochs"),
        ("--cache=none", config.cache == "none", "turns the feature cache off"),
        ("--strategy=multi_worker", config.strategy == "multi_worker", "trains on pixels"),
        ("--data_service", config.data_service, "trains on pixels"),
    )
    return [(flag, why) for flag, value, why in conflicts if value]


# --cache_views=N caches augmented views of the training images as features of the frozen
# backbone: only a head-only phase on cached features can train on them.
_VIEWS = "--cache_views augments the cached features of a frozen backbone's head-only phase"


def cache_views_need_cached_features(config: Config) -> None:
    if not config.cache_views:
        return
    if _only_phase_trains_the_backbone(config):
        raise UserError(
            f"{_VIEWS}; --unfreeze={config.unfreeze} trains the backbone in the only phase: "
            "use --unfreeze=0, add --warmup_epochs (the views then train its head phase), or "
            "--augment for augmentation on pixels."
        )
    conflicts = _without_feature_cache(config)
    if conflicts:
        flag, reason = conflicts[0]
        raise UserError(f"{_VIEWS}; {flag} {reason}: drop one of them.")


def weight_decay_needs_adamw(config: Config) -> None:
    if config.weight_decay != Config.weight_decay and config.optimizer != "adamw":
        raise UserError(
            f"--weight_decay only applies to --optimizer=adamw (got --optimizer={config.optimizer}); "
            "add --optimizer=adamw or drop --weight_decay."
        )


def schedule_or_plateau(config: Config) -> None:
    if config.reduce_lr_patience and (config.lr_schedule != "constant" or config.warmup_steps):
        raise UserError(
            "--reduce_lr_patience cannot change a scheduled learning rate (--lr_schedule="
            f"{config.lr_schedule}, --warmup_steps={config.warmup_steps}): the schedule sets it "
            "every step; use one or the other."
        )


def cpu_replicas_need_mirrored(config: Config) -> None:
    if config.cpu_replicas > 1 and config.strategy in ("one_device", "multi_worker"):
        raise UserError(
            f"--cpu_replicas={config.cpu_replicas} splits the CPU for MirroredStrategy; it "
            f"conflicts with --strategy={config.strategy} (use --strategy=auto or mirrored)."
        )


def data_service_address(config: Config) -> None:
    if not config.data_service:
        return
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


def tfds_name(config: Config) -> None:
    if config.data.startswith("tfds:") and not config.data[5:]:
        raise UserError("--data=tfds:NAME needs a dataset name, e.g. tfds:tf_flowers.")


def quantize_needs_tflite(config: Config) -> None:
    if config.quantize != "none" and config.format != "tflite":
        raise UserError(f"--quantize={config.quantize} needs --format=tflite.")


def sampling_or_class_weight(config: Config) -> None:
    if config.sampling != "balanced":
        return
    if config.class_weight != "none":
        raise UserError(
            f"--sampling=balanced and --class_weight={config.class_weight} both correct the "
            "same imbalance (together they over-correct it): use one of them."
        )


def quantization_drop(config: Config) -> None:
    if not config.max_quantization_drop:
        return
    if config.format != "tflite":
        raise UserError("--max_quantization_drop gates TFLite exports: add --format=tflite.")
    try:
        value = float(config.max_quantization_drop)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise UserError(
            f"--max_quantization_drop={config.max_quantization_drop}: an accuracy drop between "
            "0 and 1, e.g. 0.01 (one point), or empty for no check."
        )


# ----------------------------------------------------------------------------- the world
def test_percent_fits(config: Config) -> None:
    splits.check_test_percent(config.data, config.validation_percent, config.test_percent)


def data_exists(config: Config) -> None:
    if not config.data or config.data.startswith("tfds:"):
        return
    if not os.path.exists(config.data):
        raise UserError(f"--data={config.data}: no such folder.")
    if not os.path.isdir(config.data) and not config_lib.is_table_file(config.data):
        raise UserError(
            f"--data={config.data} is a file; pass the folder that holds one subfolder per "
            "class (or, for text, a .csv or .tsv file)."
        )


def folder_takes_no_tfds_splits(config: Config) -> None:
    if not (config.data and os.path.isdir(config.data)):
        return
    visible = [n for n in os.listdir(config.data) if not n.startswith(".")]
    if not visible:
        raise UserError(
            f"--data={config.data} is an empty folder; put one subfolder of images per class "
            "in it (or train/ val/ test/ folders that each hold them)."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    tfds_only = [
        n for n in ("train_split", "val_split", "test_split") if getattr(config, n) != defaults[n]
    ]
    if tfds_only:
        raise UserError(
            f"--{tfds_only[0]} selects a TFDS split, but --data={config.data} is a folder: "
            "a folder's splits are its train/ val/ test/ subfolders (or --validation_percent)."
        )


def weights_file_exists(config: Config) -> None:
    if config.weights not in ("imagenet", "none") and not os.path.isfile(config.weights):
        raise UserError(
            f"--weights={config.weights}: not imagenet, none, or an existing weights file."
        )


def own_source_carries_weights(config: Config) -> None:
    """A run dir, a .keras file or a Keras export brings its trained weights: --weights has
    nothing to load into it."""
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    if kind in backbone_table.OWN_KINDS and config.weights != Config.weights:
        raise UserError(
            f"--weights={config.weights} does not apply to --backbone={config.backbone}: it "
            "carries its own trained weights; drop --weights."
        )


def backbone_layer_needs_keras_file(config: Config) -> None:
    if config.backbone_layer and (
        backbone_table.backbone_kind(config.backbone, config.model_dir) != backbone_table.KERAS_FILE
    ):
        raise UserError(
            f"--backbone_layer={config.backbone_layer} picks the cut point of a .keras "
            f"--backbone; --backbone={config.backbone} is not one: drop --backbone_layer."
        )


def export_version_is_new(config: Config) -> None:
    if config.export_version and config.format == "saved_model":
        pinned = os.path.join(config.export_base, str(config.export_version))
        if os.path.exists(pinned):
            raise UserError(
                f"export version {pinned} exists and versions are never overwritten; pass "
                "another --export_version, or none for the next free one."
            )


def tf_config_for_multi_worker(config: Config) -> None:
    if config.strategy == "multi_worker":
        from tf_finetune import multiworker

        multiworker.parse_tf_config()  # a missing or malformed TF_CONFIG, before any TF op


def multi_label_sources(config: Config) -> None:
    """Multi-label reads an image CSV/TSV or a tag-folder tree (for now)."""
    if config.task != "multi_label":
        return
    if not config.data:
        raise UserError(
            "--task=multi_label needs --data: an image or text CSV/TSV, a folder of label "
            "folders, or a TFDS data set with a Sequence of class labels (tfds:voc)."
        )
    if os.path.isdir(config.data) and splits.own_splits(config.data):
        raise UserError(
            f"--task=multi_label: --data={config.data} has its own train/ val/ folders; a "
            "multi-label folder holds one folder per label (splits are carved by hash)."
        )


def multi_label_options(config: Config) -> None:
    """What a sigmoid head does not take yet."""
    if config.task != "multi_label":
        return
    refused = {
        "--mixup/--cutmix": bool(config.mixup or config.cutmix),
        "--sampling=balanced": config.sampling == "balanced",
        "--label_issues": config.label_issues,
    }
    named = [flag for flag, on in refused.items() if on]
    if named:
        raise UserError(
            f"{', '.join(named)} with --task=multi_label is not supported: "
            f"{'it assumes' if len(named) == 1 else 'they assume'} one class per example."
        )


RULES: tuple[Callable[[Config], None], ...] = (
    unfreeze_values,
    warmup_leaves_fine_tuning,
    cache_needs_frozen_features,
    lbfgs_can_solve_the_head,
    cache_views_need_cached_features,
    weight_decay_needs_adamw,
    schedule_or_plateau,
    cpu_replicas_need_mirrored,
    data_service_address,
    tfds_name,
    quantize_needs_tflite,
    sampling_or_class_weight,
    quantization_drop,
    data_exists,
    test_percent_fits,
    folder_takes_no_tfds_splits,
    own_source_carries_weights,
    weights_file_exists,
    backbone_layer_needs_keras_file,
    export_version_is_new,
    tf_config_for_multi_worker,
    multi_label_sources,
    multi_label_options,
)


def validate(config: Config) -> None:
    """Checks every value a user can get wrong, before anything heavy runs.

    Raises:
      UserError: one line saying what is wrong and what to do.
    """
    config_lib.check_fields(config)
    for rule in RULES:
        rule(config)


# ----------------------------------------------------------------------------- the backbone
def hub_backbone_options(config: Config) -> None:
    """A TF Hub module is one layer with its own weights."""
    if config.unfreeze not in ("0", "all"):
        raise UserError(
            f"--unfreeze={config.unfreeze}: a hub module is a single layer; use --unfreeze=0 "
            "(frozen) or --unfreeze=all (fine-tune it)."
        )
    if config.two_phase or config.layer_lr_decay < 1.0:
        raise UserError(
            "--warmup_epochs and --layer_lr_decay need a Keras Applications backbone: a TF Hub "
            "module is one layer (--unfreeze=0 or all)."
        )
    if config.weights != "imagenet":
        raise UserError(
            f"--weights={config.weights} does not apply to a hub backbone: the module brings "
            "its own weights; drop --weights."
        )
    if config.backbone_alpha != 1.0:
        raise UserError("--backbone_alpha only applies to Keras MobileNet backbones, not hub ones.")


def keras_backbone_options(config: Config) -> None:
    if config.preprocessor:
        raise UserError(
            "--preprocessor only applies to a TF Hub --backbone (a BERT-style encoder)."
        )


def text_takes_no_augmentation(config: Config) -> None:
    if config.augment != "none" or config.mixup or config.cutmix or config.cache_views:
        raise UserError(
            "--augment, --mixup, --cutmix and --cache_views transform images; text data takes none."
        )


def data_matches_backbone(config: Config, text_data: bool) -> None:
    """Text data needs a text model and images an image backbone (a resolved text model has
    no image size; a Keras Applications backbone always takes images)."""
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    text_model = config.image_size == 0 and kind != backbone_table.APPLICATIONS
    if text_data and not text_model:
        raise UserError(
            f"--data={config.data} is text; pass a TF Hub text module as --backbone "
            "(e.g. https://tfhub.dev/google/nnlm-en-dim50/2), see configs/imdb_nnlm.cfg."
        )
    if text_model and not text_data:
        raise UserError(
            f"--backbone={config.backbone} is a text module but --data={config.data or '(digits)'} "
            "holds images; pass a .csv/.tsv file or a TFDS text data set."
        )
    if text_data:
        text_takes_no_augmentation(config)
