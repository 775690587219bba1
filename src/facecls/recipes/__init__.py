"""The recipes that come with facecls, one YAML file each (facecls.config reads them). Listing them needs no
YAML parser, so the command line's help can name them without loading facecls.config."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def bundled_recipes() -> list[str]:
    """The names of the recipes that come with facecls."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
