"""What ONNX Runtime's `quantize_static` does with DEFAULT arguments on a zoo-style opset-7 model.

    python benchmarks/plain_quantize_static.py ../shared/models/resnet50-v1-keras-opset7.onnx \
        --calib ../shared/imagenet/calib --samples 20

Calibrates with a plain batch-1 reader (rq's preprocessing), writes the model, then tries to run it in
onnxruntime and prints what happens. This is the failure rq's prepare stage exists to avoid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import PreprocessSpec, discover_dataset, load_image, select_samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    graph = onnx.load(args.model, load_external_data=False)
    inits = {i.name for i in graph.graph.initializer}
    input_name = next(i.name for i in graph.graph.input if i.name not in inits)
    samples = select_samples(discover_dataset(args.calib), args.samples, 0)
    spec = PreprocessSpec()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            sample = next(self.items, None)
            return None if sample is None else {input_name: load_image(sample.path, spec)[None]}

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "plain-int8.onnx")
        quantize_static(args.model, out, Reader())  # every argument left at its default
        opset = [
            o.version
            for o in onnx.load(out, load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        ]
        print(f"quantize_static wrote {out} (opset {opset})")
        try:
            session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
            session.run(None, {input_name: np.zeros((1, 3, 224, 224), np.float32)})
            print("the output model loads and runs")
        except Exception as exc:
            print(f"the output model FAILS in onnxruntime: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main()
