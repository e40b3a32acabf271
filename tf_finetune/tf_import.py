"""How a command's process imports and keeps TensorFlow: without scikit-learn, and frozen for
Python's cyclic garbage collector.

`import tensorflow` loads Keras 3 (for its optimizer registry), and Keras 3 imports
scikit-learn, with much of SciPy, only to define `keras.wrappers`' scikit-learn estimators:
~0.7 s of a ~4.5 s start-up on 2 cores, in every command, although tf-finetune never uses
those wrappers. `defer_sklearn()` makes `import sklearn` fail while the `keras` package is
being imported (Keras catches that and leaves its wrappers without scikit-learn); before and
after, it imports as usual, for the code that uses it (the offline default's digits,
keras-tuner's Bayesian tuner). Whichever module imports TensorFlow first, it applies.

Once imported, TensorFlow and Keras are ~0.6 M objects that live as long as the process. A
full collection of Python's cyclic GC walks every one of them (~0.2 s on 2 cores), and
tracing, building and saving graphs allocate enough to trigger such collections again and
again: `freeze()` moves everything allocated so far out of the collector's sight (it is still
freed by reference counting). The command line freezes once TensorFlow is in (its config is
resolved) and again before exit, so the interpreter's exit (which collects everything once
more) does not walk the graphs it is about to drop. `collect_less()` raises the youngest
generation's threshold from 700 to GEN0_THRESHOLD allocations, so the graphs a run builds
after the freeze are walked a few times, not dozens.

Measured on a head-only run of 1,400 photos on 2 cores (the `third` of scripts/benchmark.py),
with gc.callbacks: the collector's time 1.2 -> 0.8 s (freeze) -> 0.26 s (threshold), the
whole run ~11.4 -> ~9.7 s (this module as a whole, 2 runs each, interleaved); peak RSS the
same (1.05 GB).

Only the command line calls these; a library user's `import tensorflow` is left alone.
"""

from __future__ import annotations

import gc
import importlib.abc
import sys

GEN0_THRESHOLD = 10_000  # Python's default is 700 (3.13 raised it to 2,000)

# Imported by `import keras` and used by nothing tf-finetune runs through Keras.
DEFERRED = ("sklearn",)


class _DeferWhileKerasImports(importlib.abc.MetaPathFinder):
    """Refuses DEFERRED modules while the `keras` package is being imported."""

    def find_spec(self, name, path=None, target=None):
        if name in DEFERRED and _keras_importing():
            raise ModuleNotFoundError(f"{name} is deferred while keras imports", name=name)
        return None  # the other finders decide


def _keras_importing() -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and getattr(keras.__spec__, "_initializing", False)


def defer_sklearn() -> bool:
    """Installs the deferral for this process. False (and nothing done) when Keras or
    scikit-learn is imported already, or the deferral is installed."""
    if "keras" in sys.modules or any(name in sys.modules for name in DEFERRED):
        return False
    if any(isinstance(f, _DeferWhileKerasImports) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _DeferWhileKerasImports())
    return True


def collect_less() -> None:
    """Collects the youngest generation every GEN0_THRESHOLD allocations, not every 700."""
    first, second, third = gc.get_threshold()
    gc.set_threshold(max(GEN0_THRESHOLD, first), second, third)


def freeze() -> None:
    """Moves every object allocated so far out of the cyclic GC's collections."""
    gc.freeze()
