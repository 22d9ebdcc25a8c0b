"""Builders shared by the data tests: a tiny real tokenizer, conversations and data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|bos|>"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = [
    *("system", "user", "assistant", "you", "are", "terse", "helpful", "what", "is", "two", "three", "four"),
    *("six", "plus", "and", "of", "course", "the", "weather", "in", "reply", "number", "tell", "me", "about"),
    *("héllo", "wörld", "日本語"),
]


def build_tokenizer(
    chat_template: str | None = CHATML, *, trim_offsets: bool = False, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few hundred synthetic lines, with ChatML special tokens.

    Args:
        chat_template: The Jinja chat template; None leaves the tokenizer without one.
        trim_offsets: Whether offsets exclude whitespace, which gives whitespace tokens empty spans.
        add_bos: Prepend `<|bos|>` when encoding with special tokens, as Llama-style tokenizers do.
    """
    lines = [
        " ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(12)) + f" {i}.\n{i * 13}, ok?"
        for i in range(300)
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer)
    if add_bos:
        bos = ("<|bos|>", backend.token_to_id("<|bos|>"))
        backend.post_processor = processors.Sequence(
            [backend.post_processor, processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|bos|>" if add_bos else None,
        chat_template=chat_template,
    )


def chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Messages alternating user, assistant, ... from `turns`, after an optional system message."""
    head = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return head + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def row(i: int) -> dict[str, Any]:
    """A valid `messages` row whose reply names `i`, so tests can tell rows apart."""
    return {"messages": chat(f"tell me number {i}", f"number {i}, of course")}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write one JSON value per line (strings are written verbatim, to plant broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trained_runs(tokenizer: PreTrainedTokenizerFast, ids: list[int], trained: list[bool]) -> list[str]:
    """Decode each maximal run of trained tokens: what the model is taught to say."""
    runs: list[list[int]] = []
    previous = False
    for token, is_trained in zip(ids, trained, strict=True):
        if is_trained and not previous:
            runs.append([])
        if is_trained:
            runs[-1].append(token)
        previous = is_trained
    return [tokenizer.decode(run) for run in runs]
