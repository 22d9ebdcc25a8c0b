"""The guides stay true: recipe keys they mention exist, `vlmtune` commands exist, relative links resolve."""

import re

import pytest

from tests.conftest import REPO
from vlmtune.cli import build_parser
from vlmtune.config.schema import Recipe

GUIDES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md", REPO / "CHANGELOG.md"]
SECTIONS = "|".join(Recipe.model_fields)
KEY = re.compile(rf"(?<![\w/.-])({SECTIONS})\.([a-z_]+)(?![\w/])")


def _subcommands() -> set[str]:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return set(action.choices)


@pytest.mark.parametrize("doc", GUIDES, ids=lambda p: p.name)
def test_guides_name_real_keys_commands_and_files(doc):
    text = doc.read_text()
    for line in text.splitlines():
        if "unknown key" in line:  # quotes a typo on purpose
            continue
        for section, key in KEY.findall(line):
            if key in ("md", "py", "yaml", "json", "jsonl"):  # a file name such as data.md
                continue
            model = Recipe.model_fields[section].annotation
            model = next(
                (a for a in getattr(model, "__args__", (model,)) if hasattr(a, "model_fields")), model
            )
            assert key in model.model_fields, (
                f"{doc.name}: `{section}.{key}` is not a recipe key ({line.strip()})"
            )
    # Commands as typed: at the start of a line (code blocks) or of a code span.
    for command in re.findall(r"(?:^|`)vlmtune ([a-z][a-z-]+)\b", text, re.MULTILINE):
        assert command in _subcommands(), f"{doc.name}: `vlmtune {command}` is not a command"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
