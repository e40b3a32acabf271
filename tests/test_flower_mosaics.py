"""scripts/flower_mosaics.py: the multi-label set the head_solver results section trains on."""

import csv
import importlib.util

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.images import class_image


@pytest.fixture(scope="module")
def mosaics_py():
    path = REPO / "scripts" / "flower_mosaics.py"
    spec = importlib.util.spec_from_file_location("flower_mosaics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_photo_in_one_mosaic_labelled_with_its_photos_classes(mosaics_py, tmp_path):
    flowers, names = tmp_path / "flowers", ("daisy", "rose", "tulip")
    colours = {}
    for label, name in enumerate(names):
        (flowers / name).mkdir(parents=True)
        for i in range(12):
            image = class_image(label, size=(128, 128), seed=i)
            image.save(flowers / name / f"{i}.jpg", quality=95)
        colours[name] = np.asarray(image, np.float64).mean(axis=(0, 1))

    groups = mosaics_py.mosaics(mosaics_py.photos(flowers), seed=3)
    used = [path for group in groups for path, _ in group]
    assert sorted(used) == sorted(flowers.glob("*/*.jpg")), "each photo exactly once"
    assert {len(g) for g in groups} == {1, 2, 4}, "36 photos give every layout"

    table = mosaics_py.write(tmp_path / "out", flowers, seed=3)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(groups)
    for row, group in zip(rows, groups):
        assert row["label"].split("|") == sorted({label for _, label in group})
        with Image.open(table.parent / row["file"]) as image:
            pixels = np.asarray(image.convert("RGB"), np.float64)
        assert pixels.shape == (128, 128, 3)
        # Each pane holds its photo: the top-left pixel region's colour is its class's.
        x, y, w, h = mosaics_py.LAYOUTS[len(group)][0]
        pane = pixels[y + 8 : y + h - 8, x + 8 : x + w - 8].mean(axis=(0, 1))
        nearest = min(colours, key=lambda n: np.abs(colours[n] - pane).sum())
        assert nearest == group[0][1]
