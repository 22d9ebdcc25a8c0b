from collections import Counter

import pytest
import torch

from vlmtune.data.sampler import StepSampler


def _rows(s: StepSampler, step: int, world: int) -> list[int]:
    """All rows of one global step, in micro-batch order across ranks."""
    per_rank = [s.micro_batches(step, r) for r in range(world)]
    return [row for m in range(s.grad_accum) for r in range(world) for row in per_rank[r][m]]


def test_global_batch_is_independent_of_the_split():
    a = StepSampler(50, micro_batch=8, grad_accum=1, world_size=1, seed=3)
    b = StepSampler(50, micro_batch=1, grad_accum=8, world_size=1, seed=3)
    c = StepSampler(50, micro_batch=2, grad_accum=2, world_size=2, seed=3)
    for step in range(10):
        assert sorted(_rows(a, step, 1)) == sorted(_rows(b, step, 1)) == sorted(_rows(c, step, 2))


def test_every_row_once_per_epoch_padded_by_wraparound():
    s = StepSampler(10, micro_batch=2, grad_accum=2, world_size=1, seed=0)
    assert s.steps_per_epoch == 3
    seen = Counter(row for step in range(3) for row in _rows(s, step, 1))
    assert set(seen) == set(range(10)) and sum(seen.values()) == 12
    assert all(len(mb) == 2 for step in range(3) for mb in s.micro_batches(step, 0))


def test_repeated_steps_draw_the_same_rows_and_an_epoch_still_sees_every_row():
    """GRPO's steps_per_generation: k steps share one batch of prompts; none is skipped."""
    once = StepSampler(10, micro_batch=2, grad_accum=1, world_size=2, seed=0)
    s = StepSampler(10, micro_batch=2, grad_accum=1, world_size=2, seed=0, repeat=3)
    assert s.steps_per_epoch == 3 * once.steps_per_epoch == 9
    for step in range(2 * s.steps_per_epoch):
        assert _rows(s, step, 2) == _rows(once, step // 3, 2)
    seen = Counter(row for step in range(0, s.steps_per_epoch, 3) for row in _rows(s, step, 2))
    assert set(seen) == set(range(10))
    assert s.epoch_of(9) == 1 and _rows(s, 9, 2) == _rows(once, 3, 2)


def test_epochs_reshuffle_and_the_order_is_a_pure_function_of_seed_and_step():
    s = StepSampler(64, micro_batch=4, grad_accum=2, world_size=1, seed=1)
    epoch0 = [_rows(s, k, 1) for k in range(s.steps_per_epoch)]
    epoch1 = [_rows(s, s.steps_per_epoch + k, 1) for k in range(s.steps_per_epoch)]
    assert epoch0 != epoch1
    fresh = StepSampler(64, micro_batch=4, grad_accum=2, world_size=1, seed=1)
    assert _rows(fresh, s.steps_per_epoch + 3, 1) == epoch1[3]  # resume mid-epoch: same batch
    other = StepSampler(64, micro_batch=4, grad_accum=2, world_size=1, seed=2)
    assert _rows(other, 0, 1) != epoch0[0]


def test_tiny_dataset_smaller_than_a_batch():
    s = StepSampler(3, micro_batch=4, grad_accum=2, world_size=1, seed=0)
    assert s.steps_per_epoch == 1 and sorted(set(_rows(s, 0, 1))) == [0, 1, 2]
    with pytest.raises(ValueError):
        StepSampler(0, micro_batch=1, grad_accum=1, world_size=1, seed=0)


def _padding(s: StepSampler, lengths: list[int], steps: int) -> int:
    return sum(
        len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb)
        for step in range(steps)
        for mb in s.micro_batches(step, 0)
    )


def test_group_by_length_keeps_every_row_once_and_cuts_padding():
    lengths = torch.randint(1, 500, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(micro_batch=4, grad_accum=2, world_size=1, seed=5, lengths=lengths)
    plain, grouped = StepSampler(400, **kw), StepSampler(400, group_by_length=True, **kw)
    epoch = grouped.steps_per_epoch
    assert epoch == plain.steps_per_epoch == 50
    assert Counter(r for k in range(epoch) for r in _rows(grouped, k, 1)) == Counter(range(400))
    assert _padding(grouped, lengths, epoch) < _padding(plain, lengths, epoch) / 5
    # A pure function of (seed, epoch, step): a fresh sampler (a resumed run) draws the same batches.
    fresh = StepSampler(400, group_by_length=True, **kw)
    assert fresh.micro_batches(epoch + 7, 0) == grouped.micro_batches(epoch + 7, 0)
    assert grouped.micro_batches(epoch + 7, 0) != grouped.micro_batches(7, 0)  # each epoch reshuffles


def test_units_are_drawn_whole_nested_or_flattened():
    units = [[0, 1], [2], [3, 4, 5], [6]]
    s = StepSampler(7, micro_batch=2, grad_accum=1, world_size=1, seed=0, units=units)
    assert s.steps_per_epoch == 2  # counted in units, known before training
    drawn = [u for k in range(2) for mb in s.micro_batches(k, 0) for u in mb]
    assert sorted(drawn) == sorted(units)
    flat = StepSampler(7, micro_batch=1, grad_accum=2, world_size=1, seed=0, units=units, flatten_units=True)
    assert sorted(tuple(mb) for k in range(2) for mb in flat.micro_batches(k, 0)) == sorted(map(tuple, units))


def _skewed_costs(n: int) -> list[int]:
    """Image-text-like work: mostly short rows, a few with large images."""
    g = torch.Generator().manual_seed(1)
    return [int(c) for c in (torch.rand(n, generator=g) ** 4 * 2000 + 50)]


def test_balanced_ranks_train_the_same_rows_per_step_with_less_imbalance():
    costs = _skewed_costs(200)
    common = {"micro_batch": 2, "grad_accum": 2, "world_size": 4, "seed": 5}
    dealt = StepSampler(200, **common, costs=costs)
    balanced = StepSampler(200, **common, costs=costs, balanced=True)
    again = StepSampler(200, **common, costs=costs, balanced=True)
    worst = {"dealt": [], "balanced": []}
    for step in range(dealt.steps_per_epoch):
        assert sorted(_rows(dealt, step, 4)) == sorted(_rows(balanced, step, 4))
        assert all(len(mb) == 2 for r in range(4) for mb in balanced.micro_batches(step, r))
        assert [balanced.micro_batches(step, r) for r in range(4)] == [
            again.micro_batches(step, r) for r in range(4)
        ]
        for name, s in (("dealt", dealt), ("balanced", balanced)):
            loads = [sum(costs[i] for mb in s.micro_batches(step, r) for i in mb) for r in range(4)]
            worst[name].append(max(loads) / (sum(loads) / 4))
        for s in (dealt, balanced):  # reported whether or not the ranks are balanced
            assert s.rank_loads(step) == [
                sum(costs[i] for mb in s.micro_batches(step, r) for i in mb) for r in range(4)
            ]
    mean = {k: sum(v) / len(v) for k, v in worst.items()}
    assert mean["balanced"] < 1.2 < 1.5 < mean["dealt"], mean  # measured: 1.11 against 1.61


def test_balancing_deals_packed_bins_whole_and_is_off_for_one_process_or_length_grouping():
    costs = _skewed_costs(60)
    units = [[i, i + 1, i + 2] for i in range(0, 60, 3)]
    s = StepSampler(
        60, micro_batch=2, grad_accum=1, world_size=2, seed=0, units=units, costs=costs, balanced=True
    )
    for step in range(s.steps_per_epoch):
        for r in range(2):
            assert all(u in units for mb in s.micro_batches(step, r) for u in mb)
    assert not StepSampler(
        60, micro_batch=2, grad_accum=1, world_size=1, seed=0, costs=costs, balanced=True
    ).balanced
    grouped = StepSampler(
        60,
        micro_batch=2,
        grad_accum=1,
        world_size=2,
        seed=0,
        costs=costs,
        lengths=costs,
        group_by_length=True,
        balanced=True,
    )
    assert not grouped.balanced and grouped.costs is not None
