"""Single-process check for tests/test_multiworker.py (run as a subprocess).

Trains the same tiny model under the default strategy and under a 2-replica
MirroredStrategy (2 logical CPUs), first without and then with
apply_keras_workarounds(), and prints one JSON line with losses and weights so the
test can check the workarounds change nothing outside multi-worker training.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import numpy as np  # noqa: E402

from tests.mw_model import compiled_model  # noqa: E402
from tf_finetune import multiworker as mw  # noqa: E402


def run(strategy):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 16, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    model = compiled_model(strategy, 2)
    hist = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    ev = model.evaluate(x, y, batch_size=16, verbose=0)
    pred = model.predict(x[:20], batch_size=8, verbose=0)
    return {
        "loss": hist.history["loss"],
        "acc": hist.history["accuracy"],
        "eval": [float(v) for v in ev],
        "pred": pred.tolist(),
        "weights": [w.numpy().tolist() for w in model.weights],
    }


def main():
    strategies = {
        "default": tf.distribute.get_strategy,
        "mirrored": lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    }
    out = {"before": {k: run(s()) for k, s in strategies.items()}}
    mw.apply_keras_workarounds()
    mw.apply_keras_workarounds()  # idempotent
    from keras.src.backend.tensorflow import trainer

    out["wrapped_once"] = not hasattr(
        trainer.reduce_per_replica.__wrapped__, "__wrapped__"
    ) and not hasattr(trainer.TensorFlowTrainer._maybe_symbolic_build.__wrapped__, "__wrapped__")
    out["applied"] = mw.keras_workarounds_applied()
    out["after"] = {k: run(s()) for k, s in strategies.items()}
    out["replicas"] = strategies["mirrored"]().num_replicas_in_sync
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
