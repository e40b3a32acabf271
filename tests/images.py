"""Generated image folders for tests: real encoded files of several formats, modes and sizes."""

import io
import pathlib

import numpy as np
from PIL import Image

# One solid, distinct colour per class (as TF Hub's make_image_classifier_test does), with
# a little noise so images differ.
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]


def class_image(label: int, size=(24, 20), seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[label], dtype=np.float32)
    pixels = base + rng.normal(0, 12, size=(size[1], size[0], 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode == "P":
        return image.quantize(8)
    return image.convert(mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_class_folders(
    root: pathlib.Path, num_classes: int = 3, per_class: int = 12, size=(24, 20)
) -> pathlib.Path:
    """root/<class_i>/img_<j>.{jpg,png}: solid-colour classes, easy to learn."""
    for label in range(num_classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[j % 2]
            image = class_image(label, size, seed=label * 1000 + j)
            (folder / f"img_{j:03d}.{ext}").write_bytes(encode(image, fmt))
    return root
