"""Text-only batches that still run the vision tower, so every process runs the same modules in the same order.

Under ZeRO-3 and FSDP2 a module's weights are gathered by a collective when the module runs. A process whose
micro-batch has no image skips the vision tower while another process runs it; their collectives then no longer
pair up: a hang, or gloo's "collective mismatch". Under DDP and ZeRO-1/2 the projector's trainable weights get no
gradient on that process. The fix: on a text-only batch, run the tower and projector on one small image from the
training data right after the token embeddings (where the image path runs them) and add 0 × their output to the
embeddings. Nothing changes numerically; every process gathers the same weights in the same order, and every
trainable weight gets a gradient on every process.

Generation (GRPO's rollouts, eval samples) runs the vision path once per `generate` call: in the prefill, or for
models that take `mm_encoder_outputs` (transformers encodes the images before the prefill) before it. Inside
`generating(model, images=...)` a text-only prompt batch runs the one image at that same place, and the decoding
steps after the prefill run no vision on any process.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmtune.engine.distributed import strategy, zero_stage
from vlmtune.errors import UserError
from vlmtune.logging import get_logger

if TYPE_CHECKING:
    from vlmtune.families import Family

log = get_logger(__name__)

# How many image rows to look through for the smallest image (a text-only step's extra cost grows with it).
_SCAN_ROWS = 256

# The keep-alive installed on each (unwrapped) model, for `generating` to find.
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class VisionKeepAlive:
    """Hooks on a VLM that run its vision path on `vision_inputs` whenever a forward has no `pixel_values`.

    Args:
        model: The unwrapped model (`XForConditionalGeneration`, or PEFT around it).
        vision_inputs: Batched vision inputs of one image (as the collator makes them), on the model's device.
    """

    def __init__(self, model: torch.nn.Module, vision_inputs: dict[str, torch.Tensor]) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._features = base.get_image_features
        accepted = inspect.signature(self._features).parameters
        self.inputs = {k: v for k, v in vision_inputs.items() if k == "pixel_values" or k in accepted}
        self._text_only = False
        # transformers runs the image encoder before the prefill for models whose forward takes its outputs.
        self._encodes_first = "mm_encoder_outputs" in inspect.signature(base.forward).parameters
        self._prefill_next: bool | None = None  # inside `generate`: whether the next forward is the prefill
        # PEFT calls the top model's `forward` directly (no hooks run); the top model calls `self.model(...)`.
        self._handles = [
            base.model.register_forward_pre_hook(self._see_batch, with_kwargs=True),
            base.get_input_embeddings().register_forward_hook(self._run_vision),
        ]
        self._model = base
        _INSTALLED[base] = self

    def _see_batch(self, module, args, kwargs) -> None:
        self._text_only = kwargs.get("pixel_values") is None
        if self._prefill_next is not None:  # generating: the prefill at most, never a decoding step
            self._text_only = self._text_only and self._prefill_next
            self._prefill_next = False

    def _run_vision(self, module, args, embeddings: torch.Tensor) -> torch.Tensor | None:
        if not self._text_only:
            return None
        self._text_only = False  # once per forward (generation calls the embeddings again)
        total = sum(t.float().sum() for t in _tensors(self._features(**self.inputs)))
        return embeddings + total.nan_to_num(0.0, 0.0, 0.0) * 0.0

    @contextmanager
    def generating(self, images: bool) -> Iterator[None]:
        """One `generate` call, with (`images`) or without vision inputs: vision runs once, where images would."""
        if self._encodes_first and not images:
            self._features(**self.inputs)
        self._prefill_next = not self._encodes_first
        try:
            yield
        finally:
            self._prefill_next = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        _INSTALLED.pop(self._model, None)


def installed(model: torch.nn.Module) -> VisionKeepAlive | None:
    """The keep-alive on `model` (PEFT-wrapped or not), if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _INSTALLED.get(base)


@contextmanager
def generating(model: torch.nn.Module, *, images: bool) -> Iterator[None]:
    """Around one `generate` call of `model` on prompts with (`images`) or without vision inputs: where a
    keep-alive is installed, every process runs the vision path once, at the same place (see the module's doc)."""
    keep = installed(model)
    if keep is None:
        yield
        return
    with keep.generating(images):
        yield


def keep_vision_in_step(
    accelerator, model, family: Family | None, data, collator
) -> dict[str, torch.Tensor] | None:
    """Install `VisionKeepAlive` when several processes train a VLM on data that mixes image and text-only rows.

    Returns:
        The one image's vision inputs the hooks run (for another sharded model of the run, such as a
        distillation teacher, to run the same), or None where nothing was installed.

    Raises:
        UserError: for Mllama under ZeRO-3 / FSDP2 with text-only rows: it also skips its cross-attention
            layers without an image, which no dummy image in the embeddings can bring back in step.
    """
    if family is None or accelerator.num_processes < 2:
        return None
    image_rows = np.flatnonzero(data.images())  # from the index: no image is decoded to find them
    if not len(image_rows) or len(image_rows) == len(data):
        return None  # every process runs the same path on every batch
    if family.cross_attention_images:
        if strategy(accelerator) == "fsdp2" or zero_stage(accelerator) == 3:
            raise UserError(
                f"{family.name} models skip their cross-attention layers on a text-only batch, so with "
                f"{accelerator.num_processes} processes under {strategy(accelerator)} a batch without images on one process "
                "and with images on another cannot stay in step; give every row an image, or use DDP / ZeRO-2"
            )
        return None  # DDP finds the skipped layers' weights unused (configure_ddp)
    image_tokens = data.image_tokens()
    smallest = int(min(image_rows[:_SCAN_ROWS], key=lambda i: image_tokens[i]))
    batch = collator([data[smallest]])
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    inputs = {
        k: (v.to(dtype) if v.is_floating_point() else v).to(accelerator.device)
        for k, v in batch.items()
        if k in collator.vision
    }
    log.info("text-only batches run the vision tower on a %s image so processes stay in step", _shape(inputs))
    VisionKeepAlive(accelerator.unwrap_model(model), inputs)  # its hooks live as long as the model
    return inputs


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model output (a tensor, a tuple / list of them, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    values = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else []
    return [t for v in values for t in _tensors(v)]


def _shape(inputs: dict[str, torch.Tensor]) -> str:
    return "x".join(str(d) for d in inputs["pixel_values"].shape)
