"""`tf-finetune tune` (KerasTuner) and `tf-finetune compare` on tiny data, through the CLI."""

import json
import os

import pytest

from tests.helpers import tiny_flags
from tf_finetune import cli, tune
from tf_finetune.config import Config
from tf_finetune.errors import UserError
from tf_finetune.resolve import resolve


def _tiny_flags(folder, model_dir, epochs=2):
    return tiny_flags(folder, model_dir, f"--epochs={epochs}", "--batch_size=8")


@pytest.mark.slow  # two searches and a full train: ~20-40 s on 2 busy cores
def test_tune_runs_two_trials_ranks_them_and_its_flagfile_trains(folder, tmp_path, capsys):
    run = tmp_path / "search"
    argv = [
        "tune",
        *_tiny_flags(folder, run),
        "--tuner=random",
        "--max_trials=2",
        "--tune_learning_rate=1e-3:1e-1",
        "--tune_unfreeze=0,all",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((run / tune.RESULTS).read_text())["trials"]
    assert len(results) == 2
    scores = [r["val_accuracy"] for r in results]
    assert scores == sorted(scores, reverse=True)
    table = out.split("Trials ranked")[1].splitlines()
    assert table[1].split()[:2] == ["rank", "trial"] and "learning_rate" in table[1]
    assert [line.split()[0] for line in table[2:4]] == ["1", "2"]
    for r in results:
        assert 1e-3 <= r["values"]["learning_rate"] <= 1e-1 and r["values"]["unfreeze"] in (
            "0",
            "all",
        )
        assert os.path.isdir(run / tune.PROJECT / f"trial_{r['trial']}" / "checkpoints")

    flagfile = run / tune.BEST_FLAGFILE
    text = flagfile.read_text()
    best = results[0]["values"]
    assert f"--unfreeze={best['unfreeze']}" in text
    assert f"--learning_rate={best['learning_rate']}" in text
    assert cli.main(["train", f"--flagfile={flagfile}"]) == 0
    metrics = json.loads((run / "best_trial" / "metrics.json").read_text())
    assert os.path.exists(os.path.join(metrics["export_path"], "saved_model.pb"))

    # Resumable: the finished project is reloaded, no trial runs again.
    histories = sorted((run / tune.PROJECT).glob("trial_*/history.csv"))
    stamps = [os.path.getmtime(p) for p in histories]
    capsys.readouterr()
    assert cli.main(argv) == 0
    again = json.loads((run / tune.RESULTS).read_text())["trials"]
    assert again == results
    assert [os.path.getmtime(p) for p in histories] == stamps and len(stamps) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "at least one --tune_"),
        (["--tune_augment=none,wild"], "--augment"),
        (["--tune_batch_size=8:a"], "--tune_batch_size=8:a"),
        (["--tuner=grid", "--tune_dropout=0.1:0.5"], "needs a list"),
        (["--tune_unfreeze=0,2.5"], "--unfreeze must be"),
    ],
)
def test_tune_flag_errors_are_one_line(folder, tmp_path, capsys, flags, message):
    code = cli.main(["tune", *_tiny_flags(folder, tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_search_space_lists_and_ranges():
    # As `tune` calls it: on the resolved config (trial values are checked against its backbone).
    config = resolve(
        Config(tune_learning_rate="1e-4:1e-2", tune_unfreeze="0,20,all", tune_batch_size="16,32")
    )
    dims = {d.knob.field: d for d in tune.search_space(config)}
    assert (dims["learning_rate"].low, dims["learning_rate"].high) == (1e-4, 1e-2)
    assert dims["unfreeze"].choices == ("0", "20", "all")
    assert dims["batch_size"].choices == (16, 32)
    hp = tune.declare(list(dims.values()))
    assert hp.get("learning_rate") == pytest.approx(1e-4) and hp.get("batch_size") == 16
    with pytest.raises(UserError):
        tune.search_space(Config(tune_augment="none:light"))


@pytest.mark.slow
def test_compare_prints_a_row_per_variant_and_writes_json(folder, tmp_path, capsys):
    run = tmp_path / "cmp"
    argv = [
        "compare",
        *_tiny_flags(folder, run),
        "--unfreeze=0,1,all",
        "--warmup_epochs=1",  # each unfrozen variant: 1 head-only epoch, then 1 fine-tuning
        "--learning_rate=0.01",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    table = out.split("one row per --unfreeze value:")[1].strip().splitlines()
    assert table[0].split()[0] == "--unfreeze"
    assert [line.split()[0] for line in table[1:4]] == ["0", "1", "all"]
    results = json.loads((run / "compare.json").read_text())["variants"]
    params = [r["trainable_parameters"] for r in results]
    assert params[0] < params[1] < params[2]  # head < head + conv3 < head + all convs
    assert params[0] == 128 * 3 + 3  # the Dense head on digits_cnn's 128 features
    for r in results:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] >= 0 and r["seconds_per_epoch"] > 0
        # --unfreeze=0 has one head-only phase, solved once (--head_solver=auto); the others
        # solve their head phase, then fine-tune for an epoch.
        assert len(r["epoch_seconds"]) == (1 if r["unfreeze"] == "0" else 2)
    # A rerun reuses the finished variants instead of training them again.
    stamp = os.path.getmtime(run / "compare" / "unfreeze_1" / "checkpoints" / "best.weights.h5")
    assert cli.main(argv) == 0
    assert (
        os.path.getmtime(run / "compare" / "unfreeze_1" / "checkpoints" / "best.weights.h5")
        == stamp
    )


def test_train_refuses_a_list_of_unfreeze_values(folder, tmp_path, capsys):
    code = cli.main(["train", *_tiny_flags(folder, tmp_path), "--unfreeze=0,all"])
    err = capsys.readouterr().err
    assert code == 2 and "compare" in err and len(err.strip().splitlines()) == 1
