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


# Multi-label: a grey picture where each tag adds its own coloured patch in its own place.
TAG_PATCHES = [  # (colour, (top, left, height, width)) on a 32x32 canvas
    ((230, 30, 30), (2, 2, 12, 12)),
    ((30, 210, 40), (18, 2, 12, 28)),
    ((40, 60, 230), (2, 18, 12, 12)),
]


def tagged_image(tags, seed: int = 0, size: int = 32) -> Image.Image:
    """A noisy grey image with the patch of every tag index in `tags` drawn on it."""
    rng = np.random.default_rng(seed)
    pixels = 120 + rng.normal(0, 15, size=(size, size, 3))
    for t in tags:
        colour, (top, left, h, w) = TAG_PATCHES[t]
        pixels[top : top + h, left : left + w] = colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def tag_sets(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` random tag sets over the TAG_PATCHES (some empty, some with every tag)."""
    rng = np.random.default_rng(seed)
    return [
        tuple(int(t) for t in np.flatnonzero(rng.random(len(TAG_PATCHES)) < 0.45))
        for _ in range(count)
    ]


def write_tagged_csv(root: pathlib.Path, count: int = 60, names=("red", "green", "blue")):
    """root/images/img_<i>.png and root/tags.csv (file,label with '|' between tags)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["file,label"]
    for i, tags in enumerate(tag_sets(count)):
        (root / "images" / f"img_{i:03d}.png").write_bytes(
            encode(tagged_image(tags, seed=i), "PNG")
        )
        rows.append(f"images/img_{i:03d}.png," + "|".join(names[t] for t in tags))
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    return root / "tags.csv"


def write_tagged_folders(root: pathlib.Path, count: int = 60, names=("red", "green", "blue")):
    """root/<tag>/sub/img_<i>.png: the same file under the folder of each of its tags
    (images without a tag cannot appear in a folder tree)."""
    for i, tags in enumerate(tag_sets(count)):
        for t in tags:
            folder = root / names[t] / "sub"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img_{i:03d}.png").write_bytes(encode(tagged_image(tags, seed=i), "PNG"))
    return root
