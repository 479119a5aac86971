"""The runtime's subpackages import only the layers before them (docs/ARCHITECTURE.md, "The
engine"): text <- forward <- core <- service, onnx beside them. A module that reaches up a layer
makes an import cycle waiting to happen and hides who owns what."""

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "src" / "qwen3_aot" / "runtime"
LAYERS = ["text", "forward", "core", "service"]
ALLOWED = {layer: set(LAYERS[:i + 1]) for i, layer in enumerate(LAYERS)} | {"onnx": {"text", "core", "onnx"}}


def runtime_imports(path: Path) -> set[str]:
    """The runtime subpackages a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["qwen3_aot", "runtime"] and len(parts) > 2:
                found.add(parts[2])
    return found


def test_each_subpackage_imports_only_the_layers_before_it():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((RUNTIME / layer).glob("*.py")):
            for imported in runtime_imports(path) - allowed:
                wrong.append(f"{path.relative_to(RUNTIME)} imports runtime.{imported}")
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from qwen3_aot.runtime.service.engine import Engine\n")
    assert runtime_imports(module) == {"service"}
