"""`tf-finetune compare --unfreeze=0,20,all`: "fine-tune all layers or only the top?" answered.

Runs one `train` fit per `--unfreeze` value on the same data, seed and budget (every other flag
is shared, e.g. `--warmup_epochs` makes each variant two-phase), then prints val accuracy, val
loss, trainable parameters and seconds per epoch as one table and writes `<model_dir>/
compare.json`. Variant runs live in `<model_dir>/compare/unfreeze_<value>/`; a rerun of the same
command reuses finished variants (their flags must match) and resumes an unfinished one.
"""

import dataclasses
import json
import os

from absl import logging

from tf_finetune import (
    atomic,
    distribute,
    input_pipeline,
    offline_default,
    report,
    resolve,
    selection,
    train,
)
from tf_finetune.config import Config
from tf_finetune.errors import UserError

RESULTS = "compare.json"
VARIANT_RESULT = "compare_result.json"
INDEX_COLUMNS = [
    ("unfreeze", "--unfreeze"),
    ("val_accuracy", "val accuracy"),
    ("val_loss", "val loss"),
    ("trainable_parameters", "trainable params"),
    ("seconds_per_epoch", "s/epoch"),
]


def variants(config: Config) -> list[Config]:
    """One config per `--unfreeze` value, each in its own run dir."""
    values = list(dict.fromkeys(v.strip() for v in config.unfreeze.split(",")))
    if len(values) < 2:
        raise UserError("compare needs at least two --unfreeze values, e.g. --unfreeze=0,20,all.")
    out = []
    for value in values:
        variant = dataclasses.replace(
            config,
            unfreeze=value,
            model_dir=os.path.join(config.model_dir, "compare", f"unfreeze_{value}"),
            export_dir="",
            min_accuracy=0.0,
        )
        resolve.check_resolved(variant)
        out.append(variant)
    return out


def run_variant(config: Config, dataset, strategy) -> dict:
    """Trains one variant (or reuses its finished result) and returns its row."""
    cached = os.path.join(config.model_dir, VARIANT_RESULT)
    flags = config.to_flagfile()
    if os.path.exists(cached):
        with open(cached, encoding="utf-8") as f:
            row = json.load(f)
        if row.get("flags") == flags:
            logging.info("compare: reusing the finished --unfreeze=%s run", config.unfreeze)
            return row
    os.makedirs(config.model_dir, exist_ok=True)
    train.seed_everything(config)  # every variant starts from the same seed
    pipelines = input_pipeline.make_pipelines(config, dataset, strategy.num_replicas_in_sync)
    fit = train.fit_phases(config, dataset, pipelines, strategy, verbose=0)
    scores = selection.best_checkpoint_scores(fit.model, config, pipelines)
    seconds = list(fit.epoch_seconds.values())
    row = {
        "unfreeze": config.unfreeze,
        "val_accuracy": scores["val_accuracy"],
        "val_loss": scores["val_loss"],
        **({"val_map": scores["val_map"]} if "val_map" in scores else {}),  # multi-label
        "trainable_parameters": train.count_parameters(fit.model.trainable_weights),
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "epoch_seconds": {str(e): t for e, t in sorted(fit.epoch_seconds.items())},
        "run_dir": config.model_dir,
        "flags": flags,
    }
    atomic.write_json(cached, row)
    return row


def compare(config: Config) -> dict:
    """Runs every variant; returns the rows and the printed table."""
    configs = variants(config)
    strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
    train.seed_everything(config)
    dataset = input_pipeline.load_data(config, offline_default.data_folder(config))
    rows = [run_variant(c, dataset, strategy) for c in configs]
    results = {
        "epochs": config.epochs,
        "warmup_epochs": config.warmup_epochs,
        "seed": config.seed,
        "train_images": dataset.train.count,
        "val_images": dataset.val.count,
        "variants": [{k: v for k, v in row.items() if k != "flags"} for row in rows],
    }
    atomic.write_json(os.path.join(config.model_dir, RESULTS), results)
    score = "val_map" if config.task == "multi_label" else "val_accuracy"
    page = report.write_index(
        config.model_dir,
        f"tf-finetune compare: {len(rows)} --unfreeze variants, ranked by "
        + score.replace("_", " "),
        INDEX_COLUMNS + ([("val_map", "val mAP")] if score == "val_map" else []),
        sorted(rows, key=lambda r: (-r[score], r["val_loss"])),
    )
    return {"rows": rows, "table": format_table(rows), "report": page}


def format_table(rows: list[dict]) -> str:
    """One line per variant; a multi-label comparison adds its val mAP."""
    with_map = all("val_map" in row for row in rows)
    lines = [
        ("--unfreeze", "val_accuracy", "val_loss", "trainable params", "s/epoch")
        + (("val_map",) if with_map else ())
    ]
    for row in rows:
        seconds = row["seconds_per_epoch"]
        lines.append(
            (
                row["unfreeze"],
                f"{row['val_accuracy']:.4f}",
                f"{row['val_loss']:.4f}",
                f"{row['trainable_parameters']:,}",
                "-" if seconds is None else f"{seconds:.1f}",
            )
            + ((f"{row['val_map']:.4f}",) if with_map else ())
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )
