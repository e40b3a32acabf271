"""Weight averages evaluated beside the best checkpoint: the best K epochs' mean (timm style).

The EMA itself is Keras': optimizers built with `use_ema=True` keep it, and `fit` swaps it
into the model when it ends (`Optimizer.finalize_variable_values`). Averaging checkpoints is
ours: `KeepBestCheckpoints` keeps the weights of the K epochs with the lowest val_loss on disk
(evicting the others as it goes, so the disk holds at most K + 1), and `average_weights` loads
and averages them.
"""

import json
import os

import keras
import numpy as np

from tf_finetune import atomic, rundir


class KeepBestCheckpoints(keras.callbacks.Callback):
    """Keeps the weights of the `k` epochs with the best `monitor` (lowest; highest with
    `mode="max"`) in `directory`.

    `directory/index.json` maps file names to their values; it is rewritten atomically after
    each change and read back on construction, so a resumed run keeps its earlier best epochs.
    """

    def __init__(self, directory: str, k: int, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        self.directory = directory
        self.k = k
        self.monitor = monitor
        self._sign = -1.0 if mode == "max" else 1.0  # the index keeps sign * value: lower is better
        os.makedirs(directory, exist_ok=True)
        self.index: dict[str, float] = {}
        path = self._index_path()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.index = {
                    name: value
                    for name, value in json.load(f).items()
                    if os.path.exists(os.path.join(directory, name))
                }

    def _index_path(self) -> str:
        return os.path.join(self.directory, "index.json")

    def _write_index(self) -> None:
        atomic.write_json(self._index_path(), self.index)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        value = self._sign * value
        worst = max(self.index.values()) if len(self.index) >= self.k else None
        if worst is not None and value >= worst:
            return
        name = f"epoch_{epoch + 1:04d}.weights.h5"
        self.model.save_weights(os.path.join(self.directory, name), overwrite=True)
        self.index[name] = float(value)
        if len(self.index) > self.k:
            evicted = max(self.index, key=self.index.get)
            del self.index[evicted]
            self._write_index()  # the index never names a missing file
            os.remove(os.path.join(self.directory, evicted))
        else:
            self._write_index()

    def paths(self) -> list[str]:
        """The kept files, best first."""
        return [os.path.join(self.directory, n) for n in sorted(self.index, key=self.index.get)]


def average_weights(model: keras.Model, paths: list[str]) -> None:
    """Sets `model`'s weights to the element-wise mean of the weight files `paths`.

    Every weight is averaged, trainable or not (frozen ones are equal in all files anyway).
    """
    if not paths:
        raise ValueError("no checkpoint to average")
    total = None
    for path in paths:
        rundir.load_weights_quietly(model, path)
        values = [np.asarray(w, dtype=np.float64) for w in model.weights]
        total = values if total is None else [t + v for t, v in zip(total, values)]
    # Integer state (e.g. seed generators): the best file's.
    rundir.load_weights_quietly(model, paths[0])
    for weight, summed in zip(model.weights, total):
        if np.issubdtype(np.dtype(weight.dtype), np.floating):
            weight.assign((summed / len(paths)).astype(weight.dtype))
