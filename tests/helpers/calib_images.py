"""Small generated images and folder layouts for the calibration tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

_ROOT = Path(__file__).resolve().parents[2]

#: /work/shared next to the repository (read-only real data; tests skip when it is absent).
SHARED = _ROOT.parent / "shared"
IMAGENET = SHARED / "imagenet"
#: Real ImageNet class ids (indices 0 and 1 of the synset list).
WNIDS = ("n01440764", "n01443537")


def gradient_rgb(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A smooth RGB image (JPEG-friendly) that differs per seed."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 3.0, size=3)
    arr = np.stack(
        [(xx * a) % 256, (yy * b) % 256, ((xx + yy) * c) % 256],
        axis=-1,
    ).astype(np.uint8)
    return Image.fromarray(arr)


def write_rgb(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient_rgb(size, seed).save(path)  # format from the extension
    return path


def write_solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (300, 260)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_mode(path: Path, mode: str, size: tuple[int, int] = (64, 48)) -> Path:
    """An image stored in Pillow ``mode``; the format comes from the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        ramp = np.linspace(0, 65535, w * h).reshape(h, w).astype(np.uint16)
        Image.fromarray(ramp).save(path)
    elif mode == "P":
        # Palette image whose index 0 is transparent.
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
        im.paste(0, (0, 0, w // 2, h))
        im.save(path, transparency=0)
    elif mode == "RGBA":
        arr = np.zeros((h, w, 4), np.uint8)
        arr[..., 0] = 255
        arr[:, : w // 2, 3] = 0  # left half fully transparent
        arr[:, w // 2 :, 3] = 255
        Image.fromarray(arr).save(path)
    else:
        gradient_rgb(size).convert(mode).save(path)
    return path


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (128, 96)) -> Path:
    buf = io.BytesIO()
    gradient_rgb(size).save(buf, "JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def write_zero_byte(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_text_as_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not a JPEG\n")
    return path


def make_class_folders(
    root: Path, counts: dict[str, int], ext: str = ".JPEG", size=(40, 32), seed: int = 0
) -> list[Path]:
    """``root/<wnid>/<wnid>_<i><ext>`` with ``counts[wnid]`` small images each. Two folders made with the same
    classes, size and `seed` hold byte-identical images (rq counts those as calibration/validation overlap)."""
    paths = []
    for k, (wnid, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            paths.append(write_rgb(root / wnid / f"{wnid}_{i:03d}{ext}", size=size, seed=seed + k * 100 + i))
    return paths
