"""Bad flags: caught before anything heavy runs, one line each, conflicts explained."""

import pytest

from tests.helpers import train_error
from tf_finetune import cli


def test_empty_data_folder_is_explained(capsys, tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden files do not count
    err = train_error(capsys, f"--data={tmp_path}")
    assert "is an empty folder; put one subfolder of images per class" in err


def test_flagfile_unknown_flag_names_file_and_line_even_when_nested(capsys, tmp_path):
    inner = tmp_path / "inner.cfg"
    inner.write_text("# preset\n--epochs=2\n\n--learnig_rate=0.1\n")
    outer = tmp_path / "outer.cfg"
    outer.write_text(f"--batch_size=4\n--flagfile={inner}\n")
    err = train_error(capsys, f"--flagfile={outer}")
    assert f"{inner} line 4: Unknown command line flag 'learnig_rate'" in err
    assert "Did you mean: learning_rate" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--weight_decay=0.01"], "--weight_decay only applies to --optimizer=adamw"),
        (["--train_split=train[:50%]"], "--train_split selects a TFDS split, but --data="),
        (["--test_split=test"], "--test_split selects a TFDS split"),
        (["--cpu_replicas=2", "--strategy=one_device"], "conflicts with --strategy=one_device"),
        (["--cpu_replicas=2", "--strategy=multi_worker"], "conflicts with --strategy=multi_worker"),
    ],
)
def test_conflicting_flags_are_explained(capsys, folder, argv, expected):
    assert expected in train_error(capsys, f"--data={folder}", *argv)


def test_conflict_free_values_pass(folder):
    # The defaults a flags.cfg spells out (e.g. --weight_decay=0.0001 with adam) are no conflict.
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["prog", f"--data={folder}", "--weight_decay=0.0001", "--train_split=train"])
    assert cli.config_from_flags().optimizer == "adam"
    cli.FLAGS(["prog", f"--data={folder}", "--optimizer=adamw", "--weight_decay=0.05"])
    assert cli.config_from_flags().weight_decay == 0.05


def test_multi_worker_needs_a_valid_tf_config_before_anything_starts(capsys, folder, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    err = train_error(capsys, f"--data={folder}", "--strategy=multi_worker")
    assert "TF_CONFIG is not set" in err and '"cluster"' in err
    monkeypatch.setenv("TF_CONFIG", "{not json")
    assert "TF_CONFIG is not valid JSON" in train_error(
        capsys, f"--data={folder}", "--strategy=multi_worker"
    )


def test_data_service_address_is_checked(capsys, folder):
    assert "must look like grpc://HOST:PORT" in train_error(
        capsys, f"--data={folder}", "--data_service=localhost:5050"
    )
