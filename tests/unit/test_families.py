"""The family registry against real (tiny) models of every family: names, parts, image tokens, LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlmtune.errors import UserError
from vlmtune.families import FAMILIES, find_family, get_family, set_image_size
from vlmtune.model.parts import lm_lora_targets, part_of
from vlmtune.testing.tiny_vlm import TINY_FAMILIES, build_tiny_vlm, main

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

REPLY = "A red square."
# Tokens of `family.image_tokens` in a prompt with one 32x32 image, at the tiny models' sizes.
IMAGE_TOKENS = {
    "qwen2_vl": 6,  # <|vision_start|>, 4 x <|image_pad|> (upscaled to min_pixels = 56x56), <|vision_end|>
    "qwen2_5_vl": 6,
    "qwen3_vl": 6,  # 64x64 at patch 16
    "llava": 16,
    "llava_next": 36,  # 16 base + 16 anyres + 4 row newlines
    "llava_onevision": 36,
    "idefics3": 7,  # <fake_token_around_image>, <global-img>, 4 x <image>, <fake_token_around_image>
    "smolvlm": 7,
    "paligemma": 16,
    "gemma3": 6,  # <start_of_image>, 4 x <image_soft_token>, <end_of_image>
    "mllama": 1,  # the image enters through cross-attention
    "internvl": 6,  # <img>, 4 x <IMG_CONTEXT>, </img>
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_vlm_root: Path):
    """(family, directory, processor, model) of one family, built once per session and loaded once here."""
    family = get_family(request.param)
    path = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = family.load_class().from_pretrained(path, local_files_only=True)
    return family, path, processor, model


def _batch(family, processor) -> dict:
    """One user turn with an image and a question, one assistant reply; labels only on the reply."""
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": REPLY}]}
    if family.suffix_labels:
        # PaliGemma's processor moves text around, which misplaces the template's assistant mask; its own
        # prefix/suffix API builds the labels (and token_type_ids 1 on the suffix, so it stays causal).
        prompt = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        batch = processor(text=[prompt], images=[[image]], suffix=[REPLY], return_tensors="pt")
        return dict(batch)
    batch = dict(
        processor.apply_chat_template(
            [user, reply],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
        )
    )
    mask = torch.as_tensor(batch.pop("assistant_masks")).bool()
    batch["labels"] = torch.where(mask, batch["input_ids"], -100)
    return batch


def _trained_text(processor, batch: dict) -> str:
    ids = batch["input_ids"][0]
    return processor.tokenizer.decode(ids[batch["labels"][0] != -100])


def test_every_registered_family_has_a_tiny_model() -> None:
    assert set(TINY_FAMILIES) == set(FAMILIES)


def test_reloads_offline_and_is_detected(tiny) -> None:
    family, path, processor, model = tiny
    assert (path / "model.safetensors").is_file()
    assert find_family(model.config) is family
    assert find_family(transformers.AutoConfig.from_pretrained(path, local_files_only=True)) is family
    assert "{%- generation %}" in processor.chat_template
    assert family.image_placeholder in processor.chat_template
    assert len(family.image_token_ids(processor)) == len(family.image_tokens)
    assert max(processor.tokenizer.get_vocab().values()) < model.config.get_text_config().vocab_size


def test_every_parameter_belongs_to_one_part(tiny) -> None:
    family, _, _, model = tiny
    parts = {name: part_of(name, family) for name, _ in model.named_parameters()}
    assert set(parts.values()) == {"vision", "projector", "language"}
    assert all(part == "language" for name, part in parts.items() if ".embed_tokens." in name)
    assert all(
        part == "vision" for name, part in parts.items() if ".patch_embed" in name or "embeddings." in name
    )


def test_chat_template_trains_only_the_reply_and_the_forward_is_finite(tiny) -> None:
    family, _, processor, model = tiny
    batch = _batch(family, processor)
    assert _trained_text(processor, batch) == REPLY + processor.tokenizer.eos_token
    ids = set(family.image_token_ids(processor))
    n_image = sum(int(t) in ids for t in batch["input_ids"][0])
    assert n_image == IMAGE_TOKENS[family.name]
    assert not any(int(t) in ids for t in batch["input_ids"][0][batch["labels"][0] != -100])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


def test_processor_quirks_match_the_registry(tiny) -> None:
    family, _, processor, _ = tiny
    image = Image.new("RGB", (32, 32))
    texts = [family.image_placeholder + "a", family.image_placeholder * 2 + "b"]
    nested = processor(text=texts, images=[[image], [image, image]], padding=True, return_tensors="pt")
    assert "pixel_values" in nested
    try:
        processor(text=texts, images=[image, image, image], padding=True, return_tensors="pt")
        flat_refused = False
    except ValueError:
        flat_refused = True
    assert flat_refused == family.nested_images
    try:
        processor(text=["no image here"], return_tensors="pt")
        text_only_refused = False
    except ValueError:
        text_only_refused = True
    assert text_only_refused == family.needs_images
    assert ("token_type_ids" in nested) == (family.token_type_ids is not None)


def test_lora_on_all_linear_adapts_only_the_language_model_and_learns(tiny) -> None:
    family, path, processor, _ = tiny
    model = family.load_class().from_pretrained(path, local_files_only=True)
    head = model.get_output_embeddings()
    lm_linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and part_of(name, family) == "language"
    }
    targets = lm_lora_targets(model, family)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert {part_of(n, family) for n in adapted} == {"language"}
    assert {n.removeprefix("base_model.model.") for n in adapted} == lm_linears

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}

    batch = _batch(family, processor)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_build_is_cached_and_has_a_cli(tiny_vlm_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = build_tiny_vlm("llava", tiny_vlm_root / "llava")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    main(["llava", str(path)])
    assert capsys.readouterr().out.strip() == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no tiny builder"):
        build_tiny_vlm("gpt2", tiny_vlm_root / "gpt2")


def test_unknown_family_is_a_user_error_and_a_text_model_has_none() -> None:
    with pytest.raises(UserError, match=r"unknown model family 'qwen9'; supported: qwen2_vl, .*internvl"):
        get_family("qwen9")
    assert find_family(transformers.LlamaConfig()) is None
    assert find_family({"model_type": "llama"}) is None
    assert find_family({"model_type": "qwen2_5_vl"}) is FAMILIES["qwen2_5_vl"]


def test_part_of_sees_through_wrappers_and_refuses_strangers() -> None:
    qwen = FAMILIES["qwen2_vl"]
    assert part_of("base_model.model.model.visual.merger.mlp.0.weight", qwen) == "projector"
    assert part_of("module.model.visual.blocks.0.attn.qkv.weight", qwen) == "vision"
    assert part_of("model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight", qwen) == "language"
    assert part_of("lm_head.weight", qwen) == "language"
    with pytest.raises(ValueError, match="none of the qwen2_vl parts"):
        part_of("model.visualizer.weight", qwen)


def test_image_size_keys(tiny_vlm_root: Path) -> None:
    qwen = FAMILIES["qwen2_vl"]
    processor = transformers.AutoProcessor.from_pretrained(
        build_tiny_vlm("qwen2_vl", tiny_vlm_root / "qwen2_vl")
    )
    image = Image.new("RGB", (112, 112))
    prompt = qwen.image_placeholder

    def grid() -> list[int]:
        return processor(text=[prompt], images=[[image]], return_tensors="pt")["image_grid_thw"][0].tolist()

    assert grid() == [1, 8, 8]
    set_image_size(processor, qwen, min_pixels=None, max_pixels=56 * 56)
    assert grid() == [1, 4, 4]
    with pytest.raises(UserError, match="longest_edge: not an image-size setting of qwen2_vl"):
        set_image_size(processor, qwen, longest_edge=64)
    with pytest.raises(UserError, match="vision config fixes the size"):
        set_image_size(processor, FAMILIES["llava"], max_pixels=64)
    with pytest.raises(UserError, match="has no <img>, <IMG_CONTEXT>, </img> token"):
        FAMILIES["internvl"].image_token_ids(processor)
