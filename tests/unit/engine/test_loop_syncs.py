"""Host synchronisations per training step: on a GPU each one stalls the queue until the step's work is done.

The step keeps one (the non-finite skip decision needs the loss and the gradient norm on the host) and two
collectives (the window's token count before backward; the loss together with every rank's stop request after).
Input tokens and FLOPs are summed over ranks only when a metrics record is written. On CPU nothing really
synchronises, so the test counts what would: collectives (`Accelerator.reduce`) and conversions of tensors to
Python numbers made by the engine's code once the batches are on the device.
"""

import sys
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

import vlmtune.engine.loop as loop

ENGINE = Path(loop.__file__).parent
CONVERSIONS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__"}
# These read the collated batches while they are still host tensors, before the step moves them to the device.
HOST_SIDE = {"trained_tokens", "input_tokens", "sequence_lengths"}


class EngineConversions(TorchFunctionMode):
    """Records `function:conversion` for each tensor → Python number conversion called from `vlmtune/engine`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in CONVERSIONS:
            frame = sys._getframe(1)
            while frame is not None and f"{Path('torch')}/" in frame.f_code.co_filename.replace("\\", "/"):
                frame = frame.f_back
            code = frame.f_code if frame is not None else None
            if code is not None and Path(code.co_filename).parent == ENGINE and code.co_name not in HOST_SIDE:
                self.calls.append(f"{code.co_name}:{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("log_every", [1, 3])
def test_a_step_has_two_collectives_and_one_host_copy_plus_one_each_per_record(
    tiny_recipe, monkeypatch, one_thread, log_every
):
    from accelerate import Accelerator

    from vlmtune.train import run

    reduces = {"step": 0, "fit": 0}
    in_step = {"now": False}
    real_reduce = Accelerator.reduce

    def reduce(self, tensor, reduction="sum", scale=1.0):
        reduces["step" if in_step["now"] else "fit"] += 1
        return real_reduce(self, tensor, reduction, scale)

    step_conversions: list[list[str]] = []
    fit_conversions = EngineConversions()
    train_step, fit = loop.Trainer.train_step, loop.Trainer.fit

    def counted_step(self, micro_batches):
        in_step["now"] = True
        with EngineConversions() as mode:
            out = train_step(self, micro_batches)
        in_step["now"] = False
        step_conversions.append(mode.calls)
        return out

    def counted_fit(self):
        with fit_conversions:
            return fit(self)

    monkeypatch.setattr(Accelerator, "reduce", reduce)
    monkeypatch.setattr(loop.Trainer, "train_step", counted_step)
    monkeypatch.setattr(loop.Trainer, "fit", counted_fit)
    steps = 6
    run(tiny_recipe(train={"max_steps": steps, "log_every": log_every}))

    records = steps // log_every
    assert step_conversions == [["_to_host:tolist"]] * steps  # the one device→host copy of a step
    assert reduces["step"] == 2 * steps
    # Outside the steps (the inner mode sees theirs), the loop reduces and copies once per metrics record.
    assert fit_conversions.calls == ["_to_host:tolist"] * records
    assert reduces["fit"] == records
