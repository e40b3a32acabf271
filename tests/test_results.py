"""scripts/results.py: the README's measured blocks are rendered from results/results.json."""

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def results_py():
    spec = importlib.util.spec_from_file_location("results_py", REPO / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(busy: bool, data: dict) -> dict:
    return {
        "commit": "abc1234",
        "date": "2026-01-02 03:04 UTC",
        "cpu": "Test CPU",
        "cores": 2,
        "load_before": 2.5 if busy else 0.1,
        "load_after": 2.7 if busy else 0.2,
        "busy": busy,
        "quick": False,
        "seconds": 12.0,
        "data": data,
    }


COMPARE = {
    "command": "tf-finetune compare --unfreeze=0,all --epochs=3",
    "wall_seconds": 61.0,
    "seed": 42,
    "train_images": 100,
    "val_images": 20,
    "variants": [
        {
            "unfreeze": "0",
            "val_accuracy": 0.7,
            "val_loss": 0.8,
            "trainable_parameters": 6405,
            "seconds_per_epoch": 1.25,
        },
        {
            "unfreeze": "all",
            "val_accuracy": 0.4,
            "val_loss": 1.4,
            "trainable_parameters": 388453,
            "seconds_per_epoch": None,
        },
    ],
}


def test_readme_blocks_equal_the_rendered_results_file(results_py):
    text = (REPO / "README.md").read_text()
    results = results_py.load_results()
    blocks = results_py.readme_blocks(text)
    assert set(blocks) == set(results_py.RENDER), "every section has one block in README.md"
    missing = set(blocks) - set(results)
    assert not missing, f"sections never measured: {missing} (python scripts/results.py --only ...)"
    for name, block in blocks.items():
        expected = results_py.RENDER[name](results[name]).rstrip() + "\n"
        assert block == expected, (
            f"README.md's `{name}` block differs from results/results.json: numbers come from "
            "`python scripts/results.py` (--render to rewrite the README from the file)"
        )


def test_times_measured_under_load_are_marked_with_the_load(results_py):
    busy = results_py.render_compare("compare_cold", _section(True, COMPARE))
    idle = results_py.render_compare("compare_cold", _section(False, COMPARE))
    assert "1.2†" in busy and "61†" in busy  # s/epoch and the whole command
    assert "load average 2.5 when the section started" in busy
    assert "†" not in idle and "1.2" in idle
    assert "0.7000" in idle and "6,405" in idle  # accuracies are never marked
    assert "`abc1234`" in idle and "--only compare_cold" in idle


def test_rendering_replaces_only_marked_blocks_of_measured_sections(results_py):
    text = (
        "intro 0.5\n<!-- results:compare_cold -->\nstale 0.9\n<!-- /results -->\nmiddle\n"
        "<!-- results:tflite -->\nkept\n<!-- /results -->\nend\n"
    )
    out = results_py.render_readme(text, {"compare_cold": _section(False, COMPARE)})
    assert "stale 0.9" not in out and "0.7000" in out
    assert out.startswith("intro 0.5\n<!-- results:compare_cold -->\n")
    assert "middle\n<!-- results:tflite -->\nkept\n<!-- /results -->\nend\n" in out
    assert results_py.render_readme(out, {"compare_cold": _section(False, COMPARE)}) == out


def test_merging_a_section_keeps_the_others(results_py):
    old = {"tflite": _section(False, {"x": 1}), "compare_cold": _section(False, COMPARE)}
    new = results_py.merge(old, "tflite", _section(True, {"x": 2}))
    assert new["compare_cold"] == old["compare_cold"]
    assert new["tflite"]["data"] == {"x": 2}


def test_require_idle_refuses_on_a_busy_machine(results_py, monkeypatch):
    monkeypatch.setattr(results_py.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    monkeypatch.setattr(results_py, "cpu_busy_share", lambda: 0.9)  # others are running
    with pytest.raises(SystemExit, match="not idle"):
        results_py.measure("tflite", quick=True, require_idle=True, head="abc")


def test_performance_goals_say_which_are_not_met(results_py):
    run = {"wall": 10.0, "test_accuracy": 0.7}
    data = {
        "seeds": [42],
        "jobs": {
            "third": {
                "images": {"train": 7, "val": 2, "test": 2},
                "epochs": 8,
                "recipe": [{**run, "wall": 15.0}],
                "ours": [run],
            }
        },
        "goals": [
            {"goal": "third: speed-up", "rule": ">=", "target": 2.0, "measured": 1.5, "met": False}
        ],
    }
    text = results_py.render_performance(_section(False, data))
    assert "1.50× (≥ 2.0: not met)" in text
    assert "| third: speed-up | ≥ 2.0 | 1.500 | **no** |" in text


def test_settle_waits_out_our_own_load_but_not_other_processes(results_py, monkeypatch):
    loads = iter([2.0, 1.2, 0.4])
    monkeypatch.setattr(results_py.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(results_py.time, "sleep", lambda s: None)
    monkeypatch.setattr(results_py, "cpu_busy_share", lambda: 0.01)  # idle now: an echo
    assert results_py.settle(max_wait=60) == (0.4, 0.01)
    monkeypatch.setattr(results_py.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    monkeypatch.setattr(results_py, "cpu_busy_share", lambda: 0.8)  # someone else is running
    assert results_py.settle(max_wait=60) == (2.0, 0.8)
