"""The `evaluate` command: a finished run's weights, re-scored on one split of its data.

Reads the run dir (rundir.py) and rebuilds the model from the run's flags with no pretrained
weights (the checkpoint holds every weight); never imports the trainer. With `--label_issues`
it also lists training images whose given label looks wrong (label_issues.py) from the run's
backbone features.
"""

import os

import numpy as np
import tensorflow as tf

from tf_finetune import (
    atomic,
    data,
    distribute,
    evaluate,
    feature_fit,
    features,
    input_pipeline,
    label_issues,
    multilabel_metrics,
    multilabel_scoring,
    offline_default,
    phases,
    rundir,
    scoring,
    splits,
)
from tf_finetune import model as model_lib
from tf_finetune import report as report_page
from tf_finetune.config import Config
from tf_finetune.errors import UserError


def evaluate_run(config: Config, split: str = "auto") -> dict:
    """Re-evaluates a finished run's final weights on `split` (auto, val or test) of its data.

    auto: test when the data has one, else val, with a note that val is optimistic.
    """
    rundir.trained_weights(config.model_dir)  # no checkpoint: one line before any work
    # A multi-worker run is evaluated in one process.
    kind = "auto" if config.strategy == "multi_worker" else config.strategy
    strategy = distribute.make_strategy(kind, config.cpu_replicas)
    dataset = input_pipeline.load_data(config, offline_default.data_folder(config))
    split, note = splits.choose_eval_split(split, dataset.test is not None)
    chosen = {"val": dataset.val, "test": dataset.test}[split]
    with strategy.scope():
        model = model_lib.restore_trained(config, dataset.num_classes)
    batch_size = distribute.eval_batch_size(
        chosen.count, config.batch_size, strategy.num_replicas_in_sync
    )
    pipeline = data.make_pipeline(chosen, dataset.num_classes, batch_size, False, config.seed)
    if config.task == "multi_label":
        report = _multi_label_report(model, pipeline, dataset, config, split)
    else:
        report = scoring.write_split_report(model, pipeline, dataset, config, split)
        report["text"] = evaluate.format_report(report, dataset.class_names)
    if note:
        report["text"] = f"{note}\n{report['text']}"
    if config.label_issues:
        issues = write_label_issues(config, dataset, model)
        report["files"] = [*report.get("files", []), *issues["files"]]
        report["text"] += "\n\n" + issues["text"]
    report["page"] = report_page.write_report(config.model_dir)
    return report


def _multi_label_report(model, pipeline, dataset, config: Config, split: str) -> dict:
    """The split scored with the thresholds the run chose on val (never re-chosen here)."""
    by_name = rundir.read_thresholds(config.model_dir)
    if by_name is None or set(by_name) != set(dataset.class_names):
        raise UserError(
            f"{config.model_dir}: no {rundir.THRESHOLDS} for labels "
            f"{', '.join(dataset.class_names)}; retrain the run (it writes them)."
        )
    thresholds = [by_name[n] for n in dataset.class_names]
    passed = multilabel_scoring.predict(model, pipeline)
    report = multilabel_scoring.write_split_report(
        passed, config.model_dir, dataset, split, thresholds
    )
    report["text"] = multilabel_metrics.format_report(report)
    return report


# ----------------------------------------------------------------------------- label issues
LABEL_ISSUES_JSON, LABEL_ISSUES_PNG = "label_issues.json", "label_issues.png"
SHOWN_SUSPECTS = 10


def write_label_issues(config: Config, dataset: data.DataSet, model, top: int = 16) -> dict:
    """Suspected label errors of the training split, from the run's backbone features.

    Out-of-fold linear probes on the features (label_issues.find_label_issues) flag the
    training images whose given label they find unlikely. Writes label_issues.json (every
    suspect) and label_issues.png (the `top` first; images only) into the run dir.

    Returns:
      {"suspects": count, "files": paths written, "text": a table of the first suspects}.
    """
    train = dataset.train
    cached = _train_features(config, dataset, model)
    keys = list(train.source.map(lambda key, _: key).as_numpy_iterator())
    suspects = label_issues.find_label_issues(
        cached.features, cached.labels, dataset.num_classes, seed=config.seed
    )
    names = list(dataset.class_names)
    files = keys if keys and _is_file(keys[0]) else None
    json_path = os.path.join(config.model_dir, LABEL_ISSUES_JSON)
    atomic.write(
        json_path, lambda tmp: label_issues.write_label_issues_json(tmp, suspects, files, names)
    )
    written = [json_path]
    if _is_image(train, keys):
        png_path = os.path.join(config.model_dir, LABEL_ISSUES_PNG)

        def load(index: int) -> np.ndarray:
            return train.load(tf.constant(keys[index])).numpy()

        atomic.write(
            png_path, lambda tmp: label_issues.plot_label_issues(suspects, load, names, tmp, top)
        )
        written.append(png_path)
    text = format_suspects(suspects, files, names, config.data, train.count)
    if config.unfreeze_layers != 0:
        text += (
            "\n(This run fine-tuned its backbone on these labels: flips it memorised are harder "
            "to find than with a frozen backbone.)"
        )
    return {"suspects": len(suspects), "files": written, "text": text}


def _train_features(config: Config, dataset: data.DataSet, model) -> features.Features:
    """The training split's features of the run's model (its pooler), in the split's order;
    a frozen run's disk cache is reused (its backbone is the pretrained one the key names)."""
    extractor, _ = features.split_classifier(model)
    train = dataset.train
    pipeline = data.make_pipeline(train, dataset.num_classes, config.batch_size, False, config.seed)
    mode = "memory"
    if config.unfreeze_layers == 0:
        head_phase = phases.plan(config)[0]
        mode = feature_fit.cache_mode(config, extractor.output_shape[-1], train.count, head_phase)
    if mode == "disk":
        key = feature_fit.cache_key(config, train, "train")
        cache_dir = feature_fit.features_dir(mode)
        return features.cached_extract(extractor, pipeline, train.count, cache_dir, key, 0)
    return features.extract(extractor, pipeline, train.count, verbose=0)


def _is_file(key) -> bool:
    return isinstance(key, bytes) and len(key) < 4096 and os.path.isfile(key)


def _is_image(split: data.Split, keys: list) -> bool:
    return bool(keys) and split.load(tf.constant(keys[0])).dtype != tf.string


def format_suspects(
    suspects: list, files: list | None, names: list[str], root: str, count: int
) -> str:
    """A short table of the first suspects: file (relative to the data folder), given and
    suggested class, the probe's confidence in the suggested one."""
    head = f"Suspected label errors: {len(suspects)} of {count} training examples"
    if not suspects:
        return head + "."
    rows = [("file", "given", "suggested", "confidence")]
    for s in suspects[:SHOWN_SUSPECTS]:
        name = f"#{s.index}"
        if files is not None:
            path = files[s.index].decode("utf-8", "replace")
            name = os.path.relpath(path, root) if root and path.startswith(root) else path
        rows.append((name, names[s.given], names[s.suggested], f"{s.confidence:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"{r[0]:{width[0]}s}  {r[1]:{width[1]}s}  {r[2]:{width[2]}s}  {r[3]:>10s}" for r in rows
    ]
    more = len(suspects) - SHOWN_SUSPECTS
    tail = f"\n... and {more} more in label_issues.json" if more > 0 else ""
    return f"{head} (most suspicious first):\n" + "\n".join(lines) + tail
