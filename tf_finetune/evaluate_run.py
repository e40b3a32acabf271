"""The `evaluate` command: a finished run's weights, re-scored on one split of its data.

Reads the run dir (rundir.py) and rebuilds the model from the run's flags with no pretrained
weights (the checkpoint holds every weight); never imports the trainer.
"""

from tf_finetune import (
    data,
    distribute,
    evaluate,
    input_pipeline,
    offline_default,
    rundir,
    scoring,
    splits,
)
from tf_finetune import model as model_lib
from tf_finetune import report as report_page
from tf_finetune.config import Config


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
    report = scoring.write_split_report(model, pipeline, dataset, config, split)
    report["text"] = evaluate.format_report(report, dataset.class_names)
    if note:
        report["text"] = f"{note}\n{report['text']}"
    report["page"] = report_page.write_report(config.model_dir)
    return report
