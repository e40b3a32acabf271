"""Long-tailed flowers: --sampling=balanced vs --class_weight=balanced vs neither, on test.

Builds an imbalanced copy of ../shared's flower photos out of symlinks (one class cut to 5% of
its photos, the others whole) in a temporary folder, trains the flowers128_shared preset
(MobileNetV2-0.35 ImageNet weights at 128 px, frozen, 5 epochs) on it with a 70/15/15 split
for each setting and seed, and prints each class's test recall and the test macro F1
(means over the seeds). An experiment, not a test:

  python scripts/imbalanced_flowers.py                       # 3 settings x 3 seeds
  python scripts/imbalanced_flowers.py --seeds=42 --cut=rose --keep=0.05
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = (
    SHARED / "weights/keras/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
SETTINGS = {
    "none": [],
    "class_weight=balanced": ["--class_weight=balanced"],
    "sampling=balanced": ["--sampling=balanced"],
}


def imbalanced_copy(source: pathlib.Path, target: pathlib.Path, cut: str, keep: float) -> dict:
    """Symlinks every photo of `source` into `target`, only the first `keep` of class `cut`."""
    counts = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        photos = sorted(folder.iterdir())
        if folder.name == cut:
            photos = photos[: max(1, round(len(photos) * keep))]
        (target / folder.name).mkdir(parents=True)
        for photo in photos:
            (target / folder.name / photo.name).symlink_to(photo)
        counts[folder.name] = len(photos)
    return counts


def train(data: pathlib.Path, run_dir: pathlib.Path, seed: int, flags: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "tf_finetune",
        "train",
        f"--flagfile={REPO / 'configs/flowers128_shared.cfg'}",
        f"--data={data}",
        f"--weights={WEIGHTS}",
        "--validation_percent=15",
        "--test_percent=15",
        f"--seed={seed}",
        f"--model_dir={run_dir}",
        *flags,
    ]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return json.loads((run_dir / "report_test.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--cut", default="rose")
    parser.add_argument("--keep", type=float, default=0.05)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "flowers"
        counts = imbalanced_copy(SHARED / "data/flowers_128", data, args.cut, args.keep)
        print(f"photos per class: {counts}; load before: {os.getloadavg()[0]:.2f}", flush=True)
        results = {}
        for name, flags in SETTINGS.items():
            reports = [train(data, pathlib.Path(tmp) / f"{name}-{s}", s, flags) for s in seeds]
            results[name] = reports
            print(f"{name}: done; load {os.getloadavg()[0]:.2f}", flush=True)
    print_table(results, list(counts), args.cut, len(seeds))


def print_table(results: dict, classes: list[str], cut: str, n_seeds: int) -> None:
    def mean(values):
        return sum(values) / len(values)

    header = ["setting", *[f"{c} recall" + (" (cut)" if c == cut else "") for c in classes]]
    print("| " + " | ".join([*header, "macro F1", "accuracy"]) + " |")
    print("|" + "---|" * (len(header) + 2))
    for name, reports in results.items():
        recalls = [mean([r["per_class"][c]["recall"] for r in reports]) for c in classes]
        cells = [f"{v:.3f}" for v in recalls]
        cells += [f"{mean([r['macro_f1'] for r in reports]):.3f}"]
        cells += [f"{mean([r['accuracy'] for r in reports]):.3f}"]
        print("| " + " | ".join([f"`--{name}`" if name != "none" else "neither", *cells]) + " |")
    support = results["none"][0]["per_class"][cut]["support"]
    print(f"(means over {n_seeds} seed(s); {support} {cut} photos in the test split)")


if __name__ == "__main__":
    main()
