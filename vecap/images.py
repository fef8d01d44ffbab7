"""Decode untrusted image bytes into small RGB images on CPU workers.

Everything a web image can be is handled here, so that the engine actors only
ever receive small, valid RGB pixel buffers: decompression bombs and oversized
files are refused before decoding, animated images give their first frame, 16-bit,
CMYK, palette, grey and alpha images become plain RGB (alpha over white), EXIF
orientation is applied, and the result is downscaled to what the model needs.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from vecap import vocab


class ImageRejected(Exception):
    """An image that cannot be used; ``status`` is one of the ``vocab.IMAGE_*`` statuses."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PreparedImage:
    """Raw RGB bytes (row-major, 3 bytes a pixel) of the downscaled image, and the original size."""

    pixels: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int

    def to_pil(self):
        from PIL import Image

        return Image.frombytes("RGB", (self.width, self.height), self.pixels)


def _target_size(width: int, height: int, short_side: int | None, area: int | None = None) -> tuple[int, int]:
    """Scale so the shorter side is at most ``short_side`` and width x height at most ``area``
    (None: no such bound), keeping the aspect ratio; never upscale."""
    shorter = min(width, height)
    scale = 1.0 if short_side is None or shorter <= short_side else short_side / shorter
    if area is not None and width * height * scale * scale > area:
        # The area bound is the tighter one: round down, so that the result never exceeds it.
        scale = math.sqrt(area / (width * height))
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if scale == 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im):
    """Any PIL mode → RGB; transparency is composited over white, 16-bit is scaled, not clipped."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" else max(float(arr.max()), 1.0)
        if im.mode == "I" and arr.max() <= 255:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype("uint8")
        im = Image.fromarray(arr, mode="L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def prepare_image(
    data: bytes | None, short_side: int | None, max_pixels: int, max_bytes: int, area: int | None = None
) -> PreparedImage:
    """Decode, normalise and downscale one image; raises :class:`ImageRejected` with a status.

    The result's shorter side is at most ``short_side`` (LLaVA's processor then crops a square)
    and its area at most ``area`` (a native-resolution model such as Qwen2-VL, whose processor
    keeps the aspect ratio and rounds to its patch grid); None: no such bound. ``max_pixels`` and
    ``max_bytes`` are limits on the input, which is refused beyond them."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageRejected(vocab.IMAGE_EMPTY, "zero bytes")
    if len(data) > max_bytes:
        raise ImageRejected(vocab.IMAGE_TOO_LARGE, f"{len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageRejected(vocab.IMAGE_EMPTY, f"size {width}x{height}")
            if width * height > max_pixels:
                raise ImageRejected(vocab.IMAGE_TOO_LARGE, f"{width}x{height} pixels > limit {max_pixels}")
            if getattr(im, "is_animated", False):
                im.seek(0)
            target = _target_size(width, height, short_side, area)
            if im.format == "JPEG":
                im.draft("RGB", target)  # decode at reduced scale: much cheaper for big JPEGs
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to rotate
            im = _to_rgb(im)
            # exif_transpose may swap the axes: recompute from the decoded image.
            target = _target_size(im.width, im.height, short_side, area)
            if im.size != target:
                im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(vocab.IMAGE_TOO_LARGE, str(err)) from None
    except UnidentifiedImageError:
        raise ImageRejected(vocab.IMAGE_UNDECODABLE, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as err:
        raise ImageRejected(vocab.IMAGE_UNDECODABLE, f"{type(err).__name__}: {err}") from None
    return PreparedImage(im.tobytes(), im.width, im.height, width, height)


_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),
    (b"GIF8", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
)


def sniff_image_format(data: bytes) -> str | None:
    """The real file extension of image bytes (jpg/png/webp/gif/bmp/tiff), None if unknown.

    img2dataset names every member ``.jpg`` when it keeps the original bytes, so the
    write stage names its members from this instead.
    """
    for magic, offset, ext in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if ext == "webp" and data[:4] != b"RIFF":
                continue
            return ext
    return None


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the header alone (no decode); (None, None) if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any unreadable header means "unknown"
        return None, None
