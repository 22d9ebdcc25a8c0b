"""The best eval loss so far and early stopping (`train.early_stopping`), kept in `TrainState` so they resume.

Every evaluation is judged: a loss lower than the best so far by more than `min_delta` (0 without early stopping)
is a new best (its step is the checkpoint `checkpoint.keep_best` keeps and `checkpoint.export: best` exports);
`patience` evaluations in a row without one stop the run.
"""

from __future__ import annotations

from vlmtune.config.schema import EarlyStopping
from vlmtune.engine.state import TrainState


def judge_eval(state: TrainState, loss: float, rule: EarlyStopping | None) -> bool:
    """Record the eval loss measured at `state.step`; True when it is a new best.

    When `rule` runs out of patience, `state.stopped_early` says why (the loop then stops after this step).
    """
    min_delta = rule.min_delta if rule is not None else 0.0
    if state.best_eval_loss is None or loss < state.best_eval_loss - min_delta:
        state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
        return True
    state.evals_since_best += 1
    if rule is not None and state.evals_since_best >= rule.patience:
        state.stopped_early = (
            f"eval_loss has not improved by more than {rule.min_delta:g} for {state.evals_since_best} "
            f"evaluation(s) (train.early_stopping.patience {rule.patience}); the best was "
            f"{state.best_eval_loss:.6g} at step {state.best_step}"
        )
    return False
