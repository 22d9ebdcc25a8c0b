"""What a training method adds to a step's memory, for `vlmtune plan`.

A step of dpo or grpo is more than one forward and backward, and its parts do not all hold memory at the
same time: GRPO generates its rollouts (`rollout` phase: the KV cache), then scores them with the
adapter-disabled base (`reference`), then trains on them (`train`); each phase's tensors are freed before the
next, and PyTorch's allocator reuses their blocks. So the plan's items carry a phase, and the total is what is
held all step (weights, gradients, optimizer states) plus the largest phase (`memory.peak_gpu`).

- dpo: a micro-batch of B pairs is one forward of 2B rows (chosen and rejected) of up to `data.max_length`
  tokens; the reference log-probabilities come from a no-grad forward of the same rows before it (none for
  `loss: simpo`).
- grpo: a micro-batch of B prompts is generated as B x num_generations sequences of up to prompt +
  max_completion_length tokens at once (HF `generate` with a KV cache), then trained as num_generations loss
  micro-batches of B rows (completion g of each prompt); with beta > 0 each of those is first scored by the
  reference (and with steps_per_generation > 1 by the generating policy), no-grad.

distill's teacher is counted by `plan.teacher`.

Log-probabilities (dpo, grpo) come from `methods.logps`: the model's logits, the rows that predict a trained
token copied out of them, and float32 log-softmax a chunk of rows at a time (recomputed in backward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmtune.config.schema import Recipe
    from vlmtune.plan.memory import Item, LayerShape, Sharding

# Rows of float32 logits `methods.logps` scores at once: its CHUNK_ROWS.
LOGPS_CHUNK_ROWS = 1024
# Item names that depend on the micro-batch (recomputed when the plan searches for the largest that fits).
BATCH_ITEMS = (
    "rollout: KV cache",
    "rollout: prefill + sampling",
    "reference forward",
    "old-policy forward",
)


def method_rows(recipe: Recipe) -> tuple[int, int, str] | None:
    """(rows, tokens per row, description) of one loss forward of dpo / grpo; None for the other methods."""
    b, length = recipe.train.micro_batch_size, recipe.data.max_length
    if recipe.method == "dpo":
        return 2 * b, length, f"{b} pairs = {2 * b} rows × {length} tokens"
    if recipe.method == "grpo":
        g, c = recipe.grpo.num_generations, recipe.grpo.max_completion_length
        return (
            b,
            length + c,
            f"{b} rows (one of the {g} completions of each prompt) × ({length} + {c}) tokens",
        )
    return None


def logps_peak(rows: int, seq: int, vocab: int, logits_bytes: int) -> int:
    """Peak bytes of `methods.logps` with gradients: in backward the copied-out rows, their gradient and the
    logits' gradient coexist (3 x logits-sized, counting every position as trained), plus one chunk's float32
    log-softmax, its recomputation and gradient (12 bytes per chunk entry)."""
    tokens = rows * seq
    return 3 * logits_bytes * tokens * vocab + 12 * min(LOGPS_CHUNK_ROWS, tokens) * vocab


def no_grad_logps_peak(rows: int, seq: int, vocab: int, logits_bytes: int) -> int:
    """Peak bytes of a no-grad `methods.logps` pass: the logits, the rows copied out, one float32 chunk."""
    tokens = rows * seq
    return 2 * logits_bytes * tokens * vocab + 12 * min(LOGPS_CHUNK_ROWS, tokens) * vocab


def kv_cache_bytes(shape: LayerShape, sequences: int, tokens: int, kv_bytes: int) -> int:
    """The generation's KV cache: layers × 2 (keys, values) × KV heads × head dim × tokens × sequences × bytes."""
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * tokens * sequences * kv_bytes


def method_items(recipe: Recipe, sharding: Sharding, shape: LayerShape, train_layer: int) -> list[Item]:
    """The micro-batch-dependent items of dpo and grpo (none for the other methods).

    Args:
        recipe: The recipe.
        sharding: Its sharding (every rank generates and scores its own rows: nothing is divided).
        shape: The language model's sizes.
        train_layer: One decoder layer's activations at the loss forward's shape (what a no-grad forward of the
            same rows works in, at most).
    """
    from vlmtune.plan.memory import Item, activation_bytes, dtype_bytes

    if recipe.method not in ("dpo", "grpo"):
        return []
    model_bytes, residual_bytes, autocast = dtype_bytes(recipe, sharding)
    act_bytes = 2 if autocast else model_bytes
    b = recipe.train.micro_batch_size
    items: list[Item] = []
    rows = method_rows(recipe)
    if recipe.method == "grpo":
        g, c, length = recipe.grpo.num_generations, recipe.grpo.max_completion_length, recipe.data.max_length
        kv = kv_cache_bytes(shape, b * g, length + c, model_bytes)
        items.append(
            Item(
                "rollout: KV cache",
                kv,
                note=f"{b} prompts × {g} generations = {b * g} sequences × ({length} + {c}) tokens, "
                f"{shape.layers} layers × 2 × {shape.kv_heads} KV heads × {shape.head_dim} × {model_bytes} bytes",
                phase="rollout",
            )
        )
        # The prefill: B x num_generations prompts of up to data.max_length tokens, one layer at a time, no grad.
        prefill_layer = activation_bytes(
            shape,
            batch=b * g,
            seq=length,
            checkpointing=False,
            autocast=autocast,
            model_bytes=model_bytes,
            residual_bytes=residual_bytes,
            attention=recipe.model.attn_implementation if shape.sdpa else "eager",
        ).per_layer
        sampling = (
            (act_bytes + 12) * b * g * shape.vocab
        )  # last-token logits, float32 scores and probabilities
        items.append(
            Item(
                "rollout: prefill + sampling",
                prefill_layer + sampling,
                note="one decoder layer of the no-grad prefill, the last position's logits and probabilities",
                phase="rollout",
            )
        )
    reference = old_policy = False
    if recipe.method == "dpo":
        reference = recipe.dpo is None or recipe.dpo.loss != "simpo"  # SimPO is reference-free
    elif recipe.method == "grpo":
        reference, old_policy = recipe.grpo.beta > 0, recipe.grpo.steps_per_generation > 1
    if (reference or old_policy) and rows is not None:
        n, seq, _ = rows
        what = "adapter disabled" if reference else "the generating policy's log-probabilities"
        if reference and old_policy:
            what += "; the generating policy's log-probabilities alike"
        items.append(
            Item(
                "reference forward" if reference else "old-policy forward",
                train_layer + no_grad_logps_peak(n, seq, shape.vocab, act_bytes),
                note=f"no-grad forward of the {n} × {seq} rows ({what}): one layer, logits, log-probs",
                phase="reference",
            )
        )
    return items


def generation_gather_items(recipe: Recipe, sharding: Sharding, whole: int, own: int) -> list[Item]:
    """GRPO under ZeRO-3 with `grpo.gather_for_generation`: the rest of the model, gathered on every GPU for
    the rollouts (`whole`: all weights' bytes; `own`: what the GPU holds of them anyway)."""
    from vlmtune.plan.memory import Item

    if not (
        recipe.method == "grpo"
        and recipe.grpo.gather_for_generation
        and sharding.strategy == "deepspeed"
        and sharding.zero_stage == 3
        and sharding.world > 1
    ):
        return []
    return [
        Item(
            "rollout: gathered model",
            max(whole - own, 0),
            note="grpo.gather_for_generation: every weight on each GPU while generating (false: layer by layer, "
            "slow)",
            phase="rollout",
        )
    ]


def method_notes(recipe: Recipe, items: list[Item]) -> list[str]:
    """How the step's phases add up, and the forward passes a step of dpo / grpo makes."""
    from vlmtune.plan.memory import GIB, phase_totals

    notes = []
    phases = phase_totals(items)
    if len(phases) > 1:
        parts = ", ".join(f"{name} {nbytes / GIB:.2f} GiB" for name, nbytes in phases.items())
        notes.append(
            f"method {recipe.method}: the step's phases run one after another and reuse memory, so the total is "
            f"what is held all step plus the largest phase ({parts})"
        )
    if recipe.method == "grpo":
        g = recipe.grpo
        ref = " + a reference forward" if g.beta > 0 else ""
        old = " + an old-policy forward" if g.steps_per_generation > 1 else ""
        notes.append(
            f"per micro-batch of prompts: one generate of {recipe.train.micro_batch_size * g.num_generations} "
            f"sequences (up to {g.max_completion_length} new tokens), then {g.num_generations} loss "
            f"micro-batches, each a forward and backward{ref}{old}"
        )
    elif recipe.method == "dpo" and any(i.name == "reference forward" for i in items):
        notes.append(
            "per micro-batch of pairs: a reference forward (adapter disabled, no grad), then the policy's"
        )
    return notes
