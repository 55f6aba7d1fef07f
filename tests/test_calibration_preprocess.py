"""PreprocessSpec validation/serialisation, synsets, and load_image on every kind of input file."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from calibration import (
    PRESETS,
    ImageDecodeError,
    PreprocessSpec,
    RqInputError,
    class_name,
    load_image,
    load_synsets,
    preset,
    wnid_to_index,
)
from calibration.preprocess import INTERPOLATIONS
from tests.helpers.calib_images import (
    write_mode,
    write_rgb,
    write_solid,
    write_text_as_image,
    write_truncated_jpeg,
    write_zero_byte,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def expected_solid(color, spec: PreprocessSpec) -> np.ndarray:
    """Hand computation (float64) of the per-channel output for a solid image."""
    c = np.array(color, dtype=np.float64)
    if spec.channel_order == "BGR":
        c = c[::-1]
    return (c * spec.scale - np.array(spec.mean)) / np.array(spec.std)


def assert_one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)


# -- synsets -------------------------------------------------------------------------------------


def test_synsets_canonical_order():
    synsets = load_synsets()
    assert len(synsets) == 1000
    assert synsets[0].wnid == "n01440764" and synsets[0].names[0] == "tench"
    idx = wnid_to_index()
    assert idx["n01443537"] == 1 and idx["n15075141"] == 999
    assert len(set(idx.values())) == 1000
    assert class_name(0) == "tench"
    assert class_name(np.int64(1)) == "goldfish"
    for bad in (-1, 1000, 1.5, "3"):
        with pytest.raises(RqInputError) as e:
            class_name(bad)
        assert_one_line(e.value)


# -- spec ----------------------------------------------------------------------------------------


def test_spec_defaults_are_resnet50_v2():
    spec = PreprocessSpec()
    assert (spec.resize, spec.crop, spec.interpolation) == (256, 224, "bilinear")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.scale == pytest.approx(1 / 255)
    assert (spec.channel_order, spec.layout, spec.version) == ("RGB", "NCHW", 1)
    assert preset("resnet50-v2") == spec == preset("imagenet") == preset("ImageNet")
    assert spec.input_shape(8) == (8, 3, 224, 224)
    assert spec.with_overrides(layout="nhwc").input_shape(2) == (2, 224, 224, 3)


def test_presets():
    inc = preset("inception")
    assert (inc.resize, inc.crop, inc.mean, inc.std) == (342, 299, (0.5,) * 3, (0.5,) * 3)
    caffe = preset("caffe")
    assert caffe.channel_order == "BGR" and caffe.scale == 1.0
    assert caffe.mean == (103.939, 116.779, 123.68) and caffe.std == (1.0, 1.0, 1.0)
    with pytest.raises(RqInputError) as e:
        preset("vgg")
    assert_one_line(e.value)
    for name in PRESETS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop": 300},  # crop > resize
        {"resize": 0},
        {"crop": -1},
        {"resize": 256.0},
        {"resize": True},
        {"mean": (0.5, 0.5)},
        {"std": (0.2, 0.0, 0.2)},
        {"std": (0.2, -1.0, 0.2)},
        {"mean": (0.5, float("nan"), 0.5)},
        {"mean": "abc"},
        {"interpolation": "cubic"},
        {"interpolation": 2},
        {"channel_order": "RBG"},
        {"layout": "CHW"},
        {"scale": 0},
        {"scale": float("inf")},
        {"version": 2},
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises(RqInputError) as e:
        PreprocessSpec(**kwargs)
    assert_one_line(e.value)
    assert next(iter(kwargs)) in str(e.value)  # the message names the field
    # The same through JSON, where such values come from (a spec stored beside a model, a Ray task).
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    with pytest.raises(RqInputError):
        PreprocessSpec.from_dict(json.loads(json.dumps(data)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resize": "256"}, "preprocess resize must be a positive whole number of pixels, got '256'"),
        (
            {"std": [0.2, 0.0, 0.2]},
            "preprocess std must be 3 finite numbers > 0 (one per channel; it is a divisor)",
        ),
        ({"layout": "CHW"}, "preprocess layout must be one of NCHW, NHWC, got 'CHW'"),
        ({"version": True}, "preprocess version must be a whole number, got True"),
        ({"version": 2}, "unsupported preprocess spec version 2"),
    ],
)
def test_spec_messages(kwargs, message):
    with pytest.raises(RqInputError, match=re.escape(message)):
        PreprocessSpec(**kwargs)


def test_spec_accepts_numpy_numbers_and_stays_a_frozen_dataclass():
    import dataclasses
    import pickle

    spec = PreprocessSpec(resize=np.int64(300), mean=np.array([0.5, 0.5, 0.5]))
    assert spec.resize == 300 and type(spec.resize) is int and spec.mean == (0.5, 0.5, 0.5)
    assert pickle.loads(pickle.dumps(spec)) == spec  # decoding worker processes receive it pickled
    assert dataclasses.replace(spec, crop=200).crop == 200
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.crop = 1  # type: ignore[misc]


def test_spec_normalises_case_and_sequences():
    spec = PreprocessSpec(interpolation="BICUBIC", channel_order="bgr", layout="nhwc", mean=[1, 2, 3])
    assert (spec.interpolation, spec.channel_order, spec.layout) == ("bicubic", "BGR", "NHWC")
    assert spec.mean == (1.0, 2.0, 3.0) and isinstance(spec.mean, tuple)
    assert set(INTERPOLATIONS) == {"bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_spec_dict_round_trip_through_json(name):
    spec = preset(name).with_overrides(interpolation="lanczos", layout="NHWC")
    data = json.loads(json.dumps(spec.to_dict()))
    assert PreprocessSpec.from_dict(data) == spec
    assert hash(PreprocessSpec.from_dict(data)) == hash(spec)


def test_from_dict_errors_and_defaults():
    assert PreprocessSpec.from_dict({"crop": 200}) == PreprocessSpec(crop=200)
    with pytest.raises(RqInputError) as e:
        PreprocessSpec.from_dict({"crop": 224, "crop_size": 224})
    assert "crop_size" in str(e.value)
    assert_one_line(e.value)
    with pytest.raises(RqInputError):
        PreprocessSpec.from_dict([("crop", 224)])
    with pytest.raises(RqInputError):
        PreprocessSpec.from_dict({"version": 7})


def test_with_overrides():
    spec = PreprocessSpec()
    assert spec.with_overrides(resize=None, crop=None) is spec
    new = spec.with_overrides(resize=300, crop=None, interpolation="bicubic")
    assert (new.resize, new.crop, new.interpolation) == (300, 224, "bicubic")
    assert spec.resize == 256  # original untouched (frozen)
    with pytest.raises(RqInputError):
        spec.with_overrides(crop=512)
    with pytest.raises(RqInputError) as e:
        spec.with_overrides(cropp=1)
    assert "cropp" in str(e.value)
    with pytest.raises(RqInputError):
        spec.input_shape(0)


# -- load_image: numbers -------------------------------------------------------------------------


def test_solid_red_exact_normalisation(tmp_path):
    spec = PreprocessSpec()
    x = load_image(write_solid(tmp_path / "red.png", (255, 0, 0)), spec)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    want = ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225)
    for c in range(3):
        np.testing.assert_allclose(x[c], want[c], rtol=1e-6, atol=1e-6)


def test_solid_colour_bgr_nhwc_and_caffe(tmp_path):
    path = write_solid(tmp_path / "c.bmp", (200, 100, 50), size=(230, 500))
    for spec in (
        PreprocessSpec(channel_order="BGR"),
        PreprocessSpec(layout="NHWC"),
        preset("caffe"),
        preset("inception").with_overrides(layout="NHWC", channel_order="BGR"),
    ):
        x = load_image(path, spec)
        assert x.shape == spec.input_shape(1)[1:] and x.dtype == np.float32
        per_channel = x if spec.layout == "NHWC" else np.moveaxis(x, 0, -1)
        np.testing.assert_allclose(
            per_channel,
            np.broadcast_to(expected_solid((200, 100, 50), spec), per_channel.shape),
            rtol=1e-5,
            atol=1e-4,
        )
    caffe = load_image(path, preset("caffe"))  # B, G, R minus caffe means, unscaled
    np.testing.assert_allclose(caffe[:, 0, 0], [50 - 103.939, 100 - 116.779, 200 - 123.68], atol=1e-3)


@pytest.mark.parametrize("interp", sorted(INTERPOLATIONS))
def test_resize_and_center_crop_match_torchvision_recipe(tmp_path, interp):
    """500x300 → shorter side 256 gives 426x256 (int(), as torchvision), crop offsets rounded."""
    src = write_rgb(tmp_path / "g.png", size=(500, 300), seed=3)
    spec = PreprocessSpec(interpolation=interp)
    x = load_image(src, spec)
    im = Image.open(src).convert("RGB").resize((426, 256), INTERPOLATIONS[interp])
    left, top = round((426 - 224) / 2), round((256 - 224) / 2)
    ref = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    ref = ((ref - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_portrait_and_small_images(tmp_path):
    # Smaller than the crop: upscaled so the shorter side is 256, then cropped.
    x = load_image(write_rgb(tmp_path / "tiny.gif", size=(7, 13)), PreprocessSpec())
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()
    x = load_image(write_rgb(tmp_path / "tall.webp", size=(100, 900)), PreprocessSpec(resize=32, crop=32))
    assert x.shape == (3, 32, 32)


def test_exif_orientation_applied(tmp_path):
    # Left half red, right half blue; EXIF orientation 6 means "rotate 90° clockwise to display",
    # after which red is on top and blue at the bottom.
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, quality=100, exif=exif)
    x = load_image(
        path, PreprocessSpec(resize=40, crop=40, layout="NHWC", scale=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    )
    top, bottom = x[2].mean(axis=0), x[-3].mean(axis=0)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


# -- load_image: modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("rgb.jpg", "RGB"),
        ("gray.jpg", "L"),
        ("cmyk.jpg", "CMYK"),
        ("rgba.png", "RGBA"),
        ("pal.png", "P"),
        ("deep.png", "I;16"),
        ("la.png", "LA"),
        ("bw.bmp", "1"),
        ("int.tif", "I"),
        ("float.tif", "F"),
        ("ycc.jpg", "YCbCr"),
        ("img.ppm", "RGB"),
    ],
)
def test_every_mode_decodes(tmp_path, name, mode):
    path = write_mode(tmp_path / name, mode)
    with Image.open(path) as im:
        stored = im.mode
    x = load_image(path, PreprocessSpec(resize=48, crop=40))
    assert x.shape == (3, 40, 40) and x.dtype == np.float32 and np.isfinite(x).all(), stored
    if mode in ("L", "I;16", "1", "I", "F", "LA"):  # gray stays gray: R == G == B
        raw = x * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]
        np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
        np.testing.assert_allclose(raw[1], raw[2], atol=1e-5)


def _raw_pixels(x: np.ndarray) -> np.ndarray:
    """Undo the default normalisation: back to 0..255 RGB, HWC."""
    return (np.moveaxis(x, 0, -1) * IMAGENET_STD + IMAGENET_MEAN) * 255.0


def test_transparency_composited_on_white(tmp_path):
    spec = PreprocessSpec(resize=48, crop=48)
    for name, mode in (("rgba.png", "RGBA"), ("pal.png", "P")):
        x = _raw_pixels(load_image(write_mode(tmp_path / name, mode, size=(96, 48)), spec))
        # center crop 48 of 96 wide: columns 0..23 come from the transparent half, 24..47 from red
        np.testing.assert_allclose(x[:, :20].reshape(-1, 3).mean(0), (255, 255, 255), atol=0.5)
        np.testing.assert_allclose(x[:, 28:].reshape(-1, 3).mean(0), (255, 0, 0), atol=0.5)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    spec = PreprocessSpec(resize=16, crop=16, interpolation="nearest")
    for value, want in ((65535, 255), (32896, 128), (257, 1), (0, 0)):
        path = tmp_path / f"v{value}.png"
        Image.fromarray(np.full((16, 16), value, np.uint16)).save(path)
        with Image.open(path) as im:
            assert im.mode.startswith("I")
        x = _raw_pixels(load_image(path, spec))
        np.testing.assert_allclose(x, want, atol=1e-3)


def test_cmyk_white_is_white(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(path, quality=100)
    x = _raw_pixels(load_image(path, PreprocessSpec(resize=32, crop=32)))
    np.testing.assert_allclose(x, 255, atol=2)


# -- load_image: bad files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maker", "reason_part"),
    [
        (write_truncated_jpeg, "truncated"),
        (write_zero_byte, "empty"),
        (write_text_as_image, "not an image"),
    ],
)
def test_bad_files_raise_image_decode_error(tmp_path, maker, reason_part):
    path = maker(tmp_path / "bad.JPEG")
    with pytest.raises(ImageDecodeError) as e:
        load_image(path, PreprocessSpec())
    assert isinstance(e.value, RqInputError)
    assert reason_part in e.value.reason and e.value.path == path
    assert_one_line(e.value)
    assert "\n" not in e.value.reason and len(e.value.reason) < 200


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "nope.jpg", PreprocessSpec())
    with pytest.raises(ImageDecodeError, match="folder"):
        load_image(tmp_path, PreprocessSpec())


def test_garbage_after_valid_header(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[60:-12] = b"\x00" * (len(data) - 72)  # corrupt the IDAT payload, keep the header
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError) as e:
        load_image(path, PreprocessSpec())
    assert_one_line(e.value)
