"""Pure helpers shared by the tests: a tiny run's config, crash/record callbacks, a fresh
interpreter for export checks, free ports. Fixtures live in conftest.py."""

import csv
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import keras

from tf_finetune.config import Config
from tf_finetune.resolve import resolve

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny(folder, model_dir, **overrides) -> Config:
    """A resolved Config for a run of seconds: digits_cnn from random weights at 16 px.

    The whole backbone trains (`unfreeze=all`) so three epochs learn the solid colours of
    `write_class_folders`; pass `unfreeze="0"` for a frozen backbone (the feature-cache path).
    """
    values = dict(
        data=str(folder),
        backbone="digits_cnn",
        weights="none",
        image_size=16,
        epochs=3,
        batch_size=8,
        learning_rate=0.01,
        unfreeze="all",
        model_dir=str(model_dir),
    )
    values.update(overrides)
    return resolve(Config(**values))


def tiny_flags(folder, model_dir, *flags: str) -> list[str]:
    """The command-line form of a tiny run (digits_cnn, random weights, 16 px), plus `flags`."""
    return [
        f"--data={folder}",
        "--backbone=digits_cnn",
        "--weights=none",
        "--image_size=16",
        f"--model_dir={model_dir}",
        *flags,
    ]


def train_error(capsys, *argv) -> str:
    """The stderr of `tf-finetune train ARGV`, checked to be one line, exit 2, no traceback."""
    from tf_finetune import cli

    code = cli.main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def history_epochs(run_dir) -> list[int]:
    """The epoch column of a run's history.csv."""
    with open(os.path.join(run_dir, "history.csv")) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


class Crash(keras.callbacks.Callback):
    """A kill (KeyboardInterrupt) at the end of `epoch` (its backup written) or at its start."""

    def __init__(self, epoch: int = 0, at_begin: bool = False):
        super().__init__()
        self.epoch, self.at_begin = epoch, at_begin

    def on_epoch_begin(self, epoch, logs=None):
        if self.at_begin and epoch == self.epoch:
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch, logs=None):
        if not self.at_begin and epoch == self.epoch:
            raise KeyboardInterrupt


class Epochs(keras.callbacks.Callback):
    """Records the epochs that fit runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def run_python(script: str, *args, cwd="/", import_ours: bool = False, timeout: int = 300):
    """Runs `script` in a fresh interpreter; returns the JSON it prints after `RESULT `.

    By default from `/` with nothing of ours on the path: what TF Serving sees of an export.
    `import_ours=True` puts the repository on PYTHONPATH for a script that imports our code.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if import_ours:
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(cwd),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


def free_ports(n: int) -> list[int]:
    """`n` distinct localhost ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
