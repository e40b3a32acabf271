"""TF Hub modules (Reusable SavedModel API) as Keras 3 layers, trainable or frozen.

``hub.KerasLayer`` is a tf_keras layer and cannot sit in a Keras 3 model, and
``keras.layers.TFSMLayer`` names its weights ``w:0``, which breaks Adam/AdamW
(``'w:0_momentum' is not a valid scope name``). :class:`HubLayer` wraps the
module's own ``tf.Variable`` objects in Keras variables (no copy: the module's
functions keep reading and updating the very same variables) under clean names,
so every Keras optimizer, ``save_weights``/``load_weights``, ``BackupAndRestore``,
``tf.distribute`` and ``keras.export.ExportArchive`` work with it.

Conventions of TF Hub modules the caller must respect:

* image modules take float32 ``[batch, height, width, 3]`` with values in
  ``[0, 1]`` (not 0-255, not ``[-1, 1]``); the module does its own normalisation.
* text modules take a ``tf.string`` tensor of shape ``[batch]``.
* feature-vector modules return ``[batch, features]``; classification modules
  return ``[batch, classes]`` logits. A new head is put *on top* of whatever the
  module returns: for a classification module that means on top of its logits,
  nothing inside the module is replaced or removed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import urllib.error
import urllib.parse

import keras
import tensorflow as tf
from absl import logging

from tf_finetune.errors import UserError

__all__ = [
    "ALL_OUTPUTS",
    "HubLayer",
    "hub_cache_dir",
    "is_hub_handle",
    "is_kaggle_handle",
    "kaggle_cache_dir",
    "kaggle_url_to_handle",
    "load_module",
    "load_op_libraries",
    "missing_ops",
    "non_core_ops",
    "normalize_kaggle_handle",
    "op_provider",
    "resolve_kaggle",
    "saved_model_ops",
    "resolve_handle",
    "module_image_size",
    "module_input_spec",
    "module_kind",
    "module_output_rank",
    "module_output_shape",
    "check_ops",
    "tfhub_to_kaggle_handle",
    "unregistered_op",
]

# HubLayer(output_key=ALL_OUTPUTS) returns a module's whole output dict.
ALL_OUTPUTS = "*"

_TFHUB_HOSTS = ("tfhub.dev", "www.tfhub.dev", "hub.tensorflow.google.cn")
_KAGGLE_HOSTS = ("www.kaggle.com", "kaggle.com")
_KAGGLE_FRAMEWORK = "tensorFlow2"
# Kaggle's framework slugs, by lower-case spelling. Kaggle paths (and so kagglehub's cache
# folders) are case-sensitive, while users and URLs spell frameworks either way
# (`TensorFlow2` in short URLs, `tensorFlow2` in handles): normalising maps both to one
# cache folder. Unknown frameworks are kept as given.
_KAGGLE_FRAMEWORKS = {
    name.lower(): name
    for name in (
        "tensorFlow2",
        "tensorFlow1",
        "tfLite",
        "tfJs",
        "keras",
        "jax",
        "flax",
        "pyTorch",
        "transformers",
        "onnx",
        "coral",
        "scikitLearn",
        "gemmaCpp",
        "ggml",
        "gguf",
        "maxText",
        "pax",
        "tensorRtLlm",
        "mxnet",
        "other",
    )
}
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


# --------------------------------------------------------------------------- handles


def _url_parts(name: str) -> tuple[str, list[str]] | None:
    """(lower-case host, non-empty path segments) of an http(s) URL, else None."""
    parsed = urllib.parse.urlparse(name)
    if parsed.scheme not in ("http", "https"):
        return None
    return parsed.netloc.lower(), [s for s in parsed.path.split("/") if s]


def _is_tfhub_url(name: str) -> bool:
    parts = _url_parts(name)
    return bool(parts and parts[0] in _TFHUB_HOSTS and len(parts[1]) >= 2)


def _is_kaggle_url(name: str) -> bool:
    parts = _url_parts(name)
    return bool(
        parts and parts[0] in _KAGGLE_HOSTS and len(parts[1]) >= 3 and parts[1][0] == "models"
    )


def _is_local_saved_model(path: str) -> bool:
    path = os.path.expanduser(path)
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in _SAVED_MODEL_FILES
    )


def _kaggle_handle_parts(name: str) -> list[str] | None:
    """The 4 or 5 parts of an ``owner/model/framework/variation[/version]`` handle, else None."""
    parts = name.split("/")
    if len(parts) not in (4, 5) or not all(parts):
        return None
    if parts[2].lower() not in _KAGGLE_FRAMEWORKS:
        return None
    if len(parts) == 5 and not parts[4].isdigit():
        return None
    if not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in parts):
        return None
    return parts


def is_kaggle_handle(name) -> bool:
    """True for a Kaggle Models handle ``owner/model/framework/variation[/version]``.

    The framework must be one Kaggle knows (``tensorFlow2``, ``keras``, ...; any case), so a
    relative path like ``runs/a/b/c`` is not mistaken for a handle; an existing local
    directory always wins (see :func:`resolve_handle`).
    """
    if not isinstance(name, str | os.PathLike):
        return False
    name = os.fspath(name)
    return _url_parts(name) is None and _kaggle_handle_parts(name) is not None


def normalize_kaggle_handle(handle: str) -> str:
    """One spelling per Kaggle model: lower-case slugs, Kaggle's camelCase framework.

    ``Google/MobileNet-V2/TensorFlow2/100-224-Feature-Vector/5`` ->
    ``google/mobilenet-v2/tensorFlow2/100-224-feature-vector/5``. Kaggle's owner, model and
    variation slugs are lower case; its framework slugs are camelCase (``tensorFlow2``,
    ``pyTorch``). Kaggle paths are case-sensitive, so without this the short and long URL
    forms of one model would land in two kagglehub cache folders.
    """
    parts = _kaggle_handle_parts(handle)
    if parts is None:
        raise UserError(
            f"{handle!r} is not a Kaggle model handle; use owner/model/framework/variation"
            "/version, e.g. google/mobilenet-v2/tensorFlow2/100-224-feature-vector/5"
        )
    parts[0], parts[1], parts[3] = parts[0].lower(), parts[1].lower(), parts[3].lower()
    parts[2] = _KAGGLE_FRAMEWORKS[parts[2].lower()]
    return "/".join(parts)


def is_hub_handle(name) -> bool:
    """True if ``name`` should be loaded as a TF Hub module rather than a Keras model name.

    Accepts ``https://tfhub.dev/...`` (and the hub.tensorflow.google.cn mirror),
    ``https://www.kaggle.com/models/...`` in both the short
    (``owner/model/framework/variation/version``) and the long
    (``.../frameworks/F/variations/V/versions/N``) form, a Kaggle Models handle
    (``owner/model/framework/variation[/version]``, :func:`is_kaggle_handle`), ``gs://...``,
    and a local directory that contains ``saved_model.pb``.
    """
    if not isinstance(name, str | os.PathLike):
        return False
    name = os.fspath(name)
    if name.startswith("gs://"):
        return len(name) > len("gs://")
    if _url_parts(name) is not None:
        return _is_tfhub_url(name) or _is_kaggle_url(name)
    return _is_local_saved_model(name) or is_kaggle_handle(name)


def _kaggle_slug(text: str) -> str:
    return text.replace("_", "-").lower()


def tfhub_to_kaggle_handle(url: str) -> str | None:
    """Best-effort Kaggle Models handle for a tfhub.dev URL (None if not a tfhub.dev URL).

    ``https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5`` ->
    ``google/mobilenet-v2/tensorFlow2/100-224-feature-vector/5``.

    Rules (derived from the redirects tfhub.dev serves): drop the ``imagenet``
    collection folder; the model is the first path segment up to and including
    its ``_vN`` token (``mobilenet_v2``, ``inception_resnet_v2``) or the whole
    segment; the variation is everything else joined with ``-``; ``_`` becomes
    ``-`` and everything is lower case. A handle without a variation (``yamnet``)
    uses the model name as variation. Kaggle renamed some models
    (``nnlm-en-dim50`` -> ``nnlm/en-dim50``) and renumbered some versions, so the
    result can be wrong; :func:`load_module` only uses it as a fallback.
    """
    if not _is_tfhub_url(url):
        return None
    _, segments = _url_parts(url)
    version = None
    if segments[-1].isdigit():
        version = segments.pop()
    if len(segments) < 2:
        return None
    publisher, rest = segments[0], segments[1:]
    if rest[0] == "imagenet" and len(rest) > 1:
        rest = rest[1:]
    head, tail = rest[0], rest[1:]
    match = re.match(r"^(.*?_v\d+)(?:_(.+))?$", head)
    if match:
        model, remainder = match.group(1), match.group(2)
        variation = [remainder] if remainder else []
    else:
        model, variation = head, []
    variation += tail
    if not variation:
        variation = [model]
    parts = [publisher.lower(), _kaggle_slug(model), _KAGGLE_FRAMEWORK]
    parts.append(_kaggle_slug("-".join(variation)))
    if version is not None:
        parts.append(version)
    return "/".join(parts)


def kaggle_url_to_handle(url: str) -> str | None:
    """``owner/model/framework/variation[/version]`` for a kaggle.com/models URL, else None.

    Both URL forms map to the same handle, normalised (:func:`normalize_kaggle_handle`):
    ``https://www.kaggle.com/models/google/mobilenet-v2/TensorFlow2/100-224-feature-vector/5``
    and ``https://www.kaggle.com/models/google/mobilenet-v2/frameworks/tensorFlow2/
    variations/100-224-feature-vector/versions/5``.
    """
    if not _is_kaggle_url(url):
        return None
    _, segments = _url_parts(url)
    segments = segments[1:]  # drop "models"
    if len(segments) >= 6 and segments[2] == "frameworks" and segments[4] == "variations":
        handle = segments[:2] + [segments[3], segments[5]]
        if len(segments) >= 8 and segments[6] == "versions":
            handle.append(segments[7])
    elif len(segments) >= 4:
        handle = segments[:5]
    else:
        return None
    handle = "/".join(handle)
    return normalize_kaggle_handle(handle) if _kaggle_handle_parts(handle) else handle


# --------------------------------------------------------------------------- op libraries

# TF Text's ops (tensorflow-text 2.21: what `import tensorflow_text` adds to the op registry).
# Real TF Hub BERT preprocessors are made of them (CaseFoldUTF8, NormalizeUTF8,
# WordpieceTokenizeWithOffsets, ...); SentencePiece-based preprocessors use its SentencepieceOp.
_TF_TEXT_OPS = frozenset(
    {
        "CaseFoldUTF8",
        "ConstrainedSequence",
        "FastBertNormalize",
        "FastWordpieceTokenizeWithOffsets",
        "FindSourceOffsets",
        "MaxSpanningTree",
        "NormalizeUTF8",
        "NormalizeUTF8WithOffsetsMap",
        "PhraseTokenize",
        "RegexSplitWithOffsets",
        "RougeL",
        "SentenceFragments",
        "SentenceFragmentsV2",
        "SplitMergeTokenizeWithOffsets",
        "TokenizerFromLogits",
        "UnicodeScriptTokenizeWithOffsets",
        "WhitespaceTokenizeWithOffsets",
        "WordpieceTokenizeWithOffsets",
    }
)
# (op name prefix, the pip package that most likely registers it). Best effort: an op name
# does not say where it comes from; these are the namespaces the packages use.
_OP_PREFIXES = (
    ("TFText>", "tensorflow-text"),
    ("Sentencepiece", "tensorflow-text"),
    ("IO>", "tensorflow-io"),
    ("Addons>", "tensorflow-addons"),
    ("SimpleML", "tensorflow-decision-forests"),
    ("TFRA>", "tensorflow-recommenders-addons"),
    ("Scann", "scann"),
)
# Python modules whose import registers the ops of an installed op library.
_OP_LIBRARY_MODULES = ("tensorflow_text",)

_core_ops: frozenset | None = None
_op_libraries_loaded = False
_op_library_errors: dict[str, str] = {}  # module -> why importing it failed


def op_provider(op: str) -> str | None:
    """The pip package that most likely registers ``op`` (e.g. ``tensorflow-text``), else None."""
    if op in _TF_TEXT_OPS:
        return "tensorflow-text"
    for prefix, package in _OP_PREFIXES:
        if op.startswith(prefix):
            return package
    return None


def _registered_ops() -> set[str]:
    """Names of every op registered in this process (core TF plus loaded op libraries).

    No public API lists them: ``tf.raw_ops`` only holds the Python wrappers of core ops (it
    lacks ~450 registered internal/TPU ops, and never has a library's ops), and
    ``op_def_registry`` only answers for one name. TF_GetAllOpList is the C API call the
    registry is built on.
    """
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session as c_api

    buffer = c_api.TF_GetAllOpList()
    try:
        data = c_api.TF_GetBuffer(buffer)
    finally:
        c_api.TF_DeleteBuffer(buffer)
    return {op.name for op in op_def_pb2.OpList.FromString(data).op}


def load_op_libraries() -> None:
    """Registers the ops of installed op libraries (``import tensorflow_text``); idempotent.

    Call before loading any SavedModel: TF Hub BERT preprocessors fail to load with
    "Op type not registered 'CaseFoldUTF8'" otherwise. The ops registered before the first
    import are remembered as core TensorFlow (see :func:`non_core_ops`).
    """
    global _core_ops, _op_libraries_loaded
    if _op_libraries_loaded:
        return
    if not any(name in sys.modules for name in _OP_LIBRARY_MODULES):
        _core_ops = frozenset(_registered_ops())
    for name in _OP_LIBRARY_MODULES:
        try:
            __import__(name)
        except ImportError as error:
            _op_library_errors[name] = _short(error)
            logging.info("%s is not importable (%s): its ops are not registered", name, error)
    _op_libraries_loaded = True


def _core_op_names() -> frozenset:
    # No op library is imported for this: before the first import, what is registered is core
    # TensorFlow (importing TF Text only to learn that an image model does not use it costs
    # ~0.5 s per export).
    registered = _registered_ops()
    core = _core_ops if _core_ops is not None else registered
    # Whatever was imported first, ops a known extension package provides are not core.
    return frozenset(op for op in core if op_provider(op) is None)


def read_saved_model(path: str):
    """The SavedModel proto of `path`, parsed from saved_model.pb without loading anything
    (TensorFlow's devices stay uninitialised)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    try:
        with open(pb, "rb") as f:
            saved.ParseFromString(f.read())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {pb} ({_short(error)})") from None
    return saved


def saved_model_ops(path: str) -> set[str]:
    """Op names used by the SavedModel in ``path`` (its graphs and their function library).

    Read from saved_model.pb without loading it; calls of the library's own functions are
    not ops and are left out.
    """
    ops, functions = set(), set()
    for graph in read_saved_model(os.fspath(path)).meta_graphs:
        ops.update(node.op for node in graph.graph_def.node)
        for function in graph.graph_def.library.function:
            functions.add(function.signature.name)
            ops.update(node.op for node in function.node_def)
    return ops - functions


def missing_ops(path: str) -> list[str]:
    """Ops the SavedModel in ``path`` needs that no library in this process registers."""
    load_op_libraries()
    return sorted(saved_model_ops(path) - _registered_ops())


def non_core_ops(path: str) -> list[str]:
    """Sorted ops the SavedModel in ``path`` needs beyond core TensorFlow (e.g. TF Text's).

    A serving binary without the libraries that provide them (stock TF Serving lacks TF Text)
    cannot load the SavedModel.
    """
    return sorted(saved_model_ops(path) - _core_op_names())


def _missing_op_error(what: str, op: str, more: int = 0) -> UserError:
    package = op_provider(op)
    if package is None:
        where = (
            "it comes from an op library not installed here (a TensorFlow extension package; "
            "the module's documentation should name it); install it and retry"
        )
    else:
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        failed = _op_library_errors.get(package.replace("-", "_"))
        if installed and failed:
            where = (
                f"it most likely comes from {package}, which is installed ({installed}) but "
                f"failed to import ({failed}): reinstall the {package} release matching "
                f"TensorFlow {tf.__version__}"
            )
        elif installed:
            where = (
                f"it most likely comes from {package}, but the installed {package} {installed} "
                f"does not register it: install the {package} release the module was made with"
            )
        else:
            where = (
                f"it most likely comes from {package}: `pip install {package}` (the release "
                f"matching TensorFlow {tf.__version__}) and retry"
            )
    others = f" (and {more} other{'s' if more > 1 else ''})" if more else ""
    return UserError(
        f"{what} needs the TensorFlow op {op!r}{others}, which no installed library registers; "
        f"{where}"
    )


def check_ops(path: str, what: str | None = None) -> None:
    """Raises a one-line :class:`UserError` if the SavedModel in ``path`` needs an unknown op.

    The message names the op and the package that most likely provides it.
    """
    missing = missing_ops(path)
    if missing:
        raise _missing_op_error(what or f"the SavedModel in {path}", missing[0], len(missing) - 1)


def unregistered_op(error: BaseException) -> str | None:
    """The op name in TensorFlow's "Op type not registered 'X'" error, else None."""
    match = re.search(r"Op type not registered '([^']+)'", str(error))
    return match.group(1) if match else None


# --------------------------------------------------------------------------- loading


def hub_cache_dir() -> str:
    """Where tensorflow_hub caches downloads: ``$TFHUB_CACHE_DIR`` or hub's default."""
    env = os.environ.get("TFHUB_CACHE_DIR")
    if env:
        return env
    from tensorflow_hub import resolver

    return resolver.tfhub_cache_dir(use_temp=True)


def _hub_resolve(handle: str) -> str:
    import tensorflow_hub as hub

    return hub.resolve(handle)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _unreachable(handle: str, reason: str, extra: str = "") -> UserError:
    cache = hub_cache_dir()
    return UserError(
        f"cannot download hub module {handle} ({reason}); downloads are cached in "
        f"{cache} (TFHUB_CACHE_DIR). Check the network, or pre-download: on a machine "
        f"with access, download the module, extract the SavedModel (the folder holding "
        f"saved_model.pb) into a local directory and pass that directory instead of the URL"
        f"{extra}."
    )


def _kagglehub_fallback(handle: str, kaggle_handle: str) -> tuple[str | None, str]:
    """Download ``kaggle_handle`` with kagglehub: (path, "") or (None, what to tell the user).

    Kaggle renumbered some versions, so after the exact handle fails the latest
    version is tried too (logged).
    """
    try:
        import kagglehub
    except ImportError:
        return None, f", or `pip install kagglehub` and retry (it downloads {kaggle_handle})"
    if _kaggle_handle_parts(kaggle_handle):
        kaggle_handle = normalize_kaggle_handle(kaggle_handle)
    candidates = [kaggle_handle]
    if kaggle_handle.count("/") == 4:
        candidates.append(kaggle_handle.rsplit("/", 1)[0])
    for candidate in candidates:
        logging.warning(
            "Downloading %s was refused (HTTP 403, tensorflow/hub#932: tfhub.dev redirects "
            "to Kaggle); downloading it with kagglehub.model_download(%r) instead.",
            handle,
            candidate,
        )
        try:
            return kagglehub.model_download(candidate), ""
        except Exception as error:  # kagglehub raises assorted HTTP/IO errors
            logging.warning("kagglehub.model_download(%r) failed: %s", candidate, error)
    return None, f" (kagglehub could not download {' nor '.join(candidates)} either)"


def kaggle_cache_dir() -> str:
    """Where kagglehub caches downloads: ``$KAGGLEHUB_CACHE`` or ``~/.cache/kagglehub``.

    The same rule as ``kagglehub.config.get_cache_folder`` (kagglehub 1.0), without importing it.
    """
    return os.environ.get("KAGGLEHUB_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kagglehub"
    )


def _kaggle_cached(handle: str) -> str | None:
    """The cached folder of a versioned, normalised handle if kagglehub finished writing it.

    kagglehub (1.0) writes ``models/OWNER/MODEL/FRAMEWORK/VARIATION/N/`` and, once complete,
    an empty ``N.complete`` file beside it; a folder without the marker is a broken download.
    """
    owner, model, framework, variation, version = handle.split("/")
    base = os.path.join(kaggle_cache_dir(), "models", owner, model, framework, variation)
    folder = os.path.join(base, version)
    if os.path.isdir(folder) and os.path.isfile(os.path.join(base, f"{version}.complete")):
        return folder
    return None


def _kaggle_cached_versions(handle: str) -> list[str]:
    base = os.path.join(kaggle_cache_dir(), "models", *handle.split("/")[:4])
    names = os.listdir(base) if os.path.isdir(base) else []
    done = [n for n in names if n.isdigit() and f"{n}.complete" in names]
    return sorted(done, key=int)


def _predownload_hint(handle: str) -> str:
    return (
        f"kagglehub caches models in {kaggle_cache_dir()} (KAGGLEHUB_CACHE). Check the network, "
        f'or pre-download on a connected machine with `python -c "import kagglehub; '
        f"kagglehub.model_download('{handle}')\"` and copy that cache folder here"
    )


def resolve_kaggle(handle: str) -> str:
    """The local folder of a Kaggle model (a handle or a kaggle.com/models URL).

    A versioned handle already in kagglehub's cache (``KAGGLEHUB_CACHE``) is used as is, with
    no network at all; otherwise ``kagglehub.model_download`` fetches it into that cache.
    Offline and not cached: a :class:`UserError` naming the cache folder and the command that
    pre-downloads it. An unversioned handle needs the network (Kaggle decides the latest
    version), so offline the error says to pin a version.
    """
    original = handle
    if _url_parts(handle) is not None:
        handle = kaggle_url_to_handle(handle)
        if handle is None or _kaggle_handle_parts(handle) is None:
            raise UserError(
                f"{original} is not a Kaggle model URL; use https://www.kaggle.com/models/"
                "OWNER/MODEL/FRAMEWORK/VARIATION/VERSION"
            )
    handle = normalize_kaggle_handle(handle)
    versioned = handle.count("/") == 4
    if versioned:
        cached = _kaggle_cached(handle)
        if cached:
            logging.info("Kaggle model %s: using the cached copy in %s", handle, cached)
            return cached
    try:
        import kagglehub
    except ImportError:
        raise UserError(
            f"{original} is a Kaggle model and kagglehub is not installed: "
            "`pip install kagglehub`, or pass the extracted SavedModel folder instead"
        ) from None
    try:
        return kagglehub.model_download(handle)
    except Exception as error:  # kagglehub raises assorted HTTP/IO/auth errors
        reason = _short(error)
        if isinstance(error, OSError) and getattr(error, "response", None) is None:
            # requests' ConnectionError/Timeout (OSError subclasses without an HTTP answer)
            reason = f"cannot reach Kaggle, offline? {type(error).__name__}"
        if not versioned:
            cached = _kaggle_cached_versions(handle)
            have = f" (cached here: version {', '.join(cached)})" if cached else ""
            raise UserError(
                f"cannot find the latest version of Kaggle model {handle} ({reason}): an "
                f"unversioned handle needs the network; pin a version, e.g. "
                f"{handle}/{cached[-1] if cached else 1}{have}. {_predownload_hint(handle)}"
            ) from error
        raise UserError(
            f"cannot download Kaggle model {handle} ({reason}); {_predownload_hint(handle)}"
        ) from error


def _resolve_remote(handle: str) -> str:
    if _is_kaggle_url(handle):
        return resolve_kaggle(handle)
    try:
        return _hub_resolve(handle)
    except urllib.error.HTTPError as error:
        if error.code == 403:
            kaggle_handle = tfhub_to_kaggle_handle(handle)
            if kaggle_handle:
                path, extra = _kagglehub_fallback(handle, kaggle_handle)
                if path:
                    return path
                raise _unreachable(handle, "HTTP 403, tensorflow/hub#932", extra) from error
        raise _unreachable(handle, f"HTTP {error.code}") from error
    except (OSError, ValueError, tf.errors.OpError) as error:
        # urllib.error.URLError (offline, DNS) is an OSError; hub raises ValueError
        # for unexpected server answers and tf.errors for cache I/O problems.
        raise _unreachable(handle, _short(error)) from error


def resolve_handle(handle) -> str:
    """The local directory of ``handle``'s SavedModel, downloading it into the hub cache if needed.

    tfhub.dev and ``gs://`` handles resolve through ``tensorflow_hub`` (``TFHUB_CACHE_DIR`` is
    honoured); Kaggle URLs and handles through kagglehub (:func:`resolve_kaggle`); nothing
    is loaded, so TensorFlow's devices stay uninitialised. Raises :class:`UserError` for
    a handle that cannot be reached or a local directory without a SavedModel; on the
    tfhub.dev HTTP 403 (tensorflow/hub#932) it falls back to ``kagglehub`` (logged).
    """
    handle = os.fspath(handle)
    if handle.startswith("gs://") or _url_parts(handle) is not None:
        return _resolve_remote(handle)
    path = os.path.expanduser(handle)
    if not os.path.isdir(path) and is_kaggle_handle(handle):
        return resolve_kaggle(handle)
    if not os.path.isdir(path):
        raise UserError(
            f"hub module directory {path} does not exist; pass a directory holding an "
            f"extracted SavedModel (saved_model.pb), a https://tfhub.dev/... or "
            f"https://www.kaggle.com/models/... URL (downloads are cached in {hub_cache_dir()}, "
            f"TFHUB_CACHE_DIR)"
        )
    if not _is_local_saved_model(path):
        raise UserError(
            f"{path} holds no saved_model.pb; pass the directory of the extracted "
            f"SavedModel (the one containing saved_model.pb and variables/)"
        )
    return path


def load_module(handle):
    """Resolve ``handle`` through tensorflow_hub (honours ``TFHUB_CACHE_DIR``) and load it.

    ``handle`` is anything :func:`is_hub_handle` accepts. Returns the object
    ``tf.saved_model.load`` gives (``__call__``, ``variables``, ...). If the
    handle cannot be downloaded, raises :class:`UserError` naming the cache dir and
    how to pre-download. If tfhub.dev answers HTTP 403 after redirecting to Kaggle
    and ``kagglehub`` is importable, retries with ``kagglehub.model_download`` on
    the equivalent Kaggle handle (logged).

    Load it inside ``strategy.scope()`` when training with a tf.distribute strategy.
    """
    handle = os.fspath(handle)
    remote = handle.startswith("gs://") or _url_parts(handle) is not None
    path = resolve_handle(handle)
    import tensorflow_hub as hub

    # Before loading: TF Text ops must be registered, and an op nothing registers is one line
    # naming it (a traceback from deep inside the loader otherwise).
    if os.path.isdir(path):
        check_ops(path, f"the hub module {handle}")
    try:
        return hub.load(path)
    except (OSError, ValueError, RuntimeError, tf.errors.OpError) as error:
        op = unregistered_op(error)
        if op:
            raise _missing_op_error(f"the hub module {handle}", op) from error
        if remote and not os.path.isdir(path):
            raise _unreachable(handle, _short(error)) from error
        raise UserError(
            f"cannot load the SavedModel in {path} ({_short(error)}); delete it (or the "
            f"matching folder in {hub_cache_dir()}) and download the module again"
        ) from error


# --------------------------------------------------------------------------- inspection


def _as_module(obj):
    if isinstance(obj, HubLayer):
        return obj.module
    if isinstance(obj, str | os.PathLike):
        return load_module(obj)
    return obj


def _call_function(module, signature=None, endpoint=None):
    if endpoint is not None:
        function = getattr(module, endpoint, None)
        if not callable(function):
            raise UserError(
                f"the SavedModel has no {endpoint!r} endpoint (a Keras 3 model.export() "
                "folder has 'serve'); export the model with model.export(path)"
            )
        return function
    if signature is not None:
        signatures = getattr(module, "signatures", {}) or {}
        if signature not in signatures:
            raise UserError(
                f"the hub module has no signature {signature!r}; pick one of "
                f"{sorted(signatures)} or leave the signature unset"
            )
        return signatures[signature]
    if callable(module):
        return module
    raise UserError(
        "the hub module is not callable (no __call__, e.g. a TF1 Hub format module); "
        f"pass one of its signatures {sorted(getattr(module, 'signatures', {}) or {})}"
    )


def _concrete_functions(func):
    """Concrete functions of a restored tf.function / callable module / ConcreteFunction."""
    if isinstance(func, tf.types.experimental.ConcreteFunction):
        return [func]
    call = func.__call__ if callable(func) else None
    for candidate in (func, call):
        fns = getattr(candidate, "concrete_functions", None)
        if fns:
            return list(fns)
        lister = getattr(candidate, "_list_all_concrete_functions_for_serialization", None)
        if lister is not None:
            fns = lister()
            if fns:
                return list(fns)
    return []


def _has_training_argument(func) -> bool:
    """Whether the restored ``__call__`` takes ``training`` (Reusable SavedModel API)."""
    call = func.__call__ if callable(func) else func
    spec = getattr(getattr(call, "function_spec", None), "fullargspec", None)
    if spec is None:
        import inspect

        try:
            params = inspect.signature(call).parameters
        except (TypeError, ValueError):
            return False
        return "training" in params
    return "training" in spec.args or "training" in spec.kwonlyargs


def _signature_input_names(func) -> list[str]:
    fns = _concrete_functions(func)
    if not fns:
        return []
    return sorted(fns[0].structured_input_signature[1])


def module_input_spec(module, signature=None, endpoint=None) -> tf.TensorSpec | None:
    """TensorSpec (with batch dim) of the module's input, or None if it has several/none."""
    module = _as_module(module)
    fns = _concrete_functions(_call_function(module, signature, endpoint))
    for fn in fns:
        args, kwargs = fn.structured_input_signature
        specs = [a for a in args if isinstance(a, tf.TensorSpec)]
        specs += [v for v in kwargs.values() if isinstance(v, tf.TensorSpec)]
        if len(specs) == 1:
            return specs[0]
    return None


def module_image_size(module, signature=None, endpoint=None) -> int | None:
    """Fixed square input size (e.g. 224) from the module's call signature, else None.

    None when the module takes any size (``[None, None, None, 3]``), is not an
    image module, or has a non-square fixed size (see :func:`module_input_spec`).
    Accepts a loaded module, a :class:`HubLayer` or a handle.
    """
    spec = module_input_spec(module, signature, endpoint)
    if spec is None or spec.shape.rank != 4:
        return None
    height, width = spec.shape[1], spec.shape[2]
    if height is None or width is None or height != width:
        return None
    return int(height)


def _pick_output_key(keys, output_key):
    keys = list(keys)
    if output_key is not None:
        if output_key not in keys:
            raise UserError(
                f"the hub module has no output {output_key!r}; pick one of {sorted(keys)}"
            )
        return output_key
    for key in ("pooled_output", "default"):
        if key in keys:
            return key
    if len(keys) == 1:
        return keys[0]
    raise UserError(
        f"the hub module returns several outputs {sorted(keys)}; choose one with output_key"
    )


def module_output_shape(module, output_key=None, signature=None) -> tuple | None:
    """Output shape including the batch dim, e.g. ``(None, 1280)``; None if unknown."""
    module = _as_module(module)
    for fn in _concrete_functions(_call_function(module, signature)):
        outputs = fn.structured_outputs
        if isinstance(outputs, dict):
            outputs = outputs[_pick_output_key(outputs.keys(), output_key)]
        if hasattr(outputs, "shape") and outputs.shape.rank is not None:
            return tuple(outputs.shape.as_list())
    return None


def module_output_rank(module, output_key=None, signature=None) -> int | None:
    """Rank of the output including batch: 2 for feature vectors and for logits.

    Rank 4 means spatial feature maps that still need pooling. Rank alone cannot
    tell features from logits; see :func:`module_kind`.
    """
    shape = module_output_shape(module, output_key, signature)
    return None if shape is None else len(shape)


def module_kind(handle) -> str:
    """``"classification"``, ``"feature_vector"`` or ``"unknown"``, from the handle's path.

    TF Hub/Kaggle name their image modules ``.../classification/N`` or
    ``.../feature_vector/N`` (``...-classification``, ``...-feature-vector`` on
    Kaggle). Either way the new head goes on top of the module's output: for
    a classification module that is on top of its logits.
    """
    if isinstance(handle, HubLayer):
        handle = handle.handle
    if not isinstance(handle, str | os.PathLike):
        return "unknown"
    text = os.fspath(handle).lower().replace("-", "_")
    if "classification" in text:
        return "classification"
    if "feature_vector" in text:
        return "feature_vector"
    return "unknown"


# --------------------------------------------------------------------------- the layer

_AGGREGATION = {
    tf.VariableAggregation.NONE: "none",
    tf.VariableAggregation.SUM: "sum",
    tf.VariableAggregation.MEAN: "mean",
    tf.VariableAggregation.ONLY_FIRST_REPLICA: "only_first_replica",
}
_SYNCHRONIZATION = {
    tf.VariableSynchronization.AUTO: "auto",
    tf.VariableSynchronization.NONE: "none",
    tf.VariableSynchronization.ON_WRITE: "on_write",
    tf.VariableSynchronization.ON_READ: "on_read",
}


def _keras_name(tf_name: str) -> str:
    """``'block_1/conv/kernel:0'`` -> ``'block_1_conv_kernel'``: valid Keras name and TF scope."""
    name = re.sub(r":\d+$", "", tf_name)
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip("_")
    return name or "variable"


def _module_variables(module, func):
    """(all variables, ids of trainable ones), deduplicated, in the module's order."""
    if hasattr(module, "variables"):
        variables = list(module.variables)
        trainable = list(getattr(module, "trainable_variables", None) or [])
        if not hasattr(module, "trainable_variables"):
            trainable = [v for v in variables if v.trainable]
    else:  # plain SavedModel: whatever the call function captures
        variables, trainable = [], []
        for fn in _concrete_functions(func):
            variables += list(fn.variables)
            trainable += list(fn.trainable_variables)
    unique, seen = [], set()
    for v in variables + trainable:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    trainable_ids = {
        id(v)
        for v in trainable
        if getattr(v, "synchronization", None) != tf.VariableSynchronization.ON_READ
    }
    return unique, trainable_ids


@keras.saving.register_keras_serializable(package="tf_finetune")
class HubLayer(keras.layers.Layer):
    """A TF Hub module (Reusable SavedModel API) as a Keras 3 layer.

    Args:
        handle_or_module: a handle (see :func:`is_hub_handle`), loaded with
            :func:`load_module`, or an already loaded module object. Two layers built
            from the *same* module object share its variables; a handle loads a
            fresh copy every time.
        trainable: fine-tune the module's ``trainable_variables``. Its other
            variables (batch-norm moving statistics ...) are never trainable. When
            False the module runs in inference mode (``training=False``), like a
            frozen Keras BatchNormalization, so ``fit`` changes nothing in it.
        output_key: which entry to return when the module returns a dict. Default:
            ``pooled_output``, else ``default``, else the only key. ``ALL_OUTPUTS``
            (``"*"``) returns the whole dict (e.g. a BERT preprocessor's
            ``input_word_ids``/``input_mask``/``input_type_ids`` for the encoder).
        signature: call this SavedModel signature (e.g. ``"serving_default"``)
            instead of ``__call__``. Signatures cannot be fine-tuned.
        endpoint: call this function of the SavedModel instead of ``__call__``: a
            Keras 3 ``model.export()`` / ``ExportArchive`` folder's ``serve``. Unlike a
            signature it can be fine-tuned (its variables are the module's; it runs as it
            was traced, i.e. in inference mode).
        arguments: extra keyword arguments for every call of the module.
        name, dtype, ...: usual Layer arguments. ``dtype`` defaults to float32
            (hub modules compute in float32, also under a mixed-precision policy).

    Inputs: float32 ``[batch, h, w, 3]`` images in ``[0, 1]`` (floating inputs are
    cast to the dtype the module expects; integer images are refused), or
    ``tf.string [batch]`` for text modules.

    Under ``tf.distribute``, build the layer inside ``strategy.scope()`` from a
    handle (or from a module loaded there), so the module's variables are
    distributed variables.
    """

    def __init__(
        self,
        handle_or_module,
        trainable=False,
        output_key=None,
        signature=None,
        arguments=None,
        name=None,
        endpoint=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=trainable, name=name, **kwargs)
        if isinstance(handle_or_module, str | os.PathLike):
            self._handle = os.fspath(handle_or_module)
            module = load_module(self._handle)
        else:
            self._handle = None
            module = handle_or_module
        self._output_key = output_key
        self._signature = signature
        self._endpoint = endpoint
        self._arguments = dict(arguments or {})
        self._func = _call_function(module, signature, endpoint)
        self._has_training_argument = (
            signature is None and endpoint is None and _has_training_argument(self._func)
        )
        self._signature_inputs = _signature_input_names(self._func) if signature else []
        input_spec = module_input_spec(module, signature, endpoint)
        self._module_input_spec = input_spec
        losses = [] if signature else list(getattr(module, "regularization_losses", None) or [])
        for loss in losses:
            if not callable(loss):
                raise ValueError("module.regularization_losses must hold callables")
        self._regularization_fns = losses
        # Tracked as a TF dependency (not a Keras one) so that SavedModel export
        # also writes the module's lookup tables and asset files.
        self._module = module
        variables, trainable_ids = _module_variables(module, self._func)
        self._check_distribution(variables)
        self._wrap_variables(variables, trainable_ids)
        if trainable:
            self._check_trainability()
        # Hub graphs may hold ops XLA cannot compile (strings, tables); keep the
        # surrounding train step off XLA.
        self.supports_jit = False
        self._build_at_init()

    # -- construction helpers

    def _check_distribution(self, variables):
        if not variables or not tf.distribute.has_strategy():
            return
        strategy = tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync <= 1:
            return
        if not all(strategy.extended.variable_created_in_scope(v) for v in variables):
            raise ValueError(
                "HubLayer is built inside a tf.distribute strategy scope from a module "
                "loaded outside it; pass the handle (or call load_module) inside "
                "strategy.scope()"
            )

    def _wrap_variables(self, variables, trainable_ids):
        """Track the module's tf.Variables as Keras variables (no copy), clean names."""
        used = set()
        with keras.name_scope(self.name):
            for v in variables:
                base = _keras_name(v.name)
                name, i = base, 1
                while name in used:
                    name, i = f"{base}_{i}", i + 1
                used.add(name)
                keras_variable = keras.Variable(
                    initializer=v,
                    shape=v.shape,
                    dtype=v.dtype,
                    trainable=id(v) in trainable_ids,
                    autocast=False,
                    aggregation=_AGGREGATION.get(v.aggregation, "none"),
                    synchronization=_SYNCHRONIZATION.get(v.synchronization, "auto"),
                    name=name,
                )
                self._track_variable(keras_variable)

    def _check_trainability(self):
        if self._signature:
            raise UserError(
                f"a hub module signature ({self._signature}) cannot be fine-tuned; "
                "freeze the backbone or use the module's __call__ (no signature)"
            )

    # -- public bits

    @property
    def handle(self):
        """The handle the module was loaded from, or None if a module object was passed."""
        return self._handle

    @property
    def module(self):
        """The loaded module object."""
        return self._module

    def call(self, inputs, training=None):
        if self.trainable:
            self._check_trainability()
        inputs = self._cast_inputs(inputs)
        kwargs = dict(self._arguments)
        if self._signature:
            if isinstance(inputs, dict):
                kwargs.update(inputs)
            elif len(self._signature_inputs) == 1:
                kwargs[self._signature_inputs[0]] = inputs
            else:
                raise ValueError(
                    f"signature {self._signature} takes inputs {self._signature_inputs}; "
                    "pass a dict"
                )
            result = self._func(**kwargs)
        elif self._has_training_argument:
            result = self._call_with_training(inputs, kwargs, training)
        else:
            result = self._func(inputs, **kwargs)
        if self.trainable:
            for loss in self._regularization_fns:
                self.add_loss(loss())
        if isinstance(result, dict) and self._output_key != ALL_OUTPUTS:
            result = result[_pick_output_key(result.keys(), self._output_key)]
        return result

    def _call_with_training(self, inputs, kwargs, training):
        if not self.trainable:
            training = False  # frozen: inference mode, like Keras BatchNormalization
        if training is None:
            training = False
        if tf.is_tensor(training):
            static = tf.get_static_value(training)
            if static is None:
                return tf.cond(
                    tf.cast(training, tf.bool),
                    lambda: self._func(inputs, training=True, **kwargs),
                    lambda: self._func(inputs, training=False, **kwargs),
                )
            training = static
        return self._func(inputs, training=bool(training), **kwargs)

    def _cast_inputs(self, inputs):
        spec = self._module_input_spec
        if spec is None or isinstance(inputs, dict | list | tuple):
            return inputs
        inputs = inputs if tf.is_tensor(inputs) else tf.convert_to_tensor(inputs)
        want = spec.dtype
        if inputs.dtype != want:
            if want.is_floating and inputs.dtype.is_floating:
                inputs = tf.cast(inputs, want)
            elif want.is_floating and inputs.dtype.is_integer:
                raise ValueError(
                    f"HubLayer got {inputs.dtype.name} inputs; TF Hub image modules expect "
                    f"{want.name} values in [0, 1]: convert with tf.cast(x, tf.float32) / 255"
                )
        if not spec.shape.is_compatible_with(inputs.shape):
            expected = tuple(spec.shape.as_list())
            hint = ""
            size = module_image_size(self._module, self._signature, self._endpoint)
            if size is not None:
                hint = f"; resize images to {size}x{size}"
            raise UserError(
                f"the hub module takes inputs of shape {expected}, got "
                f"{tuple(inputs.shape.as_list())}{hint}"
            )
        return inputs

    def get_config(self):
        if self._handle is None:
            raise NotImplementedError(
                "HubLayer built from a module object has no config; build it from a handle"
            )
        config = super().get_config()
        config.update(
            {
                "handle_or_module": self._handle,
                "output_key": self._output_key,
                "signature": self._signature,
                "arguments": dict(self._arguments),
                "endpoint": self._endpoint,
            }
        )
        return config
