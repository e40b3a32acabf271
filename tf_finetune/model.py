"""Model assembly: raw pixels -> preprocessing -> frozen backbone -> named head layers, and
the configured optimizer, loss and metrics (`build_model(config, ...)`)."""

import dataclasses
import math

import keras
from absl import logging

from tf_finetune import (
    backbone_table,
    backbones,
    head,
    hub,
    hub_model,
    keras_hub_model,
    own_model,
    phases,
    rundir,
    schedules,
)
from tf_finetune.config import Config


def build_classifier(
    spec: backbones.BackboneSpec,
    num_classes: int,
    image_size: int,
    weights: str | None,
    dropout: float,
    alpha: float = 1.0,
    multi_label: bool = False,
) -> keras.Model:
    """Builds the classifier; the backbone starts frozen (`trainable=False`).

    The model takes raw 0-255 RGB pixels [batch, size, size, 3] and returns softmax
    probabilities (float32 even under mixed precision).
    """
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = backbones.Preprocessing(spec.preprocessing, name="preprocessing")(inputs)
    backbone = backbones.build_backbone(spec, image_size, weights, alpha)
    backbone.trainable = False
    # training=False keeps BatchNormalization in inference mode even when the backbone is
    # unfrozen later: its statistics were learned on far more data than the new task has.
    x = backbone(x, training=False)
    outputs = head.add_head(x, num_classes, dropout, multi_label=multi_label)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def get_backbone(model: keras.Model) -> keras.Model:
    """The backbone inside a classifier built by `build_classifier`."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one backbone model inside {model.name}, found {len(nested)}")
    return nested[0]


def unfreeze(model: keras.Model, top_layers: int | float | None) -> list[str]:
    """Makes the top backbone layers that have weights trainable.

    BatchNormalization layers stay frozen whatever the depth: trainable BN would update its
    moving statistics from the new task's small batches, and unfreezing them would also let
    the optimizer move gamma/beta away from the statistics the upper layers were trained
    with; the backbone is called with training=False (see `build_classifier`), so BN runs in
    inference mode and the pretrained features are not wrecked in the first fine-tuning steps
    (the Keras transfer-learning guide's advice).

    Args:
      model: built by `build_classifier`.
      top_layers: 0 = frozen, N = the top N weighted non-BN layers, a float in (0, 1] = that
        fraction of them (rounded up), None = all of them.

    Returns:
      The names of the backbone layers that are now trainable.
    """
    backbone = get_backbone(model)
    if top_layers == 0:
        backbone.trainable = False
        return []
    if isinstance(top_layers, float):
        weighted = [
            layer
            for layer in backbone.layers
            if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
        ]
        top_layers = max(1, math.ceil(top_layers * len(weighted)))
    backbone.trainable = True
    chosen = []
    for layer in reversed(backbone.layers):
        trainable = (
            bool(layer.weights)
            and not isinstance(layer, keras.layers.BatchNormalization)
            and (top_layers is None or len(chosen) < top_layers)
        )
        layer.trainable = trainable
        if trainable:
            _freeze_nested_batchnorm(layer)
            chosen.append(layer.name)
    return chosen[::-1]


def _freeze_nested_batchnorm(layer: keras.layers.Layer) -> None:
    """The BatchNorm rule inside composite layers too (keras-hub's MBConv blocks hold BN):
    setting `trainable` on a layer sets it on every sublayer."""
    # Private: Keras 3 has no public recursive list of sublayers; the `trainable` setter walks
    # this same one.
    for sub in layer._flatten_layers(include_self=False):
        if isinstance(sub, keras.layers.BatchNormalization):
            sub.trainable = False


# ----------------------------------------------------------------------------- configured
def weights_arg(config: Config) -> str | None:
    return None if config.weights == "none" else config.weights


def make_optimizer(
    config: Config,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.0,
    multipliers: dict[str, float] | None = None,
) -> keras.optimizers.Optimizer:
    """The configured optimizer at `learning_rate` (a float or schedule; 0: --learning_rate).

    `multipliers` (variable path -> factor) scale some variables' rates (--layer_lr_decay).
    """
    kwargs = {"learning_rate": learning_rate or config.learning_rate}
    if config.ema:
        # Keras keeps the EMA in the optimizer (restored by BackupAndRestore with the rest of
        # its state) and swaps it into the model when fit ends.
        kwargs.update(use_ema=True, ema_momentum=config.ema)
    if config.optimizer == "sgd":
        optimizer_class, kwargs["momentum"] = keras.optimizers.SGD, 0.9
    elif config.optimizer == "adamw":
        optimizer_class, kwargs["weight_decay"] = keras.optimizers.AdamW, config.weight_decay
    else:
        optimizer_class = keras.optimizers.Adam
    if multipliers:
        return schedules.with_layer_rates(optimizer_class, multipliers, **kwargs)
    return optimizer_class(**kwargs)


@keras.saving.register_keras_serializable("tf_finetune")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with a weight per label for its positives and its negatives
    (`--class_weight=balanced` on multi-label data: n / (2 * positives), n / (2 * negatives),
    scikit-learn's "balanced" for each label on its own), averaged over the labels."""

    def __init__(self, positive, negative, label_smoothing=0.0, name="weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.positive, self.negative = list(positive), list(negative)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y = keras.ops.cast(y_true, "float32")
        y = y * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        p = keras.ops.clip(keras.ops.cast(y_pred, "float32"), 1e-7, 1.0 - 1e-7)
        positive = keras.ops.convert_to_tensor(self.positive, "float32")
        negative = keras.ops.convert_to_tensor(self.negative, "float32")
        loss = -(positive * y * keras.ops.log(p) + negative * (1.0 - y) * keras.ops.log(1.0 - p))
        return keras.ops.mean(loss, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "positive": self.positive,
            "negative": self.negative,
            "label_smoothing": self.label_smoothing,
        }


def compile_model(
    model: keras.Model,
    config: Config,
    num_classes: int,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.0,
    multipliers: dict[str, float] | None = None,
    label_weights: tuple[list[float], list[float]] | None = None,
    steps_per_execution: int = 1,
) -> None:
    """Compiles with the configured optimizer, loss and metrics. `label_weights`: a
    multi-label run's (positive, negative) weights per label (`--class_weight=balanced`).
    `steps_per_execution`: Keras' (callbacks' batch hooks then run once per execution)."""
    if config.task == "multi_label":
        if label_weights is not None:
            loss = WeightedBinaryCrossentropy(*label_weights, config.label_smoothing)
        else:
            loss = keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing)
        # Keras' mAP estimate (per-label PR-AUC over 200 thresholds) for the epoch logs; the
        # reports compute exact average precision.
        metrics = [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(curve="PR", multi_label=True, num_labels=num_classes, name="map"),
        ]
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        metrics = ["accuracy"]
        if num_classes > 5:
            metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(
        optimizer=make_optimizer(config, learning_rate, multipliers),
        loss=loss,
        metrics=metrics,
        jit_compile=config.jit_compile,
        steps_per_execution=steps_per_execution,
    )


def phase_learning_rate(
    config: Config, phase: phases.Phase, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The phase's base rate under --lr_schedule and --warmup_steps, over its own steps."""
    steps = steps_per_epoch * (phase.epochs - phase.initial_epoch)
    return schedules.learning_rate(
        phase.learning_rate, config.lr_schedule, steps, config.warmup_steps
    )


def prepare_phase(
    model: keras.Model,
    config: Config,
    num_classes: int,
    phase: phases.Phase,
    steps_per_epoch: int = 1,
    label_weights: tuple[list[float], list[float]] | None = None,
) -> None:
    """Sets the phase's trainable layers and compiles; call inside `strategy.scope()`.

    Recompiling after changing `trainable` is what makes the change take effect in `fit`.
    """
    trainable = []
    module = _one_layer_backbone(model)
    if module is None:
        trainable = unfreeze(model, phase.unfreeze)
    else:  # a hub module or a Keras export is frozen or not, whole
        module.trainable = phase.unfreeze is None
    if trainable:
        logging.info(
            "Phase %s: training %d backbone layers: %s ...",
            phase.name,
            len(trainable),
            ", ".join(trainable[:5]),
        )
    rate = phase_learning_rate(config, phase, steps_per_epoch)
    multipliers = None
    if trainable and config.layer_lr_decay < 1.0:
        backbone = get_backbone(model)
        layers = [backbone.get_layer(name) for name in trainable]
        multipliers = schedules.layer_decay_multipliers(layers, config.layer_lr_decay)
    compile_model(model, config, num_classes, rate, multipliers, label_weights)


def _one_layer_backbone(model: keras.Model) -> hub.HubLayer | None:
    """The HubLayer that is the whole backbone (a TF Hub module, a Keras export), if any."""
    layer = next((layer for layer in model.layers if layer.name == "backbone"), None)
    return layer if isinstance(layer, hub.HubLayer) else None


def build_model(
    config: Config,
    num_classes: int,
    phase: phases.Phase | None = None,
    steps_per_epoch: int = 1,
    label_weights: tuple[list[float], list[float]] | None = None,
) -> keras.Model:
    """Builds and compiles the classifier for `phase` (default: the last, i.e. the final
    trainable layers); call inside `strategy.scope()`."""
    # The policy applies to the layers built now; restored after so nothing else inherits it.
    # float32 (the default) leaves a policy the caller set globally in place.
    previous = keras.mixed_precision.global_policy()
    if config.precision != "float32":
        keras.mixed_precision.set_global_policy(config.precision)
    try:
        kind = backbone_table.backbone_kind(config.backbone, config.model_dir)
        if kind == backbone_table.KERAS_HUB:
            model = keras_hub_model.build_classifier(config, num_classes)
        elif kind == backbone_table.HUB:
            model = hub_model.build_classifier(config, num_classes)
        elif kind == backbone_table.RUN:  # the parent run, trained, under this run's head
            parent = own_model.parent_run(config)
            trained = restore_trained(parent.config, len(parent.class_names))
            model = own_model.adapt(trained, parent.class_names, config, num_classes)
        elif kind in backbone_table.OWN_KINDS:
            model = own_model.build_classifier(config, num_classes)
        else:
            model = build_classifier(
                backbones.get_spec(config.backbone),
                num_classes,
                config.image_size,
                weights_arg(config),
                config.dropout,
                config.backbone_alpha,
                config.task == "multi_label",
            )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    phase = phase or phases.plan(config)[-1]
    prepare_phase(model, config, num_classes, phase, steps_per_epoch, label_weights)
    return model


def restore_trained(config: Config, num_classes: int) -> keras.Model:
    """A finished run's classifier with the weights it evaluated and exported (call inside
    a strategy's scope when there is one). Built with weights="none": the checkpoint holds
    every weight, so no download nor pretraining is needed."""
    weights = rundir.trained_weights(config.model_dir)
    model = build_model(dataclasses.replace(config, weights="none"), num_classes)
    rundir.load_weights_quietly(model, weights)
    return model
