"""The label mask: exactly the assistant replies (and their end-of-turn tokens) are trained."""

from __future__ import annotations

import pytest

from tests.unit.data.helpers import CHATML, build_tokenizer, chat, trained_runs
from vlmtune.data.bad_rows import BadRow
from vlmtune.data.template import ChatTemplateError, check_tokenizer, tokenize_conversation
from vlmtune.errors import UserError

TWO_TURNS = chat(
    "What is two plus two?", "Four.", "And three plus three?", "Six, of course.", system="You are terse."
)


def test_trains_each_assistant_reply_with_its_end_token_and_nothing_else(tokenizer):
    ids, trained = tokenize_conversation(tokenizer, TWO_TURNS)

    assert trained_runs(tokenizer, ids, trained) == ["Four.<|im_end|>", "Six, of course.<|im_end|>"]
    # The ids are the whole rendered conversation, tokenised once, with no special tokens added on top.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)


def test_bos_written_by_the_template_is_not_added_again():
    tokenizer = build_tokenizer("{{ bos_token }}" + CHATML, add_bos=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("hi")["input_ids"][0] == bos  # encoding with special tokens would add one

    ids, trained = tokenize_conversation(tokenizer, TWO_TURNS)

    assert ids.count(bos) == 1 and ids[0] == bos
    assert trained_runs(tokenizer, ids, trained) == ["Four.<|im_end|>", "Six, of course.<|im_end|>"]


def test_train_on_prompt_trains_every_token(tokenizer):
    ids, trained = tokenize_conversation(tokenizer, TWO_TURNS, train_on_prompt=True)

    assert len(trained) == len(ids) > 0
    assert all(trained)


def test_non_ascii_replies_split_inside_characters_are_masked_exactly(tokenizer):
    # Byte-level BPE splits 'é' and CJK characters across tokens, whose character offsets then overlap.
    messages = chat("héllo", "héllo wörld 日本語  x\n\n y")

    ids, trained = tokenize_conversation(tokenizer, messages)

    assert trained_runs(tokenizer, ids, trained) == ["héllo wörld 日本語  x\n\n y<|im_end|>"]


def test_whitespace_tokens_with_trimmed_empty_offsets_are_placed_by_position():
    tokenizer = build_tokenizer(trim_offsets=True)
    messages = chat("a  b", "  two  spaces  \n\n  end")

    ids, trained = tokenize_conversation(tokenizer, messages)

    assert trained_runs(tokenizer, ids, trained) == ["  two  spaces  \n\n  end<|im_end|>"]


def test_template_injecting_a_default_system_prompt_still_masks_only_replies():
    # Like Qwen2.5: a system prompt appears in the render although the messages have none.
    qwen_like = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        + CHATML
    )
    tokenizer = build_tokenizer(qwen_like)

    ids, trained = tokenize_conversation(tokenizer, chat("hi", "hello", "and?", "bye"))

    assert "You are helpful." in tokenizer.decode(ids)
    assert trained_runs(tokenizer, ids, trained) == ["hello<|im_end|>", "bye<|im_end|>"]


def test_template_that_is_not_prefix_stable_is_refused_with_a_fix():
    # Renders the final turn differently from earlier ones, as templates that drop past reasoning do.
    unstable = CHATML.replace("{{ m['content'] }}", "{% if loop.last %}[final] {% endif %}{{ m['content'] }}")
    tokenizer = build_tokenizer(unstable)

    with pytest.raises(ChatTemplateError, match=r"not prefix-stable.*model\.chat_template"):
        tokenize_conversation(tokenizer, chat("hi", "hello"))


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(UserError, match=r"no chat template.*model\.chat_template"):
        check_tokenizer(build_tokenizer(chat_template=None))


def test_template_that_rejects_a_conversation_is_a_bad_row():
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tokenizer = build_tokenizer(no_system + CHATML)

    with pytest.raises(BadRow, match="System role not supported") as caught:
        tokenize_conversation(tokenizer, chat("hi", "hello", system="be brief"))
    assert caught.value.kind == "template_error"
