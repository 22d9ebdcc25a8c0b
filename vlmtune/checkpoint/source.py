"""What a trained SOURCE folder is, and how to load it for merging and inference.

SOURCE is a run folder (`<output_dir>`), its `adapter/`, a checkpoint (`checkpoints/step-N/` or its
`adapter/`), or a full model folder (a merged model, or any `from_pretrained` folder). The base model comes from
`--base`, else the run's `recipe.yaml`, else `base_model_name_or_path` of `adapter_config.json`. The tokenizer or
processor (with the chat template and image size training used) comes from the adapter folder when training
wrote it there (the final `adapter/`), else from the recipe and the base model (a checkpoint's adapter holds
only the PEFT files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.checkpoint.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, verify_adapter
from vlmtune.config.load import load_recipe
from vlmtune.config.schema import ModelConfig, Recipe, VisionConfig
from vlmtune.errors import UserError, first_line
from vlmtune.families import Family, find_family, get_family
from vlmtune.layout import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    MARKER,
    RECIPE_FILE,
    complete_checkpoints,
    is_complete,
)
from vlmtune.logging import get_logger
from vlmtune.model.load import DTYPES, from_pretrained_complete, model_location

log = get_logger(__name__)

TOKENIZER_FILE = "tokenizer_config.json"
_SOURCE_KINDS = (
    "a run folder (train.output_dir), its adapter/, a checkpoints/step-N/ folder, or a merged model"
)


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE.

    Attributes:
        path: The folder as given.
        adapter_dir: The PEFT adapter folder; None when SOURCE is a full model.
        base: Where the model to load lives: the base model (hub id or local folder) under an adapter, or the full
            model folder itself.
        base_from: Where `base` came from, for messages (`--base`, the recipe, the adapter config).
        family: The vision-language model family; None for a text model.
        recipe: The run's recipe, when SOURCE belongs to a run.
        run_dir: The run folder, when SOURCE belongs to a run.
        quant: How the adapter's base was quantised in training ("4-bit nf4"), or None.
        trust_remote_code: Run code shipped with the model (opt-in: `--trust-remote-code` or the recipe).
    """

    path: Path
    adapter_dir: Path | None
    base: str
    base_from: str
    family: Family | None
    recipe: Recipe | None
    run_dir: Path | None
    quant: str | None
    trust_remote_code: bool

    @property
    def revision(self) -> str | None:
        """The recipe's hub revision, when the base is the recipe's model."""
        return self.recipe.model.revision if self.recipe and self.base_from.startswith("model.path") else None


def resolve_source(path: str | Path, *, base: str | None = None, trust_remote_code: bool = False) -> Source:
    """Find the adapter, the run it belongs to, the base model and the family of `path`.

    Raises:
        UserError: the folder is missing, holds neither an adapter nor a model, is an incomplete checkpoint or
            adapter, or no base model can be found.
    """
    given = Path(path).expanduser()
    if not given.is_dir():
        what = "is a file, not a folder" if given.exists() else "not found"
        raise UserError(f"{path}: {what}; give {_SOURCE_KINDS}")
    adapter_dir = _adapter_dir(given)
    run_dir = _run_dir(given, adapter_dir)
    recipe = _load_run_recipe(run_dir) if run_dir else None
    trust = trust_remote_code or bool(recipe and recipe.model.trust_remote_code)
    if trust and not trust_remote_code:
        log.warning(
            "running code shipped with the model: model.trust_remote_code is on in %s", run_dir / RECIPE_FILE
        )
    quant = None
    if recipe is not None and recipe.quant is not None:
        q = recipe.quant
        quant = f"{q.bits}-bit {q.type}" if q.bits == 4 else f"{q.bits}-bit"

    if adapter_dir is None:
        if base is not None:
            raise UserError(
                f"--base: {path} is a full model (no {ADAPTER_CONFIG}), so it takes no base model"
            )
        where, base_from = str(given.resolve()), "the folder itself"
    else:
        where, base_from = _base_location(base, recipe, run_dir, adapter_dir)
    family = _family(where, base_from, recipe, trust)
    return Source(given, adapter_dir, where, base_from, family, recipe, run_dir, quant, trust)


def _adapter_dir(folder: Path) -> Path | None:
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            if candidate.parent.parent.name == CHECKPOINTS_DIR and not is_complete(candidate.parent):
                raise UserError(
                    f"{candidate.parent} is not a complete checkpoint (no {MARKER} marker: its save was "
                    "interrupted); use another checkpoint or the run's final adapter/"
                )
            verify_adapter(candidate)
            return candidate
    if (folder / "config.json").is_file():
        return None  # a full model
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / ADAPTER_WEIGHTS).is_file() or (candidate.name == ADAPTER_DIR and candidate.is_dir()):
            raise UserError(
                f"adapter at {candidate} is incomplete: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
    if (folder / CHECKPOINTS_DIR).is_dir():
        newest = (complete_checkpoints(folder / CHECKPOINTS_DIR) or [None])[-1]
        hint = f"; its checkpoints can be used, e.g. {newest}" if newest else ""
        raise UserError(f"{folder}: the run has no final adapter/ yet (it did not finish){hint}")
    raise UserError(f"{folder} holds no {ADAPTER_CONFIG} and no config.json; give {_SOURCE_KINDS}")


def _run_dir(given: Path, adapter_dir: Path | None) -> Path | None:
    """The run folder: SOURCE itself, the parent of `adapter/`, or the run above `checkpoints/step-N/adapter/`."""
    candidates = [given]
    if adapter_dir is not None:
        candidates.append(adapter_dir.parent)
        if adapter_dir.parent.parent.name == CHECKPOINTS_DIR:
            candidates.append(adapter_dir.parent.parent.parent)
    return next((c for c in candidates if (c / RECIPE_FILE).is_file()), None)


def _load_run_recipe(run_dir: Path) -> Recipe | None:
    try:
        recipe = load_recipe(run_dir / RECIPE_FILE)
    except UserError as exc:  # written by another vlmtune version: the adapter config still names the base
        log.warning("ignoring %s, which no longer validates: %s", run_dir / RECIPE_FILE, exc)
        return None
    recipe._base_dir = run_dir
    return recipe


def _base_location(
    base: str | None, recipe: Recipe | None, run_dir: Path | None, adapter_dir: Path
) -> tuple[str, str]:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    from_adapter = config.get("base_model_name_or_path")
    if base is not None:
        local = Path(base).expanduser()
        return (str(local.resolve()) if local.exists() else base), "--base"
    if recipe is not None:
        where = model_location(recipe.model, run_dir)
        # A relative model.path was relative to the recipe the run started from, which the resolved recipe in
        # the run folder does not record; the adapter config holds the location training resolved.
        if not Path(where).exists() and from_adapter and Path(from_adapter).exists():
            return from_adapter, f"base_model_name_or_path of {adapter_dir / ADAPTER_CONFIG}"
        return where, f"model.path of {run_dir / RECIPE_FILE}"
    if from_adapter:
        return from_adapter, f"base_model_name_or_path of {adapter_dir / ADAPTER_CONFIG}"
    raise UserError(
        f"{adapter_dir / ADAPTER_CONFIG} names no base model and no run recipe was found; pass --base"
    )


def _family(where: str, base_from: str, recipe: Recipe | None, trust_remote_code: bool) -> Family | None:
    if recipe is not None and recipe.model.family is not None and base_from.startswith("model.path"):
        return get_family(recipe.model.family)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load the model config of {where} (from {base_from}): {first_line(exc)}; "
            "pass --base with the base model's folder or hub id"
        ) from None
    return find_family(config)


def load_source_model(source: Source, *, dtype: str, device: str = "cpu") -> Any:
    """The model to run or merge: the full model, or the base (unquantised, in `dtype`) with the adapter on it
    (a `PeftModel`). In eval mode, on `device`.

    Raises:
        UserError: the weights cannot be loaded or are incomplete, or the adapter does not fit the base.
    """
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM if source.family is None else source.family.load_class()
    model = from_pretrained_complete(
        cls,
        source.base,
        origin=source.base_from,
        dtype=DTYPES[dtype],
        revision=source.revision,
        trust_remote_code=source.trust_remote_code,
    )
    if source.adapter_dir is not None:
        model = _attach_adapter(model, source)
    return model.to(device).eval()


def _attach_adapter(model: Any, source: Source) -> Any:
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    hint = (
        f"was the adapter trained on {source.base} (from {source.base_from})? pass --base with its base model"
    )
    try:
        peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        detail = first_line(exc) if "size mismatch" not in str(exc) else _size_mismatch(exc)
        raise UserError(
            f"the adapter {source.adapter_dir} does not fit the base model: {detail}; {hint}"
        ) from None
    # PEFT only warns about saved weights it found no place for: a merge without them would be silently wrong.
    saved = load_file(str(source.adapter_dir / ADAPTER_WEIGHTS))
    placed = get_peft_model_state_dict(peft_model)
    unplaced = sorted(set(saved) - set(placed))
    if unplaced:
        raise UserError(
            f"the adapter {source.adapter_dir} does not fit the base model: {len(unplaced)} of its weights have "
            f"no place in it (e.g. {unplaced[0]}); {hint}"
        )
    return peft_model


def load_source_processor(source: Source) -> Any:
    """The tokenizer (text model) or processor (VLM) training used, with its chat template.

    From the adapter folder (or the run's final adapter/) when it holds one, else from the recipe's settings
    and the base model, else from the model folder.
    """
    from transformers import AutoProcessor, AutoTokenizer

    from vlmtune.model import load as model_load

    candidates = [d for d in (source.adapter_dir, source.run_dir and source.run_dir / ADAPTER_DIR) if d]
    if source.adapter_dir is None:
        candidates.append(Path(source.base))
    folder = next((d for d in candidates if (d / TOKENIZER_FILE).is_file()), None)
    if folder is not None:
        cls = AutoTokenizer if source.family is None else AutoProcessor
        try:
            loaded = cls.from_pretrained(str(folder), trust_remote_code=source.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer/processor in {folder}: {first_line(exc)}") from None
        return loaded
    cfg = (
        source.recipe.model.model_copy(update={"path": source.base})
        if source.recipe is not None
        else ModelConfig(path=source.base, trust_remote_code=source.trust_remote_code)
    )
    base_dir = source.run_dir
    if source.family is None:
        return model_load.load_tokenizer(cfg, base_dir)
    vision = source.recipe.vision if source.recipe is not None else VisionConfig()
    return model_load.load_processor(cfg, source.family, vision, base_dir)


def _size_mismatch(exc: Exception) -> str:
    line = next((s.strip() for s in str(exc).splitlines() if "size mismatch" in s), first_line(exc))
    return line.rstrip(".")[:300]
