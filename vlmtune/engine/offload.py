"""Activation offloading: tensors saved for backward wait in CPU memory instead of GPU memory.

With (non-reentrant) gradient checkpointing the tensors autograd saves outside the checkpointed layers are
mostly the layer inputs, one (batch, tokens, hidden) tensor per layer, so offloading them moves the rest of the
activation memory off the GPU for one copy each way per layer. Parameters are never copied: they stay on the GPU
anyway, and a frozen base model would otherwise travel to the CPU in every step.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks


class OffloadActivations(saved_tensors_hooks):
    """Within this context, tensors saved for backward are copied to (pinned) CPU memory and back when used.

    Args:
        pin_memory: Copy into page-locked memory (needs CUDA): the copy back can then overlap compute.
        min_bytes: Smaller tensors stay where they are; copying them costs more than it saves.
    """

    def __init__(self, *, pin_memory: bool = True, min_bytes: int = 1024) -> None:
        self.copied = 0  # tensors offloaded so far (tests and logs read it)

        def pack(tensor: torch.Tensor):
            if (
                isinstance(tensor, torch.nn.Parameter)
                or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < min_bytes
            ):
                return tensor
            cpu = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=pin_memory)
            cpu.copy_(tensor)
            self.copied += 1
            return tensor.device, cpu

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, cpu = packed
            return cpu.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)
