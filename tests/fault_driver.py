"""Run `rq` in this process and send it a signal at a chosen stage (for tests/test_faults.py).

    python tests/fault_driver.py STAGE SIGNAL[,SIGNAL...] -- quantize MODEL --calib DIR ...

The stage is reached deterministically: the driver wraps the function that does that stage's work so that it
sends the signal(s) to its own process from inside it (no sleeps, no guessing). The signals travel through
the real `kill` system call and rq's real handlers. Stages:

- ``prepare``   right after ORT's quant_pre_process returned, still inside the shape-inference scratch folder
- ``calibrate`` when the calibrator asks for its first batch (its augmented model is in the work folder)
- ``quantize``  right after ORT's quantizer wrote the INT8 model into the work folder
- ``publish``   while the INT8 model is being written beside ``--out`` (half of its bytes written)
- ``validate``  when FP32/INT8 validation starts (the model is published)
- ``bench``     when the benchmark starts
- ``report``    after report.json was written, before report.md
- ``cleanup``   while the work folder is being removed (the removal must still complete)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys


def _send(signals: list[int]) -> None:
    for signum in signals:
        os.kill(os.getpid(), signum)


def install(stage: str, signals: list[int]) -> None:
    import quantize  # first: it keeps onnxruntime's telemetry files out of $TMPDIR
    import quantize.graph.prepare
    import quantize.measure.bench
    import quantize.measure.validate
    import quantize.pipeline
    import quantize.report.schema

    if stage == "prepare":
        import onnxruntime.quantization.shape_inference as shape_inference

        original = shape_inference.quant_pre_process

        def pre_process(*args, **kwargs):
            original(*args, **kwargs)
            _send(signals)

        shape_inference.quant_pre_process = pre_process
    elif stage == "calibrate":
        original_calibrate = quantize.pipeline.calibrate

        def calibrate(model_path, input_name, batches, recipe, workdir, **kwargs):
            def counted():
                for i, batch in enumerate(batches):
                    if i == 0:
                        _send(signals)
                    yield batch

            return original_calibrate(model_path, input_name, counted(), recipe, workdir, **kwargs)

        quantize.pipeline.calibrate = calibrate
    elif stage == "quantize":
        original_quantize = quantize.backends.ort.quantize_with_ort

        def quantize_with_ort(*args, **kwargs):
            result = original_quantize(*args, **kwargs)
            _send(signals)
            return result

        quantize.backends.ort.quantize_with_ort = quantize_with_ort
    elif stage == "publish":
        original_save = quantize.graph.prepare.onnx.save_model

        def save_model(model, path, *args, **kwargs):
            if not os.path.basename(str(path)).startswith("."):  # not the temporary file beside --out
                return original_save(model, path, *args, **kwargs)
            data = model.SerializeToString()
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                _send(signals)
                fh.write(data[len(data) // 2 :])
            return None

        quantize.graph.prepare.onnx.save_model = save_model
    elif stage in ("validate", "bench"):
        module = quantize.measure.validate if stage == "validate" else quantize.measure.bench
        name = "validate" if stage == "validate" else "bench_models"
        original_stage = getattr(module, name)

        def started(*args, **kwargs):
            _send(signals)
            return original_stage(*args, **kwargs)

        setattr(module, name, started)
    elif stage == "report":
        original_write = quantize.report.schema.atomic_write_text

        def atomic_write_text(path, text):
            if os.path.basename(str(path)) == quantize.report.schema.MD_NAME:
                _send(signals)
            return original_write(path, text)

        quantize.report.schema.atomic_write_text = atomic_write_text
    elif stage == "cleanup":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if os.path.basename(str(path)).startswith("rq-"):
                _send(signals)
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown stage {stage!r}")


def main(argv: list[str]) -> None:
    stage, names, sep, *rq_args = argv
    assert sep == "--", "usage: fault_driver.py STAGE SIGNAL[,SIGNAL] -- rq arguments"
    signals = [getattr(signal, f"SIG{name}") for name in names.split(",")]
    install(stage, signals)
    from quantize.cli import app

    app(rq_args, prog_name="rq")


if __name__ == "__main__":
    main(sys.argv[1:])
