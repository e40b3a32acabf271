"""Learning rates: a warmup + constant/cosine/exponential schedule per phase, and per-layer rates.

One serializable `keras.optimizers.schedules.LearningRateSchedule`, so a checkpoint or a saved
optimizer config describes it fully. The step counter is the optimizer's own `iterations`,
which BackupAndRestore restores, so a resumed run continues on the same curve.
"""

import keras
import tensorflow as tf

KINDS = ("constant", "cosine", "exponential")
# --lr_schedule=exponential ends the phase at this fraction of the base rate.
EXPONENTIAL_FINAL_FRACTION = 0.01


@keras.saving.register_keras_serializable(package="tf_finetune")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from ~0 to `base` over `warmup_steps`, then `kind` over the rest.

    Args:
      base: the peak learning rate.
      kind: constant | cosine (to 0 at `total_steps`) | exponential (to base/100).
      total_steps: steps of the whole phase, warmup included (>= 1).
      warmup_steps: steps of linear warmup (0: none).
    """

    def __init__(self, base: float, kind: str, total_steps: int, warmup_steps: int = 0):
        if kind not in KINDS:
            raise ValueError(f"unknown schedule {kind!r}; one of {KINDS}")
        self.base = float(base)
        self.kind = kind
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base = tf.constant(self.base, tf.float32)
        warmup = float(self.warmup_steps)
        decay_steps = max(float(self.total_steps) - warmup, 1.0)
        # Progress through the decay part, in [0, 1]; stays at 1 past the end.
        progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
        if self.kind == "cosine":
            rate = base * 0.5 * (1.0 + tf.cos(3.141592653589793 * progress))
        elif self.kind == "exponential":
            rate = base * tf.pow(EXPONENTIAL_FINAL_FRACTION, progress)
        else:
            rate = base
        if self.warmup_steps:
            # (step + 1): the first step already trains at base / warmup_steps, not at 0.
            rate = tf.where(step < warmup, base * (step + 1.0) / warmup, rate)
        return rate

    def get_config(self) -> dict:
        return {
            "base": self.base,
            "kind": self.kind,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


def learning_rate(
    base: float, kind: str, total_steps: int, warmup_steps: int
) -> float | WarmupSchedule:
    """A plain float when nothing varies (so ReduceLROnPlateau can set it), else a schedule."""
    if kind == "constant" and not warmup_steps:
        return base
    return WarmupSchedule(base, kind, total_steps, warmup_steps)


# ----------------------------------------------------------------------------- per-layer rates
class _LayerwiseRates:
    """Mixin for a Keras optimizer: each variable's learning rate times its own multiplier.

    Multipliers are keyed by variable path and resolved to the optimizer's variable indices
    in `build`, so they also work with mirrored variables (the update step sees per-replica
    components, which `_get_variable_index` maps back).
    """

    def __init__(self, *args, multipliers: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self._multipliers_by_path = dict(multipliers)
        self._multipliers: list[float] = []

    def build(self, variables):
        super().build(variables)
        self._multipliers = [self._multipliers_by_path.get(v.path, 1.0) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multipliers[self._get_variable_index(variable)]
        if multiplier != 1.0:
            learning_rate = learning_rate * multiplier
        return super().update_step(gradient, variable, learning_rate)


def with_layer_rates(
    optimizer_class: type[keras.optimizers.Optimizer], multipliers: dict[str, float], **kwargs
) -> keras.optimizers.Optimizer:
    """`optimizer_class(**kwargs)` whose variables at `multipliers`' paths train at that
    fraction of the learning rate (the others at the full rate)."""
    layerwise = type(f"Layerwise{optimizer_class.__name__}", (_LayerwiseRates, optimizer_class), {})
    return layerwise(multipliers=multipliers, **kwargs)


def layer_decay_multipliers(layers: list, decay: float) -> dict[str, float]:
    """Discriminative fine-tuning: the k-th trainable layer from the top trains at decay**k of
    the head's rate (`layers` ordered bottom to top, as `model.unfreeze` returns them)."""
    return {
        w.path: decay**k
        for k, layer in enumerate(reversed(layers), start=1)
        for w in layer.trainable_weights
    }
