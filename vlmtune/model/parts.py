"""Which parts of a vision-language model a module or parameter belongs to, from the family registry's prefixes:
the vision tower, the projector and the language model (LoRA targets, freezing, learning rates, FLOP counts).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from vlmtune.families import Family

if TYPE_CHECKING:
    from torch import nn

Part = Literal["vision", "projector", "language"]


def _under(prefixes: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(p) for p in prefixes)
    return re.compile(rf"(?:^|\.)(?:{alternatives})(?:\.|$)")


def part_of(param_name: str, family: Family) -> Part:
    """Which part of the model a parameter (or module) name belongs to.

    Raises:
        ValueError: for a name under none of the family's prefixes (a registry entry out of date).
    """
    for part, prefixes in (
        ("projector", family.projector),
        ("vision", family.vision),
        ("language", family.language + family.head),
    ):
        if _under(prefixes).search(param_name):
            return part  # type: ignore[return-value]
    raise ValueError(f"{param_name!r} is in none of the {family.name} parts; update vlmtune.families")


def lm_lora_targets(model: nn.Module, family: Family) -> str:
    """A PEFT `target_modules` regex for every linear layer of the language model, and nothing else.

    What `all-linear` means for a VLM: PEFT's own `all-linear` also adapts the vision tower and projector.
    The output head is left out, as PEFT's `all-linear` leaves it out. The regex names the layer kinds
    found (q_proj, down_proj, ...) under the language-model prefix, so it also matches a quantised copy.

    Raises:
        ValueError: when the model has no linear layer in its language model (a wrong family).
    """
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and module is not head
            and _part_or_none(name, family) == "language"
        }
    )
    if not leaves:
        raise ValueError(
            f"no linear layer under {family.language} in this model; is it a {family.name} model?"
        )
    lm = "|".join(re.escape(p) for p in family.language)
    return rf"(?:.*\.)?(?:{lm})\.(?:.*\.)?(?:{'|'.join(leaves)})"


def part_linear_layers(model: nn.Module, family: Family, part: Part) -> list[str]:
    """Full module names of the linear layers in one part of the model (the output head excluded)."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and _part_or_none(name, family) == part
    ]


def part_modules(model: nn.Module, family: Family, part: Part) -> tuple[list[str], list[str]]:
    """The part's top modules (`vision` / `projector` prefixes) present in `model`, and its prefixes that name a
    bare parameter rather than a module (LLaVA-NeXT's `image_newline`)."""
    prefixes = {"vision": family.vision, "projector": family.projector, "language": family.language}[part]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    return [p for p in prefixes if p in modules], [p for p in prefixes if p in params]


def nested_parts(family: Family) -> bool:
    """The projector sits inside the vision tower's module (Qwen-VL's merger)."""
    return any(_under(family.vision).search(p) for p in family.projector)


def _part_or_none(name: str, family: Family) -> Part | None:
    try:
        return part_of(name, family)
    except ValueError:
        return None
