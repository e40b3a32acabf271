"""`tf-finetune check-data`: what training would see in an image folder, without training.

Class counts per split (the same splits training makes, including a test split carved with
--test_percent), unreadable files with the reason, exact duplicate files (by content hash)
within a split and across splits (leakage: the same image in train and val/test inflates the
honest numbers), class imbalance, image sizes from the file headers (nothing is decoded twice),
and the files that were ignored.
"""

import collections
import hashlib
import os
import statistics

from tf_finetune import data
from tf_finetune.errors import UserError

# A largest/smallest class ratio from which the report warns: accuracy then mostly reflects
# the big classes (look at per-class recall, or rebalance).
IMBALANCE_WARNING_RATIO = 3.0


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _ignored_files(root: str) -> dict[str, list[str]]:
    """Files training never looks at: hidden ones and ones without an image extension."""
    ignored = {"hidden": [], "not an image extension": []}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = data.printable_path(os.path.join(dirpath, name))
            if name.startswith("."):
                ignored["hidden"].append(path)
            elif not name.lower().endswith(data.IMAGE_EXTENSIONS):
                ignored["not an image extension"].append(path)
    return ignored


def _size_stats(sizes: list[tuple[int, int]], image_size: int) -> dict:
    if not sizes:
        return {}
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return {
        "images": len(sizes),
        "width": {"min": min(widths), "median": statistics.median(widths), "max": max(widths)},
        "height": {"min": min(heights), "median": statistics.median(heights), "max": max(heights)},
        "smaller_than_image_size": sum(min(w, h) < image_size for w, h in sizes),
        "non_square": sum(w != h for w, h in sizes),
    }


def _scan_splits(listing, bad: set[str]) -> tuple[dict, list[tuple[int, int]], dict]:
    """One pass over every readable file: class counts, header sizes and content hashes.

    Returns:
      (counts {split: {class: n}} with every class present, sizes [(width, height)] of the
      files whose header gives one, {sha256: [(split, class, path)]}).
    """
    counts, sizes, by_hash = {}, [], collections.defaultdict(list)
    for split, (paths, labels) in listing.splits.items():
        per_class = collections.Counter()
        for path, label in zip(paths, labels):
            if path in bad:
                continue  # reported as unreadable; training skips it too
            per_class[listing.class_names[label]] += 1
            header = data.image_header(path)
            if header and header[1] is not None:
                sizes.append(header[1:])
            by_hash[_sha256(path)].append((split, listing.class_names[label], path))
        counts[split] = {name: per_class.get(name, 0) for name in listing.class_names}
    return counts, sizes, by_hash


def _duplicate_groups(by_hash: dict) -> list[dict]:
    """Groups of files with the same content, leaks (across splits) first."""
    duplicates = []
    for copies in by_hash.values():
        if len(copies) > 1:
            splits = sorted({s for s, _, _ in copies})
            classes = sorted({c for _, c, _ in copies})
            duplicates.append(
                {
                    "files": [p for _, _, p in copies],
                    "splits": splits,
                    "classes": classes,
                    "leak": len(splits) > 1,
                    "conflicting_labels": len(classes) > 1,
                }
            )
    duplicates.sort(key=lambda d: (not d["leak"], d["files"]))
    return duplicates


def _imbalance(train_counts: dict[str, int]) -> dict:
    """Largest and smallest train class, their ratio, and whether it deserves a warning."""
    largest, smallest = max(train_counts.values()), min(train_counts.values())
    return {
        "largest": largest,
        "smallest": smallest,
        "ratio": (largest / smallest) if smallest else float("inf"),
        "warning": smallest == 0 or largest / smallest >= IMBALANCE_WARNING_RATIO,
    }


def check_folder(
    root: str,
    validation_percent: int,
    image_size: int,
    test_percent: int = 0,
    max_image_pixels: int = data.MAX_IMAGE_PIXELS,
) -> dict:
    """The report as a dict (see `format_report` for what each part means).

    The splits are the ones training makes: a folder's train/ val/ test/, or val (and, with
    `test_percent`, test) carved by path hash from a plain class folder.
    """
    if root.startswith("tfds:"):
        raise UserError("check-data checks image folders; TFDS data sets are already curated.")
    listing = data.list_image_folder(root, validation_percent, test_percent)
    carved = not os.path.isdir(os.path.join(root, "train"))
    all_paths = [p for paths, _ in listing.splits.values() for p in paths]
    unreadable = list(listing.unusable) + data.find_unreadable(all_paths, max_image_pixels)
    counts, sizes, by_hash = _scan_splits(listing, {p for p, _ in unreadable})
    return {
        "data": root,
        "carved": (
            {"validation_percent": validation_percent, "test_percent": test_percent}
            if carved
            else None
        ),
        "class_names": list(listing.class_names),
        "counts": counts,
        "unreadable": [{"file": p, "reason": r} for p, r in unreadable],
        "duplicates": _duplicate_groups(by_hash),
        "imbalance": _imbalance(counts["train"]),
        "sizes": _size_stats(sizes, image_size),
        "image_size": image_size,
        "ignored": _ignored_files(root),
    }


# ----------------------------------------------------------------------------- text
# Each section of the printed report is one function returning its lines; `format_report`
# joins them in reading order.


def _capped(lines: list[str], max_listed: int) -> list[str]:
    """The first `max_listed` lines, then how many more were left out (long lists stay short)."""
    shown = lines[:max_listed]
    if len(lines) > max_listed:
        shown.append(f"  ... and {len(lines) - max_listed} more")
    return shown


def _header_lines(report: dict) -> list[str]:
    lines = [f"Data: {report['data']}"]
    carved = report.get("carved")
    if carved:
        test = carved["test_percent"]
        lines.append(
            f"Splits carved by a hash of each path: val {carved['validation_percent']}%"
            + (f", test {test}%" if test else ", no test (--test_percent=15 holds one out)")
            + "; adding images never moves old ones."
        )
    return lines


def _count_lines(report: dict) -> list[str]:
    """A table: one row per class, one column per split, then the totals."""
    names, counts = report["class_names"], report["counts"]
    splits = list(counts)
    width = max(12, *(len(n) for n in names))
    lines = ["", f"  {'class':{width}s}" + "".join(f"{s:>8s}" for s in splits)]
    for name in names:
        lines.append(f"  {name:{width}s}" + "".join(f"{counts[s][name]:8d}" for s in splits))
    totals = "".join(f"{sum(counts[s].values()):8d}" for s in splits)
    lines.append(f"  {'total':{width}s}{totals}")
    return lines


def _balance_lines(imb: dict) -> list[str]:
    ratio = "inf" if imb["ratio"] == float("inf") else f"{imb['ratio']:.1f}"
    note = (
        f"  WARNING: imbalanced (>= {IMBALANCE_WARNING_RATIO:g}); accuracy mostly reflects the "
        "large classes: read per-class recall, or add images to the small ones."
        if imb["warning"]
        else ""
    )
    return [
        "",
        f"Class balance (train): largest {imb['largest']}, smallest {imb['smallest']}, "
        f"ratio {ratio}.{note}",
    ]


def _unreadable_lines(unreadable: list[dict], max_listed: int) -> list[str]:
    listed = [f"  {u['file']}: {u['reason']}" for u in unreadable]
    return ["", f"Unreadable files (skipped by training): {len(unreadable)}"] + _capped(
        listed, max_listed
    )


def _duplicate_line(group: dict) -> str:
    """The files of one group joined by '=', tagged with what makes the group harmful."""
    tags = ", ".join(
        t
        for t, on in (
            (f"LEAK {'/'.join(group['splits'])}", group["leak"]),
            ("CONFLICTING LABELS " + "/".join(group["classes"]), group["conflicting_labels"]),
        )
        if on
    )
    return f"  {' = '.join(group['files'])}" + (f"  [{tags}]" if tags else "")


def _duplicate_lines(dups: list[dict], max_listed: int) -> list[str]:
    leaks = [d for d in dups if d["leak"]]
    conflicts = [d for d in dups if d["conflicting_labels"]]
    summary = (
        f"Exact duplicates: {len(dups)} group(s); {len(leaks)} across splits (leakage: "
        f"inflates val/test numbers), {len(conflicts)} with different labels."
    )
    return ["", summary] + _capped([_duplicate_line(d) for d in dups], max_listed)


def _size_lines(report: dict) -> list[str]:
    sizes = report["sizes"]
    if not sizes:
        return []  # no file had a readable header
    w, h = sizes["width"], sizes["height"]
    return [
        "",
        f"Image sizes ({sizes['images']} images, from headers): width {w['min']}-{w['max']} "
        f"(median {w['median']:g}), height {h['min']}-{h['max']} (median {h['median']:g}); "
        f"{sizes['non_square']} not square; {sizes['smaller_than_image_size']} smaller than "
        f"--image_size={report['image_size']} (upscaled).",
    ]


def _ignored_lines(ignored: dict[str, list[str]]) -> list[str]:
    not_images = ignored["not an image extension"]
    return [
        "",
        f"Ignored: {len(ignored['hidden'])} hidden file(s), "
        f"{len(not_images)} without an image extension "
        f"({', '.join(data.IMAGE_EXTENSIONS)}, any case)"
        + (f", e.g. {not_images[0]}" if not_images else "")
        + ".",
    ]


def format_report(report: dict, max_listed: int = 20) -> str:
    """The report as text for the terminal.

    Args:
      report: what `check_folder` returned.
      max_listed: at most this many unreadable files and duplicate groups are listed each.

    Returns:
      The text, sections separated by blank lines, without a final newline.
    """
    lines = (
        _header_lines(report)
        + _count_lines(report)
        + _balance_lines(report["imbalance"])
        + _unreadable_lines(report["unreadable"], max_listed)
        + _duplicate_lines(report["duplicates"], max_listed)
        + _size_lines(report)
        + _ignored_lines(report["ignored"])
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- multi-label
# A label with fewer training examples than this is flagged: a sigmoid output learns little
# from a handful of positives, and its threshold cannot be chosen well.
FEW_EXAMPLES = 10


def label_statistics(class_names, targets: dict, few: int = FEW_EXAMPLES) -> dict:
    """Multi-label data at a glance: per split, examples and how many carry no label; per
    label, its examples in each split; the most frequent label pairs (train); the labels with
    fewer than `few` training examples, or none in val (no threshold can be chosen there).

    `targets`: {split: multi-hot array [n, labels]}.
    """
    import numpy as np

    from tf_finetune import multilabel_metrics

    names = list(class_names)
    arrays = {split: np.asarray(y) > 0 for split, y in targets.items()}
    together = multilabel_metrics.co_occurrence(arrays["train"])
    pairs = [
        {"labels": [names[i], names[j]], "train": int(together[i, j])}
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if together[i, j]
    ]
    val = arrays.get("val")
    return {
        "splits": {
            split: {"examples": int(y.shape[0]), "without_labels": int((~y.any(axis=1)).sum())}
            for split, y in arrays.items()
        },
        "per_label": {
            name: {split: int(y[:, i].sum()) for split, y in arrays.items()}
            for i, name in enumerate(names)
        },
        "top_pairs": sorted(pairs, key=lambda p: -p["train"])[:10],
        "too_few": [n for i, n in enumerate(names) if arrays["train"][:, i].sum() < few],
        "no_val_positive": []
        if val is None
        else [n for i, n in enumerate(names) if not val[:, i].any()],
    }


def format_label_statistics(stats: dict) -> str:
    """`label_statistics` as text: one row per label, then the pairs and the warnings."""
    splits = list(stats["splits"])
    width = max([len(n) for n in stats["per_label"]] + [12])
    lines = [f"{'label':<{width}} " + " ".join(f"{s:>7}" for s in splits)]
    for name, counts in stats["per_label"].items():
        lines.append(f"{name:<{width}} " + " ".join(f"{counts[s]:>7}" for s in splits))
    lines.append(
        f"{'(no label)':<{width}} "
        + " ".join(f"{stats['splits'][s]['without_labels']:>7}" for s in splits)
    )
    lines.append(
        f"{'examples':<{width}} " + " ".join(f"{stats['splits'][s]['examples']:>7}" for s in splits)
    )
    if stats["top_pairs"]:
        lines.append(
            "most frequent label pairs (train): "
            + ", ".join(
                f"{a}+{b} {n}"
                for (a, b), n in ((p["labels"], p["train"]) for p in stats["top_pairs"][:5])
            )
        )
    if stats["too_few"]:
        lines.append(
            f"WARNING: fewer than {FEW_EXAMPLES} training examples: {', '.join(stats['too_few'])} "
            "(little to learn from; consider more images or dropping the label)"
        )
    if stats["no_val_positive"]:
        lines.append(
            f"WARNING: no validation example of {', '.join(stats['no_val_positive'])}: their "
            "threshold falls back to --threshold"
        )
    skipped = stats.get("skipped_files", [])
    if skipped:
        shown = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:5])
        lines.append(f"{len(skipped)} unreadable file(s) skipped: {shown}")
    return "\n".join(lines)


def multi_label_report(dataset) -> dict:
    """`label_statistics` of a loaded multi-label DataSet, read from its labels alone."""
    import numpy as np

    targets = {}
    for split in ("train", "val", "test"):
        part = getattr(dataset, split)
        if part is not None:
            targets[split] = np.array([y for _, y in part.source.as_numpy_iterator()])
    stats = label_statistics(dataset.class_names, targets)
    stats["skipped_files"] = [{"file": p, "reason": r} for p, r in dataset.skipped_files]
    return stats
