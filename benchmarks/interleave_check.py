"""Are `rq bench`'s interleaved figures biased by the other sessions alive in the same process?

For every (model, runtime) pair this times the model (a) alone in a fresh process and (b) interleaved with all
the others in one process (what `rq bench` does), alternating (a) and (b) for several rounds so the machine's
drift hits both alike, and prints the medians side by side with their ratio. A ratio far from 1 for some pair
means another session's threads (ORT's spinning pool, OpenVINO's TBB workers) steal its cores.

    python benchmarks/interleave_check.py FP32.onnx INT8.onnx --runtime ort,openvino --batch 1,8 --rounds 3
    python benchmarks/interleave_check.py FP32.onnx INT8.onnx --spinning   # ORT pools spinning after runs too
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize.measure.bench import bench_models


def _alone(model: str, runtime: str, args) -> dict[int, float]:
    """Median ms per batch of one model in one runtime, timed in a process of its own."""
    code = (
        "import json,sys; from quantize.measure.bench import bench_models; from quantize.measure import runtimes; "
        f"runtimes.get('openvino').extra_config.update({args.ov_config!r}); "
        f"r = bench_models([{model!r}], batch_sizes={args.batch!r}, runs={args.runs}, warmup={args.warmup}, "
        f"runtimes=[{runtime!r}], allow_spinning={args.spinning!r}, threads={args.threads!r}); "
        "print(json.dumps({row.batch: row.median_ms for row in r.rows}))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--runtime", default="ort")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--spinning",
        action="store_true",
        help="let ORT's intra-op pools keep spinning after a run (rq: they stop when it returns)",
    )
    parser.add_argument(
        "--ov-config",
        default="",
        help="OpenVINO CPU properties added to rq's, KEY=VALUE,… (e.g. ENABLE_CPU_PINNING=NO), alone and interleaved",
    )
    args = parser.parse_args(argv)
    args.ov_config = dict(kv.split("=", 1) for kv in args.ov_config.split(",") if kv.strip())
    if args.ov_config:
        from quantize.measure import runtimes as runtimes_mod

        runtimes_mod.get("openvino").extra_config.update(args.ov_config)
    args.batch = [int(b) for b in args.batch.split(",")]
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    pairs = [(m, rt) for rt in runtimes for m in args.models]
    alone: dict[tuple[str, str, int], list[float]] = {}
    together: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.rounds):
        for m, rt in pairs:
            for b, ms in _alone(m, rt, args).items():
                alone.setdefault((m, rt, b), []).append(ms)
        res = bench_models(
            args.models,
            batch_sizes=args.batch,
            runs=args.runs,
            warmup=args.warmup,
            runtimes=runtimes,
            allow_spinning=args.spinning,
            threads=args.threads,
        )
        for row in res.rows:
            together.setdefault((row.model, row.runtime, row.batch), []).append(row.median_ms)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(
        f"median of {args.rounds} rounds of {args.runs}-run medians; ORT spinning {'on' if args.spinning else 'off'}"
        + (f"; OpenVINO {args.ov_config}" if args.ov_config else "")
    )
    print(
        f"{'model':40} {'runtime':9} {'batch':>5} {'alone ms':>10} {'interleaved ms':>15} {'inter/alone':>12}"
    )
    for key in sorted(alone, key=lambda k: (k[2], k[1], args.models.index(k[0]))):
        a = statistics.median(alone[key])
        t = statistics.median(together[key])
        print(f"{Path(key[0]).name:40} {key[1]:9} {key[2]:5d} {a:10.2f} {t:15.2f} {t / a:11.2f}×")
    print("per round (alone | interleaved), ms:")
    for key in sorted(alone, key=lambda k: (k[2], k[1], args.models.index(k[0]))):
        a_text = " ".join(f"{x:.1f}" for x in alone[key])
        t_text = " ".join(f"{x:.1f}" for x in together[key])
        print(f"  {Path(key[0]).name} {key[1]} b{key[2]}: {a_text} | {t_text}")
    for rt in runtimes:
        for b in args.batch:
            base = [k for k in alone if k[1] == rt and k[2] == b and k[0] == args.models[0]]
            if not base:
                continue
            for m in args.models[1:]:
                k = (m, rt, b)
                ra = statistics.median(alone[base[0]]) / statistics.median(alone[k])
                rt_ = statistics.median(together[base[0]]) / statistics.median(together[k])
                print(
                    f"ratio #1/{Path(m).name} in {rt} at batch {b}: alone {ra:.2f}×, interleaved {rt_:.2f}×"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
