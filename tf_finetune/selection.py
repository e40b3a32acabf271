"""Which weights the run hands over: the best checkpoint, the EMA or the best-K average,
chosen on val_loss (validation chooses, test stays honest), and the --min_accuracy gate."""

import os

import keras

from tf_finetune import atomic, averaging, rundir, scoring
from tf_finetune.config import Config


def best_checkpoint_scores(model: keras.Model, config: Config, pipelines: dict) -> dict:
    """val_* metrics of the run's best checkpoint (loaded into `model`), for tune and compare."""
    best = os.path.join(config.model_dir, rundir.BEST_WEIGHTS)
    if os.path.exists(best):
        rundir.load_weights_quietly(model, best)
    return scoring.evaluate_splits(model, {"val": pipelines["val"]})


def _candidates(model: keras.Model, config: Config, holds_best: bool) -> dict[str, list]:
    """Each candidate's weights: the EMA (in `model` when fit ends), the best-K average and
    the best checkpoint, as the flags ask; leaves the best checkpoint in `model` (read from
    its file unless `holds_best`: the model holds it already)."""
    weights = {}
    if config.ema:  # fit has just swapped the EMA into the model
        weights["ema"] = model.get_weights()
    if config.average_checkpoints:
        keeper = averaging.KeepBestCheckpoints(
            os.path.join(config.model_dir, rundir.TOP_CHECKPOINTS),
            config.average_checkpoints,
            *config.monitor,
        )
        if keeper.paths():
            averaging.average_weights(model, keeper.paths())
            weights[f"average_of_best_{len(keeper.paths())}"] = model.get_weights()
    best = os.path.join(config.model_dir, rundir.BEST_WEIGHTS)
    if os.path.exists(best):
        if not holds_best or weights:  # the EMA / average replaced the model's weights
            rundir.load_weights_quietly(model, best)  # the exported model: best on val_loss
        weights["best_checkpoint"] = model.get_weights()
    return weights


def choose_weights(
    model: keras.Model, config: Config, pipelines: dict, holds_best: bool = False
) -> tuple[str, dict[str, dict[str, float]]]:
    """Evaluates the best checkpoint, the EMA and the best-K average side by side.

    `holds_best`: `model` holds the best checkpoint's weights already (a head fit on cached
    features leaves it so): it is not read again.

    Leaves the winner (lowest val_loss; highest val mAP for multi-label) in `model`; when it is not the best checkpoint, also
    writes it to final.weights.h5, which `evaluate` and `export` then read.

    Returns:
      The winner's name and each candidate's val/test metrics ({} with a single candidate).
    """
    final = os.path.join(config.model_dir, rundir.FINAL_WEIGHTS)
    atomic.remove(final)  # an earlier run's choice; rewritten below if this run's differs
    weights = _candidates(model, config, holds_best)
    if len(weights) < 2:
        return "best_checkpoint", {}
    evaluated = {k: v for k, v in pipelines.items() if k != "train"}
    results = {}
    for name, values in weights.items():
        model.set_weights(values)
        results[name] = scoring.evaluate_splits(model, evaluated)
    monitor, mode = config.monitor  # val_loss, or val mAP for multi-label
    sign = -1.0 if mode == "max" else 1.0
    winner = min(results, key=lambda name: sign * results[name][monitor])
    model.set_weights(weights[winner])
    if winner != "best_checkpoint":
        atomic.save_weights(model, final)
    return winner, results


def gate_accuracy(metrics: dict) -> tuple[str, float]:
    """The score --min_accuracy checks: test's when there is a test split, else val's;
    accuracy, or mAP for a multi-label model."""
    split = "test" if "test_accuracy" in metrics else "val"
    key = "map" if metrics.get("task") == "multi_label" else "accuracy"
    return split, metrics[f"{split}_{key}"]
