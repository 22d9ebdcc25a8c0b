"""What every contender of the CPU benchmark shares: the model, the data and the batch recorder.

The parent process builds these once; each contender's child process reads them back. Nothing here is timed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np

IM_START, IM_END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"
ROLES = ("user", "assistant", "system")
# ChatML with `{% generation %}` around the reply, like vlmtune.testing.tiny; the whitespace-split tokenizer
# drops the newlines, so a conversation is exactly: 2 header tokens + prompt words + <|im_end|> per turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = (PAD, UNK, IM_START, IM_END)
TOKENS_PER_TURN_PAIR = 6  # <|im_start|> user ... <|im_end|> <|im_start|> assistant ... <|im_end|>


def word(i: int) -> str:
    return f"w{i}"


def build_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer over `vocab_size` tokens: one word = one token, so lengths are exact.

    A real-ish vocabulary size matters for speed (the LM head and the loss scale with it); a BPE trained on
    synthetic text could not reach 32k distinct tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_words = vocab_size - len(SPECIALS) - len(ROLES)
    vocab = {t: i for i, t in enumerate([*SPECIALS, *ROLES, *(word(i) for i in range(n_words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_model(out: Path, *, vocab_size: int, hidden: int, layers: int, seed: int = 0) -> str:
    """Write a random-init Llama-style model (safetensors) + tokenizer to `out`; returns the weights' sha256."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return weights_sha256(out)


def weights_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def alpaca_like_lengths(n: int, seed: int, lo: int = 16, hi: int = 512) -> list[int]:
    """Conversation lengths in tokens, log-normal like Alpaca's under a Llama tokenizer (median ~150)."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(150), sigma=0.7, size=n)
    return np.clip(np.round(raw), lo, hi).astype(int).tolist()


def make_rows(n: int, *, vocab_size: int, seed: int) -> list[dict]:
    """`n` single-turn chats in vlmtune's `messages` format with Alpaca-like lengths (prompt ~35%)."""
    rng = random.Random(seed)
    n_words = vocab_size - len(SPECIALS) - len(ROLES)
    rows = []
    for length in alpaca_like_lengths(n, seed):
        body = length - TOKENS_PER_TURN_PAIR
        prompt = max(1, min(body - 1, round(body * rng.uniform(0.2, 0.5))))
        # Zipf-ish word choice, so frequent tokens dominate as in real text.
        words = [word(min(n_words - 1, int(rng.paretovariate(1.1)) - 1)) for _ in range(body)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(words[:prompt])},
                    {"role": "assistant", "content": " ".join(words[prompt:])},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class BatchRecorder:
    """Wraps a collator: hashes the real (non-pad) token ids and trained-label mask of every batch, in order.

    Two contenders that train on the same ids, labels and order print the same digest, whatever their padding.
    The token counts feed tokens/s; `limit` stops hashing batches a data loader prefetches past the last step.
    """

    def __init__(self, collator, limit: int | None = None) -> None:
        self.collator = collator
        self.limit = limit
        self.sha = hashlib.sha256()
        self.batches = 0
        self.tokens: list[int] = []  # real tokens per batch
        self.trained: list[int] = []  # labelled tokens per batch

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.limit is None or self.batches < self.limit:
            self.record(batch)
        return batch

    def record(self, batch) -> None:
        import torch

        ids, labels = batch["input_ids"], batch["labels"]
        keep = (
            batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=bool)
        )
        real, trained = ids[keep].to(torch.int64), (labels[keep] != -100).to(torch.uint8)
        self.sha.update(real.numpy().tobytes())
        self.sha.update(trained.numpy().tobytes())
        self.batches += 1
        self.tokens.append(int(real.numel()))
        self.trained.append(int(trained.sum()))

    def summary(self) -> dict:
        return {
            "tokens_sha256": self.sha.hexdigest()[:16],
            "batches": self.batches,
            "tokens": self.tokens,
            "trained": self.trained,
        }
