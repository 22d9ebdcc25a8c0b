"""`vlmtune --help`, every subcommand's --help (with examples that name real files) and `--version`."""

import re

import pytest

from tests.conftest import REPO
from vlmtune import __version__
from vlmtune.cli import build_parser, main


def _subcommands() -> dict:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return action.choices


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    assert _help(["--version"], capsys).strip() == f"vlmtune {__version__}"


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_every_help_has_examples_of_itself_with_files_that_exist(command, capsys):
    text = _help(["--help"] if command is None else [command, "--help"], capsys)
    examples = text.split("examples:\n", 1)[1]
    lines = [
        line.strip() for line in examples.splitlines() if line.strip().startswith(("vlmtune", "accelerate"))
    ]
    assert lines, text
    if command is not None:
        assert any(line.startswith(f"vlmtune {command} ") for line in lines), lines
    for path in re.findall(r"(?:recipes|docs)/[\w/.-]+\.(?:yaml|md)", examples):
        assert (REPO / path).is_file(), path


def test_train_module_usage(capsys):
    from vlmtune.train import main as train_main

    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "accelerate launch -m vlmtune.train recipes/7b_lora.yaml" in out
    assert train_main([]) == 2  # no recipe: usage on stderr, user error


def test_help_examples_are_valid_recipes_with_valid_overrides():
    from vlmtune.cli import EXAMPLES, MAIN_EXAMPLES
    from vlmtune.config.load import load_recipe

    lines = [
        line.split("#")[0].split()
        for text in (*EXAMPLES.values(), MAIN_EXAMPLES)
        for line in text.splitlines()
    ]
    checked = 0
    for words in lines:
        recipes = [w for w in words if w.startswith("recipes/") and w.endswith(".yaml")]
        if recipes:
            load_recipe(REPO / recipes[0], [w for w in words if "=" in w and not w.startswith("-")])
            checked += 1
    assert checked >= 10
