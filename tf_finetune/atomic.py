"""One way to write a file: a reader, or a rerun after a kill, sees the old file or the new one,
never half of one.

The new content goes to `.tmp-<pid>-<name>` beside the target (same filesystem, and the same
suffix, which Keras and matplotlib read the format from), is flushed to disk, and is renamed over
the target. A failed write removes its temporary file; running out of disk space becomes one line.
"""

import contextlib
import errno
import json
import os
from collections.abc import Callable

from tf_finetune.errors import UserError


def temporary_path(path: str) -> str:
    """Where `write` puts the new content of `path` before the rename."""
    root, name = os.path.split(path)
    return os.path.join(root, f".tmp-{os.getpid()}-{name}")


def is_disk_full(error: BaseException) -> bool:
    """True for 'no space left' / quota errors, whatever layer (os, h5py, TensorFlow) raised it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left on device" in text or "quota exceeded" in text


def disk_full_error(what: str, path: str) -> UserError:
    return UserError(
        f"disk full while writing the {what} to {path}; the previous {what} is intact. "
        "Free some space and rerun the same command: it resumes from the last backup."
    )


def remove(path: str) -> None:
    """Deletes a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str, writer: Callable[[str], object], what: str | None = None) -> None:
    """Calls `writer(temporary path)`, flushes the file to disk and renames it to `path`.

    Args:
      path: the file to (re)place.
      writer: writes the whole new content to the path it is given.
      what: names the file in the one-line error when the disk is full (None: re-raise).
    """
    tmp = temporary_path(path)
    try:
        writer(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        if what and isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(what, path) from None
        raise


def write_text(path: str, text: str, what: str | None = None) -> None:
    def writer(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write(path, writer, what)


def write_bytes(path: str, content: bytes, what: str | None = None) -> None:
    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(content)

    write(path, writer, what)


def write_json(path: str, payload, what: str | None = None) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", what)


def save_weights(model, path: str, what: str | None = None) -> None:
    """`model.save_weights(path)` (a `.weights.h5` file), atomically."""
    write(path, model.save_weights, what)


# zlib level 1, not PIL's default 6: a 16-photo mistakes grid (1040x1210 px) saves in ~0.09 s
# instead of ~0.25 s on 2 cores, for a file about the same size (photos barely compress).
PNG_COMPRESS_LEVEL = 1


def save_figure(figure, path: str, dpi: int = 100) -> str:
    """A matplotlib `figure` as a PNG at `path`, atomically; returns `path`."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    write(
        path,
        lambda tmp: figure.savefig(
            tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL}
        ),
    )
    return path
