"""The teacher of `method: distill` in `vlmtune plan`: its weights and its forward, per GPU.

The teacher is counted from its config alone, like the student (`model.meta`): weights in `distill.dtype` (or
`distill.quant`), sharded as the student's under ZeRO-3 / FSDP2; its forward runs without gradients, so it keeps
nothing for backward: its peak is one decoder layer's intermediates over the micro-batch, plus the hidden
states it hands to the loss and the chunked KD's logits (both vocabulary-wide tensors, a chunk at a time).
"""

from __future__ import annotations

from vlmtune.config.schema import Recipe
from vlmtune.errors import UserError
from vlmtune.model.meta import build_meta_model
from vlmtune.plan.memory import GIB, Item, Sharding, layer_shape, micro_batch_shape, parameters

# The item that depends on the micro-batch (recomputed when the plan searches for the largest that fits).
TEACHER_FORWARD = "teacher forward + KD"
# fp32 tensors of one KD chunk at their peak: both models' logits, both log-softmaxes, the probabilities, the
# divergence's terms and the gradient (see `methods.distill._chunk_sums`).
KD_CHUNK_TENSORS = 8


def teacher_items(recipe: Recipe, sharding: Sharding) -> list[Item]:
    """The teacher's lines of the plan (none unless the method is distill); a teacher whose config cannot be
    read is named in a zero line rather than failing the plan."""
    cfg = recipe.distill
    if recipe.method != "distill" or cfg is None:
        return []
    try:
        weights, layer, hidden, intermediate, vocab = _teacher_sizes(recipe, sharding)
    except UserError as exc:
        return [Item("teacher", 0, 0, f"not counted: {str(exc).removeprefix('model.path: ')}")]
    rows, seq, _ = micro_batch_shape(recipe)
    tokens = rows * seq
    act_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.dtype]
    part = weights // sharding.world if sharding.shards_weights else weights
    gathered = 2 * layer if sharding.shards_weights else 0
    weights_note = f"frozen, {cfg.dtype}" + (f", {cfg.quant.bits}-bit" if cfg.quant else "")
    if sharding.shards_weights:
        weights_note += f", sharded; its layer in use and the next gathered ({gathered / GIB:.2f} GiB)"
    # No grad: the residual stream in and out of a layer, and that layer's widest intermediates (gate, up, act).
    forward = tokens * (2 * hidden + 3 * intermediate) * act_bytes
    kept = tokens * hidden * act_bytes  # its last hidden states, until the loss has read them
    chunk = min(recipe.train.loss_chunk_tokens, tokens)
    kd = KD_CHUNK_TENSORS * chunk * vocab * 4
    return [
        Item("teacher weights", part + gathered, 0, weights_note),
        Item(
            TEACHER_FORWARD,
            forward + kept + kd,
            0,
            f"no gradients: one layer at a time; KD {chunk} trained tokens × {vocab:,} vocabulary per chunk",
            phase="train",  # before the student's forward, and its KD chunks during the loss
        ),
    ]


# The plan estimates many micro-batch sizes of one recipe: build the teacher's meta model once.
_SIZES: dict[tuple, tuple[int, int, int, int, int]] = {}


def _teacher_sizes(recipe: Recipe, sharding: Sharding) -> tuple[int, int, int, int, int]:
    """(frozen weight bytes, largest layer bytes, hidden, intermediate, vocabulary) of the teacher."""
    cfg = recipe.distill
    key = (cfg.model_dump_json(), str(recipe._base_dir), recipe.model.trust_remote_code, sharding)
    if key not in _SIZES:
        _SIZES[key] = _sizes(recipe, sharding)
    return _SIZES[key]


def _sizes(recipe: Recipe, sharding: Sharding) -> tuple[int, int, int, int, int]:
    teacher, dtype = recipe.distill.teacher, recipe.distill.dtype
    model = recipe.model.model_copy(
        update={"path": teacher, "dtype": dtype, "revision": None, "family": None, "tokenizer_path": None}
    )
    as_student = recipe.model_copy(update={"model": model, "quant": recipe.distill.quant})
    meta = build_meta_model(as_student)
    p = parameters(meta, as_student, sharding)
    shape = layer_shape(meta)
    return p.frozen_bytes, p.largest_layer_bytes, shape.hidden, shape.intermediate, shape.vocab
