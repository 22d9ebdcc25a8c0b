"""Everything vlmtune knows about each vision-language model family, in one registry.

A `Family` says how to recognise a checkpoint (its config `model_type`), which class loads it, where its three
parts live (vision tower, projector, language model: module-name prefixes, checked on the built models), what a
prompt writes for an image and which tokens the processor expands that into, how image size is controlled, and
the processor quirks the data pipeline has to respect. Adding a family is one entry in `FAMILIES` and one
tiny-model builder in `vlmtune.testing.tiny_vlm`; the parametrised tests then cover it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from vlmtune.errors import UserError

Batching = Literal["cat", "sample", "count", "sequence"]
ImageGrid = Literal[
    "smart_resize",
    "resize_crop",
    "anyres",
    "split_tiles",
    "pan_and_scan",
    "crop_to_patches",
    "fixed",
    "cross_attention",
]
BoxCoordinates = Literal["original", "resized", "relative_1000"]
_TOKEN_PAD = MappingProxyType({"token_type_ids": 0, "mm_token_type_ids": 0})


# eq=False: each family is one object, compared and hashed by identity.
@dataclass(frozen=True, eq=False)
class Family:
    """One vision-language model family.

    Module prefixes are dotted paths from the top of the loaded model (`XForConditionalGeneration`); they also
    match inside wrappers (`base_model.model.` of PEFT, `module.` of DDP) because matching is on whole
    dotted components. A parameter belongs to the first part whose prefix it falls under, in the order
    projector, vision, language (the output head counts as language): Qwen's merger sits inside `model.visual`
    but is the projector.

    Attributes:
        name: Registry key, as written in `model.family`.
        model_types: Config `model_type` values of checkpoints of this family.
        model_class: Name of the transformers class that loads a checkpoint with its LM head.
        vision: Module prefixes of the vision tower.
        projector: Module prefixes of the projector / connector between tower and language model.
        language: Module prefixes of the language model's body (embeddings, layers, final norm).
        head: Module prefixes of the output head (tied to the embeddings in some families).
        image_placeholder: What a prompt (chat template) writes for one image; the processor expands it.
        image_tokens: Tokens that fill the expanded image span in `input_ids` (never trained, never cut).
        image_grid: How an image's (height, width) becomes the image-processor output that the processor's
            `replace_image_token` reads, i.e. how many tokens the image gets (`vlmtune.data.vision_tokens` applies
            it): `smart_resize` (Qwen-VL: resized to a multiple of patch x merge within min/max pixels,
            `image_grid_thw`), `resize_crop` (LLaVA: resized and center-cropped, the pixel height and width),
            `anyres` (LLaVA-NeXT / OneVision: `image_sizes`, the tile size and `batch_num_images`), `split_tiles`
            (Idefics3 / SmolVLM: resized, then `rows` x `cols` tiles when splitting), `pan_and_scan` (Gemma 3:
            `num_crops`, 0 unless pan-and-scan is on), `crop_to_patches` (InternVL: `num_patches` of the tiled
            canvas), `fixed` (the same tokens for every size) or `cross_attention` (Mllama: the placeholder stays
            one token; the image enters through cross-attention).
        size_keys: Recipe image-size keys this family takes, each mapped to its key in the image processor's
            `size` dict. Empty: the size is fixed by the vision config.
        nested_images: The processor refuses a flat list of images for a batch; it wants one list per sample
            (which every family accepts).
        ships_chat_template: Hub checkpoints come with a chat template (PaliGemma's do not: pass one, or use
            the processor's prefix/suffix API).
        suffix_labels: The processor builds labels itself from `suffix=` (PaliGemma's prefix-LM API).
        token_type_ids: What the processor's `token_type_ids` mean to the model: `image` marks image tokens
            (attended bidirectionally; Gemma 3 needs them when training), `prefix` marks with 0 a prefix that is
            attended bidirectionally (PaliGemma: the trained response must be 1, or it sees its own future).
        needs_images: The processor refuses a sample without an image.
        cross_attention_images: Images enter through cross-attention layers, which a text-only batch skips
            (their weights then get no gradient, and sharded processes fall out of step).
        text_layout: How the processor changes the rendered text before expanding image placeholders, so that
            label spans can be moved onto the tokenised text: `bos_after_last_image` (PaliGemma writes bos right
            after the last image placeholder, and appends "\n"), `bos_if_missing` (Mllama prepends bos to a
            text that does not start with it).
        vision_batching: How each vision input of the processor (its key) is batched across rows: `cat`
            (concatenated along dim 0, trailing dims zero-padded to the largest: one entry per image, patch or
            tile), `sample` ((1, images, ...) per row, zero-padded, a row without images gets zeros: (batch, max
            images, ...)), `count` (one number per row, 0 without images), `sequence` ((seq, images, tiles) per
            row, padded like `sample` and along the sequence).
        token_pad: Per-token outputs besides input_ids / attention_mask / labels, and the value padding (and a
            text-only row) takes.
        rope_index: The transformers class whose `get_rope_index` gives a row's multimodal (3-D) rope
            positions (Qwen-VL); packed rows carry each example's own (`vlmtune.data.positions`). None: 1-D
            positions, restarting per packed example.
        packing_refused: Why `data.batching: padding_free / packed` cannot keep this family's examples apart in
            a shared row (empty: it can, and the packed-equals-alone tests cover it).
        box_coordinates: The space the family's checkpoints write boxes in when asked to ground something, which
            the `iou` reward converts to the original image's pixels: `original` (the image's own pixels, the
            default), `resized` (absolute pixels of the image as the processor resized it: Qwen2.5-VL, the
            correction VLM-R1 makes) or `relative_1000` (0-1000 of the width and height: Qwen2-VL and Qwen3-VL,
            per their reports and the Qwen3-VL fine-tuning docs).
        notes: Anything else the data pipeline must know.
    """

    name: str
    model_types: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    image_placeholder: str
    image_tokens: tuple[str, ...]
    image_grid: ImageGrid
    head: tuple[str, ...] = ("lm_head",)
    model_class: str = "AutoModelForImageTextToText"
    size_keys: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    nested_images: bool = False
    ships_chat_template: bool = True
    suffix_labels: bool = False
    token_type_ids: Literal["image", "prefix"] | None = None
    needs_images: bool = False
    cross_attention_images: bool = False
    text_layout: Literal["bos_after_last_image", "bos_if_missing"] | None = None
    vision_batching: Mapping[str, Batching] = field(default_factory=lambda: MappingProxyType({}))
    token_pad: Mapping[str, int] = field(default_factory=lambda: _TOKEN_PAD)
    rope_index: str | None = None
    packing_refused: str = ""
    box_coordinates: BoxCoordinates = "original"
    notes: str = ""

    def load_class(self) -> type:
        """The transformers class named by `model_class` (imports transformers)."""
        import transformers

        return getattr(transformers, self.model_class)

    def image_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of `image_tokens` in `tokenizer` (a tokenizer or a processor holding one).

        Raises:
            UserError: when the tokenizer lacks one of them (a processor from another family, or a broken one).
        """
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.image_tokens if t not in vocab]
        if missing:
            raise UserError(
                f"the tokenizer has no {', '.join(missing)} token(s), which {self.name} models use for images; "
                "is model.family right, and does the checkpoint ship its processor?"
            )
        return [vocab[t] for t in self.image_tokens]


# Shared by several entries: Qwen-VL's merger sits inside `model.visual` but is the projector.
_QWEN = {
    "vision": ("model.visual",),
    "projector": ("model.visual.merger",),
    "language": ("model.language_model",),
    "image_placeholder": "<|vision_start|><|image_pad|><|vision_end|>",
    "image_tokens": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "image_grid": "smart_resize",
    "size_keys": MappingProxyType({"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}),
    "vision_batching": MappingProxyType({"pixel_values": "cat", "image_grid_thw": "cat"}),
    "notes": "pixel_values: the flattened patches of every image in the batch, (sum of t*h*w, 3*2*patch^2), "
    "with image_grid_thw (images, 3); tokens per image = t*h*w / merge_size^2. Also returns mm_token_type_ids.",
}
_LLAVA = {
    "vision": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "language": ("model.language_model",),
    "image_placeholder": "<image>",
    "image_tokens": ("<image>",),
    "vision_batching": MappingProxyType({"pixel_values": "cat"}),
}
# LLaVA-NeXT / OneVision add `image_newline`, a learned separator after each row of image features.
_ANYRES = {
    **_LLAVA,
    "projector": ("model.multi_modal_projector", "model.image_newline"),
    "vision_batching": MappingProxyType({"pixel_values": "cat", "image_sizes": "cat"}),
}
_IDEFICS = {
    "vision": ("model.vision_model",),
    "projector": ("model.connector",),
    "language": ("model.text_model",),
    "image_placeholder": "<image>",
    "image_tokens": ("<fake_token_around_image>", "<global-img>", "<image>"),
    "image_grid": "split_tiles",
    "size_keys": MappingProxyType({"longest_edge": "longest_edge"}),
    "vision_batching": MappingProxyType({"pixel_values": "sample", "pixel_attention_mask": "sample"}),
    "notes": "pixel_values (batch, images, 3, H, W) with pixel_attention_mask (batch, images, H, W); "
    "longest_edge is the size before splitting into max_image_size tiles (<row_i_col_j> tokens when split).",
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            **_QWEN,
            rope_index="Qwen2VLModel",
            box_coordinates="relative_1000",
        ),
        Family(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            **_QWEN,
            rope_index="Qwen2_5_VLModel",
            box_coordinates="resized",
        ),
        Family(
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            rope_index="Qwen3VLModel",
            box_coordinates="relative_1000",
            **{**_QWEN, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
        ),
        Family(name="llava", model_types=("llava",), **_LLAVA, image_grid="resize_crop"),
        Family(
            name="llava_next",
            image_grid="anyres",
            model_types=("llava_next",),
            **_ANYRES,
            notes="anyres: pixel_values (images, tiles, 3, H, W) with image_sizes; tokens depend on the size.",
        ),
        Family(
            name="llava_onevision",
            image_grid="anyres",
            model_types=("llava_onevision",),
            **{
                **_ANYRES,
                "vision_batching": MappingProxyType(
                    {"pixel_values": "cat", "image_sizes": "cat", "batch_num_images": "count"}
                ),
            },
            notes="anyres as llava_next, plus batch_num_images; a row with several images gets no anyres tiles.",
        ),
        # Idefics3's processor splits a flat list by the <image> count of each text; SmolVLM's refuses one.
        Family(name="idefics3", model_types=("idefics3",), **_IDEFICS),
        Family(name="smolvlm", model_types=("smolvlm",), **_IDEFICS, nested_images=True),
        Family(
            name="paligemma",
            image_grid="fixed",
            model_types=("paligemma",),
            **_LLAVA,
            ships_chat_template=False,
            suffix_labels=True,
            token_type_ids="prefix",
            needs_images=True,
            text_layout="bos_after_last_image",
            # token_type_ids 0 mark the bidirectional prefix, so padding (after the answer) is 1, the causal part.
            token_pad=MappingProxyType({**_TOKEN_PAD, "token_type_ids": 1}),
            packing_refused="its prefix-LM mask lets every prefix token (token_type_ids 0) attend to every other "
            "in the same row, so packed examples would see each other's images and prompts",
            notes="the processor adds 1,152 <loc>/<seg> tokens to the tokenizer, and inserts bos after the last "
            "<image> and appends '\\n' to every text, which misplaces return_assistant_tokens_mask.",
        ),
        Family(
            name="gemma3",
            image_grid="pan_and_scan",
            model_types=("gemma3",),
            **{
                **_LLAVA,
                "image_placeholder": "<start_of_image>",
                "image_tokens": ("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
            },
            nested_images=True,
            token_type_ids="image",
            packing_refused="its sliding-window layers' mask (bidirectional image blocks, then the window) does "
            "not keep packed examples apart in transformers 5.25: measured, a packed example's tokens attend to "
            "the example before it",
            notes="the processor expands <start_of_image> to '\\n\\n<start_of_image>' + soft tokens + "
            "'<end_of_image>\\n\\n'; the embeddings are tied to the output head.",
        ),
        Family(
            name="mllama",
            image_grid="cross_attention",
            model_types=("mllama",),
            vision=("model.vision_model",),
            projector=("model.multi_modal_projector",),
            language=("model.language_model",),
            image_placeholder="<|image|>",
            image_tokens=("<|image|>",),
            nested_images=True,
            cross_attention_images=True,
            text_layout="bos_if_missing",
            packing_refused="images enter through cross-attention, whose cross_attention_mask is per row and "
            "image, not per packed example",
            vision_batching=MappingProxyType(
                {
                    "pixel_values": "sample",
                    "aspect_ratio_ids": "sample",
                    "aspect_ratio_mask": "sample",
                    "cross_attention_mask": "sequence",
                }
            ),
            notes="images enter through cross-attention layers: one <|image|> token per image; pixel_values "
            "(batch, images, tiles, 3, H, W) with aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask "
            "(batch, seq, images, tiles). The processor prepends bos to a text without one, which misplaces "
            "return_assistant_tokens_mask: the chat template must write bos (Llama 3.2's does).",
        ),
        Family(
            name="internvl",
            image_grid="crop_to_patches",
            model_types=("internvl",),
            **{
                **_LLAVA,
                "image_placeholder": "<IMG_CONTEXT>",
                "image_tokens": ("<img>", "<IMG_CONTEXT>", "</img>"),
            },
            notes="pixel_values (tiles of every image, 3, H, W); the processor crops to tiles (crop_to_patches) "
            "by default whatever the image processor says; max_patches bounds the tiles per image.",
        ),
    )
}


def get_family(name: str) -> Family:
    """The registered family called `name`.

    Raises:
        UserError: for an unknown name, listing the supported ones.
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}") from None


def _model_type(config: Any) -> str | None:
    return config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)


def find_family(config: Any) -> Family | None:
    """The family of a model config (or a mapping holding `model_type`), or None for a text-only model."""
    model_type = _model_type(config)
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def set_image_size(processor: Any, family: Family, **sizes: int | None) -> None:
    """Set the recipe's image-size keys (e.g. `min_pixels`, `max_pixels`) on a loaded processor, in place.

    Keys set to None are left as the checkpoint has them. The processor keeps them when saved.

    Raises:
        UserError: for a key this family does not take (its image size is fixed by the vision config).
    """
    sizes = {k: v for k, v in sizes.items() if v is not None}
    unknown = sorted(set(sizes) - set(family.size_keys))
    if unknown:
        takes = ", ".join(family.size_keys) or "no image-size key: the vision config fixes the size"
        raise UserError(f"{', '.join(unknown)}: not an image-size setting of {family.name} models ({takes})")
    if not sizes:
        return
    image_processor = processor.image_processor
    current = image_processor.size
    current = (
        current if isinstance(current, Mapping) else {k: v for k, v in vars(current).items() if v is not None}
    )
    image_processor.size = {**current, **{family.size_keys[k]: v for k, v in sizes.items()}}
