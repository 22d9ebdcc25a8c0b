"""Write docs/recipe.md from the schema's field types, defaults and descriptions (a test keeps it current)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vlmtune.config.load import _model_in
from vlmtune.config.schema import Recipe

HEADER = """# Recipe reference

Generated from `vlmtune/config/schema.py` by `python scripts/gen_recipe_reference.py`; do not edit by hand.
Every section is closed: an unknown key is an error with a suggestion. Relative paths are taken from the working
directory, else from the recipe's folder. `extends:` (a path or a list, relative to the recipe) merges maps deeply,
later files winning; `key=value` overrides after the recipe path are applied last.
"""


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("vlmtune.config.schema.", "")
    return text.replace("Literal", "one of ").replace("|", "or")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        return f"`{field.default!r}`" if field.default is not None else "`null`"
    if field.default_factory is not None:
        value = field.default_factory()
        return f"`{value!r}`" if not isinstance(value, BaseModel) else "(section defaults)"
    return "**required**"


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    out.append(f"\n## `{prefix or 'top level'}`\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    nested = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        out.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''} |")
        sub = _model_in(field.annotation)
        if sub is not None:
            nested.append((sub, key))
    for sub, key in nested:
        _section(sub, key, out)


def render() -> str:
    out = [HEADER]
    _section(Recipe, "", out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
    )
    target.write_text(render())
    print(f"wrote {target}")
