"""The prelude every entry point runs (train, validate, launch, notebooks): recipe → problems → launch spec.

All problems come at once: the schema's, then the cross-field rules' together with the environment's (files,
packages, the model's kind, the accelerate config), before torch or any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmtune.config.accelerate import LaunchSpec
from vlmtune.config.environment import check_environment
from vlmtune.config.load import load_recipe_and_rule_problems, recipe_source
from vlmtune.config.rules import recipe_warnings
from vlmtune.config.schema import Recipe
from vlmtune.errors import RecipeError


@dataclass(frozen=True)
class Prepared:
    """A recipe that passed every check that needs no weights, its accelerate config and its warnings."""

    recipe: Recipe
    launch: LaunchSpec
    warnings: list[str]


def prepare(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None) -> Prepared:
    """Load `recipe` (a file, a mapping or a `Recipe`), check it and its environment, parse its accelerate config.

    A `Recipe` is validated again: one changed in place in a notebook is checked like a file would be.

    Raises:
        RecipeError: every problem found, each with its key path.
    """
    loaded, problems = load_recipe_and_rule_problems(recipe, overrides)
    spec, environment = check_environment(loaded)
    problems += environment
    if problems or spec is None:
        raise RecipeError(problems, source=recipe_source(recipe))
    return Prepared(loaded, spec, recipe_warnings(loaded))
