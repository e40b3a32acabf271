"""The package's layering, read from its imports (every import, lazy ones included).

flags -> config -> data + model -> fit -> evaluate -> export: FLAGS only in the CLI; config is
plain data; the data modules never import the model, the trainer or the export; the export, the
serving client and the commands that read a run dir never import the trainer; the hub layer
stands alone; no import cycles.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tf_finetune"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set[str]:
    """The tf_finetune modules `module` imports, at the top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tf_finetune":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("tf_finetune."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tf_finetune."):
                    found.add(alias.name.split(".")[1])
    return found & set(MODULES)


GRAPH = {m: _imports(m) for m in MODULES}


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles():
    cycles = sorted(m for m in MODULES if m in _reachable(m))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_only_the_cli_reads_flags():
    readers = [m for m in MODULES if re.search(r"\bFLAGS\b", (PACKAGE / f"{m}.py").read_text())]
    assert readers == ["cli"]


@pytest.mark.parametrize(
    "module, allowed",
    [
        ("config", {"errors"}),
        ("hub", {"errors"}),
        ("errors", set()),
        ("atomic", {"errors"}),
        ("rundir", {"atomic", "errors"}),
        ("splits", {"errors"}),
        ("headers", {"errors"}),
        ("backbone_table", {"errors", "keras_hub_table"}),
        ("keras_hub_table", set()),
        ("digits", set()),
        ("multilabel_metrics", set()),
    ],
)
def test_leaves_import_only_what_they_must(module, allowed):
    assert _reachable(module) <= allowed


TRAINING_AND_AFTER = {"model", "train", "export", "export_run", "feature_fit", "callbacks"}


@pytest.mark.parametrize(
    "module", ["data", "text_data", "multilabel_data", "input_pipeline", "splits", "headers"]
)
def test_data_never_imports_model_training_or_export(module):
    assert not _reachable(module) & (
        TRAINING_AND_AFTER | {"hub_model", "keras_hub_model", "backbones"}
    )


@pytest.mark.parametrize(
    "module", ["export", "export_run", "serving", "evaluate_run", "report", "check_data"]
)
def test_export_and_run_dir_readers_never_import_the_trainer(module):
    assert "train" not in _reachable(module)


def test_config_and_validation_need_no_tensorflow():
    # multiworker: TF_CONFIG is parsed as JSON; its TensorFlow imports are inside functions.
    light = {"config", "validation", "splits", "backbone_table", "keras_hub_table", "errors"}
    light.add("multiworker")
    for module in ("config", "validation"):
        assert _reachable(module) <= light, module
