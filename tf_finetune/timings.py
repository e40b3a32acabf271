"""Wall seconds of a run's stages, for metrics.json's `timings` and the run summary."""

import contextlib
import os
import time


def process_seconds() -> float | None:
    """Seconds since this process started (Python start-up and imports included), or None
    where the process start time cannot be read (psutil is a declared dependency)."""
    try:
        return _linux_process_seconds()
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - an optional measurement must never fail a run
        return None


def _linux_process_seconds() -> float:
    """From /proc, to the clock tick: psutil's create_time adds the boot time, which Linux
    gives in whole seconds, so its process age is up to 1 s off."""
    with open("/proc/uptime", encoding="ascii") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/self/stat", encoding="ascii") as f:
        # Field 22, starttime, in clock ticks since boot; counted after the ")" that ends the
        # command name (which may hold spaces).
        started = int(f.read().rsplit(")", 1)[1].split()[19])
    return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))


class Timings:
    """Accumulates seconds per stage: `with timings.stage("fit"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.feature_images = 0
        self._start = time.perf_counter()
        self._startup = process_seconds()

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since this object was made."""
        return time.perf_counter() - self._start

    def as_dict(self) -> dict[str, float]:
        """Seconds per stage in the order they ran, then `total` (start-up included) and the
        feature pass's images per second when there was one."""
        out = {}
        if self._startup is not None:
            out["startup"] = round(self._startup, 2)
        out.update({name: round(s, 2) for name, s in self.seconds.items()})
        out["total"] = round((self._startup or 0.0) + time.perf_counter() - self._start, 2)
        if self.feature_images and self.seconds.get("features"):
            out["feature_images_per_second"] = round(
                self.feature_images / self.seconds["features"], 1
            )
        return out
