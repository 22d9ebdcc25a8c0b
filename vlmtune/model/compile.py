"""`train.compile`: torch.compile each repeated block (decoder layer, vision block) of the model in place.

Compiling the blocks rather than the whole model keeps one small graph per block type (recompiled for new
shapes, not for every module), leaves the top-level forward (VLM image merging, PEFT) in eager mode where
graph breaks would be common, works under gradient checkpointing (a checkpointed block runs its compiled
forward again in backward), and keeps parameter names unchanged, so checkpoints and adapters are the same.
"""

from __future__ import annotations

from torch import nn

from vlmtune.errors import UserError
from vlmtune.logging import get_logger

log = get_logger(__name__)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile (in place) every module whose class is one of the model's `_no_split_modules`; return how many.

    Args:
        backend: torch.compile backend; tests use `aot_eager`, which traces the same graphs without the C++/Triton
            code generation that takes minutes on a small CPU.

    Raises:
        UserError: the model names no repeated block class, or none is found in it.
    """
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        raise UserError(
            f"train.compile: found no repeated blocks to compile in {type(model).__name__}; set train.compile: false"
        )
    for block in blocks:
        block.compile(backend=backend)
    log.info(
        "torch.compile: %d blocks (%s)", len(blocks), ", ".join(sorted({type(b).__name__ for b in blocks}))
    )
    return len(blocks)
