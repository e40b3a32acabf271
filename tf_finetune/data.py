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
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from tf_finetune import headers
from tf_finetune import splits as splits_lib
from tf_finetune.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Files whose header announces more pixels than this (--max_image_pixels) are skipped without
# being decoded, so one huge (or malicious) file cannot exhaust memory: decoding takes
# width * height * 3 bytes (~270 MB at this limit, PIL's decompression-bomb threshold), per
# parallel decode. The export refuses such requests in-graph (`check_image_sizes`).
MAX_IMAGE_PIXELS = headers.MAX_IMAGE_PIXELS
MAX_ANIMATION_FRAMES = headers.MAX_ANIMATION_FRAMES
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
    # False: its files were not decoded when loaded (the feature pass's decode checks them),
    # so its pipelines skip a file that fails (and Keras no longer knows their length).
    checked: bool = True

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
    root: str = ""  # an image folder: where the files are (for `forget_undecodable`'s checks)
    test_percent: int = 0

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


# JPEG's reduced-size decode (libjpeg scales in the inverse DCT): 1/r of each side, r one of
# these. A photo several times the target size decodes 4-20x faster at a ratio, then the
# resize does the rest; measured ~1-2 grey levels (mean absolute) from a full decode + resize.
JPEG_RATIOS = (1, 2, 4, 8)


def jpeg_ratio_index(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index into JPEG_RATIOS of the largest ratio that keeps both sides >= `image_size`.

    From the header (`tf.image.extract_jpeg_shape`, no decoding). libjpeg's scaled size is
    ceil(side / r); a photo already smaller than the target gets 0 (a full decode).
    """
    short = tf.reduce_min(tf.image.extract_jpeg_shape(encoded)[:2])
    fits = [-(-short // r) >= image_size for r in JPEG_RATIOS[1:]]
    return tf.add_n([tf.cast(f, tf.int32) for f in fits])


def _decode_jpeg_scaled(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    # `ratio` must be a Python int: one branch per ratio, chosen per image.
    branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in JPEG_RATIOS]
    return tf.switch_case(jpeg_ratio_index(encoded, image_size), branches)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 RGB [size, size, 3] of 0-255 pixels.

    THE decode of every path (training, the feature pass, the export's serving signature).
    Grayscale, RGBA and palette images become RGB; an animated GIF gives its first frame. A
    JPEG at least twice the target size is decoded at a reduced size first (JPEG_RATIOS).
    """
    is_jpeg = tf.strings.substr(encoded, 0, 3) == b"\xff\xd8\xff"
    image = tf.cond(
        is_jpeg,
        lambda: _decode_jpeg_scaled(encoded, image_size),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8),
    )
    image.set_shape([None, None, 3])
    return resize(image, image_size)


# ----------------------------------------------------------------------------- in-graph headers
def _u16le(b, i):
    return b[i] + b[i + 1] * 256


# The in-graph GIF walk jumps over runs of full (255-byte) data sub-blocks, 64 per step (every
# encoder writes full sub-blocks but the last of each frame), so a legitimate GIF takes a few
# steps per frame plus one per 16 KB. A file that needs more steps than this (e.g. crafted with
# 1-byte sub-blocks to make the check itself slow) counts as more than the frame limit.
GIF_WALK_MAX_STEPS = 20_000
_SUB_BLOCK_RUN = 64


def _gif_info_tensor(encoded: tf.Tensor, max_frames: int) -> tf.Tensor:
    """[width, height, frames] of a GIF, walking its blocks in a tf.while_loop (as headers.py).

    No LZW decoding: the walk follows block and sub-block sizes, stopping after `max_frames` + 1
    frames or GIF_WALK_MAX_STEPS steps (then reported as `max_frames` + 1 frames).
    """
    raw = tf.io.decode_raw(encoded, tf.uint8)  # kept uint8: one byte per byte of the file
    n = tf.size(raw, out_type=tf.int64)
    raw = tf.concat([raw, tf.zeros([16], tf.uint8)], 0)  # reads past the end give 0

    def at(p):
        return tf.cast(tf.gather(raw, tf.minimum(tf.cast(p, tf.int64), n + 15)), tf.int64)

    def table(packed):  # size of a colour table announced by a packed-fields byte
        return tf.where(
            packed >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), packed % 8), 0
        )

    width, height = at(6) + at(7) * 256, at(8) + at(9) * 256
    start = 13 + table(at(10))
    run = 256 * tf.range(_SUB_BLOCK_RUN, dtype=tf.int64)

    def cond(step, pos, in_blocks, frames, w, h):
        return (pos < n) & (frames <= max_frames) & (step < GIF_WALK_MAX_STEPS)

    def body(step, pos, in_blocks, frames, w, h):
        fields = at(pos + tf.range(10, dtype=tf.int64))  # one read: a descriptor's 10 bytes
        byte = fields[0]
        # In data sub-blocks: skip the leading run of full ones at once, else one (size byte +
        # data); a size of 0 ends them.
        full = tf.reduce_sum(tf.math.cumprod(tf.cast(tf.equal(at(pos + run), 255), tf.int64)))
        sub_pos = tf.where(full > 0, pos + 256 * full, pos + 1 + byte)
        sub_in = byte > 0
        is_ext, is_desc = byte == 0x21, byte == 0x2C
        desc = ~in_blocks & is_desc
        desc_w, desc_h = fields[5] + fields[6] * 256, fields[7] + fields[8] * 256
        desc_pos = pos + 10 + table(fields[9]) + 1
        intro_pos = tf.where(is_ext, pos + 2, tf.where(is_desc, desc_pos, n))  # else: stop
        return (
            step + 1,
            tf.where(in_blocks, sub_pos, intro_pos),
            tf.where(in_blocks, sub_in, is_ext | is_desc),
            frames + tf.cast(desc, tf.int64),
            tf.where(desc, tf.maximum(w, desc_w), w),
            tf.where(desc, tf.maximum(h, desc_h), h),
        )

    zero = tf.constant(0, tf.int64)
    step, pos, _, frames, width, height = tf.while_loop(
        cond, body, (zero, start, tf.constant(False), zero, width, height)
    )
    gave_up = (step >= GIF_WALK_MAX_STEPS) & (pos < n)
    frames = tf.where(gave_up, tf.maximum(frames, max_frames + 1), frames)
    return tf.stack([width, height, tf.maximum(frames, 1)])


def _webp_info_tensor(encoded: tf.Tensor, head_str: tf.Tensor, head: tf.Tensor) -> tf.Tensor:
    """[width, height, frames] of a WebP from its VP8 / VP8L / VP8X chunk (0s: unknown).

    `head_str`/`head`: the first 32 bytes, zero-padded (as a string / as int64 values).
    """
    chunk = tf.strings.substr(head_str, 12, 4)
    vp8 = [
        tf.bitwise.bitwise_and(_u16le(head, 26), 0x3FFF),
        tf.bitwise.bitwise_and(_u16le(head, 28), 0x3FFF),
    ]
    bits = head[21] + head[22] * 256 + head[23] * 65536 + head[24] * 16777216
    vp8l = [bits % 16384 + 1, (bits // 16384) % 16384 + 1]
    vp8x = [
        head[24] + head[25] * 256 + head[26] * 65536 + 1,
        head[27] + head[28] * 256 + head[29] * 65536 + 1,
    ]

    def animation_frames():  # count top-level ANMF chunks (tens of steps, not per pixel)
        raw = tf.io.decode_raw(encoded, tf.uint8)
        n = tf.size(raw, out_type=tf.int64)
        raw = tf.concat([raw, tf.zeros([16], tf.uint8)], 0)

        def at(p):
            return tf.cast(raw[tf.minimum(tf.cast(p, tf.int64), n + 15)], tf.int64)

        anmf = tf.constant([ord(c) for c in "ANMF"], tf.int64)

        def body(pos, frames):
            size = at(pos + 4) + at(pos + 5) * 256 + at(pos + 6) * 65536 + at(pos + 7) * 16777216
            is_anmf = tf.reduce_all(tf.stack([at(pos + i) for i in range(4)]) == anmf)
            return pos + 8 + size + size % 2, frames + tf.cast(is_anmf, tf.int64)

        _, frames = tf.while_loop(
            lambda pos, _: pos + 8 <= n, body, (tf.constant(12, tf.int64), tf.constant(0, tf.int64))
        )
        return tf.maximum(frames, 1)

    is_vp8 = (chunk == "VP8 ") & (tf.strings.substr(head_str, 23, 3) == b"\x9d\x01\x2a")
    is_vp8l = (chunk == "VP8L") & tf.equal(head[20], 0x2F)
    is_vp8x = chunk == "VP8X"
    zero = tf.constant(0, tf.int64)
    return tf.case(
        [
            (is_vp8, lambda: tf.stack([vp8[0], vp8[1], tf.constant(1, tf.int64)])),
            (is_vp8l, lambda: tf.stack([vp8l[0], vp8l[1], tf.constant(1, tf.int64)])),
            (is_vp8x, lambda: tf.stack([vp8x[0], vp8x[1], animation_frames()])),
        ],
        default=lambda: tf.stack([zero, zero, zero]),
        exclusive=True,
    )


def image_info_tensor(encoded: tf.Tensor, max_frames: int = MAX_ANIMATION_FRAMES) -> tf.Tensor:
    """int64 [width, height, frames] of one encoded image, from its header, in-graph.

    The graph twin of `headers.parse` (JPEG via tf.image.extract_jpeg_shape, the others by
    their header bytes; GIF: the largest of the logical screen and each image descriptor).
    [0, 0, 0] when the format is not recognised or the header does not say: decoding decides.
    """
    # Short inputs are padded with zeros so every fixed-offset read is in range.
    head_str = tf.strings.substr(
        tf.strings.join([tf.strings.substr(encoded, 0, 32), "\0" * 32]), 0, 32
    )
    head = tf.cast(tf.io.decode_raw(head_str, tf.uint8), tf.int64)
    magic = tf.strings.substr(head_str, 0, 8)
    zero = tf.constant(0, tf.int64)
    one = tf.constant(1, tf.int64)

    def jpeg():
        hwc = tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64)
        return tf.stack([hwc[1], hwc[0], one])

    def png():
        be32 = lambda i: ((head[i] * 256 + head[i + 1]) * 256 + head[i + 2]) * 256 + head[i + 3]  # noqa: E731
        return tf.stack([be32(16), be32(20), one])

    def bmp():
        def le32(i):  # signed, as TF's BMP decoder reads it (negative height = top-down)
            u = head[i] + head[i + 1] * 256 + head[i + 2] * 65536 + head[i + 3] * 16777216
            return tf.abs(tf.where(u >= 2**31, u - 2**32, u))

        return tf.stack([le32(18), le32(22), one])

    is_jpeg = tf.strings.substr(magic, 0, 3) == b"\xff\xd8\xff"
    is_png = magic == b"\x89PNG\r\n\x1a\n"
    is_gif = (tf.strings.substr(magic, 0, 6) == "GIF87a") | (
        tf.strings.substr(magic, 0, 6) == "GIF89a"
    )
    is_bmp = tf.strings.substr(magic, 0, 2) == "BM"
    is_webp = (tf.strings.substr(magic, 0, 4) == "RIFF") & (
        tf.strings.substr(head_str, 8, 4) == "WEBP"
    )
    return tf.case(
        [
            (is_jpeg, jpeg),
            (is_png & (tf.strings.length(encoded) >= 24), png),
            (
                is_gif & (tf.strings.length(encoded) >= 13),
                lambda: _gif_info_tensor(encoded, max_frames),
            ),
            (is_bmp & (tf.strings.length(encoded) >= 26), bmp),
            (is_webp, lambda: _webp_info_tensor(encoded, head_str, head)),
        ],
        default=lambda: tf.stack([zero, zero, zero]),
        exclusive=False,
    )


def check_image_sizes(
    image_bytes: tf.Tensor,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_frames: int = MAX_ANIMATION_FRAMES,
) -> tf.Tensor:
    """`image_bytes` (tf.string [batch]), once every header is within the limits.

    Reads each image's size from its header (`image_info_tensor`, no decoding) and fails the
    whole batch with InvalidArgument naming the first image above `max_pixels` pixels (width x
    height x frames) or `max_frames` frames, before any image of the batch is decoded. Decode
    the returned tensor: it depends on the check.
    """
    info = tf.map_fn(
        lambda b: image_info_tensor(b, max_frames),
        image_bytes,
        fn_output_signature=tf.TensorSpec([3], tf.int64),
    )
    width, height, frames = info[:, 0], info[:, 1], info[:, 2]
    too_many_frames = frames > max_frames
    too_large = width * height * frames > max_pixels
    padded = tf.concat([info, tf.zeros([1, 3], tf.int64)], 0)  # formatting an empty batch

    count = tf.size(image_bytes, out_type=tf.int64)

    def first(bad):  # index of the first offending image (count when none)
        return tf.argmax(tf.cast(tf.concat([bad, [True]], 0), tf.int32), output_type=tf.int64)

    i = first(too_large)
    pixels_ok = tf.debugging.Assert(
        ~tf.reduce_any(too_large),
        [
            tf.strings.format(
                "image {} of {} in the request is too large to decode safely: {}x{} pixels x {} "
                f"frame(s), above the limit of {max_pixels:,} pixels (max_image_pixels); "
                "refused before decoding",
                (i + 1, count, padded[i, 0], padded[i, 1], padded[i, 2]),
            )
        ],
    )
    j = first(too_many_frames)
    frames_ok = tf.debugging.Assert(
        ~tf.reduce_any(too_many_frames),
        [
            tf.strings.format(
                f"image {{}} of {{}} in the request is an animation of more than {max_frames} "
                f"frames, above the limit of {max_frames} frames; refused before decoding",
                (j + 1, count),
            )
        ],
    )
    with tf.control_dependencies([frames_ok, pixels_ok]):
        return tf.identity(image_bytes)


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


def class_dirs(root: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )


def files_by_class(
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
    subdirs = class_dirs(root)
    unusable: list[tuple[str, str]] = []
    if "train" in subdirs:
        class_names = tuple(class_dirs(os.path.join(root, "train")))
        splits = {"train": files_by_class(os.path.join(root, "train"), class_names, unusable)}
        val_dir = next((d for d in VALIDATION_DIRS if d in subdirs), None)
        if val_dir:
            splits["val"] = files_by_class(os.path.join(root, val_dir), class_names, unusable)
        if "test" in subdirs:
            splits["test"] = files_by_class(os.path.join(root, "test"), class_names, unusable)
        source_root = os.path.join(root, "train")
    else:
        class_names = tuple(subdirs)
        splits = {"train": files_by_class(root, class_names, unusable)}
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


def image_header(path: str) -> tuple[str, int | None, int | None] | None:
    """(format, width, height) read from the file's first bytes, or None if not an image.

    Width and height are None when the header does not say (then decoding decides). JPEG, PNG,
    GIF, BMP and WebP (VP8, VP8L, VP8X); see `headers` for frames and the size limit.
    """
    info = headers.read(path)
    return (info.format, info.width, info.height) if info else None


def precheck(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why `path` must not be decoded (empty, not an image, too large), from its header; or None.

    Too large: more than `max_pixels` pixels over all frames, or an animation of more than
    `headers.MAX_ANIMATION_FRAMES` frames.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        header = headers.read(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file disappeared"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if header is None:
        with open(path, "rb") as f:
            start = f.read(16)
        kind = "a text file" if start.isascii() and start.decode("ascii").isprintable() else "data"
        return f"not an image: {kind} starting with {start!r}"
    return headers.problem(header, max_pixels)


def _decode_error(error: Exception, path: str) -> str:
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]( name: \S*)?", "", message)
    message = " ".join(message.split())[:160]
    header = image_header(path)
    fmt = header[0] if header else "image"
    return f"corrupt or truncated {fmt}: {message}"


def _full_decode(encoded: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)


def find_unreadable(
    paths: list[str], max_pixels: int = MAX_IMAGE_PIXELS, image_size: int | None = None
) -> list[tuple[str, str]]:
    """Returns (path, reason) for each file that cannot be decoded as an image.

    Headers are checked first (empty, not an image, more than `max_pixels`: never decoded).
    The rest are decoded once in parallel by tf.data (with `image_size`, by the run's own
    `decode_and_resize`, a JPEG at its reduced size: the decode that must succeed); only the
    failures are decoded again, one by one, to learn why.
    """
    bad = {}
    for path in paths:
        reason = precheck(path, max_pixels)
        if reason:
            bad[path] = reason
    candidates = [p for p in paths if p not in bad]
    if image_size:
        decode = lambda encoded: decode_and_resize(encoded, image_size)  # noqa: E731
    else:
        decode = _full_decode
    if candidates:

        def check(path):
            # Reading a value forces the whole decode (a truncated file fails here); not its
            # shape, which a resize to a fixed size knows without decoding.
            return path, tf.reduce_max(decode(tf.io.read_file(path)))

        ds = tf.data.Dataset.from_tensor_slices(candidates).map(check, num_parallel_calls=AUTOTUNE)
        ds = ds.ignore_errors()
        good = {p.decode("utf-8") for p, _ in ds.as_numpy_iterator()}
        for path in candidates:
            if path in good:
                continue
            try:
                decode(tf.io.read_file(path)).numpy()
                bad[path] = "could not be decoded"
            except (tf.errors.OpError, OSError) as e:
                bad[path] = _decode_error(e, path)
    return [(p, bad[p]) for p in paths if p in bad]


def _folder_split(paths, labels, image_size, checked: bool = True) -> Split:
    ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
    load = lambda p: decode_and_resize(tf.io.read_file(p), image_size)  # noqa: E731
    return Split(ds, load, len(paths), checked)


ALL_SPLITS = ("train", "val", "test")


def _log_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        logging.warning(
            "Skipping %d unreadable file(s), e.g. %s",
            len(skipped),
            "; ".join(f"{p} ({r})" for p, r in skipped[:3]),
        )


def _check_kept(root: str, name: str, kept: list, class_names, test_percent: int) -> None:
    """UserError when a split lost what a run needs: a class without a training image, an
    empty validation split, an empty carved test split."""
    if name == "train":
        seen = {y for _, y in kept}
        empty = [c for i, c in enumerate(class_names) if i not in seen]
        if empty:
            raise UserError(
                f"--data={root}: class(es) {', '.join(empty)} have no readable training image."
            )
    if not kept and name == "val":
        raise UserError(
            f"--data={root}: no image fell in the validation split; add images or "
            "raise --validation_percent."
        )
    if not kept and name == "test" and test_percent:
        raise UserError(
            f"--data={root}: no image fell in the test split; add images or raise --test_percent."
        )


def load_image_folder(
    root: str,
    image_size: int,
    validation_percent: int,
    test_percent: int = 0,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    decode_check: tuple[str, ...] = ALL_SPLITS,
) -> DataSet:
    """An image folder -> DataSet, with unreadable files skipped and reported.

    `test_percent` > 0 carves a test split from a plain class folder (see `list_image_folder`).
    Every file's header is checked (empty, not an image, more than `max_image_pixels` pixels:
    skipped, never decoded). The files of the splits in `decode_check` are also decoded once
    here; the others are checked by the run's own first decode of them (the feature pass:
    `feature_pipeline`, then `forget_undecodable`), so no image is decoded twice for it.
    """
    listing = list_image_folder(root, validation_percent, test_percent)
    all_paths = [p for paths, _ in listing.splits.values() for p in paths]
    if not all_paths:
        raise UserError(f"--data={root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, any case).")
    skipped = list(listing.unusable)
    for name, (paths, _) in listing.splits.items():
        if name in decode_check:
            skipped += find_unreadable(paths, max_image_pixels, image_size)
        else:
            skipped += [(p, r) for p in paths if (r := precheck(p, max_image_pixels))]
    _log_skipped(skipped)
    bad = {p for p, _ in skipped}
    splits = {}
    for name, (paths, labels) in listing.splits.items():
        kept = [(p, y) for p, y in zip(paths, labels) if p not in bad]
        _check_kept(root, name, kept, listing.class_names, test_percent)
        if kept:
            paths, labels = zip(*kept)
            checked = name in decode_check
            splits[name] = _folder_split(list(paths), list(labels), image_size, checked)
    return DataSet(
        class_names=listing.class_names,
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        skipped_files=tuple(skipped),
        root=root,
        test_percent=test_percent,
    )


# ----------------------------------------------------------------------------- first decode
# The feature pass decodes each image once, in parallel, in the split's order. Explicit
# parallelism: AUTOTUNE starts low and ramps up, which costs more than a short pass gains.
FEATURE_PARALLEL_CALLS = max(1, os.cpu_count() or 1)


def _alternating() -> tf.data.Options:
    """No prefetch, no autotuning: a batch is decoded (on every core) when the forward asks
    for it, so decoding and the forward take turns instead of fighting over the same cores
    (measured on 2 cores: ~100% of 1/(1/decode + 1/forward) against ~85% with a prefetch)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return options


def _targets(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """One-hot rows of class ids; multi-label targets are float multi-hot vectors already."""
    return labels if labels.dtype.is_floating else tf.one_hot(labels, num_classes)


def feature_pipeline(
    split: Split, num_classes: int, batch_size: int, views: int = 0, seed: int = 0
) -> tf.data.Dataset:
    """Batches of (int64 index in the split, pixels, one-hot) for the feature pass, in order.

    Each image is decoded once; one that fails to decode yields nothing, so the indices
    missing from the pass are exactly the undecodable files (`undecodable` names them).
    `views` (--cache_views): each image yields its clean pixels, then `views` augmented views
    of them (`augmented_view` with `seed`), made from that one decode; every row carries its
    image's index and label, and a file that fails to decode yields none of them.
    """
    load = split.load

    def one(index, key_label):
        key, label = key_label
        return index, load(key), _targets(label, num_classes)

    def with_views(index, key_label):
        index, pixels, target = one(index, key_label)
        rows = [pixels] + [augmented_view(pixels, seed, index, v) for v in range(1, views + 1)]
        rows = [tf.ensure_shape(r, pixels.shape) for r in rows]
        return (
            tf.fill([views + 1], index),
            tf.stack(rows),
            tf.tile(target[None], [views + 1, 1]),
        )

    ds = split.source.enumerate().map(
        with_views if views else one, num_parallel_calls=FEATURE_PARALLEL_CALLS
    )
    ds = ds.ignore_errors()  # before the views are split up: a failed decode drops them all
    if views:
        ds = ds.unbatch()
    return ds.batch(batch_size).with_options(_alternating())


def _key_name(key, index: int) -> str:
    if isinstance(key, bytes) and len(key) < 4096 and os.path.exists(key):
        return printable_path(os.fsdecode(key))
    return f"example {index}"


def keys_at(split: Split, indices) -> dict[int, bytes]:
    """{index: key} of `split`'s examples at `indices` (positions in its source), in source
    order; reads the source only as far as the last one."""
    wanted, keys = {int(i) for i in indices}, {}
    if not wanted:
        return keys
    for i, (key, _) in enumerate(split.source.as_numpy_iterator()):
        if i in wanted:
            keys[i] = key
            if len(keys) == len(wanted):
                break
    return keys


def undecodable(split: Split, indices) -> list[tuple[str, str]]:
    """(file, reason) for the examples of `split` at `indices` (those a pass could not
    decode): only these are decoded again, one by one, to learn why."""
    found = []
    for i, key in keys_at(split, indices).items():
        name = _key_name(key, i)
        try:
            split.load(tf.constant(key)).numpy()
            reason = "could not be decoded"
        except (tf.errors.OpError, OSError) as e:
            reason = _decode_error(e, name) if name != f"example {i}" else str(e)[:160]
        found.append((name, reason))
    return found


def forget_undecodable(dataset: DataSet, name: str, failed: list[tuple[str, str]]) -> None:
    """Drops the files a pass could not decode from split `name` of `dataset`, records them in
    its `skipped_files` and logs them (one line, as the header check does).

    The one change made to a DataSet after loading: its first decode is where a corrupt file
    shows. Pipelines built before skip such files themselves (`make_pipeline`).
    """
    if not failed:
        return
    split = getattr(dataset, name)
    bad = tf.constant([os.fsencode(p) for p, _ in failed] or [b""])
    kept = split.source.filter(lambda k, _: tf.reduce_all(tf.not_equal(k, bad)))
    if dataset.root:
        labels = [int(y) for _, y in kept.as_numpy_iterator()]
        _check_kept(
            dataset.root,
            name,
            [(None, y) for y in labels],
            dataset.class_names,
            dataset.test_percent,
        )
    object.__setattr__(
        dataset, name, dataclasses.replace(split, source=kept, count=split.count - len(failed))
    )
    object.__setattr__(dataset, "skipped_files", dataset.skipped_files + tuple(failed))
    _log_skipped(list(failed))


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


def _label_feature(features, label_key: str, name: str):
    """(the ClassLabel feature at `label_key`, whether it holds several labels per example).

    `label_key` may name a nested feature with "/" (COCO's `objects/label`); a Sequence of
    ClassLabel on the way (VOC's `labels`) makes it multi-label."""
    import tensorflow_datasets as tfds

    feature, several = features, False
    for part in label_key.split("/"):
        while isinstance(feature, tfds.features.Sequence):
            feature, several = feature.feature, True
        try:
            feature = feature[part]
        except (KeyError, TypeError):
            raise UserError(
                f"--data=tfds:{name} has no feature {label_key!r} (top-level features: "
                f"{', '.join(features.keys())}); set --label_key."
            ) from None
    while isinstance(feature, tfds.features.Sequence):
        feature, several = feature.feature, True
    if not hasattr(feature, "names"):
        raise UserError(
            f"--data=tfds:{name}: --label_key={label_key} is not a class label feature."
        )
    return feature, several


def multi_hot_row(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """float32 [num_classes]: 1 for each class id in `labels` (repeats count once; none: 0s)."""
    return tf.minimum(tf.reduce_sum(tf.one_hot(labels, num_classes), axis=0), 1.0)


def _nested_spec(label_key: str) -> dict:
    """ "objects/label" -> {"objects": {"label": True}}: what PartialDecoding reads."""
    spec: dict | bool = True
    for part in reversed(label_key.split("/")):
        spec = {part: spec}
    return spec


def _nested(example: dict, label_key: str) -> tf.Tensor:
    value = example
    for part in label_key.split("/"):
        value = value[part]
    return value


def load_tfds(
    name: str,
    image_size: int,
    train_split: str,
    val_split: str,
    test_split: str,
    validation_percent: int,
    seed: int,
    data_dir: str | None = None,
    label_key: str = "label",
    multi_label: bool = False,
) -> DataSet:
    """A TFDS image classification data set -> DataSet (class names from its info).

    `multi_label`: the label feature is a Sequence of ClassLabel (VOC's `labels`, COCO's
    `objects/label`); each example gets a multi-hot vector, repeated labels counted once."""
    import tensorflow_datasets as tfds

    builder = open_tfds(name, data_dir)
    image_key = "image"
    feature, several = _label_feature(builder.info.features, label_key, name)
    if several != multi_label:
        raise UserError(
            f"--data=tfds:{name}: --label_key={label_key} holds "
            + (
                "several labels per image; pass --task=multi_label."
                if several
                else "one label per image; drop --task=multi_label."
            )
        )
    num_classes = len(feature.names)

    def to_pair(ex):
        labels = tf.cast(_nested(ex, label_key), tf.int32)
        if multi_label:
            return ex[image_key], multi_hot_row(labels, num_classes)
        return ex[image_key], labels

    return tfds_splits(
        builder,
        to_pair,
        lambda encoded: decode_and_resize(encoded, image_size),
        tuple(feature.names),
        train_split,
        val_split,
        test_split,
        validation_percent,
        seed,
        # Only the image and the label are read; the image stays encoded until after the
        # shuffle, so the buffer holds bytes (and COCO's boxes are never decoded).
        decoders=tfds.decode.PartialDecoding(
            {image_key: True, **_nested_spec(label_key)},
            decoders={image_key: tfds.decode.SkipDecoding()},
        ),
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
        return x, _targets(y, num_classes)

    if cache_images:

        def load_compact(key):
            x = load(key)
            return x if x.dtype == tf.string else to_uint8(x)

        ds = split.source.map(lambda x, y: (load_compact(x), y), num_parallel_calls=AUTOTUNE)
        ds = (ds if split.checked else ds.ignore_errors()).cache()  # see below
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
        # A split whose files were not checked when loaded skips a file that fails to
        # decode: the run's first decode of it (the feature pass) named it already.
        ds = (ds if split.checked else ds.ignore_errors()).batch(batch_size)
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


def balanced_label_weights(split: Split) -> tuple[list[float], list[float]]:
    """Multi-label `--class_weight=balanced`: per label, n / (2 * positives) for its positives
    and n / (2 * negatives) for its negatives (0 for a side with no example), from the
    split's multi-hot targets alone (no image is decoded)."""
    positives = split.source.reduce(
        tf.zeros_like(next(iter(split.source))[1]), lambda total, pair: total + pair[1]
    ).numpy()
    n = float(split.count)
    negatives = n - positives
    weigh = lambda count: [n / (2 * c) if c else 0.0 for c in count]  # noqa: E731
    return weigh(positives), weigh(negatives)


def balanced_class_weights(counts: list[int]) -> dict[int, float]:
    """`--class_weight=balanced`: n / (k * n_c), so every class weighs the same in the loss
    (scikit-learn's "balanced"). A class without examples gets weight 0."""
    total, k = sum(counts), len(counts)
    return {c: (total / (k * n) if n else 0.0) for c, n in enumerate(counts)}


def decode_images(
    image_bytes: tf.Tensor, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> tf.Tensor:
    """A batch of encoded images (tf.string [batch]) -> float32 [batch, size, size, 3] pixels.

    What the export's `serving_default` does before the model (and `predict --model=X.tflite`
    too): the header check of the whole batch (`check_image_sizes`), then `decode_and_resize`
    of each image, the training pipeline's own decode.
    """
    checked = check_image_sizes(image_bytes, max_pixels)
    return tf.map_fn(
        lambda b: decode_and_resize(b, image_size),
        checked,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )


# ----------------------------------------------------------------------------- cached views
# --cache_views (issue 14 item 5): augmented views of each training image, made from its one
# decode in the feature pass (`feature_pipeline`), seeded per image and view so a rerun caches
# the same views.
VIEW_AREA = (0.5, 1.0)  # random-resized-crop: share of the image kept
VIEW_ASPECT = (3 / 4, 4 / 3)


def augmented_view(pixels: tf.Tensor, seed: int, index: tf.Tensor, view: int) -> tf.Tensor:
    """View `view` (>= 1) of decoded float32 [s, s, 3] pixels: a random-resized crop
    (VIEW_AREA, VIEW_ASPECT) resized back to s, mirrored left-right half the time (always
    when the crop is the whole image).

    Stateless: the same (seed, index, view) always gives the same view, in any order.
    """
    size = tf.shape(pixels)[:2]
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64) * 1024 + view])
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(pixels),
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=key,
        area_range=VIEW_AREA,
        aspect_ratio_range=VIEW_ASPECT,
        min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.image.resize(tf.slice(pixels, begin, extent), size, method="bilinear")
    # Mirrored half the time, and always when the crop kept the whole image (rare but
    # possible at small sizes): a view is never the clean view again.
    whole = tf.reduce_all(tf.equal(extent[:2], size))
    flip = (tf.random.stateless_uniform([], seed=key + [0, 1]) < 0.5) | whole
    return tf.where(flip, tf.image.flip_left_right(crop), crop)
