"""report.html: one self-contained page per run, built only from the files the run left.

`write_report(model_dir)` reads metrics.json, report_<split>.json, curves.png,
confusion_matrix_<split>.png, mistakes_<split>.png (or .txt for text runs), history.csv,
flags.cfg, label_issues.json and the export's model_card.json, and writes
`<model_dir>/report.html` atomically: images inline as data: URIs, no network reference, no
JavaScript needed to read it (a small inline script only makes the per-class table sortable).
Everything that comes from the data (class names, file names, texts) is escaped by Jinja2.
Whatever a run did not produce (no test split, no timings, no TFLite export...) is left out.

`write_index(out_dir, title, columns, rows)` writes the page `compare` and `tune` leave: their
variants or trials ranked, each linking to its run's report.html.

Deliberately free of TensorFlow and Keras: it runs in a fraction of a second.
"""

import base64
import csv
import dataclasses
import glob
import io
import json
import os
import shlex
import tempfile

import jinja2

from tf_finetune import config as config_lib

REPORT = "report.html"
COMPARE_RESULT = "compare_result.json"  # compare.VARIANT_RESULT (compare imports TensorFlow)
TEMPLATE = "report.html"
SPLITS = ("test", "val")
MAX_INLINE_EXAMPLE = 3000  # bytes of an example image the curl line carries in full
MAX_TEXT_MISTAKES = 50
# Rows of the suspected label errors table (label_issues.json keeps them all).
MAX_LABEL_ISSUES = 25
# The flags that always differ between runs and say nothing about the recipe.
NOT_A_RECIPE_FLAG = ("model_dir", "export_dir")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


# ----------------------------------------------------------------------------- reading
def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _data_uri(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError:
        return None
    if not content.startswith(b"\x89PNG"):
        return None
    return "data:image/png;base64," + base64.b64encode(content).decode("ascii")


def read_flags(path: str) -> list[str]:
    """The `--flag=value` lines of a flagfile (comments and blank lines dropped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip().startswith("--")]


def _flag_name(line: str) -> str:
    name = line.lstrip("-").split("=", 1)[0]
    return name


def flags_differing_from_defaults(flags: list[str]) -> list[str]:
    """The flag lines of a run that `config.Config`'s defaults would not write (for the
    offline default: the defaults with its preset applied, as `config.resolve` does)."""
    defaults = config_lib.Config()
    if not _flag_value(flags, "data"):
        defaults = dataclasses.replace(defaults, **config_lib.OFFLINE_DEFAULT_PRESET)
    defaults = set(read_flags_text(defaults.to_flagfile()))
    known = {f.name for f in dataclasses.fields(config_lib.Config)}
    out = []
    for line in flags:
        name = _flag_name(line)
        base = name[2:] if name.startswith("no") and name[2:] in known else name
        if base in NOT_A_RECIPE_FLAG or line in defaults:
            continue
        out.append(line)
    return out


def read_flags_text(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("--")]


def _flag_value(flags: list[str], name: str) -> str | None:
    for line in flags:
        if line.startswith(f"--{name}="):
            return line.split("=", 1)[1]
    return None


def read_history(path: str) -> list[dict]:
    """history.csv rows (the last row of a repeated epoch wins), values as floats."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        return []
    if not rows:
        return []
    header, by_epoch = rows[0], {}
    for row in rows[1:]:
        if row == header or len(row) != len(header):
            continue
        values = {}
        for key, value in zip(header, row):
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = None
        if values.get("epoch") is not None:
            by_epoch[int(values["epoch"])] = values
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_text_mistakes(path: str, limit: int = MAX_TEXT_MISTAKES) -> dict | None:
    """mistakes_<split>.txt (evaluate.write_text_mistakes): title and rows of true/predicted/
    score/text."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    title, rows = "", []
    for line in lines:
        if line.startswith("#"):
            title = title or line.lstrip("# ").strip()
            continue
        parts = line.split("\t", 3)
        if len(parts) != 4 or parts[:3] == ["true", "predicted", "score"]:
            continue
        try:
            score = float(parts[2])
        except ValueError:
            continue
        rows.append({"true": parts[0], "predicted": parts[1], "score": score, "text": parts[3]})
    return {"title": title, "rows": rows[:limit]}


def _folder_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------- the serving example
def _warmup_image(export_path: str) -> bytes | None:
    """The encoded image inside the export's warm-up request (a JPEG or PNG), if any."""
    try:
        with open(
            os.path.join(export_path, "assets.extra", "tf_serving_warmup_requests"), "rb"
        ) as f:
            blob = f.read()
    except OSError:
        return None
    start = blob.find(b"\xff\xd8\xff")
    if start >= 0:
        end = blob.find(b"\xff\xd9", start)
        return blob[start : end + 2] if end > 0 else None
    start = blob.find(b"\x89PNG\r\n\x1a\n")
    if start >= 0:
        end = blob.find(b"IEND", start)
        return blob[start : end + 8] if end > 0 else None
    return None


def _offline_digits_dir() -> str | None:
    """The offline default's PNG folders (digits.default_data_dir, found without Keras)."""
    homes = [os.environ.get("KERAS_HOME"), os.path.expanduser("~/.keras"), "/tmp/.keras"]
    for home in filter(None, homes):
        found = sorted(glob.glob(os.path.join(home, "datasets", "tf_finetune_digits_5to9_*")))
        if found:
            return found[0]
    return None


def _data_image(data: str) -> str | None:
    """A real image file of an image folder (or of an image table's folder): from test/ or
    val/ when the folder has them (the offline default: one of its digits)."""
    data = data or _offline_digits_dir() or ""
    if config_lib.is_table_file(data):
        data = os.path.dirname(os.path.abspath(data))
    if not data or not os.path.isdir(data):
        return None
    for sub in ("test", "val", "validation", ""):
        root = os.path.join(data, sub)
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    return os.path.join(dirpath, name)
    return None


def _small_png(path: str) -> bytes | None:
    """`path` as it is when small, else shrunk to at most 48 px as a PNG (Pillow, if present)."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError:
        return None
    if len(content) <= MAX_INLINE_EXAMPLE:
        return content
    try:
        from PIL import Image  # matplotlib's dependency; optional here
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(content)) as image:
            image = image.convert("RGB")
            image.thumbnail((48, 48))
            buf = io.BytesIO()
            image.save(buf, format="PNG", optimize=True)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - an undecodable file: fall back to the warm-up image
        return None


def serving_example(
    is_text: bool, flags: list[str], export_path: str | None, text_mistakes: dict | None
) -> dict | None:
    """A ready curl line for TF Serving's REST API with a real example (see docs/serving.md)."""
    name = _flag_value(flags, "model_name") or "model"
    url = f"http://localhost:8501/v1/models/{name}:predict"
    if is_text:
        text, source = "a warm-up sentence", "the export's warm-up request"
        if text_mistakes and text_mistakes["rows"]:
            text = text_mistakes["rows"][0]["text"][:300]
            source = "a text of the evaluated split"
        instance = {"text": text}
    else:
        image, source = None, ""
        path = _data_image(_flag_value(flags, "data") or "")
        if path:
            image = _small_png(path)
            small = os.path.getsize(path) <= MAX_INLINE_EXAMPLE
            source = path if small else f"{path} (shrunk to at most 48 px)"
        if not image and export_path:
            image, source = _warmup_image(export_path), "the export's warm-up image"
        if not image:
            return None
        instance = {"image_bytes": {"b64": base64.b64encode(image).decode("ascii")}}
    body = json.dumps({"signature_name": "serving_default", "instances": [instance]})
    command = (
        f"curl -s -X POST {url} \\\n  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}"
    )
    return {"command": command, "source": source, "url": url}


# ----------------------------------------------------------------------------- the model
def _tflite_rows(model_dir: str, card: dict) -> list[dict]:
    """TFLite variants with their measured accuracy: the card's "tflite" entry, or the files
    `tf-finetune export --format=tflite` recorded in <run>/tflite/model_card.json."""
    entries = card.get("tflite") if card else None
    if isinstance(entries, dict):
        entries = list(entries.values()) if "file" not in entries else [entries]
    if not entries:
        side = _read_json(os.path.join(model_dir, "tflite", "model_card.json")) or {}
        entries = list((side.get("files") or {}).values())
    rows = []
    for e in entries or []:
        if not isinstance(e, dict):
            continue
        rows.append(
            {
                "file": e.get("file") or e.get("name") or "",
                "quantize": e.get("quantize") or "none",
                "size_bytes": e.get("size_bytes"),
                "val_accuracy": e.get("val_accuracy", e.get("accuracy")),
                "float32_size_bytes": e.get("float32_size_bytes"),
                "float32_val_accuracy": e.get("float32_val_accuracy"),
            }
        )
    return rows


def _signatures(card: dict) -> list[dict]:
    out = []
    for name, text in (card.get("signatures") or {}).items():
        if name == "outputs":
            continue
        out.append({"name": name, "input": text})
    return out


# ----------------------------------------------------------------------------- the page
def _split_section(model_dir: str, split: str, report: dict, is_text: bool) -> dict:
    confusion_png = f"confusion_matrix_{split}.png"
    multi_label = "per_label" in report
    if multi_label:  # per-label rows (with AP and threshold), mAP, label confusion
        report = {
            **report,
            "class_names": report.get("label_names"),
            "per_class": report["per_label"],
            "accuracy": report.get("subset_accuracy"),
        }
        confusion_png = f"label_confusion_{split}.png"
    names = report.get("class_names") or []
    per_class = report.get("per_class") or {}
    rows = [{"name": n, **per_class[n]} for n in names if n in per_class]
    matrix = report.get("confusion_matrix")
    if matrix is not None and len(matrix) != len(names):
        matrix = None
    text_mistakes = read_text_mistakes(os.path.join(model_dir, f"mistakes_{split}.txt"))
    total_mistakes = None
    if matrix is not None:
        total_mistakes = int(report.get("num_examples", 0)) - sum(
            matrix[i][i] for i in range(len(matrix))
        )
    return {
        "split": split,
        "report": report,
        "multi_label": multi_label,
        "positives": sum(int(r.get("support") or 0) for r in rows),
        "rows": rows,
        "matrix": matrix,
        "class_names": names,
        "confusion_png": _data_uri(os.path.join(model_dir, confusion_png)),
        "mistakes_png": None
        if is_text
        else _data_uri(os.path.join(model_dir, f"mistakes_{split}.png")),
        "mistakes": report.get("mistakes") if isinstance(report.get("mistakes"), list) else None,
        "text_mistakes": text_mistakes,
        "total_mistakes": total_mistakes,
        "predictions_csv": f"predictions_{split}.csv"
        if os.path.exists(os.path.join(model_dir, f"predictions_{split}.csv"))
        else None,
    }


def _label_issues(model_dir: str) -> list[dict] | None:
    """The first suspects of label_issues.json (`evaluate --label_issues` writes them under
    "suspects"; a plain list is read too), or None without the file."""
    issues = _read_json(os.path.join(model_dir, "label_issues.json"))
    if isinstance(issues, dict):
        issues = issues.get("suspects", issues.get("issues"))
    if not isinstance(issues, list):
        return None
    return [i for i in issues if isinstance(i, dict)][:MAX_LABEL_ISSUES]


def _find_export(export_path: str | None, flags: list[str], model_dir: str) -> str | None:
    """metrics.json's export path; a relative one (relative to where the run was started)
    found again from the run dir when this process runs elsewhere."""
    if not export_path or os.path.exists(export_path):
        return export_path
    run_flag = _flag_value(flags, "model_dir")
    if run_flag and export_path.startswith(run_flag.rstrip(os.sep) + os.sep):
        moved = os.path.join(model_dir, export_path[len(run_flag.rstrip(os.sep)) + 1 :])
        if os.path.exists(moved):
            return moved
    return export_path


def _run_files(model_dir: str) -> tuple[dict, bool, list, dict, dict]:
    """metrics (or a compare variant's row), whether metrics.json exists, flags, the export's
    model card and the per-split reports."""
    metrics = _read_json(os.path.join(model_dir, "metrics.json")) or {}
    has_metrics = bool(metrics)
    if not metrics:  # a compare variant: its row (val scores, parameters, epoch seconds)
        metrics = _read_json(os.path.join(model_dir, COMPARE_RESULT)) or {}
        metrics = {k: v for k, v in metrics.items() if k != "flags"}
    flags = read_flags(os.path.join(model_dir, "flags.cfg"))
    export_path = _find_export(metrics.get("export_path"), flags, model_dir)
    card = {}
    if export_path:
        card = _read_json(os.path.join(export_path, "model_card.json")) or {}
    card["_path"] = export_path
    reports = {}
    for split in SPLITS:
        rep = _read_json(os.path.join(model_dir, f"report_{split}.json"))
        if isinstance(rep, dict):
            reports[split] = rep
    return metrics, has_metrics, flags, card, reports


def _headline(metrics: dict) -> dict:
    """Test numbers when there is a test split, else val's (marked optimistic)."""
    split = "test" if metrics.get("test_accuracy") is not None else "val"
    return {
        "split": split,
        "optimistic": split == "val",
        "accuracy": metrics.get(f"{split}_accuracy"),
        "macro_f1": metrics.get(f"{split}_macro_f1"),
        "map": metrics.get(f"{split}_map"),
        "loss": metrics.get(f"{split}_loss"),
    }


def _baselines(metrics: dict, split: str) -> list[dict]:
    baselines = []
    for prefix, label in (("scratch_", "same net from scratch"), ("recipe_", "recipe baseline")):
        acc = metrics.get(f"{prefix}{split}_accuracy")
        if acc is not None:
            baselines.append(
                {
                    "key": f"{prefix}{split}_accuracy",
                    "label": label,
                    "accuracy": acc,
                    "loss": metrics.get(f"{prefix}{split}_loss"),
                }
            )
    return baselines


def _class_counts(metrics: dict, card: dict, reports: dict) -> tuple[list[dict], list[str]]:
    """Per class and split: the evaluated splits' supports, and metrics' `class_counts`
    ({split: {class: n}}) when a producer adds it."""
    class_names = metrics.get("class_names") or card.get("class_names") or []
    counts = []
    for name in class_names:
        row = {"name": name}
        for split, rep in reports.items():
            row[split] = (rep.get("per_class") or {}).get(name, {}).get("support")
        counts.append(row)
    class_counts = metrics.get("class_counts")
    if isinstance(class_counts, dict):
        for row in counts:
            for split, per in class_counts.items():
                if isinstance(per, dict) and row["name"] in per:
                    row[split] = per[row["name"]]
    splits = [s for s in ("train", "val", "test") if any(r.get(s) is not None for r in counts)]
    return counts, splits


def _export_section(model_dir, card, is_text, flags, text_mistakes) -> dict | None:
    export_path = card.get("_path")
    if not export_path:
        return None
    exists = os.path.exists(export_path)
    return {
        "path": export_path,
        "version": card.get("version", os.path.basename(os.path.normpath(export_path))),
        "exists": exists,
        "size": human_size(_folder_size(export_path)) if exists else None,
        "size_bytes": _folder_size(export_path) if exists else None,
        "signatures": _signatures(card),
        "outputs": (card.get("signatures") or {}).get("outputs"),
        "non_core_ops": card.get("non_core_ops"),
        "tflite": _tflite_rows(model_dir, card),
        "created": card.get("created"),
        "versions": (card.get("tensorflow_version"), card.get("keras_version")),
        "curl": serving_example(is_text, flags, export_path, text_mistakes),
    }


def _is_text(model_dir: str, card: dict, flags: list[str]) -> bool:
    """The export's serving input says; without an export, a table of texts (not of image
    files) or a text mistakes file does."""
    serving_input = (card.get("signatures") or {}).get("serving_default")
    if serving_input:
        return str(serving_input).startswith("text")
    data = _flag_value(flags, "data") or ""
    images = config_lib.table_holds_images(
        data,
        _flag_value(flags, "file_column") or "file",
        _flag_value(flags, "text_column") or "text",
    )
    return (config_lib.is_table_file(data) and not images) or any(
        os.path.exists(os.path.join(model_dir, f"mistakes_{s}.txt")) for s in SPLITS
    )


def _timings(metrics: dict) -> tuple[dict | None, float | None]:
    """Seconds per stage, and the feature pass's images/s (kept apart: not seconds)."""
    timings = metrics.get("timings") if isinstance(metrics.get("timings"), dict) else None
    rate = metrics.get("feature_images_per_second")
    if timings and "feature_images_per_second" in timings:
        timings = dict(timings)
        rate = timings.pop("feature_images_per_second")
    return timings, rate


def collect(model_dir: str) -> dict:
    """Everything the page shows, read from the run dir (missing pieces are None or empty)."""
    model_dir = os.path.abspath(model_dir)
    metrics, has_metrics, flags, card, reports = _run_files(model_dir)
    data = _flag_value(flags, "data") or ""
    is_text = _is_text(model_dir, card, flags)
    headline = _headline(metrics)
    counts, count_splits = _class_counts(metrics, card, reports)
    split_order = [headline["split"]] + [s for s in SPLITS if s != headline["split"]]
    sections = [
        _split_section(model_dir, s, reports[s], is_text) for s in split_order if s in reports
    ]
    text_mistakes = next((s["text_mistakes"] for s in sections if s["text_mistakes"]), None)
    timings, rate = _timings(metrics)
    history = read_history(os.path.join(model_dir, "history.csv"))
    rerun = f"tf-finetune train --flagfile={os.path.join(model_dir, 'flags.cfg')}"
    return {
        "title": f"tf-finetune report: {os.path.basename(model_dir)}",
        "model_dir": model_dir,
        "metrics": metrics,
        "has_metrics": has_metrics,
        "task": "text classification" if is_text else "image classification",
        "is_text": is_text,
        "data": card.get("data") or data or None,
        "backbone": metrics.get("backbone") or _flag_value(flags, "backbone"),
        "flags_changed": flags_differing_from_defaults(flags),
        "rerun": rerun if flags else None,
        "headline": headline,
        "baselines": _baselines(metrics, headline["split"]),
        "counts": counts,
        "count_splits": count_splits,
        "skipped": metrics.get("skipped_files") or [],
        "curves_png": _data_uri(os.path.join(model_dir, "curves.png")),
        "phase_boundary": metrics.get("phase_boundary_epoch"),
        "timings": timings,
        "images_per_second": rate,
        "epoch_seconds": metrics.get("epoch_seconds") or {},
        "history": history,
        "history_keys": [k for k in (history[0].keys() if history else []) if k != "epoch"],
        "sections": sections,
        "label_issues": _label_issues(model_dir),
        "export": _export_section(model_dir, card, is_text, flags, text_mistakes),
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tf_finetune", "templates"),
        autoescape=True,  # class names, file names and texts are user input
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = lambda v, digits=4: "" if v is None else f"{v:.{digits}f}"
    env.filters["secs"] = lambda v: "" if v is None else f"{v:.1f} s"
    env.filters["raw"] = lambda v: "" if v is None else repr(v)
    return env


def write_atomically(path: str, text: str) -> str:
    """Writes `text` to `path` through a temporary file in the same folder (fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def render_report(model_dir: str) -> str:
    return _environment().get_template(TEMPLATE).render(page="run", **collect(model_dir))


def write_report(model_dir: str) -> str:
    """Writes `<model_dir>/report.html` from the run's files; returns its path."""
    return write_atomically(os.path.join(model_dir, REPORT), render_report(model_dir))


def write_index(
    out_dir: str,
    title: str,
    columns: list[tuple[str, str]],
    rows: list[dict],
    note: str = "",
) -> str:
    """`<out_dir>/report.html`: `rows` ranked as given (best first), one column per
    (key, heading) of `columns`; a row's "run_dir" links to its report.html (written here from
    whatever that run dir holds). Returns the page's path."""
    out_dir = os.path.abspath(out_dir)
    items = []
    for rank, row in enumerate(rows, 1):
        run_dir = row.get("run_dir")
        link = None
        if run_dir and os.path.isdir(run_dir):
            page = write_report(run_dir)
            link = os.path.relpath(page, out_dir)
        items.append(
            {
                "rank": rank,
                "link": link,
                "cells": [{"key": k, "value": row.get(k)} for k, _ in columns],
            }
        )
    html = (
        _environment()
        .get_template(TEMPLATE)
        .render(
            page="index",
            title=title,
            model_dir=out_dir,
            note=note,
            columns=columns,
            items=items,
        )
    )
    return write_atomically(os.path.join(out_dir, REPORT), html)
