"""Placeholder expansion from image sizes alone equals the real processor's, for every family.

Each case loads a tiny family's processor, optionally gives it settings that make its rule non-trivial (real-size
Qwen pixel bounds, Idefics3 splitting, more LLaVA-NeXT pinpoints, InternVL tiling, Gemma 3 pan-and-scan, LLaVA
without center crop), and compares, over a grid of sizes and aspect ratios and a few multi-image rows, the tokens
of `expand_text` with the `input_ids` of the processor called on blank PIL images of those sizes; sizes the
processor refuses must raise `UnsupportedImageSize`. Pixel counts only matter for some rules, so the large images
are reserved to the cases whose rule depends on them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmtune.data.vision_tokens import UnsupportedImageSize, expand_text, image_replacements
from vlmtune.families import FAMILIES, get_family, set_image_size
from vlmtune.testing.tiny_vlm import build_tiny_vlm

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny, thin and extreme shapes, and sizes on either side of the tiny processors' thresholds (32-pixel tiles,
# 56 / 64-pixel Qwen minimum, 2 x 32 pinpoints, Qwen's aspect-ratio limit of 200).
SMALL = [
    (1, 1),
    (1, 2),
    (3, 40),
    (14, 14),
    (27, 29),
    (32, 32),
    (33, 31),
    (31, 33),
    (56, 56),
    (55, 57),
    (64, 65),
    (65, 64),
    (96, 97),
    (97, 96),
    (50, 100),
    (100, 50),
    (60, 80),
    (80, 60),
    (100, 300),
    (300, 100),
    (1, 200),
    (200, 1),
    (1, 201),
    (5, 1005),
    (28, 1000),
    (1000, 28),
    (3000, 40),
    (40, 3000),
    (255, 512),
    (256, 512),
    (512, 256),
]
# Real-size thresholds, each only with the cases it matters to (a large image costs the processor time): Qwen's
# 1003520-pixel bound (about 1000 x 1000), Idefics3's cap of 4096 pixels a side, Gemma 3's pan-and-scan (crops of
# at least 256 pixels, from an aspect ratio of 1.2, at most 4).
QWEN_LARGE = [(1000, 1003), (1003, 1000), (716, 1400)]  # and 4000 x 3000 in QWEN_ROWS
SPLIT_LARGE = [(100, 4097), (4097, 100)]
PAN_LARGE = [(500, 599), (500, 600), (599, 500), (600, 500), (300, 900), (256, 1024), (1024, 256)]
# Multi-image rows: mixed shapes, and a refused image among accepted ones.
ROWS = [[(300, 100), (100, 300), (64, 64)], [(32, 32), (1, 201)]]
QWEN_ROWS = [*ROWS, [(4000, 3000), (28, 1000)]]
PAN_ROWS = [*ROWS, [(256, 1024), (500, 500), (300, 900)]]


def _settings_qwen(processor: Any, family_name: str) -> None:
    set_image_size(processor, get_family(family_name), min_pixels=3136, max_pixels=1003520)


def _settings_no_resize(processor: Any, family_name: str) -> None:
    # Then each side must already be a multiple of patch x merge (32), or the processor fails.
    processor.image_processor.do_resize = False


def _settings_split(processor: Any, family_name: str) -> None:
    image_processor = processor.image_processor
    image_processor.do_image_splitting = True
    # Up to 3 x 3 tiles of 32. Not a multiple of the tile: the rounding up to tiles then works from the rounded
    # longer side (an image resized to 60 x 80 is split as 72 x 96, into 3 x 3 tiles, not 2 x 3).
    image_processor.size = {"longest_edge": 80}
    image_processor.max_image_size = {"longest_edge": 32}


def _settings_pinpoints(processor: Any, family_name: str) -> None:
    # Up to 3 x 3 tiles of 32 (OneVision's anyres_max_9 then pools the larger grids).
    pinpoints = [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7) if i * j <= 9]
    processor.image_processor.image_grid_pinpoints = pinpoints


def _settings_tiles(processor: Any, family_name: str) -> None:
    processor.image_processor.max_patches = 12


def _settings_pan_and_scan(processor: Any, family_name: str) -> None:
    # The processor's own defaults turn it off whatever the image processor says; its instance defaults win.
    processor.images_kwargs = {**type(processor).images_kwargs, "do_pan_and_scan": True}


def _settings_no_crop(processor: Any, family_name: str) -> None:
    processor.image_processor.do_center_crop = False


Configure = Callable[[Any, str], None] | None
# (family, settings id, how to set them, the grid of single-image sizes, multi-image rows)
CASES: list[tuple[str, str, Configure, list, list]] = [
    *((name, "tiny", None, SMALL, ROWS) for name in FAMILIES),
    *(
        (name, "real_pixels", _settings_qwen, SMALL + QWEN_LARGE, QWEN_ROWS)
        for name in ("qwen2_vl", "qwen3_vl")
    ),
    *((name, "split", _settings_split, SMALL + SPLIT_LARGE, ROWS) for name in ("idefics3", "smolvlm")),
    *((name, "pinpoints", _settings_pinpoints, SMALL, ROWS) for name in ("llava_next", "llava_onevision")),
    ("qwen3_vl", "no_resize", _settings_no_resize, [*SMALL, (64, 96), (32, 128), (33, 32)], ROWS),
    ("internvl", "max_patches_12", _settings_tiles, SMALL, ROWS),
    ("gemma3", "pan_and_scan", _settings_pan_and_scan, SMALL + PAN_LARGE, PAN_ROWS),
    ("llava", "no_center_crop", _settings_no_crop, SMALL, ROWS),
]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_vlm_root: Path) -> dict[str, Path]:
    return {name: build_tiny_vlm(name, tiny_vlm_root / name) for name in FAMILIES}


def _processor(tiny_dirs: dict[str, Path], name: str, configure: Configure) -> Any:
    processor = transformers.AutoProcessor.from_pretrained(tiny_dirs[name], local_files_only=True)
    if configure is not None:
        configure(processor, name)
    return processor


def _text(placeholder: str, images: int) -> str:
    """A rendered row as the tiny chat template writes it, with bos and text around every placeholder."""
    pictures = "".join(f"picture {i}: {placeholder}\n" for i in range(images))
    return (
        f"<|bos|><|im_start|>user\n{pictures}What is it?<|im_end|>\n<|im_start|>assistant\nA box.<|im_end|>\n"
    )


@functools.cache
def _image(height: int, width: int) -> Image.Image:
    return Image.new("RGB", (width, height))


def _real(processor: Any, text: str, sizes: list[tuple[int, int]]) -> dict[str, Any] | Exception:
    images = [_image(h, w) for h, w in sizes]
    try:
        return processor(
            text=[text],
            images=[images] if images else None,
            add_special_tokens=False,
            return_text_replacement_offsets=True,
        )
    except (ValueError, RuntimeError) as exc:
        return exc


def _check_row(processor: Any, name: str, sizes: list[tuple[int, int]]) -> int:
    """Compare one row with the real processor; return the tokens its images got (-1 when refused)."""
    family = get_family(name)
    text = _text(family.image_placeholder, len(sizes))
    real = _real(processor, text, sizes)
    if isinstance(real, Exception):
        with pytest.raises(UnsupportedImageSize):
            expand_text(processor, family, text, sizes)
        return -1
    expanded, offsets = expand_text(processor, family, text, sizes)
    ids = processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert ids == list(real["input_ids"][0]), (
        f"{name} {sizes}: {len(ids)} tokens, the processor {len(real['input_ids'][0])}"
    )
    real_offsets = real.get("text_replacement_offsets")
    assert offsets == (list(real_offsets[0]) if real_offsets else [])
    return len(ids)


@pytest.mark.parametrize(
    ("name", "settings", "configure", "sizes", "rows"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in CASES],
)
def test_expansion_matches_processor(
    tiny_dirs: dict[str, Path], name: str, settings: str, configure: Configure, sizes: list, rows: list
) -> None:
    processor = _processor(tiny_dirs, name, configure)
    lengths = {_check_row(processor, name, [size]) for size in sizes}
    for row in rows:
        _check_row(processor, name, row)
    if settings != "tiny":
        # The settings must make the rule bite: images of different sizes get different token counts.
        assert len(lengths - {-1}) > 2, f"{name}: every size got the same tokens; the grid tests nothing"


def test_refused_sizes_name_the_size_and_rule(tiny_dirs: dict[str, Path]) -> None:
    processor = _processor(tiny_dirs, "qwen2_vl", None)
    with pytest.raises(UnsupportedImageSize, match=r"201x1 pixels .*aspect ratio") as caught:
        image_replacements(processor, get_family("qwen2_vl"), [(32, 32), (1, 201)])
    assert caught.value.size == (1, 201)
    with pytest.raises(UnsupportedImageSize, match="at least one pixel"):
        image_replacements(processor, get_family("qwen2_vl"), [(0, 10)])


def test_layout_rewrites_are_the_processors(tiny_dirs: dict[str, Path]) -> None:
    """PaliGemma's bos after the last image and final newline, Mllama's bos when the text has none."""
    paligemma = _processor(tiny_dirs, "paligemma", None)
    expanded, offsets = expand_text(paligemma, get_family("paligemma"), "<image>caption", [(10, 20)])
    assert expanded == "<image>" * 16 + "<|bos|>caption\n"
    assert [o["span"] for o in offsets] == [(0, 7)]
    mllama = _processor(tiny_dirs, "mllama", None)
    assert expand_text(mllama, get_family("mllama"), "<|image|>hi", [(10, 20)]) == ("<|image|><|bos|>hi", [])


def test_placeholder_count_must_match_sizes(tiny_dirs: dict[str, Path]) -> None:
    processor = _processor(tiny_dirs, "llava", None)
    with pytest.raises(ValueError, match="2 '<image>' placeholder"):
        expand_text(processor, get_family("llava"), "<image><image>", [(32, 32)])
    assert image_replacements(processor, get_family("llava"), []) == []


def test_settings_changed_after_a_call_are_followed(tiny_dirs: dict[str, Path]) -> None:
    """The resolved settings are kept per processor, but never past a change to what they come from."""
    processor = _processor(tiny_dirs, "qwen2_vl", None)
    family = get_family("qwen2_vl")
    before = image_replacements(processor, family, [(1000, 1000)])
    set_image_size(processor, family, max_pixels=1003520)  # replaces `size`
    assert len(image_replacements(processor, family, [(1000, 1000)])[0]) > len(before[0])
    _check_row(processor, "qwen2_vl", [(1000, 1000)])
    split = _processor(tiny_dirs, "idefics3", _settings_split)
    _check_row(split, "idefics3", [(60, 80)])
    split.image_processor.max_image_size["longest_edge"] = 16  # in place
    _check_row(split, "idefics3", [(60, 80)])
    split.image_processor.do_image_splitting = False
    _check_row(split, "idefics3", [(60, 80)])
