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
