"""Tests for the image rules: decoding, orientation, mask reading, padding, tokens and compositing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from django.conf import settings
from PIL import Image

if not settings.configured:
    settings.configure(USE_I18N=True)

from editing.imaging import (  # noqa: E402  (settings must exist before gettext runs)
    CODE_EMPTY_FILE,
    CODE_EMPTY_MASK,
    CODE_INVALID_IMAGE,
    CODE_MASK_SIZE_MISMATCH,
    CODE_TOO_LARGE,
    CODE_TRUNCATED,
    ImageRuleError,
    composite,
    crop_to,
    decode_png,
    dilate,
    encode_png,
    feather_alpha,
    fit_working_size,
    luminance,
    mask_ratio,
    open_upright,
    pad_to_multiple,
    read_mask,
    read_template,
    to_rgb8,
    token_mask,
)

LIMITS = {"max_pixels": 4_000_000, "max_bytes": 5_000_000}
EXIF_ORIENTATION_TAG = 0x0112


def _encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png16(values: np.ndarray) -> bytes:
    """Encode (H, W) or (H, W, 3) uint16 values as a 16-bit PNG; Pillow cannot write 16-bit RGB itself."""
    if values.ndim == 2:
        values = values[:, :, None]
    height, width, channels = values.shape
    color_type = {1: 0, 3: 2}[channels]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _mask_png(mask: np.ndarray) -> bytes:
    return _encode(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Decoding and orientation


def test_exif_rotated_jpeg_is_upright_and_mask_aligns() -> None:
    # Stored as 64 wide x 40 high with a red block at the stored top-left corner. Orientation 6 means the
    # viewer rotates it 90 degrees clockwise. Stored pixel (row r, column c) then appears upright at
    # (row c, column 39 - r), so the upright image is 40 wide x 64 high with the block at the top-right.
    # The block is aligned to 8x8 JPEG blocks and chroma is not subsampled, so its edges stay sharp.
    stored = np.full((40, 64, 3), 40, dtype=np.uint8)
    stored[0:8, 0:16] = (250, 10, 10)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    data = _encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95, subsampling=0)

    template = read_template(data, **LIMITS)
    upright_mask = np.zeros((64, 40), dtype=bool)
    upright_mask[0:16, 32:40] = True
    mask = read_mask(_mask_png(upright_mask), size=(template.shape[1], template.shape[0]), **LIMITS)

    assert template.shape == (64, 40, 3)
    assert np.array_equal(mask, upright_mask)
    under_mask = template[mask].astype(int)
    assert under_mask[:, 0].min() > 200
    assert under_mask[:, 1].max() < 60
    outside = template[~mask].astype(int)
    assert outside[:, 0].max() < 100


def test_rgba_mask_uses_alpha_only() -> None:
    # Black paint on a transparent layer: luminance is 0 everywhere, only alpha marks the stroke.
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[8:20, 10:30, 3] = 255
    rgba[25:30, 5:10, 3] = 100  # soft edge below half strength
    data = _encode(Image.fromarray(rgba, mode="RGBA"))

    mask = read_mask(data, size=(48, 32), **LIMITS)

    expected = np.zeros((32, 48), dtype=bool)
    expected[8:20, 10:30] = True
    assert np.array_equal(mask, expected)


def test_rgba_template_flattened_on_white() -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 10)
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 100
    # Rows 2 and 3 are fully transparent.

    rgb = read_template(_encode(Image.fromarray(rgba, mode="RGBA")), **LIMITS)

    assert rgb.shape == (4, 5, 3)
    assert (rgb[0] == (10, 200, 10)).all()
    # 10 * 100/255 + 255 * 155/255 = 158.9; 200 * 100/255 + 155 = 233.4.
    assert (rgb[1] == (159, 233, 159)).all()
    assert (rgb[2:] == 255).all()



def test_sixteen_bit_gray_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896], [40000, 65279, 65535]], dtype=np.uint16)

    rgb = read_template(_png16(values), **LIMITS)

    assert rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == [[0, 1, 128], [156, 254, 255]]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_sixteen_bit_rgb_png_is_read() -> None:
    values = np.zeros((2, 2, 3), dtype=np.uint16)
    values[0, 0] = (65535, 32896, 257)

    rgb = read_template(_png16(values), **LIMITS)

    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [255, 128, 1]
    assert rgb[1, 1].tolist() == [0, 0, 0]


def test_sixteen_bit_mask_threshold_is_half_scale() -> None:
    values = np.array([[32767, 32768, 65535, 1000]], dtype=np.uint16)

    mask = read_mask(_png16(values), size=(4, 1), **LIMITS)

    assert mask.tolist() == [[False, True, True, False]]


def test_palette_png_with_transparency() -> None:
    palette_image = Image.new("P", (6, 4), 0)
    palette_image.putpalette([0, 0, 0, 255, 255, 255, 10, 200, 30] + [0] * (256 * 3 - 9))
    pixels = np.zeros((4, 6), dtype=np.uint8)
    pixels[1:3, 2:4] = 2
    palette_image.putdata(pixels.flatten().tolist())
    data = _encode(palette_image, transparency=0)

    rgb = read_template(data, **LIMITS)
    mask = read_mask(data, size=(6, 4), **LIMITS)

    assert rgb[1, 2].tolist() == [10, 200, 30]
    # The transparent palette entry is flattened onto white.
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert mask.sum() == 4
    assert mask[1:3, 2:4].all()


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red ink
    data = _encode(cmyk, "JPEG", quality=95)

    rgb = read_template(data, **LIMITS)

    assert rgb.shape == (8, 16, 3)
    red, green, blue = rgb[4, 8].astype(int)
    assert red > 200
    assert green < 60
    assert blue < 60


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, 77),
        ("1", 1, 255),
        ("I", 65535, 255),
        ("I;16", 514, 2),
        ("F", 99.6, 100),
        ("LA", (90, 0), 90),
    ],
)
def test_to_rgb8_modes(mode: str, value: object, expected: int) -> None:
    image = Image.new(mode, (3, 2), value)

    rgb = to_rgb8(image)

    assert rgb.shape == (2, 3, 3)
    assert rgb.dtype == np.uint8
    assert (rgb == expected).all()


# ---------------------------------------------------------------------------------------------------------------
# Rejections


def test_mask_of_wrong_size_names_both_sizes() -> None:
    data = _mask_png(np.ones((30, 20), dtype=bool))

    with pytest.raises(ImageRuleError) as caught:
        read_mask(data, size=(40, 60), **LIMITS)

    assert caught.value.code == CODE_MASK_SIZE_MISMATCH
    assert caught.value.field == "mask"
    assert "20×30" in caught.value.message
    assert "40×60" in caught.value.message


def test_empty_mask_is_rejected() -> None:
    with pytest.raises(ImageRuleError) as caught:
        read_mask(_mask_png(np.zeros((8, 8), dtype=bool)), size=(8, 8), **LIMITS)

    assert caught.value.code == CODE_EMPTY_MASK
    assert "Paint the region" in caught.value.message


def test_noisy_mask_selects_only_stroke() -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 120, (40, 50), dtype=np.uint8)  # faint noise, all below half strength
    gray[10:14, 5:45] = 255
    data = _encode(Image.fromarray(gray, mode="L"))

    mask = read_mask(data, size=(50, 40), **LIMITS)

    expected = np.zeros((40, 50), dtype=bool)
    expected[10:14, 5:45] = True
    assert np.array_equal(mask, expected)


def test_only_noise_mask_is_empty() -> None:
    gray = np.random.default_rng(4).integers(0, 128, (16, 16), dtype=np.uint8)

    with pytest.raises(ImageRuleError) as caught:
        read_mask(_encode(Image.fromarray(gray, mode="L")), size=(16, 16), **LIMITS)

    assert caught.value.code == CODE_EMPTY_MASK


def _png_claiming_size(width: int, height: int) -> bytes:
    """Return a 2x2 PNG whose header claims `width` x `height`, so decoding it would fail as truncated."""
    small = _encode(Image.new("RGB", (2, 2)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR length, type, 13 data bytes and CRC
    return small[:8] + _png_chunk(b"IHDR", header) + small[ihdr_end:]


def test_oversized_image_rejected_before_decode() -> None:
    # A too_large error instead of truncated shows that the pixel check ran on the header alone.
    data = _png_claiming_size(5000, 4000)

    with pytest.raises(ImageRuleError) as caught:
        read_template(data, max_pixels=1_000_000, max_bytes=1_000_000)

    assert caught.value.code == CODE_TOO_LARGE
    assert "5000×4000" in caught.value.message
    assert "1000000" in caught.value.message


def test_decompression_bomb_header_is_rejected() -> None:
    # 30000 x 30000 is above twice Pillow's MAX_IMAGE_PIXELS, so Image.open itself raises.
    data = _png_claiming_size(30000, 30000)

    with pytest.raises(ImageRuleError) as caught:
        read_template(data, max_pixels=10**10, max_bytes=1_000_000)

    assert caught.value.code == CODE_TOO_LARGE


def test_pixel_limit_counts_upright_area() -> None:
    data = _encode(Image.new("RGB", (100, 50)))

    with pytest.raises(ImageRuleError) as caught:
        read_template(data, max_pixels=4999, max_bytes=1_000_000)
    accepted = read_template(data, max_pixels=5000, max_bytes=1_000_000)

    assert caught.value.code == CODE_TOO_LARGE
    assert accepted.shape == (50, 100, 3)


def test_byte_limit_rejects_large_stream() -> None:
    data = _encode(Image.fromarray(_rgb(64, 64)))

    with pytest.raises(ImageRuleError) as caught:
        open_upright(io.BytesIO(data), field="image", max_pixels=10_000, max_bytes=len(data) - 1)

    assert caught.value.code == CODE_TOO_LARGE
    assert str(len(data) - 1) in caught.value.message


def test_truncated_png_is_rejected() -> None:
    data = _encode(Image.fromarray(_rgb(64, 64)))

    with pytest.raises(ImageRuleError) as caught:
        read_template(data[: len(data) // 2], **LIMITS)

    assert caught.value.code == CODE_TRUNCATED


def test_non_image_bytes_are_rejected() -> None:
    with pytest.raises(ImageRuleError) as caught:
        read_template(b"%PDF-1.7 this is not an image at all", **LIMITS)

    assert caught.value.code == CODE_INVALID_IMAGE
    assert caught.value.field == "image"


def test_zero_byte_file_is_rejected() -> None:
    with pytest.raises(ImageRuleError) as caught:
        read_mask(b"", size=(4, 4), **LIMITS)

    assert caught.value.code == CODE_EMPTY_FILE
    assert caught.value.field == "mask"


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def test_pad_then_crop_restores_451x300() -> None:
    image = _rgb(300, 451)
    mask = np.ones((300, 451), dtype=bool)

    padded_image, (height, width) = pad_to_multiple(image, 16)
    padded_mask, _ = pad_to_multiple(mask, 16)

    assert padded_image.shape == (304, 464, 3)
    assert (height, width) == (300, 451)
    assert np.array_equal(padded_image[300:, :451], np.repeat(image[-1:], 4, axis=0))
    assert not padded_mask[300:].any()
    assert not padded_mask[:, 451:].any()
    assert np.array_equal(crop_to(padded_image, height, width), image)


def test_fit_working_size_keeps_small_images() -> None:
    assert fit_working_size(451, 300, 1024 * 1024) == (451, 300)


def test_fit_working_size_downscales_large_images() -> None:
    width, height = fit_working_size(4000, 3000, 1024 * 1024)
    padded_area = (-(-width // 16) * 16) * (-(-height // 16) * 16)

    assert padded_area <= 1024 * 1024
    assert padded_area > 0.9 * 1024 * 1024
    assert abs(width / height - 4000 / 3000) < 0.01


def test_token_mask_marks_touched_patches() -> None:
    mask = np.zeros((40, 50), dtype=bool)  # 3 x 4 tokens of 16 pixels
    mask[17, 33] = True  # token (1, 2)

    tokens = token_mask(mask, patch=16, dilation=0)

    assert tokens.shape == (3, 4)
    assert tokens.sum() == 1
    assert tokens[1, 2]


def test_token_mask_dilates_square() -> None:
    mask = np.zeros((80, 80), dtype=bool)  # 5 x 5 tokens
    mask[32, 32] = True  # center token (2, 2)

    tokens = token_mask(mask, patch=16, dilation=1)

    assert tokens.sum() == 9
    assert tokens[1:4, 1:4].all()
    assert mask_ratio(mask, patch=16, dilation=1) == pytest.approx(9 / 25)
    assert mask_ratio(mask, patch=16, dilation=0) == pytest.approx(1 / 25)


def test_dilate_is_euclidean() -> None:
    mask = np.zeros((21, 21), dtype=bool)
    mask[10, 10] = True

    grown = dilate(mask, 3)

    rows, cols = np.nonzero(grown)
    distances = np.hypot(rows - 10, cols - 10)
    assert distances.max() <= 3
    assert grown.sum() == int((np.hypot(*np.mgrid[-10:11, -10:11]) <= 3).sum())


def test_dilate_matches_brute_force() -> None:
    rng = np.random.default_rng(11)
    for radius in (1, 3, 6):
        mask = rng.random((23, 31)) > 0.985
        mask[0, 30] = True  # a pixel on the corner exercises the clipped window
        rows, cols = np.nonzero(mask)
        grid_rows, grid_cols = np.mgrid[0:23, 0:31]
        distances = np.hypot(grid_rows[..., None] - rows, grid_cols[..., None] - cols).min(axis=-1)

        grown = dilate(mask, radius)

        assert np.array_equal(grown, distances <= radius), radius


def test_feather_alpha_of_empty_mask_is_zero() -> None:
    alpha = feather_alpha(np.zeros((8, 9), dtype=bool), 4)

    assert alpha.shape == (8, 9)
    assert alpha.dtype == np.float32
    assert not alpha.any()


def test_feather_alpha_ramps_to_zero() -> None:
    mask = np.zeros((1, 30), dtype=bool)
    mask[0, :10] = True

    alpha = feather_alpha(mask, 4)[0]

    assert (alpha[:10] == 1.0).all()
    assert (np.diff(alpha[9:15]) < 0).all()
    assert 0.0 < alpha[13] < alpha[10] < 1.0
    assert (alpha[14:] == 0.0).all()


def test_composite_is_bit_identical_outside_feather() -> None:
    original = _rgb(40, 40, seed=1)
    generated = _rgb(40, 40, seed=2)
    mask = np.zeros((40, 40), dtype=bool)
    mask[15:25, 15:25] = True

    alpha = feather_alpha(mask, 5)
    result = composite(original, generated, alpha)

    outside = ~dilate(mask, 5)
    assert outside.sum() > 0
    assert np.array_equal(result[outside], original[outside])
    assert np.array_equal(result[mask], generated[mask])
    band = dilate(mask, 5) & ~mask
    assert not np.array_equal(result[band], original[band])


def test_luminance_matches_pillow() -> None:
    rgb = _rgb(50, 60, seed=5)

    expected = np.asarray(Image.fromarray(rgb).convert("L"))

    assert np.array_equal(luminance(rgb), expected)


def test_png_round_trip() -> None:
    image = _rgb(7, 9)

    decoded = decode_png(encode_png(image))

    assert np.array_equal(decoded, image)
