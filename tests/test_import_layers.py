"""Imports go one way (docs/design.md): a module may import only from layers below it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clip_train"
LAYERS = [
    {"config", "atomic", "paths", "errors"},  # files written whole; where a saved model is; one-line errors
    {"distributed", "preemption"},
    {"models", "loss", "accumulation", "data", "optim", "checkpoint", "tracking"},
    {"flops", "export_formats"},  # FLOPs of a models.ClipModel; export.py's files and their check
    {"evaluate", "export", "inference"},  # inference: clip_train.load
    {"finetune"},
    {"train"},
    # the demo's sources and evaluation sets: above the whole core, so nothing of it can import the
    # demo; evaluate/registry.py imports it by name on the first dataset lookup (docs/design.md)
    {"demo"},
    {"cli"},
    {"__main__"},
]


def _layer_of(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"clip_train.{part} is in no layer of this test: add it to LAYERS")


def _internal_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clip_train"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from clip_train import x
                yield from (alias.name for alias in node.names)
            else:
                yield parts[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clip_train."):
                    yield alias.name.split(".")[1]


def test_imports_point_only_downwards():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        own_layer = _layer_of(own)
        for target in _internal_imports(path):
            if target == own:
                continue
            target_layer = _layer_of(target)
            same_layer_sibling = target_layer == own_layer
            if target_layer > own_layer or same_layer_sibling:
                offences.append(f"{rel} imports clip_train.{target}")
    assert not offences, "imports against the layer order:\n" + "\n".join(offences)
