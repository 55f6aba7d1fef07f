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
from quantize.cpu import detect_cpu
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
    assert result.quantized_ops.quantized == result.quantized_ops.candidates > 50

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
