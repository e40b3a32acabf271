"""Export: a versioned SavedModel that TF Serving loads as is.

Layout: `<export_base>/<version>/` (TF Serving's base-path layout, integer versions). Each
version is written to a hidden temporary folder and renamed into place, so a TF Serving
instance watching the base path never sees a half-written version, and an existing version
is never overwritten.

Signatures (tag `serve`):
  serving_default: image_bytes (tf.string [batch], encoded JPEG/PNG/GIF/BMP)
  predict_images:  images (float32 [batch, h, w, 3], 0-255 pixels of any size)
both returning probabilities [batch, classes], top_k_indices, top_k_names, top_k_scores.
"""

import os
import re
import shutil

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import faults
from tf_finetune.data import decode_and_resize, resize_uint8

LABELS_FILE = "labels.txt"


def next_version(export_base: str) -> int:
    """The next free integer version under export_base (1 for a new base)."""
    versions = [int(d) for d in _listdir(export_base) if re.fullmatch(r"\d+", d)]
    return max(versions, default=0) + 1


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def remove_stale_temporaries(export_base: str) -> list[str]:
    """Deletes `.tmp-<version>-<pid>` folders whose writer is gone (an export that was killed).

    Never visible as a version (TF Serving only loads integer names); removed so they do not
    pile up. A folder of a live process (another run exporting right now) is left alone.
    """
    removed = []
    for name in _listdir(export_base):
        match = re.fullmatch(r"\.tmp-\d+-(\d+)", name)
        if match and (int(match.group(1)) == os.getpid() or not faults.pid_alive(int(match[1]))):
            shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
            removed.append(name)
    if removed:
        logging.info("Removed unfinished export(s) of killed runs: %s", ", ".join(removed))
    return removed


def _outputs(probabilities: tf.Tensor, class_names: tf.Tensor, k: int) -> dict:
    scores, indices = tf.math.top_k(probabilities, k=k)
    return {
        "probabilities": probabilities,
        "top_k_indices": indices,
        "top_k_names": tf.gather(class_names, indices),
        "top_k_scores": scores,
    }


def build_archive(
    model: keras.Model, class_names: list[str], image_size: int, top_k: int = 5
) -> keras.export.ExportArchive:
    """The serving graph around `model` (which takes float32 0-255 pixels)."""
    k = min(top_k, len(class_names))
    names = tf.constant(list(class_names))
    archive = keras.export.ExportArchive()
    archive.track(model)

    def classify(pixels_uint8):
        probabilities = model(tf.cast(pixels_uint8, tf.float32), training=False)
        return _outputs(tf.cast(probabilities, tf.float32), names, k)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        # The same decode-and-resize as the training pipeline, so serving sees what training saw.
        pixels = tf.map_fn(
            lambda b: decode_and_resize(b, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        )
        return classify(pixels)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    def serve_images(images):
        pixels = resize_uint8(tf.clip_by_value(images, 0.0, 255.0), image_size)
        return classify(pixels)

    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("predict_images", serve_images)
    return archive


def export_saved_model(
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    export_base: str,
    version: int | None = None,
) -> str:
    """Writes `<export_base>/<version>/` atomically and returns its path."""
    os.makedirs(export_base, exist_ok=True)
    remove_stale_temporaries(export_base)
    version = version or next_version(export_base)
    final = os.path.join(export_base, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version {final} exists; versions are never overwritten")
    tmp = os.path.join(export_base, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_archive(model, class_names, image_size).write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
        with open(os.path.join(tmp, "assets", LABELS_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(class_names) + "\n")
        faults.fault_point("export")
        os.rename(tmp, final)
    except Exception as e:
        if faults.is_disk_full(e):
            raise faults.disk_full_error("export", final) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("Exported SavedModel version %d to %s", version, final)
    return final
