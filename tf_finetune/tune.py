"""`tf-finetune tune`: hyperparameter search with KerasTuner over the `--tune_*` flags.

Each searchable knob is an ordinary Config field (learning_rate, dropout, unfreeze, augment,
batch_size, label_smoothing); its `--tune_<field>` flag gives the values to try: a comma list
(`--tune_unfreeze=0,20,all`, a `Choice`) or, for numbers, a `LOW:HIGH` range
(`--tune_learning_rate=1e-4:1e-2`, sampled log-uniformly for the learning rate). Every other
flag is fixed at its value, as in `train`.

Each trial is a `train.fit_phases` run (the same strategy, data, phases and callbacks as
`train`) in `<model_dir>/tune/trial_<id>/`; its score is the best checkpoint's val_accuracy
(val mAP for multi-label).
The KerasTuner project is `<model_dir>/tune`: rerun the same command and the search goes on
where it stopped (an interrupted trial is retried, resuming from its own backup). At the end a
ranked table is printed and written to `<model_dir>/tune_results.json`, and the best trial to
`<model_dir>/best_trial.cfg`, which `tf-finetune train --flagfile=...` reruns in full.

Hyperband here trains each trial from scratch for the epochs the bracket gives it (no weights
carried between rounds): simpler to resume, at the cost of some repeated epochs.
"""

import dataclasses
import json
import os

import keras_tuner
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
from tf_finetune import config as config_lib
from tf_finetune.config import Config
from tf_finetune.errors import UserError

PROJECT = "tune"
RESULTS = "tune_results.json"
BEST_FLAGFILE = "best_trial.cfg"


def objective(config: Config) -> str:
    """What ranks the trials (higher is better): val_accuracy, or val mAP for multi-label."""
    return "val_map" if config.task == "multi_label" else "val_accuracy"


@dataclasses.dataclass(frozen=True)
class Knob:
    """A Config field the search may vary (its flag `--tune_<field>` lists the values)."""

    field: str
    kind: type
    log: bool = False  # ranges sample log-uniformly


KNOBS = (
    Knob("learning_rate", float, log=True),
    Knob("dropout", float),
    Knob("unfreeze", str),
    Knob("augment", str),
    Knob("batch_size", int),
    Knob("label_smoothing", float),
)


@dataclasses.dataclass(frozen=True)
class Dimension:
    knob: Knob
    choices: tuple = ()  # a Choice, or
    low: float | None = None  # a range
    high: float | None = None


def _check_value(config: Config, field: str, value) -> None:
    resolve.check_resolved(dataclasses.replace(config, **{field: value}))
    if field == "unfreeze":
        config_lib.parse_unfreeze(value)


def search_space(config: Config) -> list[Dimension]:
    """The dimensions the `--tune_*` flags ask for, each value validated like `train`'s.

    Raises:
      UserError: no `--tune_*` flag, a malformed one, or a range with `--tuner=grid`.
    """
    dims = []
    for knob in KNOBS:
        text = getattr(config, f"tune_{knob.field}").strip()
        if not text:
            continue
        flag = f"--tune_{knob.field}={text}"
        try:
            if ":" in text:
                if knob.kind is str:
                    raise ValueError
                low, high = (knob.kind(v) for v in text.split(":"))
                if not low < high:
                    raise ValueError
                if config.tuner == "grid":
                    raise UserError(
                        f"{flag}: --tuner=grid needs a list of values (a,b,c), not a range."
                    )
                for value in (low, high):
                    _check_value(config, knob.field, value)
                dims.append(Dimension(knob, low=low, high=high))
            else:
                values = tuple(dict.fromkeys(knob.kind(v.strip()) for v in text.split(",")))
                for value in values:
                    _check_value(config, knob.field, value)
                dims.append(Dimension(knob, choices=values))
        except ValueError:
            kind = "a list a,b,c" if knob.kind is str else "a list a,b,c or a range LOW:HIGH"
            raise UserError(f"{flag}: expected {kind} of {knob.kind.__name__} values.") from None
        except UserError as e:
            raise UserError(f"{flag}: {e}") from None
    if not dims:
        raise UserError(
            "tune needs at least one --tune_* flag, e.g. --tune_learning_rate=1e-4:1e-2 "
            "--tune_unfreeze=0,all."
        )
    return dims


def declare(dims: list[Dimension]) -> keras_tuner.HyperParameters:
    hp = keras_tuner.HyperParameters()
    for dim in dims:
        name = dim.knob.field
        if dim.choices:
            hp.Choice(name, list(dim.choices))
        elif dim.knob.kind is int:
            hp.Int(name, int(dim.low), int(dim.high), sampling="log" if dim.knob.log else "linear")
        else:
            hp.Float(name, dim.low, dim.high, sampling="log" if dim.knob.log else "linear")
    return hp


def make_oracle(config: Config) -> keras_tuner.Oracle:
    common = {"objective": keras_tuner.Objective(objective(config), "max"), "seed": config.seed}
    if config.tuner == "hyperband":
        return keras_tuner.oracles.HyperbandOracle(max_epochs=config.epochs, factor=3, **common)
    oracle = {
        "random": keras_tuner.oracles.RandomSearchOracle,
        "grid": keras_tuner.oracles.GridSearchOracle,
        "bayesian": keras_tuner.oracles.BayesianOptimizationOracle,
    }[config.tuner]
    return oracle(max_trials=config.max_trials, **common)


def trial_config(base: Config, values: dict, epochs: int, model_dir: str) -> Config:
    """The `train` config of one trial: the base flags with the trial's values."""
    return dataclasses.replace(
        base,
        **values,
        epochs=epochs,
        # Hyperband's short rounds can be shorter than the head warmup: keep one fine-tune epoch.
        warmup_epochs=min(base.warmup_epochs, epochs - 1),
        model_dir=model_dir,
        export_dir="",
        min_accuracy=0.0,
        # The knobs (learning rate, batch size, dropout, epochs) are fit's: L-BFGS ignores them.
        head_solver="fit" if base.head_solver == "auto" else base.head_solver,
        **{f"tune_{k.field}": "" for k in KNOBS},
    )


class FinetuneTuner(keras_tuner.engine.base_tuner.BaseTuner):
    """Runs each trial as a `train` fit under one strategy, on data loaded once."""

    def __init__(self, config: Config, dims: list[Dimension], dataset, strategy, **kwargs):
        oracle = make_oracle(config)
        oracle.update_space(declare(dims))
        super().__init__(
            oracle, directory=config.model_dir, project_name=PROJECT, overwrite=False, **kwargs
        )
        self.base, self.dims, self.dataset, self.strategy = config, dims, dataset, strategy

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        values = {dim.knob.field: hp.get(dim.knob.field) for dim in self.dims}
        epochs = int(hp.values.get("tuner/epochs", self.base.epochs))
        config = trial_config(self.base, values, epochs, self.get_trial_dir(trial.trial_id))
        logging.info("Trial %s: %s, %d epochs", trial.trial_id, values, epochs)
        train.seed_everything(config)  # every trial starts from the same seed
        pipelines = input_pipeline.make_pipelines(
            config, self.dataset, self.strategy.num_replicas_in_sync
        )
        fit = train.fit_phases(config, self.dataset, pipelines, self.strategy, verbose=0)
        scores = selection.best_checkpoint_scores(fit.model, config, pipelines)
        seconds = list(fit.epoch_seconds.values())
        name = objective(self.base)
        return {
            name: scores[name],
            "val_loss": scores["val_loss"],
            "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else 0.0,
        }

    def save_model(self, trial_id, model, step=0):
        pass  # each trial's run dir already holds its best checkpoint


def ranked_trials(tuner: FinetuneTuner) -> list[dict]:
    """Completed trials, best first (the objective, then val_loss on a tie), with their values."""
    name = objective(tuner.base)
    done = tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials))
    rows = []
    for trial in done:
        if trial.status != "COMPLETED" or trial.score is None:
            continue
        metrics = trial.metrics
        rows.append(
            {
                "trial": trial.trial_id,
                name: trial.score,
                "val_loss": metrics.get_last_value("val_loss"),
                "seconds_per_epoch": metrics.get_last_value("seconds_per_epoch"),
                "epochs": int(trial.hyperparameters.values.get("tuner/epochs", 0)) or None,
                "values": {
                    d.knob.field: trial.hyperparameters.get(d.knob.field) for d in tuner.dims
                },
            }
        )
    return sorted(rows, key=lambda r: (-r[name], r["val_loss"], r["trial"]))


def format_table(rows: list[dict], dims: list[Dimension], score: str = "val_accuracy") -> str:
    names = [d.knob.field for d in dims]
    header = ["rank", "trial", score.replace("accuracy", "acc"), "val_loss", "s/epoch", *names]
    lines = [header]
    for rank, row in enumerate(rows, 1):
        lines.append(
            [
                str(rank),
                row["trial"],
                f"{row[score]:.4f}",
                f"{row['val_loss']:.4f}",
                f"{row['seconds_per_epoch']:.1f}",
                *(
                    f"{row['values'][n]:.3g}"
                    if isinstance(row["values"][n], float)
                    else str(row["values"][n])
                    for n in names
                ),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def tune(config: Config) -> dict:
    """Runs (or resumes) the search; returns the ranked rows, the table and the flagfile path."""
    dims = search_space(config)
    strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
    os.makedirs(config.model_dir, exist_ok=True)
    atomic.write_text(os.path.join(config.model_dir, "tune.cfg"), config.to_flagfile())
    train.seed_everything(config)
    dataset = input_pipeline.load_data(config, offline_default.data_folder(config))
    tuner = FinetuneTuner(config, dims, dataset, strategy)
    tuner.search()
    rows = ranked_trials(tuner)
    if not rows:
        raise UserError(f"no trial completed; see the logs in {config.model_dir}/{PROJECT}.")
    best, score = rows[0], objective(config)
    best_config = trial_config(
        config,
        best["values"],
        best["epochs"] or config.epochs,
        os.path.join(config.model_dir, "best_trial"),
    )
    flagfile = os.path.join(config.model_dir, BEST_FLAGFILE)
    header = (
        f"# The best of {len(rows)} trial(s) of 'tf-finetune tune' (trial {best['trial']}, "
        f"{score} {best[score]:.4f}).\n"
        f"# Rerun it in full (report, export): tf-finetune train --flagfile={flagfile}\n"
    )
    atomic.write_text(flagfile, header + best_config.to_flagfile())
    atomic.write_text(
        os.path.join(config.model_dir, RESULTS),
        json.dumps({"objective": score, "trials": rows}, indent=2),
    )
    page = report.write_index(
        config.model_dir,
        f"tf-finetune tune: {len(rows)} trial(s), ranked by {score.replace('_', ' ')}",
        [(k, k.replace("_", " ")) for k in ("trial", score, "val_loss", "epochs")]
        + [("values", "hyperparameters"), ("seconds_per_epoch", "s/epoch")],
        [{**r, "run_dir": tuner.get_trial_dir(r["trial"])} for r in rows],
        note=f"Rerun the best in full: tf-finetune train --flagfile={flagfile}",
    )
    table = format_table(rows, dims, score)
    return {"rows": rows, "table": table, "flagfile": flagfile, "report": page}
