"""Recipe loading: YAML files, `extends`, `key=value` overrides, validation with readable errors.

Every leaf value remembers which file (or override) it came from, so an error can say where to fix it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlmtune.config.rules import cross_field_problems
from vlmtune.config.schema import Recipe
from vlmtune.errors import RecipeError

OVERRIDE_SOURCE = "command-line override"

# Names users bring from other toolkits, mapped to ours, for "did you mean" where spelling similarity fails.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target": "target_modules",
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler",
    "warmup": "warmup_ratio",
    "bf16": "mixed_precision",
    "fp16": "mixed_precision",
    "output": "output_dir",
    "save_steps": "every",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "model_name_or_path": "path",
    "torch_dtype": "dtype",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "datasets": "train",
    "load_in_4bit": "bits",
    "load_in_8bit": "bits",
}
_MAX_EXTENDS_DEPTH = 16


def load_recipe(path: str | Path | dict | Recipe, overrides: list[str] | dict | None = None) -> Recipe:
    """Load, merge and validate a recipe.

    Args:
        path: a recipe YAML file, an already-parsed mapping, or a `Recipe` to derive a new one from (notebooks).
        overrides: `["train.lr=1e-4", "lora.r=8"]`, `{"train.lr": 1e-4}` or `{"train": {"lr": 1e-4}}`
            (nested maps merge into the recipe, they do not replace a section); applied after `extends`.

    Raises:
        RecipeError: listing every problem, each with its key path and the file it came from.
    """
    recipe, problems = load_recipe_and_rule_problems(path, overrides)
    if problems:
        raise RecipeError(problems, source=recipe_source(path))
    return recipe


def recipe_source(path: str | Path | dict | Recipe) -> str | None:
    """How errors name a recipe: its file, or nothing for a mapping or a `Recipe`."""
    return None if isinstance(path, dict | Recipe) else str(path)


def load_recipe_and_rule_problems(
    path: str | Path | dict | Recipe, overrides: list[str] | dict | None = None
) -> tuple[Recipe, list[str]]:
    """Like `load_recipe`, but the cross-field rules' problems are returned rather than raised, so the
    caller can report them together with the environment's (`config.prepare`).

    Raises:
        RecipeError: the recipe cannot be read, an override is malformed, or a value fails the schema.
    """
    if isinstance(path, Recipe):
        # A new, validated recipe: the given one stays as it was, and its relative paths keep their folder.
        derived, problems = load_recipe_and_rule_problems(path.model_dump(mode="json"), overrides)
        derived._base_dir = path._base_dir
        return derived, problems
    raw, origin = load_raw(path)
    source = recipe_source(path)
    problems: list[str] = []
    # Where an override's problem is reported from: the command line, or the `overrides` mapping given in Python.
    override_source = "overrides argument" if isinstance(overrides, dict) else OVERRIDE_SOURCE
    for key, value in _parse_overrides(overrides, problems):
        _set_path(raw, key.split("."), value)
        origin[key] = override_source
    try:
        recipe = _schema_validate(raw, origin, source=source)
    except RecipeError as exc:
        raise RecipeError(problems + exc.problems, source=source) from None
    if problems:
        raise RecipeError(problems, source=source)
    if source is not None:
        recipe._base_dir = Path(path).expanduser().resolve().parent
    return recipe, _rule_problems(recipe, origin)


def load_raw(path: str | Path | dict) -> tuple[dict, dict[str, str]]:
    """The merged mapping (after `extends`) and a map from dotted key to the file that set it."""
    if isinstance(path, dict):
        raw = _deepcopy(path)
        origin: dict[str, str] = {}
        _record_origin(raw, "<dict>", origin)
        return raw, origin
    return _load_file(Path(path), chain=())


def validate(raw: dict, origin: dict[str, str] | None = None, source: str | None = None) -> Recipe:
    """Validate a merged mapping against the schema and the cross-field rules; collect every problem into one
    RecipeError."""
    recipe = _schema_validate(raw, origin, source)
    if problems := _rule_problems(recipe, origin):
        raise RecipeError(problems, source=source)
    return recipe


def _schema_validate(raw: dict, origin: dict[str, str] | None, source: str | None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, origin or {}) for err in exc.errors()]
        raise RecipeError(list(dict.fromkeys(problems)), source=source) from None


def _rule_problems(recipe: Recipe, origin: dict[str, str] | None) -> list[str]:
    """The cross-field rules' problems, each with the file that set its key."""
    return [p + _origin_of(p.split(":", 1)[0].split("."), origin or {}) for p in cross_field_problems(recipe)]


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)


# --- files and extends -------------------------------------------------------------------------------


def _load_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    path = path.expanduser()
    if not path.is_file():
        where = f" (extended from {chain[-1]})" if chain else ""
        raise RecipeError([f"recipe file not found: {path}{where}"])
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError([f"`extends` forms a cycle: {cycle}"])
    if len(chain) > _MAX_EXTENDS_DEPTH:
        raise RecipeError([f"`extends` nests deeper than {_MAX_EXTENDS_DEPTH} files at {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{path}{at}: not valid YAML: {reason}"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"])

    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise RecipeError([f"{path}: `extends` must be a path or a list of paths (relative to this file)"])

    merged: dict = {}
    origin: dict[str, str] = {}
    for parent in parents:
        p_raw, p_origin = _load_file(path.parent / parent, (*chain, resolved))
        _merge(merged, p_raw)
        origin.update(p_origin)
    own_origin: dict[str, str] = {}
    _record_origin(data, str(path), own_origin)
    _merge(merged, data)
    origin.update(own_origin)
    return merged, origin


def _merge(dst: dict, src: dict) -> None:
    """Deep-merge `src` into `dst`: maps merge, everything else (lists included) is replaced."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = _deepcopy(value)


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _record_origin(data: Any, source: str, origin: dict[str, str], prefix: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            origin[dotted] = source
            _record_origin(value, source, origin, dotted)


# --- overrides -----------------------------------------------------------------------------------------


def _parse_overrides(overrides: list[str] | dict | None, problems: list[str]) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return _flatten(overrides)
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: keep the literal string, the schema decides if that is valid
        parsed.append((key, value))
    return parsed


def _flatten(overrides: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """`{"train": {"lr": 1e-4}}` → `[("train.lr", 1e-4)]`, so a nested override changes one key, not a section."""
    flat = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat += _flatten(value, dotted + ".")
        else:
            flat.append((dotted, value))
    return flat


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


# --- error messages ------------------------------------------------------------------------------------


def _describe(err: dict, origin: dict[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    # pydantic appends the union member tried (e.g. "list[str]", "literal['all-linear']"); drop those.
    loc = [p for p in loc if not (p.startswith(("list[", "literal[", "function-")) or p in ("str", "int"))]
    dotted = ".".join(loc) or "<recipe>"
    where = _origin_of(loc, origin)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
            alias = _ALIASES.get(loc[-1])
            close = [alias] if alias in parent.model_fields else []
            close = close or difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.6)
            hint = (
                f"; did you mean `{close[0]}`?"
                if close
                else f"; valid keys: {', '.join(parent.model_fields)}"
            )
        return f"{dotted}: unknown key{hint}{where}"
    if kind == "missing":
        return f"{dotted}: required key is missing{where}"
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict | list) else ""
    return f"{dotted}: {err['msg']}{shown}{where}"


def _origin_of(loc: list[str], origin: dict[str, str]) -> str:
    for n in range(len(loc), 0, -1):
        src = origin.get(".".join(loc[:n]))
        if src:
            return f" [in {src}]"
    return ""


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The schema model that owns the mapping at `loc` (for did-you-mean suggestions)."""
    model: Any = Recipe
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
