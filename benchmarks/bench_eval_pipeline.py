"""Throughput of rq's evaluation pipeline against ONNX Runtime alone on pre-decoded tensors, same batch size.

    python benchmarks/bench_eval_pipeline.py ../shared/models/resnet50-v1-keras-opset7.onnx \
        --data ../shared/imagenet/val --batch 32 [--limit N] [--rounds 2]

Both are measured in the same run, alternating (pipeline, inference-only, pipeline, …) so the machine's drift
hits both; the figure is the ratio of medians. The pipeline decodes in threads while ORT runs the previous
batch; inference-only runs the same session over tensors decoded beforehand. Goal: pipeline ≥ 90% of
inference-only images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import BatchStream, PreprocessSpec
from quantize.measure.cpu import detect_cpu
from quantize.measure.evaluate import evaluate, inference_only_throughput
from quantize.measure.validate import validation_samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    spec = PreprocessSpec()
    _, samples = validation_samples(args.data, None, args.limit)
    with BatchStream(samples, spec, batch_size=args.batch) as stream:
        decoded = np.concatenate([b.images for b in stream])
    pipeline, inference = [], []
    top1 = None
    for _ in range(args.rounds):
        run = evaluate([Path(args.model)], samples, spec, batch_size=args.batch)
        pipeline.append(run.images_per_s)  # timed from after the session is created, like inference-only
        top1 = run.models[0].top1
        inference.append(inference_only_throughput(Path(args.model), decoded, batch_size=args.batch))
    result = {
        "model": args.model,
        "images": len(decoded),
        "batch": args.batch,
        "top1": round(top1, 2),
        "pipeline_images_per_s": [round(x, 2) for x in pipeline],
        "inference_only_images_per_s": [round(x, 2) for x in inference],
        "ratio_of_medians": round(statistics.median(pipeline) / statistics.median(inference), 4),
        "cpu": detect_cpu().describe(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
