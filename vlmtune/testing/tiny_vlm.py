"""Tiny random-init vision-language models with their processors, one per family, built offline in seconds.

Each build is the real model class of its family (so module names, processor behaviour and image-token
expansion are the real ones) at toy size: a 2-layer language model of width 64 and a 2-layer vision tower of
width 32 that sees 32x32 pixels (Qwen-VL: 56x56 or 64x64, the smallest size its processor keeps). A 32x32
image becomes 4 image tokens (Qwen-VL, Idefics3, SmolVLM, Gemma 3, InternVL), 16 (LLaVA, PaliGemma), 36
(LLaVA-NeXT and OneVision: base view, one anyres tile and row separators), or 1 (Mllama, whose language model
reads the image through cross-attention). The tokenizer is `vlmtune.testing.tiny`'s
byte-level BPE plus the special tokens the family's processor looks up; the chat template is ChatML over content
parts, writing the family's image placeholder for each image and marking what the assistant says with
`{% generation %}`, so `apply_chat_template(..., return_assistant_tokens_mask=True)` works.

Builds are cached as in `vlmtune.testing.tiny`: a marker file, written last, records the parameters.

    python -m vlmtune.testing.tiny_vlm FAMILY OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmtune.families import FAMILIES, get_family
from vlmtune.logging import get_logger
from vlmtune.testing.tiny import IM_START, MARKER, _is_complete, build_tiny_tokenizer, tokenizer_corpus

logger = get_logger(__name__)

BUILD_VERSION = 1
BOS = "<|bos|>"
HIDDEN = 64
VISION_HIDDEN = 32

# ChatML over content parts; `PLACEHOLDER` becomes the family's image placeholder. A string content is one text
# part. `{% generation %}` marks the assistant's text and its <|im_end|>, as in tiny.py's template.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}"
    "{%- for part in parts %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{%- else %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'image' %}{{- 'PLACEHOLDER' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_template(family_name: str) -> str:
    """The tiny models' chat template for `family_name` (ChatML with its image placeholder)."""
    template = _CHAT_TEMPLATE.replace("PLACEHOLDER", get_family(family_name).image_placeholder)
    # The Mllama processor prepends bos to a text without one, which shifts the assistant-mask offsets
    # computed on the rendered text; Llama 3.2's own template writes bos first, and so does this one.
    return "{{- bos_token }}" + template if family_name == "mllama" else template


def _tokenizer(family_name: str, extra: tuple[str, ...], named: dict[str, str]) -> Any:
    """tiny.py's tokenizer, re-wrapped with a bos token, the family's special tokens and named token attributes.

    Processors look tokens up by name (`tokenizer.boi_token`, `tokenizer.image_token`, ...); those names are
    constructor keywords ending in `_token`, saved in tokenizer_config.json.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    base = build_tiny_tokenizer()
    family = get_family(family_name)
    new = list(dict.fromkeys([BOS, *family.image_tokens, *extra, *named.values()]))
    backend = base.backend_tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=base.eos_token,
        pad_token=base.pad_token,
        extra_special_tokens=[IM_START, *(t for t in new if t != BOS)],
        chat_template=chat_template(family_name),
        model_max_length=base.model_max_length,
        clean_up_tokenization_spaces=False,
        **named,
    )


def _vocab(tokenizer: Any) -> int:
    return -(-len(tokenizer) // 8) * 8


def _text(tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """Language-model config shared by every family: width 64, 2 layers, 4 heads, 2 KV heads."""
    return {
        "vocab_size": _vocab(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        # Larger than the default so that a frozen head leaves a LoRA room to lower the loss.
        "initializer_range": 0.1,
        **overrides,
    }


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _siglip(image_size: int, patch_size: int, **overrides: Any) -> dict[str, Any]:
    """A SigLIP / CLIP-style vision tower config of width 32."""
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        **overrides,
    }


def _qwen_vl(family_name: str) -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer(family_name, ("<|video_pad|>",), {})
    # Sizes are in pixels: 56x56 (patch 14) or 64x64 (patch 16) is 4 image tokens; the largest is 4x that.
    patch = 16 if family_name == "qwen3_vl" else 14
    side = 4 * patch
    image_processor = tf.Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": side * side, "longest_edge": 4 * side * side},
    )
    if family_name == "qwen3_vl":
        config_class, processor_class = tf.Qwen3VLConfig, tf.Qwen3VLProcessor
        video_processor = tf.Qwen3VLVideoProcessor()
        # mrope_section sums to head_dim / 2.
        rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        text = {"head_dim": 16, "rope_parameters": rope}
        vision = {
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 4,
            "patch_size": patch,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
        }
    elif family_name == "qwen2_5_vl":
        config_class, processor_class = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor
        video_processor = tf.Qwen2VLVideoProcessor()
        text = {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
        vision = {
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 4,
            "patch_size": patch,
            "out_hidden_size": HIDDEN,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    else:
        config_class, processor_class = tf.Qwen2VLConfig, tf.Qwen2VLProcessor
        video_processor = tf.Qwen2VLVideoProcessor()
        text = {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
        vision = {
            "depth": 2,
            "embed_dim": VISION_HIDDEN,
            "hidden_size": HIDDEN,
            "num_heads": 4,
            "patch_size": patch,
        }
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=chat_template(family_name),
    )
    image, video, start, end = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    config = config_class(
        text_config=_text(tok, **text),
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    return config, processor


def _llava() -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer("llava", (), {})
    # 32 px in patches of 8: 16 patches plus CLS, which the "default" strategy drops: 16 image tokens.
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=chat_template("llava"),
    )
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_siglip(32, 8)),
        text_config=tf.LlamaConfig(**_text(tok)),
        image_token_id=_ids(tok, "<image>")[0],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    return config, processor


_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _llava_next() -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer("llava_next", (), {})
    processor = tf.LlavaNextProcessor(
        image_processor=tf.LlavaNextImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=chat_template("llava_next"),
    )
    config = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(**_siglip(32, 8)),
        text_config=tf.LlamaConfig(**_text(tok)),
        image_token_id=_ids(tok, "<image>")[0],
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    return config, processor


def _llava_onevision() -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer("llava_onevision", ("<video>",), {})
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(
            size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
        ),
        tokenizer=tok,
        video_processor=tf.LlavaOnevisionVideoProcessor(),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=chat_template("llava_onevision"),
    )
    image, video = _ids(tok, "<image>", "<video>")
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_siglip(32, 8, vision_use_head=False)),
        text_config=tf.Qwen2Config(**_text(tok)),
        image_token_id=image,
        video_token_id=video,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return config, processor


def _idefics3(family_name: str) -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer(family_name, ("<end_of_utterance>",), {})
    # 32 px in patches of 8 is 16 patches; pixel shuffle with scale factor 2 makes them 4 image tokens.
    kwargs = {
        "size": {"longest_edge": 32},
        "max_image_size": {"longest_edge": 32},
        "do_image_splitting": False,
    }
    if family_name == "smolvlm":
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(**kwargs),
            tokenizer=tok,
            video_processor=tf.SmolVLMVideoProcessor(),
            image_seq_len=4,
            chat_template=chat_template(family_name),
        )
        config_class, vision_class = tf.SmolVLMConfig, tf.SmolVLMVisionConfig
    else:
        processor = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(**kwargs),
            tokenizer=tok,
            image_seq_len=4,
            chat_template=chat_template(family_name),
        )
        config_class, vision_class = tf.Idefics3Config, tf.Idefics3VisionConfig
    config = config_class(
        vision_config=vision_class(**_siglip(32, 8)),
        text_config=tf.LlamaConfig(**_text(tok)),
        scale_factor=2,
        image_token_id=_ids(tok, "<image>")[0],
    )
    return config, processor


def _paligemma() -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer("paligemma", (), {})
    image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)
    # The processor adds 1,152 <loc>/<seg> tokens, so the vocabulary is sized after it is built.
    processor = tf.PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=chat_template("paligemma")
    )
    config = tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(**_siglip(32, 8, projection_dim=HIDDEN, vision_use_head=False)),
        text_config=tf.GemmaConfig(**_text(tok, head_dim=16)),
        image_token_id=_ids(tok, "<image>")[0],
        projection_dim=HIDDEN,
    )
    return config, processor


def _gemma3() -> tuple[Any, Any]:
    import transformers as tf

    named = {
        "boi_token": "<start_of_image>",
        "image_token": "<image_soft_token>",
        "eoi_token": "<end_of_image>",
    }
    tok = _tokenizer("gemma3", (), named)
    processor = tf.Gemma3Processor(
        image_processor=tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=chat_template("gemma3"),
    )
    boi, image, eoi = _ids(tok, *named.values())
    text = _text(
        tok,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(**_siglip(32, 8, vision_use_head=False)),
        text_config=tf.Gemma3TextConfig(**text),
        mm_tokens_per_image=4,
        boi_token_id=boi,
        eoi_token_id=eoi,
        image_token_id=image,
    )
    return config, processor


def _mllama() -> tuple[Any, Any]:
    import transformers as tf

    tok = _tokenizer("mllama", ("<|python_tag|>",), {})
    processor = tf.MllamaProcessor(
        image_processor=tf.MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=4),
        tokenizer=tok,
        chat_template=chat_template("mllama"),
    )
    vision = tf.MllamaVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=32,
        patch_size=8,
        max_num_tiles=4,
        intermediate_layers_indices=[0],
        vision_output_dim=2 * VISION_HIDDEN,  # the last layer and one intermediate layer, concatenated
    )
    # Layer 1 is a cross-attention layer, through which the image enters.
    text = tf.MllamaTextConfig(**_text(tok, cross_attention_layers=[1]))
    config = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_id=_ids(tok, "<|image|>")[0])
    return config, processor


def _internvl() -> tuple[Any, Any]:
    import transformers as tf

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = _tokenizer("internvl", (), named)
    # 32 px in patches of 8 is 16 patches; pixel shuffle (downsample 0.5) makes them 4 image tokens. The processor
    # crops to tiles whatever the image processor says (plus a thumbnail when more than one): one tile at most.
    processor = tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, max_patches=1),
        tokenizer=tok,
        video_processor=tf.InternVLVideoProcessor(),
        image_seq_length=4,
        chat_template=chat_template("internvl"),
    )
    config = tf.InternVLConfig(
        vision_config=tf.InternVLVisionConfig(**_siglip(32, 8)),
        text_config=tf.Qwen2Config(**_text(tok)),
        image_token_id=_ids(tok, "<IMG_CONTEXT>")[0],
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    return config, processor


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2_vl": lambda: _qwen_vl("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen_vl("qwen2_5_vl"),
    "qwen3_vl": lambda: _qwen_vl("qwen3_vl"),
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "idefics3": lambda: _idefics3("idefics3"),
    "smolvlm": lambda: _idefics3("smolvlm"),
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "internvl": _internvl,
}
# In registry order; every registered family has one (a test checks it).
TINY_FAMILIES = tuple(name for name in FAMILIES if name in _BUILDERS)


def _build_params(family_name: str, seed: int) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(tokenizer_corpus()).encode("utf-8")).hexdigest()
    return {
        "kind": "tiny_vlm",
        "family": family_name,
        "build_version": BUILD_VERSION,
        "seed": seed,
        "corpus_sha256": digest,
        "versions": {
            name: importlib.metadata.version(name) for name in ("torch", "transformers", "tokenizers")
        },
    }


def _write_build(out_dir: Path, family_name: str, seed: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    config, processor = _BUILDERS[family_name]()
    model_class = get_family(family_name).load_class()
    # A private RNG stream: building a model must not shift the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_config(config).to(torch.float32)
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)


def build_tiny_vlm(family_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init tiny model of `family_name` and its processor to `out_dir`.

    Reuses `out_dir` when it already holds a complete build with the same parameters; a build is assembled in a
    temporary sibling directory and moved in with the marker last, as `vlmtune.testing.tiny.build_tiny_llm` does.

    Args:
        family_name: A key of `vlmtune.families.FAMILIES` with a tiny builder (`TINY_FAMILIES`).
        out_dir: Directory to write (created if missing).
        seed: Seed of the weight initialisation.

    Returns:
        `out_dir` as a `Path`, ready for `AutoProcessor.from_pretrained` and the family's model class.
    """
    if family_name not in _BUILDERS:
        raise ValueError(f"no tiny builder for {family_name!r}; available: {', '.join(_BUILDERS)}")
    out_dir = Path(out_dir)
    params = _build_params(family_name, seed)
    if _is_complete(out_dir, params):
        logger.debug("tiny VLM cache hit: %s", out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_build(tmp, family_name, seed)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"params": params, "files": files}, indent=2) + "\n", "utf-8")
        out_dir.mkdir(exist_ok=True)
        (out_dir / MARKER).unlink(missing_ok=True)
        for name in [*files, MARKER]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny %s model in %s", family_name, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlmtune.testing.tiny_vlm",
        description="Build a tiny random-init vision-language model.",
    )
    parser.add_argument("family", choices=TINY_FAMILIES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build_tiny_vlm(args.family, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
