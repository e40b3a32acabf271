"""Multi-label sources: an image CSV with '|'-joined tags and a tag-folder tree -> DataSet."""

import re

import numpy as np
import pytest
import tensorflow as tf

from tests import images
from tf_finetune import data, multilabel_data, splits
from tf_finetune.errors import UserError

OPTIONS = dict(image_size=32, validation_percent=20, test_percent=20, max_image_pixels=10**8)
NAMES = ("blue", "green", "red")  # sorted: what the DataSet's label order must be


def _rows(split: data.Split) -> dict[str, np.ndarray]:
    return {p.decode(): y for p, y in split.source.as_numpy_iterator()}


def _all(dataset: data.DataSet) -> dict[str, dict]:
    return {s: _rows(getattr(dataset, s)) for s in ("train", "val", "test")}


def test_csv_tags_become_multi_hot_and_an_empty_cell_is_no_tag(tmp_path):
    table = images.write_tagged_csv(tmp_path, count=60)
    dataset = multilabel_data.load_table(str(table), "file", "label", "|", OPTIONS)
    assert dataset.class_names == NAMES
    rows = {k: v for split in _all(dataset).values() for k, v in split.items()}
    assert len(rows) == 60
    for i, tags in enumerate(images.tag_sets(60)):
        want = np.zeros(3, np.float32)
        want[[NAMES.index(("red", "green", "blue")[t]) for t in tags]] = 1
        assert rows[str(tmp_path / "images" / f"img_{i:03d}.png")].tolist() == want.tolist()
    assert any(not v.any() for v in rows.values())  # some rows carry no tag at all
    pixels, target = next(iter(dataset.train.examples()))
    assert pixels.shape == (32, 32, 3) and target.dtype.name == "float32"


def test_a_tag_folder_tree_gives_one_example_per_image_with_all_its_tags(tmp_path):
    root = images.write_tagged_folders(tmp_path / "tags", count=60)
    dataset = multilabel_data.load_folder(str(root), OPTIONS)
    splits = _all(dataset)
    tagged = [t for t in images.tag_sets(60) if t]
    assert sum(len(s) for s in splits.values()) == len(tagged)
    identities = [
        {p.split("/sub/")[-1] for p in split} for split in splits.values()
    ]  # one image never lands in two splits
    assert sum(len(i) for i in identities) == len(set().union(*identities))
    for split in splits.values():
        for path, target in split.items():
            i = int(path.split("img_")[1][:3])
            assert target.sum() == len(images.tag_sets(60)[i])


def test_splits_are_carved_by_identity_and_stable_when_images_are_added(tmp_path):
    table = images.write_tagged_csv(tmp_path / "a", count=40)
    before = _all(multilabel_data.load_table(str(table), "file", "label", "|", OPTIONS))
    table = images.write_tagged_csv(tmp_path / "a", count=60)
    after = _all(multilabel_data.load_table(str(table), "file", "label", "|", OPTIONS))
    for split in before:
        assert set(before[split]) <= set(after[split])


def test_an_image_csv_is_single_label_without_a_separator(tmp_path):
    table = images.write_tagged_csv(tmp_path, count=30)
    text = table.read_text().replace("|", "-").replace(",\n", ",none\n")
    table.write_text(text)
    dataset = multilabel_data.load_table(str(table), "file", "label", None, OPTIONS)
    labels = [int(y) for split in _all(dataset).values() for y in split.values()]
    assert "none" in dataset.class_names and max(labels) == len(dataset.class_names) - 1


@pytest.mark.parametrize(
    "body, message",
    [
        ("file,label\n", "no rows after the header"),
        ("path,label\na.png,x\n", "no column file"),
        ("file,label\n,x\n", "2: missing file name"),
        ("file,label\na.png,x\na.png,y\n", "3: a.png is listed again (first at line 2)"),
        ("file,label\na.png,x,extra\n", "2: 3 field(s)"),
    ],
)
def test_bad_tables_are_one_line_naming_the_line(tmp_path, body, message):
    table = tmp_path / "t.csv"
    table.write_text(body)
    with pytest.raises(UserError, match=re.escape(message)):
        multilabel_data.read_image_table(str(table), "file", "label", "|")


def test_parse_labels_drops_blanks_and_repeats():
    assert multilabel_data.parse_labels(" a | b |a||", "|") == ["a", "b"]
    assert multilabel_data.parse_labels("", "|") == []


def test_label_statistics_count_labels_pairs_and_flag_the_rare_ones():
    from tf_finetune import check_data

    train = np.array([[1, 1, 0]] * 12 + [[1, 0, 0]] * 3 + [[0, 0, 0]] * 2 + [[0, 0, 1]])
    val = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    stats = check_data.label_statistics(("a", "b", "c"), {"train": train, "val": val})
    assert stats["per_label"]["a"] == {"train": 15, "val": 1}
    assert stats["splits"]["train"] == {"examples": 18, "without_labels": 2}
    assert stats["top_pairs"] == [{"labels": ["a", "b"], "train": 12}]
    assert stats["too_few"] == ["c"] and stats["no_val_positive"] == ["c"]
    text = check_data.format_label_statistics(stats)
    assert "WARNING: fewer than 10 training examples: c" in text
    assert "no validation example of c" in text and "a+b 12" in text


def test_check_data_prints_the_label_table_of_a_tagged_csv(tmp_path, capsys):
    from tf_finetune import cli

    table = images.write_tagged_csv(tmp_path, count=40)
    assert cli.main(["check-data", f"--data={table}", "--task=multi_label"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["label", "train", "val"]
    counts = {line.split()[0]: int(line.split()[1]) for line in out[1:4]}
    want = dict.fromkeys(("blue", "green", "red"), 0)
    for row in table.read_text().splitlines()[1:]:
        file, tags = row.split(",")
        if splits.split_of(data.hash_percent(file), 20) == "train":
            for tag in filter(None, tags.split("|")):
                want[tag] += 1
    assert counts == want


@pytest.mark.slow
def test_tfds_sequence_of_class_labels_becomes_multi_hot_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load_tfds(
            "voc", 16, "train", "", "", 25, 3, label_key="labels", multi_label=True
        )
        assert len(dataset.class_names) == 20 and dataset.class_names[0] == "aeroplane"
        got = np.array([y.numpy() for s in (dataset.train, dataset.val) for _, y in s.source])
        assert got.shape == (12, 20) and set(np.unique(got)) <= {0.0, 1.0}
        assert (got.sum(axis=1) >= 2).any()  # mock examples carry several labels
        nested = data.load_tfds(
            "voc", 16, "train", "", "", 25, 3, label_key="objects/label", multi_label=True
        )
        assert nested.class_names == dataset.class_names
        with pytest.raises(UserError, match="several labels per image; pass --task=multi_label"):
            data.load_tfds("voc", 16, "train", "", "", 25, 3, label_key="labels")
        with pytest.raises(UserError, match="no feature 'objects/nope'"):
            data.load_tfds(
                "voc", 16, "train", "", "", 25, 3, label_key="objects/nope", multi_label=True
            )


def test_repeated_and_missing_labels_make_a_multi_hot_row():
    rows = (
        data.multi_hot_row(tf.constant([3, 1, 3]), 5),
        data.multi_hot_row(tf.constant([], tf.int32), 5),
    )
    assert [r.numpy().tolist() for r in rows] == [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]
