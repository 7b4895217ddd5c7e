"""Decoding encoded image files and bringing any image to the mode and size a model expects.

Conversion rules, so that odd inputs land somewhere sensible instead of failing:
- transparency (RGBA, LA, PA, palette with a transparent colour) is composited on black, the
  background of the in-distribution data, rather than dropped (which would expose whatever colour
  the transparent pixels happen to store);
- 16-bit greyscale (PIL modes ``I;16*`` and ``I``) keeps its top 8 bits; PIL's own conversion would
  clip every value above 255 to white;
- float greyscale (mode ``F``, e.g. 32-bit float TIFF) is read as intensities in [0, 1], the float
  convention of torchvision and scikit-image, scaled to 0..255 and saturated outside that range (PIL's
  own conversion keeps the values, so [0, 1] floats would come out black); NaN or infinite pixels make
  the row an error;
- every other mode (palette, bilevel, CMYK, YCbCr ...) goes through PIL's conversion to RGB,
  then to the target mode (RGB -> L uses ITU-R 601-2 luma).

Multi-frame files (animated GIF/WEBP/PNG, multi-page TIFF) contribute their first frame.

Size guards run on the header, before any pixel data is decoded (``Image.open`` is lazy): an image over
``max_pixels`` is rejected as a likely decompression bomb. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``,
about 89 MP, whose warning is made an error here) still applies on top, so ``max_pixels`` above it does
not admit larger images.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from gradood.core.choices import Interpolation, ResizePolicy

RESIZE_POLICIES = tuple(p.value for p in ResizePolicy)
INTERPOLATIONS = {i.value: Image.Resampling[i.name.upper()] for i in Interpolation}
_CHANNELS = {"L": 1, "RGB": 3}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: default pixel limit (width * height) per image: 50 MP, well above photographs a model is run on
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An encoded image that cannot be decoded; the message is the reason recorded for the row."""


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image without pixels or with more than ``max_pixels`` (None: no limit of ours)."""
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {width * height} pixels, over max_pixels={max_pixels}"
        )


def decode_image(raw: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode the first frame of ``raw`` (so truncated files fail here, not later inside a resize).

    The size is checked on the header before the pixel data is decoded, so a small file claiming
    30000x30000 pixels costs nothing; Pillow's decompression-bomb warning is raised as an error too.
    """
    if not raw:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # lazy: parses the header only
            check_pixels(image.width, image.height, max_pixels)
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"not a recognised image format ({len(raw)} bytes)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"image too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from err
    return image


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("float image has NaN or infinite pixels")
        image = Image.fromarray(np.round(values.clip(0.0, 1.0) * 255.0).astype(np.uint8))
    if "A" in image.mode or "a" in image.mode or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if image.mode not in _CHANNELS:
        image = image.convert("RGB")
    return image if image.mode == mode else image.convert(mode)


def _checked_array(array: np.ndarray) -> np.ndarray:
    """An already decoded image array as uint8 [H, W] or [H, W, 3|4]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"arrays must be uint8 [H, W] or [H, W, 1|3|4], got {array.dtype} {array.shape}")
    return array


def _chw(array: np.ndarray) -> np.ndarray:
    """A fresh contiguous [C, H, W] copy (never a view of cached or read-only input data)."""
    return np.array(array[None] if array.ndim == 2 else array.transpose(2, 0, 1), dtype=np.uint8, order="C")


def _center_crop_or_pad(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop (or zero-pad) the two leading axes to ``size`` around the centre, with torchvision's offsets."""
    for axis, target in enumerate(size):
        length = array.shape[axis]
        if length >= target:
            start = int(round((length - target) / 2.0))
            array = np.take(array, range(start, start + target), axis=axis)
        else:
            pad = [(0, 0)] * array.ndim
            pad[axis] = ((target - length) // 2, (target - length + 1) // 2)
            array = np.pad(array, pad)
    return array


def _cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """Smallest (h, w) with the aspect ratio kept that covers ``size`` (torchvision's rounding)."""
    th, tw = size
    if th * width >= tw * height:
        return th, max(tw, int(th * width / height))
    return max(th, int(tw * height / width)), tw


class ImageConverter:
    """Turns a decoded image into the uint8 ``[C, H, W]`` array a model consumes.

    ``size`` is (height, width), as in the model's ``input_shape``. Resize policies:
    ``resize`` scales the whole image to ``size`` (aspect not kept); ``center_crop`` crops or zero-pads
    to ``size`` without scaling; ``resize_center_crop`` scales so the image covers ``size`` with its
    aspect ratio kept (for a square size: shorter side to size), then crops the centre.
    """

    def __init__(
        self, mode: str, size: tuple[int, int], resize: str = "resize", interpolation: str = "bilinear"
    ):
        if mode not in _CHANNELS:
            raise ValueError(f"image mode must be one of {sorted(_CHANNELS)}, got {mode!r}")
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {resize!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        height, width = (int(s) for s in size)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive (height, width), got {tuple(size)}")
        self.mode = mode
        self.size = (height, width)
        self.resize = ResizePolicy(resize).value
        self.interpolation = Interpolation(interpolation).value

    @classmethod
    def for_model(cls, model: Any, resize: str = "resize", interpolation: str = "bilinear") -> ImageConverter:
        """The conversion to ``model``'s input: its ``image_mode`` and the (height, width) of its
        ``input_shape``."""
        return cls(model.image_mode, tuple(model.input_shape[1:]), resize, interpolation)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (_CHANNELS[self.mode], *self.size)

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "size": list(self.size),
            "resize": self.resize,
            "interpolation": self.interpolation,
        }

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        if isinstance(image, np.ndarray):
            array = _checked_array(image)
            channels = 1 if array.ndim == 2 else array.shape[2]
            if channels == _CHANNELS[self.mode] and array.shape[:2] == self.size:
                return _chw(array)
            image = Image.fromarray(array)
        array = np.asarray(self._resized(_to_mode(image, self.mode)))
        if self.resize != "resize":
            array = _center_crop_or_pad(array, self.size)
        return _chw(array)

    def _resized(self, image: Image.Image) -> Image.Image:
        height, width = image.height, image.width
        if self.resize == "center_crop":
            return image
        target = self.size if self.resize == "resize" else _cover_size(height, width, self.size)
        if target == (height, width):
            return image
        return image.resize(target[::-1], INTERPOLATIONS[self.interpolation])
