"""The runtime seam (quantize/measure/runtimes.py) and --runtime on rq bench / eval / quantize.

The second runtime here is real, not a stand-in for ONNX Runtime: ``onnx.reference.ReferenceEvaluator``
(numpy), registered in the seam like any runtime. "picky" is the same runtime refusing quantized files, as
OpenVINO refuses a model it cannot read. The real OpenVINO path is in test_openvino.py (CI's extra venv).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import quantize.sweep as sweep_module
from calibration.errors import RqInputError
from quantize.measure import runtimes
from quantize.recipe import QuantRecipe
from quantize.report import validate_report
from tests.helpers.calib_images import make_class_folders
from tests.helpers.cli import SMALL, all_output, assert_one_line_error
from tests.helpers.cpu import x86_cpu
from tests.helpers.onehot import top1_60_percent, wnid
from tests.helpers.sensitive import sensitive_model
from tests.helpers.tiny_models import SMALL_SPEC, tiny_cnn

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


class ReferenceSession:
    runtime = "reference"
    device = "onnx.reference (numpy)"

    def __init__(self, path: Path):
        model = onnx.load(str(path))
        if any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            # the reference implementation has DequantizeLinear from opset 19 on
            model = onnx.version_converter.convert_version(model, 21)
        self._evaluator = ReferenceEvaluator(model)
        inp, out = model.graph.input[0], model.graph.output[0]

        def dims(vi):
            return [d.dim_value or d.dim_param or None for d in vi.type.tensor_type.shape.dim]

        self.input_name = inp.name
        self.input_type = "tensor(float)"
        self.input_shape = dims(inp)
        self.output_shape = dims(out)
        self.precision = "int8+f32" if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else "f32"

    def run(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._evaluator.run(None, {self.input_name: images})[0], np.float32)


class ReferenceRuntime:
    name = "reference"
    label = "onnx.reference"

    def version(self) -> str:
        return f"onnx.reference {onnx.__version__}"

    def check(self) -> None:
        pass

    def open(
        self, path: Path, threads: int | None = None, *, allow_spinning: bool = False
    ) -> ReferenceSession:
        return ReferenceSession(Path(path))


class PickyRuntime(ReferenceRuntime):
    """Refuses files with QuantizeLinear, or every file when `everything` is set."""

    name = "picky"
    label = "picky"

    def __init__(self, everything: bool = False):
        self.everything = everything

    def open(
        self, path: Path, threads: int | None = None, *, allow_spinning: bool = False
    ) -> ReferenceSession:
        session = super().open(path, threads)
        if self.everything or session.precision != "f32":
            raise RqInputError(f"picky cannot read {Path(path).name}: quantized models are not supported")
        return session


@pytest.fixture()
def fake_runtimes():
    runtimes.register(ReferenceRuntime())
    runtimes.register(PickyRuntime())
    yield
    runtimes.unregister("reference")
    runtimes.unregister("picky")


def test_parse_names_and_unknown_runtime():
    assert runtimes.parse(None) == ["ort"]
    assert runtimes.parse("ort, ort") == ["ort"]
    with pytest.raises(RqInputError, match="unknown runtime 'tensorrt'; choose from ort"):
        runtimes.parse("ort,tensorrt")


def test_bench_two_runtimes_rows_and_ratios(cli, fake_runtimes, tiny_pair):
    fp32, int8 = tiny_pair
    result = cli(
        "bench",
        fp32,
        int8,
        "--runtime",
        "ort,reference",
        "--runs",
        "2",
        "--batch",
        "1,2",
        "--warmup",
        "1",
        "--json",
    )
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["runtimes"] == ["ort", "reference"] and data["errors"] == []
    # every timed call of every runtime, in the order run: each round times every session once
    assert data["order"][:4] == [[0, 1, "ort"], [1, 1, "ort"], [0, 1, "reference"], [1, 1, "reference"]]
    assert len(data["order"]) == 2 * 2 * 2 * 2  # runs × models × runtimes × batch sizes
    assert data["runtime_versions"]["reference"].startswith("onnx.reference")
    rows = {(r["runtime"], r["model_index"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == 8
    for (rt, index, batch), row in rows.items():
        same_fp32 = rows[(rt, 0, batch)]["median_ms"]
        ort_fp32 = rows[("ort", 0, batch)]["median_ms"]
        assert row["ratio_to_first"] == pytest.approx(same_fp32 / row["median_ms"])
        assert row["ratio_to_ort_first"] == pytest.approx(ort_fp32 / row["median_ms"])
        assert row["precision"] == ("f32" if index == 0 else "int8+f32")
        assert row["cpu_median_ms"] > 0  # process CPU time per run, next to wall time
    # the table names the runtime and the precision of every row
    table = cli(
        "bench", fp32, int8, "--runtime", "ort,reference", "--runs", "1", "--batch", "1", "--warmup", "0"
    )
    assert table.exit_code == 0, all_output(table)
    assert "reference" in table.stdout and "int8+f32" in table.stdout and "vs #1 ort" in table.stdout


def test_bench_without_ort_does_not_name_onnxruntime_in_its_footer(cli, fake_runtimes, tiny_pair):
    result = cli("bench", tiny_pair[0], "--runtime", "reference", "--runs", "1", "--batch", "1")
    assert result.exit_code == 0, all_output(result)
    assert "onnx.reference" in result.stdout and "onnxruntime" not in result.stdout


def test_bench_runtime_that_cannot_read_the_int8_model_still_reports_the_others(
    cli, fake_runtimes, tiny_pair
):
    fp32, int8 = tiny_pair
    result = cli("bench", fp32, int8, "--runtime", "ort,picky", "--runs", "1", "--batch", "1", "--json")
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert {(r["runtime"], r["model_index"]) for r in data["rows"]} == {("ort", 0), ("ort", 1), ("picky", 0)}
    ((index, rt, why),) = data["errors"]
    assert (index, rt) == (1, "picky") and "quantized models are not supported" in why and "\n" not in why
    table = cli("bench", fp32, int8, "--runtime", "ort,picky", "--runs", "1", "--batch", "1")
    assert "#2 in picky: not measured, picky cannot read tiny-int8.onnx" in table.stdout.replace("\n", " ")


def test_bench_runtime_that_cannot_run_the_fp32_model_is_exit_2(cli, tiny_pair, tmp_path):
    runtimes.register(PickyRuntime(everything=True))
    try:
        out = tmp_path / "bench.json"
        result = cli("bench", *tiny_pair, "--runtime", "ort,picky", "--runs", "1", "--batch", "1")
        assert_one_line_error(result, "picky cannot read tiny.onnx")
        assert not out.exists()
    finally:
        runtimes.unregister("picky")


def test_eval_in_another_runtime_gives_the_same_top1(cli, fake_runtimes, tmp_path):
    model, val = top1_60_percent(tmp_path)
    result = cli("eval", model, "--data", val, "--runtime", "ort,reference", "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["runtime"] == "ort"
    tops = {rt: run["models"][0]["top1"] for rt, run in data["runtimes"].items()}
    assert tops == {"ort": 60.0, "reference": 60.0}
    assert [run["models"][0]["precision"] for run in data["runtimes"].values()] == ["f32", "f32"]
    versions = [run["runtime_version"] for run in data["runtimes"].values()]
    assert versions[0].startswith("onnxruntime ") and versions[1].startswith("onnx.reference ")
    table = cli("eval", model, "--data", val, "--runtime", "ort,reference", *SMALL).stdout
    assert "precision" in table and "CPU: " in table and f"runtimes: {versions[0]}, {versions[1]}" in table


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_unknown_runtime_is_one_line_exit_2(cli, tiny_pair, tmp_path, command):
    extra = ["--data", tmp_path] if command == "eval" else []
    assert_one_line_error(
        cli(command, tiny_pair[0], *extra, "--runtime", "tensorrt"), "unknown runtime 'tensorrt'"
    )


@pytest.mark.skipif(HAS_OPENVINO, reason="openvino is installed here")
@pytest.mark.parametrize("command", ["bench", "eval", "quantize"])
def test_openvino_without_the_extra_names_the_install_command(cli, tiny_pair, tmp_path, command):
    extra = {"bench": [], "eval": ["--data", tmp_path], "quantize": ["--calib", tmp_path]}[command]
    result = cli(command, tiny_pair[0], *extra, "--runtime", "openvino")
    line = assert_one_line_error(result, "pip install 'rq-quant[openvino]'")
    assert "--runtime openvino needs the openvino extra" in line


def test_ort_openvino_without_its_provider_is_one_line(cli, tiny_pair):
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the OpenVINO execution provider")
    line = assert_one_line_error(
        cli("bench", tiny_pair[0], "--runtime", "ort-openvino"), "onnxruntime-openvino"
    )
    assert "OpenVINOExecutionProvider" in line


def test_quantize_validates_and_benches_in_every_runtime(cli, fake_runtimes, tmp_path):
    model = sensitive_model(tmp_path / "tiny1000.onnx", n_sensitive=0)
    calib = tmp_path / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    val = tmp_path / "val"
    make_class_folders(val, {wnid(0): 3, wnid(1): 3}, size=(48, 40))
    reports = tmp_path / "reports"
    result = cli(
        "quantize", model, "--calib", calib, "--val", val, "--max-drop", "100", "--bench", "--bench-runs", "1",
        "--bench-batch", "1", "--samples", "8", "--workers", "2", "--out", tmp_path / "int8.onnx",
        "--report-dir", reports, "--runtime", "ort,reference", *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, all_output(result)
    assert "Validation in ort:" in result.stdout and "Validation in reference:" in result.stdout
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    data = json.loads((run / "report.json").read_text())
    validate_report(data)
    by_name = {v["name"]: v for v in data["variants"]}
    label = next(n for n in by_name if n.startswith("INT8") and "·" not in n)
    assert set(by_name) == {"FP32", label, "FP32 · reference", f"{label} · reference"}
    assert [v["runtime"] for v in data["variants"]] == ["ort", "ort", "reference", "reference"]
    for name, v in by_name.items():
        assert v["accuracy"]["images"] == 6, name  # validated in its own runtime
        figures = v["bench"]["1"]
        assert figures["runtime"] == v["runtime"]
        assert "ratio_to_ort_fp32" in figures and figures["precision"] in ("f32", "int8+f32")
    assert by_name["FP32 · reference"]["bench"]["1"]["ratio_to_fp32"] == 1.0
    html = (run / "report.html").read_text()
    assert "vs ORT FP32" in html and "reference" in html
    md = (run / "report.md").read_text()
    assert "| Variant | Runtime | Kind |" in md and "| FP32 · reference | reference | FP32 |" in md
    assert "the fronts (and the plot) compare the speedups against ONNX Runtime's FP32" in md
    # Each runtime's validation pass is timed on its own; the file is listed once, with where it ran.
    assert set(data["validation"]["runtimes"]) == {"ort", "reference"}
    assert "images/s in ort (" in md and "images/s in reference (" in md
    assert md.split("## Artifacts")[1].count(by_name[label]["sha256"]) == 1


def test_quantize_runtime_without_val_or_bench_is_one_line_exit_2(cli, fake_runtimes, tiny_pair, tmp_path):
    """Without --val or --bench nothing would run in that runtime (the label-free check runs in ORT)."""
    out = tmp_path / "int8.onnx"
    result = cli("quantize", tiny_pair[0], "--calib", tmp_path, "--out", out, "--runtime", "reference")
    assert_one_line_error(result, "--runtime chooses where --val and --bench run")
    assert not out.exists()


def test_ray_with_another_runtime_is_one_line_exit_2(cli, fake_runtimes, tiny_pair, tmp_path):
    result = cli("eval", tiny_pair[0], "--data", tmp_path, "--runtime", "reference", "--ray", "local")
    assert_one_line_error(result, "--ray runs models in onnxruntime only")


class CountingEvaluate:
    """Wraps quantize.sweep.evaluate and records the runtime of every validation pass."""

    def __init__(self, real):
        self.real = real
        self.runtimes: list[str] = []

    def __call__(self, models, samples, spec, **kwargs):
        self.runtimes.append(kwargs.get("runtime", "ort"))
        return self.real(models, samples, spec, **kwargs)


@pytest.fixture()
def sweep_inputs(tmp_path) -> dict[str, Path]:
    model = sensitive_model(tmp_path / "tiny1000.onnx", n_sensitive=0)
    calib = tmp_path / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    val = tmp_path / "val"
    make_class_folders(val, {wnid(0): 3, wnid(1): 3}, size=(48, 40))
    return {"model": model, "calib": calib, "val": val}


SWEEP = ["--grid", "weights", "--bench-batch", "1", "--bench-runs", "1", "--samples", "8", "--workers", "2"]


def test_sweep_validates_and_benches_every_recipe_in_every_runtime(
    cli, fake_runtimes, sweep_inputs, tmp_path
):
    reports = tmp_path / "reports"
    result = cli(
        "sweep", sweep_inputs["model"], "--calib", sweep_inputs["calib"], "--val", sweep_inputs["val"],
        "--report-dir", reports, "--runtime", "ort,reference", "--json", *SWEEP, *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    validate_report(data)
    variants = data["variants"]
    int8 = [v["name"] for v in variants if v["kind"] == "int8" and v["runtime"] == "ort"]
    assert len(int8) >= 2 and not any("·" in n for n in int8)
    # rows per (variant, runtime): FP32 and every recipe in ort, then the same in reference
    assert [v["name"] for v in variants] == [
        "FP32",
        *int8,
        "FP32 · reference",
        *(f"{n} · reference" for n in int8),
    ]
    assert [v["runtime"] for v in variants] == ["ort"] * (len(int8) + 1) + ["reference"] * (len(int8) + 1)
    by_name = {v["name"]: v for v in variants}
    for v in variants:
        assert v["accuracy"]["images"] == 6, v["name"]  # validated in its own runtime
        figures = v["bench"]["1"]
        assert figures["runtime"] == v["runtime"]
        assert "ratio_to_ort_fp32" in figures
    assert by_name["FP32 · reference"]["bench"]["1"]["ratio_to_fp32"] == 1.0
    for name in int8:  # the same INT8 file in both runtimes
        assert by_name[name]["sha256"] == by_name[f"{name} · reference"]["sha256"]
        assert by_name[f"{name} · reference"]["drop"] is not None
    assert any("validated and benchmarked in ort, reference" in n for n in data["notes"])
    # the console table names each row's runtime, and the speed axis the fronts use
    from rich.console import Console

    from quantize.console import sweep_table

    console = Console(record=True, width=300)
    console.print(sweep_table(data))
    text = console.export_text()
    assert "runtime" in text and "vs ORT FP32 b1" in text and "the axis of the ★ and ◆ fronts" in text
    fp32_ref = next(line for line in text.splitlines() if "FP32 · reference" in line)
    assert "reference" in fp32_ref.split("FP32 · reference", 1)[1]
    # without timings there are no speed columns to explain
    console = Console(record=True, width=300)
    console.print(sweep_table({**data, "variants": [{**v, "bench": None} for v in data["variants"]]}))
    text = console.export_text()
    assert "runtime" in text and "vs ORT FP32" not in text and "speed b" not in text


def test_sweep_cache_is_per_runtime_and_version(fake_runtimes, sweep_inputs, tmp_path, monkeypatch):
    def run(names):
        return sweep_module.run_sweep(
            sweep_inputs["model"], sweep_inputs["calib"], sweep_inputs["val"], grid="weights",
            base=QuantRecipe(samples=8), spec=SMALL_SPEC, report_dir=tmp_path, bench_batches=[], workers=2,
            cpu=x86_cpu("avx2"), runtimes=names,
        )  # fmt: skip

    quantized: list[str] = []
    real_quantize = sweep_module.quantize_prepared

    def counting_quantize(*args):
        quantized.append(args[2].digest())
        return real_quantize(*args)

    monkeypatch.setattr(sweep_module, "quantize_prepared", counting_quantize)
    evaluated = CountingEvaluate(sweep_module.evaluate)
    monkeypatch.setattr(sweep_module, "evaluate", evaluated)

    first = run(["ort"])
    recipes = len(quantized)
    assert recipes >= 2 and evaluated.runtimes == ["ort"] * (recipes + 1)
    # adding a runtime validates FP32 and every recipe there, and re-quantizes nothing
    second = run(["ort", "reference"])
    assert len(quantized) == recipes
    assert evaluated.runtimes[recipes + 1 :] == ["reference"] * (recipes + 1)
    assert [(e.runtime, e.cached) for e in second.entries] == [("ort", True), ("reference", False)] * recipes
    assert second.cache_dir == first.cache_dir
    # everything cached: nothing evaluated
    before = len(evaluated.runtimes)
    third = run(["ort", "reference"])
    assert len(evaluated.runtimes) == before and all(e.cached for e in third.entries)

    # another version of the runtime: its predictions are made anew, the INT8 files are reused
    class NewerReference(ReferenceRuntime):
        def version(self) -> str:
            return "onnx.reference 99.0"

    tag = sweep_module.runtime_tag("reference")
    runtimes.register(NewerReference())
    assert sweep_module.runtime_tag("reference") != tag
    fourth = run(["ort", "reference"])
    assert evaluated.runtimes[before:] == ["reference"] * (recipes + 1)
    assert len(quantized) == recipes
    assert [e.cached for e in fourth.entries if e.runtime == "reference"] == [False] * recipes


def test_sweep_with_ray_and_another_runtime_is_one_line_exit_2(cli, fake_runtimes, sweep_inputs, tmp_path):
    result = cli(
        "sweep", sweep_inputs["model"], "--calib", sweep_inputs["calib"], "--val", sweep_inputs["val"],
        "--runtime", "reference", "--ray", "local", "--report-dir", tmp_path / "r",
    )  # fmt: skip
    assert_one_line_error(result, "--ray runs models in onnxruntime only")


def test_sweep_unknown_runtime_is_one_line_exit_2(cli, sweep_inputs, tmp_path):
    result = cli(
        "sweep", sweep_inputs["model"], "--calib", sweep_inputs["calib"], "--val", sweep_inputs["val"],
        "--runtime", "ort,nope", "--report-dir", tmp_path / "r",
    )  # fmt: skip
    assert_one_line_error(result, "unknown runtime 'nope'")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs the openvino extra")
def test_openvino_compiles_unpinned_f32_and_takes_extra_properties(tiny_pair):
    """Pinned OpenVINO threads slowed, and were slowed by, the ORT sessions interleaved with them
    (benchmarks/README.md): rq compiles with pinning off; `extra_config` overrides rq's properties."""
    fp32, _ = tiny_pair
    session = runtimes.OpenVinoRuntime().open(fp32)
    shape = [1 if not isinstance(d, int) else d for d in session.input_shape]
    session.run(np.zeros(shape, np.float32))
    compiled = session._request(1).get_compiled_model()
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert session.precision == "f32"
    pinned = runtimes.OpenVinoRuntime({"ENABLE_CPU_PINNING": "YES"}).open(fp32)
    pinned.run(np.zeros(shape, np.float32))
    assert pinned._request(1).get_compiled_model().get_property("ENABLE_CPU_PINNING") is True


def test_ort_session_sets_only_the_options_asked_for(tmp_path):
    model = tiny_cnn(tmp_path / "tiny.onnx")
    import onnxruntime as ort

    measured = runtimes.ort_session(
        model, threads=1, inter_op_threads=1, graph_optimization="all", sequential=True, allow_spinning=False
    ).get_session_options()
    assert measured.intra_op_num_threads == 1 and measured.inter_op_num_threads == 1
    assert measured.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert measured.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert measured.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        measured.get_session_config_entry("session.force_spinning_stop")
    assert measured.log_severity_level == 4  # ORT's coloured log lines muted by default
    default = ort.SessionOptions()
    plain = runtimes.ort_session(model.read_bytes(), log_severity=None).get_session_options()
    assert plain.log_severity_level == default.log_severity_level
    assert plain.intra_op_num_threads == default.intra_op_num_threads
    assert plain.graph_optimization_level == default.graph_optimization_level
    off = runtimes.ort_session(model, graph_optimization="off").get_session_options()
    assert off.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_quiet_silences_stdout_and_loggers_then_restores_them(capsys):
    import logging

    root = logging.getLogger()
    before = root.level
    with runtimes.quiet():
        print("ORT tooling chatter")
        assert root.level == logging.ERROR
    with runtimes.muted("onnxruntime.quantization.shape_inference"):
        assert logging.getLogger("onnxruntime.quantization.shape_inference").level > logging.CRITICAL
    assert root.level == before
    assert logging.getLogger("onnxruntime.quantization.shape_inference").level == logging.NOTSET
    assert capsys.readouterr().out == ""


class RefusesOdd(ReferenceRuntime):
    """Refuses files named odd*.onnx, as OpenVINO refuses an operator it has no conversion rule for."""

    name = "refuses-odd"
    label = "refuses-odd"

    def open(
        self, path: Path, threads: int | None = None, *, allow_spinning: bool = False
    ) -> ReferenceSession:
        if Path(path).name.startswith("odd"):
            raise RqInputError(f"refuses-odd cannot read {Path(path).name}: no conversion rule")
        return super().open(path, threads)


def test_eval_model_another_runtime_cannot_read_keeps_the_others_rows(cli, tmp_path):
    model, val = top1_60_percent(tmp_path)
    odd = tmp_path / "odd.onnx"
    odd.write_bytes(Path(model).read_bytes())
    runtimes.register(RefusesOdd())
    try:
        result = cli("eval", model, odd, "--data", val, "--runtime", "ort,refuses-odd", "--json", *SMALL)
        assert result.exit_code == 0, all_output(result)
        data = json.loads(result.stdout)
        assert [len(run["models"]) for run in data["runtimes"].values()] == [2, 1]
        # each runtime's models carry their drop against that runtime's first model, as the table shows
        ort_rows = data["runtimes"]["ort"]["models"]
        assert ort_rows[0]["vs_first"] is None and ort_rows[1]["vs_first"]["agreement_pct"] == 100.0
        assert ort_rows[1]["vs_first"] == data["models"][1]["vs_first"]
        assert data["runtimes"]["refuses-odd"]["models"][0]["top1"] == 60.0
        (note,) = data["runtimes"]["refuses-odd"]["notes"]
        assert (
            note
            == "#2 odd.onnx not evaluated in refuses-odd: refuses-odd cannot read odd.onnx: no conversion rule"
        )
        table = cli("eval", model, odd, "--data", val, "--runtime", "ort,refuses-odd", *SMALL)
        assert table.exit_code == 0 and "#2 odd.onnx not evaluated in refuses-odd" in table.stdout.replace(
            "\n", " "
        )
        # the reference (first) model is what every drop is measured against: its failure stays an error
        assert_one_line_error(
            cli("eval", odd, model, "--data", val, "--runtime", "ort,refuses-odd", *SMALL),
            "refuses-odd cannot read odd.onnx",
        )
    finally:
        runtimes.unregister("refuses-odd")


def test_evaluate_prepares_each_batch_size_before_timing_it(tmp_path):
    """OpenVINO compiles per batch size on first use: evaluate asks for that before the timed run."""
    from quantize.measure import evaluate as evaluate_module

    model, val = top1_60_percent(tmp_path)
    calls = []

    class Preparing(ReferenceRuntime):
        name = "preparing"

        def open(self, path, threads=None, *, allow_spinning=False):
            session = super().open(path, threads)
            run = session.run
            session.prepare = lambda batch: calls.append(("prepare", batch))
            session.run = lambda images: (calls.append(("run", len(images))), run(images))[1]
            return session

    runtimes.register(Preparing())
    try:
        from calibration import discover_dataset
        from quantize.measure.validate import validation_samples

        _, samples = validation_samples(val, None, None)
        assert len(samples) == 5 and discover_dataset(val, None)
        evaluate_module.evaluate([model], samples, SMALL_SPEC, batch_size=2, runtime="preparing")
    finally:
        runtimes.unregister("preparing")
    runs = [i for i, c in enumerate(calls) if c[0] == "run"]
    assert [calls[i][1] for i in runs] == [2, 2, 1]
    assert all(calls[i - 1] == ("prepare", calls[i][1]) for i in runs)


def test_ort_sessions_spin_during_a_run_and_stop_when_it_returns(tmp_path):
    """rq's measuring sessions: workers spin between a run's operators (ORT's default, what a deployed session
    does), and stop when the run returns (so an idle session does not busy-wait on the next one's cores)."""
    model = tiny_cnn(tmp_path / "tiny.onnx")
    measured = runtimes.get("ort").open(model, 1).session.get_session_options()
    assert measured.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert measured.get_session_config_entry("session.force_spinning_stop") == "1"
    spinning = runtimes.get("ort").open(model, 1, allow_spinning=True).session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        spinning.get_session_config_entry("session.force_spinning_stop")


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_open_says_why_a_path_is_not_a_model_in_one_line(runtime, tmp_path):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    rt = runtimes.get(runtime)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    cases = {tmp_path: "is a folder", tmp_path / "none.onnx": "model not found", empty: "empty file"}
    for path, reason in cases.items():
        with pytest.raises(RqInputError, match=reason) as info:
            rt.open(path)
        assert "\n" not in str(info.value)


def test_model_files_are_checked_as_onnx_except_the_formats_their_runtime_reads(tmp_path):
    junk = b"not a protobuf at all\n" * 4
    for name in (
        "model.xml",
        "model.ort",
    ):  # OpenVINO IR, onnxruntime's own format: their runtime judges them
        (tmp_path / name).write_bytes(junk)
        runtimes.check_model_files([tmp_path / name])
    (tmp_path / "model.onnx").write_bytes(junk)
    with pytest.raises(RqInputError, match=r"model.onnx is not an ONNX model: "):
        runtimes.check_model_files([tmp_path / "model.onnx"])


def test_eval_says_onnxruntime_cannot_load_a_model_before_another_runtimes_pass(cli, fake_runtimes, tmp_path):
    model, val = top1_60_percent(tmp_path)
    junk = tmp_path / "junk.ort"
    junk.write_bytes(b"not an ORT flatbuffer\n" * 4)
    result = cli("eval", model, junk, "--data", val, "--runtime", "reference,ort", *SMALL)
    assert_one_line_error(result, "junk.ort in onnxruntime")
    assert "evaluate in reference" not in all_output(result)
