"""`train.micro_batch_size: auto` and `train.global_batch_size`: the decision logic, with a fake planner and a
fake out-of-memory probe (the real probe needs a GPU: tests/gpu)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from vlmtune.config.rules import cross_field_problems
from vlmtune.config.schema import Recipe
from vlmtune.errors import RecipeError
from vlmtune.layout import CHECKPOINTS_DIR, MARKER, RECIPE_FILE
from vlmtune.plan.autobatch import candidates, grad_accum_for, largest_fitting, resolve_batch

GIB = 1024**3


def _recipe(tmp_path=None, **train) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": "org/name"},
            "data": {"train": [{"path": "a.json"}]},
            "train": {"output_dir": str(tmp_path / "run") if tmp_path else "out", **train},
        }
    )


def _oom_above(limit: int, calls: list[int]):
    """A probe that runs out of memory above `limit` rows, recording what it was asked."""

    def probe(n: int) -> bool:
        calls.append(n)
        return n <= limit

    return probe


def _planner(value: int):
    return lambda recipe, world, memory: value


@pytest.mark.parametrize("limit", [0, 1, 5, 6, 7, 16])
def test_largest_fitting_finds_the_largest_size_that_does_not_run_out_of_memory(limit):
    calls: list[int] = []
    sizes = list(range(1, 17))
    found, tries = largest_fitting(sizes, _oom_above(limit, calls))
    assert found == (limit or None)
    assert calls[0] == 16  # the planner's value is tried first
    assert tries == [(n, n <= limit) for n in calls]
    assert len(calls) <= 9  # halving then bisection, not one size at a time


def test_candidates_divide_the_global_batch():
    assert candidates(16, 2, 24) == [1, 2, 3, 4, 6, 12]
    assert candidates(5, 1, None) == [1, 2, 3, 4, 5]
    assert candidates(8, 3, 10) == []


def test_probe_steps_down_on_out_of_memory_and_keeps_the_global_batch():
    recipe = _recipe(micro_batch_size="auto", global_batch_size=24)
    calls: list[int] = []
    out, choice = resolve_batch(
        recipe, world=2, rows=1000, memory=80 * GIB, probe=_oom_above(5, calls), planner=_planner(16)
    )
    # Sizes dividing 24 over 2 processes, at most 12 a process: 12 ✗ → 6 ✗ → 3 ✓ → 4 ✓.
    assert calls == [12, 6, 3, 4]
    assert (choice.micro_batch_size, choice.grad_accum) == (4, 3)
    assert (out.train.micro_batch_size, out.train.grad_accum) == (4, 3)
    assert "12 out of memory" in choice.how and "4 ok" in choice.how
    assert recipe.train.micro_batch_size == "auto"  # the given recipe is left as it was


def test_processes_agree_on_the_smallest_size():
    recipe = _recipe(micro_batch_size="auto", global_batch_size=24)
    _out, choice = resolve_batch(
        recipe, world=2, rows=1000, memory=GIB, probe=lambda n: True, agree=lambda n: 2, planner=_planner(16)
    )
    assert (choice.micro_batch_size, choice.grad_accum) == (2, 6)
    # The planner alone (CPU): processes reading different free memory still agree.
    _, choice = resolve_batch(recipe, world=2, rows=1000, memory=GIB, agree=lambda n: 3, planner=_planner(16))
    assert (choice.micro_batch_size, choice.grad_accum) == (3, 4)


def test_cpu_uses_the_planner_alone_capped_by_the_rows_a_step_can_use():
    recipe = _recipe(micro_batch_size="auto", grad_accum=2)
    _, choice = resolve_batch(recipe, world=1, rows=1000, memory=GIB, planner=_planner(7))
    assert (choice.micro_batch_size, choice.grad_accum) == (7, 2)  # no global batch: grad_accum kept
    assert "planner" in choice.how
    # 30 rows, 2 processes × 2 accumulation steps: more than 8 rows a micro-batch is never used.
    _out, choice = resolve_batch(recipe, world=2, rows=30, memory=GIB, planner=_planner(4096))
    assert (choice.micro_batch_size, choice.grad_accum) == (8, 2)
    assert "capped at 8" in choice.how


def test_global_batch_with_a_fixed_micro_batch_derives_grad_accum():
    recipe = _recipe(micro_batch_size=4, grad_accum=7, global_batch_size=32)
    out, _choice = resolve_batch(recipe, world=2, rows=1000, memory=GIB, planner=_planner(0))
    assert (out.train.micro_batch_size, out.train.grad_accum) == (4, 4)
    fixed = _recipe(micro_batch_size=4, grad_accum=7)
    assert resolve_batch(fixed, world=2, rows=10, memory=GIB)[0].train.grad_accum == 7


def test_a_global_batch_that_cannot_be_met_exactly_is_a_clear_error():
    with pytest.raises(
        RecipeError, match=r"train.global_batch_size: 10 is not a multiple of .* 4 × 1"
    ) as exc:
        grad_accum_for(_recipe(micro_batch_size=4, global_batch_size=10), 4, 1)
    assert "[1, 2, 5, 10]" in str(exc.value)
    recipe = _recipe(micro_batch_size="auto", global_batch_size=10)
    with pytest.raises(RecipeError, match="not a multiple of the 4 processes"):
        resolve_batch(recipe, world=4, rows=100, memory=GIB, planner=_planner(8))


def test_nothing_fits_is_a_clear_error():
    recipe = _recipe(micro_batch_size="auto")
    with pytest.raises(RecipeError, match=r"planner fits not even one row in 1\.0 GiB"):
        resolve_batch(recipe, world=1, rows=100, memory=GIB, planner=_planner(0))
    with pytest.raises(RecipeError, match="not even one row trains on this device"):
        resolve_batch(recipe, world=1, rows=100, memory=GIB, probe=lambda n: False, planner=_planner(4))


def test_a_resumed_run_keeps_the_sizes_its_run_folder_recorded(tmp_path):
    recipe = _recipe(tmp_path, micro_batch_size="auto", global_batch_size=24)
    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE_FILE).write_text(yaml.safe_dump({"train": {"micro_batch_size": 3, "grad_accum": 8}}))
    # Recorded, but no complete checkpoint: a fresh start, sized again.
    (run / CHECKPOINTS_DIR / "step-2").mkdir(parents=True)
    assert resolve_batch(recipe, world=1, rows=100, memory=GIB, planner=_planner(6))[1].micro_batch_size == 6
    (run / CHECKPOINTS_DIR / "step-2" / MARKER).write_text("")
    calls: list[int] = []
    _out, choice = resolve_batch(
        recipe, world=1, rows=100, memory=GIB, probe=_oom_above(8, calls), planner=_planner(6)
    )
    assert (choice.micro_batch_size, choice.grad_accum) == (3, 8)
    assert calls == [] and "kept from" in choice.how  # no probe to a different value
    never = recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"resume": "never"})})
    assert resolve_batch(never, world=1, rows=100, memory=GIB, planner=_planner(6))[1].micro_batch_size == 6


def test_schema_and_rules():
    with pytest.raises(ValidationError, match="micro_batch_size"):
        _recipe(micro_batch_size="largest")
    with pytest.raises(ValidationError, match="global_batch_size"):
        _recipe(global_batch_size=0)
    problems = cross_field_problems(
        _recipe(micro_batch_size="auto", global_batch_size=8, micro_batch_tokens=4096)
    )
    assert any(p.startswith("train.micro_batch_size: auto sizes a row count") for p in problems)
    assert any(p.startswith("train.global_batch_size: counts rows") for p in problems)
    assert cross_field_problems(_recipe(micro_batch_size="auto", global_batch_size=8)) == []


def test_chosen_sizes_reach_the_accelerator_and_deepspeed_before_prepare():
    from types import SimpleNamespace

    from vlmtune.engine.accelerator import set_batch_sizes

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 4,
        "train_batch_size": "auto",
    }
    accelerator = SimpleNamespace(
        gradient_accumulation_steps=4,
        num_processes=2,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
    )
    set_batch_sizes(accelerator, 6, 3)
    assert accelerator.gradient_accumulation_steps == 3
    assert config == {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 36,
    }
    plain = SimpleNamespace(
        gradient_accumulation_steps=4, num_processes=1, state=SimpleNamespace(deepspeed_plugin=None)
    )
    set_batch_sizes(plain, 2, 5)
    assert plain.gradient_accumulation_steps == 5
