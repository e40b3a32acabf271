"""Text data sources (CSV/TSV files, TFDS text data sets) -> the same `data.DataSet` as images.

Each Split's source yields `(tf.string text, int32 label)` and its `load` is the identity, so
`data.make_pipeline` batches text exactly like images (labels one-hot, texts stay tf.string)
and training, evaluation and export are shared.

CSV/TSV: `--data=reviews.csv` (validation, and with --test_percent a test split, carved by a
hash of each text, so adding rows never moves old ones and duplicates never straddle splits),
or a folder holding `train.csv` and optionally `val.csv` (or `validation.csv`) and `test.csv`
(`.tsv` likewise), used as given. The first line names the columns; the delimiter follows the extension (`,` for
.csv, tab for .tsv). Labels are class names (classes sorted by name) or integers (sorted by
value). A missing value, an unknown label (in val/test) or a row that does not split into the
header's columns is a UserError naming the file and line.
"""

import hashlib
import os

import tensorflow as tf

from tf_finetune import data, multilabel_data, tables
from tf_finetune import splits as splits_lib
from tf_finetune.config import is_table_file, table_holds_images
from tf_finetune.errors import UserError

TABLE_EXTENSIONS = (".csv", ".tsv")
SPLIT_FILES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def _split_files(folder: str) -> dict[str, str]:
    """split name -> path of the CSV/TSV file for it inside `folder` (train required)."""
    found = {}
    for split, stems in SPLIT_FILES.items():
        for stem in stems:
            for ext in TABLE_EXTENSIONS:
                path = os.path.join(folder, stem + ext)
                if os.path.isfile(path) and split not in found:
                    found[split] = path
    return found


def is_text_source(config) -> bool:
    """Whether `config.data` is text: a CSV/TSV file or folder, or a TFDS set without images."""
    source = config.data
    if not source:
        return False
    if source.startswith("tfds:"):
        return _tfds_text_features(data.open_tfds(source[5:]).info.features) is not None
    if os.path.isdir(source):
        return "train" in _split_files(source)
    return is_table_file(source) and not table_holds_images(
        source, config.file_column, config.text_column
    )


def _columns(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


# ----------------------------------------------------------------------------- CSV / TSV
def read_table(
    path: str, text_column: str, label_column: str, empty_label: bool = False
) -> tuple[list[str], list[str], list[int]]:
    """(texts, labels, line numbers) of a CSV/TSV file; UserError with file:line on bad rows.

    `empty_label`: an empty label cell is kept (multi-label: "none of these")."""
    texts, labels, lines = [], [], []
    wanted = _columns(text_column) + [label_column]
    for line, row in tables.rows(path, wanted, "--text_column/--label_column"):
        text = " ".join(row[c] for c in _columns(text_column) if row[c])
        label = row[label_column]
        if not text:
            raise UserError(f"{path}:{line}: missing text in column {text_column}.")
        if not label and not empty_label:
            raise UserError(f"{path}:{line}: missing label in column {label_column}.")
        texts.append(text)
        labels.append(label)
        lines.append(line)
    if not texts:
        raise UserError(f"{path}: no rows after the header.")
    return texts, labels, lines


def class_names_of(labels: list[str]) -> tuple[str, ...]:
    """Sorted distinct labels: by value when all are integers, else by name."""
    distinct = set(labels)
    try:
        return tuple(str(v) for v in sorted({int(x) for x in distinct}))
    except ValueError:
        return tuple(sorted(distinct))


def _canonical(label: str, integers: bool) -> str:
    if integers:
        try:
            return str(int(label))  # "007" and "7" are the same class
        except ValueError:
            pass
    return label


def _text_split(texts: list[str], label_ids: list[int]) -> data.Split:
    source = tf.data.Dataset.from_tensor_slices(
        (tf.constant(texts, tf.string), tf.constant(label_ids, tf.int32))
    )
    return data.Split(source, lambda text: text, len(texts))


def _hash_percent(text: str) -> float:
    return (int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 100_000) / 1000.0


def load_multi_label_table(
    source: str,
    text_column: str,
    label_column: str,
    separator: str,
    validation_percent: int,
    test_percent: int = 0,
) -> data.DataSet:
    """A CSV/TSV file of texts whose label cells join names with `separator` -> DataSet with
    multi-hot labels (an empty cell: no label); val/test carved by a hash of each text."""
    splits_lib.check_test_percent(source, validation_percent, test_percent)
    if os.path.isdir(source):
        raise UserError(
            f"--task=multi_label reads text from a single CSV/TSV file; --data={source} is a folder."
        )
    texts, cells, _ = read_table(source, text_column, label_column, empty_label=True)
    label_lists = [multilabel_data.parse_labels(c, separator) for c in cells]
    names = tuple(sorted({n for labels in label_lists for n in labels}))
    if len(names) < 2:
        raise UserError(f"{source}: the label column names fewer than two labels.")
    targets = multilabel_data.multi_hot(label_lists, names)
    carved = data.carve(
        list(range(len(texts))),
        list(range(len(texts))),
        [_hash_percent(t) for t in texts],
        validation_percent,
        test_percent,
    )
    splits = {}
    for split, (rows, _) in carved.items():
        if not rows:
            raise UserError(f"--data={source}: no row fell in the {split} split; add rows.")
        source_ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant([texts[i] for i in rows], tf.string), tf.constant(targets[rows]))
        )
        splits[split] = data.Split(source_ds, lambda text: text, len(rows))
    return data.DataSet(names, splits["train"], splits["val"], splits.get("test"))


def load_table(
    source: str, text_column: str, label_column: str, validation_percent: int, test_percent: int = 0
) -> data.DataSet:
    """A CSV/TSV file, or a folder with train/val/test CSV/TSV files -> DataSet of texts.

    `test_percent` > 0 carves a test split from a single file, by the same text hash as
    validation (UserError for a folder, which has its own splits).
    """
    splits_lib.check_test_percent(source, validation_percent, test_percent)
    files = _split_files(source) if os.path.isdir(source) else {"train": source}
    if "train" not in files:
        raise UserError(f"--data={source}: no train.csv or train.tsv in the folder.")
    tables = {s: read_table(p, text_column, label_column) for s, p in files.items()}
    train_labels = tables["train"][1]
    class_names = class_names_of(train_labels)
    if len(class_names) < 2:
        raise UserError(
            f"{files['train']}: a single label ({class_names[0]}); a classifier needs two."
        )
    integers = all(c.lstrip("-").isdigit() for c in class_names)
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split, (texts, labels, lines) in tables.items():
        ids = []
        for label, line in zip(labels, lines):
            key = _canonical(label, integers)
            if key not in index:
                raise UserError(
                    f"{files[split]}:{line}: unknown label {label!r}; the training labels "
                    f"are {', '.join(class_names)}."
                )
            ids.append(index[key])
        splits[split] = (texts, ids)
    if "val" not in splits:
        texts, ids = splits["train"]
        positions = [_hash_percent(t) for t in texts]
        splits.update(data.carve(texts, ids, positions, validation_percent, test_percent))
        for split, flag in (("val", "validation_percent"), ("test", "test_percent")):
            if split in splits and not splits[split][0]:
                raise UserError(
                    f"--data={source}: no row fell in the {split} split; add rows or raise "
                    f"--{flag}."
                )
    return data.DataSet(
        class_names=class_names,
        train=_text_split(*splits["train"]),
        val=_text_split(*splits["val"]),
        test=_text_split(*splits["test"]) if "test" in splits else None,
    )


# ----------------------------------------------------------------------------- TFDS
def _tfds_text_features(features) -> list[str] | None:
    """Names of the Text features of a TFDS data set without images, else None."""
    import tensorflow_datasets as tfds

    kinds = {name: type(feature) for name, feature in features.items()}
    if any(issubclass(k, tfds.features.Image) for k in kinds.values()):
        return None
    text = [name for name, kind in kinds.items() if issubclass(kind, tfds.features.Text)]
    return text or None


def load_tfds_text(
    name: str,
    text_column: str,
    label_column: str,
    train_split: str,
    val_split: str,
    test_split: str,
    validation_percent: int,
    seed: int,
) -> data.DataSet:
    """A TFDS text classification set (imdb_reviews, ag_news_subset, ...) -> DataSet of texts.

    `text_column` names the Text feature(s) (comma-separated are joined with a space); when
    it is the default `text` and the data set has a single Text feature under another name,
    that one is used.
    """
    builder = data.open_tfds(name)
    features = builder.info.features
    available = _tfds_text_features(features) or []
    columns = _columns(text_column)
    if columns == ["text"] and "text" not in available and len(available) == 1:
        columns = available
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise UserError(
            f"--data=tfds:{name} has no text feature {', '.join(unknown)}; its text features "
            f"are {', '.join(available)}: set --text_column (comma-separated to join several)."
        )
    label = features[label_column] if label_column in features else None
    if label is None or not hasattr(label, "names"):
        raise UserError(
            f"--data=tfds:{name}: --label_column={label_column} is not a class label feature "
            f"(features: {', '.join(features)})."
        )

    def to_pair(example):
        text = tf.strings.join([example[c] for c in columns], separator=" ")
        return text, tf.cast(example[label_column], tf.int32)

    return data.tfds_splits(
        builder,
        to_pair,
        lambda text: text,
        tuple(label.names),
        train_split,
        val_split,
        test_split,
        validation_percent,
        seed,
    )


def load(config) -> data.DataSet:
    """The configured text source as a DataSet."""
    test_percent = config.test_percent
    if config.data.startswith("tfds:"):
        splits_lib.check_test_percent(config.data, config.validation_percent, test_percent)
        return load_tfds_text(
            config.data[len("tfds:") :],
            config.text_column,
            config.label_column,
            config.train_split,
            config.val_split,
            config.test_split,
            config.validation_percent,
            config.seed,
        )
    if config.task == "multi_label":
        return load_multi_label_table(
            config.data,
            config.text_column,
            config.label_column,
            config.label_separator,
            config.validation_percent,
            test_percent,
        )
    return load_table(
        config.data,
        config.text_column,
        config.label_column,
        config.validation_percent,
        test_percent,
    )
