"""From the recipe's batching keys to the step sampler and the collator the loop uses.

| data.batching | train.micro_batch_tokens | item of the sampler       | micro-batch                           |
|---------------|--------------------------|---------------------------|---------------------------------------|
| padded        | null                     | row                       | micro_batch_size rows, right-padded   |
| padded        | N                        | length-sorted chunk       | one chunk: rows × longest ≤ N         |
| padding_free  | null                     | row                       | micro_batch_size rows in one row      |
| padding_free  | N                        | best-fit bin of ≤ N       | one bin in one row                    |
| packed        | (refused)                | best-fit bin of pack_length | micro_batch_size bins, one row each |

(With flash_attention_2 a packed micro-batch's bins go end to end in one row: see `OneRowPackedCollator`.)
Methods dpo and grpo batch padded rows only, with their own collators (`method_collator`): a micro-batch of
`micro_batch_size` pairs (2 × that many rows) or prompts.

Chunks and bins are formed once per run from the row lengths and the seed; the sampler shuffles them per epoch.
"""

from __future__ import annotations

from vlmtune.config.schema import Recipe
from vlmtune.data.collate import Collator, PairCollator, PromptCollator
from vlmtune.data.packing import (
    OneRowPackedCollator,
    PackedCollator,
    PaddingFreeCollator,
    best_fit_decreasing,
    budget_chunks,
)
from vlmtune.data.positions import RopeIndex
from vlmtune.data.sampler import StepSampler
from vlmtune.logging import get_logger

log = get_logger("data")


def build_sampler(
    recipe: Recipe, lengths: list[int], world_size: int, image_tokens: list[int] | None = None
) -> StepSampler:
    """The step sampler for `recipe`'s batching mode over rows of these `lengths` (image tokens included;
    `image_tokens` per row count again in the work balanced across processes, for the vision tower)."""
    d, t = recipe.data, recipe.train
    costs = None
    if world_size > 1:  # balanced by, with data.balance_ranks; reported as rank_imbalance in any case
        costs = [n + (int(image_tokens[i]) if image_tokens is not None else 0) for i, n in enumerate(lengths)]
    common = {
        "grad_accum": t.grad_accum, "world_size": world_size, "seed": t.seed, "costs": costs,
        "balanced": d.balance_ranks,
        # GRPO optimises each batch of rollouts for several steps: those steps draw the same prompts.
        "repeat": recipe.grpo.steps_per_generation if recipe.method == "grpo" and recipe.grpo else 1,
    }  # fmt: skip
    if d.batching == "packed":
        capacity = d.pack_length or d.max_length
        bins = best_fit_decreasing(lengths, capacity, seed=t.seed)
        log.info(
            "packed %d rows into %d bins of ≤ %d tokens (%.1f%% full)",
            len(lengths), len(bins), capacity, 100 * sum(lengths) / max(len(bins) * capacity, 1),
        )  # fmt: skip
        return StepSampler(len(lengths), micro_batch=t.micro_batch_size, units=bins, **common)
    if t.micro_batch_tokens is not None:
        budget = t.micro_batch_tokens
        if d.batching == "padding_free":
            units = best_fit_decreasing(lengths, budget, seed=t.seed)
        else:
            units = budget_chunks(lengths, budget, seed=t.seed)
        log.info("%d rows in %d micro-batches of ≤ %d tokens", len(lengths), len(units), budget)
        return StepSampler(len(lengths), micro_batch=1, units=units, flatten_units=True, **common)
    return StepSampler(
        len(lengths),
        micro_batch=t.micro_batch_size,
        lengths=lengths,
        group_by_length=d.group_by_length,
        **common,
    )


# The padded collator of each method whose rows are not conversations (`config.rules` keeps them padded).
_METHOD_COLLATORS = {"dpo": PairCollator, "grpo": PromptCollator}


def method_collator(recipe: Recipe, pad_token_id: int | None, family=None) -> Collator:
    """The padded collator of `recipe.method`: a `PairCollator` (dpo), a `PromptCollator` (grpo), else a
    `Collator`; for a vision-language `family` it batches the vision inputs too. It is also the evaluation
    collator, so a method evaluates on batches like the ones it trains on."""
    return _METHOD_COLLATORS.get(recipe.method, Collator)(pad_token_id=pad_token_id, family=family)


def build_collator(recipe: Recipe, padded_collator, pad_token_id: int, family=None, model_config=None):
    """The training collator: `padded_collator` (see `method_collator`) unless batching packs sequences.

    A vision-language `family`'s packed rows batch their vision inputs by `padded_collator`'s rules, and, for a
    family with multimodal rope, carry each example's 3-D positions computed from `model_config`.

    Raises:
        ValueError: packing for a method whose batches are pairs or prompts (`config.rules` refuses the recipe
            first, with the fix).
    """
    batching = recipe.data.batching
    if batching == "padded":
        return padded_collator
    if recipe.method in _METHOD_COLLATORS:
        raise ValueError(f"method {recipe.method} batches padded rows only, not data.batching: {batching}")
    vision = padded_collator if family is not None else None
    rope = RopeIndex(family.rope_index, model_config) if family is not None and family.rope_index else None
    if batching == "padding_free":
        return PaddingFreeCollator(pad_token_id, vision, rope)
    if recipe.model.attn_implementation == "flash_attention_2":
        return OneRowPackedCollator(pad_token_id, vision, rope)
    return PackedCollator(pad_token_id, vision, rope)


def layout(recipe: Recipe) -> str:
    """The batching settings that decide the data order, recorded in checkpoints so a resume that changes them is
    noticed (it trains on, but not on the rows the original run would have seen)."""
    d, t = recipe.data, recipe.train
    return (
        f"batching={d.batching} pack_length={d.pack_length} group_by_length={d.group_by_length} "
        f"micro_batch_tokens={t.micro_batch_tokens} balance_ranks={d.balance_ranks}"
    )
