"""tf_finetune against the usual recipe, side by side in one run (a benchmark, not a test).

The usual recipe is the Keras transfer-learning guide's: `image_dataset_from_directory` ->
frozen backbone + head -> `model.fit`. Both sides use the same backbone, weights, image size,
batch size and epochs on the same machine in the same run, so the ratios mean something even
on a busy machine (the absolute numbers less so).

  python scripts/benchmark.py                     # full run (~25 min on 2 cores)
  python scripts/benchmark.py --quick             # a smaller run (~8 min) to check it works
  python scripts/benchmark.py --json out.json

Sections:
  a. input pipeline images/s: ours vs image_dataset_from_directory vs decode alone (all cores),
     on generated 500x375 JPEGs and on ../shared/data/flowers_128;
  b. head-only fine-tuning (frozen MobileNetV2-0.35, ImageNet weights from ../shared):
     wall time and val accuracy, ours (feature cache) vs the recipe; and the feature pass's
     images/s vs model.predict of the same extractor;
  c. full fine-tuning throughput (images/s), ours vs the recipe;
  d. the export: serving_default latency for one image and throughput for a batch of 32;
  e. peak RSS of a head-only run with --cache=memory, disk and none (child processes), on N and
     4N generated images: with disk and none it must not grow with the data;
  f. precision on this CPU: mixed_bfloat16 vs float32 (throughput and accuracy).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tf_finetune import callbacks, data, feature_fit, input_pipeline, phases  # noqa: E402
from tf_finetune import model as model_lib  # noqa: E402
from tf_finetune.config import Config  # noqa: E402
from tf_finetune.resolve import resolve  # noqa: E402

SHARED = REPO.parent / "shared"
FLOWERS = SHARED / "data" / "flowers_128"
WEIGHTS = (
    SHARED
    / "weights"
    / "keras"
    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
AUTOTUNE = tf.data.AUTOTUNE


# ----------------------------------------------------------------------------- data


def _fit_head(model, config, dataset, extra=()):
    """tf-finetune's head-only phase on cached features (in memory), as train runs it."""
    phase = phases.plan(config)[-1]
    every = [*callbacks.make_callbacks(config, phase, 0, on_features=True), *extra]
    return feature_fit.fit_head(
        model, config, dataset, tf.distribute.get_strategy(), "memory", phase=phase, callbacks=every
    )


def make_jpeg_folder(
    root: pathlib.Path, count: int, classes: int = 5, size=(500, 375)
) -> pathlib.Path:
    """`count` photo-sized JPEGs (smooth noise, so they compress like photos) in class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.uniform(0, 255, (size[1] // 25, size[0] // 25, 3)).astype("float32")
        image = tf.cast(tf.image.resize(small, (size[1], size[0])), tf.uint8)
        (folder / f"img_{i:05d}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
    return root


def _count_images(ds: tf.data.Dataset) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for x, _ in ds:
        n += int(x.shape[0])
    return n, time.perf_counter() - start


def bench_input(
    folder: pathlib.Path, image_size: int, batch: int, rounds: int = 5, epochs: int = 3
) -> dict:
    """Steady-state images/s through each pipeline: `epochs` passes over the folder per
    measurement, best of `rounds` interleaved measurements.

    Several epochs per measurement because tf.data's AUTOTUNE needs a second or so to settle:
    a single pass over 4,317 small images (~0.4 s) measured AUTOTUNE's warm-up, and about one
    in three such passes ran at half speed, for the recipe's pipeline as for ours (with fixed
    parallelism and AUTOTUNE off the half-speed passes disappear). Best-of as `timeit` does.
    """
    paths = [str(p) for p in sorted(folder.rglob("*.jpg"))]

    def decode_only():
        ds = tf.data.Dataset.from_tensor_slices(paths).map(
            lambda p: (tf.io.decode_jpeg(tf.io.read_file(p)), 0), num_parallel_calls=AUTOTUNE
        )
        return ds.map(lambda x, y: (tf.shape(x)[None], y)).batch(batch)

    def ours():
        dataset = data.load_image_folder(str(folder), image_size, 1)  # 1%: nearly all in train
        return data.make_pipeline(dataset.train, dataset.num_classes, batch, True, 0)

    def recipe():
        return keras.utils.image_dataset_from_directory(
            folder, image_size=(image_size, image_size), batch_size=batch, seed=1337, verbose=False
        ).prefetch(AUTOTUNE)

    _count_images(decode_only())  # warm the page cache so nobody pays the first disk read
    results = {}
    for _ in range(rounds):
        for name, make in (("decode_only", decode_only), ("ours", ours), ("recipe", recipe)):
            build_start = time.perf_counter()
            ds = make()
            build = time.perf_counter() - build_start
            n, seconds = _count_images(ds.repeat(epochs))
            entry = results.setdefault(name, {"images": n, "passes_images_per_s": []})
            entry["setup_seconds"] = build
            entry["passes_images_per_s"].append(n / seconds)
    for entry in results.values():
        entry["images_per_s"] = max(entry["passes_images_per_s"])
        entry["median_images_per_s"] = statistics.median(entry["passes_images_per_s"])
    return results


# ----------------------------------------------------------------------------- models
def recipe_model(image_size: int, num_classes: int, weights: str) -> keras.Model:
    """The Keras guide's model: preprocess_input -> frozen base(training=False) -> GAP -> Dropout -> Dense."""
    base = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), include_top=False, weights=weights, alpha=0.35
    )
    base.trainable = False
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # = mobilenet_v2.preprocess_input
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes)(x))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def recipe_datasets(folder, image_size, batch):
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        folder,
        validation_split=0.2,
        subset="both",
        seed=1337,
        image_size=(image_size, image_size),
        batch_size=batch,
        verbose=False,
    )
    return train_ds.prefetch(AUTOTUNE), val_ds.prefetch(AUTOTUNE)


def ours_config(folder, image_size, batch, epochs, model_dir, **overrides) -> Config:
    values = dict(
        data=str(folder),
        backbone="mobilenet_v2",
        backbone_alpha=0.35,
        weights=str(WEIGHTS),
        image_size=image_size,
        batch_size=batch,
        epochs=epochs,
        model_dir=str(model_dir),
        seed=1337,
    )
    values.update(overrides)
    return resolve(Config(**values))


def bench_head_only(folder, image_size, batch, epochs, workdir) -> dict:
    """Wall time from a folder path to a trained head, and val accuracy, both sides."""
    keras.utils.set_random_seed(1337)
    start = time.perf_counter()
    train_ds, val_ds = recipe_datasets(folder, image_size, batch)
    model = recipe_model(image_size, 5, str(WEIGHTS))
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0)
    recipe = {
        "seconds": time.perf_counter() - start,
        "val_accuracy": history.history["val_accuracy"][-1],
    }

    keras.utils.set_random_seed(1337)
    config = ours_config(folder, image_size, batch, epochs, workdir / "head_only", cache="memory")
    start = time.perf_counter()
    dataset = input_pipeline.load_data(config)
    model = model_lib.build_model(config, dataset.num_classes)
    epoch_times = _EpochTimes()
    history = _fit_head(model, config, dataset, extra=(epoch_times,))
    seconds = time.perf_counter() - start
    val = data.make_pipeline(dataset.val, dataset.num_classes, batch, False, 0)
    ours = {
        "seconds": seconds,
        # The full model, pixels in, on the best checkpoint: what gets exported.
        "val_accuracy": model.evaluate(val, return_dict=True, verbose=0)["accuracy"],
        "last_head_val_accuracy": history.history["val_accuracy"][-1],
        "cached_epoch_seconds": statistics.median(epoch_times.seconds[1:] or epoch_times.seconds),
    }
    return {"recipe": recipe, "ours": ours}


def bench_extract(folder, image_size, batch, workdir, rounds: int = 5) -> dict:
    """The feature pass (features.extract) vs `model.predict` of the same extractor on the same
    pipeline: images/s, best of `rounds` interleaved passes. The pass should run at inference
    speed."""
    from tf_finetune import features

    config = ours_config(folder, image_size, batch, 1, workdir / "extract")
    dataset = input_pipeline.load_data(config)
    extractor, _ = features.split_classifier(model_lib.build_model(config, dataset.num_classes))
    n = dataset.train.count

    def pipeline():
        return data.make_pipeline(dataset.train, dataset.num_classes, batch, False, 0)

    def ours():
        features.extract(extractor, pipeline(), n, verbose=0)

    def predict():
        extractor.predict(pipeline(), verbose=0)

    ours(), predict()  # trace both
    rates = {"ours": [], "predict": []}
    for _ in range(rounds):
        for name, run in (("ours", ours), ("predict", predict)):
            start = time.perf_counter()
            run()
            rates[name].append(n / (time.perf_counter() - start))
    return {f"{k}_images_per_s": max(v) for k, v in rates.items()} | {"passes": rates}


class _EpochTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


class _StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def bench_full_finetune(folder, image_size, batch, steps, workdir) -> dict:
    """Images/s of training steps with the whole backbone trainable (median step, no tracing)."""
    train_ds, _ = recipe_datasets(folder, image_size, batch)
    model = recipe_model(image_size, 5, str(WEIGHTS))
    model.layers[2].trainable = True  # the base
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    times = _StepTimes()
    model.fit(train_ds.take(steps), epochs=1, verbose=0, callbacks=[times])
    recipe = batch / statistics.median(times.seconds[2:])

    config = ours_config(folder, image_size, batch, 1, workdir / "full", unfreeze="all")
    dataset = input_pipeline.load_data(config)
    model = model_lib.build_model(config, dataset.num_classes)
    pipeline = data.make_pipeline(dataset.train, dataset.num_classes, batch, True, 0)
    times = _StepTimes()
    model.fit(pipeline.take(steps), epochs=1, verbose=0, callbacks=[times])
    ours = batch / statistics.median(times.seconds[2:])
    return {"recipe_images_per_s": recipe, "ours_images_per_s": ours}


def bench_export(folder, image_size, workdir) -> dict:
    """serving_default latency (1 JPEG) and throughput (batch of 32), from a fresh export."""
    config = ours_config(folder, image_size, 32, 1, workdir / "export_run")
    dataset = input_pipeline.load_data(config)
    model = model_lib.build_model(config, dataset.num_classes)
    from tf_finetune import export

    path = export.export_saved_model(
        model, list(dataset.class_names), image_size, str(workdir / "export")
    )
    serve = tf.saved_model.load(path).signatures["serving_default"]
    jpegs = [p.read_bytes() for p in sorted(pathlib.Path(folder).rglob("*.jpg"))[:32]]
    one = tf.constant(jpegs[:1])
    batch = tf.constant(jpegs)
    serve(image_bytes=one)
    serve(image_bytes=batch)  # trace both shapes first
    latencies = []
    for _ in range(30):
        start = time.perf_counter()
        serve(image_bytes=one)
        latencies.append(time.perf_counter() - start)
    batch_times = []
    for _ in range(5):
        start = time.perf_counter()
        serve(image_bytes=batch)
        batch_times.append(time.perf_counter() - start)
    return {
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p90": 1000 * sorted(latencies)[int(0.9 * len(latencies))],
        "batch32_images_per_s": 32 / statistics.median(batch_times),
    }


def bench_precision(folder, image_size, batch, steps, epochs, workdir) -> dict:
    """float32 vs mixed_bfloat16 on this CPU: full fine-tune and feature-extraction images/s,
    and the val accuracy of a cached head-only run."""
    results = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(1337)
            config = ours_config(
                folder, image_size, batch, epochs, workdir / f"p_{policy}", cache="memory"
            )
            dataset = input_pipeline.load_data(config)
            model = model_lib.build_model(config, dataset.num_classes)
            start = time.perf_counter()
            _fit_head(model, config, dataset)
            head_only_seconds = time.perf_counter() - start
            val = data.make_pipeline(dataset.val, dataset.num_classes, batch, False, 0)
            accuracy = model.evaluate(val, return_dict=True, verbose=0)["accuracy"]

            config = ours_config(
                folder, image_size, batch, 1, workdir / f"pf_{policy}", unfreeze="all"
            )
            model = model_lib.build_model(config, dataset.num_classes)
            times = _StepTimes()
            pipeline = data.make_pipeline(dataset.train, dataset.num_classes, batch, True, 0)
            model.fit(pipeline.take(steps), epochs=1, verbose=0, callbacks=[times])
            results[policy] = {
                "head_only_seconds": head_only_seconds,
                "head_only_val_accuracy": accuracy,
                "full_finetune_images_per_s": batch / statistics.median(times.seconds[2:]),
            }
        finally:
            keras.mixed_precision.set_global_policy("float32")
    return results


RSS_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from tf_finetune import train
from tf_finetune.config import Config
from tf_finetune.resolve import resolve
config = resolve(Config(data=sys.argv[2], backbone="mobilenet_v2", backbone_alpha=0.35,
    weights=sys.argv[3], image_size=int(sys.argv[4]), epochs=2, cache=sys.argv[5],
    model_dir=sys.argv[6]))
train.train_and_evaluate(config)
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across
# fork + exec, so every child would report the benchmark's own peak.
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("MAXRSS_KB", peak)
"""


def bench_rss(folders: dict, image_size: int, workdir) -> dict:
    """Peak RSS (MB) of a whole head-only `train_and_evaluate` in a child, per cache mode and
    data set size: with disk or none it must not grow with the data (nothing is held whole)."""
    results = {}
    env = {**os.environ, "KERAS_HOME": str(workdir / "keras_home")}
    for count, folder in folders.items():
        decoded_mb = count * image_size * image_size * 3 / 2**20
        row = results[f"{count}_images"] = {"decoded_uint8_mb": decoded_mb}
        for mode in ("memory", "disk", "none"):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RSS_CHILD,
                    str(REPO),
                    str(folder),
                    str(WEIGHTS),
                    str(image_size),
                    mode,
                    str(workdir / f"rss_{mode}_{count}"),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=3600,
            )
            line = [l for l in proc.stdout.splitlines() if l.startswith("MAXRSS_KB")]
            row[mode] = int(line[-1].split()[1]) / 1024 if line else f"failed: {proc.stderr[-300:]}"
    return results


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, to check it runs")
    parser.add_argument("--json", default="benchmark.json", help="where to write the results")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (a,b,c,d,e,f)")
    args = parser.parse_args()
    if not WEIGHTS.exists() or not FLOWERS.is_dir():
        sys.exit(f"benchmark.py needs {SHARED} (real weights and photos) beside the checkout.")
    skip = set(args.skip.split(","))
    work = pathlib.Path(tempfile.mkdtemp(prefix="tf_finetune_bench_"))
    n_generated = 400 if args.quick else 2000
    epochs = 2 if args.quick else 5
    generated = make_jpeg_folder(work / "generated", n_generated)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        }
    }
    if "a" not in skip:
        results["a_input_generated_500x375"] = bench_input(generated, 224, 32)
        results["a_input_flowers_128"] = bench_input(FLOWERS, 128, 32)
    if "b" not in skip:
        results["b_head_only_flowers_128"] = bench_head_only(FLOWERS, 128, 32, epochs, work)
        results["b_feature_pass_flowers_128"] = bench_extract(FLOWERS, 128, 32, work)
    if "c" not in skip:
        results["c_full_finetune_flowers_128"] = bench_full_finetune(
            FLOWERS, 128, 32, 8 if args.quick else 20, work
        )
    if "d" not in skip:
        results["d_export_flowers_128"] = bench_export(FLOWERS, 128, work)
    if "f" not in skip:
        results["f_precision_flowers_128"] = bench_precision(
            FLOWERS, 128, 32, 8 if args.quick else 20, epochs, work
        )
    if "e" not in skip:
        bigger = make_jpeg_folder(work / "generated_x4", 4 * n_generated)
        results["e_peak_rss_mb_generated"] = bench_rss(
            {n_generated: generated, 4 * n_generated: bigger}, 224, work
        )
    results["benchmark_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, epochs)
    print(f"\nJSON: {args.json}   (work dir {work})")


def print_table(r: dict, epochs: int) -> None:
    rows = []
    for key, label in (
        ("a_input_generated_500x375", "generated 500x375 JPEG -> 224"),
        ("a_input_flowers_128", "flowers_128 -> 128"),
    ):
        if key in r:
            a = r[key]
            ratio_of_medians = a["ours"]["median_images_per_s"] / a["recipe"]["median_images_per_s"]
            rows.append(
                (
                    f"input images/s, {label}",
                    f"{a['ours']['images_per_s']:.0f}",
                    f"{a['recipe']['images_per_s']:.0f}",
                    f"{a['ours']['images_per_s'] / a['recipe']['images_per_s']:.2f}x",
                    f"median {ratio_of_medians:.2f}x; "
                    f"decode-only ceiling {a['decode_only']['images_per_s']:.0f}/s",
                )
            )
    if "b_head_only_flowers_128" in r:
        b = r["b_head_only_flowers_128"]
        rows.append(
            (
                f"head-only, {epochs} epochs: wall s",
                f"{b['ours']['seconds']:.1f}",
                f"{b['recipe']['seconds']:.1f}",
                f"{b['recipe']['seconds'] / b['ours']['seconds']:.2f}x faster",
                f"cached epoch {b['ours']['cached_epoch_seconds']:.2f} s",
            )
        )
        rows.append(
            (
                "head-only: val accuracy",
                f"{b['ours']['val_accuracy']:.3f}",
                f"{b['recipe']['val_accuracy']:.3f}",
                f"{b['ours']['val_accuracy'] - b['recipe']['val_accuracy']:+.3f}",
                "ours: full model on pixels",
            )
        )
    if "b_feature_pass_flowers_128" in r:
        x = r["b_feature_pass_flowers_128"]
        rows.append(
            (
                "feature pass images/s",
                f"{x['ours_images_per_s']:.0f}",
                f"{x['predict_images_per_s']:.0f}",
                f"{x['ours_images_per_s'] / x['predict_images_per_s']:.2f}x",
                "'recipe' column = model.predict of the same extractor",
            )
        )
    if "c_full_finetune_flowers_128" in r:
        c = r["c_full_finetune_flowers_128"]
        rows.append(
            (
                "full fine-tune images/s",
                f"{c['ours_images_per_s']:.1f}",
                f"{c['recipe_images_per_s']:.1f}",
                f"{c['ours_images_per_s'] / c['recipe_images_per_s']:.2f}x",
                "median step",
            )
        )
    if "d_export_flowers_128" in r:
        d = r["d_export_flowers_128"]
        rows.append(
            (
                "export: 1-image latency ms (p50)",
                f"{d['latency_ms_p50']:.1f}",
                "-",
                "-",
                f"p90 {d['latency_ms_p90']:.1f} ms",
            )
        )
        rows.append(
            (
                "export: batch-32 images/s",
                f"{d['batch32_images_per_s']:.0f}",
                "-",
                "-",
                "serving_default, JPEG bytes",
            )
        )
    if "f_precision_flowers_128" in r:
        f32, bf16 = (
            r["f_precision_flowers_128"]["float32"],
            r["f_precision_flowers_128"]["mixed_bfloat16"],
        )
        rows.append(
            (
                "bf16 vs f32: full fine-tune img/s",
                f"{bf16['full_finetune_images_per_s']:.1f}",
                f"{f32['full_finetune_images_per_s']:.1f}",
                f"{bf16['full_finetune_images_per_s'] / f32['full_finetune_images_per_s']:.2f}x",
                "ours both; 'recipe' column = float32",
            )
        )
        rows.append(
            (
                "bf16 vs f32: head-only s / val acc",
                f"{bf16['head_only_seconds']:.1f} / {bf16['head_only_val_accuracy']:.3f}",
                f"{f32['head_only_seconds']:.1f} / {f32['head_only_val_accuracy']:.3f}",
                f"{f32['head_only_seconds'] / bf16['head_only_seconds']:.2f}x",
                "cached features",
            )
        )
    if "e_peak_rss_mb_generated" in r:
        for size, e in r["e_peak_rss_mb_generated"].items():
            modes = [e[m] for m in ("memory", "disk", "none")]
            rows.append(
                (
                    f"peak RSS MB, {size.replace('_', ' ')} (memory/disk/none)",
                    " / ".join(f"{v:.0f}" if isinstance(v, float) else "fail" for v in modes),
                    "-",
                    "-",
                    f"decoded 224px uint8: {e['decoded_uint8_mb']:.0f} MB; head-only run",
                )
            )
    widths = [max(len(str(row[i])) for row in rows + [HEADER]) for i in range(5)]
    for row in [HEADER, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


HEADER = ("measure", "ours", "recipe", "ratio", "note")

if __name__ == "__main__":
    main()
