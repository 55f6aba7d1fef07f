"""Turning an image file into the float32 tensor a classifier expects.

The default recipe (:data:`PRESETS` ``"resnet50-v2"``) matches the ONNX model zoo's resnet50-v2
preprocessing: resize the shorter side to 256 with bilinear filtering, center-crop 224x224,
scale pixels to 0..1, subtract the ImageNet mean and divide by the ImageNet std, CHW layout.
Calibrating with a different recipe than the one the model was trained with skews the
activation ranges, so the recipe is an explicit, serialisable :class:`PreprocessSpec`
that travels with the quantized model's report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BeforeValidator, Field, StrictFloat, StrictInt, ValidationError

from calibration.config import UNKNOWN_FIELD_ERRORS, config_dataclass, first_error
from calibration.errors import RqInputError

#: Pillow resampling filters by the names rq accepts.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_INTERPOLATION_NAMES = tuple(INTERPOLATIONS)  # Literal[TUPLE] is Literal[*TUPLE]
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
SPEC_VERSION = 1


class ImageDecodeError(RqInputError):
    """An image file that cannot be decoded. ``reason`` is a short one-line explanation."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (a spec built from an array's values); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _folded(case: Callable[[str], str]) -> BeforeValidator:
    return BeforeValidator(lambda v: case(v) if isinstance(v, str) else v)


# No coercion: `resize=True` or `"256"` is a mistake, not a size; numbers must be finite.
_Pixels = Annotated[StrictInt, BeforeValidator(_plain), Field(gt=0)]
_Number = Annotated[StrictFloat, BeforeValidator(_plain), Field(allow_inf_nan=False)]
_Divisor = Annotated[StrictFloat, BeforeValidator(_plain), Field(gt=0, allow_inf_nan=False)]

_WORDS = {
    "resize": "a positive whole number of pixels",
    "crop": "a positive whole number of pixels",
    "interpolation": f"one of {', '.join(INTERPOLATIONS)}",
    "mean": "3 finite numbers (one per channel)",
    "std": "3 finite numbers > 0 (one per channel; it is a divisor)",
    "scale": "a positive finite number",
    "channel_order": f"one of {', '.join(CHANNEL_ORDERS)}",
    "layout": f"one of {', '.join(LAYOUTS)}",
    "version": "a whole number",
}


def _explain(exc: ValidationError) -> str:
    loc, kind, value, _ = first_error(exc)
    name = str(loc[0]) if loc else "?"
    if kind in UNKNOWN_FIELD_ERRORS:
        return f"unknown preprocess key(s) {name!r} (valid: {', '.join(_WORDS)})"
    return f"preprocess {name} must be {_WORDS.get(name, 'valid')}, got {value!r}"


@config_dataclass(_explain)
class PreprocessSpec:
    """How to turn an image into a network input.

    Steps, in order: decode → RGB → resize so the *shorter* side is ``resize`` (aspect kept)
    with ``interpolation`` → center crop ``crop`` x ``crop`` → ``x = pixel * scale`` →
    ``(x - mean) / std`` per channel → reorder channels to ``channel_order`` → ``layout``.
    ``mean`` and ``std`` are given in the *output* channel order (so for ``"BGR"`` they are B, G, R).
    Names are case-insensitive (stored lower-case for the interpolation, upper-case for the rest).
    """

    resize: _Pixels = 256
    crop: _Pixels = 224
    interpolation: Annotated[Literal[_INTERPOLATION_NAMES], _folded(str.lower)] = "bilinear"
    mean: tuple[_Number, _Number, _Number] = (0.485, 0.456, 0.406)
    std: tuple[_Divisor, _Divisor, _Divisor] = (0.229, 0.224, 0.225)
    scale: _Divisor = 1 / 255
    channel_order: Annotated[Literal[CHANNEL_ORDERS], _folded(str.upper)] = "RGB"
    layout: Annotated[Literal[LAYOUTS], _folded(str.upper)] = "NCHW"
    version: StrictInt = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.version != SPEC_VERSION:
            raise RqInputError(
                f"unsupported preprocess spec version {self.version!r} (this rq understands {SPEC_VERSION})"
            )
        if self.crop > self.resize:
            raise RqInputError(
                f"preprocess crop {self.crop} is larger than resize {self.resize}; "
                "the crop must fit inside the resized image"
            )

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (lists, not tuples); ``from_dict(spec.to_dict()) == spec``."""
        return {
            "version": self.version,
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "channel_order": self.channel_order,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Inverse of :meth:`to_dict`. Missing keys take their defaults; unknown keys are an error
        (a typo such as ``"crop_size"`` silently ignored would calibrate with the wrong recipe)."""
        if not isinstance(data, Mapping):
            raise RqInputError(f"preprocess spec must be a JSON object, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _WORDS)
        if unknown:
            raise RqInputError(
                f"unknown preprocess key(s) {', '.join(repr(k) for k in unknown)} (valid: {', '.join(_WORDS)})"
            )
        return cls(**dict(data))

    def with_overrides(self, **overrides: Any) -> PreprocessSpec:
        """A copy with some fields replaced; ``None`` values are ignored (so unset CLI options
        can be passed straight through)."""
        unknown = sorted(k for k in overrides if k not in _WORDS)
        if unknown:
            raise RqInputError(
                f"unknown preprocess option(s) {', '.join(unknown)} (valid: {', '.join(_WORDS)})"
            )
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    # -- helpers -------------------------------------------------------------------------------

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """Shape of a batch of ``batch`` images: ``(N, 3, crop, crop)`` or ``(N, crop, crop, 3)``."""
        if isinstance(batch, bool) or not isinstance(_plain(batch), int) or batch <= 0:
            raise RqInputError(f"batch size must be a positive whole number, got {batch!r}")
        n = int(batch)
        if self.layout == "NCHW":
            return (n, 3, self.crop, self.crop)
        return (n, self.crop, self.crop, 3)

    def describe(self) -> str:
        """One line for logs and reports."""
        scale = "1/255" if math.isclose(self.scale, 1 / 255) else f"{self.scale:g}"
        return (
            f"resize {self.resize} ({self.interpolation}) → center crop {self.crop}, "
            f"x*{scale}, mean {list(self.mean)}, std {list(self.std)}, {self.channel_order}, {self.layout}"
        )


#: Named recipes. Specs are frozen, so sharing the instances is safe.
PRESETS: dict[str, PreprocessSpec] = {
    # ONNX model zoo resnet50-v2 (and torchvision's classic ImageNet eval transform).
    "resnet50-v2": PreprocessSpec(),
    "imagenet": PreprocessSpec(),
    # Inception-v3 style: 299 crop from 342, inputs in -1..1.
    "inception": PreprocessSpec(resize=342, crop=299, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # Caffe-trained models: BGR, raw 0..255 pixels minus the per-channel mean (B, G, R).
    "caffe": PreprocessSpec(
        scale=1.0, channel_order="BGR", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)
    ),
}


def preset(name: str) -> PreprocessSpec:
    """The preset called ``name`` (case-insensitive)."""
    spec = PRESETS.get(str(name).strip().lower())
    if spec is None:
        raise RqInputError(f"unknown preprocess preset {name!r} (valid: {', '.join(sorted(PRESETS))})")
    return spec


# -- decoding ----------------------------------------------------------------------------------


def _gray_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel image onto 0..255 by *scaling*, not clipping.

    Pillow's own ``convert("L")`` clips I;16/I values above 255, which turns a normal 16-bit
    grayscale PNG almost entirely white.
    """
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        a = a / 257.0  # 65535 → 255 exactly
    else:
        lo = float(a.min()) if a.size else 0.0
        hi = float(a.max()) if a.size else 0.0
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0  # float images are usually 0..1
        elif lo >= 0.0 and hi <= 255.0:
            pass  # already 8-bit range (e.g. an "I" image holding 8-bit data)
        elif lo >= 0.0 and hi <= 65535.0:
            a = a / 257.0  # 16-bit data in a 32-bit container (older Pillow opens 16-bit PNGs as "I")
        else:
            # Anything else (negative, >16 bit): stretch the actual range.
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparent pixels are composited on white
    (what a viewer shows, and what photos with alpha usually mean)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "PA", "La") or "transparency" in im.info
    if has_alpha:
        if mode == "La":  # premultiplied L+alpha: Pillow cannot convert it to RGBA directly
            im = im.convert("LA")
        rgba = im.convert("RGBA")  # for P/L/RGB this applies the tRNS / transparency key
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, P, CMYK, YCbCr, LAB, HSV, …
    return im.convert("RGB")


def _open_rgb(path: Path) -> Image.Image:
    """Open, fully decode and orient an image; every failure becomes an ImageDecodeError."""
    try:
        if path.is_dir():
            raise ImageDecodeError(path, "is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "empty file (0 bytes)")
        with Image.open(path) as im:
            # .load() forces the full decode now: Image.open only reads the header, and with
            # ImageFile.LOAD_TRUNCATED_IMAGES left False a cut-off JPEG fails here instead of
            # silently yielding grey pixels that would pollute the calibration ranges.
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:
                # A broken EXIF block should not cost us an otherwise good image.
                oriented = im
            return _to_rgb(oriented)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"image too large ({_one_line(str(e), 120)})") from None
    except OSError as e:
        msg = _one_line(str(e), 120)
        if "truncated" in msg.lower():
            raise ImageDecodeError(path, f"truncated image ({msg})") from None
        raise ImageDecodeError(path, f"corrupt image data ({msg})") from None
    except MemoryError:
        raise
    except Exception as e:
        # Pillow plugins raise a zoo of types for bad data (SyntaxError, ValueError, struct.error…).
        raise ImageDecodeError(
            path, f"cannot decode ({type(e).__name__}: {_one_line(str(e), 120)})"
        ) from None


def resize_and_crop(im: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize`` and center-crop ``spec.crop`` (square).

    Sizes and offsets follow torchvision's ``Resize(int)`` + ``CenterCrop`` exactly (truncate the
    long side, round the crop offset), which is also the zoo's resnet50-v2 recipe.
    """
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ValueError("image has no pixels")
    if w <= h:
        new_w, new_h = spec.resize, max(1, int(spec.resize * h / w))
    else:
        new_w, new_h = max(1, int(spec.resize * w / h)), spec.resize
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), INTERPOLATIONS[spec.interpolation])
    left = round((new_w - spec.crop) / 2.0)
    top = round((new_h - spec.crop) / 2.0)
    return im.crop((left, top, left + spec.crop, top + spec.crop))


def normalize(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC RGB → float32 tensor (CHW or HWC) following ``spec``."""
    x = np.asarray(rgb, dtype=np.float32)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    x = x * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_image(path: Path | str, spec: PreprocessSpec) -> np.ndarray:
    """Decode ``path`` and preprocess it: float32 ``(3, crop, crop)`` for NCHW or
    ``(crop, crop, 3)`` for NHWC.

    Handles every Pillow mode (L, LA, P with transparency, RGBA, CMYK, I;16, I, F, 1 …) and EXIF
    orientation. Raises :class:`ImageDecodeError` (with a one-line ``reason``) for missing,
    empty, truncated or non-image files.
    """
    # With the default spec this is the ONNX model zoo's resnet50-v2 preprocessing: shorter side
    # to 256 (bilinear), center crop 224, /255, ImageNet mean/std, CHW.
    path = Path(path)
    im = _open_rgb(path)
    try:
        im = resize_and_crop(im, spec)
    except Exception as e:
        raise ImageDecodeError(
            path, f"cannot resize ({type(e).__name__}: {_one_line(str(e), 120)})"
        ) from None
    return normalize(np.asarray(im, dtype=np.uint8), spec)


__all__ = [
    "CHANNEL_ORDERS",
    "INTERPOLATIONS",
    "LAYOUTS",
    "PRESETS",
    "ImageDecodeError",
    "PreprocessSpec",
    "load_image",
    "normalize",
    "preset",
    "resize_and_crop",
]
