"""The tiny model builder: reloadable offline, consistent vocab and chat template, cached, deterministic."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vlmtune.testing import build_tiny_llm
from vlmtune.testing.tiny import CHAT_TEMPLATE, MARKER

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Talvessa?"},
    {"role": "assistant", "content": "Port Orlin."},
    {"role": "user", "content": "And its currency?"},
    {"role": "assistant", "content": "The ketter."},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)


def _snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.iterdir())}


def test_reloads_with_auto_classes_and_runs(tiny_dir: Path, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    config = model.config
    assert (tiny_dir / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.max_position_embeddings == 2048
    assert not config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32

    ids = tokenizer("What is the capital of Talvessa?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_vocab_fits_the_tokenizer(tiny_dir: Path, tokenizer) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir, local_files_only=True)
    assert 400 <= len(tokenizer) <= config.vocab_size < len(tokenizer) + 8
    assert config.vocab_size % 8 == 0
    assert tokenizer.eos_token == "<|im_end|>" and config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|pad|>" and config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert max(ids) < config.vocab_size
    # Byte-level: any text round-trips, and the demo vocabulary is learned (few tokens per word).
    text = "Ünïcödé 😀 Port Orlin"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(" Talvessa")["input_ids"]) == 1


def test_chat_template_renders_chatml(tokenizer) -> None:
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of Talvessa?<|im_end|>\n"
        "<|im_start|>assistant\nPort Orlin.<|im_end|>\n"
        "<|im_start|>user\nAnd its currency?<|im_end|>\n"
        "<|im_start|>assistant\nThe ketter.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    # No default system prompt is injected.
    assert prompt == "<|im_start|>user\nWhat is the capital of Talvessa?<|im_end|>\n<|im_start|>assistant\n"
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(special)["input_ids"]) == 1

    out = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(kept) == "Port Orlin.<|im_end|>The ketter.<|im_end|>"


def test_second_call_is_a_cache_hit(tiny_dir: Path) -> None:
    before = _snapshot(tiny_dir)
    start = time.perf_counter()
    assert build_tiny_llm(tiny_dir, seed=0) == tiny_dir
    assert time.perf_counter() - start < 0.5
    assert _snapshot(tiny_dir) == before


def test_changed_parameters_or_missing_marker_rebuild(tmp_path: Path) -> None:
    out = build_tiny_llm(tmp_path / "m", seed=0, num_layers=1)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    build_tiny_llm(out, seed=0, num_layers=2)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / MARKER).read_text())["params"]["num_layers"] == 2

    # A build whose marker is missing counts as interrupted and is redone.
    (out / MARKER).unlink()
    (out / "model.safetensors").write_bytes(b"truncated")
    build_tiny_llm(out, seed=0, num_layers=2)
    assert (out / MARKER).is_file() and (out / "model.safetensors").stat().st_size > 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temporary build directories must be removed"


def test_same_seed_gives_identical_weights(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    same = build_tiny_llm(tmp_path / "same", seed=0)
    assert torch.equal(torch.rand(1), expected_next), "the build must not consume the caller's RNG"
    other = build_tiny_llm(tmp_path / "other", seed=1)

    weights = (tiny_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (same / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("kwargs", [{"hidden_size": 60}, {"hidden_size": 0}, {"num_layers": 0}])
def test_rejects_bad_sizes(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        build_tiny_llm(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
