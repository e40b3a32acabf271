"""TEST DOUBLE -- a fake TF Serving, for tests only. Not a model server; never ship or deploy it.

The real TF Serving binary cannot be installed on the test machines, so this module imitates
the parts of its wire protocol that ``tf_finetune.serving`` uses, answering from a real
SavedModel loaded with ``tf.saved_model.load``:

* REST (``FakeRestServer``, ``http.server.ThreadingHTTPServer``), as TF Serving's RESTful API
  page describes it:
  ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict`` in row format (``instances``:
  objects of named inputs, or -- for a signature with one input -- bare values such as
  ``["a great film"]`` or ``[{"b64": ...}]``; ``{"predictions": [...]}`` out) and in columnar
  format (``inputs``: one tensor, or an object of named tensors; ``{"outputs": {...}}`` out,
  or the bare tensor when the signature has one output). ``{"b64": ...}`` decodes to bytes.
  ``GET /v1/models/<name>[/versions/<v>|/labels/<l>]`` (model status: the JSON of
  ``GetModelStatusResponse``, every loaded version ``AVAILABLE``) and ``.../metadata``. Errors
  are ``{"error": "..."}`` with the HTTP codes TF Serving maps its status codes to
  (INVALID_ARGUMENT 400, NOT_FOUND 404, ...).
* gRPC (``FakeGrpcServer``, ``grpc.server``): ``PredictionService.Predict`` and
  ``GetModelMetadata`` on the real ``tensorflow_serving.apis`` protos.

Deliberate limits: only the ``predict`` verb, no ``classify``/``regress``, no batching, no
model reloading, no output ``_bytes`` base64 encoding (no tf_finetune output is binary). Both servers bind 127.0.0.1 on an ephemeral port (port 0),
run daemon threads, and are stopped by ``stop()`` / the context manager -- the test
fixtures do that.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

MAX_BODY_BYTES = 64 * 1024 * 1024
REQUEST_TIMEOUT_S = 30


class ServingError(Exception):
    """A TF Serving status: a gRPC status code and a message."""

    HTTP = {
        grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
        grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
        grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
        grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    }

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return int(self.HTTP.get(self.code, HTTPStatus.INTERNAL_SERVER_ERROR))


class FakeModelStore:
    """The servables: every ``<base>/<int>/saved_model.pb`` of one model name, loaded once."""

    def __init__(
        self, name: str, base_path: str | Path, version_labels: dict[str, int] | None = None
    ):
        self.name = name
        self.versions = {}
        self.signature_defs = {}
        for child in sorted(Path(base_path).iterdir()):
            if child.name.isdigit() and (child / "saved_model.pb").is_file():
                version = int(child.name)
                self.versions[version] = tf.saved_model.load(str(child))
                sm = saved_model_pb2.SavedModel()
                sm.ParseFromString((child / "saved_model.pb").read_bytes())
                self.signature_defs[version] = sm.meta_graphs[0].signature_def
        if not self.versions:
            raise ValueError(f"no versions under {base_path}")
        self.version_labels = dict(version_labels or {})
        self.lock = threading.Lock()
        self.predict_calls = 0  # number of Predict requests that reached a model
        self.batch_sizes: list[int] = []

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> int:
        if name != self.name:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
            )
        if label:
            if label not in self.version_labels:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {label}",
                )
            version = self.version_labels[label]
        if version is None:
            return max(self.versions)
        if version not in self.versions:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({name}, {version})",
            )
        return version

    def predict(
        self, version: int, signature: str, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        model = self.versions[version]
        signature = signature or "serving_default"
        if signature not in model.signatures:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Serving signature name: "{signature}" not found in signature def',
            )
        fn = model.signatures[signature]
        expected = fn.structured_input_signature[1]
        if set(inputs) != set(expected):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Request inputs do not match required inputs for model `{self.name}`. "
                f"Send extra: {sorted(set(inputs) - set(expected))}. "
                f"Missing but required: {sorted(set(expected) - set(inputs))}.",
            )
        with self.lock:
            self.predict_calls += 1
            self.batch_sizes.append(len(next(iter(inputs.values()))))
        try:
            tensors = {k: tf.constant(v, dtype=expected[k].dtype) for k, v in inputs.items()}
            out = fn(**tensors)
        except tf.errors.InvalidArgumentError as err:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, err.message) from None
        except (TypeError, ValueError) as err:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except tf.errors.OpError as err:
            raise ServingError(grpc.StatusCode.INTERNAL, err.message) from None
        return {k: v.numpy() for k, v in out.items()}


# --------------------------------------------------------------------------- REST

_PREDICT = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:predict")
_METADATA = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?/metadata")
_STATUS = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?")


def model_status(store: FakeModelStore, name: str, version: int | None, label: str | None) -> dict:
    """TF Serving's status JSON: ``GetModelStatusResponse`` printed with default fields, e.g.
    ``{"model_version_status": [{"version": "1", "state": "AVAILABLE", "status":
    {"error_code": "OK", "error_message": ""}}]}`` (int64 versions are JSON strings)."""
    if version is None and label is None:
        store.resolve(name)  # NOT_FOUND for an unknown name
        versions = sorted(store.versions, reverse=True)
    else:
        versions = [store.resolve(name, version, label)]
    response = get_model_status_pb2.GetModelStatusResponse()
    for v in versions:
        entry = response.model_version_status.add()
        entry.version = v
        entry.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        entry.status.SetInParent()  # error_code OK, error_message ""
    return json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _json_value(value):
    """numpy output -> JSON like TF Serving (bytes as text; base64 only for *_bytes names)."""
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if hasattr(value, "item") else value


def _decode_instance_value(value):
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "JSON Value: object without b64 key"
            )
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "Unable to base64 decode"
            ) from None
    if isinstance(value, list):
        return [_decode_instance_value(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _to_array(values) -> np.ndarray:
    """Decoded JSON values -> a numpy array (object dtype for strings/bytes)."""
    arr = np.array(values, dtype=object)
    if not all(isinstance(x, bytes) for x in arr.ravel()):
        arr = np.array(arr.tolist())
    return arr


class _RestHandler(BaseHTTPRequestHandler):
    server_version = "FakeTFServing/0"
    store: FakeModelStore  # set on the subclass made per server
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: ServingError) -> None:
        self._reply(err.http_status, {"error": err.message})

    def do_GET(self):
        match = _METADATA.fullmatch(self.path)
        try:
            status = _STATUS.fullmatch(self.path)
            if status and not match:
                name, version, label = status.groups()
                self._reply(
                    200, model_status(self.store, name, int(version) if version else None, label)
                )
                return
            if not match:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: GET {self.path}"
                )
            name, version, label = match.groups()
            v = self.store.resolve(name, int(version) if version else None, label)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig in self.store.signature_defs[v].items():
                sig_map.signature_def[key].CopyFrom(sig)
            self._reply(
                200,
                {
                    "model_spec": {"name": name, "signature_name": "", "version": str(v)},
                    "metadata": {
                        "signature_def": json_format.MessageToDict(
                            sig_map, preserving_proto_field_name=True
                        )
                    },
                },
            )
        except ServingError as err:
            self._error(err)

    def _rows(self, v: int, signature: str, names: list[str], instances) -> dict:
        """Row format: ``instances`` -> ``{"predictions": [one object per row]}``."""
        if not isinstance(instances, list) or not instances:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "'instances' must be a non-empty list"
            )
        bare = not all(isinstance(i, dict) and set(i) != {"b64"} for i in instances)
        if bare:
            # TF Serving's shorthand for a signature with one input: each instance is that
            # input's value (["a great film"], or [{"b64": ...}], the README's curl forms).
            if len(names) != 1:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "instances must be objects of named inputs: the signature has "
                    f"{len(names)} inputs {sorted(names)}",
                )
            if any(isinstance(i, dict) and set(i) != {"b64"} for i in instances):
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Failed to process element: 0 of 'instances' list. JSON Value: mixes "
                    "named and unnamed instances",
                )
            instances = [{names[0]: i} for i in instances]
        keys = set(instances[0])
        if any(set(i) != keys for i in instances):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Failed to process element: 1 key of 'instances' list. Error: "
                "all objects in 'instances' list must have the same keys",
            )
        inputs = {k: _to_array([_decode_instance_value(i[k]) for i in instances]) for k in keys}
        out = self.store.predict(v, signature, inputs)
        n = len(instances)
        if len(out) == 1:  # one output: its values, without the name
            (values,) = out.values()
            return {"predictions": [_json_value(values[i]) for i in range(n)]}
        return {
            "predictions": [{k: _json_value(val[i]) for k, val in out.items()} for i in range(n)]
        }

    def _columnar(self, v: int, signature: str, names: list[str], inputs) -> dict:
        """Columnar format: ``inputs`` (a tensor, or named tensors) -> ``{"outputs": ...}``."""
        if not (isinstance(inputs, dict) and set(inputs) != {"b64"}):
            if len(names) != 1:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"'inputs' must name the signature's {len(names)} inputs {sorted(names)}",
                )
            inputs = {names[0]: inputs}
        arrays = {k: _to_array(_decode_instance_value(val)) for k, val in inputs.items()}
        out = self.store.predict(v, signature, arrays)
        if len(out) == 1:
            (values,) = out.values()
            return {"outputs": _json_value(values)}
        return {"outputs": {k: _json_value(val) for k, val in out.items()}}

    def do_POST(self):
        try:
            match = _PREDICT.fullmatch(self.path)
            if not match:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: POST {self.path}"
                )
            name, version, label = match.groups()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "request body too large")
            raw = self.rfile.read(length)
            v = self.store.resolve(name, int(version) if version else None, label)
            try:
                body = json.loads(raw)
            except ValueError as err:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"JSON Parse error: {err}"
                ) from None
            if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Missing 'inputs' or 'instances' key"
                    if isinstance(body, dict) and "instances" not in body
                    else "JSON Value: only one of 'inputs' or 'instances' may be present",
                )
            signature = body.get("signature_name") or "serving_default"
            model = self.store.versions[v]
            if signature not in model.signatures:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f'Serving signature name: "{signature}" not found in signature def',
                )
            names = list(model.signatures[signature].structured_input_signature[1])
            if "inputs" in body:
                self._reply(200, self._columnar(v, signature, names, body["inputs"]))
            else:
                self._reply(200, self._rows(v, signature, names, body["instances"]))
        except ServingError as err:
            self._error(err)


class FakeRestServer:
    """Fake TF Serving REST API on ``http://127.0.0.1:<port>``. TEST DOUBLE."""

    def __init__(self, store: FakeModelStore):
        handler = type("Handler", (_RestHandler,), {"store": store})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> FakeRestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------- gRPC


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, store: FakeModelStore):
        self.store = store

    def _resolve(self, spec) -> int:
        version = spec.version.value if spec.HasField("version") else None
        return self.store.resolve(spec.name, version, spec.version_label or None)

    def Predict(self, request, context):
        try:
            v = self._resolve(request.model_spec)
            inputs = {k: tf.make_ndarray(t) for k, t in request.inputs.items()}
            out = self.store.predict(v, request.model_spec.signature_name, inputs)
        except ServingError as err:
            context.abort(err.code, err.message)
        wanted = list(request.output_filter) or list(out)
        unknown = [k for k in wanted if k not in out]
        if unknown:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {unknown[0]}",
            )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = v
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(out[key]))
        return response

    def GetModelMetadata(self, request, context):
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is required"
            )
        try:
            v = self._resolve(request.model_spec)
        except ServingError as err:
            context.abort(err.code, err.message)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in self.store.signature_defs[v].items():
            sig_map.signature_def[key].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = v
        response.metadata["signature_def"].Pack(sig_map)
        return response


class FakeGrpcServer:
    """Fake TF Serving gRPC ``PredictionService`` on ``127.0.0.1:<port>``. TEST DOUBLE."""

    def __init__(self, store: FakeModelStore):
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            options=[("grpc.max_receive_message_length", MAX_BODY_BYTES)],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(store), self.server
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise RuntimeError("could not bind a loopback port for the fake gRPC server")
        self.target = f"127.0.0.1:{port}"

    def start(self) -> FakeGrpcServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=1).wait(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
