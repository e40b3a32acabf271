"""`tf-finetune train` at two commits, side by side: whole-run wall time and the stages of
metrics.json's `timings` (a measurement, not a test).

Each commit is checked out into a temporary git worktree. Both run one of scripts/benchmark.py's
jobs (its trees of ../shared's photos, its flags), in turns, `--runs` times each, so a change in
the machine's load hits both alike; the medians are printed at the end. Each run starts in a
neutral directory, so `python -m tf_finetune` imports that worktree's package. Check `uptime`
first: on 2 cores a busy machine flatters whichever side suffers more from it.

  python scripts/compare_commits.py abfcc3f HEAD                  # the third, 3 runs each
  python scripts/compare_commits.py HEAD~1 HEAD --job all --runs 5
"""

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import benchmark  # noqa: E402  (scripts/benchmark.py: the trees, the flags, one run of ours)


def _worktree(rev: str, work: pathlib.Path) -> pathlib.Path:
    path = work / f"src-{len(list(work.glob('src-*')))}"
    subprocess.run(
        ["git", "-C", str(benchmark.REPO), "worktree", "add", "--detach", "-q", str(path), rev],
        check=True,
    )
    return path


def _medians(rows: list[dict]) -> dict:
    stages = sorted({k for r in rows for k, v in r["timings"].items() if isinstance(v, float)})
    out = {"wall": statistics.median(r["wall"] for r in rows)}
    out.update({k: statistics.median(r["timings"].get(k, 0.0) for r in rows) for k in stages})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base", help="a git revision (the reference)")
    parser.add_argument("new", help="a git revision (the change)")
    parser.add_argument("--job", default="third", choices=sorted(benchmark.JOBS))
    parser.add_argument("--runs", type=int, default=3, help="runs of each side")
    args = parser.parse_args(argv)
    work = pathlib.Path(tempfile.mkdtemp(prefix="tf_finetune_compare_"))
    sides = {}
    try:
        sides = {rev: _worktree(rev, work) for rev in (args.base, args.new)}
        tree_name, size, epochs, extra = benchmark.JOBS[args.job]
        # The 300 phone-size photos are generated (once, cached) only for the phone job.
        phones = 300 if tree_name == "phone" else 1
        tree = benchmark.make_trees(work / "trees", phone_count=phones)[tree_name]
        rows = {rev: [] for rev in sides}
        for i in range(args.runs):
            for rev, src in sides.items():
                row = benchmark.run_ours(tree, size, epochs, 42, work, extra, repo=src)
                rows[rev].append(row)
                print(f"  run {i + 1} {rev}: {row['wall']:.2f} s", flush=True)
        print(f"\nmedians over {args.runs} runs each ({args.job}):")
        for rev in sides:
            m = _medians(rows[rev])
            stages = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "wall")
            print(f"  {rev:>12}: {m['wall']:.2f} s  ({stages})")
    finally:
        for src in sides.values():
            subprocess.run(
                ["git", "-C", str(benchmark.REPO), "worktree", "remove", "--force", str(src)],
                check=False,
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
