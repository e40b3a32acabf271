"""tf-finetune against the Keras guide's recipe, like for like (a benchmark, not a test).

Both sides train on the SAME files with the SAME 70/15/15 train/val/test split (a hash of each
file's path, written as train/, val/, test/ class-folder trees of symlinks that both read) and
are scored on the test split, which neither side used to choose anything:
  - the recipe (the Keras transfer-learning guide): `image_dataset_from_directory` -> frozen
    MobileNetV2-0.35 (ImageNet weights from ../shared) -> GAP -> Dropout(0.2) -> Dense, Adam 1e-3,
    `model.fit`, no augmentation; selection: the model after the LAST epoch;
  - tf-finetune: the `tf-finetune train` command, same backbone/weights/size/batch/epochs,
    `--augment=none`; selection: the checkpoint with the lowest val_loss. Its default
    (`--head_solver=auto`) solves the head once by L-BFGS on the cached features, so --epochs
    only counts in the `fit` job (`--head_solver=fit`: Adam for the epochs, as the recipe).
Wall time is the whole process, each side in its own subprocess started from this one: start
-> the recipe's model trained and in memory (its test scoring is not counted) / our command's
exit (test scoring, report and the exported SavedModel are counted). Jobs (issue 14's goals):

  all      all 4,317 flower photos, 10 epochs at 128 px          goal: speed-up >= 3.5, acc >= recipe
  third    a hash-stable third of them (1,441), 8 epochs         goal: speed-up >= 2
  two      a generated 2-class 400-image folder at 224 px, 8 ep  goal: speed-up >= 1.5
  phone    300 phone-size photos (flowers upscaled bicubic to    goal: speed-up >= 2.5
           3000x2000, JPEG q90; generated once), 8 ep at 128 px
  lbfgs    `--head_solver=lbfgs` on the third                    goal: acc >= recipe + 0.02, >= 1.5x
  fit      `--head_solver=fit` on the third (the previous default; no goal)
  limit    feature pass images/s vs the machine's limit 1/(1/decode + 1/forward): decode
           (data.decode_and_resize, 2 parallel calls), forward (in-memory batch of 64,
           tf.function) and our pass (data.feature_pipeline -> features.extract) each
           measured alone, warm, on the same files, here (scripts/feature_pass.py)
                                                                 goal: >= 80% of the limit
  rss      peak RSS (VmHWM) of a head-only --cache=disk run on the third and on all the
           photos                                                goal: flat in dataset size
  export   serving_default latency (1 JPEG) and batch-of-32 throughput of the `all` run's export

Accuracies are means over --seeds seeds (3; a 234-image test split has a standard error near 3
points); speed-up = the recipe's mean wall time / ours.

  python scripts/benchmark.py                       # everything (~13 min on 2 idle cores)
  python scripts/benchmark.py --quick               # 1 seed, fewer epochs and photos (~5 min)
  python scripts/benchmark.py --only third,limit --json out.json
"""

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
FLOWERS = SHARED / "data" / "flowers_128"
WEIGHTS = (
    SHARED
    / "weights"
    / "keras"
    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
SECTIONS = ("all", "third", "two", "phone", "lbfgs", "fit", "limit", "rss", "export")
# job -> (tree, image size, epochs, extra flags of ours)
JOBS = {
    "all": ("all", 128, 10, ()),
    "third": ("third", 128, 8, ()),
    "two": ("two_class_224", 224, 8, ()),
    "phone": ("phone", 128, 8, ()),
    "lbfgs": ("third", 128, 8, ("--head_solver=lbfgs",)),
    "fit": ("third", 128, 8, ("--head_solver=fit",)),
}
GOALS = {"all": 3.5, "third": 2.0, "two": 1.5, "phone": 2.5, "lbfgs": 1.5}


# ----------------------------------------------------------------------------- inputs
def _hash(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 2**32


def split_of(rel: str) -> str:
    """70/15/15 by a hash of the path: stable when files are added."""
    u = _hash(rel)
    return "test" if u < 0.15 else "val" if u < 0.30 else "train"


def flower_files() -> list[tuple[pathlib.Path, str]]:
    return [(p, str(p.relative_to(FLOWERS))) for p in sorted(FLOWERS.rglob("*.jpg"))]


def write_tree(root: pathlib.Path, files) -> pathlib.Path:
    """train/, val/, test/ class folders of symlinks to `files` ((path, 'class/name'))."""
    shutil.rmtree(root, ignore_errors=True)
    for path, rel in files:
        link = root / split_of(rel) / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return root


def _resized_copies(dest: pathlib.Path, files, size: tuple[int, int]) -> list:
    """Bicubic resizes of `files` to `size` (JPEG quality 90), made once into `dest`."""
    from PIL import Image

    from tf_finetune import atomic

    out = []
    for path, rel in files:
        target = dest / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            image = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
            atomic.write(str(target), lambda tmp, im=image: im.save(tmp, "JPEG", quality=90))
        out.append((target, rel))
    return out


def make_trees(work: pathlib.Path, phone_count: int) -> dict[str, pathlib.Path]:
    files = flower_files()
    by_hash = sorted(files, key=lambda f: _hash("pick:" + f[1]))
    two = [f for f in by_hash if f[1].split("/")[0] == "daisy"][:200]
    two += [f for f in by_hash if f[1].split("/")[0] == "dandelion"][:200]
    generated = CACHE / "tf_finetune_benchmark"
    return {
        "all": write_tree(work / "all", files),
        "third": write_tree(work / "third", [f for f in files if _hash("third:" + f[1]) < 1 / 3]),
        "two_class_224": write_tree(
            work / "two", _resized_copies(generated / "two_class_224", two, (224, 224))
        ),
        "phone": write_tree(
            work / "phone",
            _resized_copies(generated / "phone_3000x2000", by_hash[:phone_count], (3000, 2000)),
        ),
    }


# ----------------------------------------------------------------------------- the two sides
def _env(work: pathlib.Path, repo: pathlib.Path = REPO) -> dict:
    home = pathlib.Path(tempfile.mkdtemp(prefix="keras_home_", dir=work))  # no warm caches
    return {**os.environ, "PYTHONPATH": str(repo), "KERAS_HOME": str(home)}


def run_recipe(tree, size, epochs, seed, work) -> dict:
    """The recipe in a subprocess: wall = start -> trained model in memory."""
    cmd = [sys.executable, __file__, "recipe", str(tree), str(size), str(epochs), str(seed)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(work), timeout=3600)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()}
    if proc.returncode or "RESULT" not in lines:
        raise RuntimeError(f"recipe failed: {proc.stderr[-2000:]}")
    return {"seed": seed, "wall": float(lines["READY"]) - start, **json.loads(lines["RESULT"])}


def run_ours(tree, size, epochs, seed, work, extra=(), wrap_rss=False, repo=REPO) -> dict:
    """`tf-finetune train` in a subprocess: wall = start -> the command's exit (export done).
    `repo`: the checkout whose package runs (the subprocess starts in `work`, so `-m` finds
    it through PYTHONPATH, not the current directory)."""
    model_dir = pathlib.Path(tempfile.mkdtemp(prefix="ours_", dir=work))
    flags = [
        f"--data={tree}",
        "--backbone=mobilenet_v2",
        "--backbone_alpha=0.35",
        f"--weights={WEIGHTS}",
        f"--image_size={size}",
        f"--epochs={epochs}",
        "--batch_size=32",
        "--augment=none",
        f"--seed={seed}",
        "--nodeterministic",  # the default run's pipeline; --seed alone would turn it on
        f"--model_dir={model_dir}",
        *extra,
    ]
    prefix = [sys.executable, "-c", RSS_WRAPPER] if wrap_rss else [sys.executable, "-m"]
    start = time.time()
    proc = subprocess.run(
        [*prefix, "tf_finetune", "train", *flags],
        capture_output=True,
        text=True,
        env=_env(work, repo),
        cwd=work,
        timeout=3600,
    )
    wall = time.time() - start
    if proc.returncode:
        raise RuntimeError(f"tf-finetune failed: {proc.stderr[-2000:]}")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    row = {
        "seed": seed,
        "wall": wall,
        "test_accuracy": metrics["test_accuracy"],
        "val_accuracy": metrics["val_accuracy"],
        "timings": metrics.get("timings", {}),
        "model_dir": str(model_dir),
    }
    peak = [line for line in proc.stdout.splitlines() if line.startswith("VMHWM_KB")]
    if peak:
        row["peak_rss_mb"] = int(peak[-1].split()[1]) / 1024
    return row


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
RSS_WRAPPER = r"""
import runpy, sys
sys.argv = ["tf-finetune", *sys.argv[2:]]
try:
    runpy.run_module("tf_finetune", run_name="__main__")
finally:
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("VMHWM_KB", peak, flush=True)
"""


def recipe_child(tree: str, size: int, epochs: int, seed: int) -> None:
    """The Keras guide's recipe; prints READY <time> after fit, then RESULT <json>."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)

    def load(split, shuffle):
        return keras.utils.image_dataset_from_directory(
            f"{tree}/{split}",
            image_size=(size, size),
            batch_size=32,
            shuffle=shuffle,
            seed=seed,
            verbose=False,
        ).prefetch(tf.data.AUTOTUNE)

    train_ds, val_ds = load("train", True), load("val", False)
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights=str(WEIGHTS), alpha=0.35
    )
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # = mobilenet_v2.preprocess_input
    x = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(len(os.listdir(f"{tree}/train")))(x))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0)
    print("READY", time.time(), flush=True)
    test = model.evaluate(load("test", False), return_dict=True, verbose=0)
    result = {
        "test_accuracy": test["accuracy"],
        "val_accuracy": history.history["val_accuracy"][-1],
    }
    print("RESULT", json.dumps(result), flush=True)


def run_job(
    name: str, trees: dict, seeds: list[int], epochs_scale: float, work, reuse=None
) -> dict:
    """Both sides, interleaved seed by seed (so a load change hits both alike). `reuse`: a job
    whose recipe runs were the same (tree, size, epochs, seeds): lbfgs and fit reuse the
    third's."""
    tree_name, size, epochs, extra = JOBS[name]
    epochs = max(1, round(epochs * epochs_scale))
    tree = trees[tree_name]
    recipe, ours = [], []
    for i, seed in enumerate(seeds):
        recipe.append(reuse["recipe"][i] if reuse else run_recipe(tree, size, epochs, seed, work))
        ours.append(run_ours(tree, size, epochs, seed, work, extra))
        print(
            f"  {name} seed {seed}: recipe {recipe[-1]['wall']:.1f} s, ours {ours[-1]['wall']:.1f} s"
        )
    counts = {s: sum(1 for _ in (tree / s).rglob("*.jpg")) for s in ("train", "val", "test")}
    return {"size": size, "epochs": epochs, "flags": list(extra), "images": counts,
            "recipe": recipe, "ours": ours}  # fmt: skip


# ----------------------------------------------------------------------------- machine limit
def _best_rate(run, count: int, rounds: int = 3) -> float:
    """Images/s of `run()` over `count` images: best of `rounds` (the first warms up)."""
    run()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return count / min(seconds)


def machine_limit(trees: dict, jobs: dict) -> dict:
    """Per file set, measured in this process on the same files, each warm (one untimed round
    traces and fills the page cache; best of 3 rounds): decode alone, forward alone, their
    limit, and our feature pass (`scripts/feature_pass.measure`: data.feature_pipeline ->
    features.extract, as a run makes it). `in_run`: the pass rate a run's metrics.json reports
    (first seed), which also pays the one-off trace of the forward and the pipeline's start."""
    from scripts import feature_pass

    out = {}
    for job, tree_name in (("all", "all"), ("phone", "phone")):
        m = feature_pass.measure(str(trees[tree_name]), 128)
        in_run = None
        if job in jobs:
            in_run = jobs[job]["ours"][0]["timings"].get("feature_images_per_second")
        out[job] = {
            "decode": m["decode"],
            "forward": m["forward"],
            "limit": m["limit"],
            "ours": m["pass"],
            "in_run": in_run,
        }
        print(
            f"  limit {job}: decode {m['decode']:.0f}/s, forward {m['forward']:.0f}/s, "
            f"limit {m['limit']:.0f}/s, pass {m['pass']:.0f}/s (in a run: {in_run})"
        )
    return out


def peak_rss(trees: dict, work, epochs: int) -> dict:
    """Peak RSS of a head-only --cache=disk run on the third and on all the photos."""
    out = {}
    for name in ("third", "all"):
        row = run_ours(trees[name], 128, epochs, 42, work, ("--cache=disk",), wrap_rss=True)
        out[name] = {"images": sum(1 for _ in trees[name].rglob("*.jpg")), "mb": row["peak_rss_mb"]}
        print(f"  rss {name}: {out[name]['mb']:.0f} MB")
    return out


def export_latency(model_dir: str, tree: pathlib.Path) -> dict:
    """serving_default of an export: 1-JPEG latency (p50/p90) and batch-of-32 images/s."""
    import tensorflow as tf

    export = sorted((pathlib.Path(model_dir) / "export").iterdir())[-1]
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    jpegs = [p.read_bytes() for p in sorted(tree.rglob("*.jpg"))[:32]]
    one, batch = tf.constant(jpegs[:1]), tf.constant(jpegs)
    serve(image_bytes=one), serve(image_bytes=batch)  # trace both shapes
    latencies = []
    for _ in range(30):
        start = time.perf_counter()
        serve(image_bytes=one)
        latencies.append(1000 * (time.perf_counter() - start))
    rate = _best_rate(lambda: serve(image_bytes=batch), 32, rounds=5)
    return {
        "latency_ms_p50": statistics.median(latencies),
        "latency_ms_p90": sorted(latencies)[int(0.9 * len(latencies))],
        "batch32_images_per_s": rate,
    }


# ----------------------------------------------------------------------------- goals
def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def _goal(goal: str, target: float, measured: float, rule: str = ">=") -> dict:
    met = measured >= target if rule == ">=" else measured <= target
    return {"goal": goal, "rule": rule, "target": target, "measured": measured, "met": met}


def goals(r: dict) -> list[dict]:
    """Goal vs measured, one row per goal of issue 14 that this run measured."""
    jobs, rows = r.get("jobs", {}), []

    def speedup(j):
        return _mean(j["recipe"], "wall") / _mean(j["ours"], "wall")

    def gap(j):
        return _mean(j["ours"], "test_accuracy") - _mean(j["recipe"], "test_accuracy")

    for name in ("all", "third", "two", "phone"):
        if name in jobs:
            rows.append(_goal(f"{name}: speed-up", GOALS[name], speedup(jobs[name])))
    if "all" in jobs:
        rows.append(_goal("all: test accuracy - recipe's", 0.0, gap(jobs["all"])))
    if "lbfgs" in jobs:
        rows.append(_goal("lbfgs: test accuracy - recipe's", 0.02, gap(jobs["lbfgs"])))
        rows.append(_goal("lbfgs: speed-up", GOALS["lbfgs"], speedup(jobs["lbfgs"])))
    for name, x in r.get("limit", {}).items():
        if x["ours"]:
            rows.append(_goal(f"{name}: feature pass / machine limit", 0.8, x["ours"] / x["limit"]))
    if "rss" in r:
        growth = r["rss"]["all"]["mb"] / r["rss"]["third"]["mb"]
        rows.append(_goal("disk cache: peak RSS all / third", 1.1, growth, "<="))
    return rows


def print_goals(rows: list[dict]) -> None:
    print(f"\n{'goal':40s} {'target':>8s} {'measured':>9s}  met")
    for row in rows:
        target = f"{row['rule']} {row['target']}"
        print(f"{row['goal']:40s} {target:>8s} {row['measured']:9.3f}  {row['met']}")


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs and photos")
    parser.add_argument("--json", default="benchmark.json", help="where to write the results")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per job [3; --quick 1]")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) - {""} or set(SECTIONS)
    unknown = (wanted | set(args.skip.split(","))) - set(SECTIONS) - {""}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in wanted and s not in args.skip.split(",")]
    args.seeds = args.seeds or (1 if args.quick else 3)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not WEIGHTS.exists() or not FLOWERS.is_dir():
        sys.exit(f"benchmark.py needs {SHARED} (real weights and photos) beside the checkout.")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tf_finetune_bench_"))
    trees = make_trees(work, phone_count=60 if args.quick else 300)
    seeds = [42 + i for i in range(args.seeds)]
    scale = 0.5 if args.quick else 1.0
    r = {"quick": args.quick, "seeds": seeds, "sections": args.sections, "jobs": {}}
    for name in [s for s in args.sections if s in JOBS]:
        reuse = r["jobs"].get("third") if name in ("lbfgs", "fit") else None
        r["jobs"][name] = run_job(name, trees, seeds, scale, work, reuse)
    if "limit" in args.sections:
        r["limit"] = machine_limit(trees, r["jobs"])
    if "rss" in args.sections:
        r["rss"] = peak_rss(trees, work, epochs=2)
    if "export" in args.sections:
        source = r["jobs"].get("all") or r["jobs"].get("third")
        model_dir = source["ours"][0]["model_dir"] if source else None
        if model_dir is None:
            model_dir = run_ours(trees["third"], 128, 1, 42, work)["model_dir"]
        r["export"] = export_latency(model_dir, trees["all"])
    r["goals"] = goals(r)
    from tf_finetune import atomic

    atomic.write_text(args.json, json.dumps(r, indent=2))
    print_goals(r["goals"])
    print(f"\nJSON: {args.json}   (work dir {work}, removed)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["recipe"]:
        recipe_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
