import pytest

from vlmtune.config.schema import EarlyStopping
from vlmtune.engine.early_stop import judge_eval
from vlmtune.engine.state import TrainState


def _judge(losses: list[float], rule: EarlyStopping | None) -> tuple[list[bool], TrainState, int | None]:
    state, bests, stopped_at = TrainState(), [], None
    for step, loss in enumerate(losses, start=1):
        state.step = step
        bests.append(judge_eval(state, loss, rule))
        if state.stopped_early and stopped_at is None:
            stopped_at = step
    return bests, state, stopped_at


def test_patience_counts_evaluations_without_a_gain_larger_than_min_delta():
    rule = EarlyStopping(patience=2, min_delta=0.1)
    bests, state, stopped_at = _judge([3.0, 2.0, 1.95, 1.8, 2.5, 1.75], rule)
    # 1.95 is not better by more than 0.1; 1.8 is; then 2.5 and 1.75 (by 0.05 only) are 2 evals without a gain.
    assert bests == [True, True, False, True, False, False]
    assert (state.best_step, state.best_eval_loss, stopped_at) == (4, 1.8, 6)
    assert "for 2 evaluation(s)" in state.stopped_early and "1.8 at step 4" in state.stopped_early


def test_a_gain_resets_the_patience():
    _, state, stopped_at = _judge([3.0, 3.1, 2.9, 3.0, 2.8, 2.9], EarlyStopping(patience=2))
    assert stopped_at is None and state.evals_since_best == 1 and state.best_step == 5


@pytest.mark.parametrize("losses", [[2.0, 1.0, 3.0, 4.0, 5.0]])
def test_without_early_stopping_the_best_is_tracked_and_nothing_stops(losses):
    bests, state, stopped_at = _judge(losses, None)
    assert bests == [True, True, False, False, False]
    assert (state.best_step, state.best_eval_loss, stopped_at, state.stopped_early) == (2, 1.0, None, "")


def test_the_judgement_survives_a_checkpoint_round_trip():
    _, state, _ = _judge([3.0, 2.0, 2.5], EarlyStopping(patience=2))
    resumed = TrainState()
    resumed.load_state_dict(state.state_dict())
    assert judge_eval(resumed, 2.6, EarlyStopping(patience=2)) is False and resumed.stopped_early
