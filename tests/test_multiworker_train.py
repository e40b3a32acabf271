"""`tf-finetune train --strategy=multi_worker`: two worker processes on localhost ports."""

import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from tests.helpers import free_ports, tiny, tiny_flags
from tests.images import class_image, encode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_workers_train_identical_weights_and_the_chief_export_serves(folder, tmp_path):
    run = tmp_path / "run"
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    procs, logs = [], []
    try:
        for index in range(2):
            tmpdir = tmp_path / f"tmp{index}"  # each worker's scratch dir lives in its TMPDIR
            tmpdir.mkdir()
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
                "TMPDIR": str(tmpdir),
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "PYTHONPATH": REPO,
            }
            args = [sys.executable, "-m", "tf_finetune", "train", "--strategy=multi_worker"]
            args += tiny_flags(folder, run, "--epochs=2", "--batch_size=8", "--unfreeze=all")
            # Files, not pipes: a worker blocked on a full pipe would stall the collectives.
            out, err = (open(tmp_path / f"worker{index}.{k}", "w") for k in ("out", "err"))
            logs += [out, err]
            procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=err))
        for p in procs:
            p.wait(timeout=420)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    outputs = [
        tuple((tmp_path / f"worker{i}.{k}").read_text() for k in ("out", "err")) for i in range(2)
    ]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    fingerprints = [re.findall(r"Final weights fingerprint (\w+)", err) for _, err in outputs]
    assert len(fingerprints[0]) == 1 and fingerprints[0] == fingerprints[1]
    assert "Worker done: 2 epochs on 2 replicas." in outputs[1][0]
    assert "Export:" in outputs[0][0]

    # Only the chief wrote the run dir; the other worker's scratch dir is gone.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["epochs"] == 2
    assert not (run / "backup").exists() and not (run / "run.lock").exists()
    assert os.listdir(tmp_path / "tmp1") == []
    assert sorted(os.listdir(run / "export")) == ["1"]

    # The chief's export serves: JPEG bytes in, the right class names out.
    loaded = tf.saved_model.load(str(run / "export" / "1"))
    blobs = [encode(class_image(label, (30, 22), seed=500 + label), "JPEG") for label in range(3)]
    result = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
    names = [row[0].decode() for row in result["top_k_names"].numpy()]
    assert names == ["class_0", "class_1", "class_2"]


@pytest.mark.slow  # starts a tf.data service dispatcher and worker (servers)
def test_data_service_feeds_training(folder, tmp_path, monkeypatch):
    """--data_service: an in-process dispatcher and worker produce the training batches."""
    from tf_finetune import input_pipeline, train

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    worker = service.WorkerServer(
        service.WorkerConfig(dispatcher_address=dispatcher.target.removeprefix("grpc://"))
    )
    config = tiny(folder, tmp_path / "run", data_service=dispatcher.target)
    used = []
    real = input_pipeline.with_data_service

    def spy(ds, address):
        used.append(real(ds, address))
        return used[-1]

    monkeypatch.setattr(input_pipeline, "with_data_service", spy)
    metrics = train.train_and_evaluate(config)
    assert len(used) == 1
    graph = tf.raw_ops.DatasetToGraphV2(input_dataset=used[0]._variant_tensor).numpy()
    assert b"DataServiceDataset" in graph  # fit's batches came from the service
    with open(tmp_path / "run" / "history.csv") as f:
        assert len(f.read().splitlines()) == 4  # header + 3 epochs: every epoch got its batches
    assert metrics["val_accuracy"] > 0.6
    del worker, dispatcher
