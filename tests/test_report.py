"""Report validation, writing and rendering (JSON → Markdown/HTML with an embedded PNG plot)."""

from __future__ import annotations

import base64
import copy
import json
import re

import numpy as np
import pytest

from calibration.errors import RqInputError
from quantize.measure.stats import paired_drop
from quantize.report.document import (
    PLOT_MISSING,
    plot_accuracy_vs_speed,
    render_html,
    render_markdown,
    render_report,
    validate_report,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _drop(lost: int, gained: int, n: int = 1300, extra_disagreements: int = 5) -> dict:
    a = np.zeros(n, dtype=bool)
    a[:1000] = True
    b = a.copy()
    b[:lost] = False
    b[1000 : 1000 + gained] = True
    return paired_drop(a, b, disagreements=lost + gained + extra_disagreements).to_dict()


def _bench(median_b1: float, median_b8: float, fp32=(10.0, 60.0)) -> dict:
    return {
        "1": {
            "median_ms": median_b1,
            "p90_ms": median_b1 * 1.1,
            "images_per_s": 1000 / median_b1,
            "ratio_to_fp32": fp32[0] / median_b1,
        },
        "8": {
            "median_ms": median_b8,
            "p90_ms": median_b8 * 1.1,
            "images_per_s": 8000 / median_b8,
            "ratio_to_fp32": fp32[1] / median_b8,
        },
    }


def _report() -> dict:
    """A realistic report: FP32 + two INT8 variants, all with accuracy, drop and bench figures."""
    flags = {"avx2": True, "avx512f": True, "avx512_vnni": False, "avx_vnni": False, "amx_int8": False}
    recipe = {"format": "QDQ", "per_channel": True, "calibration": "minmax", "reduce_range": False}
    return {
        "schema": "rq.report/1",
        "run_id": "20250101-120000-abc123",
        "created": "2025-01-01T12:00:00+00:00",
        "command": "rq run resnet50.onnx --calib calib/ --val val/ --bench --max-drop 0.5",
        "rq_version": "0.1.0",
        "packages": {"onnxruntime": "1.20.1", "onnx": "1.17.0", "numpy": "2.4.0"},
        "cpu": {
            "model": "Intel(R) Xeon(R) Platinum 8272CL",
            "arch": "x86_64",
            "logical_cores": 4,
            "flags_summary": {**flags, "vnni": False},
        },
        "advice": {"reduce_range": True, "reason": "no VNNI: 7-bit weights avoid vpmaddubsw saturation"},
        "model": {
            "path": "/models/resnet50.onnx",
            "sha256": "a" * 64,
            "size_bytes": 97_800_000,
            "signature": {"input": "data", "shape": ["N", 3, 224, 224]},
            "preparation": {
                "steps": ["shape inference", "constant folding"],
                "warnings": ["opset 11 upgraded to 13"],
                "seconds": 1.25,
            },
        },
        "calibration": {
            "folder": "calib/",
            "layout": "flat",
            "images_used": 300,
            "skipped": [[f"calib/bad{i}.jpg", "cannot decode"] for i in range(25)],
            "file_list_sha256": "b" * 64,
            "seconds": 12.5,
        },
        "validation": {
            "folder": "val/",
            "layout": "imagenet-synset-folders",
            "images": 1300,
            "skipped": [["val/x.txt", "not an image"]],
            "overlap_with_calibration": 0,
            "images_per_s": 180.0,
            "seconds": 22.0,
        },
        "variants": [
            {
                "name": "fp32",
                "kind": "fp32",
                "recipe": None,
                "path": "/models/resnet50.onnx",
                "sha256": "a" * 64,
                "size_bytes": 97_800_000,
                "quantized_ops": None,
                "accuracy": {"top1": 76.92, "top5": 93.31, "images": 1300},
                "drop": None,
                "bench": _bench(10.0, 60.0),
                "pareto": True,
            },
            {
                "name": "int8-qdq-per-channel",
                "kind": "int8",
                "recipe": recipe,
                "path": "out/resnet50.int8.onnx",
                "sha256": "c" * 64,
                "size_bytes": 25_600_000,
                "quantized_ops": {
                    "quantized": 54,
                    "candidates": 54,
                    "total_nodes": 122,
                    "by_type": {"Conv": 53},
                },
                "accuracy": {"top1": 76.77, "top5": 93.23, "images": 1300},
                "drop": _drop(lost=6, gained=4),
                "bench": _bench(7.5, 40.0),
                "pareto": True,
            },
            {
                "name": "int8-per-tensor",
                "kind": "int8",
                "recipe": {**recipe, "per_channel": False},
                "path": "out/resnet50.int8.pt.onnx",
                "sha256": "d" * 64,
                "size_bytes": 25_500_000,
                "quantized_ops": {
                    "quantized": 53,
                    "candidates": 54,
                    "total_nodes": 122,
                    "by_type": {"Conv": 53},
                },
                "accuracy": {"top1": 75.50, "top5": 92.80, "images": 1300},
                "drop": _drop(lost=22, gained=3),
                "bench": _bench(7.8, 41.0),
                "pareto": False,
            },
        ],
        "gate": {
            "max_drop_pt": 0.5,
            "passed": True,
            "exit_code": 0,
            "message": "",
            "variant": "int8-qdq-per-channel",
        },
        "stages": {"prepare": 1.25, "calibrate": 12.5, "quantize": 8.0, "validate": 44.0, "bench": 30.0},
        "bench": {
            "onnxruntime_version": "1.20.1",
            "provider": "CPUExecutionProvider",
            "threads": 4,
            "runs": 50,
            "warmup": 5,
            "notes": ["machine looked noisy"],
        },
        "notes": ["validation images are a 1300-image ImageNet subset"],
    }


def _no_bench(report: dict) -> dict:
    r = copy.deepcopy(report)
    for v in r["variants"]:
        v["bench"] = None
        v["pareto"] = None
    r["bench"] = None
    return r


def test_write_report_creates_three_files_and_round_trips(tmp_path):
    data = _report()
    out = tmp_path / "runs" / "r1"
    paths = write_report(data, out)
    assert set(paths) == {"json", "md", "html"}
    for p in paths.values():
        assert p.is_file() and p.parent == out
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == data
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]


def test_html_embeds_png_plot(tmp_path):
    paths = write_report(_report(), tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, "no embedded PNG"
    assert base64.b64decode(match.group(1)).startswith(PNG_SIGNATURE)
    assert "<style>" in page and "<link" not in page and "<script" not in page


def test_markdown_contents(tmp_path):
    data = _report()
    md = write_report(data, tmp_path)["md"].read_text(encoding="utf-8")
    drop = data["variants"][1]["drop"]
    assert drop["drop_pt"] == pytest.approx(2 / 1300 * 100)
    assert "PASSED: INT8 top-1 drop 0.15 pt ≤ 0.50 pt" in md
    ci = f"0.15 [{drop['ci_low_pt']:.2f}, {drop['ci_high_pt']:.2f}]".replace("-", "−")
    assert ci in md
    assert "resnet50.onnx" in md and data["run_id"] in md
    assert "INT8 gains are bounded near 1.33× on CPUs without VNNI" in md
    assert "Speedup b1" in md and "Speedup b8" in md
    assert "1.33×" in md  # fp32 10 ms / int8 7.5 ms at batch 1
    assert "54/54" in md and "53/54" in md
    assert "★" in md
    assert '"per_channel": true' in md  # recipe as JSON
    assert "constant folding" in md
    assert "calib/bad19.jpg" in md and "calib/bad20.jpg" not in md and "and 5 more" in md
    assert "onnxruntime" in md and "1.20.1" in md
    assert "c" * 64 in md
    assert "validation images are a 1300-image ImageNet subset" in md
    assert "validate" in md and "44.0 s" in md


def test_failed_gate_verdict():
    data = _report()
    data["gate"] = {
        "max_drop_pt": 0.5,
        "passed": False,
        "exit_code": 3,
        "message": "",
        "variant": "int8-per-tensor",
    }
    md = render_markdown(data)
    drop = data["variants"][2]["drop"]["drop_pt"]
    assert f"FAILED: INT8 top-1 drop {drop:.2f} pt > 0.50 pt (exit code 3)" in md
    assert "FAILED" in render_html(data)


def test_gate_without_variant_uses_smallest_drop_and_null_gate():
    data = _report()
    del data["gate"]["variant"]
    assert "PASSED: INT8 top-1 drop 0.15 pt ≤ 0.50 pt" in render_markdown(data)
    data["gate"] = None
    assert "not applied" in render_markdown(data)


def test_render_report_rerenders(tmp_path):
    paths = write_report(_report(), tmp_path)
    md_before = paths["md"].read_text(encoding="utf-8")
    paths["md"].unlink()
    paths["html"].unlink()
    again = render_report(tmp_path)
    assert again == paths
    assert again["md"].read_text(encoding="utf-8") == md_before
    assert "data:image/png;base64," in again["html"].read_text(encoding="utf-8")


def test_render_report_errors(tmp_path):
    with pytest.raises(RqInputError, match=r"no report\.json"):
        render_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RqInputError, match="not valid JSON") as info:
        render_report(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "report.json").write_text(json.dumps({"schema": "other/9"}), encoding="utf-8")
    with pytest.raises(RqInputError, match="schema"):
        render_report(tmp_path)


def test_validate_accepts_realistic_report():
    validate_report(_report())
    validate_report(_no_bench(_report()))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("run_id"), "missing key 'run_id'"),
        (lambda r: r.update(schema="rq.report/2"), "schema is 'rq.report/2'"),
        (lambda r: r.pop("schema"), "missing key 'schema'"),
        (lambda r: r["model"].pop("sha256"), "missing key 'model.sha256'"),
        (lambda r: r["cpu"]["flags_summary"].pop("vnni"), "cpu.flags_summary.vnni"),
        (
            lambda r: r["variants"][1]["accuracy"].update(top1="76.7"),
            r"variants\[1\].accuracy.top1 must be a number",
        ),
        (lambda r: r["variants"][2].update(kind="int4"), "kind must be 'fp32' or 'int8'"),
        (lambda r: r["variants"][2].update(name="fp32"), "not unique"),
        (lambda r: r["variants"][1]["bench"].update(x={}), "not a batch size"),
        (lambda r: r["variants"][1]["drop"].pop("ci_low_pt"), "ci_low_pt"),
        (lambda r: r["calibration"]["skipped"].append("just-a-path"), "pair"),
        (lambda r: r["gate"].update(passed="yes"), "gate.passed must be true or false"),
        (lambda r: r.update(notes="none"), "notes must be a list"),
        (lambda r: r["variants"][0].update(size_bytes=True), "size_bytes must be an integer or null"),
    ],
)
def test_validate_rejects(mutate, match):
    data = _report()
    mutate(data)
    with pytest.raises(RqInputError, match=match) as info:
        validate_report(data)
    assert "\n" not in str(info.value)


def test_validate_rejects_non_dict():
    with pytest.raises(RqInputError, match="JSON object"):
        validate_report([])  # type: ignore[arg-type]


def test_report_without_bench_renders_not_measured(tmp_path):
    data = _no_bench(_report())
    assert plot_accuracy_vs_speed(data) is None
    paths = write_report(data, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    md = paths["md"].read_text(encoding="utf-8")
    assert "data:image/png" not in page
    assert "needs --val and --bench" in page and "needs --val and --bench" in md
    assert PLOT_MISSING.split(":")[0] in md
    assert "not measured" in md and "not measured" in page


def test_minimal_report_renders(tmp_path):
    """Only FP32, nothing optional measured: every section falls back to text instead of failing."""
    data = _no_bench(_report())
    data.update(advice=None, calibration=None, validation=None, gate=None, notes=[], stages={})
    data["variants"] = [dict(data["variants"][0], accuracy=None)]
    paths = write_report(data, tmp_path)
    md = paths["md"].read_text(encoding="utf-8")
    assert "not measured" in md
    assert "needs --val and --bench" in md


def test_plot_png_and_no_pyplot_state():
    import matplotlib

    backend = matplotlib.get_backend()
    png = plot_accuracy_vs_speed(_report())
    assert png is not None and png.startswith(PNG_SIGNATURE)
    assert matplotlib.get_backend() == backend


def test_plot_computes_front_when_flags_absent():
    data = _report()
    for v in data["variants"]:
        v["pareto"] = None
    data["variants"][1]["name"] = "cost $5 int8"  # a "$" must not turn on mathtext
    assert plot_accuracy_vs_speed(data).startswith(PNG_SIGNATURE)


def test_html_escapes_model_name(tmp_path):
    data = _report()
    data["model"]["path"] = "/models/<script>alert(1)</script>.onnx"
    data["variants"][1]["name"] = 'int8 "<b>bold</b>" & co'
    data["gate"]["variant"] = data["variants"][1]["name"]
    paths = write_report(data, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "<b>bold</b>" not in page
    assert "&amp; co" in page
    md = paths["md"].read_text(encoding="utf-8")
    assert "<script>" not in md


def test_numpy_scalars_are_serialized(tmp_path):
    data = _report()
    data["variants"][1]["accuracy"]["images"] = np.int64(1300)
    data["variants"][1]["accuracy"]["top1"] = np.float64(76.77)
    paths = write_report(data, tmp_path)
    saved = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert saved["variants"][1]["accuracy"]["images"] == 1300


def test_not_writable_folder(tmp_path):
    # A path below a regular file cannot be created, even by root.
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(RqInputError, match="report folder is not writable") as info:
        write_report(_report(), blocker / "report")
    assert "\n" not in str(info.value)


def test_invalid_report_is_not_written(tmp_path):
    data = _report()
    data.pop("variants")
    with pytest.raises(RqInputError, match="variants"):
        write_report(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
