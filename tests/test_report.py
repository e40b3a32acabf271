"""report.html: structure, numbers, escaping, a real browser, and the compare page.

One tiny real run (3 classes at 16 px, 2 epochs, train/val/test folders) serves every test.
Its second class folder is named `<img src=x onerror=alert(1)>`: a valid folder name on Linux,
which `<script>alert(1)</script>` is not (it holds a '/'); that name is tested too, written
into a copy of the run's JSON files (as a CSV data set's label would carry it).
"""

import base64
import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import html5lib
import pytest
from PIL import Image

from tests.images import class_image, encode
from tf_finetune import cli, report

HOSTILE_FOLDER = "<img src=x onerror=alert(1)>"
HOSTILE_LABEL = "<script>alert(1)</script>"
CLASSES = ["class_a", HOSTILE_FOLDER, "class_c"]


def _write_splits(root: pathlib.Path) -> pathlib.Path:
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                image = class_image(
                    label,
                    (20, 20),
                    seed={"train": 0, "val": 1, "test": 2}[split] * 1000 + label * 100 + j,
                )
                (folder / f"img_{j}.png").write_bytes(encode(image, "PNG"))
    (root / "train" / "class_a" / "broken.jpg").write_bytes(b"not an image")
    return root


def _main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = _write_splits(tmp_path_factory.mktemp("photos"))
    model_dir = tmp_path_factory.mktemp("runs") / "r1"
    code, out = _main(
        [
            "train",
            f"--data={data}",
            "--backbone=digits_cnn",
            "--weights=none",
            "--image_size=16",
            "--epochs=2",
            "--batch_size=8",
            "--learning_rate=0.01",
            f"--model_dir={model_dir}",
        ]
    )
    assert code == 0, out
    return {"dir": model_dir, "out": out, "data": data}


def _parse(path) -> tuple[str, object]:
    text = pathlib.Path(path).read_text(encoding="utf-8")
    parser = html5lib.HTMLParser(strict=False, namespaceHTMLElements=False)
    return text, parser.parse(text)


def _by_id(tree, id_):
    found = [e for e in tree.iter() if e.get("id") == id_]
    assert len(found) == 1, f"#{id_}: {len(found)} elements"
    return found[0]


def _text(element) -> str:
    return "".join(element.itertext()).strip()


def _json(path):
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


def test_train_prints_the_report_path_last_and_the_page_is_whole(run):
    page = run["dir"] / "report.html"
    assert run["out"].strip().splitlines()[-1] == f"Report:        {page}"
    assert page.is_file()
    assert not [p for p in os.listdir(run["dir"]) if p.endswith(".tmp")]  # atomic write
    text, tree = _parse(page)
    assert _text(tree.find(".//title")) == "tf-finetune report: r1"
    # Every image is inline and decodes as a PNG; nothing is fetched from anywhere.
    images = list(tree.iter("img"))
    assert len(images) >= 5  # curves, 2 confusion matrices, 2 mistake grids
    for img in images:
        src = img.get("src")
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as decoded:
            assert decoded.format == "PNG" and decoded.size[0] > 10
    for element in tree.iter():
        for attr in ("src", "href"):
            value = element.get(attr) or ""
            assert not value.startswith(("http:", "https:", "//")), (element.tag, value)
    assert tree.find(".//link") is None
    assert all(s.get("src") is None for s in tree.iter("script"))


def test_every_number_on_the_page_is_the_runs(run):
    metrics = _json(run["dir"] / "metrics.json")
    _, tree = _parse(run["dir"] / "report.html")

    def value(id_):
        return _by_id(tree, id_).get("data-value")

    assert float(value("headline-accuracy")) == metrics["test_accuracy"]
    assert _text(_by_id(tree, "headline-accuracy")) == f"{metrics['test_accuracy']:.4f}"
    assert float(value("headline-macro-f1")) == metrics["test_macro_f1"]
    for key in ("train_images", "val_images", "test_images"):
        assert int(value(key.replace("_", "-"))) == metrics[key]
    assert int(value("skipped-count")) == len(metrics["skipped_files"]) == 1
    assert "broken.jpg" in _text(_by_id(tree, "skipped"))
    assert _text(_by_id(tree, "headline-label")) == "test accuracy"  # not optimistic: a test split
    for split in ("test", "val"):
        rep = _json(run["dir"] / f"report_{split}.json")
        assert float(value(f"accuracy-{split}")) == rep["accuracy"]
        assert float(value(f"macro-f1-{split}")) == rep["macro_f1"]
        table = _by_id(tree, f"per-class-{split}")
        rows = table.findall("./tbody/tr")
        assert [r.get("data-class") for r in rows] == rep["class_names"] == sorted(CLASSES)
        for row in rows:
            per = rep["per_class"][row.get("data-class")]
            cells = [c.get("data-value") for c in row.iter("span")]
            assert [float(c) for c in cells[:3]] == [per["precision"], per["recall"], per["f1"]]
            assert int(cells[3]) == per["support"]
        matrix = [
            [int(td.get("data-value")) for td in tr.findall("td")]
            for tr in _by_id(tree, f"confusion-{split}").findall("./tbody/tr")
        ]
        assert matrix == rep["confusion_matrix"]
    # Whatever the page rounds, it rounds from the exact value it carries.
    spans = [e for e in tree.iter("span") if e.get("class") == "n"]
    assert len(spans) > 30
    for span in spans:
        raw = span.get("data-value")
        shown = _text(span)
        assert shown == (f"{float(raw):.4f}" if "." in raw or "e" in raw else raw), (raw, shown)


def test_recipe_export_and_curl_line(run):
    metrics = _json(run["dir"] / "metrics.json")
    _, tree = _parse(run["dir"] / "report.html")
    flags = [_text(li) for li in _by_id(tree, "flags-changed").iter("li")]
    assert "--epochs=2" in flags and "--learning_rate=0.01" in flags
    assert not any(f.startswith(("--model_dir", "--batch_size=16")) for f in flags)
    assert _text(_by_id(tree, "rerun")) == (
        f"tf-finetune train --flagfile={run['dir'] / 'flags.cfg'}"
    )
    assert _text(_by_id(tree, "export-path")) == metrics["export_path"]
    assert _text(_by_id(tree, "export-version")) == os.path.basename(metrics["export_path"])
    size = sum(
        p.stat().st_size for p in pathlib.Path(metrics["export_path"]).rglob("*") if p.is_file()
    )
    assert int(_by_id(tree, "export-size").get("data-value")) == size
    curl = _text(_by_id(tree, "curl"))
    assert curl.startswith("curl -s -X POST http://localhost:8501/v1/models/model:predict")
    body = json.loads(curl.split("-d '", 1)[1].rstrip("'"))
    assert body["signature_name"] == "serving_default"
    encoded = base64.b64decode(body["instances"][0]["image_bytes"]["b64"])
    with Image.open(io.BytesIO(encoded)) as image:  # a real test image of the data
        assert image.size == (20, 20)


def test_hostile_folder_name_shows_as_text(run):
    text, tree = _parse(run["dir"] / "report.html")
    assert "<img src=x" not in text  # never as markup ...
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # ... always escaped
    rows = _by_id(tree, "per-class-test").findall("./tbody/tr")
    assert _text(rows[0].find("td")) == HOSTILE_FOLDER  # '<' sorts first: shown as written
    assert all(img.get("src", "").startswith("data:") for img in tree.iter("img"))


@pytest.fixture()
def enriched(run, tmp_path):
    """A copy of the run with what other producers add (timings, label issues, TFLite,
    non-core ops), a `<script>` class name, and turned into a text run."""
    copy = tmp_path / "r2"
    shutil.copytree(run["dir"], copy)
    os.remove(copy / "report.html")
    metrics = _json(copy / "metrics.json")
    export = copy / "export" / os.path.basename(metrics["export_path"])
    metrics["export_path"] = str(export)
    metrics.pop("test_accuracy")  # no test split: the val numbers, marked optimistic
    metrics["scratch_val_accuracy"] = 0.125
    metrics["timings"] = {"data": 1.25, "fit": 3.5, "total": 6.0}
    metrics["feature_images_per_second"] = 123.4
    names = [HOSTILE_LABEL if n == HOSTILE_FOLDER else n for n in metrics["class_names"]]
    metrics["class_names"] = names
    (copy / "metrics.json").write_text(json.dumps(metrics))
    for split in ("val", "test"):
        rep = _json(copy / f"report_{split}.json")
        rep["class_names"] = names
        rep["per_class"][HOSTILE_LABEL] = rep["per_class"].pop(HOSTILE_FOLDER)
        (copy / f"report_{split}.json").write_text(json.dumps(rep))
        os.remove(copy / f"mistakes_{split}.png")
        (copy / f"mistakes_{split}.txt").write_text(
            "# Most confident mistakes: 1 shown of 1\ntrue\tpredicted\tscore\ttext\n"
            f"class_a\t{HOSTILE_LABEL}\t0.912\ta <b>bold</b> review\n"
        )
    card = _json(export / "model_card.json")
    card["signatures"] = {"serving_default": "text: tf.string [batch]"}
    card["non_core_ops"] = ["CaseFoldUTF8", "WordpieceTokenizeWithOffsets"]
    card["tflite"] = [{"file": "model_float32.tflite", "size_bytes": 20480, "val_accuracy": 0.75}]
    (export / "model_card.json").write_text(json.dumps(card))
    (copy / "label_issues.json").write_text(
        json.dumps(
            [{"file": "a<b>.png", "given": "class_a", "suggested": "class_c", "confidence": 0.97}]
        )
    )
    return copy


def test_optional_parts_render_when_present_and_names_are_escaped(enriched):
    path = report.write_report(str(enriched))
    assert path == os.path.join(str(enriched), "report.html")
    text, tree = _parse(path)
    assert HOSTILE_LABEL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert len(list(tree.iter("script"))) == 1  # only the page's own sort script
    assert _text(_by_id(tree, "headline-label")).startswith("val accuracy (optimistic")
    assert float(_by_id(tree, "baseline-scratch_val_accuracy").get("data-value")) == 0.125
    assert [float(td.get("data-value")) for td in _by_id(tree, "timings").iter("td")] == [
        1.25,
        3.5,
        6.0,
    ]
    assert float(_by_id(tree, "images-per-second").get("data-value")) == 123.4
    assert _text(_by_id(tree, "non-core-ops")).startswith("CaseFoldUTF8, Wordpiece")
    assert "model_float32.tflite" in _text(_by_id(tree, "tflite"))
    assert "a<b>.png" in _text(_by_id(tree, "label-issues"))
    # A text run: the misclassified texts, no image grid; curl sends a text.
    assert "a <b>bold</b> review" in _text(_by_id(tree, "text-mistakes-val"))
    assert not any(e.get("id", "").startswith("mistakes-png") for e in tree.iter("img"))
    body = json.loads(_text(_by_id(tree, "curl")).split("-d '", 1)[1].rstrip("'"))
    assert body["instances"] == [{"text": "a <b>bold</b> review"}]


def test_a_real_run_reports_its_stage_timings(run):
    _, tree = _parse(run["dir"] / "report.html")
    ids = {e.get("id") for e in tree.iter()}
    assert "timings" in ids  # train writes metrics.json["timings"]
    metrics = _json(run["dir"] / "metrics.json")
    assert ("images-per-second" in ids) == ("feature_images_per_second" in metrics["timings"])


def test_absent_parts_are_left_out(run, tmp_path):
    copy = tmp_path / "bare"
    shutil.copytree(run["dir"], copy)
    metrics = _json(copy / "metrics.json")
    metrics.pop("timings")
    export = copy / "export" / os.path.basename(metrics["export_path"])
    metrics["export_path"] = str(export)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    card = _json(export / "model_card.json")
    assert card.pop("non_core_ops") == []  # every export says; an older card may not
    (export / "model_card.json").write_text(json.dumps(card))
    report.write_report(str(copy))
    _, tree = _parse(copy / "report.html")
    ids = {e.get("id") for e in tree.iter()}
    assert not ids & {"timings", "images-per-second", "label-issues", "tflite", "non-core-ops"}


def test_report_module_stays_light():
    code = "import sys, tf_finetune.report; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd()
    ).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- a real browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    message = "headless Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it (.ci/run does).")
    pytest.skip(message)


def _browse(page: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a file URL, network off; stderr carries the console messages."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                "--proxy-server=127.0.0.1:9",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                *args,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
def test_chromium_opens_the_report_without_errors_and_draws_it(run, tmp_path):
    page = run["dir"] / "report.html"
    # The check can fail: a page with a script error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><title>bad</title><script>nonexistent();</script>")
    assert any("nonexistent" in line for line in _console(_browse(bad, "--dump-dom").stderr))

    dom = _browse(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    tree = html5lib.parse(dom.stdout, namespaceHTMLElements=False)
    assert _text(tree.find(".//title")) == "tf-finetune report: r1"
    # The sort script ran to its end (it marks every sortable heading).
    headings = _by_id(tree, "per-class-test").findall("./thead/tr/th")
    assert headings and all(th.get("title") == "sort" for th in headings)

    shot = tmp_path / "report.png"
    result = _browse(page, f"--screenshot={shot}", "--window-size=1200,2000")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert _console(result.stderr) == []
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200, "blank screenshot"
    keep = os.environ.get("REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_evaluate_rewrites_the_report_and_prints_its_path(run):
    page = run["dir"] / "report.html"
    before = page.stat().st_mtime_ns
    code, out = _main(["evaluate", f"--model_dir={run['dir']}", "--split=val"])
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"Report: {page}"
    assert page.stat().st_mtime_ns > before
    _, tree = _parse(page)
    rep = _json(run["dir"] / "report_val.json")
    assert float(_by_id(tree, "accuracy-val").get("data-value")) == rep["accuracy"]


# ----------------------------------------------------------------------------- compare
@pytest.mark.slow  # two tiny fits: ~10-20 s on 2 busy cores
def test_compare_writes_a_ranking_page_linking_each_variant(run, tmp_path):
    out_dir = tmp_path / "cmp"
    code, out = _main(
        [
            "compare",
            f"--data={run['data']}",
            "--backbone=digits_cnn",
            "--weights=none",
            "--image_size=16",
            "--epochs=1",
            "--batch_size=8",
            "--unfreeze=0,all",
            f"--model_dir={out_dir}",
        ]
    )
    assert code == 0, out
    page = out_dir / "report.html"
    assert out.strip().splitlines()[-1] == f"Report: {page}"
    results = _json(out_dir / "compare.json")["variants"]
    _, tree = _parse(page)
    rows = _by_id(tree, "ranking").findall("./tbody/tr")
    assert len(rows) == 2
    shown = [
        float(
            next(td for td in r.findall("td") if td.get("data-key") == "val_accuracy").get(
                "data-sort"
            )
        )
        for r in rows
    ]
    assert shown == sorted((v["val_accuracy"] for v in results), reverse=True)
    for row in rows:
        link = row.find(".//a").get("href")
        assert not link.startswith(("http", "/")) and (out_dir / link).is_file()
        _, variant = _parse(out_dir / link)
        assert variant.find(".//title") is not None


def test_curl_example_of_a_big_photo_is_a_small_png_of_it(tmp_path):
    photo = tmp_path / "photos" / "test" / "cat" / "big.png"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(encode(class_image(0, (200, 150), seed=1), "PNG"))
    assert photo.stat().st_size > report.MAX_INLINE_EXAMPLE
    example = report.serving_example(False, [f"--data={tmp_path / 'photos'}"], None, None)
    assert str(photo) in example["source"]
    body = json.loads(example["command"].split("-d '", 1)[1].rstrip("'"))
    with Image.open(io.BytesIO(base64.b64decode(body["instances"][0]["image_bytes"]["b64"]))) as im:
        assert im.format == "PNG" and im.size == (48, 36)


def test_an_image_table_run_is_an_image_run(tmp_path):
    """A CSV of image files is image data: the page must not call the run text, and its curl
    line sends one of the table's images (a CSV of texts stays text)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encode(class_image(0, (20, 20)), "PNG"))
    images = tmp_path / "labels.csv"
    images.write_text("file,label\nimg/a.png,red|blue\n")
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\na fine film,pos\n")
    image_card = {"signatures": {"serving_default": "image_bytes: tf.string [batch]"}}
    for card in (image_card, {}):  # with an export, and without one (the table decides)
        assert not report._is_text(str(tmp_path), card, [f"--data={images}"])
    assert report._is_text(str(tmp_path), {}, [f"--data={texts}"])
    text_card = {"signatures": {"serving_default": "text: tf.string [batch]"}}
    assert report._is_text(str(tmp_path), text_card, [f"--data={images}"])
    example = report.serving_example(False, [f"--data={images}"], None, None)
    assert example["source"] == str(tmp_path / "img" / "a.png")
    body = json.loads(example["command"].split("-d '", 1)[1].rstrip("'"))
    assert "image_bytes" in body["instances"][0]
