"""Sample answers at evaluation (`train.eval_samples`): what the model says, as it trains, to the first eval prompts.

A prompt is an eval example cut before its last trained run of tokens (its last assistant turn), vision inputs
included, so the model answers the question the example trains it on; the cut-off answer is the reference.
Greedy decoding, one prompt at a time (no left padding to get right). Every rank generates the same prompts:
under ZeRO-3 and FSDP2 each forward gathers parameters from every rank, so all must take part (`synced_gpus`
keeps the ranks stepping together until the last one finishes). Rank 0 writes `<output_dir>/samples.jsonl` and
the TensorBoard / wandb text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.engine.generate import generating_module, generation_mode, synced_gpus
from vlmtune.engine.vision_sync import generating

# Batch entries that are not model inputs (as in the loop's forward).
_NOT_INPUTS = ("labels", "length", "n_tokens", "bad_rows")
# Trackers that take text (others log scalars only, and some warn at a string).
_TEXT_TRACKERS = ("tensorboard", "wandb")


@dataclass
class SamplePrompt:
    """One eval example cut before its last answer: the collated prompt and the texts written beside it."""

    batch: dict[str, torch.Tensor]
    prompt: str
    reference: str


def cut_before_last_answer(
    example: dict[str, Any], per_token: set[str]
) -> tuple[dict[str, Any], int, int] | None:
    """The example's prompt row (every per-token entry cut before its last trained run), and that run's bounds.

    None for a row with nothing trained, or one left out as bad (`bad_row`).
    """
    if "bad_row" in example:
        return None
    trained = [label != IGNORE_INDEX for label in example["labels"]]
    if not any(trained):
        return None
    end = len(trained) - trained[::-1].index(True)
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    row = {k: v[:start] if k in per_token else v for k, v in example.items()}
    return row, start, end


class SampleWriter:
    """Generates and records the answers to the first `count` eval prompts (`train.eval_samples`)."""

    def __init__(
        self, accelerator, data, collator, tokenizer, path: Path, *, count: int, max_new_tokens: int
    ) -> None:
        self.acc, self.tokenizer, self.path = accelerator, tokenizer, path
        self.max_new_tokens = max_new_tokens
        # Per-token entries: the tokens and labels, a family's token types, cross-attention masks (by sequence).
        vision = getattr(collator, "vision", {})
        per_token = {"input_ids", "labels", "attention_mask", *getattr(collator, "token_pad", {})}
        per_token |= {k for k, how in vision.items() if how == "sequence"}
        self.prompts: list[SamplePrompt] = []
        for i in range(len(data)):
            if len(self.prompts) == count:
                break
            example = data[i]
            cut = cut_before_last_answer(example, per_token)
            if cut is None:
                continue
            row, start, end = cut
            ids = example["input_ids"]
            self.prompts.append(
                SamplePrompt(collator([row]), self._text(ids[:start]), self._text(ids[start:end]))
            )

    def _text(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def rewind(self, step: int) -> None:
        """Forget samples after `step`: a resumed run writes them again."""
        if not self.acc.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step(line) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    @torch.no_grad()
    def write(self, model: torch.nn.Module, step: int, dtype: torch.dtype | None) -> list[dict]:
        """Generate every prompt's answer (a collective under sharding: every rank calls it) and record them."""
        acc = self.acc
        inner = generating_module(model)
        synced = synced_gpus(acc)
        pad = self.tokenizer.pad_token_id
        records = []
        with generation_mode(model), acc.autocast():
            for p in self.prompts:
                inputs = {
                    k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).to(acc.device)
                    for k, v in p.batch.items()
                    if k not in _NOT_INPUTS
                }
                with generating(inner, images=any(k.startswith("pixel_values") for k in inputs)):
                    out = inner.generate(
                        **inputs,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        use_cache=True,  # training turned it off in the model's config (see model/load.py)
                        synced_gpus=synced,
                        pad_token_id=pad,
                    )
                completion = self._text(out[0, inputs["input_ids"].shape[1] :].tolist())
                records.append(
                    {"step": step, "prompt": p.prompt, "completion": completion, "reference": p.reference}
                )
        if acc.is_main_process:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            text = "\n\n".join(
                f"**prompt** {r['prompt']}\n\n**completion** {r['completion']}\n\n**reference** {r['reference']}"
                for r in records
            )
            for tracker in acc.trackers:
                if tracker.name in _TEXT_TRACKERS:
                    tracker.log({"eval_samples": text}, step=step)
        return records


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a line cut by a crash mid-write: dropped
