"""Flip-averaged features for the L-BFGS head: how much test accuracy do they add? (An
experiment, not a test; issue 14 said "+5-6 points with flip-averaged features".)

Frozen MobileNetV2-0.35 (ImageNet weights from ../shared) at 128 px, average-pooled, on the
benchmark's third of the flower photos (scripts/benchmark.py's hash-stable 70/15/15 split).
Features of every image, plain f(x) and mirrored f(flip x), from the training pipeline's
decode. Five ways to train and score the head (`linear_probe.solve_head`, L2 chosen on val
loss with the run's settings):
  A plain / plain (what a run does)      B plain + mirrored rows / plain
  C averaged / averaged                  D plain + mirrored rows / averaged
  E plain / averaged (test-time averaging only)
first on the benchmark's split, then on `--resplits` random 70/15/15 re-splits of the same
images (seeds 0..N-1), as paired differences against A.

  python scripts/flip_features_experiment.py                # 30 re-splits, ~2 min on 2 cores
"""

import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import benchmark  # noqa: E402  (its trees, its weights)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_finetune import data, linear_probe  # noqa: E402
from tf_finetune.feature_fit import LBFGS_PATIENCE, LBFGS_TOL  # noqa: E402

SPLITS = ("train", "val", "test")


def list_files(root: pathlib.Path):
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    files, labels, part = [], [], []
    for split in SPLITS:
        for i, name in enumerate(classes):
            for path in sorted((root / split / name).iterdir()):
                files.append(str(path))
                labels.append(i)
                part.append(split)
    return files, np.array(labels), np.array(part), len(classes)


def features(files: list[str], mirrored: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(plain, mirrored) features of `files`, from one model and one compiled forward (the
    mirrored ones None unless `mirrored`)."""
    model = keras.applications.MobileNetV2(
        alpha=0.35,
        input_shape=(128, 128, 3),
        include_top=False,
        weights=str(benchmark.WEIGHTS),
        pooling="avg",
    )
    forward = tf.function(lambda x: model(keras.applications.mobilenet_v2.preprocess_input(x)))

    def run(flip: bool) -> np.ndarray:
        def load(path):
            image = data.decode_and_resize(tf.io.read_file(path), 128)
            return tf.image.flip_left_right(image) if flip else image

        images = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=2)
        return np.concatenate([forward(batch).numpy() for batch in images.batch(64)])

    return run(False), run(True) if mirrored else None


def variants(xp, xf, y, k, train, val, test) -> dict[str, np.ndarray]:
    """{variant: whether each test image is right}."""
    xa = 0.5 * (xp + xf)
    both, both_y = np.concatenate([xp[train], xf[train]]), np.concatenate([y[train], y[train]])
    specs = {
        "A plain / plain": (xp[train], y[train], xp),
        "B plain+mirrored / plain": (both, both_y, xp),
        "C averaged / averaged": (xa[train], y[train], xa),
        "D plain+mirrored / averaged": (both, both_y, xa),
        "E plain / averaged": (xp[train], y[train], xa),
    }
    out = {}
    for name, (x, labels, scored) in specs.items():
        solution = linear_probe.solve_head(
            x, labels, scored[val], y[val], k, tol=LBFGS_TOL, patience=LBFGS_PATIENCE
        )
        out[name] = solution.predict_proba(scored[test]).argmax(1) == y[test]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resplits", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tf_finetune_flip_") as work:  # its trees of symlinks
        root = benchmark.make_trees(pathlib.Path(work), phone_count=1)["third"]
        files, y, part, k = list_files(root)
        xp, xf = features(files)
    index = np.arange(len(y))
    fixed = variants(xp, xf, y, k, *(index[part == s] for s in SPLITS))
    print(f"benchmark split ({np.sum(part == 'test')} test images): test accuracy")
    for name, right in fixed.items():
        print(f"  {name:28s} {right.mean():.4f}")
    deltas = {name: [] for name in fixed}
    for seed in range(args.resplits):
        order = np.random.default_rng(seed).permutation(len(y))
        a, b = int(0.70 * len(y)), int(0.85 * len(y))
        out = variants(xp, xf, y, k, order[:a], order[a:b], order[b:])
        for name, right in out.items():
            deltas[name].append(right.mean() - out["A plain / plain"].mean())
    print(f"{args.resplits} re-splits: test accuracy minus A's, mean ± sd (splits better/worse)")
    for name, d in deltas.items():
        d = np.array(d)
        print(
            f"  {name:28s} {d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else 0:.4f}"
            f"  ({int(np.sum(d > 0))}/{int(np.sum(d < 0))})"
        )


if __name__ == "__main__":
    main()
