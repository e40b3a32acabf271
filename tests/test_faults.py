"""Faults with nothing lost: kills, signals, the run lock, NaN loss, disk full, best-so-far."""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import history_epochs, tiny, tiny_flags
from tf_finetune import cli, export, faults, input_pipeline, rundir, train
from tf_finetune.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backup(run) -> dict:
    return faults.read_backup(os.path.join(run, "backup"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _At(keras.callbacks.Callback):
    """Runs `action` after step `step` of epoch `epoch` (None: its first batch hook)."""

    def __init__(self, epoch, step, action):
        super().__init__()
        self.epoch, self.step, self.action, self._epoch = epoch, step, action, -1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == self.epoch and self.step in (batch, None):
            self.action()
            self.epoch = None


# ----------------------------------------------------------------------------- lock
def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path, capsys):
    lock_path = tmp_path / faults.LOCK_FILE
    # A live holder on this host (this very process stands in for "another run").
    with faults.RunLock(str(tmp_path)):
        record = json.loads(lock_path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        code = cli.main(["train", "--data=" + str(tmp_path), f"--model_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert code == 2 and "is in use by another run" in err and f"pid {os.getpid()}" in err
        assert len(err.strip().splitlines()) == 1
    assert not lock_path.exists()  # released

    # A SIGKILLed run's lock: its pid is gone, so the next run takes it over.
    lock_path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with faults.RunLock(str(tmp_path)):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    # A reused pid (alive, but started at another time) is not the owner either.
    lock_path.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "1"})
    )
    with faults.RunLock(str(tmp_path)):
        pass
    # Another host cannot be checked: refused, with how to clear it.
    lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "today"}))
    with pytest.raises(UserError, match="on elsewhere.*delete .*run.lock"):
        faults.RunLock(str(tmp_path)).acquire()


# ----------------------------------------------------------------------------- signals
def _sentinel(signum, frame):  # stands for whatever handler the caller had installed
    raise AssertionError("the run's own handler should have caught this signal")


@contextlib.contextmanager
def _handler_in_place(signum, handler):
    """Installs `handler` for the block, as the caller of a run might have; restores after."""
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@pytest.mark.slow
def test_sigint_mid_epoch_saves_a_backup_and_the_rerun_resumes(folder, tmp_path):
    config = tiny(folder, tmp_path)
    # Sent after step 2 (once our callback has looked): step 3 runs, then the run stops.
    interrupt = _At(1, 1, lambda: os.kill(os.getpid(), signal.SIGINT))
    with _handler_in_place(signal.SIGINT, _sentinel):
        with pytest.raises(faults.Stopped, match="SIGINT at epoch 2, step 3; rerun") as stopped:
            train.train_and_evaluate(config, extra_callbacks=(interrupt,))
        assert signal.getsignal(signal.SIGINT) is _sentinel  # the caller's handler is back
    assert stopped.value.exit_code == 130
    meta = _backup(tmp_path)
    assert (meta["epoch"], meta["batch"]) == (1, 3)  # epoch 2 (index 1) was not finished
    assert not (tmp_path / "export").exists() and not (tmp_path / faults.LOCK_FILE).exists()
    assert history_epochs(tmp_path) == [0]

    # The rerun as a background job (`&`) starts, where SIGINT is ignored: it stays ignored.
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    with _handler_in_place(signal.SIGINT, signal.SIG_IGN):
        metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert seen == [1, 2] and metrics["epochs"] == 3
    assert history_epochs(tmp_path) == [0, 1, 2]
    assert not (tmp_path / "backup").exists()


@pytest.mark.slow
def test_head_phase_on_cached_features_resumes_too(folder, tmp_path):
    """A frozen backbone trains its head on cached features, with its own backup folder."""
    config = tiny(folder, tmp_path, unfreeze="0", cache="memory", epochs=3, head_solver="fit")
    # The head runs an epoch's steps in one execution, so batch hooks run once per epoch: the
    # signal sent at the end of epoch 2's steps stops the run while it validates that epoch.
    interrupt = _At(1, None, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(faults.Stopped, match="SIGTERM while validating epoch 2"):
        train.train_and_evaluate(config, extra_callbacks=(interrupt,))
    assert faults.read_backup(str(tmp_path / "backup_head"))["epoch"] == 1
    assert (tmp_path / "checkpoints" / "head_best.json").exists()
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
    assert seen == [1, 2] and metrics["epochs"] == 3
    assert not (tmp_path / "backup_head").exists()


@pytest.mark.slow
def test_sigterm_in_phase_two_resumes_there_and_keeps_the_best_of_phase_one(folder, tmp_path):
    """Two-phase runs: each phase backs up to backup/phase<i>; best.json spans the phases."""
    from tf_finetune import phases

    config = tiny(
        folder, tmp_path, epochs=4, warmup_epochs=2, unfreeze="1", cache="memory", head_solver="fit"
    )
    # Sent after step 1 (once our callback has looked): step 2 runs, then the run stops.
    interrupt = _At(2, 0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(faults.Stopped, match="SIGTERM at epoch 3, step 2"):
        train.train_and_evaluate(config, extra_callbacks=(interrupt,))
    assert phases.load_state(str(tmp_path)).phase == 2
    meta = faults.read_backup(phases.backup_dir(str(tmp_path), 2))
    assert (meta["epoch"], meta["batch"]) == (2, 2)  # phase 2's first epoch reruns
    # Phase 1 trained the head on cached features; its best is the full model's best now.
    head_best = json.loads((tmp_path / "checkpoints" / "head_best.json").read_text())
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert best["best"] == head_best["best"] and best["epoch"] <= 1
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
    assert seen == [2, 3] and metrics["epochs"] == 4
    assert history_epochs(tmp_path) == [0, 1, 2, 3]
    final = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert final["best"] <= best["best"]  # only a better phase-2 epoch replaced it
    assert not (tmp_path / "backup").exists() and not (tmp_path / "backup_head").exists()


def test_cli_reports_a_signal_in_one_line_with_exit_128_plus_signal(folder, tmp_path, capsys):
    guard = faults.SignalGuard(str(tmp_path / "backup"))
    guard.signum = signal.SIGTERM
    assert guard.stopped("").exit_code == 143
    # Outside fit (here: while loading data) the signal stops at once.
    argv = ["train", *tiny_flags(folder, tmp_path)]
    real = input_pipeline.load_data

    def load_then_term(config, folder=None, **options):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(config, folder, **options)

    try:
        input_pipeline.load_data = load_then_term
        code = cli.main(argv)
    finally:
        input_pipeline.load_data = real
    err = capsys.readouterr().err
    assert code == 143
    assert err.strip().splitlines() == [
        f"tf-finetune: error: stopped by SIGTERM; rerun the same command to resume from the "
        f"backup in {tmp_path}."
    ]


def test_a_second_signal_during_fit_stops_at_once_and_the_handlers_in_place_come_back(tmp_path):
    with (
        _handler_in_place(signal.SIGTERM, _sentinel),
        _handler_in_place(signal.SIGINT, signal.SIG_IGN),
    ):
        with faults.SignalGuard(str(tmp_path)) as guard:
            guard.deferred = True  # as inside fit
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.signum == signal.SIGTERM  # noted; the step goes on
            with pytest.raises(faults.Stopped, match="SIGINT before the current step finished"):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is _sentinel
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# ----------------------------------------------------------------------------- NaN
@pytest.mark.slow
def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_exports_nothing(
    folder, tmp_path, capsys
):
    run = tmp_path / "run"
    config = tiny(folder, run, learning_rate=0.01)
    best = run / rundir.BEST_WEIGHTS

    def plant_nan(model):
        # As a diverging optimizer would: one weight becomes NaN mid-epoch.
        kernel = model.get_layer("predictions").kernel
        kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))

    class Plant(_At):
        def __init__(self):
            super().__init__(1, 2, lambda: plant_nan(self.model))

    with pytest.raises(faults.NonFiniteLoss) as raised:
        train.train_and_evaluate(config, extra_callbacks=(Plant(),))
    message = str(raised.value)
    assert "loss became nan at epoch 2, step 4" in message
    assert f"the last good checkpoint is {best}" in message and "epoch 1)" in message
    assert "nothing exported" in message and raised.value.exit_code == 1
    assert not (run / "export").exists()
    with h5py.File(best) as f:  # the good weights, not NaN
        arrays = []
        f.visititems(lambda n, o: arrays.append(o[()]) if isinstance(o, h5py.Dataset) else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")
    assert _backup(run)["epoch"] == 1  # the backup holds the last good epoch too

    # Through the CLI, with a learning rate that really diverges: exit 1, one line.
    flags = ["--unfreeze=all", "--learning_rate=1e30", "--optimizer=sgd", "--epochs=2"]
    code = cli.main(["train", *tiny_flags(folder, tmp_path / "cli", *flags)])
    err = capsys.readouterr().err
    assert code == 1 and "became" in err and "Lower --learning_rate" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli" / "export").exists()


# ----------------------------------------------------------------------------- best so far
@pytest.mark.slow
def test_best_so_far_survives_a_resume(folder, tmp_path):
    """keras-team/keras#17012: a stock ModelCheckpoint would save the first resumed epoch."""
    config = tiny(folder, tmp_path, epochs=4)

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, extra_callbacks=(_At(2, 0, crash),))
    state = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    best_file = (tmp_path / rundir.BEST_WEIGHTS).read_bytes()
    assert state["monitor"] == "val_loss" and state["epoch"] in (0, 1)

    class Spoil(keras.callbacks.Callback):
        """Resumed epochs get much worse weights: none may replace the best checkpoint."""

        def on_train_batch_end(self, batch, logs=None):
            for w in self.model.get_layer("predictions").trainable_weights:
                w.assign(np.random.default_rng(batch).normal(0, 5, w.shape).astype("float32"))

    metrics = train.train_and_evaluate(config, extra_callbacks=(Spoil(),))
    assert (tmp_path / rundir.BEST_WEIGHTS).read_bytes() == best_file
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text()) == state
    assert metrics["val_loss"] == pytest.approx(state["best"], rel=1e-4)


# ----------------------------------------------------------------------------- disk full
def _disk_full_on_save(monkeypatch, folder: str, nth: int):
    """The `nth` save_weights into `folder` writes half a file, then fails with ENOSPC."""
    real = keras.Model.save_weights
    calls = []

    def save_weights(self, path, *args, **kwargs):
        if f"{os.sep}{folder}{os.sep}" in str(path):
            calls.append(path)
            if len(calls) == nth:
                with open(path, "wb") as f:
                    f.write(b"\x89HDF half")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)
    return real


@pytest.mark.slow
def test_disk_full_during_backup_keeps_the_previous_backup(folder, tmp_path, monkeypatch):
    config = tiny(folder, tmp_path)
    real = _disk_full_on_save(monkeypatch, "backup", 2)  # the second epoch's backup
    with pytest.raises(UserError, match=r"disk full while writing the backup .*previous backup"):
        train.train_and_evaluate(config)
    meta = _backup(tmp_path)
    assert meta["epoch"] == 1
    assert sorted(os.listdir(tmp_path / "backup")) == sorted(
        [meta["weights"], faults.BACKUP_METADATA]
    )
    monkeypatch.setattr(keras.Model, "save_weights", real)
    assert train.train_and_evaluate(config)["epochs"] == 3


def test_disk_full_during_checkpoint_keeps_the_previous_best(folder, tmp_path, monkeypatch):
    config = tiny(folder, tmp_path)
    _disk_full_on_save(monkeypatch, "checkpoints", 2)
    with pytest.raises(UserError, match="disk full while writing the best checkpoint"):
        train.train_and_evaluate(config, extra_callbacks=())
    assert os.listdir(tmp_path / "checkpoints") == ["best.json", "best.weights.h5"] or sorted(
        os.listdir(tmp_path / "checkpoints")
    ) == ["best.json", "best.weights.h5"]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["epoch"] == 0


@pytest.mark.slow
def test_disk_full_during_export_leaves_no_version_and_the_rerun_exports(
    folder, tmp_path, monkeypatch
):
    config = tiny(folder, tmp_path, epochs=2)
    real = tf.saved_model.save  # every export (image or text) is written by it

    def save(obj, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save)
    with pytest.raises(UserError, match="disk full while writing the export"):
        train.train_and_evaluate(config)
    assert os.listdir(tmp_path / "export") == []  # no version, no temporary folder
    assert _backup(tmp_path)["epoch"] == 2  # training is not lost
    monkeypatch.setattr(tf.saved_model, "save", real)
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    metrics = train.train_and_evaluate(config, extra_callbacks=(record,))
    assert seen == [] and metrics["epochs"] == 2  # nothing left to train: evaluate and export
    assert metrics["export_path"] == str(tmp_path / "export" / "1")
    assert "loss" in metrics  # from history.csv


def test_stale_export_temporaries_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".tmp-3-{_dead_pid()}"
    live = tmp_path / f".tmp-3-{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "saved_model.pb").write_bytes(b"half")
    assert export.remove_stale_temporaries(str(tmp_path)) == [dead.name]
    assert live.exists() and export.next_version(str(tmp_path)) == 1


# ----------------------------------------------------------------------------- real kills
def _run_cli(args, fault=None, timeout=240):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    env.pop(faults.FAULT_ENV, None)
    if fault:
        env[faults.FAULT_ENV] = fault
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_finetune", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _assert_consistent(run):
    """What a kill may leave: a committed backup whose weights load, no visible half export."""
    meta = _backup(run)
    if meta:
        with h5py.File(os.path.join(run, "backup", meta["weights"])) as f:
            assert len(f.keys()) > 0
    export_dir = os.path.join(run, "export")
    for name in os.listdir(export_dir) if os.path.isdir(export_dir) else []:
        assert name.startswith(".tmp-") or os.path.exists(
            os.path.join(export_dir, name, "saved_model.pb")
        )
    return meta


@pytest.mark.slow
def test_sigkill_and_sigterm_at_every_stage_then_rerun_finishes(folder, tmp_path):
    """One run killed six ways in turn; each rerun continues from the last saved state."""
    run = tmp_path / "run"
    args = tiny_flags(folder, run, "--epochs=4", "--batch_size=8", "--unfreeze=all")

    # 1. SIGKILL between writing the first best checkpoint and renaming it into place.
    code, _, err = _run_cli(args, "checkpoint:0=SIGKILL")
    assert code == -signal.SIGKILL, err[-2000:]
    assert _assert_consistent(run) is None and (run / faults.LOCK_FILE).exists()
    assert [n for n in os.listdir(run / "checkpoints") if not n.startswith(".tmp-")] == []

    # 2. SIGKILL mid-epoch (epoch index 1, after step 3): the stale lock is taken over, the
    # checkpoint's temporary file removed; the next run resumes at epoch 1.
    code, _, err = _run_cli(args, "batch:1:2=SIGKILL")
    assert code == -signal.SIGKILL, err[-2000:]
    assert "Taking over the stale lock" in err
    assert _assert_consistent(run)["epoch"] == 1
    assert os.listdir(run / "checkpoints") == ["best.json", "best.weights.h5"] or sorted(
        os.listdir(run / "checkpoints")
    ) == ["best.json", "best.weights.h5"]

    # 3. SIGKILL between writing epoch 1's backup weights and committing it.
    code, _, err = _run_cli(args, "backup:2=SIGKILL")
    assert code == -signal.SIGKILL, err[-2000:]
    assert _assert_consistent(run)["epoch"] == 1  # the uncommitted backup does not count

    # 4. SIGTERM (Kubernetes preemption) mid-epoch: backup after the step, exit 143.
    code, _, err = _run_cli(args, "batch:2:1=SIGTERM")
    assert code == 143, err[-2000:]
    assert "stopped by SIGTERM at epoch 3, step 2; rerun the same command to resume" in err
    meta = _assert_consistent(run)
    assert (meta["epoch"], meta["batch"]) == (2, 2)
    assert not (run / faults.LOCK_FILE).exists()

    # 5. SIGKILL during the export, after training finished: no version is visible.
    code, _, err = _run_cli(args, "export=SIGKILL")
    assert code == -signal.SIGKILL, err[-2000:]
    assert _assert_consistent(run)["epoch"] == 4
    leftovers = os.listdir(run / "export")
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-1-")

    # 6. The rerun trains nothing more, exports version 1 and cleans everything up.
    code, out, err = _run_cli(args)
    assert code == 0, err[-3000:]
    assert "Removed unfinished export" in err
    assert sorted(os.listdir(run / "export")) == ["1"]
    assert not (run / "backup").exists() and not (run / faults.LOCK_FILE).exists()
    assert history_epochs(run) == [0, 1, 2, 3]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and metrics["val_accuracy"] > 0.6
