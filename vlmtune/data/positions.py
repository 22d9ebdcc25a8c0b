"""Multimodal (3-D) rope positions of one row, as the model itself computes them, for packed image-text rows.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL give each image token a (temporal, height, width) position and each text token
the same 1-D position thrice; the model's `get_rope_index` computes them for a padded batch when no
`position_ids` are passed. A packed row holds several examples, so its positions are each example's own, as
`get_rope_index` gives them for that example alone, laid end to end. The model reads a `(4, batch, tokens)`
`position_ids` as [1-D text positions; the three rope rows]: the first row, restarting at 0 per example, is
what its mask code (and flash-attention's varlen path) reads sequence boundaries from.

`RopeIndex` calls the model class's own `get_rope_index` with only the config, without building the model, so
the positions are the model's by construction (a new transformers release that changes them changes ours too),
and the collator stays picklable for DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import torch


class RopeIndex:
    """The 3-D rope positions of one example, by `model_class.get_rope_index` for that example alone.

    Args:
        model_class: The transformers class that defines `get_rope_index` (e.g. `Qwen2VLModel`), or its name.
        config: The model's config (the full vision-language config: `get_rope_index` reads its vision part).
    """

    def __init__(self, model_class: type | str, config: Any) -> None:
        if isinstance(model_class, str):
            import transformers

            model_class = getattr(transformers, model_class)
        self._cls = model_class
        self.config = config

    def __getattr__(self, name: str) -> Any:
        # `get_rope_index` calls helpers of its own class through `self` (`get_vision_position_ids`): give it
        # those, bound to this object. Private names are never looked up there (pickling asks for some).
        cls = self.__dict__.get("_cls")
        if cls is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(cls, name).__get__(self, type(self))

    def __call__(self, example: dict[str, Any]) -> torch.Tensor:
        """(3, tokens) positions of `example` (its input_ids, mm_token_type_ids and image_grid_thw)."""
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)[None]
        types = example.get("mm_token_type_ids")
        types = torch.zeros_like(ids) if types is None else torch.as_tensor(types, dtype=torch.long)[None]
        grid = example.get("image_grid_thw")
        if grid is None:  # a text-only example: the same 1-D positions on all three axes, as the model does
            return torch.arange(ids.shape[1]).expand(3, -1).clone()
        positions, _ = self._cls.get_rope_index(self, ids, mm_token_type_ids=types, image_grid_thw=grid)
        return positions[:, 0]
