"""method: grpo, group relative policy optimisation with verifiable rewards, on the loop's `Method` seam.

A step: the loop hands `prepare` its micro-batches of prompts (`PromptCollator`: left-padded ids, vision inputs,
the prompts as written and the rows' other columns). For each, the model being trained samples `num_generations`
completions per prompt (`rollout.HFGenerator`), every rank scores its own completions with the rewards, and the
advantages are normalised within each prompt's group. The completions come back as `num_generations` loss
micro-batches of the same prompts (completion g of each prompt), so a VLM's vision inputs are reused as collated,
with no per-family expansion. The loss is the clipped surrogate per completion token, plus beta times the k3
estimate of the KL to the adapter-disabled base (the arithmetic is in `grpo_loss`).

Normalisation (`weight`), so that sum(loss_sum) / sum(weight) over the window and ranks is the loss type's:
- grpo: each completion's mean token loss, averaged over completions (weight: completions);
- dapo: the token losses summed over the window, over the window's completion tokens (weight: tokens);
- dr_grpo: the token losses summed, over completions x max_completion_length (weight: completions).

`steps_per_generation` k > 1: the rollouts generated at step s (from step s's prompts) are optimised in steps
s ... s + k - 1, with importance ratios against the log-probabilities of the policy that generated them; the
prompts the loop draws on the k - 1 reuse steps are not used (the loop's data order is a pure function of the step,
which keeps resume exact), so one epoch of steps trains on 1/k of the prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlmtune.config.schema import GrpoConfig
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.engine.method import Batch
from vlmtune.logging import get_logger
from vlmtune.methods.grpo_loss import LossSpec, group_advantages, loss_weight, reduce_loss, token_losses
from vlmtune.methods.logps import completion_logps, reference_logps
from vlmtune.methods.rollout import HFGenerator, Rollouts

log = get_logger(__name__)

# Entries a completion batch carries for the loss and the metrics, not for the model.
METHOD_KEYS = ("advantages", "rewards", "reward_parts", "old_logps", "ref_logps", "generation", "live")


class GRPO:
    """method: grpo (`engine.method.Method`).

    Args:
        config: The recipe's `grpo:` section.
        model: The prepared (wrapped) model.
        accelerator: The run's accelerator.
        tokenizer: Decodes completions (a VLM's processor's tokenizer).
        rewards: From `methods.rewards.load_rewards`.
        output_dir: The run folder (rollout logs go to its `rollouts/`).
        seed: The run's seed: each rank samples from its own generator seeded from it.
        token_pad: The family's per-token entries and their padding value (`Family.token_pad`).
        generator: The rollout engine (default: `HFGenerator` over `model`).
    """

    def __init__(
        self,
        config: GrpoConfig,
        *,
        model: torch.nn.Module,
        accelerator: Any,
        tokenizer: Any,
        rewards: list,
        output_dir: Path,
        seed: int,
        token_pad: Mapping[str, int] | None = None,
        generator: Any = None,
    ) -> None:
        from vlmtune.engine.generate import gathers_whole_model, synced_gpus
        from vlmtune.engine.loop import weights_dtype

        self.config, self.model, self.acc, self.rewards = config, model, accelerator, rewards
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.token_pad = (
            dict(token_pad) if token_pad is not None else {"token_type_ids": 0, "mm_token_type_ids": 0}
        )
        self.spec = LossSpec(
            loss=config.loss,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high if config.epsilon_high is not None else config.epsilon,
            beta=config.beta,
            max_completion_length=config.max_completion_length,
        )
        self.dtype = weights_dtype(model)
        gather = gathers_whole_model(accelerator, config.gather_for_generation)
        self.generate = generator or HFGenerator(
            model,
            tokenizer,
            max_new_tokens=config.max_completion_length,
            temperature=config.temperature,
            top_p=config.top_p,
            synced=synced_gpus(accelerator),
            gather=gather,
        )
        if gather:
            log.info("grpo: rollouts generated with the whole model gathered on each process (ZeRO-3)")
        elif synced_gpus(accelerator):
            log.info("grpo: rollouts generated with the layers gathered one by one, every process in step")
        self.names = [r.name for r in rewards]
        self.metric_names = (
            "completions", "reward", "reward_sq",
            *(f"reward/{n}" for n in self.names), *(f"reward/{n}/count" for n in self.names),
            "kl", "completion_tokens", "clipped_tokens", "generation_tokens", "generation_seconds",
        )  # fmt: skip
        device = accelerator.device
        self.rng = torch.Generator(device=device).manual_seed(seed * 100_003 + accelerator.process_index)
        # The rollouts of the last generation and the first step that no longer reuses them.
        self.buffer: list[Batch] | None = None
        self.buffer_records: list[dict] = []  # what `log_rollouts` writes about them
        self.buffer_until = 0

    # --- prepare: rollouts, rewards, advantages, reference --------------------------------------------------

    def prepare(self, step: int, micro_batches: list[Batch], *, training: bool) -> list[Batch]:
        if training and self.buffer is not None and step < self.buffer_until:
            # A reuse step: the same rollouts, no generation time or tokens counted again.
            out = [{**b, "generation": torch.zeros_like(b["generation"])} for b in self.buffer]
            records = self.buffer_records
        else:
            rng = self.rng if training else self._eval_rng(step)
            out, records = [], []
            for mb in micro_batches:
                batches, rows = self._rollout(mb, rng, old=training and self.config.steps_per_generation > 1)
                out += batches
                records += rows
            if training and self.config.steps_per_generation > 1:
                self.buffer, self.buffer_records = out, records
                k = self.config.steps_per_generation  # the sampler's windows of k steps share these prompts
                self.buffer_until = (step // k + 1) * k
        every = self.config.log_rollouts
        if training and every and (step + 1) % every == 0:
            self._log_rollouts(step + 1, records)
        return out

    def _eval_rng(self, step: int) -> torch.Generator:
        """Evaluation samples from its own stream, a function of the step: training's stream is untouched."""
        if getattr(self, "_eval_step", None) != step:
            seed = (self.seed * 100_003 + self.acc.process_index) * 1_000_003 + step
            self._eval_gen = torch.Generator(device=self.acc.device).manual_seed(seed)
            self._eval_step = step
        return self._eval_gen

    def _rollout(self, mb: Batch, rng: torch.Generator, *, old: bool) -> tuple[list[Batch], list[dict]]:
        """Generate, score and normalise one micro-batch of prompts; one completion batch per generation."""
        mb = dict(mb)
        prompts = list(mb.pop("prompts"))
        columns = mb.pop("columns", {}) or {}
        mb.pop("bad_rows", None)
        prompt = {k: v.to(self.acc.device) for k, v in mb.items() if k != "labels"}
        n = self.config.num_generations
        # Every rank generates and runs its forwards (sharded models gather parameters in them), also for a
        # micro-batch whose prompts were all bad rows: the collator's one padding row, which trains nothing.
        empty = not prompts
        rollouts = self.generate(prompt, n, rng)
        if empty:
            rows = rollouts.ids.shape[0]
            total = torch.zeros(rows)
            parts = {name: torch.full((rows,), float("nan")) for name in self.names}
            prompts = [None]
        else:
            total, parts = self._score(prompts, rollouts, columns, n)
        advantages = group_advantages(total, n, scale=self.config.scale_rewards)
        part_matrix = torch.stack([parts[name] for name in self.names], dim=1)
        batches = []
        width = prompt["input_ids"].shape[1]
        rows_of_prompts = torch.arange(len(prompts)) * n
        for g in range(n):
            rows = rows_of_prompts + g
            batch = _completion_batch(prompt, rollouts.ids[rows], rollouts.mask[rows], width, self.token_pad)
            batch["advantages"] = advantages[rows].to(self.acc.device)
            batch["rewards"] = total[rows].to(self.acc.device)
            batch["reward_parts"] = part_matrix[rows].to(self.acc.device)
            # 0: the stand-in row of an all-bad micro-batch; its forward runs, its loss and metrics count for 0.
            batch["live"] = torch.full((len(rows),), float(not empty), device=self.acc.device)
            # Generation time and tokens, counted once (on the first batch) for the whole micro-batch.
            stats = [rollouts.tokens, rollouts.seconds] if g == 0 else [0.0, 0.0]
            batch["generation"] = torch.tensor(stats, dtype=torch.float64, device=self.acc.device)
            if self.spec.beta != 0.0:
                batch["ref_logps"] = reference_logps(
                    self.model, batch, self.dtype, exclude=METHOD_KEYS, temperature=self.config.temperature
                )[0]
            if old:
                with torch.no_grad():
                    batch["old_logps"] = completion_logps(
                        self.model,
                        batch,
                        self.dtype,
                        exclude=METHOD_KEYS,
                        temperature=self.config.temperature,
                    )[0]
            batches.append(batch)
        records = (
            []
            if empty
            else [
                {
                    "prompt": prompts[i // n],
                    "completion": rollouts.texts[i],
                    "rewards": {name: _number(parts[name][i]) for name in self.names},
                    "reward": _number(total[i]),
                    "advantage": _number(advantages[i]),
                }
                for i in range(len(rollouts.texts))
            ]
        )
        return batches, records

    def _score(
        self, prompts: list, rollouts: Rollouts, columns: dict[str, list], n: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from vlmtune.methods.rewards import score

        repeated = [p for p in prompts for _ in range(n)]
        # TRL's form: a message prompt gets its completion as one assistant message.
        completions = [
            [{"role": "assistant", "content": text}] if isinstance(p, list) else text
            for p, text in zip(repeated, rollouts.texts, strict=True)
        ]
        cols = {k: [v for v in values for _ in range(n)] for k, values in columns.items()}
        return score(self.rewards, repeated, completions, cols)

    def _log_rollouts(self, step: int, records: list[dict]) -> None:
        """Rank 0 gathers every rank's rollouts and writes them to rollouts/step-N.jsonl (a collective)."""
        from accelerate.utils import gather_object

        if self.acc.num_processes > 1:
            records = gather_object(records)
        if not self.acc.is_main_process:
            return
        folder = self.output_dir / "rollouts"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"step-{step}.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps({"step": step, **record}, ensure_ascii=False) + "\n")

    # --- the loss -----------------------------------------------------------------------------------------

    def weight(self, batch: Batch) -> int:
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX) & batch["live"].bool()[:, None]
        return loss_weight(mask, self.spec.loss)

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logps, mask = completion_logps(
            self.model, batch, self.dtype, exclude=METHOD_KEYS, temperature=self.config.temperature
        )
        # Masked by multiplication: a stand-in batch still has a loss with a graph (0), so backward runs.
        mask = mask & batch["live"].bool()[:, None]
        old = batch.get("old_logps")
        per_token, kl, active = token_losses(
            logps,
            logps.detach() if old is None else old,
            batch.get("ref_logps"),
            batch["advantages"],
            self.spec,
        )
        loss = reduce_loss(per_token, mask, self.spec)
        live = batch["live"].double()
        rewards, parts = batch["rewards"].double() * live, batch["reward_parts"].double()
        dev = loss.device
        sums = torch.cat([
            (mask.sum(-1) > 0).sum().double()[None],
            rewards.sum()[None].to(dev), (rewards**2).sum()[None].to(dev),
            parts.nansum(0).to(dev), (~parts.isnan()).sum(0).double().to(dev),
            ((kl.detach() * mask).sum() if kl is not None else torch.zeros((), device=dev)).double()[None],
            mask.sum().double()[None], (active & mask).sum().double()[None],
            batch["generation"].double().to(dev),
        ])  # fmt: skip
        return loss, sums

    def summarise(
        self, loss: float, sums: dict[str, float], weight: float, *, eval: bool
    ) -> dict[str, float]:
        n, tokens = max(sums["completions"], 1.0), max(sums["completion_tokens"], 1.0)
        mean = sums["reward"] / n
        var = (sums["reward_sq"] - n * mean**2) / (n - 1) if n > 1 else 0.0
        out = {"reward": mean, "reward_std": math.sqrt(max(var, 0.0))}
        for name in self.names:
            count = sums[f"reward/{name}/count"]
            out[f"reward/{name}"] = sums[f"reward/{name}"] / count if count else float("nan")
        if self.spec.beta != 0.0:
            out["kl"] = sums["kl"] / tokens
        out["completion_length"] = sums["completion_tokens"] / n
        out["clip_ratio"] = sums["clipped_tokens"] / tokens
        if sums["generation_seconds"] > 0:
            # Seconds are summed over ranks that generate at the same time: their mean is the wall time.
            wall = sums["generation_seconds"] / self.acc.num_processes
            out["generation_tokens_per_sec"] = sums["generation_tokens"] / wall
        return out

    # --- exact resume -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        buffer = None
        if self.buffer is not None:
            buffer = [{k: v.detach().cpu() for k, v in b.items()} for b in self.buffer]
        return {
            "rng": self.rng.get_state(),
            "buffer": buffer,
            "buffer_records": self.buffer_records if buffer is not None else [],
            "buffer_until": self.buffer_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        buffer = state.get("buffer")
        self.buffer = [{k: v.to(self.acc.device) for k, v in b.items()} for b in buffer] if buffer else None
        self.buffer_records = list(state.get("buffer_records", []))
        self.buffer_until = int(state.get("buffer_until", 0))


def _completion_batch(
    prompt: Batch, ids: torch.Tensor, mask: torch.Tensor, width: int, token_pad: Mapping[str, int]
) -> Batch:
    """Prompt + completion rows: labels on the completion's tokens only, attention ends at the completion's end.

    A family's other per-token entries (`token_pad`: token type ids) are extended over the completion with the
    value padding takes, which is that of text after the prompt.
    """
    length = int(mask.sum(1).max()) if mask.numel() else 0
    ids, mask = (
        ids[:, :length].to(prompt["input_ids"].device),
        mask[:, :length].to(prompt["input_ids"].device),
    )
    batch: Batch = {}
    rows = prompt["input_ids"].shape[0]
    for key, value in prompt.items():
        if key == "input_ids":
            batch[key] = torch.cat([value, ids], dim=1)
        elif key == "attention_mask":
            batch[key] = torch.cat([value, mask.to(value.dtype)], dim=1)
        elif key in token_pad:
            batch[key] = torch.cat([value, value.new_full((rows, length), token_pad[key])], dim=1)
        else:
            batch[key] = value
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, width:] = ids.masked_fill(~mask, IGNORE_INDEX)
    batch["labels"] = labels
    return batch


def _number(value: torch.Tensor) -> float | None:
    x = float(value)
    return None if math.isnan(x) else x
