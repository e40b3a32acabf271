"""Multi-worker (MultiWorkerMirroredStrategy) training with Keras 3: tf_finetune.multiworker.

The cluster tests (marked slow) launch 2 worker processes (tests/mw_worker.py) on free
localhost ports. Every process is bounded: output goes to files (no pipe can fill up and stall a worker
mid-collective), each run has a deadline, and leftovers are killed in a finally.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import free_ports
from tf_finetune import multiworker as mw
from tf_finetune.errors import UserError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mw_worker.py"
RUN_TIMEOUT = 150  # seconds for a whole 2-worker run; a normal one takes ~10 s


def run_cluster(model_dir, result_dir, log_dir, tmpdir, *args, timeout=RUN_TIMEOUT):
    """Run 2 workers to completion; return [(returncode, log text)] for worker 0, 1."""
    for d in (result_dir, log_dir, tmpdir):
        os.makedirs(d, exist_ok=True)
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, logs = [], []
    try:
        for i in range(2):
            env = dict(os.environ)
            env.update(
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                TF_CPP_MIN_LOG_LEVEL="2",
                TMPDIR=str(tmpdir),  # where non-chief scratch dirs go
            )
            log = open(os.path.join(log_dir, f"worker{i}.log"), "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(model_dir), str(result_dir), *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=str(HERE.parent),
                )
            )
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        timed_out = [p.pid for p in procs if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    out = []
    for i, p in enumerate(procs):
        text = Path(log_dir, f"worker{i}.log").read_text(errors="replace")
        out.append((p.returncode, text))
    assert not timed_out, f"workers did not finish within {timeout}s:\n" + "\n".join(
        t[-3000:] for _, t in out
    )
    return out


def assert_ok(results):
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"worker {i} exited {rc}:\n{text[-4000:]}"


def load_result(result_dir, name):
    with open(os.path.join(result_dir, f"{name}.json")) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(result_dir, f"{name}.npz")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mw")
    model_dir = root / "model"
    results = run_cluster(model_dir, root / "res", root / "logs", root / "tmp")
    assert_ok(results)
    return {
        "root": root,
        "model_dir": model_dir,
        "tmp": root / "tmp",
        "w0": load_result(root / "res", "worker0"),
        "w1": load_result(root / "res", "worker1"),
    }


# --- 2-worker training with the workarounds --------------------------------------------


@pytest.mark.slow  # a 2-process cluster
def test_two_workers_train_to_identical_changed_weights(trained):
    (m0, a0), (m1, a1) = trained["w0"], trained["w1"]
    assert m0["num_replicas"] == m1["num_replicas"] == 2
    finals = sorted(k for k in a0 if k.startswith("final"))
    assert len(finals) == 4
    for k in finals:
        np.testing.assert_allclose(a0[k], a1[k], rtol=0, atol=1e-7)
        assert not np.allclose(a0[k], a0["init" + k[5:]]), f"{k} did not change"
    assert m0["loss"] == m1["loss"] and len(m0["loss"]) == 2
    assert m0["eval"] == m1["eval"]


@pytest.mark.slow  # a 2-process cluster
def test_predict_under_multiworker_matches_direct_call(trained):
    for _, arrays in (trained["w0"], trained["w1"]):
        assert arrays["pred"].shape == (32, 3)
        np.testing.assert_allclose(arrays["pred"], arrays["direct"], atol=1e-5)


@pytest.mark.slow  # a 2-process cluster
def test_only_chief_writes_model_dir(trained):
    (m0, _), (m1, _) = trained["w0"], trained["w1"]
    model_dir = str(trained["model_dir"])
    assert m0["is_chief"] and not m1["is_chief"]
    assert m0["out_dir"] == model_dir
    assert not os.path.abspath(m1["out_dir"]).startswith(os.path.abspath(model_dir))
    # Backup written each epoch by both, each into its own dir; removed at train end.
    for meta in (m0, m1):
        assert meta["backup_seen"] == {
            "0": ["latest.weights.h5", "training_metadata.json"],
            "1": ["latest.weights.h5", "training_metadata.json"],
        }
    assert m1["listing"] == ["export", "written_by_worker1"]
    assert sorted(os.listdir(model_dir)) == ["export", "written_by_worker0"]
    assert not os.path.exists(m1["out_dir"]), "non-chief scratch dir was not deleted"
    assert os.listdir(trained["tmp"]) == []


@pytest.mark.slow  # a 2-process cluster
def test_chief_export_loads_and_serves(trained):
    import tensorflow as tf

    _, a0 = trained["w0"]
    loaded = tf.saved_model.load(str(trained["model_dir"] / "export"))
    fn = loaded.signatures["serving_default"]
    x = np.random.default_rng(0).normal(size=(64, 16, 16, 1)).astype("float32")[:32]
    (out,) = fn(tf.constant(x)).values()
    np.testing.assert_allclose(out.numpy(), a0["direct"], atol=1e-5)


# --- the bugs the workarounds fix (keras-team/keras#20585) ------------------------------


@pytest.mark.slow  # 2-process clusters
@pytest.mark.parametrize(
    "workarounds, message",
    [
        # Bug 1: _maybe_symbolic_build -> strategy.reduce on a PerReplica batch.
        ("none", "(<class 'tensorflow.python.distribute.values.PerReplica'>) to a Tensor"),
        # Bug 2: reduce_per_replica -> strategy.reduce(axis=0) on a scalar metric.
        ("build", "Invalid reduction dimension 0 for input with 0 dimensions"),
    ],
)
def test_without_workarounds_keras_fails(tmp_path, workarounds, message):
    results = run_cluster(
        tmp_path / "model",
        tmp_path / "res",
        tmp_path / "logs",
        tmp_path / "tmp",
        "--workarounds",
        workarounds,
    )
    for i, (rc, text) in enumerate(results):
        assert rc != 0, (
            f"worker {i} succeeded without workaround(s) ({workarounds}): Keras may have "
            "fixed keras-team/keras#20585 -- check and drop the patch in multiworker.py"
        )
        assert message in text, text[-4000:]


@pytest.mark.slow  # a fresh interpreter fitting four models: part of the multi-worker suite
def test_workarounds_change_nothing_without_multiworker():
    proc = subprocess.run(
        [sys.executable, str(HERE / "mw_mirrored.py")],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    assert res["applied"] and res["wrapped_once"]
    assert res["replicas"] == 2
    for kind in ("default", "mirrored"):
        assert res["before"][kind] == res["after"][kind], kind  # bit-identical


# --- a worker dies: the others error out, BackupAndRestore resumes -----------------------


@pytest.mark.slow  # a 2-process cluster
def test_killed_worker_then_restart_resumes(trained, tmp_path):
    model_dir, tmp = tmp_path / "model", tmp_path / "tmp"
    # Worker 1 hard-exits after epoch 0 (its backup is written); the chief blocks in the
    # next all-reduce until TF's coordination-service heartbeat reports the dead peer.
    results = run_cluster(
        model_dir, tmp_path / "res", tmp_path / "logs", tmp, "--die-after-epoch", "0"
    )
    (rc0, text0), (rc1, _) = results
    assert rc1 == 3
    assert rc0 != 0 and "UnavailableError" in text0, text0[-4000:]
    assert sorted(os.listdir(model_dir / "backup")) == [
        "latest.weights.h5",
        "training_metadata.json",
    ]
    # Same state, but as if worker 1 came back on a host without its scratch dir.
    lost = tmp_path / "lost_model"
    shutil.copytree(model_dir, lost)

    # Restart both with their dirs: resumes at epoch 1, same result as uninterrupted run.
    results = run_cluster(model_dir, tmp_path / "res2", tmp_path / "logs2", tmp)
    assert_ok(results)
    (m0, a0), (m1, a1) = (load_result(tmp_path / "res2", f"worker{i}") for i in (0, 1))
    assert m0["backup_seen"].keys() == m1["backup_seen"].keys() == {"1"}
    _, ref = trained["w0"]
    for k in (k for k in ref if k.startswith("final")):
        np.testing.assert_allclose(a0[k], a1[k], rtol=0, atol=1e-7)
        np.testing.assert_allclose(a0[k], ref[k], rtol=0, atol=1e-6)

    # Restart where the non-chief lost its backup: resume_epoch_check() stops both.
    results = run_cluster(lost, tmp_path / "res3", tmp_path / "logs3", tmp)
    for rc, text in results:
        assert rc != 0 and "Workers resumed from different epochs" in text, text[-4000:]


# --- TF_CONFIG, chief, scratch dirs (no TensorFlow needed) -------------------------------

GOOD = {
    "cluster": {"worker": ["localhost:1", "localhost:2"]},
    "task": {"type": "worker", "index": 1},
}


@pytest.mark.parametrize(
    "raw, problem",
    [
        (None, "is not set"),
        ("", "is not set"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"task": GOOD["task"]}), 'no "cluster"'),
        (json.dumps({"cluster": {}, "task": GOOD["task"]}), 'no "cluster"'),
        (json.dumps({"cluster": GOOD["cluster"]}), 'no "task"'),
        (
            json.dumps({"cluster": {"worker": "localhost:1"}, "task": GOOD["task"]}),
            "non-empty list",
        ),
        (json.dumps({"cluster": {"worker": ["localhost"]}, "task": GOOD["task"]}), "host:port"),
        (json.dumps({"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}), "neither"),
        (json.dumps({**GOOD, "task": {"type": "worker"}}), 'integer "index"'),
        (json.dumps({**GOOD, "task": {"type": "worker", "index": "0"}}), 'integer "index"'),
        (json.dumps({**GOOD, "task": {"type": "chief", "index": 0}}), "not in cluster"),
        (json.dumps({**GOOD, "task": {"type": "worker", "index": 2}}), "out of range"),
    ],
)
def test_bad_tf_config(monkeypatch, raw, problem):
    if raw is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", raw)
    for call in (mw.parse_tf_config, mw.make_multi_worker_strategy):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert problem in msg
        assert "\n" not in msg
        assert mw.TF_CONFIG_EXAMPLE in msg
    # The example in the message is itself a valid TF_CONFIG.
    example = mw.TF_CONFIG_EXAMPLE.split("=", 1)[1].strip("'")
    assert mw.parse_tf_config(example)["task"]["index"] == 0


def _set(monkeypatch, cluster, ttype, index):
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": ttype, "index": index}})
    )


def test_is_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert mw.is_chief()  # single process
    workers = {"worker": ["a:1", "b:1"]}
    _set(monkeypatch, workers, "worker", 0)
    assert mw.is_chief()
    _set(monkeypatch, workers, "worker", 1)
    assert not mw.is_chief()
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    _set(monkeypatch, with_chief, "chief", 0)
    assert mw.is_chief()
    _set(monkeypatch, with_chief, "worker", 0)
    assert not mw.is_chief()
    _set(monkeypatch, with_chief, "evaluator", 0)
    assert not mw.is_chief()
    monkeypatch.setenv("TF_CONFIG", "{oops")
    with pytest.raises(UserError):
        mw.is_chief()


def test_worker_scratch_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    (tmp_path / "tmp").mkdir()
    model_dir = str(tmp_path / "model")
    workers = {"worker": ["a:1", "b:1"]}

    _set(monkeypatch, workers, "worker", 0)
    with mw.worker_scratch_dir(model_dir) as d:
        assert d == model_dir and os.path.isdir(d)
    assert os.path.isdir(model_dir)  # the chief's dir is never removed

    _set(monkeypatch, workers, "worker", 1)
    scratch = mw.scratch_dir_for(model_dir)
    assert scratch == mw.scratch_dir_for(model_dir)  # deterministic: found again on restart
    assert scratch.startswith(str(tmp_path / "tmp")) and "worker1" in scratch
    with mw.worker_scratch_dir(model_dir) as d:
        assert d == scratch and os.path.isdir(d)
    assert not os.path.exists(scratch)  # removed after success

    with pytest.raises(RuntimeError), mw.worker_scratch_dir(model_dir) as d:
        raise RuntimeError("training failed")
    assert os.path.isdir(scratch)  # kept for BackupAndRestore after a failure


def test_tfjob_style_tf_config_is_valid():
    # What the Kubeflow training-operator sets: service addresses, port 2222, extra keys.
    cfg = mw.parse_tf_config(
        json.dumps(
            {
                "cluster": {
                    "worker": [
                        "tf-finetune-mw-worker-0.default.svc:2222",
                        "tf-finetune-mw-worker-1.default.svc:2222",
                    ]
                },
                "task": {"type": "worker", "index": 1},
                "environment": "cloud",
            }
        )
    )
    assert cfg["task"] == {"type": "worker", "index": 1}
