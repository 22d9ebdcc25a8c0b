"""The recipe's model with its LoRA adapter, built on the meta device from the model config alone.

No weight is read or allocated: only `config.json` is needed (a local folder, or a hub id whose config is in the
cache or can be fetched). Parameter counts, dtypes and the adapted layers are then exactly those of the real
run, because the same `apply_lora` (target selection, VLM `vision` settings) wraps the meta model. Quantisation is
not applied here; `vlmtune.plan.memory` accounts for it from the module list.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from vlmtune.config.schema import Recipe
from vlmtune.errors import UserError, first_line
from vlmtune.families import Family, find_family, get_family
from vlmtune.model.load import DTYPES, model_location
from vlmtune.model.lora import apply_lora
from vlmtune.model.quant import unquantized_modules


@dataclass
class MetaModel:
    """A meta-device model wrapped by PEFT as the recipe says, with its config and VLM family (None: text)."""

    model: torch.nn.Module
    config: PretrainedConfig
    family: Family | None
    # Modules bitsandbytes would leave unquantised (transformers' rule: output head, tied and fp32-kept weights).
    unquantized: list[str]


def load_config(recipe: Recipe) -> PretrainedConfig:
    """The model's config (reads `config.json` only).

    Raises:
        UserError: the folder has no config, or the hub id is not cached and cannot be fetched.
    """
    cfg, where = recipe.model, model_location(recipe.model, recipe._base_dir)
    local = Path(where).exists()
    if not local and cfg.path.startswith((".", "/", "~")):
        raise UserError(f"model.path: folder not found: {cfg.path}; give a model folder or a hub id")
    if local and not (Path(where) / "config.json").is_file():
        raise UserError(
            f"model.path: {cfg.path} has no config.json ({where}); give a model folder or a hub id"
        )
    try:
        return AutoConfig.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        hint = (
            ""
            if local
            else f"; the plan needs only its config.json: `hf download {cfg.path} config.json` "
            "on a machine online, or point model.path at a folder holding it"
        )
        raise UserError(f"model.path: cannot read the config of {where}: {first_line(exc)}{hint}") from None


def build_meta_model(recipe: Recipe) -> MetaModel:
    """The recipe's model on the meta device, in its dtype, with the recipe's LoRA (and VLM vision settings)."""
    config = load_config(recipe)
    family = get_family(recipe.model.family) if recipe.model.family else find_family(config)
    cls = AutoModelForCausalLM if family is None else family.load_class()
    with torch.device("meta"), _no_zero3_construction():
        try:
            model = cls.from_config(
                config,
                dtype=DTYPES[recipe.model.dtype],
                trust_remote_code=recipe.model.trust_remote_code,
            )
        except ValueError as exc:
            raise UserError(
                f"model.path: cannot build a {cls.__name__} from the config of {recipe.model.path}: {exc}"
            ) from None
        unquantized = unquantized_modules(model, recipe.quant, family)
        # Quantised or not, the same linear layers are adapted (bitsandbytes layers are nn.Linear subclasses).
        model = apply_lora(
            model,
            recipe.lora,
            quantized=False,
            gradient_checkpointing=False,
            family=family,
            vision=recipe.vision,
        )
    return MetaModel(model=model, config=config, family=family, unquantized=unquantized)


@contextmanager
def _no_zero3_construction() -> Iterator[None]:
    """In a ZeRO-3 process (`vlmtune profile` plans there) transformers builds models partitioned, which a meta
    model cannot be: its DeepSpeed config is set aside while the meta model is built."""
    try:
        import transformers.integrations.deepspeed as hf_ds
    except ImportError:  # no deepspeed integration: nothing to set aside
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(config)
