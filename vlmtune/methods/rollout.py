"""The rollout seam of GRPO: sample completions for a batch of prompts with the model being trained.

One class, `HFGenerator`, behind one call: prompts in (a left-padded collated batch, vision inputs too), sampled
completions out (`Rollouts`). It uses Hugging Face `generate` on the model as it trains (adapter on, `eval()`
mode so dropout is off and the KV cache is used), then puts the model back in the mode it found it in. A faster
engine (vLLM) would be a second class with the same call; none ships until a test can run it.

Sampling draws from a `torch.Generator` the caller owns (one per rank), never from the global RNG: its state goes
into checkpoints, so a resumed run samples the same completions as the uninterrupted one, and dropout's stream
is not shifted by how many tokens were sampled.

Sharded models: `engine.generate` (shared with the eval samples) says when ranks must step together and gathers
what FSDP2's root would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig

from vlmtune.engine.generate import generating_module, generation_mode, whole_model_gathered
from vlmtune.engine.vision_sync import generating, installed

Batch = dict[str, torch.Tensor]

# Collated entries that are not inputs of `generate`.
_NOT_GENERATE_INPUTS = ("labels", "length", "n_tokens", "bad_rows")


@dataclass
class Rollouts:
    """Completions of one batch of prompts, `n` per prompt, prompt-major (row `b * n + g`)."""

    ids: torch.Tensor  # (B * n, C) sampled token ids, pad after the end
    mask: (
        torch.Tensor
    )  # (B * n, C) bool: the completion's tokens, up to and including its end-of-sequence token
    texts: list[str]  # decoded completions (special tokens dropped)
    seconds: float  # wall time of the generation

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def completion_mask(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True on each row's tokens up to and including its first end-of-sequence token (all, if it has none)."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    # Tokens strictly after the first EOS have at least one EOS before them.
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return before == 0


@contextmanager
def sampling_rng(generator: torch.Generator) -> Iterator[None]:
    """Run the block with the default RNG of `generator`'s device set to `generator`'s state, then store the
    advanced state back in `generator` and restore the default RNG (`generate` samples from the default RNG)."""
    device = generator.device
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state())


class HFGenerator:
    """Samples completions with Hugging Face `generate`.

    Args:
        model: The model being trained, as `accelerator.prepare` returned it (DDP / DeepSpeed / FSDP or bare).
        tokenizer: Decodes the completions; its pad and EOS ids complete the generation config.
        max_new_tokens: The longest completion.
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        synced: Keep every rank stepping until all ranks are done (ZeRO-3, FSDP2 with several processes).
        eos_ids: Tokens that end a completion (default: the model's generation config's and the tokenizer's).
        gather: Gather the whole (ZeRO-3) model once per call instead of layer by layer at every token; ranks
            then generate on their own (`synced` is not needed).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        synced: bool,
        eos_ids: list[int] | None = None,
        gather: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.gather = gather
        self.synced = synced and not gather
        inner = generating_module(model)
        if eos_ids is None:
            eos_ids = _eos_ids(inner, tokenizer)
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        # Built from scratch, so nothing of the model's own generation config (top_k, repetition penalty, a
        # different temperature) changes the policy that GRPO's log-probabilities assume.
        self.config = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    @torch.no_grad()
    def __call__(self, prompts: Batch, n: int, generator: torch.Generator) -> Rollouts:
        """`n` completions of each prompt of the left-padded batch `prompts` (tensors on the model's device).

        Text batches are expanded in one call (`num_return_sequences`); a batch with vision inputs is sampled `n`
        times as it is, since expanding a family's vision inputs row by row is family knowledge `generate` does
        not have for every family. So are text batches where processes mix image and text prompts, so that every
        process makes the same calls (`engine.vision_sync.generating`).
        """
        inputs = {k: v for k, v in prompts.items() if k not in _NOT_GENERATE_INPUTS}
        prompt_len = inputs["input_ids"].shape[1]
        images = any(k.startswith("pixel_values") for k in inputs)
        inner = generating_module(self.model)
        start = time.perf_counter()
        with (
            generation_mode(self.model),
            whole_model_gathered(self.model, self.gather),
            sampling_rng(generator),
        ):
            # Processes whose prompts mix images and text (a vision keep-alive is installed) must make the
            # same generate calls: all of them sample one completion per call.
            if not images and installed(inner) is None:
                config = GenerationConfig(**{**self.config.to_diff_dict(), "num_return_sequences": n})
                out = inner.generate(**inputs, generation_config=config, synced_gpus=self.synced)
                ids = out[:, prompt_len:]
            else:
                parts = []
                for _ in range(n):
                    with generating(inner, images=images):
                        out = inner.generate(**inputs, generation_config=self.config, synced_gpus=self.synced)
                    parts.append(out[:, prompt_len:])
                width = max(p.shape[1] for p in parts)
                parts = [nn.functional.pad(p, (0, width - p.shape[1]), value=self.pad_id) for p in parts]
                ids = torch.stack(parts, dim=1).flatten(0, 1)  # (B, n, C) → prompt-major rows
        seconds = time.perf_counter() - start
        mask = completion_mask(ids, self.eos_ids)
        # Columns past every row's end (a synced rank kept stepping, or all stopped early) carry nothing.
        width = int(mask.sum(1).max()) if ids.numel() else 0
        ids, mask = ids[:, :width], mask[:, :width]
        ids = ids.masked_fill(~mask, self.pad_id)
        texts = self.tokenizer.batch_decode([row[m].tolist() for row, m in zip(ids, mask, strict=True)],
                                            skip_special_tokens=True)  # fmt: skip
        return Rollouts(ids=ids, mask=mask, texts=texts, seconds=seconds)


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in value if isinstance(value, list | tuple) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError(
            "neither the model's generation config nor the tokenizer names an end-of-sequence token"
        )
    return ids
