"""Data sources (image folders, TFDS) -> tf.data pipelines of (pixels, one-hot label).

Text sources (CSV/TSV, TFDS text) live in `text_data` and return the same `DataSet`, with
tf.string texts instead of pixels, so `make_pipeline` and training are shared.

Every source yields unbatched `(float32 image [size, size, 3] in 0-255, int32 label)` examples;
one function (`make_pipeline`) turns them into batches, so folders and TFDS train the same way.
The decode-and-resize step is shared with the export, so serving sees exactly what training saw.
"""

import dataclasses
import hashlib
import os
import re
import struct
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from tf_finetune import splits as splits_lib
from tf_finetune.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Files whose header announces more pixels than this are skipped without being decoded, so one
# huge (or malicious) file cannot exhaust memory: decoding takes width * height * 3 bytes
# (~270 MB at this limit, PIL's decompression-bomb threshold), per parallel decode.
MAX_IMAGE_PIXELS = 89_478_485
VALIDATION_DIRS = ("val", "validation")
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a data set, not yet decoded nor batched.

    `source` yields cheap `(key, int32 label)` pairs (a file path, or encoded image bytes) so a
    large shuffle buffer costs little; `load` turns a key into a float32 [size, size, 3] image
    of 0-255 pixels (or, for text, the text itself).
    """

    source: tf.data.Dataset
    load: Callable[[tf.Tensor], tf.Tensor]
    count: int

    def examples(self) -> tf.data.Dataset:
        """Decoded (float32 image, int32 label) pairs in source order."""
        load = self.load
        return self.source.map(lambda x, y: (load(x), y), num_parallel_calls=AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class DataSet:
    """What a run trains and evaluates on."""

    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split | None
    skipped_files: tuple[tuple[str, str], ...] = ()  # (path, reason)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- decoding
def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes [h, w, 3] pixels to float32 [size, size, 3] (bilinear, like Keras' loaders).

    Not rounded back to uint8: that costs ~10% of the input pipeline's throughput, and a
    bilinear resize of 0-255 pixels stays in 0-255.
    """
    return tf.image.resize(image, [image_size, image_size], method="bilinear")


def to_uint8(pixels: tf.Tensor) -> tf.Tensor:
    """0-255 float pixels -> uint8, rounded (4x smaller, for the in-memory image cache)."""
    return tf.saturate_cast(tf.round(pixels), tf.uint8)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 RGB [size, size, 3] of 0-255 pixels.

    Grayscale, RGBA and palette images become RGB; an animated GIF gives its first frame.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return resize(image, image_size)


# ----------------------------------------------------------------------------- folders
@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The files of an image folder, split and labelled, before any decoding."""

    class_names: tuple[str, ...]
    splits: dict  # split name -> (paths, labels)
    unusable: tuple[tuple[str, str], ...] = ()  # (path, reason): e.g. a name that is not UTF-8


def _is_image(name: str) -> bool:
    # Hidden files (.DS_Store, macOS "._photo.jpg" resource forks) are never images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def printable_path(path: str) -> str:
    """`path` with undecodable bytes of its name escaped, safe to print and to store in JSON."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _class_dirs(root: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )


def _files_by_class(
    root: str, class_names, unusable: list | None = None
) -> tuple[list[str], list[int]]:
    """Image files under each class folder, nested folders and symlinks included.

    A symlinked folder is followed once: a link back to a parent (a loop) is not walked again.
    Names that are not valid UTF-8 cannot go through TensorFlow: they go to `unusable`.
    """
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        if not os.path.isdir(class_dir):
            continue
        seen = {os.path.realpath(class_dir)}
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            kept = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if not d.startswith(".") and real not in seen:
                    seen.add(real)
                    kept.append(d)
            dirnames[:] = kept
            for filename in sorted(filenames):
                if not _is_image(filename):
                    continue
                path = os.path.join(dirpath, filename)
                try:
                    path.encode("utf-8")
                except UnicodeEncodeError:
                    if unusable is not None:
                        unusable.append(
                            (printable_path(path), "file name is not valid UTF-8; rename it")
                        )
                    continue
                paths.append(path)
                labels.append(label)
    return paths, labels


def hash_percent(relative_path: str) -> float:
    """A stable position in [0, 100) for a file, from its path (as TF Hub's retrain.py did).

    Anything after `_nohash_` in the file name is ignored, so variants of one photo land on the
    same side; adding files later never moves old ones between train, validation and test.
    """
    key = re.sub(r"_nohash_.*$", "", relative_path.replace(os.sep, "/"))
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return (int(digest, 16) % 100_000) / 1000.0


def carve(
    keys: list, labels: list, positions: list[float], validation_percent: int, test_percent: int = 0
) -> dict[str, tuple[list, list]]:
    """{split: (keys, labels)} by each key's hash position (see `splits.split_of`).

    Always has train and val; test only when `test_percent` > 0.
    """
    out = {name: ([], []) for name in splits_lib.SPLITS if name != "test" or test_percent > 0}
    for key, label, position in zip(keys, labels, positions):
        chosen = out[splits_lib.split_of(position, validation_percent, test_percent)]
        chosen[0].append(key)
        chosen[1].append(label)
    return out


def list_image_folder(root: str, validation_percent: int, test_percent: int = 0) -> FolderListing:
    """Finds classes and files; carves val (and test) by path hash unless the folder has val/.

    `test_percent` > 0 carves a test split too, from a plain class folder only (UserError for a
    folder with train/).
    """
    splits_lib.check_test_percent(root, validation_percent, test_percent)
    subdirs = _class_dirs(root)
    unusable: list[tuple[str, str]] = []
    if "train" in subdirs:
        class_names = tuple(_class_dirs(os.path.join(root, "train")))
        splits = {"train": _files_by_class(os.path.join(root, "train"), class_names, unusable)}
        val_dir = next((d for d in VALIDATION_DIRS if d in subdirs), None)
        if val_dir:
            splits["val"] = _files_by_class(os.path.join(root, val_dir), class_names, unusable)
        if "test" in subdirs:
            splits["test"] = _files_by_class(os.path.join(root, "test"), class_names, unusable)
        source_root = os.path.join(root, "train")
    else:
        class_names = tuple(subdirs)
        splits = {"train": _files_by_class(root, class_names, unusable)}
        source_root = root
    if not class_names:
        raise UserError(
            f"--data={root} has no class subfolders: put each class's images in a folder of its own."
        )
    if len(class_names) < 2:
        raise UserError(
            f"--data={root} has a single class ({class_names[0]}); a classifier needs at least two."
        )
    if "val" not in splits:
        paths, labels = splits["train"]
        positions = [hash_percent(os.path.relpath(p, source_root)) for p in paths]
        splits.update(carve(paths, labels, positions, validation_percent, test_percent))
    return FolderListing(class_names, splits, tuple(unusable))


# The first bytes of each format TensorFlow decodes (decode_image sniffs the content, so a PNG
# named .jpg still works).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments (no decoding)."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        length_bytes = f.read(2)
        if len(length_bytes) < 2 or marker == 0xDA:  # start of scan: no frame header found
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if marker in _JPEG_SOF:
            header = f.read(5)
            if len(header) < 5:
                return None
            height, width = struct.unpack(">HH", header[1:5])
            return width, height
        f.seek(length - 2, os.SEEK_CUR)
        if f.read(1) != b"\xff":
            return None
        f.seek(-1, os.SEEK_CUR)


def image_header(path: str) -> tuple[str, int | None, int | None] | None:
    """(format, width, height) read from the file's first bytes, or None if not an image.

    Width and height are None when the header does not say (then decoding decides).
    """
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\xff\xd8\xff"):
            size = _jpeg_size(f)
            return ("JPEG", *size) if size else ("JPEG", None, None)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return ("PNG", *struct.unpack(">II", head[16:24]))
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return ("GIF", *struct.unpack("<HH", head[6:10]))
    if head.startswith(b"BM") and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return "BMP", abs(width), abs(height)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None, None
    return None


def precheck(path: str) -> str | None:
    """Why `path` must not be decoded (empty, not an image, too large), from its header; or None."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        header = image_header(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file disappeared"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if header is None:
        with open(path, "rb") as f:
            start = f.read(16)
        kind = "a text file" if start.isascii() and start.decode("ascii").isprintable() else "data"
        return f"not an image: {kind} starting with {start!r}"
    fmt, width, height = header
    if width is not None and height is not None and width * height > MAX_IMAGE_PIXELS:
        return (
            f"{fmt} too large to decode safely: {width}x{height} pixels "
            f"(limit {MAX_IMAGE_PIXELS:,})"
        )
    return None


def _decode_error(error: Exception, path: str) -> str:
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]( name: \S*)?", "", message)
    message = " ".join(message.split())[:160]
    header = image_header(path)
    fmt = header[0] if header else "image"
    return f"corrupt or truncated {fmt}: {message}"


def find_unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """Returns (path, reason) for each file that cannot be decoded as an image.

    Headers are checked first (empty, not an image, more than MAX_IMAGE_PIXELS: never decoded).
    The rest are decoded once in parallel by tf.data; only the failures are decoded again, one
    by one, to learn why.
    """
    bad = {}
    for path in paths:
        reason = precheck(path)
        if reason:
            bad[path] = reason
    candidates = [p for p in paths if p not in bad]
    if candidates:

        def check(path):
            image = tf.io.decode_image(
                tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8
            )
            # Reading a value forces the whole decode (a truncated file fails here).
            return path, tf.shape(image)[0]

        ds = tf.data.Dataset.from_tensor_slices(candidates).map(check, num_parallel_calls=AUTOTUNE)
        ds = ds.ignore_errors()
        good = {p.decode("utf-8") for p, _ in ds.as_numpy_iterator()}
        for path in candidates:
            if path in good:
                continue
            try:
                tf.io.decode_image(
                    tf.io.read_file(path), channels=3, expand_animations=False
                ).numpy()
                bad[path] = "could not be decoded"
            except (tf.errors.OpError, OSError) as e:
                bad[path] = _decode_error(e, path)
    return [(p, bad[p]) for p in paths if p in bad]


def _folder_split(paths, labels, image_size) -> Split:
    ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
    return Split(ds, lambda p: decode_and_resize(tf.io.read_file(p), image_size), len(paths))


def load_image_folder(
    root: str, image_size: int, validation_percent: int, test_percent: int = 0
) -> DataSet:
    """An image folder -> DataSet, with unreadable files skipped and reported.

    `test_percent` > 0 carves a test split from a plain class folder (see `list_image_folder`).
    """
    listing = list_image_folder(root, validation_percent, test_percent)
    all_paths = [p for paths, _ in listing.splits.values() for p in paths]
    if not all_paths:
        raise UserError(f"--data={root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, any case).")
    skipped = list(listing.unusable) + find_unreadable(all_paths)
    if skipped:
        logging.warning(
            "Skipping %d unreadable file(s), e.g. %s",
            len(skipped),
            "; ".join(f"{p} ({r})" for p, r in skipped[:3]),
        )
    bad = {p for p, _ in skipped}
    splits = {}
    for name, (paths, labels) in listing.splits.items():
        kept = [(p, y) for p, y in zip(paths, labels) if p not in bad]
        if name == "train":
            seen = {y for _, y in kept}
            empty = [c for i, c in enumerate(listing.class_names) if i not in seen]
            if empty:
                raise UserError(
                    f"--data={root}: class(es) {', '.join(empty)} have no readable training image."
                )
        if not kept:
            if name == "val":
                raise UserError(
                    f"--data={root}: no image fell in the validation split; add images or "
                    "raise --validation_percent."
                )
            if name == "test" and test_percent:
                raise UserError(
                    f"--data={root}: no image fell in the test split; add images or "
                    "raise --test_percent."
                )
            continue
        paths, labels = zip(*kept)
        splits[name] = _folder_split(list(paths), list(labels), image_size)
    return DataSet(
        class_names=listing.class_names,
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        skipped_files=tuple(skipped),
    )


# ----------------------------------------------------------------------------- TFDS
def _carve(ds: tf.data.Dataset, seed: int, percent: int, take_val: bool) -> tf.data.Dataset:
    """Deterministically assigns each example (by index and seed) to train or validation."""

    def keep(index, _):
        bucket = tf.strings.to_hash_bucket_fast(
            tf.strings.join([tf.strings.as_string(index), str(seed)], separator=":"), 100
        )
        return (bucket < percent) if take_val else (bucket >= percent)

    return ds.enumerate().filter(keep).map(lambda _, example: example)


def _carved_counts(total: int, seed: int, percent: int) -> int:
    keys = tf.strings.join([tf.strings.as_string(tf.range(total, dtype=tf.int64)), str(seed)], ":")
    return int(
        tf.reduce_sum(tf.cast(tf.strings.to_hash_bucket_fast(keys, 100) < percent, tf.int32))
    )


def open_tfds(name: str, data_dir: str | None = None):
    """The prepared TFDS builder for `name`; UserError when unknown or not downloadable."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for unknown names
        raise UserError(f"--data=tfds:{name}: {str(e).splitlines()[0]}") from None
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise UserError(
            f"--data=tfds:{name}: could not download/prepare it ({type(e).__name__}). Offline? "
            f"Prepare it elsewhere and copy it to {builder.data_dir} (TFDS data dir, set by "
            "TFDS_DATA_DIR)."
        ) from None
    return builder


def tfds_splits(
    builder,
    to_pair: Callable[[dict], tuple[tf.Tensor, tf.Tensor]],
    load: Callable[[tf.Tensor], tf.Tensor],
    class_names: tuple[str, ...],
    train_split: str,
    val_split: str,
    test_split: str,
    validation_percent: int,
    seed: int,
    decoders: dict | None = None,
) -> DataSet:
    """The train/val/test Splits of a prepared TFDS builder (images or text).

    `to_pair` maps a TFDS example to the cheap `(key, int32 label)` the Split's source holds.
    Without a validation split, one is carved from train with `seed`.
    """
    name = builder.info.name
    available = set(builder.info.splits.keys())

    def split_ds(split):
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        return ds.map(to_pair)

    def count(split):
        try:
            return builder.info.splits[split].num_examples
        except Exception:  # noqa: BLE001 - no split metadata (e.g. mock data): count the keys
            pass
        try:
            ds = split_ds(split)
        except Exception as e:  # noqa: BLE001 - TFDS raises several types for bad splits
            raise UserError(f"--data=tfds:{name}: bad split {split!r} ({e}).") from None
        n = int(ds.cardinality())
        return n if n >= 0 else int(ds.reduce(0, lambda c, _: c + 1))

    train_count = count(train_split)
    val_name = val_split or ("validation" if "validation" in available else "")
    if val_name:
        train = Split(split_ds(train_split), load, train_count)
        val = Split(split_ds(val_name), load, count(val_name))
    else:
        n_val = _carved_counts(train_count, seed, validation_percent)
        full = split_ds(train_split)
        train = Split(_carve(full, seed, validation_percent, False), load, train_count - n_val)
        val = Split(_carve(full, seed, validation_percent, True), load, n_val)
    test_name = test_split or ("test" if "test" in available else "")
    test = Split(split_ds(test_name), load, count(test_name)) if test_name else None
    return DataSet(class_names, train, val, test)


def load_tfds(
    name: str,
    image_size: int,
    train_split: str,
    val_split: str,
    test_split: str,
    validation_percent: int,
    seed: int,
    data_dir: str | None = None,
) -> DataSet:
    """A TFDS image classification data set -> DataSet (class names from its info)."""
    import tensorflow_datasets as tfds

    builder = open_tfds(name, data_dir)
    image_key = "image"
    return tfds_splits(
        builder,
        lambda ex: (ex[image_key], tf.cast(ex["label"], tf.int32)),
        lambda encoded: decode_and_resize(encoded, image_size),
        tuple(builder.info.features["label"].names),
        train_split,
        val_split,
        test_split,
        validation_percent,
        seed,
        # Keep the images encoded until after the shuffle: the buffer then holds bytes.
        decoders={image_key: tfds.decode.SkipDecoding()},
    )


# ----------------------------------------------------------------------------- pipeline
# Decoded images are kept in RAM (as uint8) when the whole split takes at most this much.
IMAGE_CACHE_BYTES = 1024**3


def fits_in_memory(split: Split, image_size: int, budget: int = IMAGE_CACHE_BYTES) -> bool:
    """Whether the decoded uint8 images of `split` fit the in-memory cache budget."""
    return split.count * image_size * image_size * 3 <= budget


def make_pipeline(
    split: Split,
    num_classes: int,
    batch_size: int,
    training: bool,
    seed: int,
    cache_images: bool = False,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """Batches a split: shuffle keys (training only) -> decode in parallel -> batch -> prefetch.

    Yields (float32 pixels [b, s, s, 3] in 0-255, or tf.string texts [b]; one-hot labels [b, C]).
    Evaluation order is always the split's order; training order is fixed by the seed unless
    `deterministic=False`, which lets the parallel decode hand over whichever image is ready.

    Args:
      cache_images: decode each image once and keep it in memory, rounded to uint8, for later
        epochs (use `fits_in_memory` to decide; the shuffle buffer then holds decoded images,
        so the peak is up to twice the split's decoded size).
    """
    load = split.load

    def one_hot(x, y):
        return x, tf.one_hot(y, num_classes)

    if cache_images:

        def load_compact(key):
            x = load(key)
            return x if x.dtype == tf.string else to_uint8(x)

        ds = split.source.map(lambda x, y: (load_compact(x), y), num_parallel_calls=AUTOTUNE)
        ds = ds.cache()
        if training:
            ds = ds.shuffle(max(split.count, 1), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(
            lambda x, y: one_hot(x if x.dtype == tf.string else tf.cast(x, tf.float32), y),
            num_parallel_calls=AUTOTUNE,
        )
    else:
        ds = split.source
        if training:
            # Keys are paths or encoded bytes, so shuffling up to 50k of them is cheap.
            ds = ds.shuffle(
                min(max(split.count, 1), 50_000), seed=seed, reshuffle_each_iteration=True
            )
        # One map per example and none per batch: the fewest steps between the files and fit.
        ds = ds.map(lambda x, y: one_hot(load(x), y), num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch_size)
    if training and not deterministic:
        options = tf.data.Options()
        options.deterministic = False
        ds = ds.with_options(options)
    return ds.prefetch(AUTOTUNE)


# ----------------------------------------------------------------------------- class balance
def class_counts(split: Split, num_classes: int) -> list[int]:
    """Examples per class in `split`, from its labels alone (no image is decoded)."""
    counts = split.source.map(lambda _, y: tf.one_hot(y, num_classes, dtype=tf.int64)).reduce(
        tf.zeros([num_classes], tf.int64), lambda total, onehot: total + onehot
    )
    return [int(c) for c in counts.numpy()]


def balanced_class_weights(counts: list[int]) -> dict[int, float]:
    """`--class_weight=balanced`: n / (k * n_c), so every class weighs the same in the loss
    (scikit-learn's "balanced"). A class without examples gets weight 0."""
    total, k = sum(counts), len(counts)
    return {c: (total / (k * n) if n else 0.0) for c, n in enumerate(counts)}
