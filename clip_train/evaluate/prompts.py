"""Prompt templates and class names for zero-shot classification.

    load_templates([], "tuxpaint")          # the dataset's own set, as registered (demo/assets/templates/)
    load_templates("openai_imagenet", "x")  # the 80 ImageNet templates of the CLIP paper
    load_templates("my_prompts.txt", "x")   # a file, one template per line
    load_templates(["a {c}."], "x")         # used as given

A template holds `{c}` where the class name goes (`{}` is accepted and read as `{c}`). Template
and class-name files are UTF-8, one entry per line; blank lines and lines starting with `#` are
skipped in template files (so the shipped sets can say where they come from).

Shipped template sets (clip_train/assets/templates/<name>.txt): `default` (the three templates of
configs/demo.yaml) and `openai_imagenet`. A dataset registered with templates
(registry.register_dataset: the demo's `fashion-mnist`, `tuxpaint`, `emoji`, each written for what
its images look like) has them as its own set, and as a set of its name.
"""

from __future__ import annotations

from pathlib import Path

from clip_train.evaluate.registry import registered, registered_names

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "templates"
PLACEHOLDER = "{c}"


def shipped_template_sets() -> list[str]:
    own = [name for name in registered_names() if registered(name).templates is not None]
    return sorted({*(p.stem for p in TEMPLATES_DIR.glob("*.txt")), *own})


def _shipped(name: str) -> Path | None:
    # only a bare name can be a shipped set; anything with a path separator is a file
    if not name or "/" in name or "\\" in name:
        return None
    path = TEMPLATES_DIR / f"{name}.txt"
    return path if path.is_file() else None


def _check_template(template: str, where: str) -> str:
    template = template.strip().replace("{}", PLACEHOLDER)
    if PLACEHOLDER not in template:
        raise ValueError(
            f"{where}: template {template!r} has no {PLACEHOLDER} placeholder for the class name"
        )
    try:
        # the runner fills templates with str.format, so any other brace would fail there
        template.format(c="x")
    except (KeyError, IndexError, ValueError):
        raise ValueError(
            f"{where}: template {template!r} has braces other than {PLACEHOLDER}: "
            "write a literal brace twice ({{ or }})"
        ) from None
    return template


def _read_templates(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read template file {path} ({e}): give a UTF-8 text file") from None
    templates = [
        _check_template(line, f"{path}:{line_no}")
        for line_no, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not templates:
        raise ValueError(f"template file {path} holds no templates: write one per line, with {PLACEHOLDER}")
    return templates


def _dataset_templates(name: str) -> list[str] | None:
    """The templates `name` was registered with, or None (not registered, or without templates)."""
    entry = registered(name) if name else None
    if entry is None or entry.templates is None:
        return None
    if isinstance(entry.templates, Path):
        return _read_templates(entry.templates)
    return [_check_template(t, f"{name} templates[{i}]") for i, t in enumerate(entry.templates)]


def load_templates(spec: list[str] | tuple[str, ...] | str, dataset: str = "") -> list[str]:
    """The prompt templates for `dataset`, from `spec`:

    a non-empty list -> those templates; a shipped set's name or a file path -> its lines;
    empty -> the dataset's own set (as registered, else a shipped set of its name), else `default`.
    Raises ValueError (one line, naming the file and line) for a template without `{c}`.
    """
    if isinstance(spec, (list, tuple)):
        if spec:
            return [_check_template(t, f"templates[{i}]") for i, t in enumerate(spec)]
        spec = ""
    spec = spec.strip()
    if not spec:
        own = _dataset_templates(dataset)
        return own or _read_templates(_shipped(dataset) or TEMPLATES_DIR / "default.txt")
    shipped = _shipped(spec)
    if shipped:
        return _read_templates(shipped)
    own = _dataset_templates(spec)
    if own:
        return own
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(
            f"templates {spec!r} are neither a file nor a shipped set "
            f"({', '.join(shipped_template_sets())}): give a file with one template per line"
        )
    return _read_templates(path)


def load_classnames(path: str | Path) -> list[str]:
    """Class names, one per line: line i names class i. Trailing blank lines are ignored; a blank
    line in between or a repeated name is an error (either would silently mislabel classes)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ValueError(
            f"class-name file {path} not found: give a text file with one class name per line"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read class-name file {path} ({e}): give a UTF-8 text file") from None
    names = [" ".join(line.split()) for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"class-name file {path} is empty: write one class name per line")
    first_line: dict[str, int] = {}
    for line_no, name in enumerate(names, 1):
        if not name:
            raise ValueError(f"{path}:{line_no} is blank: line i names class i, so no line may be empty")
        if name in first_line:
            raise ValueError(f"{path}:{line_no} repeats class name {name!r} of line {first_line[name]}")
        first_line[name] = line_no
    return names
