"""`quantize.run.run`, the verb behind `rq quantize`, called directly: the gate, the report it assembles and
writes, the held-back fidelity without --val, the request's checks, and the backend registry it runs through."""

from __future__ import annotations

import json

import pytest

from calibration.errors import RqInputError
from calibration.progress import ProgressCallbacks
from quantize import backends
from quantize.exits import EXIT_GATE_FAILED, EXIT_OK
from quantize.recipe import LEGACY_OP_TYPES, QuantRecipe
from quantize.report import validate_report
from quantize.run import RunRequest, run
from tests.helpers.calib_images import WNIDS, make_class_folders
from tests.helpers.cpu import x86_cpu
from tests.helpers.tiny_models import SMALL_SPEC

# Per-tensor, minmax, Conv/Gemm/MatMul, 7-bit: the sensitive node's outlier wrecks INT8 (see test_tune).
BREAKING = QuantRecipe(
    op_types=LEGACY_OP_TYPES,
    per_channel=False,
    calibration="minmax",
    reduce_range=True,
    samples=16,
    batch_size=8,
)


def request(flipping, tmp_path, **changes) -> RunRequest:
    fields = {
        "model": flipping["model"],
        "calib": flipping["calib"],
        "output": tmp_path / "int8.onnx",
        "recipe": BREAKING,
        "spec": SMALL_SPEC,
        "workers": 2,
        "val": flipping["val"],
        "report_dir": tmp_path / "reports",
        "command": ["test_run"],
        "cpu": x86_cpu("avx2"),
    } | changes
    return RunRequest(**fields)


def written_report(result) -> dict:
    return json.loads(result.report_paths["json"].read_text())


def test_failed_gate_is_a_result_not_an_exception_and_the_report_is_written(flipping, tmp_path):
    stages: list[str] = []
    result = run(
        request(flipping, tmp_path, max_drop=0.0), progress=ProgressCallbacks(on_stage=stages.append)
    )
    assert result.gate is not None and not result.gate.passed
    assert result.exit_code == EXIT_GATE_FAILED
    assert result.output == tmp_path / "int8.onnx" and result.output.is_file()
    assert list(result.validations) == ["ort"] and result.validation is result.validations["ort"]
    assert result.validation.drop.drop_pt > 0 and result.fidelity is None and result.bench is None
    # The one assembler's report is what was written, and it is a valid rq.report/1 document.
    data = written_report(result)
    assert data == json.loads(json.dumps(result.report))
    validate_report(data)
    assert data["command"] == "test_run"
    assert data["gate"]["passed"] is False and data["gate"]["exit_code"] == EXIT_GATE_FAILED
    fp32, int8 = data["variants"]
    assert (fp32["kind"], int8["kind"]) == ("fp32", "int8")
    assert int8["drop"]["drop_pt"] == pytest.approx(result.validation.drop.drop_pt, abs=1e-4)
    assert data["stages"].keys() >= {"prepare", "calibrate", "quantize", "validate"}
    assert {p.name for p in result.report_paths.values()} == {"report.json", "report.md", "report.html"}
    assert stages[:3] == ["prepare", "calibrate", "quantize"]
    assert stages[3].startswith("validate")


def test_gate_passes_with_the_sensitive_node_in_fp32_and_bench_is_measured(flipping, tmp_path):
    recipe = BREAKING.with_changes(exclude_nodes=("conv_sensitive",))
    result = run(request(flipping, tmp_path, recipe=recipe, max_drop=0.0, bench_batches=(1,), bench_runs=1))
    assert result.gate.passed and result.exit_code == EXIT_OK
    assert result.validation.drop.drop_pt == 0.0
    data = written_report(result)
    assert [v["bench"]["1"]["runtime"] for v in data["variants"]] == ["ort", "ort"]
    assert data["bench"] is not None and "bench" in data["stages"]


def test_without_val_fidelity_is_measured_on_held_back_calibration_images(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calib = tmp_path / "calib"
    make_class_folders(calib, {WNIDS[0]: 10, WNIDS[1]: 10}, size=(48, 40))
    notes: list[str] = []
    stages: list[str] = []
    counted: dict[str, int] = {}

    def total(n: int) -> None:
        counted[stages[-1].split(" (")[0]] = 0

    def advance(n: int) -> None:
        counted[stages[-1].split(" (")[0]] += n

    result = run(
        RunRequest(
            model=tiny_model,
            calib=calib,
            output=tmp_path / "tiny-int8.onnx",
            recipe=QuantRecipe(samples=8, batch_size=4),
            spec=SMALL_SPEC,
            workers=2,
            report_dir=None,
            cpu=x86_cpu("avx2"),
        ),
        progress=ProgressCallbacks(
            on_stage=stages.append, on_total=total, on_advance=advance, on_note=notes.append
        ),
    )
    assert result.report_paths is None  # report_dir None: assembled, not written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "tiny-int8.onnx"]
    assert result.gate is None and result.validations == {} and result.exit_code == EXIT_OK
    assert result.fidelity is not None and result.fidelity.images == 12  # 20 images, 8 calibrated with
    assert counted == {"calibrate": 8, "fidelity": 12} and notes == []
    assert result.report["fidelity"]["images"] == 12
    validate_report(result.report)


def test_request_checks_fail_before_any_work(flipping, tmp_path):
    cases = [
        ({"max_drop": 1.0, "val": None}, "--max-drop needs --val"),
        ({"tune": True}, "--tune needs --val"),
        ({"gate_on": "upper"}, "--gate-on must be one of point, ci"),
        ({"max_drop": float("nan")}, "--max-drop must be a finite number"),
        ({"bench_batches": (1,), "bench_runs": 0}, "--bench-runs must be ≥ 1"),
        ({"runtimes": ("tensorrt",)}, "unknown runtime 'tensorrt'"),
    ]
    for changes, message in cases:
        with pytest.raises(RqInputError, match=message):
            run(request(flipping, tmp_path, **changes))
    assert not (tmp_path / "int8.onnx").exists() and not (tmp_path / "reports").exists()


def test_backend_registry():
    assert backends.names()[:2] == ("ort", "inc")
    ort = backends.get("ort")
    assert ort.uses_rq_ranges and not ort.has_tuner and ort.adapt(BREAKING) is BREAKING
    inc = backends.get("inc")  # importing the INC backend needs no neural-compressor
    assert not inc.uses_rq_ranges and inc.has_tuner
    adapted = inc.adapt(QuantRecipe())
    assert adapted.op_types == LEGACY_OP_TYPES and adapted.bias_correction is False
    with pytest.raises(RqInputError, match="backend must be one of ort, inc"):
        backends.get("tensorrt")


def test_a_registered_backend_is_what_the_pipeline_runs(tiny_model, calib_dir, tmp_path, monkeypatch):
    """A third backend plugs in through `register`: here one that wraps ORT and records its calls."""
    calls: list[str] = []
    ort = backends.get("ort")

    class Recording:
        name = "ort"
        uses_rq_ranges = True
        has_tuner = False

        def require(self):
            calls.append("require")

        def versions(self):
            return {}

        def adapt(self, recipe):
            calls.append("adapt")
            return recipe

        def quantize(self, *args):
            calls.append("quantize")
            ort.quantize(*args)

    monkeypatch.setitem(backends._instances, "ort", Recording())
    result = run(
        RunRequest(
            model=tiny_model,
            calib=calib_dir,
            output=tmp_path / "o.onnx",
            recipe=QuantRecipe(samples=8, batch_size=4),
            spec=SMALL_SPEC,
            holdout_images=0,
            report_dir=None,
            cpu=x86_cpu("avx2"),
        )
    )
    assert calls == ["require", "adapt", "quantize"]
    assert result.output.is_file() and result.fidelity is None
