"""Test session set-up: a private Keras cache, 2 logical CPUs, and the ../shared data."""

import os
import pathlib
import tempfile

# Before TensorFlow or Keras is imported anywhere: Keras reads KERAS_HOME at import time, and
# the CPU can only be split into logical devices before TensorFlow initializes.
_KERAS_HOME = tempfile.mkdtemp(prefix="tf_finetune_test_keras_")
os.environ.setdefault("KERAS_HOME", _KERAS_HOME)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_finetune.distribute import configure_cpu_replicas  # noqa: E402

# Two logical CPU devices for the whole session: MirroredStrategy tests get 2 replicas, the
# default strategy keeps using the first device.
configure_cpu_replicas(2)
assert len(tf.config.list_logical_devices("CPU")) == 2

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the checkout: real weights and photos. Skips on a user's clone."""
    if not (SHARED / "weights" / "keras").is_dir() or not (SHARED / "data").is_dir():
        message = f"{SHARED} (real weights and photos beside the checkout) is missing"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must provide it.")
        pytest.skip(f"{message}; it exists only on development machines and in CI.")
    return SHARED


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """An image folder a tiny run learns in seconds: 3 solid-colour classes x 16 JPEG/PNG.

    Module-scoped: tests may read it and train on it, never change it.
    """
    from tests.images import write_class_folders

    return write_class_folders(tmp_path_factory.mktemp("photos"), num_classes=3, per_class=16)


@pytest.fixture
def corrupt_folder(tmp_path) -> pathlib.Path:
    """3 solid-colour classes x 16 images, plus a truncated JPEG (class_1) and a PNG whose
    header passes but whose data does not decode (class_2)."""
    from tests.images import write_class_folders

    root = write_class_folders(tmp_path / "photos", num_classes=3, per_class=16)
    good = (root / "class_1" / "img_000.jpg").read_bytes()
    (root / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class_2" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


@pytest.fixture
def tf_serving():
    """Starts fake TF Serving (tests/fake_tf_serving.py, a test double) on an export base dir.

    `tf_serving(name, base, protocol="rest" | "grpc", **store_options)` returns the started
    server with `.store` (the FakeModelStore: it counts predict calls) and `.flag` (the
    `predict` flag that reaches it: `--server=URL` or `--grpc=HOST:PORT`). Every server
    started is stopped after the test.
    """
    from tests.fake_tf_serving import FakeGrpcServer, FakeModelStore, FakeRestServer

    started = []

    def start(name, base, protocol="rest", **store_options):
        store = FakeModelStore(name, base, **store_options)
        if protocol == "rest":
            server = FakeRestServer(store)
            server.flag = f"--server={server.url}"
        else:
            server = FakeGrpcServer(store)
            server.flag = f"--grpc={server.target}"
        server.store = store
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()
