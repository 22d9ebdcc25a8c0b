import math
from types import SimpleNamespace

import pytest
import torch

from vlmtune.config.schema import DpoConfig
from vlmtune.data.encode import IGNORE_INDEX as IGNORE
from vlmtune.methods.dpo import Dpo, preference_loss

CPU = torch.device("cpu")


def _nls(x: float) -> float:
    """-log(sigmoid(x)), written out."""
    return math.log1p(math.exp(-x))


# Two pairs: chosen rows first. Policy and reference summed log-probabilities and completion lengths.
LOGPS = torch.tensor([-2.0, -4.0, -5.0, -6.0])
REF = torch.tensor([-3.0, -3.0, -3.0, -7.0])
LENGTHS = torch.tensor([2, 4, 5, 3])


@pytest.mark.parametrize(
    "config, expected",
    [
        # log-ratios: chosen [1, -1], rejected [-2, 1]; margins [3, -2].
        (DpoConfig(beta=0.1), [_nls(0.3), _nls(-0.2)]),
        (
            DpoConfig(beta=0.5, label_smoothing=0.2),
            [0.8 * _nls(1.5) + 0.2 * _nls(-1.5), 0.8 * _nls(-1.0) + 0.2 * _nls(1.0)],
        ),
        # Log-ratios averaged over completion tokens, against the target 1 / (2 beta) = 5.
        (DpoConfig(beta=0.1, loss="ipo"), [(1 / 2 + 2 / 5 - 5) ** 2, (-1 / 4 - 1 / 3 - 5) ** 2]),
        # No reference: averaged log-probabilities, minus gamma / beta = 2.
        (
            DpoConfig(beta=0.25, loss="simpo", gamma=0.5),
            [_nls(0.25 * (-2 / 2 + 5 / 5 - 2)), _nls(0.25 * (-4 / 4 + 6 / 3 - 2))],
        ),
    ],
    ids=["sigmoid", "smoothed", "ipo", "simpo"],
)
def test_losses_match_their_formulas(config, expected):
    ref = None if config.loss == "simpo" else REF
    losses, chosen, rejected = preference_loss(config, LOGPS.clone().requires_grad_(), LENGTHS, ref)
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    if config.loss == "simpo":
        torch.testing.assert_close(chosen, config.beta * torch.tensor([-1.0, -1.0]))
        torch.testing.assert_close(rejected, config.beta * torch.tensor([-1.0, -2.0]))
    else:  # beta times the log-ratios
        torch.testing.assert_close(chosen, config.beta * torch.tensor([1.0, -1.0]))
        torch.testing.assert_close(rejected, config.beta * torch.tensor([-2.0, 1.0]))


def test_reference_losses_need_the_reference():
    with pytest.raises(ValueError, match="ref_logps"):
        preference_loss(DpoConfig(), LOGPS, LENGTHS, None)


def test_a_row_without_completion_tokens_scores_zero_not_nan():
    losses, _, _ = preference_loss(
        DpoConfig(loss="ipo"), torch.zeros(2), torch.tensor([0, 3]), torch.zeros(2)
    )
    assert torch.isfinite(losses).all()


@pytest.fixture(scope="module")
def peft_llm(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _move_adapter(model, seed: int = 0) -> None:
    """LoRA B starts at zero (policy = reference): move it so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _pair_batch():
    """PairCollator's layout for 2 pairs: chosen rows 0-1, rejected rows 2-3, prompts and padding ignored."""
    ids = torch.tensor(
        [[5, 9, 14, 20, 7, 3], [8, 11, 4, 6, 2, 2], [5, 9, 14, 21, 8, 0], [8, 11, 4, 12, 0, 0]]
    )
    mask = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    completion = torch.zeros_like(ids)
    completion[0, 3:], completion[1, 2:], completion[2, 3:5], completion[3, 2:4] = 1, 1, 1, 1
    labels = ids.masked_fill(completion == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pairs": torch.tensor(2)}, completion


def _sequence_logps(model, batch) -> torch.Tensor:
    """Summed log-probabilities of each row's labelled tokens, one token at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = torch.zeros(len(logits), dtype=torch.float64)
    for b, row in enumerate(batch["labels"]):
        for t in range(1, len(row)):
            if row[t] != IGNORE:
                out[b] += torch.log_softmax(logits[b, t - 1].double(), -1)[row[t]]
    return out


def test_an_untrained_adapter_scores_log2_per_pair_and_no_accuracy(peft_llm):
    _move_adapter(peft_llm)
    with torch.no_grad():
        for name, p in peft_llm.named_parameters():
            if "lora_B" in name:
                p.zero_()
    method = Dpo(DpoConfig(beta=0.1), peft_llm, CPU)
    batch = method.prepare(0, [_pair_batch()[0]], training=True)[0]
    loss, sums = method.loss_sum(batch)
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(2)))
    # Policy = reference: every reward is 0, and a tie is not a preferred chosen.
    assert sums.tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_method_scores_chosen_and_rejected_against_the_adapter_disabled_reference(peft_llm, loss_type):
    _move_adapter(peft_llm)
    config = DpoConfig(beta=0.1, loss=loss_type, label_smoothing=0.1 if loss_type != "ipo" else 0.0)
    method = Dpo(config, peft_llm, CPU)
    host, completion = _pair_batch()
    (batch,) = method.prepare(3, [host], training=False)
    assert method.weight(batch) == 2
    policy = _sequence_logps(peft_llm, host)
    if loss_type == "simpo":
        assert "ref_logps" not in batch  # reference-free: no adapter-off pass
        ref = None
    else:
        with peft_llm.disable_adapter():
            ref = _sequence_logps(peft_llm, host)
        torch.testing.assert_close(batch["ref_logps"].double(), ref, rtol=1e-5, atol=1e-5)
        assert not batch["ref_logps"].requires_grad
        assert (policy - ref).abs().max() > 1e-2  # the adapter is back on for the policy

    loss, sums = method.loss_sum(batch)
    lengths = completion[:, 1:].sum(-1)
    expected, chosen, rejected = preference_loss(config, policy, lengths, ref)
    torch.testing.assert_close(loss.double(), expected.sum(), rtol=1e-5, atol=1e-5)
    margin = chosen - rejected
    wanted = [chosen.sum(), rejected.sum(), margin.sum(), (margin > 0).sum()]
    torch.testing.assert_close(sums.double(), torch.stack(wanted).double(), rtol=1e-5, atol=1e-5)

    # The gradient reaches the adapter only.
    peft_llm.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in peft_llm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    peft_llm.zero_grad()


def test_a_placeholder_pair_of_bad_rows_counts_for_nothing(peft_llm):
    """PairCollator's batch when every pair was a bad row: one pair of padding tokens, `pairs` 0."""
    _move_adapter(peft_llm)
    pad = torch.tensor([[0], [0]])
    host = {"input_ids": pad, "attention_mask": torch.ones_like(pad), "labels": torch.full_like(pad, IGNORE)}
    method = Dpo(DpoConfig(), peft_llm, CPU)
    (batch,) = method.prepare(0, [{**host, "pairs": torch.tensor(0)}], training=True)
    loss, sums = method.loss_sum(batch)
    assert method.weight(batch) == 0 and loss.item() == 0.0 and sums.abs().sum() == 0
    peft_llm.zero_grad()
    loss.backward()  # still in the graph: every rank runs the same backward (DDP, ZeRO-3), with zero gradients
    grads = [p.grad for n, p in peft_llm.named_parameters() if "lora_" in n]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)


def test_simpo_needs_no_adapter_and_no_model_call():
    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]))
    method = Dpo(DpoConfig(loss="simpo"), model, CPU)
    host, _ = _pair_batch()
    assert method.prepare(0, [host], training=True) == [host]


def test_reference_pass_needs_an_adapter(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(TypeError, match="adapter"):
        Dpo(DpoConfig(), model, CPU).prepare(0, [_pair_batch()[0]], training=True)


def test_summaries_are_means_over_pairs():
    method = Dpo(DpoConfig(), torch.nn.Linear(1, 1), CPU)
    sums = {"rewards/chosen": 3.0, "rewards/rejected": -1.0, "rewards/margin": 4.0, "rewards/accuracy": 3.0}
    assert method.summarise(0.5, sums, 4.0, eval=True) == {
        "rewards/chosen": 0.75,
        "rewards/rejected": -0.25,
        "rewards/margin": 1.0,
        "rewards/accuracy": 0.75,
    }
    assert method.state_dict() == {}


# --- agreement with TRL ---------------------------------------------------------------------------------------


def _trl_dpo(tiny_model_dir, loss_type: str):
    """TRL's DPOTrainer with a fresh LoRA adapter (reference: the adapter disabled, as here), moved off zero."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TrlDpoConfig
    from trl import DPOTrainer

    args = TrlDpoConfig(
        output_dir=str(tiny_model_dir.parent / f"trl-{loss_type}"),
        beta=0.1,
        loss_type=[loss_type],
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}]),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    _move_adapter(trainer.model, seed=1)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_trl_dpo_trainer(tiny_model_dir, loss_type):
    pytest.importorskip("trl")
    trainer = _trl_dpo(tiny_model_dir, loss_type)
    batch, completion = _pair_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trl_loss = trainer._compute_loss(trainer.model, {**inputs, "completion_mask": completion}, False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    method = Dpo(DpoConfig(beta=0.1, loss=loss_type), trainer.model, CPU)
    (prepared,) = method.prepare(0, [batch], training=True)
    loss, sums = method.loss_sum(prepared)
    pairs = method.weight(prepared)
    assert abs(loss.item() / pairs - trl_loss.item()) < 1e-5
    named = dict(zip(method.metric_names, sums.tolist(), strict=True))
    ours = method.summarise(loss.item() / pairs, named, pairs, eval=False)
    for key, trl_key in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
    ]:
        assert abs(ours[key] - trl_metrics[trl_key]) < 1e-5, key


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_equals_trl_simpo(tiny_model_dir, label_smoothing):
    """TRL 1.16 has SimPO in its CPO trainer (reference-free, length-averaged): its loss code on our logits."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    trainer = _trl_dpo(tiny_model_dir, "sigmoid")
    model = trainer.model
    batch, _ = _pair_batch()
    config = DpoConfig(beta=2.0, loss="simpo", gamma=0.5, label_smoothing=label_smoothing)
    method = Dpo(config, model, CPU)
    loss, sums = method.loss_sum(method.prepare(0, [batch], training=True)[0])

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    averaged = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    cpo = SimpleNamespace(
        alpha=0.0,
        beta=config.beta,
        simpo_gamma=config.gamma,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        accelerator=SimpleNamespace(device=CPU),
    )
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(cpo, *averaged.chunk(2))
    assert abs(loss.item() / 2 - trl_losses.mean().item()) < 1e-5
    torch.testing.assert_close(
        sums[:2], torch.stack([trl_chosen.sum(), trl_rejected.sum()]), atol=1e-5, rtol=0
    )


def test_build_method_gives_dpo_with_the_recipe_section(tmp_path):
    from vlmtune.config.schema import Recipe
    from vlmtune.methods import MethodContext, build_method

    recipe = Recipe.model_validate(
        {
            "method": "dpo",
            "dpo": {"beta": 0.3, "loss": "ipo"},
            "model": {"path": "org/model"},
            "data": {"train": [{"path": "pairs.jsonl", "format": "preference"}]},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    accelerator = SimpleNamespace(device=CPU)
    method = build_method(MethodContext(recipe, accelerator, torch.nn.Linear(1, 1), None, None, tmp_path))
    assert isinstance(method, Dpo) and method.config.beta == 0.3 and method.config.loss == "ipo"
    default = build_method(
        MethodContext(
            recipe.model_copy(update={"dpo": None}), accelerator, torch.nn.Linear(1, 1), None, None, tmp_path
        )
    )
    assert default.config == DpoConfig()
