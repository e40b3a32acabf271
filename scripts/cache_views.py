"""--cache_views=N against --augment=none and against augmentation on pixels (issue 14 item 5).

Head-only runs (frozen MobileNetV2-0.35, ImageNet weights from ../shared) on the flower photos'
70/15/15 split trees of scripts/benchmark.py (the "third" by default: 1,441 photos, 1,009 train),
at 128 px, each `tf-finetune train` in its own subprocess (benchmark.run_ours: fresh KERAS_HOME,
no warm caches), scored on the test split:

  N views   --cache_views=N for N in --views (0 = --augment=none), with each --solvers
            (fit: Adam for --epochs, an epoch passing over every view; lbfgs: one solve)
  steps     fit, N=0 for --epochs x (1 + the largest N): as many Adam steps as that N's run
            takes (its epochs pass over every view), to tell the views' gain from more steps
  pixels    --augment=light (flip, rotation, zoom on pixels: the backbone runs every epoch),
            fit, the same epochs

Reported per setting: test accuracy mean ± sd over --seeds seeds (42, 43, ...), its gain over
N=0 of the same solver, and the whole-process wall time (start -> exit, export included), as a
table and as JSON (--json).

  python scripts/cache_views.py                         # 3 seeds, the third (~12 min, 2 idle cores)
  python scripts/cache_views.py --seeds 1 --json views.json
  python scripts/cache_views.py --tree all --views 0,2 --solvers lbfgs
"""

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: trees, weights, the subprocess run)

PIXELS, STEPS = "pixels", "steps"


def settings(
    views: list[int], solvers: list[str], epochs: int, pixels: bool, steps: bool
) -> list[dict]:
    """(name, solver, views, epochs, extra flags) of every run per seed, in order."""
    out = [
        {
            "name": f"{solver}, N={n}",
            "solver": solver,
            "views": n,
            "epochs": epochs,
            "flags": [f"--head_solver={solver}", f"--cache_views={n}"],
        }
        for solver in solvers
        for n in views
    ]
    most = max(views)
    if steps and "fit" in solvers and most > 0:
        out.append(
            {
                "name": f"fit, N=0, {epochs * (1 + most)} epochs (steps of N={most})",
                "solver": "fit",
                "views": STEPS,
                "epochs": epochs * (1 + most),
                "flags": ["--head_solver=fit", "--cache_views=0"],
            }
        )
    if pixels:
        out.append(
            {
                "name": "fit, --augment=light (pixels)",
                "solver": "fit",
                "views": PIXELS,
                "epochs": epochs,
                "flags": ["--head_solver=fit", "--augment=light"],
            }
        )
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± sd per setting, and the gain over N=0 of the same solver."""
    for row in rows:
        row["test_accuracy_mean"], row["test_accuracy_sd"] = _stats(
            [r["test_accuracy"] for r in row["runs"]]
        )
        row["wall_mean"], row["wall_sd"] = _stats([r["wall"] for r in row["runs"]])
        row["feature_seconds_mean"] = statistics.mean(
            r["timings"].get("features", 0.0) for r in row["runs"]
        )
    base = {r["solver"]: r for r in rows if r["views"] == 0}
    for row in rows:
        ref = base.get(row["solver"])
        row["gain_vs_none"] = row["test_accuracy_mean"] - ref["test_accuracy_mean"] if ref else None
        per_view = isinstance(row["views"], int) and row["views"] > 0 and ref
        row["gain_per_view"] = row["gain_vs_none"] / row["views"] if per_view else None
    return rows


def print_table(rows: list[dict], seeds: list[int]) -> None:
    print(f"\nseeds {seeds}; test accuracy mean ± sd; gain vs N=0 of the same solver")
    header = f"{'setting':44s} {'test accuracy':>15s} {'gain':>7s} {'per view':>9s} "
    print(header + f"{'wall s':>13s} {'features s':>10s}")
    for r in rows:
        gain = "" if r["gain_vs_none"] is None else f"{r['gain_vs_none']:+.3f}"
        per_view = "" if r["gain_per_view"] is None else f"{r['gain_per_view']:+.3f}"
        print(
            f"{r['name']:44s} {r['test_accuracy_mean']:.3f} ± {r['test_accuracy_sd']:.3f} "
            f"{gain:>7s} {per_view:>9s} {r['wall_mean']:6.1f} ± {r['wall_sd']:4.1f} "
            f"{r['feature_seconds_mean']:10.1f}"
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default="third", choices=("third", "all"), help="[third]")
    parser.add_argument("--views", default="0,1,2,4", help="values of N [0,1,2,4]")
    parser.add_argument("--solvers", default="fit,lbfgs", help="[fit,lbfgs]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting [3]")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of fit [8]")
    parser.add_argument("--size", type=int, default=128, help="image size [128]")
    parser.add_argument("--no_pixels", action="store_true", help="skip the --augment=light run")
    parser.add_argument("--no_steps", action="store_true", help="skip the N=0 many-epochs run")
    parser.add_argument("--json", default="cache_views.json", help="where to write the results")
    args = parser.parse_args(argv)
    try:
        args.views = [int(v) for v in args.views.split(",")]
    except ValueError:
        parser.error(f"--views={args.views}: comma-separated integers, e.g. 0,1,2,4")
    args.solvers = [s for s in args.solvers.split(",") if s]
    if set(args.solvers) - {"fit", "lbfgs"} or not args.solvers:
        parser.error(f"--solvers={','.join(args.solvers)}: fit and/or lbfgs")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not benchmark.WEIGHTS.exists() or not benchmark.FLOWERS.is_dir():
        sys.exit(f"cache_views.py needs {benchmark.SHARED} (real weights and photos).")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tf_finetune_views_"))
    try:
        tree = benchmark.make_trees(work, phone_count=0)[args.tree]
        seeds = [42 + i for i in range(args.seeds)]
        chosen = settings(
            args.views, args.solvers, args.epochs, not args.no_pixels, not args.no_steps
        )
        rows = [{**s, "runs": []} for s in chosen]
        for seed in seeds:  # seed by seed, so a change of load hits every setting alike
            for row in rows:
                run = benchmark.run_ours(tree, args.size, row["epochs"], seed, work, row["flags"])
                shutil.rmtree(run.pop("model_dir"), ignore_errors=True)
                row["runs"].append(run)
                print(
                    f"  seed {seed} {row['name']}: test {run['test_accuracy']:.3f}, "
                    f"{run['wall']:.1f} s",
                    flush=True,
                )
        counts = {s: sum(1 for _ in (tree / s).rglob("*.jpg")) for s in ("train", "val", "test")}
        result = {
            "tree": args.tree,
            "images": counts,
            "size": args.size,
            "epochs": args.epochs,
            "seeds": seeds,
            "settings": summarize(rows),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(result["settings"], seeds)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
