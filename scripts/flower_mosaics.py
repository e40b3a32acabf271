"""A multi-label data set from ../shared's real flower photos: mosaics of 1, 2 or 4 photos.

Each photo is used in exactly one mosaic (so no photo crosses a train/val/test split). A mosaic
is one photo (128x128, as it is), two side by side (each resized to 64x128), or four in a 2x2
grid (each 64x64), chosen at random with probabilities 1/3 each; its labels are the distinct
classes of its photos. Written as 128x128 JPEGs (quality 95) with `labels.csv` (`file`,
`label`: the names joined by "|"), the image CSV `--task=multi_label` reads:

  python scripts/flower_mosaics.py /tmp/mosaics
  tf-finetune train --flagfile=configs/flowers128_shared.cfg --data=/tmp/mosaics/labels.csv \\
      --task=multi_label --validation_percent=15 --test_percent=15

Deterministic for a given --seed. Needs Pillow (installed with matplotlib).
"""

import argparse
import csv
import pathlib
import random

from PIL import Image

FLOWERS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers_128"
SIZE = 128
LAYOUTS = {1: [(0, 0, 128, 128)], 2: [(0, 0, 64, 128), (64, 0, 64, 128)]}
LAYOUTS[4] = [(x, y, 64, 64) for y in (0, 64) for x in (0, 64)]


def photos(root: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    return [(p, p.parent.name) for p in sorted(root.glob("*/*.jpg"))]


def mosaics(items: list, seed: int) -> list[list[tuple[pathlib.Path, str]]]:
    """The photos, shuffled, cut into groups of 1, 2 or 4 (each photo in one group)."""
    rng = random.Random(seed)
    items = list(items)
    rng.shuffle(items)
    groups, i = [], 0
    while i < len(items):
        n = min(rng.choice(tuple(LAYOUTS)), len(items) - i)
        n = max(k for k in LAYOUTS if k <= n)
        groups.append(items[i : i + n])
        i += n
    return groups


def compose(group: list[tuple[pathlib.Path, str]]) -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE))
    for (path, _), (x, y, w, h) in zip(group, LAYOUTS[len(group)]):
        with Image.open(path) as photo:
            canvas.paste(photo.convert("RGB").resize((w, h), Image.BICUBIC), (x, y))
    return canvas


def write(out: pathlib.Path, root: pathlib.Path = FLOWERS, seed: int = 0) -> pathlib.Path:
    """Writes the mosaics and labels.csv into `out`; returns the CSV's path."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "labels.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "label"])
        for i, group in enumerate(mosaics(photos(root), seed)):
            name = f"mosaic_{i:05d}.jpg"
            compose(group).save(out / name, quality=95)
            rows.writerow([name, "|".join(sorted({label for _, label in group}))])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flowers", type=pathlib.Path, default=FLOWERS)
    args = parser.parse_args()
    table = write(args.out, args.flowers, args.seed)
    print(table)


if __name__ == "__main__":
    main()
