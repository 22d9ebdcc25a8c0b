"""What each image placeholder of a row becomes, from the images' sizes alone, without decoding a pixel.

A transformers processor expands a row's placeholders in three steps: its image processor turns the pixels into
tensors plus a little metadata (Qwen-VL's `image_grid_thw`, Idefics3's `rows`/`cols`, ...), its
`replace_image_token(metadata, i)` turns the metadata of image `i` into the text that replaces placeholder `i`,
and `get_text_with_replacements` splices those texts in. Only the metadata depends on the image, and only on its
(height, width) under the image processor's settings. This module builds that metadata from the sizes, by the
family's rule (`Family.image_grid`), with the image processor's own resize and tiling helpers and its settings as
the processor's call resolves them, then lets the processor do the other two steps itself. So the dataset index
knows every row's tokens (after expansion) before any image is decoded, from each image's header.

Exactness is checked per family against the real processors, over a grid of sizes and settings, in
`tests/unit/data/test_vision_tokens.py`. What is exact is the expansion of the torchvision image processors that
`AutoProcessor` loads by default (the ones `vlmtune.model.load` uses).
"""

from __future__ import annotations

import copy
import importlib
import math
import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vlmtune.families import Family

Size = tuple[int, int]


class UnsupportedImageSize(ValueError):
    """The family's processor refuses an image of this size (or would fail on it).

    Attributes:
        size: The image's (height, width).
        rule: What the processor requires, in words.
    """

    def __init__(self, size: Size, rule: str) -> None:
        self.size = size
        self.rule = rule
        super().__init__(f"an image of {size[1]}x{size[0]} pixels (width x height) cannot be used: {rule}")


def image_replacements(processor: Any, family: Family, sizes: Sequence[tuple[int, int]]) -> list[str]:
    """The text each image placeholder of one row becomes, exactly as the processor's own call expands it.

    Args:
        processor: The family's processor, with the image settings it will be called with.
        family: The model family.
        sizes: The row's images as (height, width), after EXIF orientation, in placeholder order. All of one
            row's images together: some families expand an image differently when the row has several
            (LLaVA-OneVision gives each image of a multi-image row its base view only).

    Returns:
        One replacement text per image (Mllama: the placeholder itself; its images enter by cross-attention).

    Raises:
        UnsupportedImageSize: the processor would refuse an image of that size (Qwen-VL: an aspect ratio over
            200, say).
    """
    sizes = [(int(h), int(w)) for h, w in sizes]
    if not sizes:
        return []
    for size in sizes:
        if min(size) < 1:
            raise UnsupportedImageSize(size, "an image needs at least one pixel each way")
    settings = image_settings(processor)
    metadata = _RULES[family.image_grid](processor.image_processor, settings, sizes)
    return [processor.replace_image_token(metadata, image_idx=i) for i in range(len(sizes))]


def expand_text(
    processor: Any, family: Family, text: str, sizes: Sequence[tuple[int, int]]
) -> tuple[str, list[dict[str, Any]]]:
    """The text the processor tokenises for one rendered row, and where its placeholders were replaced.

    Tokenising the returned text with `processor.tokenizer(text, add_special_tokens=False)` gives the same
    `input_ids` as `processor(text=[text], images=[images], add_special_tokens=False)` for images of these
    sizes. The processor's layout rewrite comes first, as in its call (the processor's own
    `prepare_inputs_layout`, given stand-in images), and the replacement offsets, like the processor's, are
    relative to the rewritten text. To move a span of `text` (an assistant reply) onto the result, first apply
    the rewrite, then the replacements (`encode._move_spans` does both):

    - PaliGemma (with at least one image): `len(bos)` characters are inserted right after the last placeholder,
      and "\\n" is appended.
    - Mllama, when `bos` occurs nowhere in `text`: `len(bos)` characters are inserted after the placeholders
      that open the text (at 0 when it does not open with one). Templates that write bos first, as Llama 3.2's
      does, are left unchanged.
    - Every other family: no rewrite.

    Args:
        processor: The family's processor.
        family: The model family.
        text: The rendered conversation, with one `family.image_placeholder` per image.
        sizes: The row's images as (height, width), in placeholder order.

    Returns:
        The expanded text, and the replacements as the processor reports them with
        `return_text_replacement_offsets=True` for this text (its first and only entry): dicts with `type`,
        `span` (in the text after the layout rewrite), `new_span`, `text` and `replacement`. Empty for Mllama,
        whose processor replaces nothing and reports nothing.

    Raises:
        UnsupportedImageSize: as `image_replacements`.
        ValueError: the text holds another number of placeholders than there are sizes.
    """
    placeholders = text.count(processor.image_token)
    if placeholders != len(sizes):
        raise ValueError(
            f"the text holds {placeholders} {processor.image_token!r} placeholder(s) for {len(sizes)} image size(s)"
        )
    replacements = image_replacements(processor, family, sizes)
    # The processor's own layout step, given stand-in images (it looks at their number, never their pixels).
    stand_ins = [np.zeros((1, 1, 3), dtype=np.uint8) for _ in sizes] or None
    text = processor.prepare_inputs_layout(images=stand_ins, text=[text])[1][0]
    if family.image_grid == "cross_attention":
        return text, []
    texts, offsets = processor.get_text_with_replacements([text], replacements)
    return texts[0], offsets[0] if offsets else []


def resized_size(processor: Any, family: Family, size: Size) -> Size:
    """(height, width) of an image of `size` (height, width) as the processor resizes it for the model.

    The same resize `image_replacements` expands placeholders with (the processor's settings and helpers), for
    the families whose model sees one resized image: `smart_resize` (Qwen-VL: the patch grid times the patch
    size) and `resize_crop` (LLaVA). Boxes a Qwen2.5-VL model writes are in these pixels.

    Raises:
        UnsupportedImageSize: as `image_replacements`.
        ValueError: for a family whose model sees tiles or a fixed canvas instead of one resized image.
    """
    size = (int(size[0]), int(size[1]))
    settings = image_settings(processor)
    if family.image_grid == "smart_resize":
        grid = _smart_resize(processor.image_processor, settings, [size])["image_grid_thw"][0]
        return int(grid[1]) * settings["patch_size"], int(grid[2]) * settings["patch_size"]
    if family.image_grid == "resize_crop":
        return _resized(settings, size)
    raise ValueError(
        f"{family.name} models do not see one resized image ({family.image_grid}); no resized size"
    )


# id(processor) -> (weak reference to it, its image processor, what the settings were resolved from, the settings).
_SETTINGS: dict[int, tuple[weakref.ref, Any, tuple[Any, ...], dict[str, Any]]] = {}


def image_settings(processor: Any) -> dict[str, Any]:
    """The image processor's settings as the processor's call resolves them (its own defaults first).

    Resolving them costs about 100 us, more than the rest of a row, so they are kept per processor until
    anything they come from changes (`set_image_size` replacing `size`, a test flipping `do_image_splitting`):
    comparing a copy of those attributes costs a few us.
    """
    image_processor = processor.image_processor
    cached = _SETTINGS.get(id(processor))
    if (
        cached is not None
        and cached[0]() is processor
        and cached[1] is image_processor
        and _same(cached[2], _sources(processor, cached[3]))
    ):
        return cached[3]
    tokenizer_init_kwargs = processor.tokenizer.init_kwargs
    images_kwargs = processor._merge_kwargs(tokenizer_init_kwargs=tokenizer_init_kwargs)["images_kwargs"]
    settings = image_processor._merge_and_standardize_kwargs(**images_kwargs)
    sources = copy.deepcopy(_sources(processor, settings))
    _SETTINGS[id(processor)] = (weakref.ref(processor), image_processor, sources, settings)
    return settings


def _sources(processor: Any, settings: dict[str, Any]) -> tuple[Any, ...]:
    """What the settings are resolved from: the image processor's attributes, the processor's image defaults,
    and the tokenizer's init kwargs of the same names (its other init kwargs, a thousand added tokens, say, are
    left out of the comparison)."""
    init_kwargs = processor.tokenizer.init_kwargs
    return (
        vars(processor.image_processor),
        getattr(processor, "images_kwargs", None),
        {key: init_kwargs[key] for key in settings.keys() & init_kwargs.keys()},
    )


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    try:
        return bool(old == new)
    except (TypeError, ValueError):  # an array among the attributes: compare no further, resolve again
        return False


def _module(image_processor: Any) -> Any:
    """The module defining the image processor's class, whose helpers (`smart_resize`, ...) its methods call."""
    return importlib.import_module(type(image_processor).__module__)


def _stand_in(*shape: int) -> np.ndarray:
    """An array of this shape that holds one byte: read-only, for helpers that only look at shapes."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), shape)


def _resized(settings: dict[str, Any], size: Size) -> Size:
    """(height, width) after the torchvision backend's `resize` (if on) and `center_crop` (if on)."""
    from transformers import image_processing_backends as backends

    h, w = size
    target = settings.get("size")
    if settings.get("do_resize") and target is not None:
        if target.shortest_edge and target.longest_edge:
            h, w = backends.get_size_with_aspect_ratio((h, w), target.shortest_edge, target.longest_edge)
        elif target.shortest_edge:
            h, w = backends.get_resize_output_image_size(
                _stand_in(1, h, w),
                size=target.shortest_edge,
                default_to_square=False,
                input_data_format="channels_first",
            )
        elif target.max_height and target.max_width:
            h, w = backends.get_image_size_for_max_height_width((h, w), target.max_height, target.max_width)
        elif target.height and target.width:
            h, w = target.height, target.width
    crop = settings.get("crop_size")
    if settings.get("do_center_crop") and crop is not None:
        h, w = crop.height, crop.width
    return int(h), int(w)


def _smart_resize(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """Qwen-VL: the patch grid of the image resized to multiples of patch x merge within the pixel bounds."""
    patch, merge = settings["patch_size"], settings["merge_size"]
    smart_resize = _module(image_processor).smart_resize
    grids = []
    for size in sizes:
        h, w = size
        if settings["do_resize"]:
            bounds = settings["size"]
            try:
                h, w = smart_resize(
                    h,
                    w,
                    factor=patch * merge,
                    min_pixels=bounds.shortest_edge,
                    max_pixels=bounds.longest_edge,
                )
            except ValueError as exc:
                raise UnsupportedImageSize(size, f"{type(image_processor).__name__}: {exc}") from None
        if h % (patch * merge) or w % (patch * merge):
            raise UnsupportedImageSize(
                size,
                f"without resizing, each side must be a multiple of patch x merge = {patch * merge} pixels",
            )
        grids.append((1, h // patch, w // patch))
    return {"image_grid_thw": np.array(grids, dtype=np.int64)}


def _resize_crop(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """LLaVA: the pixel height and width of each image, resized and center-cropped."""
    return {"pixel_values": [_stand_in(3, *_resized(settings, size)) for size in sizes]}


def _anyres(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """LLaVA-NeXT / OneVision: each image's size, the size of a tile, and how many images the row has.

    The processor reads the shape of the first image's first tile: its base view, of the `size` height x width
    (or a `shortest_edge` square), or in OneVision's multi-image rows the image padded to a square, then resized
    by `size` and center-cropped like every tile.
    """
    target = settings["size"]
    base = (target.height, target.width) if target.height and target.width else (target.shortest_edge,) * 2
    if len(sizes) > 1 and "batch_num_images" in image_processor.model_input_names:
        base = (max(sizes[0]),) * 2
    return {
        "image_sizes": sizes,
        "pixel_values": [_stand_in(1, 3, *_resized(settings, base))],
        "batch_num_images": [len(sizes)],
    }


def _split_tiles(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """Idefics3 / SmolVLM: the rows x columns of `max_image_size` tiles, 0 x 0 when the image is not split."""
    module = _module(image_processor)
    side = settings["max_image_size"]["longest_edge"]
    rows, cols = [], []
    for h, w in sizes:
        if settings["do_resize"]:
            target = settings["size"]
            if target.longest_edge:
                h, w = module.get_resize_output_image_size(SimpleNamespace(shape=(h, w)), target.longest_edge)
            elif target.height and target.width:
                h, w = target.height, target.width
        n_rows = n_cols = 0
        if settings["do_image_splitting"]:
            # resize_for_vision_encoder: round the longer side up to tiles, the other from the aspect ratio.
            aspect_ratio = w / h
            if w >= h:
                w = math.ceil(w / side) * side
                h = math.ceil(int(w / aspect_ratio) / side) * side
            else:
                h = math.ceil(h / side) * side
                w = math.ceil(int(h * aspect_ratio) / side) * side
            # split_images
            if h > side or w > side:
                n_rows, n_cols = math.ceil(h / side), math.ceil(w / side)
        rows.append(n_rows)
        cols.append(n_cols)
    return {"rows": [rows], "cols": [cols]}


def _pan_and_scan(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """Gemma 3: the number of pan-and-scan crops (0 when pan-and-scan is off or the image is not elongated)."""
    num_crops = []
    for h, w in sizes:
        crops = 0
        if settings.get("do_pan_and_scan"):
            crops = len(
                image_processor.pan_and_scan_batched(
                    _stand_in(h, w),
                    pan_and_scan_min_crop_size=settings["pan_and_scan_min_crop_size"],
                    pan_and_scan_max_num_crops=settings["pan_and_scan_max_num_crops"],
                    pan_and_scan_min_ratio_to_activate=settings["pan_and_scan_min_ratio_to_activate"],
                )
            )
        num_crops.append(crops)
    return {"num_crops": num_crops}


def _crop_to_patches(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """InternVL: the tiles of the canvas closest to the image's aspect ratio, plus a thumbnail when several."""
    canvas = _module(image_processor).get_optimal_tiled_canvas
    tile = settings["size"]
    num_patches = []
    for h, w in sizes:
        patches = 1
        if settings.get("crop_to_patches"):
            columns, rows = canvas(
                (h, w), (tile.height, tile.width), settings["min_patches"], settings["max_patches"]
            )
            patches = columns * rows + (columns * rows != 1)
        num_patches.append(patches)
    return {"num_patches": num_patches}


def _fixed(image_processor: Any, settings: dict[str, Any], sizes: list[Size]) -> dict[str, Any]:
    """PaliGemma, Mllama: the replacement does not depend on the image."""
    return {}


_RULES: dict[str, Callable[[Any, dict[str, Any], list[Size]], dict[str, Any]]] = {
    "smart_resize": _smart_resize,
    "resize_crop": _resize_crop,
    "anyres": _anyres,
    "split_tiles": _split_tiles,
    "pan_and_scan": _pan_and_scan,
    "crop_to_patches": _crop_to_patches,
    "fixed": _fixed,
    "cross_attention": _fixed,
}
