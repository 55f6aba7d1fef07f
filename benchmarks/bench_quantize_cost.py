"""Wall time and peak RSS of `rq quantize` against a plain batch-1 `quantize_static` loop, same recipe.

Each contender runs in its own child process (peak RSS = the child's ru_maxrss), one after the other in the same
invocation, on the same model, the same calibration images and the same preprocessing:

- rq:    `quantize.pipeline.quantize_model` (prepare → streaming calibration → quantize → checks);
- plain: what a user writes with ONNX Runtime alone: a CalibrationDataReader yielding one image at a time and
         `quantize_static(..., calibrate_method=<same>, per_channel, reduce_range, op types <same>)`. It is given
         the model as the user has it (`--plain-input raw`, the default) or rq's prepared model
         (`--plain-input prepared`) to isolate the calibration cost.

Also reports whether each output runs in onnxruntime. The plain run gets an address-space limit
(`--plain-mem-gb`, default 20) so that a histogram calibration that keeps every activation fails with a
MemoryError instead of taking the machine down.

    python benchmarks/bench_quantize_cost.py ../shared/models/resnet50-v1-keras-opset7.onnx \
        --calib ../shared/imagenet/calib --samples 100 --calibration percentile
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runs_in_ort(path: str, input_name: str) -> str:
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        session.run(None, {input_name: np.zeros((1, 3, 224, 224), np.float32)})
        return "runs"
    except Exception as exc:
        return f"FAILS: {str(exc).splitlines()[0][:160]}"


def run_rq(args, queue) -> None:
    from calibration import PreprocessSpec
    from quantize.measure.cpu import detect_cpu
    from quantize.pipeline import quantize_model
    from quantize.recipe import QuantRecipe

    started = time.perf_counter()
    out = Path(args.workdir) / "rq-int8.onnx"
    recipe = QuantRecipe(calibration=args.calibration, samples=args.samples, reduce_range=args.reduce_range)
    result = quantize_model(
        args.model, args.calib, output=out, recipe=recipe, spec=PreprocessSpec(), cpu=detect_cpu()
    )
    queue.put(
        {
            "who": "rq",
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": _peak_rss_mb(),
            "output": _runs_in_ort(str(out), result.prepared.signature.input_name),
            "recipe": result.recipe.label(),
        }
    )


def run_plain(args, queue) -> None:
    limit = int(args.plain_mem_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    started = time.perf_counter()
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        from calibration import PreprocessSpec, discover_dataset, load_image, select_samples

        model_path = args.model
        if args.plain_input == "prepared":
            from quantize.graph.prepare import prepare_model

            model_path = str(prepare_model(args.model, Path(args.workdir)).path)
        graph = onnx.load(model_path, load_external_data=False)
        inits = {i.name for i in graph.graph.initializer}
        input_name = next(i.name for i in graph.graph.input if i.name not in inits)
        del graph
        spec = PreprocessSpec()
        samples = select_samples(discover_dataset(args.calib), args.samples, 0)

        class OneImageReader(CalibrationDataReader):
            def __init__(self):
                self.items = iter(samples)

            def get_next(self):
                sample = next(self.items, None)
                if sample is None:
                    return None
                return {input_name: load_image(sample.path, spec)[None]}

        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        out = str(Path(args.workdir) / "plain-int8.onnx")
        quantize_static(
            model_path,
            out,
            OneImageReader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            per_channel=True,
            reduce_range=bool(args.reduce_range),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[args.calibration],
        )
        status = _runs_in_ort(out, input_name)
    except MemoryError:
        status = f"FAILED: MemoryError (address space limited to {args.plain_mem_gb:g} GB)"
    except Exception as exc:
        status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    queue.put(
        {
            "who": f"plain quantize_static (batch 1, {args.plain_input} model)",
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": _peak_rss_mb(),
            "output": status,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--calibration", default="percentile", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--reduce-range", type=int, default=None, choices=[0, 1])
    parser.add_argument("--plain-input", default="raw", choices=["raw", "prepared"])
    parser.add_argument("--plain-mem-gb", type=float, default=20.0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.reduce_range is not None:
        args.reduce_range = bool(args.reduce_range)
    results = []
    ctx = mp.get_context("spawn")  # a fresh interpreter per contender: honest peak RSS
    with tempfile.TemporaryDirectory(prefix="rq-bench-") as tmp:
        args.workdir = tmp
        for target in (run_rq, run_plain):
            queue = ctx.Queue()
            proc = ctx.Process(target=target, args=(args, queue))
            proc.start()
            proc.join()
            results.append(
                queue.get() if not queue.empty() else {"who": target.__name__, "exit": proc.exitcode}
            )
    rq, plain = results
    for r in results:
        print(json.dumps(r))
    if "seconds" in rq and "seconds" in plain:
        print(
            f"wall time plain/rq = {plain['seconds'] / rq['seconds']:.2f}×, "
            f"peak RSS plain/rq = {plain['peak_rss_mb'] / rq['peak_rss_mb']:.2f}×"
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
