"""`vlmtune generate` and `vlmtune chat`: quick inference with a trained adapter on its base (or a merged model).

Prompts go through the chat template training used (from the adapter folder, else the recipe and base model);
images go through a VLM's processor, as in training. Decoding is greedy unless a temperature is given, and only
the new text is returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from vlmtune.checkpoint.source import Source, load_source_model, load_source_processor
from vlmtune.errors import UserError
from vlmtune.logging import get_logger

log = get_logger(__name__)

CHAT_HELP = "commands: /image PATH (attach to your next message), /reset (new conversation), /exit"


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy when `temperature` is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: {self.max_new_tokens}; give a positive number of tokens")
        if self.temperature < 0:
            raise UserError(f"--temperature: {self.temperature}; give 0 (greedy) or a positive temperature")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: {self.top_p}; give a value in (0, 1]")


def open_image(image: str | Path | Any, source: Source) -> Any:
    """An image (a path or a PIL image) opened and checked like training data, as RGB.

    Raises:
        UserError: the model takes no images, or the file is missing or not an image.
    """
    from vlmtune.data.images import BadImage, load_image

    if source.family is None:
        raise UserError(f"image {image}: {source.base} is a text-only model; it takes no images")
    try:
        return load_image(image, source="--image", row=0, index=0)
    except BadImage as exc:
        raise UserError(f"image {exc.path}: {exc.problem}") from None


class Generator:
    """A loaded model with its tokenizer or processor, answering conversations.

    Args:
        source: The resolved SOURCE (`vlmtune.checkpoint.source.resolve_source`).
        dtype: Weights dtype; default float32 on CPU, bfloat16 on a GPU.
        device: Default: the first GPU, else the CPU.
    """

    def __init__(self, source: Source, *, dtype: str | None = None, device: str | None = None) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("float32" if self.device == "cpu" else "bfloat16")
        self.source = source
        self.family = source.family
        self.processor = load_source_processor(source)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if not getattr(self.processor, "chat_template", None):
            raise UserError(
                f"the tokenizer/processor of {source.path} has no chat template; train with model.chat_template "
                "set (the final adapter/ then holds it), or use a model that ships one"
            )
        self.model = load_source_model(source, dtype=dtype, device=self.device)

    @property
    def takes_images(self) -> bool:
        return self.family is not None

    def open_image(self, image: str | Path | Any) -> Any:
        """Open an image for the next prompt (see `open_image`)."""
        return open_image(image, self.source)

    def user_message(self, text: str, images: int = 0) -> dict[str, Any]:
        """A user turn: plain text for a text model, content parts (images first) for a VLM."""
        if not self.takes_images:
            return {"role": "user", "content": text}
        return {
            "role": "user",
            "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}],
        }

    def system_message(self, text: str) -> dict[str, Any]:
        return {
            "role": "system",
            "content": text if not self.takes_images else [{"type": "text", "text": text}],
        }

    def inputs(self, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
        """Model inputs for `messages` (the conversation so far, ending with a user turn) and its images in order."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.takes_images:
            placeholders = text.count(self.family.image_placeholder)
            if placeholders != len(images):
                raise UserError(
                    f"the chat template wrote {placeholders} image placeholder(s) for {len(images)} image(s); "
                    f"it must write {self.family.image_placeholder!r} once per image part"
                )
            encoded = self.processor(
                text=[text],
                images=[images] if images else None,
                add_special_tokens=False,
                return_tensors="pt",
            )
        else:
            encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        # Pixel values come as float32; a model loaded in bf16 / fp16 on a GPU wants its own dtype.
        dtype = self.model.dtype
        return {
            k: (v.to(self.device, dtype if v.is_floating_point() else v.dtype) if hasattr(v, "to") else v)
            for k, v in encoded.items()
        }

    def generate_ids(
        self, messages: list[dict[str, Any]], images: list[Any], sampling: Sampling
    ) -> list[int]:
        """The new token ids (the prompt left out) for the conversation `messages`."""
        import torch
        from transformers import GenerationConfig

        inputs = self.inputs(messages, images)
        eos = _ids(self.model.generation_config.eos_token_id) + _ids(self.tokenizer.eos_token_id)
        eos = list(dict.fromkeys(eos))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or [None])[0]
        sample = sampling.temperature > 0
        # A fresh config, not the model's: shipped ones often carry sampling defaults that contradict greedy.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=None,
            eos_token_id=eos or None,
            pad_token_id=pad,
        )
        if sample and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=config)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    def reply(self, messages: list[dict[str, Any]], images: list[Any], sampling: Sampling) -> str:
        """The assistant's answer to `messages`, special tokens removed."""
        ids = self.generate_ids(messages, images, sampling)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate(
    generator: Generator,
    prompt: str,
    *,
    images: Iterable[str | Path | Any] = (),
    system: str | None = None,
    sampling: Sampling = Sampling(),
) -> str:
    """One answer to `prompt` (with `images`, paths or PIL images, for a VLM), after an optional system prompt."""
    opened = [generator.open_image(p) for p in images]
    messages = [generator.system_message(system)] if system else []
    messages.append(generator.user_message(prompt, len(opened)))
    return generator.reply(messages, opened, sampling)


def chat(
    generator: Generator,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    *,
    system: str | None = None,
    sampling: Sampling = Sampling(),
) -> int:
    """A multi-turn conversation read line by line from `stdin`; each answer is written to `stdout`.

    A line is a user message, or a command: `/image PATH` attaches an image to the next message, `/reset`
    starts a new conversation, `/exit` (or end of input) ends it. Prompts and notices go to `stderr`, so piped
    output holds the answers only. A bad image or command is reported and the conversation goes on.

    Returns:
        The exit code: 0.
    """
    interactive = stdin.isatty()
    messages: list[dict[str, Any]] = []
    images: list[Any] = []  # every image of the conversation, in order
    pending: list[Any] = []

    def reset() -> None:
        messages[:] = [generator.system_message(system)] if system else []
        images.clear()
        pending.clear()

    reset()
    if interactive:
        print(CHAT_HELP, file=stderr)
    while True:
        if interactive:
            print("> ", end="", file=stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        command, _, arg = text.partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            reset()
            print("(new conversation)", file=stderr)
            continue
        if command == "/image":
            try:
                if not arg.strip():
                    raise UserError("/image needs a path: /image PATH")
                pending.append(generator.open_image(arg.strip()))
                print(f"(image attached: {arg.strip()})", file=stderr)
            except UserError as exc:
                print(f"error: {exc}", file=stderr)
            continue
        if command.startswith("/") and " " not in command and len(command) > 1 and command[1:].isalpha():
            print(f"error: unknown command {command}; {CHAT_HELP}", file=stderr)
            continue
        messages.append(generator.user_message(text, len(pending)))
        images.extend(pending)
        pending.clear()
        answer = generator.reply(messages, images, sampling)
        messages.append({"role": "assistant", "content": _assistant_content(generator, answer)})
        print(answer, file=stdout, flush=True)
    return 0


def _assistant_content(generator: Generator, text: str) -> Any:
    return [{"type": "text", "text": text}] if generator.takes_images else text


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
