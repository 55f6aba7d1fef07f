"""Benchmark an FP32 model against its INT8 version with onnxruntime (interleaved runs).

    python benchmarks/bench_fp32_int8.py FP32.onnx INT8.onnx [--batch 1,8] [--runs 30] [--threads N]
                                         [--warmup 3] [--seed 0] [--json out.json]

A thin wrapper over :func:`quantize.measure.bench.bench_models`: prints the rich table (speed vs #1 is the FP32
median divided by the INT8 median, so > 1 means INT8 is faster) and, with ``--json``, writes the full
result including every sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a plain script from a checkout, the repo root is not on sys.path; make `quantize` importable.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from calibration.errors import RqInputError  # noqa: E402
from quantize.measure.bench import bench_models  # noqa: E402


def _batch_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes comma-separated integers, got {text!r}") from None


class _StatusLine:
    """bench_models' progress (calibration.progress.Progress) as the spinner's one status line."""

    def __init__(self, status):
        self.status, self.batch, self.round, self.runs = status, "", 0, 0

    def stage(self, name: str) -> None:
        self.batch, self.round = name.removeprefix("bench "), 0

    def total(self, n: int) -> None:
        self.runs = n

    def advance(self, n: int = 1) -> None:
        self.round += n
        self.status.update(f"{self.batch}: round {self.round}/{self.runs}")

    def note(self, text: str) -> None:
        self.status.update(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path, help="FP32 ONNX model (the reference, row #1)")
    ap.add_argument("int8", type=Path, help="INT8 ONNX model")
    ap.add_argument("--batch", type=_batch_list, default=[1, 8], help="comma-separated batch sizes (1,8)")
    ap.add_argument("--runs", type=int, default=30, help="timed interleaved rounds per batch size (30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per model per batch size (3)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random input tensor (0)")
    ap.add_argument("--json", type=Path, default=None, help="also write the full result as JSON here")
    args = ap.parse_args(argv)

    console = Console()
    err = Console(stderr=True)
    try:
        with err.status("benchmarking…") as status:
            result = bench_models(
                [args.fp32, args.int8],
                batch_sizes=args.batch,
                threads=args.threads,
                runs=args.runs,
                warmup=args.warmup,
                seed=args.seed,
                progress=_StatusLine(status),
            )
    except RqInputError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    console.print(result.render_table())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
