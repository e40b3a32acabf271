"""Predict with an exported model: locally, or through TF Serving over REST or gRPC.

The export contract this module builds against (see docs/serving.md):

* a SavedModel at ``<export_dir>/<version>/`` (integer versions), tag ``serve``;
* signature ``serving_default`` taking ``image_bytes`` (``tf.string [None]``, encoded
  JPEG/PNG/GIF/BMP) -- or ``text`` (``tf.string [None]``) for text models -- and returning
  ``probabilities``, ``top_k_indices``, ``top_k_names`` and ``top_k_scores``.

Four backends share one interface (:class:`Predictor`): :class:`LocalPredictor` loads the
SavedModel in process, :class:`TFLitePredictor` runs a ``.tflite`` export with LiteRT, :class:`RestPredictor` talks to TF Serving's REST API with the
standard library only, :class:`GrpcPredictor` uses TF Serving's ``PredictionService``.

A decode failure of one file inside a batch fails the whole batch (in process and in TF
Serving alike: the decode runs in the graph). :func:`predict_files` therefore sends batches
and, when a batch is rejected as invalid input, retries its files one by one so that only
the bad file is reported and the others are still predicted.

TensorFlow is imported lazily: the REST path and :func:`write_models_config` do not need it.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tf_finetune import headers
from tf_finetune.config import Config
from tf_finetune.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "GrpcPredictor",
    "InputRejected",
    "LocalPredictor",
    "Prediction",
    "Predictor",
    "RestPredictor",
    "TFLitePredictor",
    "collect_inputs",
    "format_json",
    "format_table",
    "predict_files",
    "predict_main",
    "resolve_saved_model_dir",
    "tflite_interpreter",
    "tflite_predict",
    "write_models_config",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp"})
TEXT_EXTENSIONS = frozenset({".txt"})
SIGNATURE = "serving_default"
IMAGE_INPUT = "image_bytes"
TEXT_INPUT = "text"
_SUPPORTED_INPUTS = (IMAGE_INPUT, TEXT_INPUT)
_REQUIRED_OUTPUTS = ("top_k_names", "top_k_scores")
# Requests are split so that one request carries at most this many raw bytes (base64 adds
# a third on top for REST); a single larger file still goes alone.
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0

TopK = tuple[tuple[str, float], ...]
LABELS_OUTPUT = "labels"  # a multi-label export's names at or above their thresholds


class Ranked(tuple):
    """One input's top-k (label, score) pairs; `labels` is set for a multi-label model: the
    names at or above their thresholds, in label order (possibly none)."""

    labels: tuple[str, ...] | None = None

    @classmethod
    def of(cls, pairs, labels=None) -> Ranked:
        row = cls(pairs)
        row.labels = None if labels is None else tuple(labels)
        return row


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The result for one input file: its top-k (label, score) pairs, or an error."""

    file: str
    top_k: TopK = ()
    error: str | None = None
    labels: tuple[str, ...] | None = None  # multi-label: every label at or above its threshold

    def to_json(self) -> dict:
        out = {
            "file": self.file,
            "top_k": [{"label": label, "score": score} for label, score in self.top_k],
            "error": self.error,
        }
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out


class InputRejected(Exception):
    """The backend rejected a batch because of its inputs (e.g. an image that does not decode).

    Maps TF's ``InvalidArgumentError``, gRPC ``INVALID_ARGUMENT`` and REST HTTP 400. Raised by
    :meth:`Predictor.predict_batch`; :func:`predict_files` turns it into per-file errors.
    """


# --------------------------------------------------------------------------- inputs


def collect_inputs(
    paths: Iterable[str], extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and directories into the list of files to predict.

    Directories are walked recursively (sorted, symlinked directories not followed) and keep
    files whose extension, in any case, is in ``extensions``. A file named explicitly is
    kept whatever its extension (the model then says whether it decodes). Paths that do not
    exist or cannot be read are returned as ``(path, reason)`` errors instead of raising, so
    the rest can still be predicted. Duplicates are dropped, order is kept.
    """
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files: list[str] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.normpath(os.path.abspath(path))
        if key in seen:
            return
        seen.add(key)
        if not os.access(path, os.R_OK):
            errors.append((path, "cannot read file: permission denied"))
        else:
            files.append(path)

    def walk_error(err: OSError) -> None:
        errors.append((err.filename or "?", f"cannot read directory: {err.strerror}"))

    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path, onerror=walk_error):
                dirs.sort()
                for name in sorted(names):
                    if os.path.splitext(name)[1].lower() in exts:
                        add(os.path.join(root, name))
        elif os.path.isfile(path):
            add(path)
        elif os.path.lexists(path):
            errors.append((path, "not a regular file or directory (broken link?)"))
        else:
            errors.append((path, "no such file or directory"))
    return files, errors


# --------------------------------------------------------------------------- predictors


class Predictor(abc.ABC):
    """One interface over the three backends.

    Subclasses implement :attr:`input_key` and :meth:`predict_batch`. Use as a context
    manager (or call :meth:`close`) to release connections.
    """

    description: str = "model"

    @property
    @abc.abstractmethod
    def input_key(self) -> str:
        """Name of ``serving_default``'s input: ``"image_bytes"`` or ``"text"``."""

    @abc.abstractmethod
    def predict_batch(self, payloads: Sequence[bytes]) -> list[TopK]:
        """Top-k (label, score) pairs for each payload, best first, as many as exported.

        Raises :class:`InputRejected` when the inputs are invalid (the whole batch fails)
        and :class:`UserError` when the backend is unusable (unreachable, model not found).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_input_key(inputs: Iterable[str], where: str) -> str:
    names = sorted(inputs)
    if len(names) != 1 or names[0] not in _SUPPORTED_INPUTS:
        raise UserError(
            f"{where}: signature '{SIGNATURE}' takes inputs {names}, but this tool needs exactly "
            f"one string input named 'image_bytes' or 'text'; re-export the model with tf-finetune"
        )
    return names[0]


def _check_outputs(outputs: Iterable[str], where: str) -> None:
    missing = [name for name in _REQUIRED_OUTPUTS if name not in set(outputs)]
    if missing:
        raise UserError(
            f"{where}: signature '{SIGNATURE}' lacks outputs {missing}; "
            f"re-export the model with tf-finetune"
        )


def _text(name) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def _rows(names, scores, labels=None) -> list[TopK]:
    """Turn [n, k] names (bytes or str) and scores into per-row tuples; `labels` ([n, L] names
    padded with "", a multi-label export's `labels` output) rides along on each row."""
    out = []
    for i, (row_names, row_scores) in enumerate(zip(names, scores, strict=True)):
        pairs = tuple((_text(n), float(s)) for n, s in zip(row_names, row_scores, strict=True))
        row_labels = None if labels is None else [_text(n) for n in labels[i] if _text(n)]
        out.append(Ranked.of(pairs, row_labels))
    return out


_NODE_NOISE = re.compile(r"\s*\[\[\{\{node [^]]*\]\]|\s*\[Op:[^]]*\]")


def _short_error(message: str) -> str:
    """The useful line of a TF/TF Serving error (drops graph-node and stack-trace noise)."""
    lines = []
    for line in _NODE_NOISE.sub("", message).splitlines():
        line = line.strip()
        if not line or line.startswith(("Graph execution error", "Detected at node", "<stack")):
            continue
        lines.append(line)
    text = lines[0] if lines else message.strip()
    return text if len(text) <= 300 else text[:297] + "..."


def _run_export_base(run_dir: Path) -> Path | None:
    """The export base of a tf-finetune run dir (its flags.cfg's --export_dir, or export/)."""
    flags_cfg = run_dir / "flags.cfg"
    if not flags_cfg.is_file():
        return None
    for line in flags_cfg.read_text(encoding="utf-8").splitlines():
        if line.startswith("--export_dir=") and line.split("=", 1)[1]:
            return Path(line.split("=", 1)[1])
    return run_dir / "export"


def resolve_saved_model_dir(path: str | os.PathLike) -> Path:
    """A version dir (contains saved_model.pb) as is; a base dir -> its highest version;
    a run dir (holds flags.cfg) -> the highest version of its export base."""
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    if not p.is_dir():
        raise UserError(f"--model {p}: no such directory; pass the export dir of a trained model")
    base = _run_export_base(p)
    if base is not None:
        if not base.is_dir():
            raise UserError(
                f"--model {p} is a run without an export at {base}; run 'tf-finetune export "
                f"--model_dir={p}' first"
            )
        p = base
    versions = [
        int(child.name)
        for child in p.iterdir()
        if child.name.isdigit() and (child / "saved_model.pb").is_file()
    ]
    if not versions:
        raise UserError(
            f"--model {p}: no SavedModel found; pass an export dir holding "
            f"<version>/saved_model.pb, or a version dir itself"
        )
    return p / str(max(versions))


class LocalPredictor(Predictor):
    """Loads the SavedModel in this process (``tf.saved_model.load``) and calls it directly."""

    def __init__(self, model_path: str | os.PathLike):
        import tensorflow as tf

        from tf_finetune import hub

        self.path = resolve_saved_model_dir(model_path)
        self.description = str(self.path)
        # TF Text ops (a BERT preprocessor inside the export) must be registered before
        # loading; an op no installed library registers is one line naming it.
        try:
            missing = hub.missing_ops(str(self.path))
        except UserError:
            missing = []  # an unreadable saved_model.pb: the load below says so
        if missing:
            hub.check_ops(str(self.path), f"--model {self.path}")
        try:
            self._model = tf.saved_model.load(str(self.path), tags=["serve"])
        except (OSError, RuntimeError, ValueError, tf.errors.OpError) as err:
            raise UserError(
                f"--model {self.path}: cannot load the SavedModel ({_short_error(str(err))}); "
                f"re-export it"
            ) from err
        if SIGNATURE not in self._model.signatures:
            raise UserError(
                f"--model {self.path}: no '{SIGNATURE}' signature; re-export the model with tf-finetune"
            )
        self._fn = self._model.signatures[SIGNATURE]
        self.max_image_pixels = _card(self.path).get("max_image_pixels")
        self._input_key = _check_input_key(self._fn.structured_input_signature[1], str(self.path))
        _check_outputs(self._fn.structured_outputs, str(self.path))
        self._tf = tf

    @property
    def input_key(self) -> str:
        return self._input_key

    def predict_batch(self, payloads: Sequence[bytes]) -> list[TopK]:
        tf = self._tf
        try:
            out = self._fn(**{self._input_key: tf.constant(list(payloads), dtype=tf.string)})
        except tf.errors.InvalidArgumentError as err:
            raise InputRejected(_short_error(err.message)) from err
        labels = out[LABELS_OUTPUT].numpy() if LABELS_OUTPUT in out else None
        return _rows(out["top_k_names"].numpy(), out["top_k_scores"].numpy(), labels)


def _card(folder: Path) -> dict:
    """The model_card.json in `folder` ({} when missing or unreadable)."""
    try:
        card = json.loads((folder / "model_card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def tflite_interpreter(model_path: str | None = None, model_content: bytes | None = None):
    """A LiteRT interpreter (``ai_edge_litert``, the runtime phones and edge boxes run; TF
    2.21's ``tf.lite.Interpreter`` is deprecated), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=model_path, model_content=model_content)
    interpreter.allocate_tensors()
    return interpreter


def probability_output(interpreter) -> dict:
    """The output details of the probabilities (a multi-label file also has a bool
    `above_threshold` mask)."""
    import numpy as np

    outputs = interpreter.get_output_details()
    return next((o for o in outputs if o["dtype"] != np.bool_), outputs[0])


def tflite_predict(interpreter, pixels):
    """Probabilities for a batch of 0-255 pixels [n, s, s, 3] (any n) from a TFLite model.

    Quantized (uint8/int8) inputs and outputs are mapped with the tensors' scale and zero point.
    """
    import numpy as np

    inp = interpreter.get_input_details()[0]
    if tuple(inp["shape"]) != pixels.shape:
        interpreter.resize_tensor_input(inp["index"], list(pixels.shape))
        interpreter.allocate_tensors()
        inp = interpreter.get_input_details()[0]
    if np.issubdtype(inp["dtype"], np.integer):
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        pixels = np.clip(np.round(pixels / scale + zero), info.min, info.max)
    interpreter.set_tensor(inp["index"], pixels.astype(inp["dtype"]))
    interpreter.invoke()
    out = probability_output(interpreter)
    result = interpreter.get_tensor(out["index"]).astype(np.float32)
    if np.issubdtype(out["dtype"], np.integer):
        scale, zero = out["quantization"]
        result = (result - zero) * scale
    return result


class TFLitePredictor(Predictor):
    """A ``.tflite`` file from ``tf-finetune export --format=tflite``, run with LiteRT.

    Images are decoded and resized by the export's own function (``data.decode_and_resize``)
    after the same header check; class names come from ``labels.txt`` beside the file (the
    export writes it there), the pixel limit from ``model_card.json`` when present.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        self.description = str(self.path)
        if not self.path.is_file():
            raise UserError(
                f"--model {self.path}: no such file; pass a .tflite file from tf-finetune export"
            )
        labels = self.path.parent / "labels.txt"
        if not labels.is_file():
            raise UserError(
                f"--model {self.path}: no labels.txt beside it (class names, one per line); copy "
                f"it from the folder tf-finetune export wrote the .tflite file to"
            )
        self.class_names = labels.read_text(encoding="utf-8").splitlines()
        card = _card(self.path.parent)
        self.max_image_pixels = card.get("max_image_pixels")
        by_name = card.get("thresholds")  # a multi-label model's, chosen on val
        self.thresholds = [by_name[n] for n in self.class_names] if by_name else None
        try:
            self._interpreter = tflite_interpreter(model_path=str(self.path))
        except (RuntimeError, ValueError) as err:
            raise UserError(
                f"--model {self.path}: not a TFLite model ({_short_error(str(err))})"
            ) from None
        shape = self._interpreter.get_input_details()[0]["shape"]
        outputs = probability_output(self._interpreter)["shape"]
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise UserError(
                f"--model {self.path}: takes {list(shape)}, not [batch, size, size, 3] pixels; "
                f"re-export it with tf-finetune"
            )
        if outputs[-1] != len(self.class_names):
            raise UserError(
                f"--model {self.path}: {outputs[-1]} outputs but {len(self.class_names)} class "
                f"names in {labels}; use the labels.txt exported with it"
            )
        self.image_size = int(shape[1])
        self._decode = None

    @property
    def input_key(self) -> str:
        return IMAGE_INPUT

    def predict_batch(self, payloads: Sequence[bytes]) -> list[TopK]:
        import numpy as np
        import tensorflow as tf

        from tf_finetune import data

        if self._decode is None:  # the export's decoding, traced once
            self._decode = tf.function(
                lambda b: data.decode_images(
                    b, self.image_size, self.max_image_pixels or headers.MAX_IMAGE_PIXELS
                ),
                input_signature=[tf.TensorSpec([None], tf.string)],
            )
        try:
            pixels = self._decode(tf.constant(list(payloads), dtype=tf.string)).numpy()
        except tf.errors.InvalidArgumentError as err:
            raise InputRejected(_short_error(err.message)) from err
        probabilities = tflite_predict(self._interpreter, pixels.astype(np.float32))
        order = np.argsort(-probabilities, axis=1, kind="stable")
        return [
            Ranked.of(
                ((self.class_names[i], float(row[i])) for i in ranks),
                None
                if self.thresholds is None
                else [n for n, p, t in zip(self.class_names, row, self.thresholds) if p >= t],
            )
            for row, ranks in zip(probabilities, order, strict=True)
        ]


def _parse_error_body(body: bytes) -> str:
    """The message of TF Serving's ``{"error": "..."}`` body (tolerates its C escaping)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        # TF Serving C-escapes the message, which is not always valid JSON (\' or \x..).
        match = re.search(r'"error"\s*:\s*"(.*)"\s*}\s*$', text, re.S)
        if match:
            try:
                return match.group(1).encode("latin-1", "backslashreplace").decode("unicode_escape")
            except UnicodeDecodeError:
                return match.group(1)
    return text.strip()[:300] or "(empty response)"


class RestPredictor(Predictor):
    """TF Serving's REST API, standard library only.

    ``POST {server}/v1/models/{name}[/versions/{v}|/labels/{label}]:predict`` with
    ``{"signature_name": "serving_default", "instances": [{"image_bytes": {"b64": ...}}]}``.
    The input name is read once from ``GET .../metadata``.
    """

    def __init__(
        self,
        server_url: str,
        model_name: str,
        version: int | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        if not model_name:
            raise UserError("--model_name is empty; pass the name TF Serving serves the model as")
        url = server_url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(
                f"--server {server_url!r} is not an http(s) URL; pass e.g. http://localhost:8501"
            )
        self.server = url
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.model_url = f"{url}/v1/models/{urllib.parse.quote(model_name, safe='')}"
        if version is not None:
            v = str(version)
            self.model_url += (
                f"/versions/{v}" if v.isdigit() else f"/labels/{urllib.parse.quote(v)}"
            )
        self.description = f"model '{model_name}' at {url}"
        self._input_key: str | None = None

    def _request(self, url: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(
            url,
            data=data,
            method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            message = _short_error(_parse_error_body(err.read()))
            if err.code == 400:
                raise InputRejected(message) from None
            if err.code == 404:
                raise UserError(
                    f"TF Serving at {self.server} has no {self._what()}: {message}; "
                    f"check --model_name and the version (GET {self.server}/v1/models/{self.model_name})"
                ) from None
            raise UserError(
                f"TF Serving at {self.server} answered HTTP {err.code}: {message}"
            ) from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ConnectionRefusedError):
                raise UserError(
                    f"connection refused by {self.server}; is TF Serving running at {self.server}? "
                    f"(start it with scripts/serve.sh; REST is port 8501)"
                ) from None
            if isinstance(reason, TimeoutError):
                raise self._timeout_error() from None
            raise UserError(
                f"cannot reach {self.server} ({reason}); is TF Serving running at {self.server}?"
            ) from None
        except TimeoutError:
            raise self._timeout_error() from None
        except ConnectionError as err:
            raise UserError(
                f"connection to {self.server} failed ({err}); is TF Serving running at {self.server}?"
            ) from None
        try:
            return json.loads(body)
        except ValueError:
            raise UserError(
                f"{self.server} did not answer JSON; is it TF Serving's REST port (8501)?"
            ) from None

    def _what(self) -> str:
        if self.version is None:
            return f"model '{self.model_name}'"
        return f"model '{self.model_name}' version {self.version}"

    def _timeout_error(self) -> UserError:
        return UserError(
            f"TF Serving at {self.server} did not answer within {self.timeout:g}s; "
            f"lower --batch_size or check the server"
        )

    @property
    def input_key(self) -> str:
        if self._input_key is None:
            try:
                meta = self._request(self.model_url + "/metadata")
            except InputRejected as err:
                raise UserError(
                    f"TF Serving at {self.server} rejected the metadata request: {err}"
                ) from None
            sigs = meta.get("metadata", {}).get("signature_def", {}).get("signature_def", {})
            if SIGNATURE not in sigs:
                raise UserError(
                    f"{self.description} has no '{SIGNATURE}' signature; re-export it with tf-finetune"
                )
            where = self.description
            self._input_key = _check_input_key(sigs[SIGNATURE].get("inputs", {}), where)
            _check_outputs(sigs[SIGNATURE].get("outputs", {}), where)
        return self._input_key

    def predict_batch(self, payloads: Sequence[bytes]) -> list[TopK]:
        key = self.input_key
        body = {
            "signature_name": SIGNATURE,
            "instances": [{key: {"b64": base64.b64encode(p).decode("ascii")}} for p in payloads],
        }
        answer = self._request(self.model_url + ":predict", body)
        rows = answer.get("predictions")
        if not isinstance(rows, list) or len(rows) != len(payloads):
            raise UserError(f"{self.description} answered an unexpected predict response")
        try:
            names = [[_b64_or_str(n) for n in row["top_k_names"]] for row in rows]
            scores = [row["top_k_scores"] for row in rows]
            labels = None
            if all(LABELS_OUTPUT in row for row in rows):
                labels = [[_b64_or_str(n) for n in row[LABELS_OUTPUT]] for row in rows]
        except (KeyError, TypeError):
            raise UserError(
                f"{self.description} did not return top_k_names/top_k_scores; "
                f"re-export the model with tf-finetune"
            ) from None
        return _rows(names, scores, labels)


def _b64_or_str(value) -> str:
    # TF Serving returns DT_STRING outputs as JSON strings, or {"b64": ...} for names ending
    # in _bytes; accept both.
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"]).decode("utf-8", "replace")
    return str(value)


class GrpcPredictor(Predictor):
    """TF Serving's gRPC ``PredictionService.Predict`` (port 8500 by default)."""

    def __init__(
        self,
        target: str,
        model_name: str,
        version: int | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        if not model_name:
            raise UserError("--model_name is empty; pass the name TF Serving serves the model as")
        target = target.strip()
        if target.startswith(("http://", "https://")):
            raise UserError(
                f"--grpc {target!r} takes host:port without a scheme, e.g. localhost:8500"
            )
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.description = f"model '{model_name}' at {target} (gRPC)"
        self._grpc = grpc
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._input_key: str | None = None
        self._multi_label = False  # the signature has a `labels` output (read with it)

    def close(self) -> None:
        self._channel.close()

    def _model_spec(self, spec) -> None:
        spec.name = self.model_name
        spec.signature_name = SIGNATURE
        if self.version is not None:
            v = str(self.version)
            if v.isdigit():
                spec.version.value = int(v)
            else:
                spec.version_label = v

    def _call(self, method, request):
        grpc = self._grpc
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            code, details = err.code(), _short_error(err.details() or "")
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InputRejected(details) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise UserError(
                    f"cannot connect to {self.target} ({details}); is TF Serving running at "
                    f"{self.target}? (start it with scripts/serve.sh; gRPC is port 8500)"
                ) from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise UserError(
                    f"TF Serving at {self.target} has no model '{self.model_name}'"
                    f"{'' if self.version is None else f' version {self.version}'}: {details}; "
                    f"check --model_name and the version"
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise UserError(
                    f"TF Serving at {self.target} did not answer within {self.timeout:g}s; "
                    f"lower --batch_size or check the server"
                ) from None
            raise UserError(f"TF Serving at {self.target} failed: {code.name}: {details}") from None

    @property
    def input_key(self) -> str:
        if self._input_key is None:
            from tensorflow_serving.apis import get_model_metadata_pb2

            request = get_model_metadata_pb2.GetModelMetadataRequest()
            self._model_spec(request.model_spec)
            request.model_spec.ClearField("signature_name")
            request.metadata_field.append("signature_def")
            try:
                response = self._call(self._stub.GetModelMetadata, request)
            except InputRejected as err:
                raise UserError(
                    f"TF Serving at {self.target} rejected the metadata request: {err}"
                ) from None
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(sig_map)
            if SIGNATURE not in sig_map.signature_def:
                raise UserError(
                    f"{self.description} has no '{SIGNATURE}' signature; re-export it with tf-finetune"
                )
            sig = sig_map.signature_def[SIGNATURE]
            self._input_key = _check_input_key(sig.inputs.keys(), self.description)
            _check_outputs(sig.outputs.keys(), self.description)
            self._multi_label = LABELS_OUTPUT in sig.outputs
        return self._input_key

    def predict_batch(self, payloads: Sequence[bytes]) -> list[TopK]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        key = self.input_key
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec)
        request.inputs[key].CopyFrom(
            tf.make_tensor_proto(list(payloads), dtype=tf.string, shape=[len(payloads)])
        )
        multi_label = self._multi_label
        request.output_filter.extend(_REQUIRED_OUTPUTS + ((LABELS_OUTPUT,) if multi_label else ()))
        response = self._call(self._stub.Predict, request)
        try:
            names = tf.make_ndarray(response.outputs["top_k_names"])
            scores = tf.make_ndarray(response.outputs["top_k_scores"])
            labels = tf.make_ndarray(response.outputs[LABELS_OUTPUT]) if multi_label else None
        except (KeyError, ValueError, TypeError):
            raise UserError(
                f"{self.description} did not return top_k_names/top_k_scores; "
                f"re-export the model with tf-finetune"
            ) from None
        return _rows(names, scores, labels)


# --------------------------------------------------------------------------- batching


def _batches(items: list[tuple[str, bytes]], batch_size: int, max_bytes: int):
    batch: list[tuple[str, bytes]] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= batch_size or size + len(item[1]) > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
    if batch:
        yield batch


def predict_files(
    predictor: Predictor,
    files: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    max_image_pixels: int | None = None,
) -> list[Prediction]:
    """Predict ``files`` in batches; one :class:`Prediction` per file, in order.

    Files that cannot be read, images whose header announces more pixels than the model's
    limit (never sent), and files the model rejects get ``error`` set; the others are
    predicted. The limit is the model card's for a local model (``predictor.max_image_pixels``),
    else ``max_image_pixels``, else the export's default ``headers.MAX_IMAGE_PIXELS``; a
    server's export with another limit still refuses by its own, and the retry below names the
    file. When a batch is rejected (one undecodable image fails the whole batch), its files
    are retried one by one so only the bad ones are reported.
    """
    images = predictor.input_key == IMAGE_INPUT
    limit = (
        getattr(predictor, "max_image_pixels", None) or max_image_pixels or headers.MAX_IMAGE_PIXELS
    )
    results, readable, index = _read_inputs(files, limit if images else None)
    position = 0
    for batch in _batches(readable, batch_size, max_batch_bytes):
        for (path, _), out in zip(batch, _predict_or_retry(predictor, batch), strict=True):
            if isinstance(out, InputRejected):
                results[index[position]] = Prediction(path, error=str(out))
            else:
                labels = getattr(out, "labels", None)
                results[index[position]] = Prediction(path, tuple(out[:top_k]), labels=labels)
            position += 1
    return [results[i] for i in range(len(files))]


def _read_inputs(files: Sequence[str], limit: int | None):
    """(results so far: unreadable or too-large files by position, the readable (path, bytes),
    position in readable -> position in files). `limit`: the image pixel limit, None for text."""
    results: dict[int, Prediction] = {}
    readable: list[tuple[str, bytes]] = []
    index: dict[int, int] = {}
    for i, path in enumerate(files):
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            results[i] = Prediction(path, error=f"cannot read file: {err.strerror or err}")
            continue
        # A decompression bomb is named here, from its header, and never sent; the export
        # refuses it too (it would fail its whole batch).
        too_big = headers.problem(headers.parse(data), limit) if limit else None
        if too_big:
            results[i] = Prediction(path, error=too_big)
            continue
        index[len(readable)] = i
        readable.append((path, data))
    return results, readable, index


def _predict_or_retry(predictor: Predictor, batch: list[tuple[str, bytes]]) -> list:
    """The batch's outputs; when the model rejects the batch, each file alone, so only the bad
    ones fail (an InputRejected in their place)."""
    try:
        return predictor.predict_batch([data for _, data in batch])
    except InputRejected as err:
        if len(batch) == 1:
            return [err]
    outputs = []
    for _, data in batch:
        try:
            outputs.append(predictor.predict_batch([data])[0])
        except InputRejected as single:
            outputs.append(single)
    return outputs


# --------------------------------------------------------------------------- output


def format_json(results: Sequence[Prediction]) -> str:
    """``[{"file": ..., "top_k": [{"label": ..., "score": ...}], "error": null}, ...]``."""
    return json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False)


def format_table(results: Sequence[Prediction]) -> str:
    """A human table: one row per (file, rank); failed files show their error."""
    rows: list[tuple[str, str, str, str]] = [("file", "rank", "label", "score")]
    for r in results:
        if r.error is not None:
            rows.append((r.file, "-", "ERROR", r.error))
            continue
        if r.labels is not None:  # multi-label: every label at or above its threshold first
            rows.append((r.file, "tags", ", ".join(r.labels) or "(none)", ""))
        for rank, (label, score) in enumerate(r.top_k, start=1):
            first = rank == 1 and r.labels is None
            rows.append((r.file if first else "", str(rank), label, f"{score:.4f}"))
        if not r.top_k:
            rows.append((r.file, "-", "(no classes)", ""))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{max(widths[1], 4)}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip()
        for row in rows
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI entry


def make_predictor(config: Config) -> Predictor:
    """The backend --model, --server or --grpc names (exactly one of them)."""
    version = config.model_version or None
    chosen = [
        flag
        for flag, value in (
            ("--model", config.model),
            ("--server", config.server),
            ("--grpc", config.grpc),
        )
        if value
    ]
    if len(chosen) != 1:
        got = "none" if not chosen else " and ".join(chosen)
        raise UserError(
            f"pass exactly one of --model (local export dir), --server (TF Serving REST URL) "
            f"or --grpc (TF Serving host:port); got {got}"
        )
    if config.model:
        if version is not None:
            raise UserError(
                "--model_version works with --server/--grpc; for --model pass the version dir"
            )
        if config.model.lower().endswith(".tflite"):
            return TFLitePredictor(config.model)
        return LocalPredictor(config.model)
    if config.server:
        return RestPredictor(config.server, config.model_name, version, DEFAULT_TIMEOUT)
    return GrpcPredictor(config.grpc, config.model_name, version, DEFAULT_TIMEOUT)


def predict_main(config: Config, inputs: Sequence[str], out=None, err=None) -> int:
    """Run the ``predict`` command on `inputs` (files and folders). Returns 0 if every input
    was predicted, 1 if some failed.

    The options are the predict flags of `config` (validated with the rest of it) and
    --batch_size (inputs per request). Results are printed to ``out`` (stdout) as a table, or
    as JSON with --json; failed
    inputs are part of the output (``error`` set) and counted on ``err`` (stderr). Bad
    arguments, an unusable model or an unreachable server raise :class:`UserError`.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if not inputs:
        raise UserError("no inputs given; pass image files or directories to predict")
    with make_predictor(config) as predictor:
        text_model = predictor.input_key == TEXT_INPUT
        files, errors = collect_inputs(inputs, TEXT_EXTENSIONS if text_model else IMAGE_EXTENSIONS)
        if not files and not errors:
            kinds = (
                "text (.txt)"
                if text_model
                else "image (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
            )
            raise UserError(
                f"no {kinds} files found in {', '.join(inputs)}; pass files or directories holding them"
            )
        results = predict_files(
            predictor,
            files,
            top_k=config.top_k,
            batch_size=config.batch_size,
            max_image_pixels=config.max_image_pixels,
        )
    results += [Prediction(path, error=reason) for path, reason in errors]

    print(format_json(results) if config.json else format_table(results), file=out)
    shown = [len(r.top_k) for r in results if r.error is None]
    tags = any(r.labels is not None for r in results)  # multi-label: the tags are the answer
    if shown and max(shown) < config.top_k and not tags:
        print(
            f"note: the model returns its top {max(shown)} classes per image; showing "
            f"{max(shown)} of the --top_k={config.top_k} asked for",
            file=err,
        )
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} inputs failed (see 'error' above)", file=err)
        return 1
    return 0


# --------------------------------------------------------------------------- server config


def write_models_config(
    path: str | os.PathLike,
    models: Mapping[str, str],
    version_labels: Mapping[str, Mapping[str, int]] | None = None,
) -> Path:
    """Write TF Serving's ``--model_config_file`` (text proto ``ModelServerConfig``).

    ``models`` maps a model name to its base path *as the server sees it* (e.g.
    ``/models/flowers`` inside the container). ``version_labels`` maps a model name to
    ``{label: version}``; such a model is served with a ``specific`` version policy holding
    exactly the labelled versions (TF Serving only lets labels point at loaded versions),
    the others with ``latest { num_versions: 1 }``.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if not models:
        raise UserError("no models to write into the TF Serving config; pass at least one name")
    version_labels = dict(version_labels or {})
    unknown = sorted(set(version_labels) - set(models))
    if unknown:
        raise UserError(f"version labels given for unknown models {unknown}; add them to models")

    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in models.items():
        if not name or not re.fullmatch(r"[^/:\s]+", name):
            raise UserError(
                f"model name {name!r} is not usable in URLs; use letters, digits, _ or -"
            )
        base = str(base_path)
        if not (base.startswith("/") or re.match(r"^[a-z][a-z0-9+.-]*://", base)):
            raise UserError(
                f"base path {base!r} of model {name!r} must be absolute (as the server sees it, "
                f"e.g. /models/{name}) or a URL like gs://..."
            )
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = base
        entry.model_platform = "tensorflow"
        labels = dict(version_labels.get(name) or {})
        for label, version in labels.items():
            if not label or label.isdigit() or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
                raise UserError(f"version label {label!r} of {name!r} must be a non-numeric word")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise UserError(
                    f"version label {label!r} of {name!r} points at {version!r}; use a positive integer"
                )
            entry.version_labels[label] = version
        if labels:
            entry.model_version_policy.specific.versions.extend(sorted(set(labels.values())))
        else:
            entry.model_version_policy.latest.num_versions = 1

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text_format.MessageToString(config), encoding="utf-8")
    return out
