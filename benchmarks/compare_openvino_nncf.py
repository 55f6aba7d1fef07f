"""rq against the peer a user would otherwise pick: NNCF's post-training INT8 run in OpenVINO.

NNCF (``nncf.quantize`` with its defaults) gets the same 100 calibration images rq uses (the same sample:
``select_samples(calib, 100, seed 0)``, the same preprocessing); its model runs in OpenVINO. rq's artifact
(an INT8 ONNX file made by ``rq quantize``) runs in ONNX Runtime and in OpenVINO. Every model is evaluated on
the same validation images (top-1 and top-1 agreement with FP32 in the same runtime) and timed interleaved,
in one process, round by round (FP32 and INT8 of both tools alternate, so drift hits all alike). The ratios
printed compare rq's best (fastest INT8 runtime) with NNCF+OpenVINO at each batch size, with a 95% bootstrap
interval over the rounds: two models running the same kernels differ by less than this machine's noise, and
the interval says whether a difference was shown at all. Two sessions of the *same* model differ by about 1 %
here (memory placement, compile order: an A/A effect the bootstrap cannot see), so NNCF's file is also timed
in a second session, and a difference counts only beyond how far those two differ. A session compiled later
ran faster here, so by default the sessions are compiled and timed twice: compiled in forward, then in reverse
order (within each phase the timing order rotates every round), and the ratio is the geometric mean of the two
phases' (``--no-counterbalance``: one phase); when the two phases' intervals do not overlap, the interval spans
both. (The pair is chosen
first, each side's faster model by its median in the same rounds; the interval does not redo that choice, so
with two candidates per side it is slightly narrower than a fully honest one.)

NNCF quantizes the FP32 model twice: as ``ov.Core().read_model`` reads the ONNX file (BatchNormalization
kept as an op, so NNCF puts a quantizer between each Conv and its BN), and as ``ov.convert_model`` converts it
(OpenVINO's offline transformations fold BN into the Conv first, as NNCF's own examples do). Both are timed;
the ratio is taken against whichever NNCF model is faster at that batch size (the peer at its best).

OpenVINO runs with ``INFERENCE_PRECISION_HINT=f32`` for every model (the float parts of both INT8 models
in f32, the FP32 baseline in f32, not bf16); NNCF's model is also timed with OpenVINO's *default* precision
(bf16 on CPUs with AVX512_BF16/AMX), which is what a user who does not set the hint gets.

Needs its own venv (nncf and openvino are never rq dependencies, and this never runs in the unit suite):

    python3 -m venv .venv-nncf && .venv-nncf/bin/pip install -e '.[openvino]' nncf==3.4.0
    .venv-nncf/bin/python benchmarks/compare_openvino_nncf.py ../shared/models/resnet50-v1-keras-opset7.onnx \\
        resnet50-v1-int8.onnx --calib ../shared/imagenet/calib --val ../shared/imagenet/val --val-limit 500
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import BatchStream, PreprocessSpec, discover_dataset, select_samples
from quantize.cli_options import build_spec
from quantize.measure import runtimes
from quantize.measure.bench import ort_session_config
from quantize.measure.evaluate import evaluate
from quantize.measure.stats import counterbalanced_speed_ratio, speed_ratio_interval
from quantize.measure.validate import validation_samples


def calibration_images(calib: Path, spec: PreprocessSpec, samples: int) -> list:
    chosen = select_samples(discover_dataset(calib), samples, 0)
    images = []
    with BatchStream(chosen, spec, batch_size=1) as stream:
        for batch in stream:
            images.append(batch.images)
    return images


def nncf_quantize(fp32: Path, images: list, out: Path, *, convert: bool) -> Path:
    """nncf.quantize with its defaults on `fp32` read by OpenVINO (`convert`: through ov.convert_model)."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32)) if convert else ov.Core().read_model(str(fp32))
    name = model.inputs[0].get_any_name()
    started = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(images, lambda x: {name: x}), subset_size=len(images))
    print(
        f"nncf.quantize ({'ov.convert_model' if convert else 'read_model'}): "
        f"{time.perf_counter() - started:.1f} s on {len(images)} images",
        file=sys.stderr,
    )
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def _open_nncf(path: Path, threads: int, *, default_precision: bool = False):
    """NNCF's IR in OpenVINO with rq's OpenVINO settings (those rq's own file gets); `default_precision`: without
    the precision hint, as OpenVINO runs by default (bf16 where the CPU has it)."""
    session = runtimes.get("openvino").open(path, threads)
    session._int8 = True  # an IR, not an ONNX file: rq's Q/DQ check cannot see its FakeQuantize nodes
    if default_precision:
        session._config = {k: v for k, v in session._config.items() if k != "INFERENCE_PRECISION_HINT"}
    return session


def _ort_options(session) -> str:
    options = session.session.get_session_options()
    spinning = ", ".join(f"{key}={value}" for key, value in ort_session_config(session).items())
    return (
        f"intra_op_num_threads={options.intra_op_num_threads}, inter_op_num_threads="
        f"{options.inter_op_num_threads}, graph_optimization_level={options.graph_optimization_level.name}, "
        f"{spinning}"
    )


def time_interleaved(entries, batches, runs: int, warmup: int, shape):
    """({(label, batch): median ms}, {(label, batch): [ms per round]}); every round runs every entry once,
    starting one further each round."""
    medians, per_round = {}, {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        for _label, session in entries:
            for _ in range(max(warmup, 1)):
                session.run(x)
        samples = {label: [] for label, _ in entries}
        gc.disable()
        try:
            for r in range(runs):
                # The order rotates every round, so no model always runs right after the same neighbour.
                for label, session in entries[r % len(entries) :] + entries[: r % len(entries)]:
                    t0 = time.perf_counter_ns()
                    session.run(x)
                    samples[label].append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            gc.enable()
        for label, values in samples.items():
            medians[(label, b)] = statistics.median(values)
            per_round[(label, b)] = values
    return medians, per_round


def _ratio(rounds: dict, reference, model) -> str:
    ratio = statistics.median(rounds[reference]) / statistics.median(rounds[model])
    interval = speed_ratio_interval(rounds[reference], rounds[model])
    return f"{ratio:.3f}×" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def comparison_text(phases: dict, peer, rq, same_a, same_b) -> str:
    """rq/NNCF over the phases (geometric mean of each phase's ratio, interval resampled within each phase),
    judged against the A/A spread (two sessions of NNCF's file) of the phase where it was widest, and each
    phase's own figures (a compile-order effect shows as a gap between them)."""
    point, interval = counterbalanced_speed_ratio([(rounds[peer], rounds[rq]) for rounds in phases.values()])
    spreads = [speed_ratio_interval(rounds[same_a], rounds[same_b]) for rounds in phases.values()]
    per_phase_intervals = [speed_ratio_interval(rounds[peer], rounds[rq]) for rounds in phases.values()]
    if interval is None or any(s is None for s in spreads) or any(i is None for i in per_phase_intervals):
        return f"{point:.3f}× (> 1: rq faster), no interval (fewer rounds than a bootstrap needs)"
    low, high = interval
    # The bootstrap sees the noise within each phase only: phases that disagree (a compile-order effect larger
    # than that noise) widen the interval to span both, rather than averaging the disagreement away.
    disagree = max(i[0] for i in per_phase_intervals) > min(i[1] for i in per_phase_intervals)
    if disagree:
        low, high = (
            min(low, *(i[0] for i in per_phase_intervals)),
            max(high, *(i[1] for i in per_phase_intervals)),
        )
    floor = max(max(abs(s[0] - 1), abs(s[1] - 1)) for s in spreads)  # how far one model differs from itself
    verdict = (
        "rq faster"
        if low > 1 + floor
        else "NNCF faster"
        if high < 1 - floor
        else "no difference beyond two sessions of one model"
    )
    per_phase = "; ".join(
        f"{phase}: rq/NNCF {_ratio(rounds, peer, rq)}, A/A {_ratio(rounds, same_a, same_b)}"
        for phase, rounds in phases.items()
    )
    widened = ", widened to span both phases, which disagree" if disagree else ""
    return f"{point:.3f}× (> 1: rq faster), 95% interval [{low:.3f}, {high:.3f}]{widened} ({per_phase}): {verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("rq_int8", type=Path, help="rq's INT8 ONNX artifact (rq quantize …)")
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--val", type=Path, help="labelled images for accuracy (skip: speed only)")
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--samples", type=int, default=100)
    # The preprocessing rq quantize was given (the same options; default: the ImageNet/resnet50-v2 transform).
    parser.add_argument("--preset", default=None)
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--mean", default=None, help="three comma-separated numbers")
    parser.add_argument("--std", default=None, help="three comma-separated numbers")
    parser.add_argument("--interpolation", default=None)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-counterbalance",
        dest="counterbalance",
        action="store_false",
        help="compile and time the sessions once, in one order (half the time; a compile-order bias stays)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep NNCF's IR files in this folder")
    args = parser.parse_args(argv)
    spec = build_spec(args.preset, args.mean, args.std, args.resize, args.crop, args.interpolation)
    batches = [int(b) for b in args.batch.split(",")]
    keep = args.keep
    with tempfile.TemporaryDirectory() as tmp:
        where = keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        images = calibration_images(args.calib, spec, args.samples)
        nncf_models = {
            "NNCF INT8 (read_model)": nncf_quantize(
                args.fp32, images, where / "nncf-read.xml", convert=False
            ),
            "NNCF INT8 (convert_model)": nncf_quantize(
                args.fp32, images, where / "nncf-convert.xml", convert=True
            ),
        }

        if args.val is not None:
            _, samples = validation_samples(args.val, None, args.val_limit)
            accuracy = {}
            for rt, names, models in (
                ("ort", ["FP32", "rq INT8"], [args.fp32, args.rq_int8]),
                (
                    "openvino",
                    ["FP32", "rq INT8", *nncf_models],
                    [args.fp32, args.rq_int8, *nncf_models.values()],
                ),
            ):
                run = evaluate(models, samples, spec, runtime=rt, threads=args.threads)
                fp32_pred = run.models[0].predictions
                for name, m in zip(names, run.models, strict=True):
                    agree = 100.0 * float((m.predictions == fp32_pred).mean())
                    flips = int((m.predictions != fp32_pred).sum())
                    accuracy[(name, rt)] = (m.top1, agree, flips)
            print(f"\naccuracy on {run.images} images of {args.val} (top-1 %, top-1 agreement with FP32 %):")
            for (name, rt), (top1, agree, flips) in accuracy.items():
                print(f"  {name:26} {rt:9} top-1 {top1:6.2f}   agreement {agree:6.2f} ({flips} differ)")

        ort_rt, ov_rt = runtimes.get("ort"), runtimes.get("openvino")
        label, path = next(iter(nncf_models.items()))
        # The same NNCF file in a second session: two sessions of one model differ by about 1 % here (memory
        # placement, the order they were compiled in), which no bootstrap over rounds can see. Their ratio is the
        # floor under which a difference between rq and NNCF is not attributed to either.
        same_label, same_path = list(nncf_models.items())[-1]
        openers = [
            ("FP32 ort", lambda: ort_rt.open(args.fp32, args.threads)),
            ("rq INT8 ort", lambda: ort_rt.open(args.rq_int8, args.threads)),
            ("FP32 openvino f32", lambda: ov_rt.open(args.fp32, args.threads)),
            ("rq INT8 openvino", lambda: ov_rt.open(args.rq_int8, args.threads)),
            *(
                (f"{name} openvino", lambda p=p: _open_nncf(p, args.threads))
                for name, p in nncf_models.items()
            ),
            (
                f"{label} openvino default-precision",
                lambda: _open_nncf(path, args.threads, default_precision=True),
            ),
            (f"{same_label} openvino, again", lambda: _open_nncf(same_path, args.threads)),
        ]
        # Counterbalanced: the sessions are compiled in one order and timed, then closed, compiled again in the
        # reverse order and timed again, and the two phases combined (geometric mean). A session compiled later ran
        # faster here (the A/A row), so one fixed order favours whichever model comes last.
        phases = (
            {"forward": openers, "reverse": openers[::-1]} if args.counterbalance else {"forward": openers}
        )
        phase_rounds = {}
        for phase, order in phases.items():
            opened = {name: open_() for name, open_ in order}
            entries = [
                (name, opened[name]) for name, _ in openers
            ]  # timed in one order whatever the compile order
            shape = [int(d) for d in entries[0][1].input_shape[1:]]
            _, rounds = time_interleaved(entries, batches, args.runs, args.warmup, shape)
            phase_rounds[phase] = rounds
            if phase == "forward":
                precisions = {name: session.precision for name, session in entries}
                ort_options, ov_config = _ort_options(opened["FP32 ort"]), opened["FP32 openvino f32"]._config
            del opened, entries
            gc.collect()
        # Each model's figure: the geometric mean of its median in each phase (a phase under heavier load
        # would move a median of the pooled rounds; see counterbalanced_speed_ratio).
        medians = {
            key: statistics.geometric_mean(statistics.median(rounds[key]) for rounds in phase_rounds.values())
            for key in phase_rounds["forward"]
        }
        rounds_text = f"{args.runs} rounds" + (
            " in each of two phases (sessions compiled in forward, then reverse order; geometric mean of the two)"
            if args.counterbalance
            else ""
        )
        print(
            f"\nlatency: median of {rounds_text}, interleaved (+{args.warmup} warmup), {args.threads} threads, "
            f"{ort_rt.version()}, {ov_rt.version()}"
        )
        print(f"  onnxruntime sessions: {ort_options}")
        print(f"  openvino compile config, every OpenVINO row: {ov_config}")
        print("  (the default-precision row: the same without INFERENCE_PRECISION_HINT)")
        print(f"  {'model':50} {'precision':>12} " + " ".join(f"{'b' + str(b) + ' ms':>10}" for b in batches))
        for label, _ in openers:
            print(
                f"  {label:50} {precisions[label]:>12} "
                + " ".join(f"{medians[(label, b)]:10.2f}" for b in batches)
            )
        nncf_labels = [f"{label} openvino" for label in nncf_models]
        same_a, same_b = f"{same_label} openvino", f"{same_label} openvino, again"
        for b in batches:
            rq_best = min(("rq INT8 ort", "rq INT8 openvino"), key=lambda k: medians[(k, b)])
            peer = min(nncf_labels, key=lambda k: medians[(k, b)])
            print(
                f"batch {b}: rq's best ({rq_best}) vs NNCF's best ({peer}): "
                + comparison_text(phase_rounds, (peer, b), (rq_best, b), (same_a, b), (same_b, b))
                + f"; rq INT8/FP32 in ORT {medians[('FP32 ort', b)] / medians[('rq INT8 ort', b)]:.2f}×, "
                f"in OpenVINO {medians[('FP32 openvino f32', b)] / medians[('rq INT8 openvino', b)]:.2f}×"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
