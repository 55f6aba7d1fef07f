"""End to end: the README's headline command (`rq quantize MODEL --calib … --val … --max-drop 0.5 --bench`), as
README.md writes it, run as a process on the real ResNet-50 in ../shared, on fewer images so that CI can afford
it (32 calibration images, 200 validation images, 3 timed runs at batch 1).

Checked: exit code 0, the gate line, the INT8 file in the working folder, report.json/md/html under
reports/<run-id>/, report.json valid and carrying the paired drop's confidence interval, and nothing written
into ../shared. Skipped when ../shared is absent.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from quantize.report import validate_report

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "resnet50-v1-keras-opset7.onnx"
IMAGENET = SHARED / "imagenet"
#: What makes the headline command cheap enough for CI (2 cores): ~1 min instead of ~10.
CHEAP = ["--samples", "32", "--val-limit", "200", "--bench-batch", "1", "--bench-runs", "3"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (MODEL.is_file() and (IMAGENET / "calib").is_dir() and (IMAGENET / "val").is_dir()),
        reason=f"needs {MODEL} and {IMAGENET}",
    ),
]


def headline_args() -> list[str]:
    """The arguments of README.md's install-and-run command after `rq`, with ../shared made absolute."""
    readme = (ROOT / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if ".venv/bin/rq quantize " in line]
    args = shlex.split(line.split(".venv/bin/rq ", 1)[1])
    return [str(SHARED / a.removeprefix("../shared/")) if a.startswith("../shared/") else a for a in args]


def test_readme_headline_command_on_resnet50(tmp_path):
    args = headline_args()
    assert args[:2] == ["quantize", str(MODEL)]
    assert "--bench" in args and args[args.index("--max-drop") + 1] == "0.5"
    rq = Path(sys.executable).with_name("rq")  # the console script the README's install puts beside python
    assert rq.is_file(), f"{rq} missing: install the project (pip install -e .)"
    shared_before = sorted((p, p.stat().st_mtime_ns) for p in SHARED.rglob("*") if p.is_file())
    env = {k: v for k, v in os.environ.items() if k not in ("RQ_DEBUG", "RQ_CPU_FLAGS")}
    done = subprocess.run(
        [str(rq), *args, *CHEAP],
        cwd=tmp_path,
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output

    # the gate line, on stderr (the terminal may wrap the rest of its message onto the next lines)
    gate_lines = [line for line in done.stderr.splitlines() if line.startswith(("PASSED:", "FAILED:"))]
    assert len(gate_lines) == 1 and gate_lines[0].startswith("PASSED: INT8 top-1 drop "), output
    assert "≤ 0.50 pt" in gate_lines[0], output

    # the INT8 file, default name in the working folder
    int8 = tmp_path / "resnet50-v1-keras-opset7-int8.onnx"
    assert int8.is_file(), output
    assert 0 < int8.stat().st_size < MODEL.stat().st_size / 2
    op_types = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([int8.name, "reports"])

    # the report files
    (run_dir,) = (tmp_path / "reports").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.html", "report.json", "report.md"]
    assert f"report: reports/{run_dir.name}/report.html" in output
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert report["calibration"]["images_used"] == 32
    assert report["validation"]["images"] == 200 and report["validation"]["skipped"] == []

    # the CI fields: the paired drop with its interval, and the gate that read it
    (variant,) = [v for v in report["variants"] if v["kind"] == "int8"]
    drop = variant["drop"]
    for field in ("drop_pt", "ci_low_pt", "ci_high_pt", "confidence", "n", "method", "agreement_pct"):
        assert field in drop, (field, drop)
    assert drop["n"] == 200 and drop["confidence"] == 0.95
    assert drop["ci_low_pt"] <= drop["drop_pt"] <= drop["ci_high_pt"]
    assert drop["drop_pt"] == pytest.approx(drop["top1_a"] - drop["top1_b"])
    gate = report["gate"]
    assert gate["passed"] is True and gate["exit_code"] == 0
    assert gate["max_drop_pt"] == 0.5 and gate["gate_on"] == "point" and gate["images"] == 200
    assert gate["drop_pt"] == pytest.approx(drop["drop_pt"]) and gate["drop_pt"] <= 0.5
    assert gate["ci_high_pt"] == pytest.approx(drop["ci_high_pt"], abs=1e-4)
    assert gate["message"].startswith(gate_lines[0].strip()), (gate["message"], gate_lines[0])

    # the benchmark ran both models
    assert {row["batch"] for row in report["bench"]["rows"]} == {1}
    assert len(report["bench"]["rows"]) == 2, report["bench"]["rows"]
    md = (run_dir / "report.md").read_text()
    assert gate["message"] in md
    assert "data:image/png" in (run_dir / "report.html").read_text()  # the plot

    # ../shared is read-only to rq
    assert sorted((p, p.stat().st_mtime_ns) for p in SHARED.rglob("*") if p.is_file()) == shared_before
