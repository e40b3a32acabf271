"""Every number the README quotes, from one command: measure, store, render.

  python scripts/results.py                      # measure every section, then render README.md
  python scripts/results.py --quick              # smaller runs, to check it works
  python scripts/results.py --only tflite,compare_cold
  python scripts/results.py --render             # README.md from results/results.json only

Sections (each a block of README.md between `<!-- results:NAME -->` and `<!-- /results -->`):
  offline_default  `tf-finetune train` with no flags: fine-tuned vs scratch over 3 seeds
  real_photos      ../shared's flowers, 70/15/15 (test reported): head-only (fit, lbfgs), two-phase
  compare_cold     `tf-finetune compare --unfreeze=0,20,all --epochs=3` (no warmup)
  compare_warm     the same with --warmup_epochs=3 --epochs=5
  tflite           `tf-finetune export --format=tflite` with each --quantize: size, val accuracy
  performance      scripts/benchmark.py: tf-finetune vs the Keras guide's recipe, like for like
  probe_resplits   scripts/probe_experiment.py: the L-BFGS head's gain over the recipe's head on
                   the same features, over 30 random re-splits of the third

Each section is stored in results/results.json with the commit, date, CPU, core count and the
1-minute load average before and after; measuring one section keeps the others. Times taken
when the load average was above IDLE_LOAD before the section started are marked † in the
README (with the load), or refused with --require_idle. Only the standard library is imported
here: the measurements run the `tf-finetune` command and the benchmark in subprocesses.
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tf_finetune import atomic  # noqa: E402  (standard library only: no TensorFlow)

RESULTS = REPO / "results" / "results.json"
README = REPO / "README.md"
SHARED = REPO.parent / "shared"
IDLE_LOAD = 0.5
BUSY = "†"
FLOWERS = "--flagfile=configs/flowers128_shared.cfg"
TWO_PHASE = "--flagfile=configs/flowers128_two_phase.cfg"
SPLIT_70_15_15 = ("--validation_percent=15", "--test_percent=15")
MOSAICS = "flower mosaics, multi-label (mAP)"  # scripts/flower_mosaics.py
MULTI_LABEL = "--task=multi_label"
FIT = "--head_solver=fit"  # Adam for the epochs (the default solves a head-only phase by L-BFGS)
MARKER = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


# ----------------------------------------------------------------------------- running things
def tf_finetune(args, work: pathlib.Path) -> float:
    """Runs `tf-finetune ARGS` from the repo root (configs' relative paths); wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(work / "keras_home")}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "tf_finetune", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"results.py: `tf-finetune {' '.join(args)}` failed: {proc.stderr[-1500:]}")
    return time.time() - start


def _script(name: str, *args: str) -> None:
    """Runs scripts/<name> with `args` (its output shown); a failure ends results.py."""
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    if subprocess.run(cmd, cwd=REPO, text=True).returncode:
        sys.exit(f"results.py: scripts/{name} failed (its output is above)")


def _json(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def machine() -> dict:
    cpu = "unknown"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count()}


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if dirty else "")


# ----------------------------------------------------------------------------- measurements
def measure_offline_default(work, quick) -> dict:
    run = work / "offline"
    wall = tf_finetune(["train", f"--model_dir={run}"], work)
    metrics = _json(run / "metrics.json")
    return {
        "command": "tf-finetune train",
        "comparison": metrics["offline_comparison"],
        "wall_seconds": wall,
        "timings": metrics.get("timings", {}),
    }


def _train_row(name, flags, work) -> dict:
    run = work / name
    wall = tf_finetune(["train", *flags, f"--model_dir={run}"], work)
    m = _json(run / "metrics.json")
    keys = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_images")
    row = {k: m[k] for k in keys} | {"val_images": m["val_images"], "test_images": m["test_images"]}
    row |= {"command": "tf-finetune train " + " ".join(flags), "wall_seconds": wall}
    row |= {k: m[k] for k in ("val_map", "test_map") if k in m}  # multi-label runs
    return row | {"fit_seconds": m.get("timings", {}).get("fit"), "timings": m.get("timings", {})}


def measure_real_photos(work, quick) -> dict:
    seed = ("--seed=42", *SPLIT_70_15_15)
    short = ("--epochs=2",) if quick else ()
    two_short = ("--warmup_epochs=1", "--epochs=2") if quick else ()
    runs = [
        ("head only (`--head_solver=fit`, 5 epochs)", "head", (FLOWERS, *seed, *short, FIT)),
        ("head only (the default: L-BFGS)", "lbfgs", (FLOWERS, *seed)),
        ("two-phase + `--augment=light`", "two", (TWO_PHASE, *seed, *two_short)),
    ]
    rows = [{"run": label, **_train_row(name, flags, work)} for label, name, flags in runs]
    if quick:
        rows[0]["run"] = "head only (`--head_solver=fit`, 2 epochs)"
        rows[2]["run"] = "two-phase 1 + 1 epochs + `--augment=light`"
    return {"rows": rows}


def measure_head_solver(work, quick) -> dict:
    """fit against lbfgs on the same features: the flowers (70/15/15) and the offline default
    with a frozen backbone, the same seeds for both solvers."""
    seeds = (42,) if quick else (42, 43, 44)
    mosaics = work / "mosaics"
    _script("flower_mosaics.py", str(mosaics))
    jobs = {
        "flowers": (FLOWERS, *SPLIT_70_15_15),
        "offline default, `--unfreeze=0`": ("--unfreeze=0",),
        MOSAICS: (FLOWERS, f"--data={mosaics / 'labels.csv'}", MULTI_LABEL, *SPLIT_70_15_15),
    }
    out = {}
    for job, flags in jobs.items():
        out[job] = {
            solver: [
                _train_row(
                    f"{job[:7]}_{solver}_{seed}",
                    (*flags, f"--seed={seed}", f"--head_solver={solver}"),
                    work,
                )
                for seed in seeds
            ]
            for solver in ("fit", "lbfgs")
        }
    return {"seeds": list(seeds), "jobs": out}


def _compare(work, name, extra) -> dict:
    run = work / name
    args = ["compare", FLOWERS, "--seed=42", "--unfreeze=0,20,all", *extra]
    wall = tf_finetune([*args, f"--model_dir={run}"], work)
    result = _json(run / "compare.json")
    shown = " ".join(a for a in args if a != "--seed=42")
    return {"command": f"tf-finetune {shown}", "wall_seconds": wall, **result}


def measure_compare_cold(work, quick) -> dict:
    return _compare(work, "cold", ["--epochs=2" if quick else "--epochs=3"])


def measure_compare_warm(work, quick) -> dict:
    epochs = ["--warmup_epochs=1", "--epochs=2"] if quick else ["--warmup_epochs=3", "--epochs=5"]
    return _compare(work, "warm", epochs)


def measure_tflite(work, quick) -> dict:
    run = work / "tflite_run"
    train = ["train", FLOWERS, "--seed=42", "--epochs=2", f"--model_dir={run}"]
    tf_finetune(train, work)
    seconds = {}
    for quantize in ("dynamic",) if quick else ("dynamic", "float16", "int8"):
        args = ["export", f"--model_dir={run}", "--format=tflite", f"--quantize={quantize}"]
        seconds[quantize] = tf_finetune(args, work)
    card = _json(run / "tflite" / "model_card.json")
    return {
        "command": "tf-finetune " + " ".join(train[:-1]),
        "keras_val_accuracy": _json(run / "metrics.json")["val_accuracy"],
        "files": card["files"],
        "export_seconds": seconds,
    }


def measure_performance(work, quick) -> dict:
    _script("benchmark.py", f"--json={work / 'out.json'}", *(["--quick"] if quick else []))
    return _json(work / "out.json")


def measure_cache_views(work, quick) -> dict:
    quick_flags = ["--seeds=1", "--views=0,1", "--no_steps", "--no_pixels"] if quick else []
    _script("cache_views.py", f"--json={work / 'out.json'}", *quick_flags)
    return _json(work / "out.json")


def measure_probe_resplits(work, quick) -> dict:
    _script(
        "probe_experiment.py", f"--json={work / 'out.json'}", *(["--resplits=3"] if quick else [])
    )
    return _json(work / "out.json")


MEASURE = {
    "offline_default": measure_offline_default,
    "real_photos": measure_real_photos,
    "compare_cold": measure_compare_cold,
    "compare_warm": measure_compare_warm,
    "tflite": measure_tflite,
    "performance": measure_performance,
    "cache_views": measure_cache_views,
    "head_solver": measure_head_solver,
    "probe_resplits": measure_probe_resplits,
}
NEEDS_SHARED = set(MEASURE) - {"offline_default"}
SHORTENED_BY_QUICK = set(MEASURE) - {"offline_default"}  # the offline default is one size


def cpu_busy_share(seconds: float = 2.0) -> float:
    """The share of all CPU time that was busy over `seconds` (/proc/stat), 0..1."""

    def sample():
        fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def settle(max_wait: float) -> tuple[float, float]:
    """The 1-minute load average and the busy CPU share before a section. The load average
    decays over minutes, so after our own previous section it stays high on idle CPUs: while
    the CPUs are idle now, wait (up to `max_wait` s) for it to fall below IDLE_LOAD."""
    deadline = time.time() + max_wait
    while True:
        load, busy = os.getloadavg()[0], cpu_busy_share()
        if load <= IDLE_LOAD or busy > 0.2 or time.time() > deadline:
            return load, busy
        time.sleep(5)


def measure(name: str, quick: bool, require_idle: bool, head: str, max_wait: float = 0) -> dict:
    """One section, with where, when and under which load it was measured."""
    load, cpu_busy = settle(max_wait)
    if require_idle and load > IDLE_LOAD:
        sys.exit(f"results.py: load average {load:.2f} > {IDLE_LOAD}: not idle (--require_idle)")
    start, date = time.time(), datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix=f"results_{name}_") as work:
        data = MEASURE[name](pathlib.Path(work), quick)
    return {
        "commit": head,
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        **machine(),
        "load_before": round(load, 2),
        "cpu_busy_before": round(cpu_busy, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "busy": load > IDLE_LOAD,
        "quick": quick and name in SHORTENED_BY_QUICK,
        "seconds": round(time.time() - start, 1),
        "data": data,
    }


# ----------------------------------------------------------------------------- rendering
def secs(value, busy: bool, fmt: str = ".1f", unit: str = "") -> str:
    """A timing cell (or a ratio of timings): marked when measured under load."""
    if value is None:
        return "-"
    return f"{value:{fmt}}{unit}" + (BUSY if busy else "")


def _mean_sd(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


def provenance(name: str, s: dict) -> str:
    quick = " with `--quick` (shortened runs, not the README's full settings)" if s["quick"] else ""
    cpu = f", CPUs {s['cpu_busy_before']:.0%} busy" if "cpu_busy_before" in s else ""
    lines = [
        f"Measured at commit `{s['commit']}` on {s['date']}{quick} ({s['cpu']}, {s['cores']} "
        f"cores; 1-minute load average {s['load_before']} before{cpu}, {s['load_after']} after; "
        f"{s['seconds']:.0f} s). Rerun: `python scripts/results.py --only {name}`."
    ]
    if s["busy"]:
        lines.append(
            f"{BUSY} Measured under load (load average {s['load_before']} when the section "
            f"started; idle is <= {IDLE_LOAD}): times are slower than on idle cores."
        )
    return "\n\n".join(lines)


STAGES = ("startup", "data", "prepare", "build", "features", "fit", "evaluate", "export")


def _timings_line(timings: dict, busy: bool) -> str:
    skip = ("total", "feature_images_per_second")
    order = sorted(timings, key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
    return ", ".join(f"{k} {secs(timings[k], busy)} s" for k in order if k not in skip)


def render_offline_default(s: dict) -> str:
    d, busy = s["data"], s["busy"]
    c = d["comparison"]
    rows = [("model", "accuracy", "loss")]
    for side, label in (
        ("fine_tuned", "fine-tuned digits_cnn"),
        ("scratch", "same net from scratch"),
    ):
        for split in ("val", "test"):
            acc = c[side][f"{split}_accuracy"]
            rows.append(
                (
                    f"{label} [{split}]",
                    f"{acc['mean']:.3f} ± {acc['sd']:.3f}",
                    f"{c[side][f'{split}_loss']['mean']:.3f}",
                )
            )
    rows.append((f"(mean ± sd over seeds {', '.join(map(str, c['seeds']))})", "", ""))
    table = "\n".join(f"  {a:42s} {b:>13s} {e:>8s}".rstrip() for a, b, e in rows)
    return (
        f"```\n{table}\n```\n\n`{d['command']}` took {secs(d['wall_seconds'], busy, '.0f')} s "
        f"({_timings_line(d['timings'], busy)}).\n\n" + provenance("offline_default", s)
    )


def render_real_photos(s: dict) -> str:
    busy, lines = s["busy"], []
    lines.append(
        "| run | train / val / test images | val accuracy (loss) | **test** accuracy (loss) "
        "| fit s | wall s |"
    )
    lines.append("| --- | --- | --- | --- | ---: | ---: |")
    for r in s["data"]["rows"]:
        lines.append(
            f"| {r['run']} | {r['train_images']:,} / {r['val_images']:,} / {r['test_images']:,} "
            f"| {r['val_accuracy']:.3f} ({r['val_loss']:.3f}) "
            f"| **{r['test_accuracy']:.3f}** ({r['test_loss']:.3f}) "
            f"| {secs(r['fit_seconds'], busy)} | {secs(r['wall_seconds'], busy, '.0f')} |"
        )
    commands = "\n".join(r["command"] for r in s["data"]["rows"])
    return "\n".join(lines) + f"\n\n```sh\n{commands}\n```\n\n" + provenance("real_photos", s)


def _compare_table(variants: list[dict], busy: bool) -> str:
    lines = [("--unfreeze", "val_accuracy", "val_loss", "trainable params", "s/epoch")]
    for v in variants:
        lines.append(
            (
                v["unfreeze"],
                f"{v['val_accuracy']:.4f}",
                f"{v['val_loss']:.4f}",
                f"{v['trainable_parameters']:,}",
                secs(v["seconds_per_epoch"], busy),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )


def render_compare(name: str, s: dict) -> str:
    d = s["data"]
    table = _compare_table(d["variants"], s["busy"])
    return (
        f"```\n$ {d['command']}\n{table}\n```\n\n{d['train_images']:,} train / "
        f"{d['val_images']:,} val images, seed {d['seed']}; the whole command took "
        f"{secs(d['wall_seconds'], s['busy'], '.0f')} s.\n\n" + provenance(name, s)
    )


def render_tflite(s: dict) -> str:
    d, busy = s["data"], s["busy"]
    files = d["files"]
    first = next(iter(files.values()))
    lines = ["| TFLite file | size | val accuracy | export s |", "| --- | ---: | ---: | ---: |"]
    lines.append(
        f"| `model_float32.tflite` (no quantization) | {first['float32_size_bytes'] / 1024:,.0f} KB "
        f"| {first['float32_val_accuracy']:.3f} | - |"
    )
    for f in files.values():
        if f["quantize"] == "none":
            continue
        label = f"`--quantize={f['quantize']}`" + (
            " (uint8 pixels in)" if f["quantize"] == "int8" else ""
        )
        lines.append(
            f"| {label} | {f['size_bytes'] / 1024:,.0f} KB | {f['val_accuracy']:.3f} "
            f"| {secs(d['export_seconds'].get(f['quantize']), busy, '.0f')} |"
        )
    return (
        "\n".join(lines)
        + f"\n\n{first['val_images']:,} validation images; the Keras model's val accuracy is "
        f"{d['keras_val_accuracy']:.3f}. The run: `{d['command']}`, then `tf-finetune export "
        "--model_dir=RUN --format=tflite --quantize=Q` for each Q.\n\n" + provenance("tflite", s)
    )


JOB_LABELS = {
    "all": "all flower photos",
    "third": "a third of them (hash-stable)",
    "two": "generated 2 classes, 224 px",
    "phone": "phone-size photos 3000x2000 -> 128",
    "lbfgs": "the third, ours `--head_solver=lbfgs`",
    "fit": "the third, ours `--head_solver=fit` (Adam for the epochs)",
}


def _jobs_table(jobs: dict, goals: dict, busy: bool) -> list[str]:
    lines = [
        "| job | train / val / test | epochs | recipe: wall s, **test** acc "
        "| tf-finetune: wall s, **test** acc | speed-up (goal) |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for name, j in jobs.items():
        walls = {side: [r["wall"] for r in j[side]] for side in ("recipe", "ours")}
        accs = {side: _mean_sd([r["test_accuracy"] for r in j[side]]) for side in walls}
        mean = {side: sum(w) / len(w) for side, w in walls.items()}
        goal = goals.get(f"{name}: speed-up")
        target = f" (≥ {goal['target']}: {'met' if goal['met'] else 'not met'})" if goal else ""
        n = j["images"]
        lines.append(
            f"| {JOB_LABELS.get(name, name)} | {n['train']:,} / {n['val']:,} / {n['test']:,} "
            f"| {j['epochs']} | {secs(mean['recipe'], busy)}, {accs['recipe']} "
            f"| {secs(mean['ours'], busy)}, {accs['ours']} "
            f"| {secs(mean['recipe'] / mean['ours'], busy, '.2f', '×')}{target} |"
        )
    return lines


def _limit_table(limit: dict, busy: bool) -> list[str]:
    lines = [
        "| files (train split) | decode alone | forward alone | limit 1/(1/d+1/f) "
        "| our feature pass | share | the pass in a run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, x in limit.items():
        ours, in_run = x["ours"], x.get("in_run")
        share = secs(ours / x["limit"], busy, ".2f") if ours else "-"
        lines.append(
            f"| {JOB_LABELS.get(name, name)} | {secs(x['decode'], busy, ',.0f')} "
            f"| {secs(x['forward'], busy, ',.0f')} | {secs(x['limit'], busy, ',.0f')} "
            f"| {secs(ours, busy, ',.0f')} | {share} "
            f"| {secs(in_run, busy, ',.0f') if in_run else '-'} |"
        )
    return lines


def render_performance(s: dict) -> str:
    d, busy = s["data"], s["busy"]
    goals = {g["goal"]: g for g in d.get("goals", [])}
    parts = []
    if d.get("jobs"):
        parts.append("\n".join(_jobs_table(d["jobs"], goals, busy)))
    if d.get("limit"):
        parts.append(
            "Images/s on the same files, each measured alone and warm in one process (best of "
            "3; `scripts/feature_pass.py`); the last column is the pass as a run reports it, "
            "one-off costs (tracing the forward, starting the pipeline) included:\n\n"
            + "\n".join(_limit_table(d["limit"], busy))
        )
    extra = []
    if d.get("rss"):
        extra.append(
            "peak RSS of a head-only `--cache=disk` run: "
            + ", ".join(f"{v['mb']:,.0f} MB on {v['images']:,} photos" for v in d["rss"].values())
        )
    if d.get("export"):
        e = d["export"]
        extra.append(
            f"the export's `serving_default`: 1 JPEG in {secs(e['latency_ms_p50'], busy)} ms "
            f"(p50; p90 {secs(e['latency_ms_p90'], busy)}), a batch of 32 at "
            f"{secs(e['batch32_images_per_s'], busy, ',.0f')} images/s"
        )
    if extra:
        parts.append("Also: " + "; ".join(extra) + ".")
    rows = ["| goal (issue 14) | target | measured | met |", "| --- | ---: | ---: | --- |"]
    for g in d.get("goals", []):
        met = "yes" if g["met"] else "**no**"
        rule = g.get("rule", ">=").replace(">=", "≥").replace("<=", "≤")
        timed = busy and not any(word in g["goal"] for word in ("accuracy", "RSS"))
        rows.append(
            f"| {g['goal']} | {rule} {g['target']} | {secs(g['measured'], timed, '.3f')} | {met} |"
        )
    parts.append("\n".join(rows))
    seeds = ", ".join(map(str, d["seeds"]))
    parts.append(
        f"Seeds {seeds} (accuracy: mean ± sd over them). "
        "`python scripts/benchmark.py` alone prints the same.\n\n" + provenance("performance", s)
    )
    return "\n\n".join(parts)


def _average(runs: list[dict], key: str) -> float:
    return sum(r[key] or 0.0 for r in runs) / len(runs)


def render_head_solver(s: dict) -> str:
    d, busy = s["data"], s["busy"]
    lines = [
        "| job | solver | **test** accuracy (multi-label: mAP) | val accuracy (mAP) "
        "| head s (`fit` stage) | wall s |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for job, solvers in d["jobs"].items():
        for solver, runs in solvers.items():
            score = "map" if "test_map" in runs[0] else "accuracy"
            lines.append(
                f"| {job} | {solver} | {_mean_sd([r['test_' + score] for r in runs])} "
                f"| {_mean_sd([r['val_' + score] for r in runs])} "
                f"| {secs(_average(runs, 'fit_seconds'), busy)} "
                f"| {secs(_average(runs, 'wall_seconds'), busy)} |"
            )
    return (
        "\n".join(lines) + f"\n\nSeeds {d['seeds']} for both solvers (mean ± sd); flowers: "
        f"`tf-finetune train {FLOWERS} {' '.join(SPLIT_70_15_15)} --head_solver=fit|lbfgs`; "
        "mosaics: the same with `--data=<mosaics>/labels.csv --task=multi_label` on "
        "`python scripts/flower_mosaics.py <mosaics>` (the photos in mosaics of 1, 2 or 4, each "
        "labelled with its photos' classes).\n\n" + provenance("head_solver", s)
    )


def render_cache_views(s: dict) -> str:
    d, busy = s["data"], s["busy"]
    lines = [
        "| setting | **test** accuracy | gain over N=0 | per view | wall s | feature pass s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in d["settings"]:
        gain = "-" if r["gain_vs_none"] is None else f"{r['gain_vs_none']:+.3f}"
        per_view = "-" if r["gain_per_view"] is None else f"{r['gain_per_view']:+.3f}"
        lines.append(
            f"| {r['name']} | {r['test_accuracy_mean']:.3f} ± {r['test_accuracy_sd']:.3f} "
            f"| {gain} | {per_view} | {secs(r['wall_mean'], busy)} "
            f"| {secs(r['feature_seconds_mean'], busy)} |"
        )
    images = d["images"]
    return (
        "\n".join(lines)
        + f"\n\nThe {d['tree']} of the flower photos ({images['train']:,} / {images['val']:,} / "
        f"{images['test']:,} train / val / test), {d['size']} px, {d['epochs']} epochs, seeds "
        f"{d['seeds']} (mean ± sd). `python scripts/cache_views.py` alone prints the same.\n\n"
        + provenance("cache_views", s)
    )


def render_probe_resplits(s: dict) -> str:
    d = s["data"]
    fixed, n = d["benchmark_split"], d["resplits"]
    images = d["images"]
    lines = [
        "| splits | recipe's head, **test** acc | L-BFGS head, **test** acc | gain |",
        "| --- | ---: | ---: | ---: |",
        f"| the benchmark's split ({images['train']:,} / {images['val']:,} / "
        f"{images['test']:,}) | {fixed['recipe']:.3f} | {fixed['lbfgs']:.3f} "
        f"| {fixed['lbfgs'] - fixed['recipe']:+.3f} |",
    ]
    if n:
        lines.append(
            f"| {n} random 70/15/15 re-splits (mean) | {d['recipe_mean']:.3f} "
            f"| {d['lbfgs_mean']:.3f} | {d['gain_mean']:+.3f} ± {d['gain_se']:.3f} (se) |"
        )
    text = "\n".join(lines) + (
        f"\n\nThe recipe's head: the mean of seeds {d['recipe_seeds']} per split, "
        f"{d['epochs']} epochs. "
    )
    if n:
        text += (
            f"Per re-split the gain's sd is {d['gain_sd']:.3f}; it is >= +0.02 on "
            f"{d['splits_gain_at_least_2_points']} of {n} re-splits, and below 0 on "
            f"{d['splits_lbfgs_worse']}. "
        )
    return (
        text
        + "`python scripts/probe_experiment.py` alone prints these numbers.\n\n"
        + provenance("probe_resplits", s)
    )


RENDER = {
    "offline_default": render_offline_default,
    "real_photos": render_real_photos,
    "compare_cold": lambda s: render_compare("compare_cold", s),
    "compare_warm": lambda s: render_compare("compare_warm", s),
    "tflite": render_tflite,
    "performance": render_performance,
    "cache_views": render_cache_views,
    "head_solver": render_head_solver,
    "probe_resplits": render_probe_resplits,
}


def render_readme(text: str, results: dict) -> str:
    """The README with every marked block regenerated from `results` (others untouched)."""

    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in results:
            return m.group(0)
        return f"{m.group(1)}{RENDER[name](results[name]).rstrip()}\n{m.group(4)}"

    return MARKER.sub(block, text)


def readme_blocks(text: str) -> dict[str, str]:
    """name -> the text between a marker pair."""
    return {m.group(2): m.group(3) for m in MARKER.finditer(text)}


def load_results(path=RESULTS) -> dict:
    return json.loads(pathlib.Path(path).read_text()) if pathlib.Path(path).exists() else {}


def merge(results: dict, name: str, section: dict) -> dict:
    """Results with one section replaced; the others kept."""
    return {**results, name: section}


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shortened runs, to check it works")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {list(MEASURE)}")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite README.md from the file"
    )
    parser.add_argument(
        "--require_idle", action="store_true", help=f"refuse above load {IDLE_LOAD}"
    )
    parser.add_argument("--results", default=str(RESULTS), help="the results file")
    parser.add_argument(
        "--settle",
        type=float,
        default=150,
        help="seconds to wait for the load average to fall after the previous section",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(MEASURE)
    unknown = set(names) - set(MEASURE)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(MEASURE)}")
    args.names = names
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    path = pathlib.Path(args.results)
    if not args.render:
        if set(args.names) & NEEDS_SHARED and not SHARED.is_dir():
            sys.exit(f"results.py: {sorted(set(args.names) & NEEDS_SHARED)} need {SHARED}")
        head = commit()
        for name in args.names:
            print(f"results.py: measuring {name} ...", flush=True)
            section = measure(name, args.quick, args.require_idle, head, args.settle)
            results = merge(load_results(path), name, section)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(str(path), json.dumps(results, indent=1, ensure_ascii=False) + "\n")
            print(f"results.py: {name} took {section['seconds']:.0f} s", flush=True)
    atomic.write_text(str(README), render_readme(README.read_text(), load_results(path)))
    print(f"results.py: rendered {README.name} from {path}")


if __name__ == "__main__":
    main()
