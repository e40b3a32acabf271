"""One worker of the 2-worker test in tests/test_multiworker.py (run as a subprocess).

usage: mw_worker.py MODEL_DIR RESULT_DIR [--workarounds all|build|none]
TF_CONFIG must be set. Writes RESULT_DIR/<type><index>.npz (init + final weights,
predictions) and RESULT_DIR/<type><index>.json (what it wrote where).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.mw_model import compiled_model  # noqa: E402
from tf_finetune import multiworker as mw  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("result_dir")
    p.add_argument("--workarounds", choices=["all", "build", "none"], default="all")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--die-after-epoch", type=int, default=None, help="non-chief: hard exit")
    args = p.parse_args()

    strategy = mw.make_multi_worker_strategy(timeout_seconds=args.timeout)  # before any TF op

    import keras
    import numpy as np
    import tensorflow as tf

    if args.workarounds == "all":
        mw.apply_keras_workarounds()
    elif args.workarounds == "build":
        mw._patch_symbolic_build()

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    name = f"{task['type']}{task['index']}"

    # Deterministic data: 64 16x16x1 images, 3 classes; global batch 16 -> 4 steps/epoch.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 16, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 0, 0, 0] > 1).astype("int32")
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat().with_options(opts)

    model = compiled_model(strategy, 3)
    init = [w.numpy() for w in model.weights]

    seen = {}

    class RecordBackup(keras.callbacks.Callback):  # runs after BackupAndRestore
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = sorted(os.listdir(backup_dir))
            if args.die_after_epoch == epoch and not mw.is_chief():
                os._exit(3)  # simulate a killed worker, after its backup was written

    with mw.worker_scratch_dir(args.model_dir) as out_dir:
        backup_dir = os.path.join(out_dir, "backup")
        hist = model.fit(
            ds,
            epochs=2,
            steps_per_epoch=4,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup_dir),
                mw.resume_epoch_check(),
                RecordBackup(),
            ],
            verbose=0,
        )
        ev = model.evaluate(ds, steps=2, verbose=0, return_dict=True)
        pred = model.predict(tf.data.Dataset.from_tensor_slices(x[:32]).batch(16), verbose=0)

        # Every worker exports (saving may run collectives); non-chief into scratch.
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default",
            model.call,
            input_signature=[tf.TensorSpec((None, 16, 16, 1), tf.float32)],
        )
        archive.write_out(os.path.join(out_dir, "export"), verbose=False)
        with open(os.path.join(out_dir, f"written_by_{name}"), "w") as f:
            f.write(name)
        listing = sorted(os.listdir(out_dir))

    final = [w.numpy() for w in model.weights]
    np.savez(
        os.path.join(args.result_dir, f"{name}.npz"),
        pred=pred,
        direct=np.asarray(model(x[:32])),
        **{f"init{i}": w for i, w in enumerate(init)},
        **{f"final{i}": w for i, w in enumerate(final)},
    )
    with open(os.path.join(args.result_dir, f"{name}.json"), "w") as f:
        json.dump(
            {
                "out_dir": out_dir,
                "is_chief": mw.is_chief(),
                "listing": listing,
                "backup_seen": seen,
                "loss": hist.history["loss"],
                "epochs_run": len(hist.history["loss"]),
                "eval": {k: float(v) for k, v in ev.items()},
                "num_replicas": strategy.num_replicas_in_sync,
            },
            f,
        )


if __name__ == "__main__":
    main()
