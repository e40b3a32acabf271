"""The `tf-finetune` command: absl flags -> a frozen Config -> the library.

Intentionally short. The only module that reads FLAGS. Every flag comes from a field of
`config.Config`, so each knob is declared once. The first positional word picks the command;
adding one is adding an entry to COMMANDS. Only commands marked `takes_inputs` (predict)
accept positional arguments (the files to act on) after it.

Start-up order: flags are parsed and checked before TensorFlow is imported (it takes seconds);
commands marked `needs_config=False` (backbones) never import it. From there until the
strategy exists, fd 2 goes through `quiet_start`, which drops TensorFlow's known C++ start-up
lines (unless --verbosity asks for them) and passes everything else on.
"""

import dataclasses
import logging as std_logging
import os
import sys
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up noise out

from absl import flags, logging  # noqa: E402

from tf_finetune import config as config_lib  # noqa: E402
from tf_finetune import quiet_start, tf_import  # noqa: E402
from tf_finetune.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
PROG = "tf-finetune"


def _define_flags() -> None:
    for f in dataclasses.fields(config_lib.Config):
        meta = f.metadata
        if f.name in FLAGS:
            continue
        if meta.get("choices"):
            flags.DEFINE_enum(f.name, f.default, meta["choices"], meta["help"])
        elif f.type is bool:
            flags.DEFINE_boolean(f.name, f.default, meta["help"])
        elif f.type is int:
            flags.DEFINE_integer(f.name, f.default, meta["help"])
        elif f.type is float:
            flags.DEFINE_float(f.name, f.default, meta["help"])
        else:
            flags.DEFINE_string(f.name, f.default, meta["help"])


_define_flags()


def config_from_flags() -> config_lib.Config:
    """The Config the parsed flags describe (resolved and validated)."""
    names = [f.name for f in dataclasses.fields(config_lib.Config)]
    explicit = frozenset(n for n in names if FLAGS[n].present)
    from tf_finetune.resolve import resolve

    return resolve(config_lib.Config(**{n: FLAGS[n].value for n in names}), explicit)


# ----------------------------------------------------------------------------- commands
def cmd_train(config: config_lib.Config) -> int:
    from tf_finetune import train

    metrics = train.train_and_evaluate(config)
    if metrics.get("chief") is False:  # a multi-worker run's other workers: the chief reports
        print(f"Worker done: {metrics['epochs']} epochs on {metrics['replicas']} replicas.")
        return 0
    _print_train_summary(config, metrics)
    page = os.path.join(config.model_dir, "report.html")
    if os.path.exists(page):  # the page a person opens (train writes it last)
        print(f"Report:        {page}")
    return 0


def cmd_evaluate(config: config_lib.Config) -> int:
    from tf_finetune import evaluate_run

    report = evaluate_run.evaluate_run(config, config.split)
    print(report["text"])
    print(f"\nReport and plots: {', '.join(report['files'])}")
    print(f"Report: {report['page']}")
    return 0


def cmd_tune(config: config_lib.Config) -> int:
    from tf_finetune import tune

    result = tune.tune(config)
    print(f"\nTrials ranked by val_accuracy (best checkpoint of each):\n{result['table']}")
    print(f"\nBest trial as flags: {result['flagfile']}")
    print(f"Rerun it in full:    {PROG} train --flagfile={result['flagfile']}")
    print(f"Report: {result['report']}")
    return 0


def cmd_compare(config: config_lib.Config) -> int:
    from tf_finetune import compare

    result = compare.compare(config)
    print(
        f"\nSame data, seed and budget ({config.epochs} epochs"
        + (f", {config.warmup_epochs} of them head-only" if config.warmup_epochs else "")
        + f"), one row per --unfreeze value:\n{result['table']}"
    )
    print(f"\nRuns and compare.json in {config.model_dir}")
    print(f"Report: {result['report']}")
    return 0


def cmd_check_data(config: config_lib.Config) -> int:
    from tf_finetune import check_data

    if config.is_offline_default:
        raise UserError("check-data needs --data=FOLDER (the folder you would train on).")
    if config.task == "multi_label":
        from tf_finetune import input_pipeline

        dataset = input_pipeline.load_data(config)
        print(check_data.format_label_statistics(check_data.multi_label_report(dataset)))
        return 0
    report = check_data.check_folder(
        config.data,
        config.validation_percent,
        config.image_size,
        config.test_percent,
        config.max_image_pixels,
    )
    print(check_data.format_report(report))
    return 0


def cmd_export(config: config_lib.Config) -> int:
    from tf_finetune import export_run

    result = export_run.export_run(config)
    if result["rows"]:
        score = "val mAP" if config.task == "multi_label" else "val accuracy"
        print(f"\n  {'model (tflite)':16s} {'size':>10s}  {score:>12s}")
        for name, size, accuracy in result["rows"]:
            print(f"  {name:16s} {size / 1024:>7.1f} KB  {accuracy:>12.3f}")
        print()
    print(f"Exported {result['format']}: {result['path']}")
    print(f"Model card:  {result['card']}")
    if result["serving_config"]:
        print(
            f"TF Serving config: {result['serving_config']} (serves {config.export_base} as "
            f"'{config.model_name}' mounted at /models/{config.model_name})"
        )
    return 0


def cmd_predict(config: config_lib.Config, inputs: list[str]) -> int:
    from tf_finetune import serving

    return serving.predict_main(config, inputs)


def cmd_backbones() -> int:
    from tf_finetune.backbone_table import BACKBONES  # the table without TensorFlow

    print(f"{'name':24s} {'default size':>12s}  preprocessing")
    for spec in BACKBONES.values():
        print(f"{spec.name:24s} {spec.default_size:>12d}  {spec.preprocessing}")
    _print_keras_hub_presets()
    return 0


def _print_keras_hub_presets() -> None:
    from tf_finetune.keras_hub_table import PREFIX, PRESETS  # static: no keras_hub import

    print(
        f"\nkeras-hub presets (--backbone={PREFIX}NAME; downloaded once into KAGGLEHUB_CACHE;"
        f" any other keras-hub preset name or a {PREFIX}/path/to/preset folder works too):"
    )
    print(f"{'name':32s} {'kind':5s} {'default size':>12s}  parameters")
    for p in PRESETS.values():
        size = "-" if p.kind == "text" else f"{p.image_size}{' only' if p.fixed_size else ''}"
        print(f"{p.name:32s} {p.kind:5s} {size:>12s}  {p.parameters}")


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[..., int]  # (config) -> exit code; (config, inputs) if takes_inputs
    help: str
    takes_inputs: bool = False
    needs_config: bool = True  # False: run() takes nothing and never imports TensorFlow


COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, "fine-tune a backbone on your images and export a SavedModel"),
    "evaluate": Command(
        cmd_evaluate,
        "report accuracy, per-class precision/recall/F1, confusion matrix and plots of a run "
        "(its flags.cfg gives the data and model; flags override)",
    ),
    "tune": Command(
        cmd_tune,
        "search hyperparameters with KerasTuner over the --tune_* flags; writes the best trial "
        "as a flagfile for train",
    ),
    "compare": Command(
        cmd_compare,
        "train one variant per --unfreeze value (e.g. 0,20,all) on the same data, seed and "
        "budget; print val accuracy, loss, trainable parameters and seconds per epoch",
    ),
    "check-data": Command(
        cmd_check_data,
        "report class counts per split, unreadable files, duplicates across splits, class "
        "imbalance and image sizes of --data, without training",
    ),
    "export": Command(
        cmd_export,
        "re-export a run's best checkpoint (--model_dir): --format=saved_model|keras|tflite, "
        "--quantize for TFLite, --serving_config for TF Serving",
    ),
    "predict": Command(
        cmd_predict,
        "top-k classes of images and folders: predict --model=EXPORT_OR_RUN a.jpg photos/ "
        "(or --server=URL / --grpc=HOST:PORT with --model_name for TF Serving)",
        takes_inputs=True,
    ),
    "backbones": Command(
        cmd_backbones, "list the backbone names --backbone accepts", needs_config=False
    ),
}


def format_timings(timings: dict) -> str:
    """metrics.json's `timings` as one line: seconds per stage, the feature pass's images/s."""
    rate = timings.get("feature_images_per_second")
    parts = []
    for stage, seconds in timings.items():
        if stage == "feature_images_per_second":
            continue
        extra = f" ({rate:,.0f} images/s)" if stage == "features" and rate else ""
        parts.append(f"{stage} {seconds:.1f} s{extra}")
    return ", ".join(parts)


def _print_train_summary(config: config_lib.Config, metrics: dict) -> None:
    # A multi-label run's score is mAP (its `accuracy` is the exact-match share).
    score = "map" if config.task == "multi_label" else "accuracy"
    rows = [("model", "mAP" if score == "map" else "accuracy", "loss")]
    comparison = metrics.get("offline_comparison")
    # --unfreeze=0 (with or without --warmup_epochs) never trains the backbone.
    frozen = all(config_lib.parse_unfreeze(v) == 0 for v in config.unfreeze.split(","))
    ours = f"frozen {config.backbone} + head" if frozen else f"fine-tuned {config.backbone}"
    for prefix, label in (
        ("", ours),
        ("scratch_", "same net from scratch"),
    ):
        for split in ("val", "test"):
            acc = metrics.get(f"{prefix}{split}_{score}")
            if acc is None:
                continue
            loss = f"{metrics[f'{prefix}{split}_loss']:.3f}"
            if comparison:  # mean +- sd over the comparison's seeds
                side = comparison["scratch" if prefix else "fine_tuned"]
                acc, sd = side[f"{split}_accuracy"]["mean"], side[f"{split}_accuracy"]["sd"]
                loss = f"{side[f'{split}_loss']['mean']:.3f}"
                rows.append((f"{label} [{split}]", f"{acc:.3f} ± {sd:.3f}", loss))
            else:
                rows.append((f"{label} [{split}]", f"{acc:.3f}", loss))
    if comparison:
        rows.append((f"(mean ± sd over seeds {', '.join(map(str, comparison['seeds']))})", "", ""))
    print()
    for row in rows:
        print(f"  {row[0]:42s} {row[1]:>13s} {row[2]:>8s}")
    print(
        f"\n{len(metrics['class_names'])} classes, {metrics['train_images']} train / "
        f"{metrics['val_images']} val / {metrics['test_images']} test {_data_kind(config)}, "
        f"{len(metrics['skipped_files'])} unreadable file(s) skipped, "
        f"{metrics['wall_time_seconds']:.0f} s."
    )
    if metrics.get("timings"):
        print(f"Timings: {format_timings(metrics['timings'])}")
    if config.is_offline_default:
        how = (
            "with the backbone frozen"
            if config.unfreeze == "0"
            else f"(--unfreeze={config.unfreeze})"
        )
        print(
            "Offline default: real handwritten digits from scikit-learn. digits_cnn was pretrained "
            f"on the digits 0-4, then fine-tuned {how} on the digits 5-9 from "
            f"{metrics['train_images'] // len(metrics['class_names'])} images per class."
        )
    kept = ["metrics.json", "flags.cfg"] + (
        ["logs/"] if os.path.isdir(os.path.join(config.model_dir, "logs")) else []
    )
    print(f"Run directory: {config.model_dir}  ({', '.join(kept)})")
    print(f"Export:        {metrics['export_path']}")


def _data_kind(config: config_lib.Config) -> str:
    """'texts' or 'images': what the counts of a run's summary count (metrics.json's keys say
    train_images for both)."""
    from tf_finetune import text_data

    return "texts" if text_data.is_text_source(config) else "images"


# ----------------------------------------------------------------------------- help
def usage() -> str:
    lines = [
        f"usage: {PROG} COMMAND [--flag=value ...] [--flagfile=FILE]",
        f"       {PROG} predict --model=EXPORT_OR_RUN_DIR [--flag=value ...] IMAGE_OR_DIR ...",
        "",
        "commands:",
        *(f"  {name:12s} {c.help}" for name, c in COMMANDS.items()),
    ]
    fields = dataclasses.fields(config_lib.Config)
    for group in config_lib.GROUPS:
        lines += ["", f"{group} flags:"]
        for f in fields:
            if f.metadata["group"] != group:
                continue
            choices = f.metadata.get("choices")
            kind = "|".join(choices) if choices else f.type.__name__
            lines.append(f"  --{f.name}={f.default!s}  ({kind})")
            lines.append(f"      {f.metadata['help']}")
    lines += [
        "",
        "  --flagfile=FILE  read flags from FILE (one --flag=value per line; # comments)",
        "  --verbosity=1    also show TensorFlow's C++ start-up lines (hidden by default)",
    ]
    return "\n".join(lines)


def _ours_or_important(record: std_logging.LogRecord) -> bool:
    return (
        record.levelno >= std_logging.WARNING or f"{os.sep}tf_finetune{os.sep}" in record.pathname
    )


def _configure_logging() -> None:
    """Our INFO lines; TensorFlow's own INFO (SavedModel internals) only at WARNING and up."""
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    if _ours_or_important not in handler.filters:
        handler.addFilter(_ours_or_important)


def _with_run_flagfile(command: str, argv: list[str]) -> list[str]:
    """For commands that act on a finished run: its flags.cfg first, the user's flags after."""
    if command in ("train", "tune", "compare"):  # these start runs of their own
        return argv
    model_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("--model_dir=")), None)
    saved = os.path.join(model_dir, "flags.cfg") if model_dir else None
    return [f"--flagfile={saved}", *argv] if saved and os.path.exists(saved) else argv


def _flagfile_line(argv: list[str], flagname: str | None, depth: int = 0) -> str:
    """'FILE line N: ' where a flagfile (or one it includes) sets `flagname`; else ''."""
    if not flagname or depth > 10:
        return ""
    for arg in argv:
        if not arg.startswith("--flagfile="):
            continue
        path = arg.split("=", 1)[1]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for number, line in enumerate(lines, 1):
            name = line.strip().lstrip("-").split("=", 1)[0]
            if name in (flagname, f"no{flagname}"):
                return f"{path} line {number}: "
        nested = _flagfile_line([ln.strip() for ln in lines], flagname, depth + 1)
        if nested:
            return nested
    return ""


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    """Parses argv (without the program name) and runs the command; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help", "help", "--helpfull"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}.")
    if any(a in ("-h", "--help", "--helpfull") for a in rest):
        print(usage())
        return 0
    FLAGS.unparse_flags()  # main() may run more than once in a process (tests)
    try:
        positional = FLAGS([PROG, *_with_run_flagfile(command, rest)])[1:]
    except flags.Error as e:
        where = _flagfile_line(rest, getattr(e, "flagname", None))
        return _fail(f"{where}{e}. Run '{PROG} --help' for the flags.")
    chosen = COMMANDS[command]
    if positional and not chosen.takes_inputs:
        return _fail(
            f"unexpected argument(s) {' '.join(positional)}; flags look like --name=value."
        )
    show_startup = FLAGS["verbosity"].value >= 1  # read before _configure_logging sets it
    _configure_logging()
    if not chosen.needs_config:
        return chosen.run()
    if not show_startup:
        # Until the strategy exists (distribute.make_strategy ends it) or the command returns.
        quiet_start.begin()
    try:
        tf_import.defer_sklearn()
        tf_import.collect_less()
        config = config_from_flags()
        tf_import.freeze()  # TensorFlow is in by now
        return chosen.run(config, positional) if chosen.takes_inputs else chosen.run(config)
    except UserError as e:
        # Stopped (signal) and NonFiniteLoss carry their own exit codes.
        return _fail(str(e), getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume from the last epoch.", 130)
    finally:
        quiet_start.end()
        tf_import.freeze()  # the interpreter's exit then skips what the command made


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:]))
