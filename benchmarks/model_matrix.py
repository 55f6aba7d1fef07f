"""rq's defaults on every model of a folder (default ../shared/models): one Markdown table.

For each `*.onnx` model the script runs `rq quantize MODEL --calib CALIB --val VAL --bench --json` with
the model's own preprocessing flags and *no other flag* (rq's defaults of the checkout it runs from), each
in its own child process, one after the other (never two at once, so the speed figures do not share the
CPU). It reads the run's report JSON and writes one row per model:

FP32 / INT8 top-1, the drop with its paired 95% CI, top-1 agreement with FP32 (and the disagreements), the
seconds rq took to make the INT8 model (prepare + calibrate + quantize), and INT8/FP32 speed (FP32 median
latency / INT8 median latency, one interleaved `--bench` run) at batch 1 and 8.

    .venv/bin/python benchmarks/model_matrix.py                       # all models, all 1300 val images
    .venv/bin/python benchmarks/model_matrix.py --val-limit 200 --out reports/matrix.md
    .venv/bin/python benchmarks/model_matrix.py --rq-arg=--gate-on --rq-arg=ci   # extra flags for every model

Preprocessing per model: a small table below keyed by file name and checked against the file's sha256
(a changed file with the same name is reported, not silently given the wrong preprocessing); a model not in
the table is skipped with a note, as its normalization cannot be guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"

# file name -> (sha256 or None, rq preprocessing flags). The flags are what ../shared/README.md says each
# model was trained with; nothing else is passed to rq.
PREPROCESSING: dict[str, tuple[str | None, list[str]]] = {
    "resnet50-v1-keras-opset7.onnx": (
        "2c5697a67f33164fcbc7c9dc77bbd2e6e8cf287cd36ebb36691b9213f1a87a22",
        [],  # rq's default preprocessing is this model's (resize 256, crop 224, ImageNet mean/std)
    ),
    "efficientnet-lite1.onnx": (
        "7231ec131568d296243ca38925a0ca5ea38f363027501979ac74e486f2131024",
        ["--resize", "274", "--crop", "240", "--mean", "0.498,0.498,0.498", "--std", "0.502,0.502,0.502"],
    ),
    "resnet50-v2-7.onnx": (
        "79102261eb6e5fd7af5d27f41316293e388c5cb691e5d25bfb035c4f64fefe31",
        [],
    ),
}


def _sha256(path: Path) -> str:
    from quantize.fetch import sha256_file

    return sha256_file(path)


def _rq_command() -> list[str]:
    rq = Path(sys.executable).with_name("rq")
    return [str(rq)] if rq.is_file() else [sys.executable, "-m", "quantize.cli"]


def run_model(model: Path, flags: list[str], args, report_dir: Path, out_dir: Path) -> dict:
    """One `rq quantize` in a child process; its report JSON (parsed), or an error row."""
    output = out_dir / f"{model.stem}-int8.onnx"
    command = [
        *_rq_command(),
        "quantize",
        str(model),
        "--calib",
        str(args.calib),
        "--val",
        str(args.val),
        "--bench",
        "--bench-batch",
        "1,8",
        "--bench-runs",
        str(args.bench_runs),
        "--out",
        str(output),
        "--report-dir",
        str(report_dir),
        "--json",
        *flags,
        *args.rq_arg,
    ]
    if args.val_limit:
        command += ["--val-limit", str(args.val_limit)]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": model.name, "error": f"exit {proc.returncode}: {last}", "wall_s": wall}
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"model": model.name, "error": "rq printed no JSON report", "wall_s": wall}
    return {"model": model.name, "report": report, "wall_s": wall, "command": command}


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def row_of(result: dict) -> list[str]:
    name = result["model"]
    if "error" in result:
        return [name, *(["—"] * 8), result["error"]]
    report = result["report"]
    fp32, int8 = report["variants"][0], report["variants"][1]
    drop = int8.get("drop") or {}
    stages = report.get("stages") or {}
    quantize_s = sum(stages.get(k) or 0.0 for k in ("prepare", "calibrate", "tune", "quantize"))
    bench = int8.get("bench") or {}
    speed = {b: (bench.get(b) or {}).get("ratio_to_fp32") for b in ("1", "8")}
    n = drop.get("n")
    differ = drop.get("disagreements")
    agree = drop.get("agreement_pct")
    if agree is None and n:
        agree = 100.0 * (n - differ) / n
    ci = f"{drop['drop_pt']:.2f} [{drop['ci_low_pt']:.2f}, {drop['ci_high_pt']:.2f}]" if drop else "—"
    ops = int8.get("quantized_ops") or {}
    return [
        name,
        _fmt((fp32.get("accuracy") or {}).get("top1")),
        _fmt((int8.get("accuracy") or {}).get("top1")),
        ci,
        f"{_fmt(agree)} ({differ} differ)" if agree is not None else "—",
        _fmt(quantize_s, 1),
        _fmt(speed["1"], 2, "×"),
        _fmt(speed["8"], 2, "×"),
        f"{ops.get('quantized')}/{ops.get('candidates')}" if ops else "—",
        (int8.get("name") or "").removeprefix("INT8 "),
    ]


HEADERS = [
    "model",
    "FP32 top-1 %",
    "INT8 top-1 %",
    "drop pt [95% CI]",
    "agreement %",
    "quantize s",
    "INT8/FP32 b1",
    "INT8/FP32 b8",
    "ops quantized",
    "recipe",
]


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def markdown(results: list[dict], args, skipped: list[str]) -> str:
    images = next((r["report"]["variants"][1]["drop"]["n"] for r in results if "report" in r), None)
    from quantize.measure.cpu import detect_cpu

    lines = [
        f"rq model matrix — rq defaults, {args.calib} calibration (100 images by default), "
        f"{images if images is not None else '?'} images of {args.val}; CPU: {detect_cpu().describe()}; "
        f"Python {platform.python_version()}, onnxruntime {_ort_version()}",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    for r in results:
        lines.append("| " + " | ".join(row_of(r)) + " |")
    lines.append("")
    lines.append(
        "drop = FP32 top-1 − INT8 top-1 (paired 95% CI: Tango's score interval); agreement = images where INT8 predicts FP32's "
        "class; quantize s = prepare + calibrate + quantize; INT8/FP32 = FP32 median latency / INT8 median "
        "latency in one interleaved run (> 1: INT8 faster; noisy on a shared machine)."
    )
    lines.extend(f"- skipped {s}" for s in skipped)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=SHARED / "models", help="folder of .onnx models")
    parser.add_argument("--calib", type=Path, default=SHARED / "imagenet" / "calib")
    parser.add_argument("--val", type=Path, default=SHARED / "imagenet" / "val")
    parser.add_argument("--val-limit", type=int, default=None, help="validate on this many images (all)")
    parser.add_argument("--bench-runs", type=int, default=20)
    parser.add_argument("--only", default=None, help="comma-separated model file names to run")
    parser.add_argument("--rq-arg", action="append", default=[], help="extra rq quantize argument (repeat)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here too")
    parser.add_argument("--json-out", type=Path, default=None, help="write every run's figures as JSON")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per model")
    args = parser.parse_args(argv)
    if args.val_limit is not None and args.val_limit < 1:
        parser.error("--val-limit must be ≥ 1")
    if not args.models.is_dir():
        parser.error(f"models folder not found: {args.models}")
    models = sorted(args.models.glob("*.onnx"))
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        models = [m for m in models if m.name in wanted]
    if not models:
        parser.error(f"no .onnx model in {args.models}")
    results: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rq-matrix-") as tmp:
        tmp_path = Path(tmp)
        for model in models:
            entry = PREPROCESSING.get(model.name)
            if entry is None:
                skipped.append(f"{model.name}: no preprocessing known for it (add it to PREPROCESSING)")
                continue
            sha, flags = entry
            if sha is not None and _sha256(model) != sha:
                skipped.append(
                    f"{model.name}: sha256 differs from the file the preprocessing was written for"
                )
                continue
            result = run_model(model, flags, args, tmp_path / "reports", tmp_path)
            results.append(result)
            print(" | ".join(row_of(result)), file=sys.stderr, flush=True)
    text = markdown(results, args, skipped)
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.json_out:
        slim = [
            {k: v for k, v in r.items() if k != "report"}
            | (
                {"variants": r["report"]["variants"], "stages": r["report"]["stages"]}
                if "report" in r
                else {}
            )
            for r in results
        ]
        args.json_out.write_text(json.dumps(slim, indent=2, default=str), encoding="utf-8")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
