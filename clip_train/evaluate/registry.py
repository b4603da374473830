"""Evaluation datasets by name: `register_dataset(name, builder)` makes `name` a zero-shot dataset
spec for `load_dataset`, `eval.zeroshot[].dataset` and `clip-eval --zeroshot`.

    register_dataset("pets", lambda split: image_folder(Path("/data/pets") / split), splits=("test", "train"))

`builder(split)` returns a datasets.LabelledImages: split "test" is what zero-shot evaluates,
"train" what the linear probe (`linear_probe_train`) fits on, and is asked for only when
`splits` holds it. `templates` are the dataset's own prompts (a file, one per line, or a list),
used when a task names none, and a template set of the dataset's name.

The core itself knows folders, webdataset shards and manifests only. The demo's sets
(fashion-mnist, tuxpaint, emoji) are registered by clip_train.demo, a layer above this one
(docs/design.md), which this module may not import. So that they work without anyone importing
the demo first, PLUGINS names the modules whose `register()` the first lookup calls, imported
by name as an entry point would be: the core's one mention of a module above it, a string in
this table. (Real setup.cfg entry points were not used: an editable install would need to be
reinstalled to see one.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clip_train.evaluate.datasets import LabelledImages

PLUGINS = ("clip_train.demo",)
SPLITS = ("test", "train")


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    builder: Callable[[str], LabelledImages]
    splits: tuple[str, ...]
    templates: Path | tuple[str, ...] | None


_DATASETS: dict[str, RegisteredDataset] = {}
_plugins_loaded = False


def register_dataset(
    name: str,
    builder: Callable[[str], LabelledImages],
    *,
    splits: Sequence[str] = ("test",),
    templates: str | Path | Sequence[str] | None = None,
) -> None:
    """Make `name` an evaluation dataset (see the module docstring); a name taken is refused."""
    _load_plugins()  # first: a name the demo registers is taken whether or not it was looked up yet
    if not name or name.startswith("wds:") or "/" in name or "\\" in name:
        raise ValueError(
            f"dataset name {name!r} could be read as a path or as wds: shards: "
            "give a plain name such as 'pets'"
        )
    if name in _DATASETS:
        raise ValueError(f"evaluation dataset {name!r} is already registered: choose another name")
    if "test" not in splits or not set(splits) <= set(SPLITS):
        raise ValueError(f"{name}: splits {tuple(splits)} must hold 'test' and may hold 'train'")
    if isinstance(templates, str | Path):
        templates = Path(templates)
    elif templates is not None:
        templates = tuple(templates)
    _DATASETS[name] = RegisteredDataset(name, builder, tuple(splits), templates)


def registered(name: str) -> RegisteredDataset | None:
    """The registration of `name`, or None when it is not a registered dataset."""
    if name not in _DATASETS:
        _load_plugins()
    return _DATASETS.get(name)


def registered_names(split: str = "test") -> list[str]:
    """The names registered with `split` (every one has "test"), in the order they were registered."""
    _load_plugins()
    return [name for name, entry in _DATASETS.items() if split in entry.splits]


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before: a plugin's register() calls register_dataset, which calls this
    for module in PLUGINS:
        importlib.import_module(module).register()
