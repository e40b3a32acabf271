"""Linear probe (L-BFGS, L2 chosen on val) vs an Adam-trained softmax head, on real features.

MobileNetV2-0.35 ImageNet features (128 px, average-pooled) of ../shared's flower photos, split
70/15/15 by a fixed seed. Both heads see the same cached features; test accuracy of the head each
side hands over (the probe: the l2 with the lowest val loss; Adam: the epoch with the lowest
val loss). An experiment, not a test:

  python scripts/probe_experiment.py                  # ~1 min on 2 cores (features cached in /tmp)
  python scripts/probe_experiment.py --fraction=0.333 # a third of the photos, as issue 14's table
"""

import argparse
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_finetune import data, linear_probe  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = "weights/keras/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def list_photos(root: pathlib.Path) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for i, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            files.append(str(path))
            labels.append(i)
    return files, np.array(labels), classes


def compute_features(files: list[str], weights: str) -> np.ndarray:
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(128, 128, 3), include_top=False, weights=weights, pooling="avg"
    )
    images = tf.data.Dataset.from_tensor_slices(files).map(
        lambda f: data.decode_and_resize(tf.io.read_file(f), 128), num_parallel_calls=2
    )
    forward = tf.function(lambda x: model(keras.applications.mobilenet_v2.preprocess_input(x)))
    return np.concatenate([forward(batch).numpy() for batch in images.batch(64)])


def split(n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)[: int(round(n * fraction))]
    a, b = int(0.70 * len(order)), int(0.85 * len(order))
    return order[:a], order[a:b], order[b:]


class _BestValLoss(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.best, self.weights = np.inf, None

    def on_epoch_end(self, epoch, logs=None):
        if logs["val_loss"] < self.best:
            self.best, self.weights = logs["val_loss"], self.model.get_weights()


def adam_head(x, y, k, tr, va, te, seed: int, dropout: float) -> tuple[float, float]:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((x.shape[1],))
    h = keras.layers.Dropout(dropout)(inputs) if dropout else inputs
    model = keras.Model(inputs, keras.layers.Dense(k, activation="softmax")(h))
    model.compile(
        keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    best = _BestValLoss()
    start = time.perf_counter()
    model.fit(
        x[tr], y[tr], batch_size=32, epochs=10, validation_data=(x[va], y[va]),
        callbacks=[best], verbose=0,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    model.set_weights(best.weights)
    return model.evaluate(x[te], y[te], verbose=0)[1], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/flowers128_mnv2_035_features.npz")
    args = parser.parse_args()

    files, y, classes = list_photos(SHARED / "data" / "flowers_128")
    if os.path.exists(args.cache):
        x = np.load(args.cache)["x"]
    else:
        start = time.perf_counter()
        x = compute_features(files, str(SHARED / WEIGHTS))
        print(f"features: {x.shape} in {time.perf_counter() - start:.1f} s")
        np.savez(args.cache, x=x)
    tr, va, te = split(len(y), args.seed, args.fraction)
    k = len(classes)
    print(f"train/val/test {len(tr)}/{len(va)}/{len(te)}, {x.shape[1]} features, {k} classes")

    for standardize in (False, True):
        s = linear_probe.solve_head(x[tr], y[tr], x[va], y[va], k, standardize=standardize)
        test = float(np.mean(s.predict_proba(x[te]).argmax(1) == y[te]))
        print(
            f"probe standardize={standardize}: test {test:.3f}, val {s.val_accuracy:.3f} "
            f"loss {s.val_loss:.3f}, l2 {s.l2:g}, {s.seconds:.2f} s, {s.iterations} iterations"
        )
        print("  grid val losses:", " ".join(f"{v:.3f}" for v in s.grid_val_losses))
    for dropout in (0.2, 0.0):
        results = [adam_head(x, y, k, tr, va, te, seed, dropout) for seed in range(3)]
        accs = [a for a, _ in results]
        print(
            f"adam dropout={dropout}: test {np.mean(accs):.3f} (seeds {', '.join(f'{a:.3f}' for a in accs)}), "
            f"{np.mean([s for _, s in results]):.1f} s per fit"
        )


if __name__ == "__main__":
    main()
