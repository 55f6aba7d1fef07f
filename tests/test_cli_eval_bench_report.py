"""`rq eval`, `rq bench`, `rq report`, and the report.json that `rq quantize --val --bench` writes.

Speed is never asserted: only the structure of the benchmark (interleaving, ratios to the first model, CPU).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest

from quantize.exits import EXIT_BAD_INPUT
from quantize.fetch import sha256_file
from quantize.report import validate_report
from tests.helpers.calib_images import make_class_folders, write_rgb
from tests.helpers.cli import SMALL, all_output, assert_one_line_error, invoke
from tests.helpers.onehot import J, K, onehot_model, onehot_row, wnid
from tests.helpers.sensitive import sensitive_model
from tests.helpers.tiny_models import tiny_cnn

N_K, N_J = 6, 2


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-val")
    make_class_folders(root, {wnid(K): N_K, wnid(J): N_J}, size=(40, 36))
    return root


@pytest.fixture(scope="module")
def onehot_k(tmp_path_factory) -> Path:
    return onehot_model(tmp_path_factory.mktemp("cli-models") / "k.onnx", onehot_row(1000, [K, J]))


# ---------------------------------------------------------------------------------------------------------
# rq eval
# ---------------------------------------------------------------------------------------------------------


def test_eval_prints_top1(cli, onehot_k, val_dir):
    result = cli("eval", onehot_k, "--data", val_dir, "--batch", "3", "--workers", "2", *SMALL)
    text = all_output(result)
    assert result.exit_code == 0, text
    assert "top-1 %" in text and "top-5 %" in text
    row = next(line for line in text.splitlines() if "k.onnx" in line)
    assert "75.00" in row and "100.00" in row  # top-1 = 6/8; top-5 holds both classes
    assert "8 images" in text and "wnid-folders" in text


def test_eval_json_exact_top1(cli, onehot_k, val_dir, tmp_path):
    other = onehot_model(tmp_path / "j.onnx", onehot_row(1000, [J]))
    result = cli("eval", onehot_k, other, "--data", val_dir, "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["images"] == 8 and data["layout"] == "wnid-folders"
    assert data["folder"] == str(val_dir)
    assert data["preprocess"]["crop"] == 32 and data["preprocess"]["resize"] == 36
    k, j = data["models"]
    assert k["path"] == str(onehot_k) and k["top1"] == 75.0 and k["top5"] == 100.0
    assert j["top1"] == 25.0 and j["top5"] == 25.0
    assert k["images"] == j["images"] == 8 and k["label_offset"] == 0
    assert data["skipped"] == [] and data["notes"] == []


def test_eval_limit(cli, onehot_k, val_dir):
    result = cli("eval", onehot_k, "--data", val_dir, "--limit", "4", "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    assert json.loads(result.stdout)["images"] == 4


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_eval_limit_below_one_is_exit_2(cli, onehot_k, val_dir, limit):
    """`--limit 0` is a mistake, not "no limit": it must not evaluate the whole folder (and a negative
    limit is about the validation images, not "calibration images")."""
    line = assert_one_line_error(cli("eval", onehot_k, "--data", val_dir, "--limit", limit, *SMALL), "limit")
    assert "calibration" not in line


def test_eval_bad_inputs_are_one_line_exit_2(cli, onehot_k, val_dir, tmp_path):
    assert_one_line_error(cli("eval", onehot_k, "--data", val_dir, "--batch", "0", *SMALL), "--batch must be")
    flat = tmp_path / "flat"
    for i in range(5):
        write_rgb(flat / f"ILSVRC2012_val_{i + 1:08d}.JPEG", size=(40, 36), seed=i)
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {K}\n" for i in range(3)))
    assert_one_line_error(
        cli("eval", onehot_k, "--data", flat, "--labels", labels, *SMALL), "labels are missing for 2 of 5"
    )
    assert_one_line_error(cli("eval", onehot_k, "--data", flat, *SMALL), "has no labels")
    ten = tiny_cnn(tmp_path / "ten.onnx")
    assert_one_line_error(cli("eval", ten, "--data", val_dir, *SMALL), "10 output classes")
    assert_one_line_error(cli("eval", tmp_path / "nope.onnx", "--data", val_dir, *SMALL), "model not found")


# ---------------------------------------------------------------------------------------------------------
# rq bench
# ---------------------------------------------------------------------------------------------------------


def test_bench_json_structure_and_interleaving(cli, tmp_path):
    a = tiny_cnn(tmp_path / "a.onnx", seed=0)
    b = tiny_cnn(tmp_path / "b.onnx", seed=1)
    result = cli("bench", a, b, "--runs", "2", "--batch", "1,2", "--warmup", "1", "--threads", "1", "--json")
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["models"] == [str(a), str(b)]
    assert data["batch_sizes"] == [1, 2] and data["runs"] == 2 and data["threads"] == 1
    assert data["input_shape"] == ["N", 3, 32, 32]
    # interleaved: A B A B at batch 1, then A B A B at batch 2
    assert data["order"] == [[0, 1, "ort"], [1, 1, "ort"]] * 2 + [[0, 2, "ort"], [1, 2, "ort"]] * 2
    rows = {(r["model_index"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(0, 1), (1, 1), (0, 2), (1, 2)}
    for (index, batch), row in rows.items():
        assert len(row["samples_ms"]) == 2
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] - 1e-9
        assert row["images_per_s"] == pytest.approx(batch / (row["median_ms"] / 1000))
        if index == 0:
            assert row["ratio_to_first"] == 1.0
        else:
            # the ratio is the first model's median over this one's (no claim about which is faster)
            assert row["ratio_to_first"] == pytest.approx(rows[(0, batch)]["median_ms"] / row["median_ms"])
    cpu = data["cpu"]
    assert cpu["flags"] == ["avx2"] and cpu["flags_source"] == "env"  # RQ_CPU_FLAGS=avx2
    assert {"avx2", "avx512_vnni", "vnni"} <= set(cpu["isa"])
    assert cpu["isa"]["avx2"] is True and cpu["isa"]["avx512_vnni"] is False
    assert data["onnxruntime_version"] == onnxruntime.__version__
    assert data["provider"] == "CPUExecutionProvider"


def test_bench_table_gives_the_speedup_interval(cli, tmp_path):
    a = tiny_cnn(tmp_path / "a.onnx", seed=0)
    b = tiny_cnn(tmp_path / "b.onnx", seed=1)
    result = cli("bench", a, b, "--runs", "20", "--batch", "1", "--warmup", "1", "--threads", "1")
    assert result.exit_code == 0, all_output(result)
    assert "95% CI" in result.stdout and "bootstrap over this run's rounds" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "b.onnx" in line)
    assert re.search(r"\d+\.\d\d–\d+\.\d\d", row), row


def test_bench_different_input_shapes_is_exit_2(cli, tmp_path):
    a = onehot_model(tmp_path / "a32.onnx", onehot_row(1000, [K]), hw=32)
    b = onehot_model(tmp_path / "b64.onnx", onehot_row(1000, [K]), hw=64)
    result = cli("bench", a, b, "--runs", "1", "--batch", "1", "--warmup", "0")
    line = assert_one_line_error(result, "input shapes differ")
    assert "b64.onnx" in line


# ---------------------------------------------------------------------------------------------------------
# rq quantize --val --bench: report.json; rq report
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantize_run(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cli-report")
    model = sensitive_model(base / "tiny1000.onnx", n_sensitive=0)
    calib = base / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    val = base / "val"
    make_class_folders(val, {wnid(0): 3, wnid(1): 3}, size=(48, 40), seed=10_000)  # not copies of calib's
    out = base / "tiny1000-int8.onnx"
    reports = base / "reports"
    result = invoke(
        "quantize",
        model,
        "--calib",
        calib,
        "--val",
        val,
        "--bench",
        "--bench-runs",
        "20",  # enough rounds for the speedup's interval
        "--bench-batch",
        "1",
        "--samples",
        "8",
        "--workers",
        "2",
        "--out",
        out,
        "--report-dir",
        reports,
        *SMALL,
    )
    assert result.exit_code == 0, all_output(result)
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    return {"model": model, "calib": calib, "val": val, "out": out, "run": run, "stdout": result.stdout}


def test_quantize_report_json(quantize_run):
    run = quantize_run["run"]
    data = json.loads((run / "report.json").read_text())
    validate_report(data)
    assert data["schema"] == "rq.report/1"
    # input and output models, by content
    assert data["model"]["sha256"] == sha256_file(quantize_run["model"])
    assert data["model"]["sha256"] == hashlib.sha256(quantize_run["model"].read_bytes()).hexdigest()
    fp32, int8 = data["variants"]
    assert fp32["sha256"] == data["model"]["sha256"]
    assert int8["path"] == str(quantize_run["out"])
    assert int8["sha256"] == hashlib.sha256(quantize_run["out"].read_bytes()).hexdigest()
    # the calibration file list (all 8 images were used), relative to its folder, sorted, one per line
    calib = quantize_run["calib"]
    names = sorted(p.relative_to(calib).as_posix() for p in calib.rglob("*.JPEG"))
    assert data["calibration"]["images_used"] == 8
    assert data["calibration"]["file_list_sha256"] == hashlib.sha256("\n".join(names).encode()).hexdigest()
    # package versions
    assert data["packages"]["onnxruntime"] == onnxruntime.__version__
    assert data["packages"]["numpy"] == np.__version__
    assert {"rq-quant", "python", "onnx"} <= set(data["packages"])
    # CPU flags (RQ_CPU_FLAGS=avx2 in the environment)
    flags = data["cpu"]["isa"]
    assert flags["avx2"] is True and flags["avx512_vnni"] is False and flags["vnni"] is False
    assert data["advice"]["reduce_range"] in (True, False) and data["advice"]["reason"]
    # the recipe as used
    recipe = int8["recipe"]
    assert recipe["format"] == "qdq" and recipe["per_channel"] is True
    assert recipe["calibration"] == "percentile" and recipe["samples"] == 8
    assert recipe["reduce_range"] is data["advice"]["reduce_range"]
    assert fp32["recipe"] is None
    # validation and bench figures for both variants
    assert data["validation"]["images"] == 6 and data["validation"]["overlap_with_calibration"] == 0
    assert int8["drop"]["n"] == 6
    assert set(fp32["bench"]) == set(int8["bench"]) == {"1"}
    assert fp32["bench"]["1"]["ratio_to_fp32"] == 1.0
    low, high = int8["bench"]["1"]["ratio_to_fp32_interval"]
    assert 0 < low <= high
    assert "ratio_to_fp32_interval" not in fp32["bench"]["1"]
    assert data["bench"]["order"] == [[0, 1, "ort"], [1, 1, "ort"]] * 20
    assert data["gate"] is None
    assert set(data["stages"]) >= {"prepare", "calibrate", "quantize", "validate", "bench"}


def test_eval_takes_the_preprocessing_an_rq_model_carries(quantize_run):
    """The INT8 file rq wrote says how its images were preprocessed (resize 36, crop 32 here): `rq eval` with
    no preprocessing option uses that, and reaches the top-1 the quantize run's validation measured."""
    result = invoke("eval", quantize_run["out"], "--data", quantize_run["val"], "--json")
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["preprocess"]["crop"] == 32 and data["preprocess"]["resize"] == 36
    assert "rq.preprocess" in data["preprocess_source"]
    report = json.loads((quantize_run["run"] / "report.json").read_text())
    assert data["models"][0]["top1"] == report["variants"][1]["accuracy"]["top1"]
    # an option overrides one field; a crop the model cannot take is one line naming the model
    bad = invoke("eval", quantize_run["out"], "--data", quantize_run["val"], "--crop", "30")
    assert_one_line_error(bad, f"{quantize_run['out'].name}: model input")
    # the FP32 file carries nothing: without options it gets the built-in default (224), refused the same way
    fp32 = invoke("eval", quantize_run["model"], "--data", quantize_run["val"])
    assert_one_line_error(fp32, "expects [3, 32, 32] per image, preprocessing gives [3, 224, 224]")


def test_eval_of_models_carrying_different_preprocessing_must_be_told_which(quantize_run, tmp_path):
    """Two rq models quantized with other preprocessing (resize 36 and 40): no silent choice, and no mix of one
    model's fields with the built-in default's; the option for the field they differ in says which."""
    import onnx

    other = onnx.load(str(quantize_run["out"]))
    for prop in other.metadata_props:
        if prop.key == "rq.preprocess":
            spec = json.loads(prop.value)
            spec["resize"] = 40
            prop.value = json.dumps(spec)
    other_path = tmp_path / "other-int8.onnx"
    onnx.save(other, str(other_path))
    models = [quantize_run["out"], other_path]
    assert_one_line_error(
        invoke("eval", *models, "--data", quantize_run["val"]), "were quantized with different preprocessing"
    )
    assert_one_line_error(
        invoke("eval", *models, "--data", quantize_run["val"], "--crop", "32"),
        "(resize); say which with --resize",
    )
    # the field they differ in, settled by its option; the others as both models stored them
    result = invoke("eval", *models, "--data", quantize_run["val"], "--resize", "36", "--json")
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert data["preprocess_source"].startswith("the options given, the rest as stored")
    assert (data["preprocess"]["resize"], data["preprocess"]["crop"]) == (36, 32)


def test_quantize_report_html_has_the_plot(quantize_run):
    page = (quantize_run["run"] / "report.html").read_text()
    assert "data:image/png;base64," in page
    md = (quantize_run["run"] / "report.md").read_text()
    assert "Accuracy gate: not applied" in md
    # the preprocessing every image went through, in the JSON and in words (not only inside the command line)
    data = json.loads((quantize_run["run"] / "report.json").read_text())
    assert (data["preprocess"]["resize"], data["preprocess"]["crop"]) == (36, 32)
    assert "Preprocessing: resize 36 (bilinear) → center crop 32" in md
    assert "[low, high]: 95% interval of the speedup against FP32 in the same runtime, bootstrap" in md


def test_quantize_report_results_table_gives_the_speedup_interval(quantize_run):
    """The headline table, not only the Benchmark section, shows each INT8 speedup with its interval."""
    data = json.loads((quantize_run["run"] / "report.json").read_text())
    low, high = data["variants"][1]["bench"]["1"]["ratio_to_fp32_interval"]
    md = (quantize_run["run"] / "report.md").read_text()
    results = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    int8_row = next(line for line in results.splitlines() if line.startswith("| ") and "INT8" in line)
    assert f"× [{low:.2f}, {high:.2f}]" in int8_row
    # FP32's agreement with itself is what puts it on the agreement front (◆): shown, not "—"
    fp32_row = next(line for line in results.splitlines() if line.startswith("| ") and "FP32" in line)
    assert "100 (reference)" in fp32_row
    assert "its 95% interval over this run's interleaved rounds" in results


def test_report_rerenders_from_json(cli, quantize_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(quantize_run["run"], run)
    md_before = (run / "report.md").read_text()
    html_before = (run / "report.html").read_text()
    (run / "report.md").unlink()
    (run / "report.html").unlink()
    result = cli("report", run)
    assert result.exit_code == 0, all_output(result)
    assert result.stdout.split() == [
        str(run / "report.json"),
        str(run / "report.md"),
        str(run / "report.html"),
    ]
    assert (run / "report.md").read_text() == md_before
    assert (run / "report.html").read_text() == html_before


def test_report_without_report_json_is_exit_2(cli, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    assert_one_line_error(cli("report", empty), "no report.json")
    assert list(empty.iterdir()) == []
    assert_one_line_error(cli("report", tmp_path / "missing"), "no report.json")


def test_report_with_invalid_json_is_exit_2(cli, quantize_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text("{ not json")
    assert_one_line_error(cli("report", bad), "not valid JSON")
    data = json.loads((quantize_run["run"] / "report.json").read_text())
    del data["variants"]
    (bad / "report.json").write_text(json.dumps(data))
    result = cli("report", bad)
    assert result.exit_code == EXIT_BAD_INPUT
    assert_one_line_error(result, "variants")
    assert not (bad / "report.md").exists()


def test_two_runs_in_the_same_second_keep_both_reports(cli, calib_dir, tmp_path, monkeypatch):
    """The report folder is named after the run id; two runs of the same model started within the same second
    (scripts, CI matrices) must not overwrite each other's report. The clock is frozen to make it certain."""
    import datetime

    import quantize.report.data

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(quantize.report.data, "_dt", SimpleNamespace(datetime=Frozen, UTC=datetime.UTC))
    model = tiny_cnn(tmp_path / "tiny.onnx")
    reports = tmp_path / "reports"
    for name in ("a", "b"):
        result = cli(
            "quantize",
            model,
            "--calib",
            calib_dir,
            "--out",
            tmp_path / f"{name}.onnx",
            "--samples",
            "4",
            "--report-dir",
            reports,
            *SMALL,
        )
        assert result.exit_code == 0, all_output(result)
    runs = sorted(p for p in reports.iterdir() if p.is_dir())
    assert len(runs) == 2, [p.name for p in runs]
    outputs = {json.loads((p / "report.json").read_text())["variants"][1]["path"] for p in runs}
    assert outputs == {str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")}


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_a_folder_given_as_the_model_is_one_line(cli, tmp_path, command):
    from tests.helpers.onehot import top1_60_percent

    _, val = top1_60_percent(tmp_path)
    extra = ["--data", val] if command == "eval" else []
    assert_one_line_error(cli(command, tmp_path, *extra), "is a folder, not an ONNX model file")
