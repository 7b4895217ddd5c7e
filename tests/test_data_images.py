import io

import numpy as np
import pytest
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from gradood.data.images import ImageConverter, ImageDecodeError, check_pixels, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_decode_round_trip():
    array = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
    image = decode_image(encode(Image.fromarray(array)))
    np.testing.assert_array_equal(np.asarray(image), array)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty file"),
        (encode(rgb_image(30, 30))[:400], "truncated"),
        (b"definitely not an image" * 10, "not a recognised image format"),
    ],
)
def test_decode_errors(raw, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(raw)


def reference(image: Image.Image, mode: str, size: tuple[int, int], policy: str, interp: str) -> np.ndarray:
    """torchvision's transforms on PIL images: an independent implementation of the size arithmetic."""
    mode_image = image.convert(mode)
    interpolation = InterpolationMode(interp)
    if policy == "resize":
        out = TF.resize(mode_image, list(size), interpolation=interpolation)
    elif policy == "center_crop":
        out = TF.center_crop(mode_image, list(size))
    else:
        assert size[0] == size[1]
        out = TF.center_crop(TF.resize(mode_image, size[0], interpolation=interpolation), list(size))
    array = np.asarray(out)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("policy", ["resize", "center_crop", "resize_center_crop"])
@pytest.mark.parametrize("source_size", [(37, 23), (39, 17), (50, 40), (20, 16), (28, 28)])
@pytest.mark.parametrize("interp", ["bilinear", "nearest", "bicubic"])
def test_converter_matches_torchvision(mode, policy, source_size, interp):
    image = rgb_image(*source_size)
    sizes = [(28, 28)] if policy == "resize_center_crop" else [(28, 28), (24, 32)]
    for size in sizes:
        converter = ImageConverter(mode, size, resize=policy, interpolation=interp)
        out = converter(image)
        assert out.shape == ({"L": 1, "RGB": 3}[mode], *size) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, reference(image, mode, size, policy, interp))
        # an already decoded array takes the same route as the PIL image
        np.testing.assert_array_equal(converter(np.asarray(image)), out)


def test_array_fast_path_copies():
    array = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    array.flags.writeable = False
    out = ImageConverter("L", (28, 28))(array)
    np.testing.assert_array_equal(out[0], array)
    assert out.flags.writeable and not np.shares_memory(out, array)
    np.testing.assert_array_equal(ImageConverter("L", (28, 28))(array[..., None]), out)
    rgb = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ImageConverter("RGB", (28, 28))(rgb), rgb.transpose(2, 0, 1))
    luma = ImageConverter("L", (28, 28))(rgb)[0].astype(float)
    expected = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma - expected).max() <= 1.0


def test_rgba_composited_on_black():
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (28, 28, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    out = ImageConverter("RGB", (28, 28))(Image.fromarray(rgba)).transpose(1, 2, 0)
    expected = rgba[..., :3].astype(float) * rgba[..., 3:].astype(float) / 255.0
    assert np.abs(out - expected).max() <= 1.0
    assert (out[0, 0] == 0).all() and (out[0, 1] == rgba[0, 1, :3]).all()
    # the numpy route: an [H, W, 4] array is RGBA too
    np.testing.assert_array_equal(ImageConverter("RGB", (28, 28))(rgba).transpose(1, 2, 0), out)


def test_sixteen_bit_keeps_top_byte():
    wide = np.random.default_rng(3).integers(0, 65536, (12, 12), dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(wide)))
    assert image.mode.startswith("I")
    out = ImageConverter("L", (12, 12))(image)
    np.testing.assert_array_equal(out[0], (wide // 256).astype(np.uint8))


def test_palette_and_bilevel():
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (10, 10), dtype=np.uint8)
    image = Image.frombytes("P", (10, 10), index.tobytes())
    image.putpalette(palette.tobytes())
    out = ImageConverter("RGB", (10, 10))(decode_image(encode(image)))
    np.testing.assert_array_equal(out.transpose(1, 2, 0), palette[index])

    bits = rng.integers(0, 2, (8, 8)).astype(bool)
    out = ImageConverter("L", (8, 8))(Image.fromarray(bits))
    np.testing.assert_array_equal(out[0], np.where(bits, 255, 0))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "PNG"])
def test_multi_frame_files_give_their_first_frame(fmt):
    frames = [Image.fromarray(np.full((6, 6), value, np.uint8)) for value in (40, 200, 120)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    raw = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)
    assert Image.open(io.BytesIO(raw)).n_frames == 3
    out = ImageConverter("L", (6, 6))(decode_image(raw))
    np.testing.assert_array_equal(out[0], np.full((6, 6), 40, np.uint8))


def test_tiff_modes():
    """TIFF carries modes PNG and JPEG do not: float, 32-bit integer, bilevel, palette, CMYK."""
    rng = np.random.default_rng(5)
    to_l = ImageConverter("L", (4, 5))
    floats = np.array([[-1.0, 0.0, 0.25, 0.5, 1.0]] * 3 + [[1.5, np.float32(1 / 255), 0.998, 0.002, 2.0]])
    image = decode_image(encode(Image.fromarray(floats.astype(np.float32)), "TIFF"))
    assert image.mode == "F"
    expected = np.round(floats.astype(np.float32).astype(np.float64).clip(0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(to_l(image)[0], expected)
    for bad in (np.nan, np.inf):
        floats[0, 0] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            to_l(decode_image(encode(Image.fromarray(floats.astype(np.float32)), "TIFF")))

    wide = rng.integers(0, 65536, (4, 5), dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(wide), "TIFF"))
    assert image.mode == "I;16"
    np.testing.assert_array_equal(to_l(image)[0], wide >> 8)
    deep = np.array([[-5, 0, 255, 256, 70000]] * 4, dtype=np.int32)
    image = decode_image(encode(Image.fromarray(deep), "TIFF"))
    assert image.mode == "I"
    np.testing.assert_array_equal(to_l(image)[0], deep.clip(0, 65535) >> 8)

    bits = rng.integers(0, 2, (4, 5)).astype(bool)
    np.testing.assert_array_equal(to_l(decode_image(encode(Image.fromarray(bits), "TIFF")))[0], bits * 255)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    indexed = Image.frombytes("P", (5, 4), index.tobytes())
    indexed.putpalette(palette.tobytes())
    out = ImageConverter("RGB", (4, 5))(decode_image(encode(indexed, "TIFF")))
    np.testing.assert_array_equal(out.transpose(1, 2, 0), palette[index])
    cmyk = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).convert("CMYK")
    image = decode_image(encode(cmyk, "TIFF"))
    assert image.mode == "CMYK"
    np.testing.assert_array_equal(
        ImageConverter("RGB", (4, 5))(image).transpose(1, 2, 0), cmyk.convert("RGB")
    )


def test_pixel_limit_is_checked_on_the_header():
    check_pixels(8, 8, 64)
    check_pixels(10**6, 10**6, None)
    with pytest.raises(ImageDecodeError, match=r"^image too large: 9x8 = 72 pixels, over max_pixels=64$"):
        check_pixels(9, 8, 64)
    with pytest.raises(ImageDecodeError, match=r"^image has no pixels \(0x3\)$"):
        check_pixels(0, 3, None)
    raw = encode(Image.fromarray(np.zeros((4000, 4000), np.uint8)))
    # decoding the data would succeed; the header alone is enough to refuse it
    with pytest.raises(ImageDecodeError, match="16000000 pixels, over max_pixels=15999999"):
        decode_image(raw, max_pixels=15_999_999)
    assert decode_image(raw, max_pixels=16_000_000).size == (4000, 4000)


def test_invalid_arguments():
    for kwargs, match in [
        ({"mode": "CMYK", "size": (28, 28)}, "mode"),
        ({"mode": "L", "size": (28, 28), "resize": "stretch"}, "resize policy"),
        ({"mode": "L", "size": (28, 28), "interpolation": "cubic-ish"}, "interpolation"),
        ({"mode": "L", "size": (0, 28)}, "positive"),
    ]:
        with pytest.raises(ValueError, match=match):
            ImageConverter(**kwargs)
    with pytest.raises(ValueError, match="uint8"):
        ImageConverter("L", (4, 4))(np.zeros((4, 4), np.float32))
    described = ImageConverter("RGB", (32, 24), "center_crop", "bicubic").describe()
    assert described == {"mode": "RGB", "size": [32, 24], "resize": "center_crop", "interpolation": "bicubic"}
