"""Keeps TensorFlow's C++ start-up lines off the terminal, and nothing else.

TensorFlow 2.21 logs through absl before absl is initialised, so `TF_CPP_MIN_LOG_LEVEL` and
`GLOG_minloglevel` do not silence its start-up lines (oneDNN, CUDA stubs, CPU features; twice,
once per shared library that links absl). They are written to file descriptor 2 by C++, so
only a filter on that descriptor can hold them back:

    quiet_start.begin()   # before `import tensorflow`
    ...                   # import, device start-up (the CUDA lines come with the first op)
    quiet_start.end()     # after the strategy exists: fd 2 is the terminal again

Between the two, fd 2 is a pipe read by a forked child process that writes every line to the
real stderr unchanged and in order, except lines that match `ALLOWLIST` (known start-up lines,
nothing else). A child process, not a thread: when the process dies inside TensorFlow (an
abort, a segfault), the child still reads what was written before and passes it on, since it
only stops at the end of the pipe. A partial line that waits longer than `_PARTIAL_SECONDS` (a
progress bar) is passed on as is. `end()` runs at exit too and is safe to call at any time.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import signal
import sys
import time

# Known start-up lines, matched against whole lines (without the newline). absl/glog lines look
# like "I0000 00:00:1796254670.161935    7170 port.cc:153] message"; the file decides, and for
# files that also log other things, the message too. Severity I, W or E: F (fatal) never drops.
_GLOG = rb"[IWE]\d{4} \d\d:\d\d:[\d.]+\s+\d+ (?:\S*/)?"
ALLOWLIST: tuple[re.Pattern[bytes], ...] = tuple(
    re.compile(p)
    for p in (
        # absl, printed by each copy of absl in TF's shared libraries before InitializeLog.
        rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
        rb"STDERR",
        # oneDNN notice (port.cc in TF 2.21, util.cc before).
        _GLOG + rb"(?:port|util)\.cc:\d+\] oneDNN custom operations are on\.",
        # CUDA runtime stub on machines without a GPU driver.
        _GLOG + rb"cudart_stub\.cc:\d+\] ",
        # CPU instruction notice, and its second line.
        _GLOG + rb"cpu_feature_guard\.cc:\d+\] ",
        rb"To enable the following instructions: .*rebuild TensorFlow with the appropriate "
        rb"compiler flags\.",
        # cuInit failing on a machine without a usable GPU, and what TF then prints about it.
        _GLOG + rb"(?:cuda_platform|cuda_driver)\.cc:\d+\] failed call to cuInit",
        _GLOG + rb"cuda_diagnostics\.cc:\d+\] ",
        _GLOG + rb"cuda_executor\.cc:\d+\] (?:could not open file to read NUMA node|"
        rb"successful NUMA node read from SysFS had negative value)",
        # Duplicate plugin registration (TF 2.14-2.17 wheels).
        _GLOG + rb"cuda_(?:dnn|fft|blas)\.cc:\d+\] Unable to register cu(?:DNN|FFT|BLAS) factory",
        _GLOG + rb"computation_placer\.cc:\d+\] computation placer already registered",
        # TensorRT probe.
        _GLOG + rb"py_utils\.cc:\d+\] TF-TRT Warning: Could not find TensorRT",
        # The GPU device coming up with the first op.
        _GLOG + rb"gpu_device\.cc:\d+\] Created device ",
    )
)

_PARTIAL_SECONDS = 0.05
_DRAIN_SECONDS = 5.0

_state: dict = {}  # saved: the real stderr (fd); pid: the filter process


def is_startup_line(line: bytes) -> bool:
    """Whether `line` (no trailing newline) is a known start-up line the filter drops."""
    line = line.rstrip(b"\r")
    return any(p.match(line) for p in ALLOWLIST)


def active() -> bool:
    return bool(_state)


def begin() -> bool:
    """Routes fd 2 through the filter until `end()`. Returns False when it cannot (no fd 2, no
    fork) or need not (TensorFlow already imported: its start-up lines are out)."""
    if _state or "tensorflow" in sys.modules or not hasattr(os, "fork"):
        return False
    try:
        saved = os.dup(2)
    except OSError:
        return False
    read_end, write_end = os.pipe()
    _flush_python_streams()
    try:
        pid = os.fork()
    except OSError:
        for fd in (saved, read_end, write_end):
            os.close(fd)
        return False
    if pid == 0:  # the filter process
        try:
            os.close(write_end)
            _filter(read_end, saved)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _state.update(saved=saved, pid=pid)
    atexit.register(end)
    return True


def end() -> None:
    """Gives fd 2 back to the real stderr, once the filter has passed on everything it holds."""
    if not _state:
        return
    _flush_python_streams()
    saved, pid = _state.pop("saved"), _state.pop("pid")
    os.dup2(saved, 2)  # closes our write end of the pipe: the filter reads to its end and exits
    os.close(saved)
    deadline = time.monotonic() + _DRAIN_SECONDS
    while time.monotonic() < deadline:  # a child process that inherited fd 2 keeps it open
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.005)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def _filter(read_end: int, out: int) -> None:
    """The child: copies `read_end` to `out` line by line, dropping start-up lines."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # hold no pipe of the parent's open (a caller reads its stdout to EOF)
        os.dup2(null, fd)
    low, high = sorted((read_end, out))
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, 4096)
    pending = b""  # the start of a line not yet complete
    passed_partial = False  # part of the current line is out already: the rest follows unread
    while True:
        ready, _, _ = select.select([read_end], [], [], _PARTIAL_SECONDS if pending else None)
        if not ready:  # a partial line that stays partial (a progress bar): let it out
            _write(out, pending)
            pending, passed_partial = b"", True
            continue
        chunk = os.read(read_end, 65536)
        if not chunk:
            _write(out, pending)
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = []
        for line in lines:
            if passed_partial or not is_startup_line(line):
                kept.append(line + b"\n")
            passed_partial = False
        _write(out, b"".join(kept))


def _write(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except InterruptedError:
            continue
        except OSError:  # the real stderr is gone (closed pipe): keep draining, drop the rest
            return
