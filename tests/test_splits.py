"""--test_percent and --split=auto: hash-stable train/val/test carving, honest evaluation."""

import json

import pytest

from tests.helpers import tiny_flags
from tests.images import class_image, encode, write_class_folders
from tf_finetune import check_data, cli, data, splits, text_data
from tf_finetune.errors import UserError


def _touch_images(root, names_by_class):
    """Empty image files: listing and carving never read them."""
    for cls, names in names_by_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / cls / name).write_bytes(b"")


def _split_by_file(listing) -> dict[str, str]:
    return {p: split for split, (paths, _) in listing.splits.items() for p in paths}


def test_split_of_puts_val_at_the_bottom_and_test_at_the_top():
    assert [splits.split_of(p, 15, 15) for p in (0.0, 14.999, 15.0, 84.999, 85.0, 99.999)] == [
        "val",
        "val",
        "train",
        "train",
        "test",
        "test",
    ]
    assert splits.split_of(99.999, 15) == "train"  # no test split without --test_percent


def test_carved_folder_splits_match_the_percents_and_never_move(tmp_path):
    _touch_images(tmp_path, {c: [f"img_{j:03d}.png" for j in range(100)] for c in ("a", "b")})
    listing = data.list_image_folder(str(tmp_path), 15, 15)
    before = _split_by_file(listing)
    assert list(listing.splits) == ["train", "val", "test"]
    shares = {s: sum(v == s for v in before.values()) / len(before) for s in splits.SPLITS}
    assert shares["val"] == pytest.approx(0.15, abs=0.07)
    assert shares["test"] == pytest.approx(0.15, abs=0.07)
    assert shares["train"] == pytest.approx(0.70, abs=0.08)
    # Labels follow their files.
    for split, (paths, labels) in listing.splits.items():
        assert all(p.split("/")[-2] == "ab"[y] for p, y in zip(paths, labels)), split

    # Adding files later never moves an old one between train, val and test.
    _touch_images(tmp_path, {c: [f"new_{j:03d}.jpg" for j in range(100)] for c in ("a", "b")})
    after = _split_by_file(data.list_image_folder(str(tmp_path), 15, 15))
    assert len(after) == 400 and {p: after[p] for p in before} == before

    # A file's split does not depend on which other files exist.
    for j in range(0, 100, 2):
        (tmp_path / "a" / f"img_{j:03d}.png").unlink()
    fewer = _split_by_file(data.list_image_folder(str(tmp_path), 15, 15))
    assert all(before[p] == s for p, s in fewer.items() if p in before)

    # Adding a test split only takes files from train: val stays the very same files.
    no_test = data.list_image_folder(str(tmp_path), 15)
    assert "test" not in no_test.splits
    assert no_test.splits["val"] == data.list_image_folder(str(tmp_path), 15, 15).splits["val"]


def test_load_image_folder_carves_a_decodable_test_split(tmp_path):
    write_class_folders(tmp_path, num_classes=2, per_class=12, size=(16, 16))
    listing = data.list_image_folder(str(tmp_path), 25, 25)
    dataset = data.load_image_folder(str(tmp_path), 16, 25, test_percent=25)
    assert dataset.test is not None
    assert dataset.test.count == len(listing.splits["test"][0]) > 0
    assert dataset.train.count + dataset.val.count + dataset.test.count == 24
    assert len(list(dataset.test.examples())) == dataset.test.count


def test_a_carved_test_split_that_comes_out_empty_is_explained(tmp_path):
    # Per class one image in val (position < 10) and one in train (10..89): none in the top 10%.
    for label, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        names = (f"img_{j}.png" for j in range(1000))
        positions = {n: data.hash_percent(f"{cls}/{n}") for n in names}
        val = next(n for n, p in positions.items() if p < 10)
        train = next(n for n, p in positions.items() if 10 <= p < 90)
        for name in (val, train):
            (tmp_path / cls / name).write_bytes(encode(class_image(label, (16, 16)), "PNG"))
    with pytest.raises(UserError, match="no image fell in the test split.*--test_percent"):
        data.load_image_folder(str(tmp_path), 16, 10, test_percent=10)
    assert data.load_image_folder(str(tmp_path), 16, 10).test is None


def _write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))


def _texts_by_split(dataset) -> dict[str, str]:
    out = {}
    for name in splits.SPLITS:
        split = getattr(dataset, name)
        if split is not None:
            for text, _ in split.examples().as_numpy_iterator():
                out[text.decode()] = name
    return out


def test_csv_rows_are_carved_by_content_and_never_move(tmp_path):
    rows = [(f"review number {i}", "good" if i % 2 else "bad") for i in range(200)]
    path = tmp_path / "reviews.csv"
    _write_csv(path, rows)
    dataset = text_data.load_table(str(path), "text", "label", 15, test_percent=15)
    before = _texts_by_split(dataset)
    assert len(before) == 200
    for name in ("val", "test"):
        assert sum(s == name for s in before.values()) / 200 == pytest.approx(0.15, abs=0.07)
    # Rows added (and reordered) later: old rows keep their split.
    more = [(f"another review {i}", "good") for i in range(100)]
    _write_csv(path, more[:50] + rows[::-1] + more[50:])
    after = _texts_by_split(text_data.load_table(str(path), "text", "label", 15, test_percent=15))
    assert {t: after[t] for t in before} == before
    # Without --test_percent, val is unchanged and test rows train.
    plain = _texts_by_split(text_data.load_table(str(path), "text", "label", 15))
    assert {t for t, s in plain.items() if s == "val"} == {
        t for t, s in after.items() if s == "val"
    }


def test_test_percent_is_refused_where_the_data_has_its_own_splits(tmp_path):
    for split in ("train", "val", "test"):
        _touch_images(tmp_path / "images" / split, {"a": ["1.png"], "b": ["2.png"]})
    with pytest.raises(UserError, match="own train/.*subfolders"):
        data.list_image_folder(str(tmp_path / "images"), 20, 10)
    (tmp_path / "texts").mkdir()
    _write_csv(tmp_path / "texts" / "train.csv", [("a", "x"), ("b", "y")])
    with pytest.raises(UserError, match="own train/val/test files"):
        text_data.load_table(str(tmp_path / "texts"), "text", "label", 20, test_percent=10)
    with pytest.raises(UserError, match="TFDS data set keeps its own splits.*--test_split"):
        splits.check_test_percent("tfds:beans", 20, 10)
    with pytest.raises(UserError, match="must be below 100"):
        splits.check_test_percent(str(tmp_path / "texts" / "train.csv"), 50, 50)
    splits.check_test_percent("tfds:beans", 20, 0)  # 0 is always fine


def test_choose_eval_split():
    assert splits.choose_eval_split("auto", True) == ("test", None)
    assert splits.choose_eval_split("test", True) == ("test", None)
    split, note = splits.choose_eval_split("auto", False)
    assert split == "val" and "chose the best checkpoint" in note and "optimistic" in note
    assert "\n" not in note
    split, note = splits.choose_eval_split("val", True)
    assert split == "val" and "--split=test" in note and "retrain" not in note
    with pytest.raises(UserError, match="no test split.*--test_percent") as e:
        splits.choose_eval_split("test", False)
    assert "\n" not in str(e.value)


def test_check_data_shows_the_carved_test_split(tmp_path, capsys):
    _touch_images(tmp_path, {c: [f"img_{j:03d}.png" for j in range(40)] for c in ("a", "b")})
    listing = data.list_image_folder(str(tmp_path), 20, 20)
    report = check_data.check_folder(str(tmp_path), 20, 32, test_percent=20)
    # Empty files are unreadable, so the counts are all 0; the columns are what matters here.
    assert list(report["counts"]) == ["train", "val", "test"]
    assert report["carved"] == {"validation_percent": 20, "test_percent": 20}
    text = check_data.format_report(report)
    assert "val 20%, test 20%" in text
    assert text.splitlines()[3].split() == ["class", "train", "val", "test"]
    assert len(listing.splits["test"][0]) > 0


@pytest.mark.parametrize(
    "make_argv, expected",
    [
        (
            lambda d: [f"--data={d}/split", "--test_percent=10"],
            "own train/ (val/ test/) subfolders",
        ),
        (lambda d: ["--data=tfds:beans", "--test_percent=10"], "--test_split"),
        (lambda d: ["--test_percent=10"], "offline default has its own"),
        (
            lambda d: [f"--data={d}/plain", "--validation_percent=50", "--test_percent=50"],
            "--validation_percent=50 + --test_percent=50 must be below 100",
        ),
        (lambda d: [f"--data={d}/plain", "--test_percent=-5"], "--test_percent must be at least 0"),
    ],
)
def test_bad_test_percent_is_one_line(tmp_path, capsys, make_argv, expected):
    write_class_folders(tmp_path / "plain", num_classes=2, per_class=2)
    for split in ("train", "test"):
        write_class_folders(tmp_path / "split" / split, num_classes=2, per_class=2)
    code = cli.main(["train", *make_argv(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err


def _train(folder, run, *flags) -> int:
    return cli.main(["train", *tiny_flags(folder, run, "--epochs=1", "--batch_size=8", *flags)])


@pytest.mark.slow
def test_train_with_test_percent_reports_test_metrics_and_evaluate_picks_test(tmp_path, capsys):
    """Needs train.load_data to pass config.test_percent, and evaluate_run to use
    splits.choose_eval_split (the lead's wiring in train.py)."""
    folder = write_class_folders(tmp_path / "photos", num_classes=2, per_class=15, size=(16, 16))
    expected_test = len(data.list_image_folder(str(folder), 20, 20).splits["test"][0])
    assert expected_test > 0
    run = tmp_path / "run"
    assert _train(folder, run, "--test_percent=20") == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == expected_test
    assert "test_accuracy" in metrics and "test_loss" in metrics
    assert "--test_percent=20" in (run / "flags.cfg").read_text().splitlines()
    capsys.readouterr()

    # evaluate (--split=auto from the run's flags.cfg) reports on the carved test split.
    assert cli.main(["evaluate", f"--model_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "optimistic" not in out
    assert json.loads((run / "report_test.json").read_text())["num_examples"] == expected_test

    # A run without a test split: auto falls back to val and says so; --split=test is one line.
    plain = tmp_path / "plain"
    assert _train(folder, plain) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", f"--model_dir={plain}"]) == 0
    out = capsys.readouterr().out
    assert "chose the best checkpoint" in out and (plain / "report_val.json").exists()
    assert cli.main(["evaluate", f"--model_dir={plain}", "--split=test"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--test_percent" in err, err


def test_check_data_cli_takes_test_percent(tmp_path, capsys):
    """Needs cli.cmd_check_data to pass config.test_percent (the lead's wiring in cli.py)."""
    folder = write_class_folders(tmp_path / "photos", num_classes=2, per_class=15, size=(16, 16))
    test = len(data.list_image_folder(str(folder), 20, 20).splits["test"][0])
    code = cli.main(["check-data", f"--data={folder}", "--test_percent=20"])
    out = capsys.readouterr().out
    assert code == 0
    assert "val 20%, test 20%" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total.split()[-1] == str(test)
