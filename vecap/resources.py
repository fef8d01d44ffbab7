"""Where the package data lives: the recipes and the prompt templates.

They are kept at the repository's top level (``pipelines/``, ``prompts/``) and mapped into the
package as ``vecap.pipelines`` and ``vecap.prompts`` (``package-dir`` in pyproject.toml), so a wheel
holds them as package data and an editable install finds them where they are edited. Both are found
with ``importlib.resources``; a source tree that is on ``sys.path`` without being installed reads
the top-level folders directly.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DATA_PACKAGES = ("pipelines", "prompts")


def package_data(name: str) -> Traversable:
    """The folder of package data ``name`` (one of ``DATA_PACKAGES``)."""
    if name not in DATA_PACKAGES:
        raise ValueError(f"no package data {name!r} (known: {', '.join(DATA_PACKAGES)})")
    try:
        return files(f"vecap.{name}")
    except ModuleNotFoundError:  # a source checkout on sys.path, not installed
        return Path(__file__).resolve().parent.parent / name
