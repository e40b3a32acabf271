"""Surviving faults with nothing lost: run lock, atomic backups, signals, NaN, disk full.

What `train.py` uses, and why each piece exists:

- `RunLock(model_dir)`: refuses a second run on the same run directory (two writers would
  interleave backups and checkpoints). The lock file holds pid, host and the process start
  time; a lock whose process is gone (a SIGKILLed run) is taken over.
- `AtomicBackup`: Keras' `BackupAndRestore` writes `latest.weights.h5` in place and then the
  epoch number, so a kill in between leaves weights and epoch out of step (or a truncated
  file). Ours writes a new weights file, then atomically replaces the metadata that names it.
  It also saves on demand (signals) and is deleted by the caller only once the export exists,
  so a kill during evaluation or export resumes with zero epochs left instead of retraining.
- `BestCheckpoint`: `ModelCheckpoint(save_best_only=True)` starts from `best=None` after a
  restore and overwrites a better checkpoint (keras-team/keras#17012, open). Ours keeps the
  best value in `best.json` beside the checkpoint and restores it when the run resumes, and
  writes the weights to a temporary file and renames it.
- `StopOnNaN`: like `TerminateOnNaN`, but raises at once, so the NaN weights reach neither
  the backup nor the checkpoint nor the export.
- `SignalGuard` + `StopOnSignal`: SIGINT/SIGTERM (Kubernetes preemption) finish the current
  step, save a backup and raise `Stopped`; a second signal stops at once.
- `disk_full_error`: ENOSPC while writing turns into a one-line `UserError`; the temporary
  file is removed and the previous good file is untouched.

`fault_point(name)` is a test hook: with `TF_FINETUNE_FAULT=name=SIGKILL,...` in the
environment the process signals itself at that point (tests/test_faults.py kills runs
mid-epoch and between writing and committing a file).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
import uuid

import keras
from absl import logging

from tf_finetune import atomic
from tf_finetune.atomic import disk_full_error, is_disk_full
from tf_finetune.errors import UserError

LOCK_FILE = "run.lock"
BACKUP_METADATA = "training_metadata.json"
FAULT_ENV = "TF_FINETUNE_FAULT"


# ----------------------------------------------------------------------------- errors
class Stopped(UserError):
    """The run stopped on a signal after saving a backup; rerunning resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; nothing was exported."""

    exit_code = 1


def fault_point(name: str) -> None:
    """Test hook: signals this process at `name` when TF_FINETUNE_FAULT asks for it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, sig = item.strip().partition("=")
        if point == name:
            logging.warning("%s: sending %s to myself at %s", FAULT_ENV, sig or "SIGKILL", name)
            os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


# ----------------------------------------------------------------------------- lock
def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a reused pid is not mistaken for the owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: `<dir>/run.lock` holding pid, host, start time.

    Created atomically (written to a temporary file, then hard-linked into place, which fails
    if the lock exists). A lock left by a process that no longer runs on this host is stale
    and taken over; a lock from another host cannot be checked, so the message says how to
    remove it.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._owned = False

    def _record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by something else; treated as stale below

    def _is_stale(self, holder: dict) -> bool:
        if not holder or "pid" not in holder:
            return True
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder["pid"])
        if not pid_alive(pid):
            return True
        start = _process_start(pid)
        return bool(holder.get("start") and start and start != holder["start"])

    def acquire(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._record(), f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self._owned = True
                    return
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if not self._is_stale(holder):
                    raise UserError(
                        f"--model_dir={self.directory} is in use by another run (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, since "
                        f"{holder.get('since')}); wait for it, use another --model_dir, or "
                        f"delete {self.path} if that run is gone."
                    )
                logging.warning(
                    "Taking over the stale lock %s of a run that is gone (pid %s)",
                    self.path,
                    holder.get("pid"),
                )
                atomic.remove(self.path)
            raise UserError(f"could not lock {self.path}; another run keeps taking it.")
        finally:
            atomic.remove(tmp)

    def release(self) -> None:
        if self._owned:
            holder = self._holder() or {}
            if holder.get("pid") == os.getpid():
                atomic.remove(self.path)
            self._owned = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- backup
def read_backup(backup_dir: str) -> dict | None:
    """The committed backup's metadata ({"epoch", "batch", "weights"}), or None."""
    path = os.path.join(backup_dir, BACKUP_METADATA)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(
            f"the backup {path} is unreadable ({e}); delete {backup_dir} to start over."
        ) from None
    if "weights" not in meta:  # written by plain keras.callbacks.BackupAndRestore
        meta["weights"] = "latest.weights.h5"
    return meta


class AtomicBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose state is never half-written, that saves on demand, and that
    the caller deletes (`delete_checkpoint` is off: see the module docstring).

    Metadata `{"epoch": E, "batch": B, "weights": FILE}`: E epochs are complete; a backup
    saved mid-epoch (on a signal) has the weights of part of epoch E, which reruns whole.
    """

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.restored: dict | None = None

    def _load_model(self) -> None:
        meta = read_backup(self.backup_dir)
        if meta is None:
            return
        weights = os.path.join(self.backup_dir, meta["weights"])
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self.model._initial_epoch = meta["epoch"]
        self.restored = meta
        logging.info(
            "Resuming from the backup in %s: %d epoch(s) done%s",
            self.backup_dir,
            meta["epoch"],
            f", epoch {meta['epoch'] + 1} reruns from its start" if meta.get("batch") else "",
        )

    def _save_model(self) -> None:
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"weights-{uuid.uuid4().hex[:12]}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        meta = {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}
        try:
            self.model.save_weights(path)
            fault_point(f"backup:{self._current_epoch}")
            atomic.write_json(os.path.join(self.backup_dir, BACKUP_METADATA), meta)
        except Exception as e:
            atomic.remove(path)
            if is_disk_full(e):
                raise disk_full_error("backup", self.backup_dir) from None
            raise
        for old in os.listdir(self.backup_dir):  # the previous weights (and a killed run's)
            if old.endswith(".weights.h5") and old != name:
                atomic.remove(os.path.join(self.backup_dir, old))

    def save_now(self, epoch: int, batch: int) -> None:
        """Backs up the current weights as `batch` steps into `epoch` (which then reruns)."""
        self._current_epoch = epoch
        self._last_batch_seen = batch + 1
        self._save_model()


def remove_backup(backup_dir: str) -> None:
    """Deletes a finished run's backup: metadata first, so a kill midway leaves no resume point
    that names a missing file."""
    atomic.remove(os.path.join(backup_dir, BACKUP_METADATA))
    import shutil

    shutil.rmtree(backup_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- best checkpoint
class BestCheckpoint(keras.callbacks.ModelCheckpoint):
    """The best weights on `monitor`, written atomically, with the best value remembered in
    `<checkpoint dir>/best.json` across a resume (keras-team/keras#17012)."""

    def __init__(
        self,
        filepath: str,
        backup: AtomicBackup,
        monitor: str = "val_loss",
        initial_value_threshold: float | None = None,
        mode: str = "min",
    ):
        # initial_value_threshold: the best of an earlier fit of the same run (phase 1 before
        # phase 2); a resumed fit's best.json overrides it.
        super().__init__(
            filepath,
            monitor=monitor,
            mode=mode,
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=initial_value_threshold,
        )
        self.backup = backup
        # best.weights.h5 -> best.json (head_best.weights.h5 -> head_best.json)
        self.state_path = filepath.removesuffix(".weights.h5") + ".json"
        self.best_epoch: int | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        root, name = os.path.split(self.filepath)
        for leftover in os.listdir(root) if os.path.isdir(root) else []:
            if leftover.startswith(".tmp-") and leftover.endswith(name):  # a killed run's
                atomic.remove(os.path.join(root, leftover))
        # Only a resumed run continues the old best; a fresh run in the same folder starts over.
        # (The backup is restored after this callback's turn: ask its metadata directly.)
        if read_backup(self.backup.backup_dir) is None or not os.path.exists(self.state_path):
            return
        with open(self.state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("monitor") == self.monitor and os.path.exists(self.filepath):
            self.best, self.best_epoch = state["best"], state.get("epoch")
            logging.info(
                "Best %s so far: %.5f (epoch %s)", self.monitor, self.best, self.best_epoch
            )

    def _save_model(self, epoch, batch, logs):
        real = self.filepath
        tmp = atomic.temporary_path(real)
        best_before = self.best
        self.filepath = tmp
        try:
            super()._save_model(epoch, batch, logs)
            if not os.path.exists(tmp):
                return  # not an improvement
            fault_point(f"checkpoint:{epoch}")
            os.replace(tmp, real)
            atomic.write_json(
                self.state_path, {"monitor": self.monitor, "best": float(self.best), "epoch": epoch}
            )
            self.best_epoch = epoch
        except Exception as e:
            self.best = best_before
            if is_disk_full(e):
                raise disk_full_error("best checkpoint", real) from None
            raise
        finally:
            self.filepath = real
            atomic.remove(tmp)


# ----------------------------------------------------------------------------- NaN
class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """Raises `NonFiniteLoss` at the first NaN/Inf loss, before anything saves the weights."""

    def __init__(self, checkpoint: BestCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _check(self, logs, keys, where):
        for key in keys:
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                ckpt = self.checkpoint
                kept = (
                    f"the last good checkpoint is {ckpt.filepath} ({ckpt.monitor} "
                    f"{ckpt.best:.4f}, epoch {ckpt.best_epoch + 1})"
                    if ckpt.best_epoch is not None
                    else "no checkpoint was saved yet"
                )
                raise NonFiniteLoss(
                    f"{key} became {float(value)} at epoch {self._epoch + 1}{where}; stopped, "
                    f"nothing exported, {kept}. Lower --learning_rate (rerunning resumes from "
                    "the last backup)."
                )

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, ("loss",), f", step {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, ("loss", "val_loss"), "")


# ----------------------------------------------------------------------------- signals
class SignalGuard:
    """Turns SIGINT/SIGTERM into a clean stop for the duration of a `with` block.

    Inside `model.fit` (`deferred` is True) a signal only sets `signum`; `StopOnSignal` then
    finishes the step, saves a backup and raises `Stopped`. Outside fit (loading data,
    evaluating, exporting: nothing to save there, the backup stays) it raises `Stopped` at
    once. A second signal always raises at once. Only the main thread can install handlers;
    elsewhere the guard does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.signum: int | None = None
        self.deferred = False
        self._previous: dict = {}

    def stopped(self, detail: str) -> Stopped:
        name = signal.Signals(self.signum).name
        return Stopped(
            f"stopped by {name}{detail}; rerun the same command to resume from the backup "
            f"in {self.run_dir}.",
            self.signum,
        )

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = signum
        if self.deferred and first:
            logging.warning(
                "%s: saving a backup after this step (send it again to stop at once)",
                signal.Signals(signum).name,
            )
            return
        raise self.stopped(" before the current step finished" if self.deferred else "")

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class StopOnSignal(keras.callbacks.Callback):
    """Inside fit: after the step during which a signal arrived, back up and raise `Stopped`.

    Raising (rather than `model.stop_training`) skips the validation pass and the epoch-end
    callbacks, so a partial epoch is never recorded as complete, and Kubernetes' grace period
    is spent on one step and one save.
    """

    def __init__(self, guard: SignalGuard, backup: AtomicBackup):
        super().__init__()
        self.guard = guard
        self.backup = backup
        self._epoch = 0
        self._steps = 0

    def on_train_begin(self, logs=None):
        self.guard.deferred = True

    def on_train_end(self, logs=None):
        self.guard.deferred = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._steps = epoch, 0
        if self.guard.signum is not None:  # arrived during the previous epoch-end saves
            raise self.guard.stopped(f" after epoch {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        fault_point(f"batch:{self._epoch}:{batch}")
        self._steps = batch + 1
        if self.guard.signum is not None:
            self.backup.save_now(self._epoch, batch)
            raise self.guard.stopped(f" at epoch {self._epoch + 1}, step {batch + 1}")

    def on_test_batch_end(self, batch, logs=None):
        if self.guard.signum is not None:  # validation of an epoch whose steps all ran
            self.backup.save_now(self._epoch, max(self._steps - 1, 0))
            raise self.guard.stopped(f" while validating epoch {self._epoch + 1}")
