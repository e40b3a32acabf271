"""Learning rate over a training phase: linear warmup, then constant, cosine or exponential.

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
