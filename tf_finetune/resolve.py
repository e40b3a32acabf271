"""From the flags as given to the config a run uses: the step after the Config is built.

Fills the values that depend on others or on the world (`auto` backbone, the backbone's image
size, a hub module's signature, the offline default's preset), validates everything
(validation.py), and refuses the combinations the chosen backbone and data cannot take.
This is where handles are resolved and modules downloaded, never in config.py.
"""

import dataclasses

from tf_finetune import backbone_table, keras_hub_table, validation
from tf_finetune.config import OFFLINE_DEFAULT_PRESET, Config
from tf_finetune.errors import UserError


def resolve(config: Config, explicit: frozenset[str] = frozenset()) -> Config:
    """Fills the `auto`/0 defaults that depend on other values, and validates.

    Args:
      config: as parsed.
      explicit: names of the flags the user set; the offline default's preset fills the rest.

    Returns:
      What the run uses and what `flags.cfg` records.
    """
    if config.is_offline_default:
        preset = {k: v for k, v in OFFLINE_DEFAULT_PRESET.items() if k not in explicit}
        config = dataclasses.replace(config, **preset)
    if "seed" in explicit and "deterministic" not in explicit:
        config = dataclasses.replace(config, deterministic=True)
    validation.validate(config)
    config = _resolve_backbone(config)
    _check_data_and_backbone(config)
    return _shrunk(config) if config.smoke else config


# --smoke: sizes only; the data (input_pipeline.SMOKE_EXAMPLES) shrinks when it is loaded.
SMOKE_SIZE, SMOKE_BATCH, SMOKE_TRIALS = 32, 8, 2


def _shrunk(config: Config) -> Config:
    """The same run at the smallest sizes it takes (`--smoke`)."""
    image_size = config.image_size
    if image_size and config.backbone in backbone_table.BACKBONES:  # a hub module fixes its own
        spec = backbone_table.get_spec(config.backbone)
        image_size = min(image_size, max(SMOKE_SIZE, spec.min_size))
    warmup = min(config.warmup_epochs, 1)
    return dataclasses.replace(
        config,
        image_size=image_size,
        epochs=warmup + 1 if config.two_phase else 1,
        warmup_epochs=warmup,
        batch_size=min(config.batch_size, SMOKE_BATCH),
        max_trials=min(config.max_trials, SMOKE_TRIALS),
    )


def check_resolved(config: Config) -> None:
    """Every rule again for a config derived from a resolved one (a compare variant, a tune
    trial): the flags, and what its backbone and data take."""
    validation.validate(config)
    if backbone_table.is_hub_backbone(config.backbone, config.model_dir):
        validation.hub_backbone_options(config)
    if keras_hub_table.is_keras_hub_backbone(config.backbone):
        from tf_finetune import keras_hub_model

        keras_hub_model.check_options(config)
    _check_data_and_backbone(config)


def _resolve_backbone(config: Config) -> Config:
    kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
    if kind == backbone_table.KERAS_HUB:
        if not keras_hub_table.is_keras_hub_backbone(config.backbone):  # a bare preset folder
            config = dataclasses.replace(config, backbone=f"keras_hub:{config.backbone}")
        from tf_finetune import keras_hub_model  # TensorFlow: only once a preset is named

        return keras_hub_model.resolve(config)
    if kind in backbone_table.OWN_KINDS:
        from tf_finetune import own_model  # TensorFlow: only once such a source is named

        return own_model.resolve(config)
    if kind == backbone_table.HUB:
        validation.hub_backbone_options(config)
        from tf_finetune import hub_model  # TensorFlow: only once a hub module is named

        return hub_model.resolve(config)
    validation.keras_backbone_options(config)
    return _resolve_keras_backbone(config)


def _resolve_keras_backbone(config: Config) -> Config:
    backbone = config.backbone
    if backbone == "auto":
        backbone = "digits_cnn" if config.is_offline_default else "mobilenet_v2"
    spec = backbone_table.get_spec(backbone)
    image_size = config.image_size or spec.default_size
    if image_size < spec.min_size:
        raise UserError(
            f"--image_size={image_size} is too small for {backbone}: at least {spec.min_size}."
        )
    if config.backbone_alpha != 1.0 and not spec.has_alpha:
        raise UserError(f"--backbone_alpha only applies to MobileNet backbones, not {backbone}.")
    return dataclasses.replace(config, backbone=backbone, image_size=image_size)


def _check_data_and_backbone(config: Config) -> None:
    """Local data only: whether a TFDS set holds text is known once it is open, so
    input_pipeline.load_data runs the same rule then."""
    from tf_finetune import text_data

    if not config.data.startswith("tfds:"):
        validation.data_matches_backbone(config, text_data.is_text_source(config))
