"""Open one image of a data row safely: it exists, decodes completely, is upright, RGB, and not a pixel bomb;
or read only its upright size from the header, as indexing does.

Every failure is a `BadImage` (a `DataError`) whose message names the data file, the row, the image's index in
the row and its path, says what is wrong, and what to do about it; `problem` holds the bare cause, for a caller
that counts the row under `data.on_bad_row: skip` instead.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmtune.errors import DataError

# 50 megapixels: a 7,000 x 7,000 photo passes; decoded as RGB it is 150 MB. Far beyond what any VLM processor
# keeps (they resize to at most a few megapixels), and far below what a crafted file can claim.
DEFAULT_MAX_PIXELS = 50_000_000
_ORIENTATION = 0x0112  # the EXIF tag

_SKIP_HINT = "or set data.on_bad_row: skip to skip such rows and count them"

ImageInput = str | os.PathLike[str] | bytes | Image.Image | Mapping[str, Any]


class BadImage(DataError):
    """An image of a data row cannot be used.

    Attributes:
        problem: What is wrong, without the location (for counting a skipped row).
        path: The image's path as resolved, or a description of in-memory data.
    """

    def __init__(self, where: str, path: str, problem: str, hint: str) -> None:
        self.problem = problem
        self.path = path
        super().__init__(f"{where} ({path}): {problem}\n({hint}; {_SKIP_HINT})")


def resolve_image_path(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None) -> Path:
    """`path` itself when absolute (or when there is no `image_root`), else `image_root / path`."""
    path = Path(os.path.expanduser(path))
    if path.is_absolute() or image_root is None:
        return path
    return Path(os.path.expanduser(image_root)) / path


def load_image(
    image: ImageInput,
    *,
    source: str,
    row: int,
    index: int,
    image_root: str | os.PathLike[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open, check and normalise one image of a data row.

    The size is checked from the header, before any pixel is decoded; then the whole image is decoded (a
    truncated file fails here, not later), turned upright by its EXIF orientation, and converted to RGB
    (transparency composited onto white).

    Args:
        image: A path (relative ones are resolved against `image_root`), encoded bytes, an already opened PIL
            image (e.g. from a `datasets` image column), or a `datasets` image dict (`bytes` and/or `path`).
        source: The data file (or data set) the row comes from, as error messages should name it.
        row: The row's index in `source`.
        index: The image's index within the row.
        image_root: The folder relative image paths are relative to (`data.image_root`).
        max_pixels: Largest width x height accepted.

    Returns:
        A fully loaded RGB image, independent of any open file.

    Raises:
        BadImage: when the image is missing, unreadable, not an image, truncated, or larger than `max_pixels`.
    """
    with _opened(image, f"{source} row {row} image {index}", image_root, max_pixels) as (im, where, shown):
        try:
            im.load()  # decode everything now: a truncated or corrupt file fails here
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise BadImage(
                where, shown, f"cannot decode the image: {exc}", "re-encode or replace the file"
            ) from None


def header_size(
    image: ImageInput,
    *,
    source: str,
    row: int,
    index: int,
    image_root: str | os.PathLike[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The `(height, width)` an image will have once opened by `load_image`, read from its header only.

    No pixel is decoded (a file truncated after its header passes here, and fails when `load_image` decodes
    it); the EXIF orientation is applied, so a rotated photo reports its upright size.

    Raises:
        BadImage: when the image is missing, unreadable, not an image, or larger than `max_pixels`.
    """
    with _opened(image, f"{source} row {row} image {index}", image_root, max_pixels) as (im, where, shown):
        width, height = im.size
        try:
            # A PNG's EXIF may follow its pixels, and PIL decodes them to find it: only the EXIF before them is
            # read here (a rotated PNG whose EXIF comes last is caught when its row is read: the sizes differ).
            unread = im.format == "PNG" and "exif" not in im.info
            orientation = 1 if unread else im.getexif().get(_ORIENTATION, 1)
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadImage(
                where, shown, f"cannot read the image's metadata: {exc}", "check the file"
            ) from None
        # EXIF orientations 5-8 turn the image by 90 degrees: exif_transpose swaps its sides.
        return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


@contextmanager
def _opened(
    image: ImageInput, where: str, image_root: str | os.PathLike[str] | None, max_pixels: int
) -> Iterator[tuple[Image.Image, str, str]]:
    """The image opened lazily (header read, size checked), with `where` and how to show its source."""
    if isinstance(image, Mapping):  # a `datasets` Image feature without decoding: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path") or b""
    if isinstance(image, Image.Image):
        _check_size(image, where, "in-memory image", max_pixels)
        yield image, where, "in-memory image"
        return
    if isinstance(image, bytes | bytearray):
        shown = f"{len(image):,} bytes of image data"
        yield _open(io.BytesIO(image), where, shown, max_pixels), where, shown
        return
    if not isinstance(image, str | os.PathLike):
        raise BadImage(
            where,
            repr(image)[:80],
            f"an image must be a path or image data, not {type(image).__name__}",
            "give a path relative to data.image_root, or an absolute path",
        )

    text = os.fspath(image)
    if text.startswith(("http://", "https://")):
        raise BadImage(where, text, "images are not downloaded", "download them and give local paths")
    path = resolve_image_path(text, image_root)
    shown = text if str(path) == text else f"{text} -> {path}"
    if not path.is_file():
        if Path(os.path.expanduser(text)).is_absolute():
            hint = "check the path"
        elif image_root is None:
            hint = "relative paths are resolved against the working directory unless data.image_root is set"
        else:
            hint = f"relative paths are resolved against data.image_root ({image_root}); check it"
        problem = "is a directory, not an image file" if path.is_dir() else "file not found"
        raise BadImage(where, shown, problem, hint)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BadImage(
            where, shown, f"cannot read the file: {exc.strerror or exc}", "check its permissions"
        ) from None
    with handle:
        yield _open(handle, where, shown, max_pixels), where, shown


def _open(stream: Any, where: str, shown: str, max_pixels: int) -> Image.Image:
    # Our own limit, checked below before decoding, is the one that applies; PIL's global one
    # (Image.MAX_IMAGE_PIXELS) only warns below twice its value, and raises above it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(stream)
        except Image.DecompressionBombError as exc:
            raise BadImage(where, shown, f"too many pixels ({exc})", _bomb_hint(max_pixels)) from None
        except UnidentifiedImageError:
            raise BadImage(where, shown, "not an image PIL can read", "check the file's format") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadImage(where, shown, f"cannot read the image: {exc}", "check the file") from None
    _check_size(im, where, shown, max_pixels)
    return im


def _check_size(im: Image.Image, where: str, shown: str, max_pixels: int) -> None:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise BadImage(where, shown, f"empty image ({width}x{height})", "check the file")
    if width * height > max_pixels:
        raise BadImage(
            where,
            shown,
            f"too many pixels: {width}x{height} = {width * height:,} > {max_pixels:,}",
            _bomb_hint(max_pixels),
        )


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16"):
        # 16-bit grayscale: convert("RGB") would clip every value above 255 to white.
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or im.mode.endswith("a"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _bomb_hint(max_pixels: int) -> str:
    return f"downscale it: the limit is {max_pixels:,} pixels, against decompression bombs"
