"""End to end on the real ResNet-50 in ../shared: quantize with 100 calibration images, then compare INT8
with the original opset-7 FP32 file on 200 validation images.

Run with `pytest -m e2e -s` to see the measured figures. Skipped when ../shared is absent.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from calibration import BatchStream, PreprocessSpec, discover_dataset, select_samples
from quantize.measure.cpu import detect_cpu
from quantize.pipeline import quantize_model
from quantize.recipe import QuantRecipe

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "models" / "resnet50-v1-keras-opset7.onnx"
CALIB = SHARED / "imagenet" / "calib"
VAL = SHARED / "imagenet" / "val"
VAL_IMAGES = 200

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (MODEL.is_file() and CALIB.is_dir() and VAL.is_dir()),
        reason=f"needs {MODEL} and {SHARED / 'imagenet'}",
    ),
]


def _logits(model: Path, batches: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images})[0] for images in batches])


def test_resnet50_int8_agrees_with_fp32(tmp_path):
    started = time.perf_counter()
    result = quantize_model(
        MODEL,
        CALIB,
        output=tmp_path / "resnet50-int8.onnx",
        recipe=QuantRecipe(samples=100, seed=0),
        cpu=detect_cpu(),
    )
    quantize_seconds = time.perf_counter() - started
    assert result.output.is_file()
    assert result.images_used == 100
    ops = result.quantized_ops
    # Placement from the graph: every Conv, every Relu folded, residual Adds and pooling; FP32 only the head,
    # the Flatten before it and the input Add with a constant (not a residual).
    assert ops.by_type["Conv"] == [53, 53] and ops.fused == {"Relu": 49}
    assert ops.quantized == ops.candidates - 3 > 100
    assert sorted(reason for _t, reason in ops.fp32.values()) == [
        "classifier head, kept FP32 (it writes the logits)",
        "its output feeds only FP32 nodes",
        "not a residual Add of two quantized activations",
    ]
    assert result.bias_correction is not None and len(result.bias_correction.corrected) == 53

    dataset = discover_dataset(VAL)
    samples = select_samples(dataset, VAL_IMAGES, seed=0)
    assert len(samples) == VAL_IMAGES
    batches, labels = [], []
    with BatchStream(samples, PreprocessSpec(), batch_size=25) as stream:
        for batch in stream:
            batches.append(batch.images)
            labels.append(batch.labels)
    assert not stream.skipped
    labels = np.concatenate(labels)
    assert (labels >= 0).all()  # from the wnid folder names via the synset list

    started = time.perf_counter()
    fp32 = _logits(MODEL, batches).argmax(axis=1)  # the ORIGINAL opset-7 file
    int8 = _logits(result.output, batches).argmax(axis=1)
    eval_seconds = time.perf_counter() - started

    agreement = float((fp32 == int8).mean())
    fp32_top1 = float((fp32 == labels).mean())
    int8_top1 = float((int8 == labels).mean())
    print(
        f"\nresnet50 e2e on {len(labels)} val images: top-1 agreement INT8/FP32 {agreement:.1%}, "
        f"FP32 top-1 {fp32_top1:.1%}, INT8 top-1 {int8_top1:.1%} "
        f"(recipe {result.recipe.label()}, reduce_range={result.recipe.reduce_range}; "
        f"quantize {quantize_seconds:.1f} s, eval {eval_seconds:.1f} s)"
    )
    assert agreement >= 0.95
    assert fp32_top1 >= 0.70


def test_rq_eval_top1_matches_an_independent_reference_loop():
    """`rq eval --limit 100 --json` FP32 top-1 equals a minimal loop written here with Pillow + numpy only
    (shorter side to 256 bilinear, center crop 224, /255, mean/std, NCHW), labelled from the wnid folders
    through ../shared's synset list, on the same 100 images (select_samples(…, 100, seed 0))."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from quantize.cli import app

    result = CliRunner().invoke(
        app,
        ["eval", str(MODEL), "--data", str(VAL), "--limit", "100", "--json"],
        env={"RQ_DEBUG": None, "NO_COLOR": "1"},
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 100 and data["skipped"] == []
    (fp32,) = data["models"]

    samples = select_samples(discover_dataset(VAL), 100, 0)
    lines = (SHARED / "imagenet" / "synset_words.txt").read_text().splitlines()
    index = {line.split()[0]: i for i, line in enumerate(lines) if line.strip()}
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)

    def tensor(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
            im = im.resize(size, Image.Resampling.BILINEAR)
            left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
            im = im.crop((left, top, left + 224, top + 224))
            x = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
        return (x - mean) / std

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(samples), 25):
        chunk = samples[start : start + 25]
        logits = session.run(None, {name: np.stack([tensor(s.path) for s in chunk])})[0]
        labels = np.array([index[s.path.parent.name] for s in chunk])
        correct += int((logits.argmax(axis=1) == labels).sum())
    assert fp32["top1"] == pytest.approx(100.0 * correct / len(samples), abs=1e-9)
    print(f"\nrq eval FP32 top-1 on 100 val images: {fp32['top1']:.1f}% (reference loop: {correct}/100)")
