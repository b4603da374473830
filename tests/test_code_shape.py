"""The package stays readable in an afternoon: no file over 500 lines, no function over 80."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clip_train"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_no_file_over_500_lines_and_no_function_over_80():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "split these by concern:\n" + "\n".join(too_long)
