"""Flag errors: one clear line, a non-zero exit, no traceback; --help grouped by topic."""

import os
import subprocess
import sys

import pytest

from tf_finetune import cli
from tf_finetune.config import Config
from tf_finetune.resolve import resolve


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--backbone=mobilenetv2"], "Did you mean: mobilenet_v2"),
        (["train", "--backbone=efficientnet-b0"], "efficientnet_b0"),
        (["train", "--epochs=-1"], "--epochs must be at least 1"),
        (["train", "--data=/no/such/folder"], "no such folder"),
        (["train", "--learning_rate=0"], "--learning_rate must be positive"),
        (["train", "--unfreeze=some"], "--unfreeze must be"),
        (["train", "--optimizer=rmsprop"], "--optimizer"),
        (["train", "--no_such_flag=1"], "no_such_flag"),
        (["train", "--weights=/no/such.h5"], "--weights=/no/such.h5"),
        (["train", "--backbone=resnet50", "--backbone_alpha=0.5"], "only applies to MobileNet"),
        (["train", "--backbone=inception_v3", "--image_size=32"], "too small for inception_v3"),
        (["fly"], "unknown command 'fly'"),
        (["train", "stray"], "unexpected argument"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, expected):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_data_pointing_at_a_file_is_explained(capsys, tmp_path):
    file = tmp_path / "photo.jpg"
    file.write_bytes(b"x")
    code, _, err = _run(capsys, "train", f"--data={file}")
    assert code == 2 and "is a file" in err


def test_flagfile_unknown_flag_is_named(capsys, tmp_path):
    flagfile = tmp_path / "bad.cfg"
    flagfile.write_text("# a preset\n--epochs=3\n--learnig_rate=0.1\n")
    code, _, err = _run(capsys, "train", f"--flagfile={flagfile}")
    assert code == 2 and "learnig_rate" in err


def test_help_groups_flags_by_topic(capsys):
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    positions = [out.index(f"{group} flags:") for group in ("data", "model", "training")]
    assert positions == sorted(positions)
    assert out.index("--backbone=") > out.index("model flags:") > out.index("--data=")


def test_flags_reset_between_invocations(capsys):
    _run(capsys, "train", "--epochs=-5")
    # --epochs is not given again: it must be back to its default, so the error is another one.
    code, _, err = _run(capsys, "train", "--data=/no/such/folder")
    assert code == 2 and "no such folder" in err


def test_resolve_fills_backbone_and_size_and_offline_preset():
    offline = resolve(Config())
    assert (offline.backbone, offline.image_size, offline.unfreeze) == ("digits_cnn", 32, "all")
    assert offline.deterministic  # the README's numbers, to the digit
    # A flag the user set wins over the offline preset.
    assert resolve(Config(epochs=3), explicit=frozenset({"epochs"})).epochs == 3
    user = resolve(Config(data="tfds:beans"))
    assert (user.backbone, user.image_size, user.unfreeze) == ("mobilenet_v2", 224, "0")


def test_an_explicit_seed_asks_for_determinism(tmp_path):
    def parsed(*argv):
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["prog", "--data=tfds:beans", *argv])
        return cli.config_from_flags()

    assert parsed().deterministic is False  # the default: fastest input, seeded all the same
    assert parsed("--seed=7").deterministic is True
    assert parsed("--seed=7", "--nodeterministic").deterministic is False
    assert parsed("--deterministic").deterministic is True
    flagfile = tmp_path / "flags.cfg"  # a run's flags.cfg reruns it as it was
    flagfile.write_text(parsed().to_flagfile())
    assert parsed(f"--flagfile={flagfile}").deterministic is False


def test_flagfile_written_by_config_reruns_the_same_config(tmp_path, capsys):
    config = resolve(Config(data="tfds:beans", backbone="resnet50", epochs=7, label_smoothing=0.1))
    path = tmp_path / "flags.cfg"
    path.write_text(config.to_flagfile())
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["prog", f"--flagfile={path}"])
    assert cli.config_from_flags() == config


def test_console_script_error_has_no_traceback(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "tf_finetune", "train", "--backbone=resnet5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "tf-finetune: error: unknown --backbone='resnet5'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_timings_print_on_one_line_with_the_feature_rate():
    line = cli.format_timings(
        {
            "startup": 4.21,
            "data": 0.5,
            "features": 2.0,
            "fit": 1.0,
            "total": 9.0,
            "feature_images_per_second": 1500.0,
        }
    )
    assert line == (
        "startup 4.2 s, data 0.5 s, features 2.0 s (1,500 images/s), fit 1.0 s, total 9.0 s"
    )
