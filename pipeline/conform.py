"""Images in, images of one shape out: decoding, and the size and channel rules of the ingest config.

Plain functions. `decode_image` turns file bytes into uint8 (H, W, C) or raises `BadImage` with a reason
class; `conform` brings a record to the target (H, W, C) by the configured rules or returns a `Rejected`.
What happens to a rejected input (skip and report, or stop) is the ingest's `on_error` policy.

An image of more than `max_pixels` (W x H, ingest.max_pixels) is refused from its header, before any pixel is
decoded (`check_pixels`): a 30000x30000 PNG of one colour is 874 kB on disk and 2.7 GB decoded.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.records import Record, Rejected

SizeRule = Literal["reject", "resize", "crop"]
ChannelRule = Literal["reject", "convert"]
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's limit (its default when switched off)
# PIL modes read as-is, and modes converted losslessly to one we store (palette, bilevel, gray+alpha, CMYK)
_CONVERT = {"1": "L", "LA": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


class BadImage(ValueError):
    """An input that is not a usable 8-bit image; `kind` is the reason class counted in index.json."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _sixteen_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (modes I;16*, or I holding 0..65535) -> L by round(v * 255 / 65535).

    A fixed rule over the full 16-bit range, not a per-image stretch, so that the same value is the same
    grey in every image (a 12-bit scan stored in 16 bits comes out dark, as it is).
    """
    values = np.asarray(image).astype(np.uint32)
    if image.mode == "I" and (values.size and (int(values.min()) < 0 or int(values.max()) > 65535)):
        raise BadImage("mode", f"32-bit integer image with values {values.min()}..{values.max()} is not stored; "
                               "convert the file to 8-bit")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 (H, W, C) with C in {1, 3, 4}.

    Palette images become RGB (RGBA when they have a transparent colour); bilevel, gray+alpha, CMYK and other
    colour spaces convert to L, RGBA or RGB; 16-bit grayscale scales to 8 bit (see `_sixteen_bit`); float
    images are refused.
    """
    mode = image.mode
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    elif mode in _CONVERT:
        image = image.convert(_CONVERT[mode])
    elif mode.startswith("I;16") or mode == "I":
        image = _sixteen_bit(image)
    elif mode not in ("L", "RGB", "RGBA"):
        raise BadImage("mode", f"PIL mode {mode!r} (float or another unsupported kind) is not stored; convert the "
                               "file to 8-bit")
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def image_to_array(image: Image.Image) -> np.ndarray:
    """An opened PIL image -> uint8 (H, W, C): decodes its first frame (of a multi-frame GIF or TIFF, the
    others are ignored), turns it upright by its EXIF orientation tag, and converts its mode (`pil_to_array`)."""
    image.load()  # decodes fully: a truncated file fails here, not later
    ImageOps.exif_transpose(image, in_place=True)
    return pil_to_array(image)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes (any format Pillow reads) -> uint8 (H, W, C); a truncated or corrupt file raises BadImage."""
    return decode_source(data, max_pixels)[0]


def admit_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to `max_pixels`: it refuses anything over twice its own limit
    (`Image.MAX_IMAGE_PIXELS`, a process-wide setting) before the caller sees the size, so a larger
    ingest.max_pixels raises that limit in this process. A smaller one leaves it alone."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Raise BadImage('oversized') for an image of (W, H) `size` with more than `max_pixels` pixels."""
    w, h = size
    if w * h > max_pixels:
        raise BadImage("oversized", f"is {w}x{h} (W x H), {w * h:,} pixels, over ingest.max_pixels ({max_pixels:,}); "
                                    f"decoded it would take {w * h * 4 / 2**30:.1f} GiB. Raise ingest.max_pixels to "
                                    "read it, or leave it out")


def bomb_reason(err: Exception, max_pixels: int) -> BadImage:
    """Pillow's DecompressionBombError (an image over twice its limit) as our 'oversized' rejection."""
    return BadImage("oversized", f"is over ingest.max_pixels ({max_pixels:,}): {err} Raise ingest.max_pixels to "
                                 "read it, or leave it out")


# formats whose files a shard keeps as they are, and the PIL modes they may be in for that
_KEPT = {"JPEG": ("jpeg", ("L", "RGB")), "PNG": ("png", ("L", "RGB", "RGBA")), "WEBP": ("webp", ("L", "RGB", "RGBA"))}
_ORIENTATION = 0x0112  # the EXIF orientation tag


def decode_source(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """`decode_image`, and the format ('jpeg', 'png', 'webp') under which `data` itself can be stored in a shard:
    set only when decoding it needs no conversion (an 8-bit L/RGB(A) single frame, upright), so that a reader
    decoding the stored bytes gets this image. None when the bytes must be re-encoded. An image over
    `max_pixels` raises BadImage('oversized') from its header."""
    admit_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image.size, max_pixels)
            fmt, modes = _KEPT.get(image.format, (None, ()))
            keep = (fmt is not None and image.mode in modes and not getattr(image, "is_animated", False)
                    and image.getexif().get(_ORIENTATION, 1) == 1)
            return image_to_array(image), fmt if keep else None
    except UnidentifiedImageError:
        raise BadImage("corrupt", "not a readable image (unknown format or corrupt header)") from None
    except Image.DecompressionBombError as err:
        raise bomb_reason(err, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated/corrupt data
        if isinstance(err, BadImage):
            raise
        raise BadImage("corrupt", f"corrupt or truncated image: {err}") from None


def encode_image(image: np.ndarray, fmt: Literal["png", "jpeg", "webp"], quality: int = 95) -> bytes:
    """uint8 (H, W, C) -> PNG (lossless), JPEG or WebP (lossy at `quality`) bytes. RGBA cannot be JPEG: it is
    stored as PNG then (a lossy format that drops alpha would change the data silently)."""
    if fmt == "jpeg" and image.shape[2] == 4:
        fmt = "png"
    settings = {"png": {"compress_level": 1}, "jpeg": {"quality": quality}, "webp": {"quality": quality}}[fmt]
    buf = io.BytesIO()
    _to_pil(image).save(buf, format=fmt.upper(), **settings)
    return buf.getvalue()


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image, _MODES[image.shape[2]])


def _from_pil(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """L <-> RGB <-> RGBA with PIL's rules (RGB -> L is ITU-R 601 luma; RGBA -> RGB drops alpha)."""
    if image.shape[2] == channels:
        return image
    return _from_pil(_to_pil(image).convert(_MODES[channels]))


def resize(image: np.ndarray, size: tuple[int, int], rule: SizeRule) -> np.ndarray:
    """Bring (H, W) to `size` = (H, W): 'resize' stretches; 'crop' scales the shorter side, then centre-crops."""
    h, w = size
    pil = _to_pil(image)
    if rule == "crop":
        scale = max(h / image.shape[0], w / image.shape[1])
        sh, sw = max(h, round(image.shape[0] * scale)), max(w, round(image.shape[1] * scale))
        pil = pil.resize((sw, sh), Image.Resampling.LANCZOS)  # antialiased: photos are mostly shrunk
        top, left = (sh - h) // 2, (sw - w) // 2
        pil = pil.crop((left, top, left + w, top + h))
    else:
        pil = pil.resize((w, h), Image.Resampling.LANCZOS)
    return _from_pil(pil)


def conform(
    record: Record, shape: tuple[int, int, int], size_rule: SizeRule, channel_rule: ChannelRule
) -> Record | Rejected:
    """The record at `shape` (H, W, C), or a Rejected naming the mismatch and the setting that would fix it."""
    image = record.image
    h, w, c = shape
    if image.shape[2] != c:
        if channel_rule == "reject":
            return Rejected(
                record.key, "channels",
                f"has {image.shape[2]} channel(s), the dataset has {c}; set ingest.channel_rule=convert "
                f"(or ingest.channels) to convert",
            )
        image = convert_channels(image, c)
    if image.shape[:2] != (h, w):
        if size_rule == "reject":
            return Rejected(
                record.key, "size",
                f"is {image.shape[0]}x{image.shape[1]}, the dataset is {h}x{w}; set ingest.size_rule=resize or "
                "crop (or ingest.image_size) to fit it",
            )
        image = resize(image, (h, w), size_rule)
    if image is record.image:
        return record
    return Record(record.key, np.ascontiguousarray(image), record.label, record.factors, text=record.text)
