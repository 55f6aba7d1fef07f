"""Report validation, writing and rendering (JSON → Markdown/HTML with an embedded PNG plot)."""

from __future__ import annotations

import base64
import copy
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from calibration import ImageDataset
from calibration.errors import RqInputError
from quantize.backends.ort import QuantizedOps
from quantize.graph.prepare import ModelSignature, PreparedModel
from quantize.measure.bench import BenchResult, BenchRow
from quantize.measure.cpu import CpuInfo, advise_int8
from quantize.measure.evaluate import EvalRun, ModelAccuracy
from quantize.measure.stats import paired_drop
from quantize.measure.validate import Gate, Validation
from quantize.recipe import QuantRecipe
from quantize.report import (
    PLOT_MISSING,
    plot_accuracy_vs_speed,
    render_html,
    render_markdown,
    render_report,
    validate_report,
    write_report,
)
from quantize.report.data import accuracy_of, bench_by_batch, build_report, variant

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_IMAGES = 1300
FP32_CORRECT = 1000  # 76.92 % top-1


def _correct(lost: int = 0, gained: int = 0) -> np.ndarray:
    """Per-image top-1 hits: FP32's 1000 of 1300, minus `lost` of them, plus `gained` FP32 missed."""
    hits = np.zeros(N_IMAGES, dtype=bool)
    hits[:FP32_CORRECT] = True
    hits[:lost] = False
    hits[FP32_CORRECT : FP32_CORRECT + gained] = True
    return hits


def _drop(lost: int, gained: int, extra_disagreements: int = 5):
    return paired_drop(_correct(), _correct(lost, gained), disagreements=lost + gained + extra_disagreements)


def _bench_rows(index: int, name: str, median_b1: float, median_b8: float) -> list[BenchRow]:
    fp32 = {1: 10.0, 8: 60.0}
    return [
        BenchRow(
            model=name,
            name=name,
            model_index=index,
            batch=batch,
            median_ms=median,
            p90_ms=median * 1.1,
            mean_ms=median,
            min_ms=median * 0.95,
            images_per_s=1000 * batch / median,
            ratio_to_first=fp32[batch] / median,
        )
        for batch, median in ((1, median_b1), (8, median_b8))
    ]


def _build(with_bench: bool = True) -> dict:
    """A realistic report, assembled by quantize.report.data from the stages' own result types: FP32 and two
    INT8 variants (per-channel and per-tensor) with accuracy, paired drops, and (`with_bench`) latency."""
    cpu = CpuInfo(
        model="Intel(R) Xeon(R) Platinum 8272CL",
        vendor="GenuineIntel",
        arch="x86_64",
        logical_cores=4,
        flags=frozenset({"avx2", "avx512f"}),  # no VNNI: the report adds its no-VNNI note
    )
    recipe = QuantRecipe(calibration="minmax", reduce_range=False)
    names = ["fp32", "int8-qdq-per-channel", "int8-per-tensor"]
    hits = [_correct(), _correct(lost=6, gained=4), _correct(lost=22, gained=3)]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "resnet50.onnx"
        model.write_bytes(b"not really a model, but a file with a sha256")
        run = EvalRun(
            models=[
                ModelAccuracy(Path(n), h.astype(int), h, h | _correct(gained=200), 0, 1.0)
                for n, h in zip(names, hits, strict=True)
            ],
            labels=np.zeros(N_IMAGES, dtype=int),
            paths=[Path(f"val/{i}.JPEG") for i in range(N_IMAGES)],
            skipped=[(Path("val/x.txt"), "not an image")],
            seconds=22.0,
            batch_size=32,
        )
        dataset = ImageDataset(
            root=Path("val"), layout="imagenet-synset-folders", samples=[], labels_source=None
        )
        validation = Validation(dataset=dataset, run=run, drop=_drop(6, 4), overlap_with_calibration=0)
        bench = None
        if with_bench:
            bench = BenchResult(
                cpu=cpu.to_dict(),
                onnxruntime_version="1.20.1",
                provider="CPUExecutionProvider",
                threads=4,
                runs=50,
                warmup=5,
                models=names,
                batch_sizes=[1, 8],
                rows=_bench_rows(0, names[0], 10.0, 60.0)
                + _bench_rows(1, names[1], 7.5, 40.0)
                + _bench_rows(2, names[2], 7.8, 41.0),
                notes=["machine looked noisy"],
            )
        ops = {"by_type": {"Conv": [53, 53], "Gemm": [1, 1]}, "total_nodes": 122}
        variants = [
            variant(
                names[0], "fp32", model, accuracy=accuracy_of(validation, 0), bench=bench_by_batch(bench, 0)
            ),
            variant(
                names[1],
                "int8",
                Path("out/resnet50.int8.onnx"),
                recipe=recipe,
                quantized_ops=QuantizedOps(quantized=54, candidates=54, **ops),
                accuracy=accuracy_of(validation, 1),
                drop=_drop(6, 4),
                bench=bench_by_batch(bench, 1),
                sha256="c" * 64,
            ),
            variant(
                names[2],
                "int8",
                Path("out/resnet50.int8.pt.onnx"),
                recipe=recipe.with_changes(per_channel=False),
                quantized_ops=QuantizedOps(quantized=53, candidates=54, **ops),
                accuracy=accuracy_of(validation, 2),
                drop=_drop(22, 3),
                bench=bench_by_batch(bench, 2),
                sha256="d" * 64,
            ),
        ]
        prepared = PreparedModel(
            source=model,
            path=model,
            signature=ModelSignature("data", ["N", 3, 224, 224], "float32", "logits", ["N", 1000]),
            original_opset=11,
            original_ir_version=6,
            steps=["shape inference", "constant folding"],
            warnings=["opset 11 upgraded to 13"],
            seconds=1.25,
        )
        return build_report(
            command=[
                "rq",
                "quantize",
                str(model),
                "--calib",
                "calib/",
                "--val",
                "val/",
                "--bench",
                "--max-drop",
                "0.5",
            ],
            model=model,
            cpu=cpu,
            advice=advise_int8(cpu),
            prepared=prepared,
            variants=variants,
            calibration={
                "folder": "calib/",
                "layout": "flat",
                "images_requested": 300,
                "images_used": 300,
                "skipped": [[f"calib/bad{i}.jpg", "cannot decode"] for i in range(25)],
                "replaced": [[f"calib/bad{i}.jpg", f"calib/spare{i}.jpg"] for i in range(25)],
                "file_list_sha256": "b" * 64,
                "seconds": 12.5,
            },
            validation=validation,
            gate=Gate.from_drop(0.5, validation.drop, exit_code=3, variant=names[1]),
            bench=bench,
            stages={"prepare": 1.25, "calibrate": 12.5, "quantize": 8.0, "validate": 44.0, "bench": 30.0},
            notes=["validation images are a 1300-image ImageNet subset"],
        )


_BUILT: dict[bool, dict] = {}


def _report(with_bench: bool = True) -> dict:
    """A fresh copy of the built report (built once per module: the tests mutate their copy)."""
    if with_bench not in _BUILT:
        _BUILT[with_bench] = _build(with_bench)
    return copy.deepcopy(_BUILT[with_bench])


def _no_bench(report: dict) -> dict:
    """The same run without --bench (the argument is the with-bench report, for the call sites' reading)."""
    return _report(with_bench=False)


def test_write_report_creates_three_files_and_round_trips(tmp_path):
    data = _report()
    out = tmp_path / "runs" / "r1"
    paths = write_report(data, out)
    assert set(paths) == {"json", "md", "html"}
    for p in paths.values():
        assert p.is_file() and p.parent == out
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == json.loads(json.dumps(data))
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
    assert "INT8 gains are smaller on CPUs without VNNI" in md
    assert "Speedup b1" in md and "Speedup b8" in md
    assert "1.33×" in md  # fp32 10 ms / int8 7.5 ms at batch 1
    assert "54/54" in md and "53/54" in md
    assert "★" in md
    assert '"per_channel": true' in md  # recipe as JSON
    assert "constant folding" in md
    assert "calib/bad19.jpg" in md and "calib/bad20.jpg" not in md and "and 5 more" in md
    assert "Images used: 300 of 300 sampled" in md
    assert "Unreadable images replaced (25)" in md and "calib/bad3.jpg → calib/spare3.jpg" in md
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
    # rq writes strict JSON: a NaN put in by hand would render "PASSED: drop n/a pt > 1.00 pt"
    (tmp_path / "report.json").write_text('{"gate": {"drop_pt": NaN}}', encoding="utf-8")
    with pytest.raises(RqInputError, match="not strict JSON: NaN is not a JSON number"):
        render_report(tmp_path)
    # Infinity parses (older reports hold it for an exact node's SQNR): what fails here is the schema
    (tmp_path / "report.json").write_text('{"x": Infinity}', encoding="utf-8")
    with pytest.raises(RqInputError) as info:
        render_report(tmp_path)
    assert "strict JSON" not in str(info.value)
    (tmp_path / "report.json").write_bytes(b'{"schema": "rq.report/1", "x": "\xff"}')
    with pytest.raises(RqInputError, match="is not UTF-8 text"):
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
        (lambda r: r["cpu"]["isa"].pop("vnni"), "cpu.isa.vnni"),
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


def test_the_cpu_flags_are_stated_once():
    """`cpu.isa` (CpuInfo's own key, also in `rq bench` JSON) carries the flags; no `flags_summary` copy."""
    cpu = _report()["cpu"]
    assert "flags_summary" not in cpu
    assert cpu["isa"]["avx2"] is True and cpu["isa"]["vnni"] is False


def test_reports_written_by_earlier_rq_still_validate_and_render(tmp_path):
    """Earlier rq wrote the flags twice (`isa` and `flags_summary`); both shapes read back the same."""
    data = _report()
    data["cpu"]["flags_summary"] = dict(data["cpu"]["isa"])
    validate_report(data)
    assert render_markdown(data) == render_markdown(_report())


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (
            lambda r: r["variants"][1]["drop"].update(n="1300"),
            "invalid report: variants[1].drop.n must be an integer, got a string",
        ),
        (lambda r: r["cpu"].update(isa=None), "invalid report: cpu.isa must be an object, got null"),
        (lambda r: r["model"].pop("size_bytes"), "invalid report: missing key 'model.size_bytes'"),
    ],
)
def test_rq_report_rejects_a_malformed_report_json_with_exit_2(tmp_path, mutate, fragment):
    """`rq report DIR` validates report.json with the model that wrote it: one line naming the key, exit 2."""
    from typer.testing import CliRunner

    from quantize.cli import app

    data = _report()
    mutate(data)
    (tmp_path / "report.json").write_text(json.dumps(data), encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert not (tmp_path / "report.md").exists()  # nothing rendered from an invalid report


def _two_runtimes() -> dict:
    """The built report with every variant also run in OpenVINO (same files, close speeds, same top-1): what
    `rq quantize --runtime ort,openvino` writes, as far as the views read it."""
    data = _report()
    copies = []
    for v in data["variants"]:
        v["runtime"] = "ort"
        other = copy.deepcopy(v)
        other["name"] = f"{v['name']} · openvino"
        other["runtime"] = "openvino"
        for figures in other["bench"].values():
            figures["ratio_to_ort_fp32"] = round(figures["ratio_to_fp32"] * 1.04, 4)
        copies.append(other)
    for v in data["variants"]:
        for figures in v["bench"].values():
            figures["ratio_to_ort_fp32"] = figures["ratio_to_fp32"]
    data["variants"] += copies
    data["bench"]["runtime_versions"] = {"ort": "onnxruntime 1.20.1", "openvino": "openvino 2026.4.1"}
    data["validation"]["runtimes"] = {
        "ort": {"images_per_s": 59.1, "seconds": 22.0},
        "openvino": {"images_per_s": 71.3, "seconds": 18.2},
    }
    return data


def test_a_file_run_in_several_runtimes_is_one_artifact_and_one_recipe():
    data = _two_runtimes()
    validate_report(data)
    md = render_markdown(data)
    artifacts = md.split("## Artifacts")[1].split("##")[0]
    assert "| Variant | Runs in | Path |" in artifacts
    assert artifacts.count("c" * 64) == 1 and artifacts.count("d" * 64) == 1
    assert "| int8-qdq-per-channel | ort, openvino | out/resnet50.int8.onnx |" in artifacts
    recipes = md.split("## Recipes")[1].split("\n## ")[0]
    assert recipes.count("```json") == 2  # two INT8 files, each once
    assert "int8-qdq-per-channel (runs in ort, openvino):" in recipes
    assert "· openvino" not in recipes
    # One runtime: no "Runs in" column, names unchanged.
    single = render_markdown(_report())
    assert "Runs in" not in single and "int8-qdq-per-channel:" in single


def test_bench_footer_names_each_runtime_once():
    bench = render_markdown(_two_runtimes()).split("## Benchmark")[1].split("\n## ")[0]
    assert "runtimes: onnxruntime 1.20.1 (CPUExecutionProvider), openvino 2026.4.1;" in bench
    assert bench.count("onnxruntime 1.20.1") == 1
    single = render_markdown(_report()).split("## Benchmark")[1].split("\n## ")[0]
    assert "onnxruntime 1.20.1; CPUExecutionProvider;" in single


def test_validation_section_gives_each_runtime_its_throughput():
    md = render_markdown(_two_runtimes())
    validation = md.split("## Validation")[1].split("\n## ")[0]
    assert (
        "Evaluation throughput (decode + both models): 59.1 images/s in ort (22.0 s), "
        "71.3 images/s in openvino (18.2 s)" in validation
    )
    assert "Time: 40.2 s" in validation
    assert "Time: 22.0 s" in render_markdown(_report()).split("## Validation")[1]


def test_plot_labels_of_runtime_pairs_do_not_overlap():
    from quantize.report.plot import accuracy_vs_speed_figure

    fig, labels = accuracy_vs_speed_figure(_two_runtimes())
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert len(boxes) == 6
    overlapping = [(i, j) for i in range(6) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlapping, [(labels[i].get_text(), labels[j].get_text()) for i, j in overlapping]
    axes = labels[0].axes.get_window_extent(renderer)
    assert all(axes.contains(b.x0, b.y0) and axes.contains(b.x1, b.y1) for b in boxes)


def test_validation_runtimes_are_checked_and_an_unmeasured_pass_is_not_zero_seconds():
    data = _two_runtimes()
    data["validation"]["runtimes"]["openvino"]["images_per_s"] = "fast"
    with pytest.raises(RqInputError, match="images_per_s"):
        validate_report(data)
    data = _two_runtimes()
    data["validation"]["runtimes"] = {"ort": {"images_per_s": None, "seconds": None}}
    validate_report(data)
    assert "Time: 22.0 s" in render_markdown(data).split("## Validation")[1]  # the section's own figure
