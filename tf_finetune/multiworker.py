"""Multi-worker training (``tf.distribute.MultiWorkerMirroredStrategy``) with Keras 3.

What a caller must do, in this order (see docs/multiworker.md):

1. ``strategy = make_multi_worker_strategy()`` -- first thing in the process, before any
   other TensorFlow op runs (collective ops can only be configured at program start).
2. ``apply_keras_workarounds()`` -- once, any time before ``model.fit``.
3. Build and compile the model inside ``with strategy.scope():``.
4. ``with worker_scratch_dir(model_dir) as out_dir:`` -- every worker runs the same
   ``fit`` / export code, writing under ``out_dir``: the real ``model_dir`` on the chief,
   a worker-private scratch dir elsewhere (removed when the block exits normally).
   Put ``BackupAndRestore(os.path.join(out_dir, "backup"))`` and then
   ``resume_epoch_check()`` first in ``callbacks``.

No other preparation is needed: the model does not have to be built from a sample batch
before ``fit``; the workaround for the symbolic build does that from a local batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from tf_finetune.errors import UserError

TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


def _bad_tf_config(problem: str) -> UserError:
    return UserError(f"TF_CONFIG {problem}; set it like: {TF_CONFIG_EXAMPLE}")


def parse_tf_config(raw: str | None = None) -> dict[str, Any]:
    """Parse and validate TF_CONFIG (from ``raw`` or the environment).

    Returns the decoded dict. Raises ``UserError`` (one line, with an example) when it is
    missing, not JSON, or lacks a usable ``cluster`` / ``task``.
    """
    if raw is None:
        raw = os.environ.get("TF_CONFIG")
    if raw is None or not raw.strip():
        raise _bad_tf_config("is not set (multi-worker training needs it on every worker)")
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _bad_tf_config(f"is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(cfg, dict):
        raise _bad_tf_config("must be a JSON object")
    cluster = cfg.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise _bad_tf_config('has no "cluster" object')
    for job, addrs in cluster.items():
        if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
            raise _bad_tf_config(f'cluster "{job}" must be a non-empty list of "host:port"')
        for a in addrs:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise _bad_tf_config(f'cluster "{job}" address {a!r} is not "host:port"')
    if "worker" not in cluster and "chief" not in cluster:
        raise _bad_tf_config('cluster has neither "worker" nor "chief" tasks')
    if "chief" in cluster and len(cluster["chief"]) != 1:
        raise _bad_tf_config('cluster "chief" must list exactly one address')
    task = cfg.get("task")
    if not isinstance(task, dict):
        raise _bad_tf_config('has no "task" object')
    ttype, index = task.get("type"), task.get("index")
    if not isinstance(ttype, str) or not isinstance(index, int) or isinstance(index, bool):
        raise _bad_tf_config('task needs a string "type" and an integer "index"')
    if ttype != "evaluator":  # the evaluator is not listed in the cluster
        if ttype not in cluster:
            raise _bad_tf_config(f'task type "{ttype}" is not in cluster ({", ".join(cluster)})')
        if not 0 <= index < len(cluster[ttype]):
            raise _bad_tf_config(
                f'task index {index} is out of range for "{ttype}" '
                f"({len(cluster[ttype])} addresses)"
            )
    return cfg


def _task() -> tuple[str, int] | None:
    """(type, index) of this process, or None when TF_CONFIG is unset (single process)."""
    if not os.environ.get("TF_CONFIG", "").strip():
        return None
    cfg = parse_tf_config()
    return cfg["task"]["type"], cfg["task"]["index"]


def is_chief() -> bool:
    """True on the one worker that writes real outputs.

    The chief is the ``chief`` task if the cluster has one, else ``worker`` 0. Without
    TF_CONFIG (plain single-process training) this process is the chief.
    """
    if not os.environ.get("TF_CONFIG", "").strip():
        return True
    cfg = parse_tf_config()
    ttype, index = cfg["task"]["type"], cfg["task"]["index"]
    if "chief" in cfg["cluster"]:
        return ttype == "chief"
    return ttype == "worker" and index == 0


def scratch_dir_for(model_dir: str) -> str:
    """The path this process writes to instead of ``model_dir`` (``model_dir`` on the chief).

    For non-chief workers it is a deterministic, worker-private directory outside
    ``model_dir`` (under the system temp dir), so a restarted worker on the same host finds
    its own ``BackupAndRestore`` state again.
    """
    if is_chief():
        return model_dir
    ttype, index = _task()  # type: ignore[misc]  # non-chief implies TF_CONFIG is set
    digest = hashlib.sha1(os.path.abspath(model_dir).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"tf_finetune_{ttype}{index}_{digest}")


@contextlib.contextmanager
def worker_scratch_dir(model_dir: str) -> Iterator[str]:
    """Yield the directory this worker must write checkpoints/exports to.

    Every worker has to run the same saving code (saving can run collective ops), but only
    the chief may write to the real ``model_dir`` -- the pattern of the TF multi-worker
    Keras tutorial. On the chief this yields ``model_dir``; elsewhere it yields
    :func:`scratch_dir_for`, which is deleted when the block exits without an exception.
    After an exception it is kept so that ``BackupAndRestore`` can resume on restart.
    """
    path = scratch_dir_for(model_dir)
    os.makedirs(path, exist_ok=True)
    if path == model_dir:
        yield path
        return
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_multi_worker_strategy(timeout_seconds: float | None = None):
    """Validate TF_CONFIG and return a ``tf.distribute.MultiWorkerMirroredStrategy``.

    Call it first thing in the process, before any other TensorFlow op. The call blocks
    until every worker in TF_CONFIG's cluster has started.

    A worker that dies does not hang the others forever: TF's coordination service stops
    getting its heartbeats and aborts the collectives on the survivors with
    ``UnavailableError`` ("tasks are unhealthy (stopped sending heartbeats)"), ~10 s after
    the death in tests/test_multiworker.py. ``timeout_seconds`` additionally bounds every
    single collective (``CommunicationOptions(timeout_seconds=...)``; it raises
    ``DeadlineExceededError``) -- TF documents it as a debugging aid that costs a thread per
    collective, and it must exceed the slowest step, so it is off (None) by default.
    """
    parse_tf_config()
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as e:
        if "program startup" in str(e) or "initialized" in str(e):
            raise UserError(
                "Call make_multi_worker_strategy() before any other TensorFlow op runs "
                f"(collective ops must be configured at program start): {e}"
            ) from None
        raise


# --- Keras 3 workarounds --------------------------------------------------------------
#
# Keras 3's TensorFlow trainer breaks under MultiWorkerMirroredStrategy in multi-worker
# mode: keras-team/keras#20585 (open as of keras 3.15.1, TF 2.21). Remove this section
# (and the apply_keras_workarounds() call) once upstream fixes it; tests/test_multiworker.py
# has a test that reproduces the bugs without these patches and will tell you.
#
# Patch 2 only changes behaviour when `_collective_all_reduce_multi_worker(strategy)` is
# true (MultiWorkerMirroredStrategy with >1 worker). Patch 1 also fixes keras-team/keras#19246
# (open): under MirroredStrategy a first batch that splits unevenly over the replicas (a split
# smaller than the batch, an odd batch size) fails the same MEAN reduce ("Inputs to operation
# AddN ... must have the same size and shape. Input 0: [4,16,16,3] != input 1: [3,16,16,3]").

_PATCH_MARK = "_tf_finetune_mw_workaround"


def _trainer_module():
    # keras.src: the patches below replace private trainer functions (keras#20585); there is
    # no public hook for them.
    from keras.src.backend.tensorflow import trainer

    return trainer


def _patch_symbolic_build() -> None:
    """Bug 1: ``_maybe_symbolic_build`` calls ``strategy.reduce("MEAN", batch)`` on the
    first distributed batch, which fails under MWMS ("Attempt to convert a value
    (PerReplica...)") and, under any strategy, when the replicas' shares of that batch differ
    in size (keras#19246). Only shapes/dtypes of that batch are used, so build from this
    worker's first local replica batch instead (no communication)."""
    trainer = _trainer_module()
    cls = trainer.TensorFlowTrainer
    original = cls._maybe_symbolic_build
    if getattr(original, _PATCH_MARK, False):
        return

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None:
            return original(self, iterator=iterator, data_batch=data_batch)
        import tensorflow as tf
        from keras import tree

        for _, _, it in iterator:
            data_batch = next(it)
            break

        def local(x):
            if isinstance(x, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(x)[0]
            return x

        return original(self, data_batch=tree.map_structure(local, data_batch))

    setattr(_maybe_symbolic_build, _PATCH_MARK, True)
    _maybe_symbolic_build.__wrapped__ = original
    cls._maybe_symbolic_build = _maybe_symbolic_build


def _patch_reduce_per_replica() -> None:
    """Bug 2: ``reduce_per_replica(..., "mean")`` under MWMS calls
    ``strategy.reduce("MEAN", v, axis=0)``, which fails for the rank-0 loss/metric values
    ("Invalid reduction dimension 0 for input with 0 dimensions"). Reduce rank-0 values
    with ``axis=None`` (mean across replicas); everything else goes to the original.
    The train/test functions look the name up in the module at trace time, so replacing
    the module attribute is enough."""
    trainer = _trainer_module()
    original = trainer.reduce_per_replica
    if getattr(original, _PATCH_MARK, False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(
            strategy
        ):
            return original(values, strategy, reduction)
        from keras import tree

        def _reduce(v):
            local = strategy.experimental_local_results(v)[0]
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return tree.map_structure(_reduce, values)

    setattr(reduce_per_replica, _PATCH_MARK, True)
    reduce_per_replica.__wrapped__ = original
    trainer.reduce_per_replica = reduce_per_replica


def apply_keras_workarounds() -> None:
    """Patch Keras 3's TF trainer so fit/evaluate/predict work under multi-worker MWMS, and
    under MirroredStrategy with batches that split unevenly over the replicas.

    Idempotent; the same numbers as without it wherever Keras works without it. Workaround
    for keras-team/keras#20585 and #19246.
    """
    _patch_symbolic_build()
    _patch_reduce_per_replica()


def keras_workarounds_applied() -> bool:
    trainer = _trainer_module()
    return bool(
        getattr(trainer.TensorFlowTrainer._maybe_symbolic_build, _PATCH_MARK, False)
        and getattr(trainer.reduce_per_replica, _PATCH_MARK, False)
    )


def resume_epoch_check():
    """A Keras callback that fails fast if workers resumed from different epochs.

    Put it right after ``keras.callbacks.BackupAndRestore`` in ``callbacks``. Each worker
    restores its own backup (the chief from ``model_dir``, the others from their scratch
    dirs). If a non-chief lost its scratch dir (e.g. restarted on another host) while the
    chief resumes at epoch N, the workers would run different numbers of steps; this
    raises ``UserError`` on every worker instead of a collective shape-mismatch or hang.
    """
    import keras
    import tensorflow as tf

    class ResumeEpochCheck(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            strategy = self.model.distribute_strategy
            if not _trainer_module()._collective_all_reduce_multi_worker(strategy):
                return
            e = float(self.model._initial_epoch or 0)
            n = strategy.num_replicas_in_sync
            per_replica = strategy.run(lambda: tf.constant([e, e * e], tf.float64))
            s, s2 = strategy.reduce("SUM", per_replica, axis=None).numpy()
            # All equal  <=>  n * sum(e^2) == sum(e)^2 (equality case of Cauchy-Schwarz);
            # every worker computes the same sums, so every worker reaches the same verdict.
            if n * s2 != s * s:
                raise UserError(
                    f"Workers resumed from different epochs (this one: {int(e)}, mean: "
                    f"{s / n:g}); a non-chief lost its BackupAndRestore scratch dir -- keep "
                    "TMPDIR on a per-worker persistent volume, or delete the chief's "
                    "<model_dir>/backup to restart from scratch."
                )

    return ResumeEpochCheck()
