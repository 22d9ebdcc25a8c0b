"""Safe image loading: upright RGB images out, and every bad image a DataError that says where and why."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.data.images import BadImage, load_image
from vlmtune.errors import DataError

WHERE = {"source": "data/train.jsonl", "row": 7, "index": 1}


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = random.Random(0)
    return Image.frombytes(
        mode, size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * len(mode)))
    )


def _bad(image, **kwargs) -> BadImage:
    with pytest.raises(DataError) as info:
        load_image(image, **WHERE, **kwargs)
    err = info.value
    assert isinstance(err, BadImage)
    message = str(err)
    assert message.startswith("data/train.jsonl row 7 image 1 (")
    assert "on_bad_row: skip" in message
    return err


def test_ok_image_is_loaded_rgb_and_detached(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 10), (200, 30, 30)), tmp_path / "red.png")
    image = load_image(path, **WHERE)
    assert (image.mode, image.size, image.getpixel((3, 3))) == ("RGB", (20, 10), (200, 30, 30))
    path.unlink()  # fully decoded: nothing still reads the file
    assert image.getpixel((19, 9)) == (200, 30, 30)


def test_relative_path_resolves_against_image_root(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    _save(Image.new("RGB", (8, 8)), tmp_path / "imgs" / "a.png")
    assert load_image("imgs/a.png", **WHERE, image_root=tmp_path).size == (8, 8)
    assert load_image(str(tmp_path / "imgs" / "a.png"), **WHERE, image_root="/elsewhere").size == (8, 8)


def test_bytes_pil_and_datasets_dict_inputs(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (6, 4), 128).save(buffer, format="PNG")
    data = buffer.getvalue()
    for given in (data, {"bytes": data, "path": None}, Image.open(io.BytesIO(data))):
        image = load_image(given, **WHERE)
        assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (6, 4), (128, 128, 128))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, red on the left; orientation 6 says "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(path, **WHERE)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left (red) half is now on top


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: the white background
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", (0, 255), (0, 0, 0)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_modes_become_rgb(tmp_path: Path, mode: str, color, expected) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = _save(Image.new(mode, (5, 5), color), tmp_path / f"x{suffix}")
    image = load_image(path, **WHERE)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == pytest.approx(expected, abs=2)


def test_16_bit_grayscale_keeps_its_range(tmp_path: Path) -> None:
    path = _save(Image.new("I;16", (4, 4), 32768), tmp_path / "deep.png")
    assert load_image(path, **WHERE).getpixel((0, 0)) == (128, 128, 128)


def test_missing_file(tmp_path: Path) -> None:
    err = _bad("imgs/nope.jpg", image_root=tmp_path)
    assert err.problem == "file not found"
    assert f"imgs/nope.jpg -> {tmp_path / 'imgs/nope.jpg'}" in str(err)
    assert "data.image_root" in str(err)


def test_directory_and_url_and_wrong_type(tmp_path: Path) -> None:
    assert "directory" in _bad(tmp_path).problem
    assert "not downloaded" in _bad("https://example.com/cat.png").problem
    assert "not int" in _bad(3).problem


def test_truncated_file(tmp_path: Path) -> None:
    whole = _save(_noise((64, 64)), tmp_path / "whole.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    err = _bad(path)
    assert "cannot decode" in err.problem or "cannot read" in err.problem
    assert str(path) in str(err)


def test_corrupt_bytes(tmp_path: Path) -> None:
    whole = _save(_noise((32, 32)), tmp_path / "whole.jpg", quality=90).read_bytes()
    assert "image" in _bad(whole[:200]).problem


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am text\n")
    err = _bad(path)
    assert err.problem == "not an image PIL can read"
    assert "notes.jpg" in str(err)


def test_too_many_pixels_refused_before_decoding(tmp_path: Path) -> None:
    whole = _save(_noise((100, 50)), tmp_path / "big.png").read_bytes()
    path = tmp_path / "big_truncated.png"
    path.write_bytes(whole[:100])  # header only: refused on its size, so never decoded
    err = _bad(path, max_pixels=4_999)
    assert "too many pixels: 100x50 = 5,000 > 4,999" in err.problem
    assert load_image(tmp_path / "big.png", **WHERE, max_pixels=5_000).size == (100, 50)


def test_pil_decompression_bomb_limit_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    assert "too many pixels" in _bad(path).problem  # above twice PIL's limit: PIL itself refuses
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, **WHERE).size == (100, 100)  # PIL only warns; our own limit is what applies
