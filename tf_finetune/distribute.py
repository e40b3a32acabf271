"""Where training runs: logical CPU replicas, the tf.distribute strategy, and batches that
every replica can take a share of."""

import functools
import itertools

import tensorflow as tf

from tf_finetune import multiworker as mw
from tf_finetune import quiet_start
from tf_finetune.errors import UserError


def configure_cpu_replicas(cpu_replicas: int) -> None:
    """Splits the CPU into `cpu_replicas` logical devices (only without GPUs).

    Must run before TensorFlow initializes its devices; a second call with a number that is
    already in place is a no-op.
    """
    if cpu_replicas <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) >= cpu_replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
        )
    except RuntimeError as e:
        raise RuntimeError(
            "--cpu_replicas must be applied before TensorFlow initializes its devices"
        ) from e


def make_strategy(kind: str, cpu_replicas: int) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs (or `cpu_replicas` logical CPUs); else one device.

    `multi_worker`: MultiWorkerMirroredStrategy from TF_CONFIG, with the Keras 3 workarounds
    (keras-team/keras#20585); must be the first TensorFlow op of the process.

    The devices are up once it returns: the CLI's start-up filter on stderr ends here.
    """
    try:
        return _make_strategy(kind, cpu_replicas)
    finally:
        quiet_start.end()


def _make_strategy(kind: str, cpu_replicas: int) -> tf.distribute.Strategy:
    # Keras 3 trainer fixes (Python patches, no TF op): keras#20585 under multi_worker, and
    # keras#19246 for a first batch split unevenly over the replicas of any strategy.
    mw.apply_keras_workarounds()
    if kind == "multi_worker":
        return mw.make_multi_worker_strategy()
    configure_cpu_replicas(cpu_replicas)
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    devices = gpus or cpus[: max(cpu_replicas, 1)]
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0])
    if kind == "mirrored" or len(devices) > 1:
        return _mirrored(tuple(devices))
    return tf.distribute.get_strategy()


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per device set and process.

    A second MirroredStrategy over the same devices restarts the collective instance keys,
    which then collide with the first one's ("Shape mismatch in the collective instance
    100") when a process trains twice (tests, notebooks).
    """
    return tf.distribute.MirroredStrategy(list(devices))


def skip_batches_smaller_than(
    ds: tf.data.Dataset, replicas: int, count: int, batch_size: int
) -> tf.data.Dataset:
    """Drops training batches too small to give every replica an example.

    MirroredStrategy splits each batch across replicas; a last batch smaller than the
    number of replicas leaves one empty and its backward pass fails (`Matrix size-incompatible:
    In[0]: [0,C]`, tensorflow#45594). At most replicas-1 examples are skipped per epoch, and
    the reshuffle puts different ones last each epoch.
    """
    last = count % batch_size
    if replicas <= 1 or last == 0 or last >= replicas:
        return ds
    # Keras needs the number of steps up front (else it warns that the data ran out).
    ds = ds.filter(lambda x, y: tf.shape(y)[0] >= replicas)
    return ds.apply(tf.data.experimental.assert_cardinality(count // batch_size))


def eval_batch_size(count: int, batch_size: int, replicas: int) -> int:
    """The largest batch size <= `batch_size` whose last batch still gives every replica an
    example, for the evaluation of `count` examples under the strategy.

    A last batch smaller than the number of replicas leaves one of them an empty batch, and
    the forward pass fails on it (`Incompatible shapes: [32] vs. [0,16,16,3]` in BatchNorm).
    Evaluation must not skip examples (its numbers would no longer be of the whole split), so
    the batch size moves instead; the metrics do not depend on it.
    """
    if replicas <= 1:
        return batch_size
    if count < replicas:
        raise UserError(
            f"a split of {count} example(s) cannot be evaluated on {replicas} replicas: add "
            "examples or use fewer replicas (--cpu_replicas, or the GPUs visible)."
        )
    # Down from batch_size first (smaller batches cost no memory), then up; `count` always fits.
    for size in itertools.chain(
        range(batch_size, replicas - 1, -1), range(batch_size + 1, count + 1)
    ):
        if count % size == 0 or count % size >= replicas:
            return size
    raise AssertionError("unreachable: a single batch of count >= replicas examples fits")
