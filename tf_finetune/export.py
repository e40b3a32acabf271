"""Export: a versioned SavedModel that TF Serving loads as is.

Layout: `<export_base>/<version>/` (TF Serving's base-path layout, integer versions). Each
version is written to a hidden temporary folder and renamed into place, so a TF Serving
instance watching the base path never sees a half-written version, and an existing version
is never overwritten.

Signatures (tag `serve`):
  serving_default: image_bytes (tf.string [batch], encoded JPEG/PNG/GIF/BMP)
  predict_images:  images (float32 [batch, h, w, 3], 0-255 pixels of any size)
or, for a text model (one whose input is tf.string):
  serving_default: text (tf.string [batch])
all returning probabilities [batch, classes], top_k_indices, top_k_names, top_k_scores.

Beside `saved_model.pb`: `assets/labels.txt` (class names), `model_card.json` (how the model
was made and how well it does) and `assets.extra/tf_serving_warmup_requests` (one real
request TF Serving replays at load time, so the first user request is not slow).

Decoding and resizing run in plain `tf.function` graphs, never in an XLA-compiled one:
string ops (DecodeImage) have no XLA kernels. An empty batch returns empty outputs ([0, C])
without calling the model (TF's Conv2D mishandles a zero-size batch on CPU). A batch with
bytes that do not decode fails as a whole with InvalidArgument "Unknown image file format.
One of JPEG, PNG, GIF, BMP required." (TF Serving: HTTP 400 / gRPC INVALID_ARGUMENT).
Before decoding, every image's size is read from its header (`data.check_image_sizes`): a
batch holding an image above `max_image_pixels` pixels (a decompression bomb) or an animation
of too many frames fails as a whole with InvalidArgument naming the image and the limit.
"""

import datetime
import os
import re
import shutil

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import atomic, backbone_table, faults, features, hub, rundir
from tf_finetune import data as data_lib
from tf_finetune.config import Config
from tf_finetune.data import MAX_IMAGE_PIXELS, decode_images, resize
from tf_finetune.errors import UserError

LABELS_FILE = "labels.txt"
MODEL_CARD = "model_card.json"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


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


def _outputs(
    probabilities: tf.Tensor, class_names: tf.Tensor, k: int, thresholds: list[float] | None = None
) -> dict:
    """The signature outputs. A multi-label model (`thresholds`, one per label) also returns
    `above_threshold` (bool [batch, labels]), `labels` (the names at or above their threshold,
    in label order, padded with "" to [batch, labels]) and `label_count` (int32 [batch])."""
    scores, indices = tf.math.top_k(probabilities, k=k)
    outputs = {
        "probabilities": probabilities,
        "top_k_indices": indices,
        "top_k_names": tf.gather(class_names, indices),
        "top_k_scores": scores,
    }
    if thresholds is not None:
        above = probabilities >= tf.constant(thresholds, tf.float32)
        every_name = tf.broadcast_to(class_names, tf.shape(probabilities))
        outputs["above_threshold"] = above
        outputs["labels"] = tf.ragged.boolean_mask(every_name, above).to_tensor(
            default_value="", shape=[None, len(thresholds)]
        )
        outputs["label_count"] = tf.reduce_sum(tf.cast(above, tf.int32), axis=1)
    return outputs


def image_endpoints(
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    top_k: int = 5,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    thresholds: list[float] | None = None,
) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """The serving graph around `model` (which takes float32 0-255 pixels), traced once:
    {"serving_default": image bytes -> outputs, "predict_images": pixels -> outputs}.

    `serving_default` reads every image's size from its header first and refuses the whole
    request (InvalidArgument naming the image and the limit) when one has more than
    `max_image_pixels` pixels (over all frames) or too many frames: nothing is decoded then.
    """
    k = min(top_k, len(class_names))
    names = tf.constant(list(class_names))
    num_classes = len(class_names)
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    # A head-only run's feature pass traced the backbone already: its graph is reused.
    traced = features.traced_forward(model, spec)
    if traced is None:
        forward = lambda pixels: model(pixels, training=False)  # noqa: E731
    else:
        forward = lambda pixels: traced[1](traced[0](pixels), training=False)  # noqa: E731

    # One trace of the model, shared by both endpoints.
    @tf.function(input_signature=[spec], autograph=False)
    def classify(pixels):
        # An empty batch skips the model: TF's CPU Conv2D fails on a zero-size batch.
        probabilities = tf.cond(
            tf.shape(pixels)[0] > 0,
            lambda: tf.cast(forward(pixels), tf.float32),
            lambda: tf.zeros([0, num_classes], tf.float32),
        )
        return _outputs(tf.ensure_shape(probabilities, [None, num_classes]), names, k, thresholds)

    # autograph=False: the decode is written in TF ops (map_fn, switch_case, Assert); autograph
    # converting it and everything it calls cost ~1.5 s of every export.
    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")], autograph=False
    )
    def serve_bytes(image_bytes):
        # Headers first (a decompression bomb is refused before anything is decoded), then the
        # same decode-and-resize as the training pipeline, so serving sees what training saw.
        return classify(decode_images(image_bytes, image_size, max_image_pixels))

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")],
        autograph=False,
    )
    def serve_images(images):
        pixels = resize(tf.clip_by_value(images, 0.0, 255.0), image_size)
        return classify(pixels)

    return {
        "serving_default": serve_bytes.get_concrete_function(),
        "predict_images": serve_images.get_concrete_function(),
    }


def write_endpoints(
    folder: str, model: keras.Model, endpoints: dict[str, tf.types.experimental.ConcreteFunction]
) -> None:
    """Saves traced `endpoints` as the SavedModel's signatures (and as callable attributes),
    with the model's variables as `variables`, `trainable_variables` and
    `non_trainable_variables`: what `keras.export.ExportArchive` writes for an image model.

    Not through ExportArchive: its `write_out` traces every endpoint again inside
    `tf.saved_model.save` (a tf.function attribute is retraced there; a concrete function is
    not), and `track(model)` walks every layer for lookup tables an image model does not
    have: 7.6 s -> ~3 s for a MobileNetV2-0.35 export on 2 cores. A variable an endpoint
    captures that the model does not list is saved too (`fn.variables`).
    """
    root = tf.__internal__.tracking.AutoTrackable()
    for name in ("variables", "trainable_variables", "non_trainable_variables"):
        setattr(root, name, [v.value for v in getattr(model, name)])
    listed = {id(v) for v in root.variables}
    root.captured_variables = [
        v for fn in endpoints.values() for v in fn.variables if id(v) not in listed
    ]
    for name, fn in endpoints.items():
        setattr(root, name, fn)
    tf.saved_model.save(root, folder, signatures=endpoints)


def build_text_archive(
    model: keras.Model,
    class_names: list[str],
    top_k: int = 5,
    thresholds: list[float] | None = None,
) -> keras.export.ExportArchive:
    """The serving graph around a text `model` (tf.string [batch] -> probabilities)."""
    k = min(top_k, len(class_names))
    names = tf.constant(list(class_names))
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve_text(text):
        probabilities = model(text, training=False)
        return _outputs(tf.cast(probabilities, tf.float32), names, k, thresholds)

    archive.add_endpoint("serving_default", serve_text)
    return archive


def is_text_model(model: keras.Model) -> bool:
    """Whether `model` takes a batch of strings (a text classifier)."""
    return len(model.inputs) == 1 and model.inputs[0].dtype == "string"


def warmup_image(image_size: int) -> bytes:
    """A real JPEG (a colour gradient) of the model's input size, for the warm-up request.

    Synthetic on purpose: a training image would leak user data into every copy of the export.
    """
    ramp = tf.linspace(0.0, 255.0, image_size)
    rgb = tf.stack(
        [
            tf.tile(ramp[None, :], [image_size, 1]),
            tf.tile(ramp[:, None], [1, image_size]),
            tf.fill([image_size, image_size], 128.0),
        ],
        axis=-1,
    )
    return tf.io.encode_jpeg(tf.cast(rgb, tf.uint8), quality=90).numpy()


def write_warmup_requests(
    saved_model_dir: str, image: bytes, input_name: str = "image_bytes"
) -> str:
    """Writes TF Serving's warm-up file: a TFRecord of one PredictionLog for serving_default.

    `image` is the one string sent as `input_name` (encoded image bytes, or a text).
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(signature_name="serving_default")
    )
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(log.SerializeToString())
    return path


def model_card(class_names: list[str], image_size: int, flags: str = "", **facts) -> dict:
    """The facts a production team needs beside the model, as JSON-ready values.

    Args:
      class_names: in output order.
      image_size: the square size the model sees (inputs of any size are resized to it).
      flags: the flagfile that made the model (`Config.to_flagfile()`).
      **facts: backbone, data, metrics, ... (added as given).
    """
    return {
        "class_names": list(class_names),
        "image_size": image_size,
        "flags": [line for line in flags.splitlines() if line.startswith("--")],
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **facts,
    }


def card_metrics(metrics: dict) -> dict:
    """The numbers of metrics.json worth shipping with the model (no file lists)."""
    keep = ("train_images", "val_images", "test_images", "epochs")
    return {
        k: v
        for k, v in metrics.items()
        if k in keep or (isinstance(v, float) and k != "wall_time_seconds")
    }


def card_thresholds(card: dict | None, class_names: list[str]) -> list[float] | None:
    """A multi-label card's per-label thresholds in label order, else None."""
    by_name = (card or {}).get("thresholds")
    return [float(by_name[n]) for n in class_names] if by_name else None


def run_card(config: Config, class_names: list[str], metrics: dict) -> dict:
    """The model card of a run: backbone, data, metrics, image size, the flags that made it;
    a multi-label run's card also holds its task and per-label thresholds (chosen on val)."""
    multi_label = {}
    if config.task == "multi_label":
        thresholds = rundir.read_thresholds(config.model_dir)
        if thresholds is None:
            raise UserError(
                f"{config.model_dir} has no {rundir.THRESHOLDS}: rerun "
                "'tf-finetune evaluate' or train to choose the thresholds on val."
            )
        multi_label = {"task": "multi_label", "thresholds": thresholds}
    return multi_label | model_card(
        class_names,
        config.image_size,
        config.to_flagfile(),
        max_image_pixels=getattr(config, "max_image_pixels", MAX_IMAGE_PIXELS),
        backbone=config.backbone,
        lineage=backbone_lineage(config),
        data=config.data or "offline default (scikit-learn digits 5-9)",
        metrics=card_metrics(metrics),
    )


def backbone_lineage(config: Config) -> dict:
    """Where the model started: the parent run / .keras file / export the run copied (its
    data, classes and metrics; see own_model.keep_source), else the backbone's name or handle."""
    record = backbone_table.source_record(config.model_dir)
    if record.get("backbone") == config.backbone and record.get("lineage"):
        return record["lineage"]
    return {"kind": backbone_table.backbone_kind(config.backbone), "source": config.backbone}


def record_non_core_ops(saved_model_dir: str) -> list[str]:
    """The ops the written SavedModel needs beyond core TensorFlow, sorted; logged when any.

    E.g. a BERT preprocessor's TF Text ops: stock TF Serving cannot load such a model (see
    docs/serving.md). Goes into model_card.json as `non_core_ops` (empty when none).
    """
    ops = hub.non_core_ops(saved_model_dir)
    if ops:
        providers = sorted({hub.op_provider(op) or "an unknown op library" for op in ops})
        logging.warning(
            "The export needs ops beyond core TensorFlow: %s (from %s). Stock TF Serving "
            "lacks them: serve it with a build that has them (docs/serving.md).",
            ", ".join(ops),
            ", ".join(providers),
        )
    return ops


def _write_version(
    folder: str,
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    max_image_pixels: int,
    card: dict | None,
    version: int,
) -> None:
    """The whole version into `folder`: the SavedModel, labels, warm-up requests, card."""
    text = is_text_model(model)
    thresholds = card_thresholds(card, class_names)
    if text:
        build_text_archive(model, class_names, thresholds=thresholds).write_out(
            folder, verbose=False
        )
    else:
        endpoints = image_endpoints(
            model, class_names, image_size, max_image_pixels=max_image_pixels, thresholds=thresholds
        )
        write_endpoints(folder, model, endpoints)
    os.makedirs(os.path.join(folder, "assets"), exist_ok=True)
    atomic.write_text(os.path.join(folder, "assets", LABELS_FILE), "\n".join(class_names) + "\n")
    if text:
        write_warmup_requests(folder, b"a warm-up sentence", "text")
        signatures = {"serving_default": "text: tf.string [batch]"}
    else:
        write_warmup_requests(folder, warmup_image(image_size))
        signatures = {
            "serving_default": "image_bytes: tf.string [batch] (encoded JPEG/PNG/GIF/BMP/WebP)",
            "predict_images": "images: float32 [batch, h, w, 3], 0-255 pixels",
        }
    signatures["outputs"] = "probabilities, top_k_indices, top_k_names, top_k_scores" + (
        ", above_threshold, labels, label_count" if thresholds else ""
    )
    card = {
        **(card or model_card(class_names, image_size)),
        "version": version,
        "signatures": signatures,
        "non_core_ops": record_non_core_ops(folder),
    }
    if text:
        card.pop("max_image_pixels", None)
    else:  # the limit the graph enforces
        card["max_image_pixels"] = max_image_pixels
        card["max_animation_frames"] = data_lib.MAX_ANIMATION_FRAMES
    atomic.write_json(os.path.join(folder, MODEL_CARD), card)


def export_saved_model(
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    export_base: str,
    version: int | None = None,
    card: dict | None = None,
    max_image_pixels: int | None = None,
) -> str:
    """Writes `<export_base>/<version>/` atomically and returns its path.

    Args:
      model: takes float32 0-255 pixels [batch, image_size, image_size, 3], or tf.string
        [batch] (a text model: image_size is unused).
      class_names: in output order.
      image_size: the model's input size.
      export_base: TF Serving's base path.
      version: pin the version (0/None: the next free one).
      card: written as model_card.json, with `version` and `signatures` added.
      max_image_pixels: requests with a larger image are refused (None: the card's
        `max_image_pixels`, else data.MAX_IMAGE_PIXELS); recorded in the card.

    Raises:
      UserError: the pinned version exists (versions are never overwritten).
    """
    os.makedirs(export_base, exist_ok=True)
    remove_stale_temporaries(export_base)
    version = version or next_version(export_base)
    final = os.path.join(export_base, str(version))
    if os.path.exists(final):
        raise UserError(
            f"export version {final} exists and versions are never overwritten; pass another "
            f"--export_version, or none for the next free one ({next_version(export_base)})."
        )
    tmp = os.path.join(export_base, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if max_image_pixels is None:
        max_image_pixels = (card or {}).get("max_image_pixels") or MAX_IMAGE_PIXELS
    try:
        _write_version(tmp, model, class_names, image_size, max_image_pixels, card, version)
        faults.fault_point("export")
        os.rename(tmp, final)
    except Exception as e:
        if atomic.is_disk_full(e):
            raise atomic.disk_full_error("export", final) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("Exported SavedModel version %d to %s", version, final)
    return final
