"""The product's packages import only the layers above them (config < ops < model < integrations < parallel <
training < data_pipeline < checkpoints < launch), and never benchmarks/ or tests/: read off every import
statement of every module, including imports inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("megatron_hope.config_base", "megatron_hope.config", "megatron_hope.ops", "megatron_hope.model",
          "megatron_hope.integrations", "megatron_hope.parallel", "megatron_hope.training", "data_pipeline",
          "checkpoints", "launch", "benchmarks", "tests")
PRODUCT = ("megatron_hope", "data_pipeline", "checkpoints", "launch")


def layer_of(module: str) -> int | None:
    found = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return found[-1] if found else None


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def upward_imports() -> list[str]:
    found = []
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            mine = layer_of(module)
            for name in imports(path):
                theirs = layer_of(name)
                if theirs is not None and theirs > mine:
                    found.append(f"{module} imports {name}")
    return found


def test_no_layer_imports_a_later_one():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import():
    assert layer_of("benchmarks.comm_counter") > layer_of("launch.train")
    assert layer_of("megatron_hope.training.loop") > layer_of("megatron_hope.parallel.deepspeed_engine")
    assert layer_of("megatron_hope.config") > layer_of("megatron_hope.config_base")
