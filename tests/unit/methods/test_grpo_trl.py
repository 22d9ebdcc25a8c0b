"""The GRPO loss for fixed completions and rewards equals TRL's `GRPOTrainer` computation (its own code)."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from vlmtune.config.schema import GrpoConfig
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.methods.grpo import GRPO
from vlmtune.methods.grpo_loss import group_advantages

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def trl_trainer_factory(tiny_model_dir, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = Dataset.from_list([{"prompt": "What is 1 + 2?"}] * 4)

    def make(**args):
        # A fresh model each time: TRL patches its head with the trainer's temperature, once.
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        config = trl.GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, num_generations=2,
            report_to="none", use_cpu=True, bf16=False, logging_steps=1, **args,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
            train_dataset=data, processing_class=tok,
        )  # fmt: skip
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        return trainer

    return make


@pytest.mark.parametrize(
    "loss,beta,epsilon_high,temperature",
    [
        ("grpo", 0.0, None, 1.0),
        ("dapo", 0.04, 0.28, 0.7),
        ("dr_grpo", 0.1, None, 1.0),
        ("grpo", 0.1, 0.3, 0.9),
    ],
)
def test_loss_equals_trl_grpo_trainer(trl_trainer_factory, loss, beta, epsilon_high, temperature):
    max_len = 6
    trainer = trl_trainer_factory(
        loss_type=loss, beta=beta, epsilon=0.2, epsilon_high=epsilon_high, temperature=temperature,
        max_completion_length=max_len, scale_rewards="group",
        # TRL 1.16 multiplies the KL by the importance ratio by default; vlmtune's is the plain k3 estimate (the
        # GRPO paper's, and TRL's before 1.16).
        use_bias_correction_kl=False,
    )  # fmt: skip
    model = trainer.model
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    # 4 completions (2 prompts x 2 generations), left-padded prompts, right-padded completions.
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :1] = 0
    completion_ids = torch.randint(3, vocab, (4, max_len), generator=g)
    completion_mask = torch.ones(4, max_len, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[2, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.9])
    advantages = group_advantages(rewards, 2, scale=True)
    # Fixed generation-time and reference log-probabilities, close to the model's (ratios near the clip edges).
    old = -torch.rand(4, max_len, generator=g) * 3
    ref = -torch.rand(4, max_len, generator=g) * 3

    trl_inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
    }  # fmt: skip
    if beta:
        trl_inputs["ref_per_token_logps"] = ref
    want = trainer._compute_loss(model, trl_inputs)

    acc = SimpleNamespace(
        device=torch.device("cpu"), process_index=0, num_processes=1, is_main_process=True,
        distributed_type=DistributedType.NO,
    )  # fmt: skip
    cfg = GrpoConfig(
        num_generations=2, max_completion_length=max_len, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        loss=loss, temperature=temperature, rewards=[{"name": "format"}],
    )  # fmt: skip
    method = GRPO(cfg, model=model, accelerator=acc, tokenizer=trainer.processing_class, rewards=[], output_dir=".",
                  seed=0, generator=object())  # fmt: skip
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 5:] = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    # Ours are aligned with the whole row: column t scores token t + 1, so the completion starts at column 4.
    pad = torch.zeros(4, 4)
    batch = {
        "input_ids": input_ids, "attention_mask": torch.cat([prompt_mask, completion_mask], 1), "labels": labels,
        "advantages": advantages, "rewards": rewards, "reward_parts": torch.zeros(4, 0),
        "generation": torch.zeros(2, dtype=torch.float64), "live": torch.ones(4), "old_logps": torch.cat([pad, old], 1),
    }  # fmt: skip
    if beta:
        batch["ref_logps"] = torch.cat([pad, ref], 1)
    loss_sum, _ = method.loss_sum(batch)
    ours = loss_sum / method.weight(batch)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert ours.item() != 0.0
