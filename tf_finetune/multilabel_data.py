"""Image CSVs (one or several labels per image) and multi-label class folders -> a DataSet.

Sources (`--task=multi_label`, or an image CSV for either task):
  * a CSV/TSV with a file column (`--file_column`, paths relative to the CSV's folder) and a
    label column (`--label_column`) holding one name, or for multi-label several names joined
    by `--label_separator`; an empty label cell is a valid "none of these" example;
  * a class-folder tree where the same file name appears under several class folders: one
    image, several tags. An image's identity is its path below its class folder.

Splits are carved by a hash of the identity (the CSV's relative path, or the path below the
class folder), so adding images never moves old ones and one image never lands in two splits.
Multi-label examples carry float32 multi-hot vectors [labels]; single-label ones int32 ids, as
every other source.
"""

import os

import numpy as np
import tensorflow as tf

from tf_finetune import data, tables
from tf_finetune.errors import UserError


def parse_labels(cell: str, separator: str) -> list[str]:
    """The distinct label names of one cell, in order; an empty cell has none."""
    names = []
    for part in cell.split(separator) if separator else [cell]:
        name = part.strip()
        if name and name not in names:
            names.append(name)
    return names


def read_image_table(
    path: str, file_column: str, label_column: str, separator: str | None
) -> tuple[list[str], list[list[str]]]:
    """(image paths, label names per image) of an image CSV/TSV; `separator` None: one label.

    Paths are relative to the table's folder (absolute ones are kept). A row naming a file
    twice, a missing file name, or (single-label) a missing label is a UserError at file:line.
    """
    base = os.path.dirname(os.path.abspath(path))
    files, labels, seen = [], [], {}
    wanted = [file_column, label_column]
    for line, row in tables.rows(path, wanted, "--file_column/--label_column"):
        name = row[file_column]
        if not name:
            raise UserError(f"{path}:{line}: missing file name in column {file_column}.")
        if name in seen:
            raise UserError(f"{path}:{line}: {name} is listed again (first at line {seen[name]}).")
        seen[name] = line
        names = parse_labels(row[label_column], separator) if separator else [row[label_column]]
        if separator is None and not names[0]:
            raise UserError(f"{path}:{line}: missing label in column {label_column}.")
        files.append(os.path.join(base, name))
        labels.append(names)
    if not files:
        raise UserError(f"{path}: no rows after the header.")
    return files, labels


def folder_tags(root: str) -> tuple[tuple[str, ...], dict[str, tuple[str, list[str]]]]:
    """(label names, {identity: (a path of the image, its labels)}) of a multi-label folder:
    an image under several class folders (same path below each) carries each of them."""
    names = tuple(data.class_dirs(root))
    if len(names) < 2:
        raise UserError(f"--data={root}: a multi-label folder needs at least two label folders.")
    paths, label_ids = data.files_by_class(root, names)
    images: dict[str, tuple[str, list[str]]] = {}
    for path, label in zip(paths, label_ids):
        identity = os.path.relpath(path, os.path.join(root, names[label])).replace(os.sep, "/")
        images.setdefault(identity, (path, []))[1].append(names[label])
    return names, images


def multi_hot(label_lists: list[list[str]], names: tuple[str, ...]) -> np.ndarray:
    """float32 [n, len(names)]: 1 where an example carries the label."""
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(label_lists), len(names)), np.float32)
    for row, labels in enumerate(label_lists):
        out[row, [index[n] for n in labels]] = 1.0
    return out


def _split(paths: list[str], labels: np.ndarray, image_size: int, checked: bool) -> data.Split:
    source = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels)))
    return data.Split(
        source,
        lambda p: data.decode_and_resize(tf.io.read_file(p), image_size),
        len(paths),
        checked,
    )


def build_dataset(
    identities: list[str],
    paths: list[str],
    targets: np.ndarray,
    names: tuple[str, ...],
    where: str,
    options: dict,
) -> data.DataSet:
    """Skips unreadable images, carves train/val/test by identity hash, and wraps the splits.

    `options`: image_size, validation_percent, test_percent, max_image_pixels, and
    decode_check: the splits whose files are decoded here to find corrupt ones (default all);
    the others get the header check here and are checked by the run's first decode of them,
    the feature pass (as data.load_image_folder does), so no image is decoded twice.
    """
    check = options.get("decode_check", data.ALL_SPLITS)
    max_pixels = options["max_image_pixels"]
    skipped = [(p, r) for p in paths if (r := data.precheck(p, max_pixels))]
    bad = {p for p, _ in skipped}
    keep = [i for i, p in enumerate(paths) if p not in bad]
    positions = [data.hash_percent(identities[i]) for i in keep]
    carved = data.carve(
        keep, keep, positions, options["validation_percent"], options["test_percent"]
    )
    splits = {}
    for split, (rows, _) in carved.items():
        if split in check and rows:
            failed = data.find_unreadable(
                [paths[i] for i in rows], max_pixels, options["image_size"]
            )
            skipped += failed
            gone = {p for p, _ in failed}
            rows = [i for i in rows if paths[i] not in gone]
        if not rows:
            if split == "test" and not options["test_percent"]:
                continue
            raise UserError(f"--data={where}: no image fell in the {split} split; add images.")
        splits[split] = _split(
            [paths[i] for i in rows], targets[rows], options["image_size"], split in check
        )
    return data.DataSet(names, splits["train"], splits["val"], splits.get("test"), tuple(skipped))


def load_table(
    path: str, file_column: str, label_column: str, separator: str | None, options: dict
) -> data.DataSet:
    """An image CSV/TSV -> DataSet (multi-hot labels when `separator` is given)."""
    files, label_lists = read_image_table(path, file_column, label_column, separator)
    names = tuple(sorted({n for labels in label_lists for n in labels}))
    if len(names) < 2:
        raise UserError(f"--data={path}: the label column names fewer than two labels.")
    base = os.path.dirname(os.path.abspath(path))
    identities = [os.path.relpath(f, base).replace(os.sep, "/") for f in files]
    if separator is None:
        index = {n: i for i, n in enumerate(names)}
        targets = np.array([index[labels[0]] for labels in label_lists], np.int32)
    else:
        targets = multi_hot(label_lists, names)
    return build_dataset(identities, files, targets, names, path, options)


def load_folder(root: str, options: dict) -> data.DataSet:
    """A multi-label class folder -> DataSet with multi-hot labels."""
    names, images = folder_tags(root)
    if not images:
        raise UserError(f"--data={root} holds no images ({', '.join(data.IMAGE_EXTENSIONS)}).")
    identities = sorted(images)
    paths = [images[i][0] for i in identities]
    targets = multi_hot([images[i][1] for i in identities], names)
    return build_dataset(identities, paths, targets, names, root, options)
