"""Decoding and checking image bytes that come from outside (providers, users, generators).

Every check happens before a full decode where possible, so that a decompression bomb or an HTML
error page costs almost nothing.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageStat, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 MP: 8192x8192, far above any model's output
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


class ImageRejected(ValueError):
    """The bytes are not an acceptable image; the message says why, for the user."""


@dataclass(frozen=True)
class CheckedImage:
    image: Image.Image  # fully decoded, RGB or RGBA
    format: str
    width: int
    height: int


def _describe(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image"
    if head.startswith((b"{", b"[")):
        return "JSON, not an image"
    return "not an image in a known format"


def decode_image(
    data: bytes,
    *,
    expected_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reject_blank: bool = False,
) -> CheckedImage:
    """Decode `data` fully and check it; raise ImageRejected with a clear reason otherwise."""
    if not data:
        raise ImageRejected("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "?"
            if fmt not in ACCEPTED_FORMATS:
                raise ImageRejected(f"image format {fmt} is not accepted")
            w, h = img.size
            # Checked on the header, before pixels are decoded: a bomb never gets allocated.
            if w * h > max_pixels:
                raise ImageRejected(
                    f"the image is {w}x{h} ({w * h} pixels), over the limit of {max_pixels}"
                )
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own guard fires at open() for the very largest declared sizes.
        raise ImageRejected(
            f"the image declares more pixels than the limit of {max_pixels} (a decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        raise ImageRejected(f"the data is {_describe(data)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt streams as OSError / SyntaxError.
        raise ImageRejected(f"the image is corrupt or truncated ({exc})") from None
    if expected_size is not None and (w, h) != tuple(expected_size):
        raise ImageRejected(
            f"the image is {w}x{h}, but {expected_size[0]}x{expected_size[1]} was asked for"
        )
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    if reject_blank:
        extrema = ImageStat.Stat(img.convert("RGB")).extrema
        if all(lo == hi for lo, hi in extrema):
            raise ImageRejected("the image is blank (a single colour)")
    return CheckedImage(image=img, format=fmt, width=w, height=h)


def encode_png(img: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes for `img`, deterministic for the same pixels and text."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info, optimize=False)
    return buf.getvalue()


class PillowCodec:
    """The core's image codec (decode and check outside bytes, encode PNG), on Pillow."""

    rejected = ImageRejected

    def decode(
        self, data: bytes, *, max_pixels: int | None = None, reject_blank: bool = False
    ) -> CheckedImage:
        return decode_image(data, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, reject_blank=reject_blank)

    def to_png(self, decoded: CheckedImage, mode: str | None = None) -> bytes:
        image = decoded.image if mode is None else decoded.image.convert(mode)
        return encode_png(image)

    def extend(self, png: bytes, direction: str) -> tuple[bytes, bytes]:
        source = Image.open(io.BytesIO(png)).convert("RGB")
        w, h = source.size
        grow = {"zoom": (w, h), "left": (w // 2, 0), "right": (w // 2, 0), "up": (0, h // 2),
                "down": (0, h // 2)}[direction]
        cw, ch = w + grow[0], h + grow[1]
        at = {"zoom": ((cw - w) // 2, (ch - h) // 2), "left": (cw - w, 0), "right": (0, 0),
              "up": (0, ch - h), "down": (0, 0)}[direction]
        # The new area starts as the image's mean colour: a neutral start for the model.
        mean = tuple(int(v) for v in ImageStat.Stat(source).mean)
        canvas = Image.new("RGB", (cw, ch), mean)
        canvas.paste(source, at)
        mask = Image.new("L", (cw, ch), 255)
        mask.paste(0, (at[0], at[1], at[0] + w, at[1] + h))
        return encode_png(canvas), encode_png(mask)

    def composite(self, result: bytes, canvas: bytes, mask: bytes) -> bytes:
        base = Image.open(io.BytesIO(canvas)).convert("RGB")
        drawn = Image.open(io.BytesIO(result)).convert("RGB")
        if drawn.size != base.size:
            drawn = drawn.resize(base.size, Image.LANCZOS)
        keep = Image.open(io.BytesIO(mask)).convert("L").point(lambda v: 255 if v < 128 else 0)
        drawn.paste(base, (0, 0), keep)  # the original pixels, exactly
        return encode_png(drawn)
