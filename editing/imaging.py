"""Image rules for templates, masks and results: decoding, orientation, size limits, padding and blending.

Pure functions on bytes, Pillow images and numpy arrays. Arrays are row-major: images are (H, W, 3) uint8
RGB and masks are (H, W) bool, while sizes passed as tuples follow Pillow's (width, height) order.
"""

from __future__ import annotations

import io
import logging
import math
from typing import BinaryIO

import numpy as np
from django.utils.translation import gettext as _
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Error codes carried by ImageRuleError.code, stable for API clients.
CODE_EMPTY_FILE = "empty_file"
CODE_INVALID_IMAGE = "invalid_image"
CODE_TOO_LARGE = "too_large"
CODE_TRUNCATED = "truncated"
CODE_MASK_SIZE_MISMATCH = "mask_size_mismatch"
CODE_EMPTY_MASK = "empty_mask"
CODE_BAD_SHAPE = "bad_shape"

# Longer side over shorter side. A 1x100000 strip fits the pixel limit but is no photo or banner, and
# at the working size it degenerates to a one-pixel-wide column.
MAX_ASPECT_RATIO = 16
# The shorter side of a template: 64 pixels are four latent tokens of 16 pixels, about the least that a
# mask can be painted on and an edit can change.
MIN_TEMPLATE_SIDE = 64

# A mask pixel is selected when its strength is at least half of full scale: 128 of 255.
MASK_THRESHOLD_8BIT = 128
# ITU-R BT.601 luma weights 0.299, 0.587, 0.114 in 16-bit fixed point (sum 65536), the integer form that
# Pillow 13's RGB -> L conversion uses, so both round identically.
LUMA_WEIGHTS = (19595, 38470, 7471)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageRuleError(ValueError):
    """Rejection of an upload: `field` names the form field, `code` the rule, `message` the translated text."""

    def __init__(self, field: str, code: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def open_upright(data: bytes | BinaryIO, *, field: str, max_pixels: int, max_bytes: int) -> Image.Image:
    """Decode an upload completely and rotate it upright according to its EXIF orientation.

    Checks, in this order: the byte size (at most `max_bytes`, not empty), the image header, the pixel
    count from the header (at most `max_pixels` and at most Pillow's `Image.MAX_IMAGE_PIXELS`, before any
    pixel data is decoded), then the full decode. A truncated file raises instead of returning a partial
    image. Raises ImageRuleError.
    """
    payload = _read_limited(data, field=field, max_bytes=max_bytes)
    pixel_limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        pixel_limit = min(pixel_limit, int(Image.MAX_IMAGE_PIXELS))

    try:
        image = Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, None, pixel_limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        logger.info("Rejected %s upload: not a readable image (%s)", field, exc)
        raise ImageRuleError(
            field,
            CODE_INVALID_IMAGE,
            _("The %(field)s file is not a readable image. Upload a PNG, JPEG, WebP, TIFF, BMP or GIF file.")
            % {"field": _field_label(field)},
        ) from None

    pixels = image.width * image.height
    if pixels > pixel_limit:
        image.close()
        raise _too_many_pixels(field, (image.width, image.height), pixel_limit)

    try:
        image.load()
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, (image.width, image.height), pixel_limit) from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise ImageRuleError(
                field,
                CODE_TRUNCATED,
                _("The %(field)s file is truncated: its pixel data ends early. Upload the complete file again.")
                % {"field": _field_label(field)},
            ) from None
        raise _undecodable(field, exc) from None
    except (SyntaxError, ValueError) as exc:
        raise _undecodable(field, exc) from None

    return _exif_upright(image, field)


def to_rgb8(image: Image.Image, *, field: str = "image") -> np.ndarray:
    """Convert any supported Pillow mode to an (H, W, 3) uint8 RGB array, dropping alpha.

    16-bit and 32-bit integer grayscale is scaled by 255/65535 with rounding, so values above 255 keep their
    contrast instead of clipping. Pillow decodes 16-bit RGB PNGs to 8-bit RGB itself (high byte).
    Float images use Pillow's convention of a 0..255 range and are clipped to it.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_8(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = _float_to_8(np.asarray(image, dtype=np.float32))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)

    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRuleError(
            field,
            CODE_INVALID_IMAGE,
            _("The %(field)s file uses the unsupported color mode %(mode)s. Save it as RGB or grayscale.")
            % {"field": _field_label(field), "mode": mode},
        ) from exc
    return np.array(rgb, dtype=np.uint8)


def read_template(data: bytes | BinaryIO, *, max_pixels: int, max_bytes: int) -> np.ndarray:
    """Decode a template upload into an upright (H, W, 3) uint8 array. Raises ImageRuleError.

    Transparent pixels (a cut-out product photo) are flattened onto white, as a browser shows them on a
    white page, instead of showing whatever color they store.
    """
    image = open_upright(data, field="image", max_pixels=max_pixels, max_bytes=max_bytes)
    rgb = to_rgb8(image, field="image")
    alpha = _alpha_channel(image)
    if alpha is None or int(alpha.min()) == 255:
        return rgb
    weight = alpha.astype(np.float32)[..., None] / 255.0
    return np.rint(rgb * weight + 255.0 * (1.0 - weight)).astype(np.uint8)


def check_template_shape(width: int, height: int) -> None:
    """Raise ImageRuleError for a template too small to edit or too elongated for a photo or banner."""
    if min(width, height) < MIN_TEMPLATE_SIDE:
        raise ImageRuleError(
            "image",
            CODE_BAD_SHAPE,
            _(
                "The image is %(width)d×%(height)d pixels; its shorter side must be at least %(minimum)d pixels. "
                "Upload a larger image."
            ) % {"width": width, "height": height, "minimum": MIN_TEMPLATE_SIDE},
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRuleError(
            "image",
            CODE_BAD_SHAPE,
            _(
                "The image is %(width)d×%(height)d pixels; its longer side may be at most %(ratio)d times "
                "its shorter side. Crop it to a less elongated shape."
            ) % {"width": width, "height": height, "ratio": MAX_ASPECT_RATIO},
        )


def read_mask(data: bytes | BinaryIO, *, size: tuple[int, int], max_pixels: int, max_bytes: int) -> np.ndarray:
    """Decode a mask upload into an upright (H, W) bool array; True marks pixels to edit.

    `size` is the template's upright (width, height) and the mask must match it. The strength of a pixel is
    its luminance when the mask is opaque. When some pixel has alpha below full scale, the strength is the
    alpha channel, because max(luminance * alpha, alpha) equals alpha. Pixels with at least 50% strength are
    selected, so faint noise selects nothing. Raises ImageRuleError, also when nothing is selected.
    """
    image = open_upright(data, field="mask", max_pixels=max_pixels, max_bytes=max_bytes)
    if image.size != tuple(size):
        raise ImageRuleError(
            "mask",
            CODE_MASK_SIZE_MISMATCH,
            _(
                "The mask is %(mask_w)d×%(mask_h)d pixels but the image is %(image_w)d×%(image_h)d pixels "
                "(width × height, after EXIF rotation). Export the mask at the image's size."
            )
            % {"mask_w": image.width, "mask_h": image.height, "image_w": size[0], "image_h": size[1]},
        )

    selected = mask_strength(image) >= MASK_THRESHOLD_8BIT
    if not selected.any():
        raise ImageRuleError(
            "mask",
            CODE_EMPTY_MASK,
            _(
                "The mask selects no pixels: every pixel is below half strength (128 of 255). Paint the "
                "region to edit in white, or opaque on a transparent mask, and upload it again."
            ),
        )
    return selected


def mask_strength(image: Image.Image) -> np.ndarray:
    """Return the (H, W) uint8 selection strength of a mask image: alpha if it has transparency, else luminance."""
    alpha = _alpha_channel(image)
    if alpha is not None and int(alpha.min()) < 255:
        return alpha
    return luminance(to_rgb8(image, field="mask"))


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Return the (H, W) uint8 BT.601 luma of an (H, W, 3) uint8 array, rounded like Pillow's `convert("L")`."""
    weighted = rgb.astype(np.uint32) @ np.array(LUMA_WEIGHTS, dtype=np.uint32)
    return ((weighted + 32768) >> 16).astype(np.uint8)


# zlib level for stored PNGs. On a 512x512 photo level 1 took 22 ms against 71 ms for Pillow's default 6, and
# the file was about 9% larger. Every edit writes its result on the request's critical path.
PNG_COMPRESS_LEVEL = 1


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image or an (H, W) bool/uint8 mask as PNG bytes."""
    if image.ndim == 2 and image.dtype == np.bool_:
        pil = Image.fromarray(image.astype(np.uint8) * 255, mode="L")
    elif image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        pil = Image.fromarray(image)
    else:
        raise ValueError(
            f"image has shape {image.shape} and dtype {image.dtype}; pass (H, W, 3) uint8 or (H, W) bool/uint8"
        )
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes into an (H, W, 3) uint8 array. Raises ImageRuleError for other formats."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise ImageRuleError(
                "image",
                CODE_INVALID_IMAGE,
                _("Expected a PNG file but got %(format)s.") % {"format": image.format},
            )
        image.load()
        return to_rgb8(image)


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def pad_to_multiple(image: np.ndarray, multiple: int = 16) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad bottom and right up to multiples of `multiple`; return the padded array and the original (H, W).

    Images are padded by repeating their edge pixels, bool masks with False. Never crops or resizes.
    """
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be at least 1")
    height, width = image.shape[:2]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if pad_h == 0 and pad_w == 0:
        return image, (height, width)

    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    if image.dtype == np.bool_:
        padded = np.pad(image, widths, mode="constant", constant_values=False)
    else:
        padded = np.pad(image, widths, mode="edge")
    return padded, (height, width)


def crop_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Return the top-left (height, width) region of `array`, the inverse of `pad_to_multiple`."""
    if array.shape[0] < height or array.shape[1] < width:
        raise ValueError(
            f"cannot crop array of shape {array.shape} to height={height}, width={width}; it is smaller"
        )
    return array[:height, :width]


def fit_working_size(width: int, height: int, max_pixels: int, multiple: int = 16) -> tuple[int, int]:
    """Return the (width, height) to resize an image to before padding it to multiples of `multiple`.

    The input size is returned unchanged when its padded size has at most `max_pixels` pixels. Otherwise
    the image is scaled down, preserving the aspect ratio up to integer rounding, until the padded size fits.
    The padding itself is left to `pad_to_multiple`, so the image is never stretched to a multiple.
    """
    if width < 1 or height < 1:
        raise ValueError(f"width={width}, height={height} must both be at least 1")
    if max_pixels < multiple * multiple:
        raise ValueError(f"max_pixels={max_pixels} must be at least multiple**2 = {multiple * multiple}")

    if _padded_area(width, height, multiple) <= max_pixels:
        return width, height

    scale = math.sqrt(max_pixels / (width * height))
    while True:
        new_width = max(1, math.floor(width * scale))
        new_height = max(1, math.floor(height * scale))
        if _padded_area(new_width, new_height, multiple) <= max_pixels:
            return new_width, new_height
        # Padding adds up to multiple - 1 pixels per side, so shrink in small steps until it fits.
        scale *= 0.99


def token_mask(mask: np.ndarray, patch: int = 16, dilation: int = 1) -> np.ndarray:
    """Return the (ceil(H / patch), ceil(W / patch)) bool grid of tokens that touch the mask.

    A token is masked when any pixel of its patch is masked. The grid is then dilated by `dilation` tokens
    in all eight directions (a square structuring element).
    """
    if patch < 1:
        raise ValueError(f"patch={patch} must be at least 1")
    if dilation < 0:
        raise ValueError(f"dilation={dilation} must be 0 or more")
    padded, _size = pad_to_multiple(mask.astype(bool), patch)
    rows, cols = padded.shape[0] // patch, padded.shape[1] // patch
    tokens = padded.reshape(rows, patch, cols, patch).any(axis=(1, 3))
    return _dilate_square(tokens, dilation)


def mask_ratio(mask: np.ndarray, patch: int = 16, dilation: int = 1) -> float:
    """Return the fraction of tokens that `token_mask` marks, in [0, 1]."""
    return float(token_mask(mask, patch, dilation).mean())


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Grow a bool mask by `px` pixels: select every pixel within Euclidean distance `px` of the mask."""
    if px < 0:
        raise ValueError(f"px={px} must be 0 or more")
    mask = mask.astype(bool)
    grown = np.zeros(mask.shape, dtype=bool)
    window = _mask_window(mask, px + 1)
    if window is not None:
        grown[window] = _distance_to_mask(mask[window], px) <= px
    return grown


def feather_alpha(mask: np.ndarray, feather_px: int) -> np.ndarray:
    """Return (H, W) float32 blend weights: 1 on the mask, a smooth ramp outside it, 0 beyond `feather_px`.

    Outside the mask the weight is smoothstep(1 - d / (feather_px + 1)) for a Euclidean distance d of at most
    `feather_px` pixels, so it is positive exactly on `dilate(mask, feather_px)`.
    """
    if feather_px < 0:
        raise ValueError(f"feather_px={feather_px} must be 0 or more")
    mask = mask.astype(bool)
    if feather_px == 0:
        return mask.astype(np.float32)

    alpha = np.zeros(mask.shape, dtype=np.float32)
    window = _mask_window(mask, feather_px + 1)
    if window is None:
        return alpha

    distance = _distance_to_mask(mask[window], feather_px)
    ramp = np.clip(1.0 - distance / (feather_px + 1), 0.0, 1.0)
    local = ramp * ramp * (3.0 - 2.0 * ramp)
    local[distance > feather_px] = 0.0
    local[mask[window]] = 1.0
    alpha[window] = local
    return alpha


def composite(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend `generated` over `original` with (H, W) weights `alpha`, returning (H, W, 3) uint8.

    Pixels where alpha == 0 are bit-identical copies of `original`.
    """
    if original.shape != generated.shape or original.shape[:2] != alpha.shape:
        raise ValueError(
            f"original {original.shape}, generated {generated.shape} and alpha {alpha.shape} must share (H, W)"
        )
    result = original.copy()
    window = _mask_window(alpha > 0, 0)
    if window is None:
        return result

    # Blend only inside the bounding box of alpha > 0, because most edits touch a small part of the image.
    weight = alpha[window].astype(np.float32)[:, :, None]
    blended = original[window].astype(np.float32) * (1.0 - weight) + generated[window].astype(np.float32) * weight
    local = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    keep = alpha[window] == 0
    local[keep] = original[window][keep]
    result[window] = local
    return result


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _field_label(field: str) -> str:
    """Return the translated name of an upload field for messages; unknown fields keep their identifier."""
    labels = {"image": _("image"), "mask": _("mask")}
    return labels.get(field, field)


def _read_limited(data: bytes | bytearray | memoryview | BinaryIO, *, field: str, max_bytes: int) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
    else:
        # Read one byte past the limit, so an oversized stream is detected without reading all of it.
        payload = data.read(max_bytes + 1)

    if len(payload) == 0:
        raise ImageRuleError(
            field, CODE_EMPTY_FILE, _("The %(field)s file is empty (0 bytes). Upload the file again.") % {"field": _field_label(field)}
        )
    if len(payload) > max_bytes:
        raise ImageRuleError(
            field,
            CODE_TOO_LARGE,
            _(
                "The %(field)s file is larger than the limit of %(limit)s (%(limit_bytes)d bytes). Upload a "
                "smaller or more compressed file."
            )
            % {"field": _field_label(field), "limit": megabytes(max_bytes), "limit_bytes": max_bytes},
        )
    return payload


def megabytes(size: int) -> str:
    """Format a byte count as megabytes with one decimal, as the upload form's help text states the limit."""
    return f"{size / 2**20:.1f} MB"


def _too_many_pixels(field: str, size: tuple[int, int] | None, limit: int) -> ImageRuleError:
    if size is None:
        message = _(
            "The %(field)s has more than %(limit)d pixels. Downscale it to at most %(limit)d pixels and upload it again."
        ) % {"field": _field_label(field), "limit": limit}
    else:
        # The largest size with the same aspect ratio within the limit: nothing is padded at multiple 1.
        target = fit_working_size(size[0], size[1], limit, multiple=1)
        message = _(
            "The %(field)s is %(width)d×%(height)d = %(pixels)d pixels, above the limit of %(limit)d pixels. "
            "Downscale it, for example to %(target_width)d×%(target_height)d, and upload it again."
        ) % {
            "field": _field_label(field), "width": size[0], "height": size[1], "pixels": size[0] * size[1],
            "limit": limit, "target_width": target[0], "target_height": target[1],
        }
    return ImageRuleError(field, CODE_TOO_LARGE, message)


def _undecodable(field: str, exc: Exception) -> ImageRuleError:
    logger.info("Rejected %s upload: decoding failed (%s)", field, exc)
    return ImageRuleError(
        field,
        CODE_INVALID_IMAGE,
        _("The %(field)s file is damaged and cannot be decoded. Export it again as PNG or JPEG.") % {"field": _field_label(field)},
    )


def _exif_upright(image: Image.Image, field: str) -> Image.Image:
    try:
        upright = ImageOps.exif_transpose(image)
    except (ValueError, OSError, SyntaxError, KeyError, TypeError) as exc:
        # A damaged EXIF block should not reject an otherwise valid image, so keep the stored orientation.
        logger.warning("Ignoring unreadable EXIF orientation of %s upload: %s", field, exc)
        return image
    return upright if upright is not None else image


def _alpha_channel(image: Image.Image) -> np.ndarray | None:
    """Return the (H, W) uint8 alpha of `image`, or None when it has no alpha channel or transparency key."""
    if image.mode in _ALPHA_MODES:
        return np.array(image.getchannel(image.mode[-1]), dtype=np.uint8)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB", "1"):
        return np.array(image.convert("RGBA").getchannel("A"), dtype=np.uint8)
    return None


def _sixteen_bit_to_8(values: np.ndarray) -> np.ndarray:
    # 65535 / 257 = 255, so full scale maps to full scale. Mode "I" can hold any int32, so clip to 16 bits.
    clipped = np.clip(values.astype(np.int64), 0, 65535)
    return ((clipped + 128) // 257).astype(np.uint8)


def _float_to_8(values: np.ndarray) -> np.ndarray:
    cleaned = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(cleaned), 0, 255).astype(np.uint8)


def _padded_area(width: int, height: int, multiple: int) -> int:
    return (-(-width // multiple) * multiple) * (-(-height // multiple) * multiple)


def _dilate_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a 2-D bool array with a (2 * radius + 1) square, separably along rows then columns."""
    if radius == 0:
        return mask
    size = 2 * radius + 1
    padded = np.pad(mask, ((0, 0), (radius, radius)), constant_values=False)
    rows = sliding_window_view(padded, size, axis=1).any(axis=-1)
    padded = np.pad(rows, ((radius, radius), (0, 0)), constant_values=False)
    return sliding_window_view(padded, size, axis=0).any(axis=-1)


def _mask_window(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """Return the bounding box of the True pixels grown by `margin` and clipped to the array, or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (
        slice(max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + margin + 1)),
        slice(max(0, int(cols[0]) - margin), min(width, int(cols[-1]) + margin + 1)),
    )


def _distance_to_mask(mask: np.ndarray, limit: int) -> np.ndarray:
    """Return the (H, W) float32 Euclidean distance of each pixel to the nearest True pixel.

    Distances above `limit` are not exact but always come back above `limit`, which is enough for thresholding.
    Works in two steps: the horizontal distance per row, then the minimum of dy^2 + dx^2 over row offsets
    |dy| <= limit, which is exact for every distance up to `limit`.
    """
    height, width = mask.shape
    far = limit + 1
    if not mask.any():
        return np.full(mask.shape, float(far), dtype=np.float32)

    columns = np.arange(width, dtype=np.int32)
    left = np.where(mask, columns, -(width + far))
    left = np.maximum.accumulate(left, axis=1)
    right = np.where(mask, columns, 2 * width + far)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    horizontal = np.minimum(np.minimum(columns - left, right - columns), far)

    # int32 is enough: horizontal distances are capped at limit + 1, so sums stay below (limit + 1)^2 + limit^2.
    squared = horizontal.astype(np.int32) ** 2
    best = squared.copy()
    for dy in range(1, min(limit, height - 1) + 1):
        shifted_down = np.full_like(squared, far * far)
        shifted_down[dy:] = squared[:-dy]
        shifted_up = np.full_like(squared, far * far)
        shifted_up[:-dy] = squared[dy:]
        best = np.minimum(best, np.minimum(shifted_down, shifted_up) + dy * dy)
    return np.sqrt(np.minimum(best, far * far)).astype(np.float32)
