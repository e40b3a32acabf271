"""What a user's terminal shows: the installed console script, run in a subprocess.

capsys sees Python's sys.stderr only; TensorFlow's C++ start-up lines go to file descriptor 2,
so these tests run the real `tf-finetune` script (with this checkout first on PYTHONPATH) and
count the lines of its stderr.
"""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from tests.images import write_class_folders
from tf_finetune import cli, config, quiet_start

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = os.path.join(os.path.dirname(sys.executable), "tf-finetune")
QUICK_SECONDS = 1.5  # generous for a busy CI machine; about 0.1 s on an idle one

# Lines TensorFlow 2.21 prints at start-up on a CPU machine (several of them twice).
SEEN_HERE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796254670.161935    7170 port.cc:153] oneDNN custom operations are on. You may "
    b"see slightly different numerical results due to floating-point round-off errors from "
    b"different computation orders. To turn them off, set the environment variable "
    b"`TF_ENABLE_ONEDNN_OPTS=0`.",
    b"I0000 00:00:1796254670.162246    7170 cudart_stub.cc:31] Could not find cuda drivers on your "
    b"machine, GPU will not be used.",
    b"I0000 00:00:1796254957.092701   10021 cpu_feature_guard.cc:227] This TensorFlow binary is "
    b"optimized to use available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    b"TensorFlow with the appropriate compiler flags.",
    b"E0000 00:00:1796254741.415022    7805 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]
# Well known from other machines and TF versions.
WELL_KNOWN = [
    b"E0000 00:00:1712345678.123456   123 cuda_dnn.cc:8310] Unable to register cuDNN factory: "
    b"Attempting to register factory for plugin cuDNN when one has already been registered",
    b"E0000 00:00:1712345678.123456   123 cuda_blas.cc:1418] Unable to register cuBLAS factory",
    b"W0000 00:00:1712345678.123456   123 computation_placer.cc:177] computation placer already "
    b"registered. Please check linkage and avoid linking the same target more than once.",
    b"W0000 00:00:1712345678.123456   123 py_utils.cc:38] TF-TRT Warning: Could not find TensorRT",
    b"I0000 00:00:1712345678.123456   123 cuda_executor.cc:1015] successful NUMA node read from "
    b"SysFS had negative value (-1), but there must be at least one NUMA node, so returning "
    b"NUMA node zero.",
    b"I1202 23:39:01.416365   140516064955264 external/local_xla/xla/stream_executor/cuda/"
    b"cuda_diagnostics.cc:135] retrieving CUDA diagnostic information for host: box",
    b"I1202 23:39:01.416365   140516 gpu_device.cc:2020] Created device /job:localhost/replica:0/"
    b"task:0/device:GPU:0 with 13742 MB memory:  -> device: 0, name: Tesla T4",
]
# Never dropped: other files, fatal lines, anything not on the list.
KEPT = [
    b"F0000 00:00:1796254670.161935    7170 port.cc:153] oneDNN custom operations are on.",
    b"W0000 00:00:1796254670.161935    7170 op_kernel.cc:1857] OP_REQUIRES failed at "
    b"whole_file_read_ops.cc:116 : NOT_FOUND: /x; No such file or directory",
    b"E0000 00:00:1796254670.161935    7170 port.cc:153] something else went wrong",
    b"W0000 00:00:1796254670.161935    7170 gpu_device.cc:2344] Cannot dlopen some GPU libraries. "
    b"Skipping registering GPU devices...",
    b"tf-finetune: error: unknown --backbone='resnet5'.",
    b"Traceback (most recent call last):",
    b"",
]


def _script() -> str:
    if not os.path.exists(SCRIPT):
        message = f"the console script {SCRIPT} is not installed (pip install -e .)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must install it.")
        pytest.skip(message)
    return SCRIPT


def _env(**extra: str) -> dict[str, str]:
    """A user's environment (no TF log variables), running this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run(argv: list[str], timeout: float = 180, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, env=_env(**extra), timeout=timeout, cwd=REPO
    )


def _startup_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if quiet_start.is_startup_line(ln.encode())]


@pytest.mark.parametrize("line", SEEN_HERE + WELL_KNOWN)
def test_known_startup_lines_are_dropped(line):
    assert quiet_start.is_startup_line(line)


@pytest.mark.parametrize("line", KEPT)
def test_everything_else_is_kept(line):
    assert not quiet_start.is_startup_line(line)


@pytest.mark.parametrize(
    "log_env", [{}, {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "3"}], ids=["plain", "env"]
)
def test_bad_backbone_prints_exactly_one_line(log_env):
    proc = _run([_script(), "train", "--backbone=resnet5"], **log_env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "tf-finetune: error: unknown --backbone='resnet5'. Did you mean: resnet50, resnet152, "
        "resnet50_v2, resnet101, resnet152_v2? Run 'tf-finetune backbones' for the full list, "
        "or pass a TF Hub handle."
    ], proc.stderr


@pytest.mark.slow
def test_an_error_after_tensorflow_started_is_one_line_too(tmp_path):
    # evaluate imports TensorFlow before it finds that the run has no checkpoint.
    proc = _run([_script(), "evaluate", f"--model_dir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"tf-finetune: error: no checkpoint at {tmp_path}/checkpoints/best.weights.h5: train "
        "first, or point --model_dir at a run."
    ], proc.stderr


@pytest.mark.slow
def test_verbosity_shows_the_startup_lines(tmp_path):
    proc = _run([_script(), "evaluate", f"--model_dir={tmp_path}", "--verbosity=1"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert _startup_lines(proc.stderr), proc.stderr  # TF 2.21 prints them on every machine
    assert lines[-1].startswith("tf-finetune: error: no checkpoint at")


@pytest.mark.slow
def test_lines_written_during_start_up_pass_unchanged_and_in_order(tmp_path):
    # -X importtime: Python writes one line per import to fd 2 while TensorFlow is imported.
    argv = [sys.executable, "-X", "importtime", _script(), "evaluate", f"--model_dir={tmp_path}"]
    proc = _run(argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert not _startup_lines(proc.stderr), proc.stderr
    assert any(re.fullmatch(r"import time:.*\|\s+tensorflow", ln) for ln in lines), lines[-5:]
    assert all(ln.startswith("import time:") for ln in lines[:-1]), lines[:-1][-5:]
    assert lines[-1].startswith("tf-finetune: error: no checkpoint at")


_WINDOW = """
import os, sys
from tf_finetune import quiet_start
assert quiet_start.begin()
os.write(2, b"before import\\n")
import tensorflow as tf
os.write(2, b"E0000 00:00:1.5 7 some_kernel.cc:12] a real error from TF\\n")
print("python stderr", file=sys.stderr)
tf.config.list_physical_devices()  # the CUDA start-up line comes here
os.write(2, b"partial line, then ")
{ending}
"""


@pytest.mark.slow
def test_filter_window_keeps_real_errors_and_python_stderr():
    code = _WINDOW.format(ending="quiet_start.end()\nos.write(2, b'after\\n')")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "before import",
        "E0000 00:00:1.5 7 some_kernel.cc:12] a real error from TF",
        "python stderr",
        "partial line, then after",
    ]


@pytest.mark.slow
def test_a_crash_inside_the_window_loses_nothing():
    code = _WINDOW.format(ending="os.write(2, b'the last words\\n')\nos.abort()")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        "before import",
        "E0000 00:00:1.5 7 some_kernel.cc:12] a real error from TF",
        "python stderr",
        "partial line, then the last words",
    ]


@pytest.mark.slow
def test_an_exception_inside_the_window_shows_its_traceback():
    code = _WINDOW.format(ending="raise SystemError('boom')")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 1
    assert not _startup_lines(proc.stderr)
    assert "Traceback (most recent call last):" in proc.stderr
    assert proc.stderr.rstrip().endswith("SystemError: boom"), proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["backbones"], ["train", "--help"]])
def test_help_and_backbones_answer_at_once(argv):
    script = _script()
    start = time.monotonic()
    proc = _run([script, *argv])
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert seconds < QUICK_SECONDS, f"{argv}: {seconds:.2f} s"


_IMPORTS_AFTER = """
import sys
from tf_finetune import cli
code = cli.main({argv!r})
print(code, sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
"""


def _imports_after(argv: list[str]) -> str:
    proc = _run([sys.executable, "-c", _IMPORTS_AFTER.format(argv=argv)], timeout=120)
    return proc.stdout.splitlines()[-1]


def test_backbones_does_not_import_tensorflow():
    assert _imports_after(["backbones"]) == "0 []"


def test_bad_flags_are_answered_before_tensorflow_is_imported():
    assert _imports_after(["train", "--epochs=0"]) == "2 []"


@pytest.mark.slow
def test_a_short_run_shows_no_startup_line(tmp_path):
    data = write_class_folders(tmp_path / "photos", num_classes=2, per_class=4)
    proc = _run(
        [
            _script(),
            "train",
            f"--data={data}",
            "--backbone=digits_cnn",
            "--weights=none",
            "--epochs=1",
            "--batch_size=4",
            "--validation_percent=25",
            f"--model_dir={tmp_path / 'run'}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert not _startup_lines(proc.stderr), proc.stderr
    assert "Strategy _DefaultDistributionStrategy" in proc.stderr  # our own log lines pass
    assert " train / " in proc.stdout and " test images, " in proc.stdout


def test_summary_counts_texts_for_text_data(capsys, tmp_path):
    table = tmp_path / "reviews.csv"
    table.write_text("text,label\ngreat,pos\nawful,neg\n")
    metrics = {
        "class_names": ["neg", "pos"],
        "train_images": 137,
        "val_images": 23,
        "test_images": 0,
        "skipped_files": [],
        "wall_time_seconds": 3.0,
        "export_path": "x",
        "val_accuracy": 0.5,
        "val_loss": 0.7,
    }
    cli._print_train_summary(config.Config(data=str(table), backbone="x"), metrics)
    assert "2 classes, 137 train / 23 val / 0 test texts, " in capsys.readouterr().out
    cli._print_train_summary(config.Config(data=str(tmp_path), backbone="x"), metrics)
    assert "137 train / 23 val / 0 test images, " in capsys.readouterr().out


_AFTER_TF_COMMAND = """
import gc, sys
from tf_finetune import cli
code = cli.main(["evaluate", "--model_dir={run}"])  # imports TensorFlow, then fails
print(code, "sklearn" in sys.modules, gc.get_freeze_count() > 100_000, gc.get_threshold()[0])
import sklearn.base  # importable as usual afterwards
from sklearn.datasets import load_digits
print(load_digits().images.shape)
"""


@pytest.mark.slow
def test_a_command_imports_tensorflow_without_sklearn_and_freezes_it(tmp_path):
    proc = _run([sys.executable, "-c", _AFTER_TF_COMMAND.format(run=tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["2 False True 10000", "(1797, 8, 8)"], proc.stdout


def test_startup_seconds_are_the_process_age_to_the_clock_tick():
    # psutil's create_time adds Linux's boot time, which is in whole seconds: up to 1 s off.
    code = "import time; time.sleep(0.3); from tf_finetune import timings; print(timings.process_seconds())"
    start = time.monotonic()
    proc = _run([sys.executable, "-c", code])
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    age = float(proc.stdout.split()[-1])
    assert 0.3 <= age <= wall + 0.02, (age, wall)


def test_a_multi_label_summary_shows_map_and_the_files_the_run_kept(capsys, tmp_path):
    metrics = {
        "class_names": ["red", "green", "blue"],
        "train_images": 40,
        "val_images": 10,
        "test_images": 10,
        "skipped_files": [],
        "wall_time_seconds": 3.0,
        "export_path": "x",
        "val_accuracy": 0.3,  # exact-match share: not the run's score
        "val_loss": 0.4,
        "val_map": 0.812,
        "test_accuracy": 0.2,
        "test_loss": 0.5,
        "test_map": 0.798,
    }
    run = config.Config(
        data=str(tmp_path), backbone="x", task="multi_label", model_dir=str(tmp_path)
    )
    cli._print_train_summary(run, metrics)
    out = capsys.readouterr().out
    assert "mAP" in out.splitlines()[1] and "0.812" in out and "0.798" in out
    assert "0.300" not in out and "(metrics.json, flags.cfg)" in out  # no logs/ written
    assert "frozen x + head [test]" in out and "fine-tuned" not in out  # --unfreeze=0
    (tmp_path / "logs").mkdir()
    cli._print_train_summary(
        config.Config(data=str(tmp_path), backbone="x", model_dir=str(tmp_path)), metrics
    )
    out = capsys.readouterr().out
    assert "accuracy" in out.splitlines()[1] and "0.300" in out and "flags.cfg, logs/)" in out
    tuned = config.Config(data=str(tmp_path), backbone="x", model_dir=str(tmp_path), unfreeze="all")
    cli._print_train_summary(tuned, metrics)
    assert "fine-tuned x [val]" in capsys.readouterr().out
