"""A tiny random-init Llama chat model with its own tokenizer, built offline in about a second.

Tests and the CPU demo need a causal LM that loads through the ordinary `from_pretrained` path, has a chat
template, and costs nothing to train. Nothing here touches the Hugging Face Hub.

The tokenizer is a byte-level BPE (~512 tokens) trained on a built-in synthetic corpus plus the text of the demo
data set (`data/demo/`, when this is a source checkout), so the demo chats tokenise into short sequences. The
model is a 2-layer Llama (hidden 64) whose vocabulary is the tokenizer's length rounded up to a multiple of 8.

Builds are cached: `out_dir` holds a marker file, written last, that records the parameters and a hash of the
tokenizer corpus; a later call with the same ones returns at once. Same seed, same files.

    python -m vlmtune.testing.tiny OUT_DIR [--seed 0] [--hidden-size 64] [--num-layers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = get_logger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)

# ChatML. `{% generation %}` marks what the assistant says (its content and <|im_end|>), so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` works on this tokenizer.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_VOCAB_SIZE = 512
NUM_ATTENTION_HEADS = 4
NUM_KEY_VALUE_HEADS = 2
MAX_POSITION_EMBEDDINGS = 2048
MARKER = "vlmtune_tiny.json"
# Bump when the build changes in a way the parameters do not show, so stale caches are rebuilt.
BUILD_VERSION = 1

_DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"
_WORD_LIST = (
    "the a an of to in on at for with from by and or but not is are was were be been has have had do does did "
    "what which who where when why how this that these those it its they them their we you your i me my he she "
    "model data train training eval loss step batch token tokens learning rate adapter lora layer weight chat "
    "question answer assistant user system hello thanks please yes no good small large fast slow new old first "
    "last one two three four five six seven eight nine ten hundred thousand year day time city island nation "
    "capital river mountain sea festival currency language people country world name famous national"
)
_WORDS = tuple(_WORD_LIST.split())


def _synthetic_lines(n: int = 400, seed: int = 1234) -> Iterator[str]:
    """Plain English-ish sentences, numbers and punctuation, so common merges exist beyond the demo text."""
    rng = random.Random(seed)
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if i % 5 == 0:
            line += f" {rng.randint(0, 99999)} {rng.random():.3f}"
        yield line


def _demo_lines(demo_dir: Path = _DEMO_DIR) -> list[str]:
    """Every message text in the demo data set; empty outside a source checkout."""
    lines: list[str] = []
    for name in ("train.jsonl", "eval.jsonl"):
        path = demo_dir / name
        if path.is_file():
            for row in path.read_text(encoding="utf-8").splitlines():
                if row.strip():
                    lines += [m["content"] for m in json.loads(row)["messages"]]
    questions = demo_dir / "questions.txt"
    if questions.is_file():
        lines += [q for q in questions.read_text(encoding="utf-8").splitlines() if q.strip()]
    return lines


def tokenizer_corpus() -> list[str]:
    """The lines the tiny tokenizer is trained on (synthetic text, then the demo data)."""
    return [*_synthetic_lines(), *_demo_lines()]


def _build_params(seed: int, hidden_size: int, num_layers: int, corpus: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(corpus).encode("utf-8")).hexdigest()
    return {
        "kind": "tiny_llm",
        "build_version": BUILD_VERSION,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "corpus_sha256": digest,
        # A new library version may serialise differently; rebuilding is cheaper than debugging that.
        # Read from package metadata, so that a cache hit imports neither torch nor transformers.
        "versions": {
            name: importlib.metadata.version(name) for name in ("torch", "transformers", "tokenizers")
        },
    }


def _is_complete(out_dir: Path, params: dict[str, Any]) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded.get("params") == params and all(
        (out_dir / f).is_file() for f in recorded.get("files", [])
    )


def build_tiny_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it as a `PreTrainedTokenizerFast` with the ChatML template.

    Args:
        corpus: Training lines; defaults to `tokenizer_corpus()`.

    Returns:
        The tokenizer (eos `<|im_end|>`, pad `<|pad|>`, no bos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which assistant-token masks rely on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )


def _write_build(out_dir: Path, *, seed: int, hidden_size: int, num_layers: int, corpus: list[str]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = build_tiny_tokenizer(corpus)
    vocab_size = -(-len(tokenizer) // 8) * 8
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KEY_VALUE_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        initializer_range=0.1,  # larger than the default so a frozen lm_head leaves LoRA room to lower the loss
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: building a model must not shift the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    # The one-shard progress bar is noise in test logs; restore the caller's setting afterwards.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    # Some files are written through private temporary files (mode 0600); a shared cache must be readable.
    for path in out_dir.iterdir():
        path.chmod(0o644)


def build_tiny_llm(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write a random-init tiny Llama chat model (safetensors) and its tokenizer to `out_dir`.

    Reuses `out_dir` as is when it already holds a complete build with the same parameters and corpus.
    A build is assembled in a temporary sibling directory and moved in file by file with the marker last,
    so a reader (or a concurrent builder) never takes a half-written directory for a finished one.

    Args:
        out_dir: Directory to write (created if missing).
        seed: Seed of the weight initialisation; equal seeds give byte-identical weights.
        hidden_size: Model width; must divide by the 4 attention heads. The MLP is twice as wide.
        num_layers: Number of decoder layers.

    Returns:
        `out_dir` as a `Path`, ready for `AutoModelForCausalLM.from_pretrained` and
        `AutoTokenizer.from_pretrained`.
    """
    if hidden_size <= 0 or hidden_size % (2 * NUM_ATTENTION_HEADS):
        raise ValueError(
            f"hidden_size must be a positive multiple of {2 * NUM_ATTENTION_HEADS}, got {hidden_size}"
        )
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    out_dir = Path(out_dir)
    corpus = tokenizer_corpus()
    params = _build_params(seed, hidden_size, num_layers, corpus)
    if _is_complete(out_dir, params):
        logger.debug("tiny model cache hit: %s", out_dir)
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_build(tmp, seed=seed, hidden_size=hidden_size, num_layers=num_layers, corpus=corpus)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"params": params, "files": files}, indent=2) + "\n", "utf-8")
        out_dir.mkdir(exist_ok=True)
        # A stale marker goes first, so an interrupted replacement is never mistaken for a complete build.
        (out_dir / MARKER).unlink(missing_ok=True)
        for name in [*files, MARKER]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model in %s", out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlmtune.testing.tiny", description="Build the tiny random-init Llama chat model."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build_tiny_llm(
        args.out_dir, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers
    )
    print(path)


if __name__ == "__main__":
    main()
