"""GRPO's arithmetic against hand computations, and its method on a tiny model (rollouts, rewards, resume)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from vlmtune.config.schema import GrpoConfig
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.methods.grpo import GRPO
from vlmtune.methods.grpo_loss import LossSpec, group_advantages, loss_weight, reduce_loss, token_losses
from vlmtune.methods.rewards import Reward
from vlmtune.methods.rollout import HFGenerator, completion_mask


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 1.0])
    adv = group_advantages(rewards, 4, scale=True)
    # group 1: mean 0.5, Bessel std sqrt(1/3); group 2: mean 2.5, std sqrt(((0.5)^2*2+2.5^2+1.5^2)/3)
    s1 = math.sqrt(1 / 3)
    s2 = math.sqrt((0.25 + 0.25 + 6.25 + 2.25) / 3)
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4)]
    want += [-0.5 / (s2 + 1e-4), -0.5 / (s2 + 1e-4), 2.5 / (s2 + 1e-4), -1.5 / (s2 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(want))
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale=False), rewards - torch.tensor([0.5] * 4 + [2.5] * 4)
    )


def test_equal_rewards_and_unscored_completions_get_no_advantage():
    adv = group_advantages(torch.tensor([3.0, 3.0, 3.0, float("nan"), 1.0, 0.0]), 3, scale=True)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    # The unscored completion is left out of its group's statistics: mean 0.5, std sqrt(0.5).
    s = math.sqrt(0.5)
    torch.testing.assert_close(adv[3:], torch.tensor([0.0, 0.5 / (s + 1e-4), -0.5 / (s + 1e-4)]))


def test_clipped_surrogate_by_hand():
    spec = LossSpec(epsilon=0.2, epsilon_high=0.3)
    old = torch.zeros(2, 3)
    # ratios 0.5, 1.0, 1.5 for a positive and a negative advantage
    logps = torch.log(torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]))
    adv = torch.tensor([2.0, -1.0])
    loss, kl, active = token_losses(logps, old, None, adv, spec)
    # A > 0: -min(r A, clip(r, 0.8, 1.3) A): r 0.5 → -1.0 (unclipped side), 1.0 → -2, 1.5 → -2.6 (clipped at 1.3)
    # A < 0: r 0.5 → clip 0.8 → 0.8 (clipped), 1.0 → 1.0, 1.5 → 1.5 (unclipped side)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -2.0, -2.6], [0.8, 1.0, 1.5]]))
    assert kl is None
    assert active.tolist() == [[False, False, True], [True, False, False]]


def test_kl_is_the_k3_estimator_times_beta():
    spec = LossSpec(beta=0.5)
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    loss, kl, _ = token_losses(logps, logps.detach(), ref, torch.tensor([0.0]), spec)
    want = torch.tensor([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]])
    torch.testing.assert_close(kl, want)
    torch.testing.assert_close(loss, 0.5 * want)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_each_loss_type_over_a_window_split_in_micro_batches(loss):
    """sum(loss_sum) / sum(weight) over two micro-batches equals the loss type's formula over all completions."""
    spec = LossSpec(loss=loss, max_completion_length=8)
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(5, 6, generator=g)
    mask = torch.ones(5, 6, dtype=torch.bool)
    for row, length in enumerate([6, 2, 4, 1, 3]):
        mask[row, length:] = False
    if loss == "grpo":
        want = torch.stack([per_token[i, : mask[i].sum()].mean() for i in range(5)]).mean()
    elif loss == "dapo":
        want = per_token[mask].sum() / mask.sum()
    else:
        want = per_token[mask].sum() / (5 * 8)
    parts = [(per_token[:2], mask[:2]), (per_token[2:], mask[2:])]
    total = sum(reduce_loss(p, m, spec) for p, m in parts)
    weight = sum(loss_weight(m, loss) for _, m in parts)
    torch.testing.assert_close(total / weight, want)


def test_completion_mask_ends_at_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert completion_mask(ids, [2]).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# --- the method on a tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_llm(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompt_batch(tokenizer, prompts: list[str], solutions: list[str]) -> dict:
    """What the prompt collator produces: left-padded ids, labels all ignored, the prompts and the columns."""
    tokenizer.padding_side = "left"
    enc = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts],
        add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.full_like(enc["input_ids"], IGNORE_INDEX),
        "prompts": prompts,
        "columns": {"solution": solutions},
    }


def _length_reward(prompts, completions, solution, **_):
    return [float(len(c)) / 10 if s == "a" else None for c, s in zip(completions, solution, strict=True)]


def _method(model, tokenizer, tmp_path, **config) -> GRPO:
    acc = SimpleNamespace(
        device=torch.device("cpu"), process_index=0, num_processes=1, is_main_process=True,
        distributed_type=DistributedType.NO,
    )  # fmt: skip
    cfg = GrpoConfig(
        **{"num_generations": 3, "max_completion_length": 6, "rewards": [{"name": "format"}], **config}
    )
    rewards = [
        Reward("length", 1.0, _length_reward, "test"),
        Reward("ones", 0.5, lambda completions, **_: [1.0] * len(completions)),
    ]
    return GRPO(
        cfg, model=model, accelerator=acc, tokenizer=tokenizer, rewards=rewards, output_dir=tmp_path, seed=3
    )


def test_rollouts_are_scored_grouped_and_logged(peft_llm, tmp_path):
    model, tok = peft_llm
    method = _method(model, tok, tmp_path, beta=0.1, log_rollouts=1)
    model.train()
    batches = method.prepare(0, [_prompt_batch(tok, ["What is 1 + 2?", "Hi"], ["a", "b"])], training=True)
    assert model.training  # restored after generation
    assert len(batches) == 3  # one batch per generation, each with both prompts
    for b in batches:
        assert b["input_ids"].shape[0] == 2 and "ref_logps" in b and "prompts" not in b
        # The completion tokens (and only they) are labelled; attention covers prompt and completion.
        n_prompt = _prompt_batch(tok, ["What is 1 + 2?", "Hi"], ["a", "b"])["input_ids"].shape[1]
        assert (b["labels"][:, :n_prompt] == IGNORE_INDEX).all()
        assert ((b["labels"][:, n_prompt:] != IGNORE_INDEX) == b["attention_mask"][:, n_prompt:].bool()).all()
    lines = [json.loads(x) for x in (tmp_path / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["prompt"] == "What is 1 + 2?" and lines[3]["prompt"] == "Hi"
    # The second prompt's length reward is None: its total is 0.5 (ones x 0.5) and its group's advantage 0.
    assert all(
        x["rewards"]["length"] is None and x["reward"] == 0.5 and x["advantage"] == 0 for x in lines[3:]
    )
    first = [len(x["completion"]) / 10 + 0.5 for x in lines[:3]]
    assert [x["reward"] for x in lines[:3]] == pytest.approx(first)
    loss, sums = method.loss_sum(batches[0])
    assert loss.requires_grad and torch.isfinite(loss)
    out = method.summarise(
        loss.item(), dict(zip(method.metric_names, sums.tolist(), strict=True)), 1, eval=False
    )
    # The adapter is random (not zero-initialised), so the policy differs from the adapter-disabled reference.
    assert out["reward/ones"] == 1.0 and out["kl"] > 0
    assert {"reward", "reward_std", "completion_length", "clip_ratio", "generation_tokens_per_sec"} <= set(
        out
    )


def test_reused_rollouts_and_resume_are_exact(peft_llm, tmp_path):
    """With steps_per_generation 2, step 1 reuses step 0's rollouts; a method restored from state_dict after
    step 0 (buffer and sampling RNG) returns the same batches at steps 1 and 2 as the original."""
    model, tok = peft_llm
    batch = _prompt_batch(tok, ["What is 1 + 2?", "Hi"], ["a", "a"])
    method = _method(model, tok, tmp_path, steps_per_generation=2)
    first = method.prepare(0, [dict(batch)], training=True)
    assert "old_logps" in first[0]
    saved = method.state_dict()
    again = method.prepare(1, [dict(batch)], training=True)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert (again[0]["generation"] == 0).all()
    fresh = method.prepare(2, [dict(batch)], training=True)
    # A new generation samples on from where the last left the stream: new completions.
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, fresh, strict=True))
    restored = _method(model, tok, tmp_path, steps_per_generation=2)
    restored.load_state_dict(saved)
    again2 = restored.prepare(1, [dict(batch)], training=True)
    fresh2 = restored.prepare(2, [dict(batch)], training=True)
    assert all(torch.equal(a["old_logps"], b["old_logps"]) for a, b in zip(again, again2, strict=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(fresh, fresh2, strict=True))


def test_the_same_sampling_state_gives_the_same_completions(peft_llm):
    model, tok = peft_llm
    gen = HFGenerator(model, tok, max_new_tokens=5, temperature=1.0, top_p=0.9, synced=False)
    batch = _prompt_batch(tok, ["What is 1 + 2?"], ["a"])
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
    a = gen(prompt, 4, torch.Generator().manual_seed(1))
    b = gen(prompt, 4, torch.Generator().manual_seed(1))
    c = gen(prompt, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.ids.shape[0] == 4 and a.mask.shape == a.ids.shape and len(a.texts) == 4


def test_a_micro_batch_of_bad_rows_generates_but_counts_for_nothing(peft_llm, tmp_path):
    """The collator's stand-in (one padding token, no prompt) still runs generation and forwards (sharded models
    need every rank in them), with weight 0 and a zero loss that backward accepts."""
    model, tok = peft_llm
    method = _method(model, tok, tmp_path, loss="grpo", beta=0.1)
    stand_in = {
        "input_ids": torch.tensor([[tok.pad_token_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
        "labels": torch.tensor([[IGNORE_INDEX]]), "prompts": [], "columns": {},
    }  # fmt: skip
    batches = method.prepare(0, [stand_in], training=True)
    assert len(batches) == 3 and all(method.weight(b) == 0 for b in batches)
    loss, sums = method.loss_sum(batches[0])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert dict(zip(method.metric_names, sums.tolist(), strict=True))["completions"] == 0


def test_evaluation_samples_from_its_own_stream(peft_llm, tmp_path):
    """Eval rollouts are a function of the step and leave training's sampling state as it was."""
    model, tok = peft_llm
    batch = _prompt_batch(tok, ["What is 1 + 2?"], ["a"])
    method = _method(model, tok, tmp_path)
    state = method.rng.get_state()
    a = method.prepare(4, [dict(batch)], training=False)
    method._eval_step = None  # a later evaluation at the same step
    b = method.prepare(4, [dict(batch)], training=False)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert torch.equal(method.rng.get_state(), state)
    assert not (tmp_path / "rollouts").exists()  # evaluation logs no rollouts


def test_build_method_makes_grpo_with_the_recipes_rewards(peft_llm, tiny_recipe, tmp_path):
    from vlmtune.config.load import load_recipe
    from vlmtune.methods import MethodContext, build_method

    model, tok = peft_llm
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1 + 1?", "solution": "2"}\n')
    recipe = load_recipe(
        tiny_recipe(
            method="grpo",
            data={"train": [{"path": str(tmp_path / "prompts.jsonl"), "format": "prompt"}]},
            grpo={"num_generations": 2, "loss": "dr_grpo", "rewards": [{"name": "accuracy", "weight": 2.0}]},
        )
    )
    acc = _method(model, tok, tmp_path).acc
    method = build_method(MethodContext(recipe, acc, model, tok, family=None, output_dir=tmp_path))
    assert isinstance(method, GRPO) and method.spec.loss == "dr_grpo"
    assert [(r.name, r.weight) for r in method.rewards] == [("accuracy", 2.0)]
    assert "reward/accuracy" in method.metric_names
    # A family whose vision inputs have per-token cross-attention masks is refused, not trained wrongly.
    from vlmtune.errors import UserError
    from vlmtune.families import FAMILIES

    with pytest.raises(UserError, match="does not support mllama models yet"):
        build_method(MethodContext(recipe, acc, model, tok, family=FAMILIES["mllama"], output_dir=tmp_path))
