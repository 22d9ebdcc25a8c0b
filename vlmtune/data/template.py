"""Chat-template rendering and the label mask: which tokens of a conversation are trained.

The mask comes from characters, not tokens. Rendering the conversation cut just before each assistant turn
(with the generation prompt) and just after it gives that reply's character span in the full render, because a
well-behaved template renders each turn the same way whatever follows. The full text is then tokenised once, and
a token is trained when its characters overlap a reply's span. Tokenising once keeps BPE merges at turn
boundaries exactly as the model will see them, and every assistant turn of a multi-turn chat is trained, end-of-turn
token included.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import TemplateError

from vlmtune.data.bad_rows import BadRow
from vlmtune.data.formats import Message
from vlmtune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlmtune.families import Family

_FIX = (
    "Set model.chat_template in the recipe to a Jinja template (or a path to a .jinja file) that renders every "
    "turn the same way whatever follows it."
)


class ChatTemplateError(UserError):
    """The tokenizer's chat template cannot be used to build label masks."""


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer the pipeline cannot use, before any data is read.

    Raises:
        UserError: no chat template, or a slow tokenizer (offsets need a fast one).
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer {name!r} has no chat template, so conversations cannot be rendered; "
            "set model.chat_template in the recipe to a Jinja template or a path to a .jinja file"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the tokenizer {name!r} is a slow (Python) tokenizer; the label mask needs the character offsets "
            "only a fast tokenizer gives. Use a model that ships tokenizer.json"
        )


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through the tokenizer's chat template.

    Raises:
        BadRow: the template refused the conversation (e.g. one that does not accept a system message).
    """
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise BadRow("template_error", f"the chat template rejected the conversation: {exc}") from None
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text"
        )
    return text


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    trained_from: int = 0,
    add_generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and find each assistant reply's character span in the result.

    A span starts after the generation prompt and ends after the reply's end-of-turn marker; whitespace the
    template puts after that marker (ChatML's newline) is left out, since generation stops at the marker.

    Args:
        tokenizer: A tokenizer or processor with a chat template.
        messages: The conversation.
        trained_from: Replies before this message are prompt (a preference pair's earlier turns): no span.
        add_generation_prompt: Render the generation prompt after the last message (a prompt row).

    Returns:
        The full text and the `[start, end)` spans, one per assistant message from `trained_from` on.

    Raises:
        ChatTemplateError: the template is not prefix-stable, so the spans cannot be located.
        BadRow: the template refused the conversation.
    """
    full = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        for prefix, cut in (
            (before, f"messages[:{i}] with the generation prompt"),
            (through, f"messages[:{i + 1}]"),
        ):
            if not full.startswith(prefix):
                raise ChatTemplateError(_not_prefix_stable(full, prefix, cut))
        start, end = len(before), len(through)
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return full, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    train_on_prompt: bool = False,
    trained_from: int = 0,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Tokenise a conversation and mark the tokens to train.

    Args:
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        messages: Checked messages (see `formats.check_conversation`).
        train_on_prompt: Train every token, prompts included.
        trained_from: Replies before this message are not trained (see `assistant_spans`).
        add_generation_prompt: End with the generation prompt (a prompt row, which trains nothing).

    Returns:
        The token ids and, per token, whether it is trained.

    Raises:
        ChatTemplateError: the template is not prefix-stable.
        BadRow: the template refused the conversation.
    """
    text, spans = assistant_spans(
        tokenizer, messages, trained_from=trained_from, add_generation_prompt=add_generation_prompt
    )
    # The template already wrote any BOS/EOS into the text; add_special_tokens would add them twice.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if train_on_prompt:
        return ids, [True] * len(ids)
    return ids, overlaps(encoding["offset_mapping"], spans).tolist()


def overlaps(offsets: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token, whether its `[start, end)` characters overlap any span (vectorised: rows can be long)."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    hit = np.zeros(len(bounds), dtype=bool)
    for lo, hi in spans:
        # Tokenizers that trim offsets give whitespace tokens an empty span (p, p) just after the whitespace;
        # this test puts those in a reply when lo < p < hi, which is where that whitespace is.
        hit |= (starts < hi) & (ends > lo)
    return hit


def _not_prefix_stable(full: str, prefix: str, cut: str) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(full, prefix, strict=False)) if a != b), min(len(full), len(prefix))
    )
    return (
        f"the chat template is not prefix-stable: rendering {cut} is not a prefix of rendering the whole "
        f"conversation (they differ at character {at}: {prefix[max(0, at - 30) : at + 30]!r} vs "
        f"{full[max(0, at - 30) : at + 30]!r}), so the assistant turns cannot be located for the label mask. "
        f"Templates that rewrite earlier turns (for example dropping past reasoning) do this. {_FIX}"
    )


def move_spans(
    spans: list[tuple[int, int]], text: str, replacements: list[dict], family: Family, tokenizer: Any
) -> list[tuple[int, int]]:
    """Move `[start, end)` spans of the rendered text onto the text the processor tokenised."""
    bos = tokenizer.bos_token or ""
    inserted_at, inserted = len(text) + 1, 0
    if family.text_layout == "bos_after_last_image" and family.image_placeholder in text:
        inserted_at = text.rfind(family.image_placeholder) + len(family.image_placeholder)
        inserted = len(bos)
    elif family.text_layout == "bos_if_missing" and not text.startswith(bos):
        inserted_at, inserted = 0, len(bos)

    ends = [r["span"][1] for r in replacements]
    gained = [0]
    for r in replacements:
        gained.append(gained[-1] + (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))

    def move(char: int) -> int:
        char += inserted if char >= inserted_at else 0
        return char + gained[bisect.bisect_right(ends, char)]

    return [(move(start), move(end)) for start, end in spans]


def check_spans(
    text: str,
    spans: list[tuple[int, int]],
    moved: list[tuple[int, int]],
    ids: np.ndarray,
    offsets: np.ndarray,
    tokenizer: Any,
) -> None:
    """Each moved span, read back from the tokens, must be the reply it came from: else it was misplaced.

    The tokens overlapping a moved span are decoded, and the span's characters are cut from that text by the
    first token's offset; a span moved by even one character reads back differently.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    for (start, end), (lo, hi) in zip(spans, moved, strict=True):
        covered = np.flatnonzero((starts < hi) & (ends > lo))
        decoded = tokenizer.decode(ids[covered].tolist(), clean_up_tokenization_spaces=False)
        skip = lo - int(starts[covered[0]]) if len(covered) else 0
        read_back = decoded[skip : skip + (hi - lo)]
        if read_back.strip() != text[start:end].strip():
            raise ChatTemplateError(
                f"the assistant reply {text[start:end]!r} reads back from the processor's tokens as "
                f"{read_back!r}: the processor rewrote the text in a way vlmtune.data.encode does not know, "
                "so the label mask cannot be placed; set the family's text_layout in vlmtune.families"
            )
