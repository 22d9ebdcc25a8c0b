"""`vlmtune generate` / `chat`: the same tokens as plain transformers + PEFT greedy decoding, turn after turn."""

from __future__ import annotations

import io

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlmtune.checkpoint.merge import merge
from vlmtune.checkpoint.source import resolve_source
from vlmtune.cli import main
from vlmtune.infer import Generator, Sampling, chat, generate

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 12
GREEDY = Sampling(max_new_tokens=NEW)


def _peft_greedy(model, inputs) -> list[int]:
    """Plain transformers greedy decoding, the reference."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def text_generator(text_run) -> Generator:
    return Generator(resolve_source(text_run), device="cpu")


def test_text_generate_equals_plain_peft(text_generator, text_run, tiny_model_dir, tmp_path, capsys):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the island?"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(text_run / "adapter")
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, text_run / "adapter").eval()
    expected = _peft_greedy(reference, inputs)
    with reference.disable_adapter():  # the adapter changes what is generated
        assert _peft_greedy(reference, inputs) != expected

    assert text_generator.generate_ids(messages, [], GREEDY) == expected
    answer = generate(text_generator, "Where is the island?", system="Be brief.", sampling=GREEDY)
    assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()

    # The CLI prints only the answer; a merged folder answers the same.
    args = [
        "--prompt",
        "Where is the island?",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        str(NEW),
        "--device",
        "cpu",
    ]
    assert main(["generate", str(text_run), *args]) == 0
    assert capsys.readouterr().out == answer + "\n"
    merged = merge(resolve_source(text_run), tmp_path / "merged", dtype="float32").out
    assert Generator(resolve_source(merged), device="cpu").generate_ids(messages, [], GREEDY) == expected


def test_sampling_follows_the_seed(text_generator):
    messages = [text_generator.user_message("Hello")]
    hot = Sampling(max_new_tokens=NEW, temperature=5.0, seed=3)
    first = text_generator.generate_ids(messages, [], hot)
    assert text_generator.generate_ids(messages, [], hot) == first
    assert first != text_generator.generate_ids(messages, [], GREEDY)


def test_vlm_generate_with_an_image_equals_plain_peft(vlm_run, tiny_vlm_root, image_file):
    adapter = vlm_run("llava") / "adapter"
    processor = AutoProcessor.from_pretrained(adapter)
    image = Image.open(image_file).convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}
    ]
    # transformers' own path from messages to model inputs, independent of vlmtune's.
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_root / "llava", dtype=torch.float32)
    expected = _peft_greedy(PeftModel.from_pretrained(base, adapter).eval(), inputs)

    generator = Generator(resolve_source(adapter), device="cpu")
    assert (
        generate(generator, "What?", images=[image_file], sampling=GREEDY)
        == processor.decode(expected, skip_special_tokens=True).strip()
    )
    no_image = generator.generate_ids([generator.user_message("What?")], [], GREEDY)
    assert no_image != expected  # the image reaches the model


def test_chat_keeps_the_conversation_and_its_images(vlm_run, image_file, tmp_path):
    generator = Generator(resolve_source(vlm_run("qwen2_5_vl")), device="cpu")
    lines = [
        f"/image {tmp_path / 'missing.png'}",  # reported; the conversation goes on
        f"/image {image_file}",
        "What is this?",
        "/colour",
        "And its colour?",
        "/reset",
        "What is this?",
        "/exit",
        "never read",
    ]
    out, err = io.StringIO(), io.StringIO()
    assert (
        chat(generator, io.StringIO("\n".join(lines) + "\n"), out, err, system="Answer.", sampling=GREEDY)
        == 0
    )

    image = generator.open_image(image_file)
    system = generator.system_message("Answer.")
    turn1 = [system, generator.user_message("What is this?", images=1)]
    answer1 = generator.reply(turn1, [image], GREEDY)
    turn2 = [*turn1, {"role": "assistant", "content": [{"type": "text", "text": answer1}]}]
    answer2 = generator.reply([*turn2, generator.user_message("And its colour?")], [image], GREEDY)
    answer3 = generator.reply([system, generator.user_message("What is this?")], [], GREEDY)
    assert out.getvalue() == f"{answer1}\n{answer2}\n{answer3}\n"
    assert answer3 != answer1  # after /reset the image is gone
    notices = err.getvalue()
    assert "missing.png: file not found" in notices and "(image attached" in notices
    assert "unknown command /colour" in notices and "(new conversation)" in notices


def test_text_chat_refuses_images_and_goes_on(text_generator, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    chat(text_generator, io.StringIO(f"/image {tmp_path}/x.png\nHi\n"), out, err, sampling=GREEDY)
    assert "text-only model; it takes no images" in err.getvalue()
    assert out.getvalue() == text_generator.reply([text_generator.user_message("Hi")], [], GREEDY) + "\n"


def test_generate_errors_before_loading_the_model(text_run, vlm_run, tmp_path, capsys):
    cases = [
        (
            ["generate", str(text_run), "--prompt", "x", "--image", "a.png"],
            "text-only model; it takes no images",
        ),
        (
            ["generate", str(vlm_run("llava")), "--prompt", "x", "--image", str(tmp_path / "no.png")],
            "file not found",
        ),
        (["generate", str(text_run), "--prompt", "x", "--temperature", "-1"], "--temperature: -1.0"),
        (["chat", str(tmp_path / "nothing")], "not found; give a run folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
