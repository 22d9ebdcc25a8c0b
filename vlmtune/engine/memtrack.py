"""Measuring a training step by module: memory added and time, forward and backward (`vlmtune profile`).

Memory: on a GPU, the caching allocator's counters (`memory_allocated`, `max_memory_allocated`, reset at every
boundary between modules). The CPU allocator keeps no such statistics, so there `LiveBytes`, a dispatch mode,
counts the bytes of every tensor storage an operation creates and lets go of it when the storage is freed (a
weak reference): the same quantity, tensor bytes alive, as the GPU's counter.

Time and attribution: a step is cut into intervals at module boundaries (`StepMeter`). Forward: a unit's
pre- and post-forward hooks. Backward: a unit's backward starts when the first gradient of its outputs is ready
(a multi-gradient hook on them) and runs until the next unit's starts, so a checkpointed layer's recomputation
counts in its own backward. `head + loss` runs from the output head's forward to the first unit's backward;
the optimizer step is bounded by its step hooks.
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

OTHER = "other"  # embeddings, norms, and the step's bookkeeping between units
HEAD = "head + loss"
OPTIMIZER = "optimizer step"


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive on `device`, from `base` (what existed before) upward, and their peak."""

    def __init__(self, device: torch.device, base: int = 0) -> None:
        super().__init__()
        self.device = device
        self.live = self.peak = self.max_live = base  # peak: since the last `Meter.mark`; max_live: ever
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.on_peak: Callable[[], None] | None = (
            None  # called at every new peak (the split of the step's peak)
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [s for s in map(self._storage, tree_leaves(out)) if s is not None]
        if outputs:
            # An output on an input's storage (a view, an in-place result) allocated nothing: of a tensor made
            # before tracking began (a weight, a batch) it must not be counted when first seen through a view.
            inputs = {s.data_ptr() for s in map(self._storage, tree_leaves((args, kwargs))) if s is not None}
            for storage in outputs:
                self._track(storage, inputs)
        return out

    def _storage(self, t) -> torch.UntypedStorage | None:
        """`t`'s storage on the tracked device; None for other values and for tensors with no real storage of
        their own (a DTensor of FSDP2 is a wrapper: its local shard's ops are seen when they run)."""
        if not isinstance(t, torch.Tensor) or t.device.type != self.device.type:
            return None
        try:
            storage = t.untyped_storage()
            storage.data_ptr()
        except RuntimeError:
            return None
        return storage

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        if storage in self._seen:  # counted once, however many tensors view it
            return
        if storage.data_ptr() in inputs:
            self._seen[storage] = None
            return
        nbytes = storage.nbytes()
        self._seen[storage] = weakref.ref(storage, lambda _: self._free(nbytes))
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            if self.live > self.max_live:
                self.max_live = self.live
                if self.on_peak is not None:
                    self.on_peak()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


class Meter:
    """`allocated()` and the peak since the last `mark()`, on a GPU from its allocator, on the CPU from `LiveBytes`
    (without one, a CPU step is timed only: both read 0)."""

    def __init__(self, device: torch.device, live: LiveBytes | None = None) -> None:
        self.device, self.live_bytes = device, live
        self._mark_peak = 0

    def allocated(self) -> int:
        if self.live_bytes is not None:
            return self.live_bytes.live
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def mark(self) -> None:
        """Start a new interval: its peak counts from what is allocated now."""
        if self.live_bytes is not None:
            self.live_bytes.peak = self.live_bytes.live
        elif self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.live_bytes is not None:
            return self.live_bytes.peak
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class UnitStats:
    """One unit's totals over the measured steps: time (s) and the most memory it added (bytes)."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    forward_peak_added: int = 0
    backward_peak_added: int = 0


@dataclass
class StepMeter:
    """Cuts steps into (unit, phase) intervals and records each one's time and memory added."""

    meter: Meter
    units: list[tuple[str, torch.nn.Module]]
    head: torch.nn.Module | None
    timing: bool = True
    stats: dict[str, UnitStats] = field(default_factory=lambda: defaultdict(UnitStats))
    step_peak: int = 0  # the most allocated at any time of the step
    _current: tuple[str, str] = (OTHER, "forward")
    _start_t: float = 0.0
    _start_mem: int = 0
    _in_backward: bool = False
    _handles: list = field(default_factory=list)

    def switch(self, name: str, phase: str) -> None:
        """Close the open interval and open `name`'s `phase` (forward, backward)."""
        if self.timing:
            self.meter.sync()
        now, peak = time.perf_counter(), self.meter.peak()
        self.step_peak = max(self.step_peak, peak)
        unit, was = self._current
        s = self.stats[unit]
        added = max(peak - self._start_mem, 0)
        if was == "forward":
            s.forward_s += now - self._start_t
            s.forward_peak_added = max(s.forward_peak_added, added)
        else:
            s.backward_s += now - self._start_t
            s.backward_peak_added = max(s.backward_peak_added, added)
        self._current = (name, phase)
        self.meter.mark()
        self._start_t, self._start_mem = time.perf_counter(), self.meter.allocated()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hooks on every unit, the output head and the optimizer; `detach` removes them."""
        for name, module in self.units:
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        if self.head is not None:
            self._handles.append(self.head.register_forward_pre_hook(self._head_pre))
            self._handles.append(self.head.register_forward_hook(self._post(HEAD, keep_open=True)))
        if hasattr(optimizer, "register_step_pre_hook"):
            self._handles.append(
                optimizer.register_step_pre_hook(lambda *_: self.switch(OPTIMIZER, "forward"))
            )
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.switch(OTHER, "forward")))
        else:  # DeepSpeed's ZeRO optimizers are not torch optimizers: their step is wrapped instead
            self._handles.append(_StepWrapper(optimizer, self))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin_step(self) -> None:
        self._current = (OTHER, "forward")
        self.meter.mark()
        self._start_t, self._start_mem = time.perf_counter(), self.meter.allocated()

    def backward_started(self) -> None:
        self._in_backward = True
        self.switch(HEAD, "backward")

    def backward_ended(self) -> None:
        self.switch(OTHER, "backward")
        self._in_backward = False
        self._current = (OTHER, "forward")

    def _pre(self, name: str):
        def hook(module, args) -> None:
            if not self._in_backward:  # in backward: a checkpointed layer recomputing, part of its backward
                self.switch(name, "forward")

        return hook

    def _post(self, name: str, keep_open: bool = False):
        def hook(module, args, output) -> None:
            if self._in_backward:
                return
            tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(
                    tensors, lambda grads: self.switch(name, "backward"), mode="any"
                )
            if not keep_open:  # the head stays open: the loss is computed after it, outside the model
                self.switch(OTHER, "forward")

        return hook

    def _head_pre(self, module, args) -> None:
        if not self._in_backward:
            self.switch(HEAD, "forward")


class _StepWrapper:
    """Times `optimizer.step` as the optimizer unit until `remove()` (a hook handle's interface)."""

    def __init__(self, optimizer, tracker: StepMeter) -> None:
        self.optimizer, step = optimizer, optimizer.step

        def timed(*args, **kwargs):
            tracker.switch(OPTIMIZER, "forward")
            try:
                return step(*args, **kwargs)
            finally:
                tracker.switch(OTHER, "forward")

        optimizer.step = timed  # an instance attribute over the class's method

    def remove(self) -> None:
        del self.optimizer.step
