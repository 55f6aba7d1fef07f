"""`rq quantize` (and `rq fetch` / `rq bench`) through typer's CliRunner: exit codes and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantize.console import setup_logging
from quantize.exits import EXIT_BAD_INPUT
from quantize.measure.cpu import advise_int8, detect_cpu
from tests.helpers.calib_images import (
    WNIDS,
    make_class_folders,
    write_rgb,
    write_truncated_jpeg,
    write_zero_byte,
)
from tests.helpers.cli import all_output, assert_one_line_error
from tests.helpers.tiny_models import non4d_input, tiny_cnn, two_inputs

SMALL = ["--resize", "36", "--crop", "32", "--samples", "8", "--batch-size", "4", "--workers", "2"]


def find_key(obj, key):
    """The first value stored under `key` anywhere in a JSON document."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = find_key(child, key)
        if found is not None:
            return found
    return None


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-calib")
    make_class_folders(root, {WNIDS[0]: 4, WNIDS[1]: 4}, size=(48, 40))
    return root


def test_quantize_summary(cli, tiny_model, calib, tmp_path):
    out = tmp_path / "tiny-int8.onnx"
    result = cli("quantize", tiny_model, "--calib", calib, "--out", out, *SMALL)
    text = all_output(result)
    assert result.exit_code == 0, text
    assert out.is_file()
    assert "layout" in text and "wnid-folders" in text
    assert "ops quantized" in text and "5/7" in text  # conv+relu ×2, pooling; flatten and the head stay FP32
    assert "classifier head" in text
    assert "reduce_range" in text
    assert "replaced" not in text
    again = cli("quantize", tiny_model, "--calib", calib, "--out", out, *SMALL)
    assert again.exit_code == 0 and "(replaced the file that was there)" in all_output(again)


def test_quantize_summary_lists_replaced_images(cli, tiny_model, tmp_path):
    from calibration import discover_dataset, select_samples

    calib = tmp_path / "calib"
    make_class_folders(calib, {WNIDS[0]: 6, WNIDS[1]: 6}, size=(48, 40))
    broken = select_samples(discover_dataset(calib), 8, 0)[0].path
    write_zero_byte(broken)
    result = cli("quantize", tiny_model, "--calib", calib, "--out", tmp_path / "int8.onnx", *SMALL)
    text = all_output(result)
    assert result.exit_code == 0, text
    assert "8 used of 8 sampled (12 available), 1 skipped, 1 replaced by other images" in text
    assert f"{broken} →" in text.replace("\n", "")


def test_quantize_a_model_whose_nodes_have_no_names(cli, tiny_model, calib, tmp_path):
    """Node names are optional in ONNX; unnamed nodes are named during preparation (one step reported) and
    quantized like named ones, not collapsed into one."""
    import onnx

    model = onnx.load(str(tiny_model))
    for node in model.graph.node:
        node.name = ""
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(model, str(unnamed))
    out = tmp_path / "unnamed-int8.onnx"
    result = cli("quantize", unnamed, "--calib", calib, "--out", out, "--json", *SMALL)
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    ops = find_key(data, "quantized_ops")
    assert (ops["quantized"], ops["candidates"]) == (5, 7)  # as the named model (test_quantize_json)
    assert any("named 8 node(s)" in step for step in find_key(data, "steps"))
    assert onnx.load(str(unnamed)).graph.node[0].name == ""  # the input file is left as it was


@pytest.mark.parametrize("method", ["percentile", "minmax", "entropy"])
def test_quantize_json(cli, tiny_model, calib, tmp_path, method):
    out = tmp_path / "tiny-int8.onnx"
    options = ["--calibration", method] + (["--bins", "256"] if method == "entropy" else [])
    result = cli("quantize", tiny_model, "--calib", calib, "--out", out, "--json", *options, *SMALL)
    assert result.exit_code == 0, all_output(result)
    # stdout holds the JSON alone: progress goes to stderr, ORT's own prints are silenced
    data = json.loads(result.stdout)
    assert find_key(data, "method") == method
    assert {"cpu", "advice", "calibration"} <= set(data)
    calibration = data["calibration"]
    assert calibration["layout"] == "wnid-folders"
    assert calibration["images_used"] == 8 and calibration["skipped"] == []
    ops = find_key(data, "quantized_ops")
    assert (ops["quantized"], ops["candidates"]) == (5, 7)
    recipe = find_key(data, "recipe")
    # RQ_CPU_FLAGS=avx2 (no VNNI): reduce_range is on for x86 (the machine's architecture still counts)
    assert recipe["format"] == "qdq"
    assert recipe["reduce_range"] is advise_int8(detect_cpu(flags_override=["avx2"])).reduce_range


def test_default_output_in_working_folder(cli, calib, tmp_path):
    model = tiny_cnn(tmp_path / "tiny-13.onnx")
    result = cli("quantize", model, "--calib", calib, *SMALL)
    assert result.exit_code == 0, all_output(result)
    assert (Path.cwd() / "tiny-int8.onnx").is_file()


def _flat_folder_with_bad_labels(tmp_path: Path) -> list[str]:
    flat = tmp_path / "flat"
    for i in range(3):
        write_rgb(flat / f"img_{i}.png", size=(48, 40), seed=i)
    labels = tmp_path / "labels.txt"
    labels.write_text("this is not\na labels file at all\n")
    return ["--calib", str(flat), "--labels", str(labels)]


def _bad_input_cases(tmp_path: Path, tiny_model: Path, calib: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after `quantize`, fragment of the one-line message)."""
    fake = tmp_path / "fake.onnx"
    fake.write_text("not an onnx model\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    write_truncated_jpeg(corrupt / WNIDS[0] / "a.JPEG")
    write_zero_byte(corrupt / WNIDS[0] / "b.JPEG")
    unknown_wnid = tmp_path / "unknown-wnid"
    make_class_folders(unknown_wnid, {"n99999999": 2}, size=(48, 40))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = str(tmp_path / "out.onnx")
    return {
        "missing model": (
            [str(tmp_path / "nope.onnx"), "--calib", str(calib), "--out", out],
            "model not found",
        ),
        "not onnx": ([str(fake), "--calib", str(calib), "--out", out], "not a readable ONNX model"),
        "two inputs": (
            [str(two_inputs(tmp_path / "two.onnx")), "--calib", str(calib), "--out", out],
            "expected one image input",
        ),
        "non-4-D input": (
            [str(non4d_input(tmp_path / "n4.onnx")), "--calib", str(calib), "--out", out],
            "4-D",
        ),
        "empty calib": ([str(tiny_model), "--calib", str(empty), "--out", out], str(empty)),
        "missing calib": ([str(tiny_model), "--calib", str(tmp_path / "nowhere"), "--out", out], "not found"),
        "only corrupt images": ([str(tiny_model), "--calib", str(corrupt), "--out", out], "could be decoded"),
        "labels do not parse": (
            [str(tiny_model), *_flat_folder_with_bad_labels(tmp_path), "--out", out],
            "labels",
        ),
        "unknown wnid folder": ([str(tiny_model), "--calib", str(unknown_wnid), "--out", out], "n99999999"),
        "output dir not writable": (
            [str(tiny_model), "--calib", str(calib), "--out", str(blocker / "out.onnx")],
            "output folder",
        ),
        "bad --mean": ([str(tiny_model), "--calib", str(calib), "--out", out, "--mean", "0.5,0.5"], "--mean"),
        "bad --mean text": (
            [str(tiny_model), "--calib", str(calib), "--out", out, "--mean", "a,b,c"],
            "--mean",
        ),
        "bad --format": (
            [str(tiny_model), "--calib", str(calib), "--out", out, "--format", "int4"],
            "format",
        ),
        "crop does not fit": (
            [str(tiny_model), "--calib", str(calib), "--out", out, "--resize", "64", "--crop", "48"],
            "adjust --crop",
        ),
    }


CASES = [
    "missing model",
    "not onnx",
    "two inputs",
    "non-4-D input",
    "empty calib",
    "missing calib",
    "only corrupt images",
    "labels do not parse",
    "unknown wnid folder",
    "output dir not writable",
    "bad --mean",
    "bad --mean text",
    "bad --format",
    "crop does not fit",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case, cli, tiny_model, calib, tmp_path):
    args, fragment = _bad_input_cases(tmp_path, tiny_model, calib)[case]
    if "--resize" not in args:
        args = [*args, "--resize", "36", "--crop", "32"]
    # A narrow terminal: long messages must still not be wrapped onto a second line.
    result = cli("quantize", *args, columns=40)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.onnx").exists()


def test_recipe_file(cli, tiny_model, calib, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"calibration": "minmax", "samples": "eight"}))
    result = cli(
        "quantize", tiny_model, "--calib", calib, "--out", tmp_path / "o.onnx", "--recipe", recipe, *SMALL
    )
    assert_one_line_error(result, "samples")
    recipe.write_text(json.dumps({"calibration": "minmax", "format": "qoperator"}))
    result = cli(
        "quantize", tiny_model, "--calib", calib, "--out", tmp_path / "o.onnx", "--recipe", recipe, *SMALL
    )
    assert result.exit_code == 0, all_output(result)
    assert "qoperator" in all_output(result) and "minmax" in all_output(result)


def test_fetch_unknown_model(cli):
    result = cli("fetch", "no-such-model")
    assert_one_line_error(result, "unknown model 'no-such-model'")


def test_bench_two_tiny_models(cli, tmp_path):
    a = tiny_cnn(tmp_path / "a.onnx", seed=0)
    b = tiny_cnn(tmp_path / "b.onnx", seed=1)
    result = cli("bench", a, b, "--runs", "2", "--warmup", "1", "--batch", "1", "--threads", "1")
    text = all_output(result)
    assert result.exit_code == 0, text
    assert "a.onnx" in text and "b.onnx" in text


def test_bench_a_model_with_free_height_and_width(cli, tiny_model, tmp_path):
    """A model whose input leaves H and W free (quantize and eval handle it): bench asks for --input-shape in
    one line, then times that size; a size contradicting a fixed dimension is refused."""
    import onnx

    model = onnx.load(str(tiny_model))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].ClearField("dim_value")
    dims[2].dim_param = "H"
    dims[3].ClearField("dim_value")
    dims[3].dim_param = "W"
    free = tmp_path / "free-hw.onnx"
    onnx.save(model, str(free))
    assert_one_line_error(cli("bench", free, "--runs", "2"), "give the size to benchmark with --input-shape")
    result = cli("bench", free, "--runs", "2", "--batch", "1", "--input-shape", "3,40,40", "--json")
    assert result.exit_code == 0, all_output(result)
    assert json.loads(result.stdout)["input_shape"] == ["N", 3, 40, 40]
    assert_one_line_error(
        cli("bench", free, "--runs", "2", "--input-shape", "4,40,40"), "contradicts its fixed dimensions"
    )


def test_quantize_bench_of_a_model_with_free_height_and_width(cli, tiny_model, calib, tmp_path):
    """rq quantize --bench times the size its preprocessing gives (there is no --input-shape to ask for)."""
    import onnx

    model = onnx.load(str(tiny_model))
    for axis, name in ((2, "H"), (3, "W")):
        dim = model.graph.input[0].type.tensor_type.shape.dim[axis]
        dim.ClearField("dim_value")
        dim.dim_param = name
    free = tmp_path / "free-hw.onnx"
    onnx.save(model, str(free))
    out = tmp_path / "free-int8.onnx"
    result = cli(
        "quantize",
        free,
        "--calib",
        calib,
        "--out",
        out,
        "--bench",
        "--bench-batch",
        "1",
        "--bench-runs",
        "2",
        *SMALL,
    )
    assert result.exit_code == 0, all_output(result)
    assert out.is_file()


def test_bench_missing_model_is_exit_2(cli, tmp_path):
    a = tiny_cnn(tmp_path / "a.onnx")
    result = cli("bench", a, tmp_path / "missing.onnx", "--runs", "2", "--batch", "1")
    assert_one_line_error(result, "missing.onnx")


def test_working_folder_is_left_clean_on_error(cli, tiny_model, tmp_path):
    """A failed run writes no model and no temporary file into the output folder."""
    shutil.copy(tiny_model, tmp_path / "m.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("quantize", tmp_path / "m.onnx", "--calib", empty, "--out", out_dir / "m-int8.onnx")
    assert result.exit_code == EXIT_BAD_INPUT
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "0"], "--samples must be ≥ 1, not 0"),
        (["--bins=100"], "--bins must be ≥ 128, not 100"),
        (["--holdout-images", "-1"], "--holdout-images must be ≥ 0, not -1"),
        (["--max-trials", "0"], "--max-trials must be ≥ 1, not 0"),
        (["--format", "int4"], "--format must be one of qdq, qoperator, not 'int4'"),
        (
            ["--calibration", "kl"],
            "--calibration must be one of minmax, entropy, percentile, mean-minmax, mse",
        ),
        (["--backend", "tensorrt"], "--backend must be one of ort, inc, not 'tensorrt'"),
        (["--activation-type", "int4"], "--activation-type must be one of uint8, int8"),
        (["--gate-on", "upper"], "--gate-on must be one of point, ci, not 'upper'"),
        (["--samples", "many"], "--samples: "),
    ],
)
def test_typer_checks_fail_in_one_line_before_any_work(cli, tmp_path, flags, message):
    """`min=` and the closed sets are typer's checks; they read (and exit) like rq's own: one line, code 2."""
    result = cli("quantize", tmp_path / "missing.onnx", "--calib", tmp_path / "nowhere", *flags, columns=40)
    line = assert_one_line_error(result, message)
    assert line.startswith("rq: error: ") and "Usage:" not in all_output(result)


def test_eval_batch_without_val_sizes_the_held_back_check(cli, tiny_model, calib, tmp_path):
    """Not refused without --val: the held-back fidelity check runs in batches of --eval-batch."""
    out = tmp_path / "eb-int8.onnx"
    result = cli("quantize", tiny_model, "--calib", calib, "--out", out, "--eval-batch", "4", *SMALL)
    assert result.exit_code == 0, all_output(result)


def test_a_ci_gate_at_zero_could_never_pass_and_is_refused(cli, tiny_model, calib, tmp_path):
    out = tmp_path / "never-int8.onnx"
    flags = ["--val", calib, "--max-drop", "0", "--gate-on", "ci"]
    assert_one_line_error(
        cli("quantize", tiny_model, "--calib", calib, "--out", out, *flags, *SMALL),
        "needs --max-drop above 0",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gate-on", "ci"], "--gate-on applies only with --max-drop"),
        (
            ["--max-trials", "3", "--tune-fraction", "0.3"],
            "--max-trials and --tune-fraction apply only with --tune",
        ),
        (["--bench-runs", "5"], "--bench-runs applies only with --bench"),
        (["--bench-batch", "4"], "--bench-batch applies only with --bench"),
        (["--val-limit", "5"], "--val-limit applies only with --val"),
        (["--val-labels", "labels.txt"], "--val-labels applies only with --val"),
        (
            ["--val", "VAL", "--holdout-images", "50"],
            "--holdout-images applies only without --val, or with --tune",
        ),
        (
            ["--holdout-images", "0", "--eval-batch", "4"],
            "--eval-batch applies only when images are evaluated",
        ),
        (
            ["--calibration", "entropy", "--percentile", "99.9"],
            "--percentile applies only with --calibration percentile",
        ),
    ],
)
def test_options_the_run_would_ignore_are_refused(cli, tiny_model, calib, tmp_path, flags, message):
    """An option that would change nothing is one line and exit 2 before any work, like --bins with minmax: a
    user who asked for --gate-on ci without a limit must not believe the run was gated."""
    out = tmp_path / "idle-int8.onnx"
    flags = [calib if flag == "VAL" else flag for flag in flags]
    assert_one_line_error(
        cli("quantize", tiny_model, "--calib", calib, "--out", out, *flags, *SMALL), message
    )
    assert not out.exists()


def test_missing_calib_is_one_line(cli):
    assert_one_line_error(cli("quantize"), "Missing option '--calib'")


def test_quantize_help_groups_the_options_in_panels(cli):
    result = cli("quantize", "--help")
    assert result.exit_code == 0
    text = result.output
    for panel in ("Calibration", "Recipe", "Preprocessing", "Validation & gate", "Tuning", "Speed", "Output"):
        assert f"─ {panel} ─" in text, panel
    assert "[x>=1]" in text and "qdq|qoperator" in text


def test_warnings_always_show_and_verbose_adds_the_diagnostics(cli, tiny_model, calib, tmp_path):
    # All 8 --calib images calibrate (--samples 100): none is left to measure fidelity on, which is a warning.
    quiet = cli("quantize", tiny_model, "--calib", calib, "--out", tmp_path / "a.onnx", *SMALL)
    text = all_output(quiet)
    assert quiet.exit_code == 0, text
    assert "warning: every --calib image was used for calibration" in text
    assert "rq quantize.graph.prepare:" not in text
    try:
        loud = cli("-v", "quantize", tiny_model, "--calib", calib, "--out", tmp_path / "b.onnx", *SMALL)
        text = all_output(loud)
        assert loud.exit_code == 0, text
        assert "rq quantize.graph.prepare: prepare" in text and "rq quantize.calibrate:" in text
    finally:
        setup_logging(False)  # the loggers are process-wide: leave them as other tests expect


def test_placement_for_openvino_quantizes_the_head_and_names_itself(cli, tiny_model, calib, tmp_path):
    out = tmp_path / "tiny-int8.onnx"
    result = cli(
        "quantize",
        tiny_model,
        "--calib",
        calib,
        "--out",
        out,
        "--json",
        *SMALL,
        "--placement-runtime",
        "openvino",
    )
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert find_key(data, "recipe")["placement_runtime"] == "openvino"
    ops = find_key(data, "quantized_ops")
    assert (ops["quantized"], ops["candidates"]) == (7, 7)  # flatten and the head too (ORT's placement: 5/7)
    assert data["run_id"].endswith("-for-openvino")
    bad = cli("quantize", tiny_model, "--calib", calib, "--out", out, "--placement-runtime", "tensorrt")
    assert_one_line_error(bad, "--placement-runtime")


def test_calibration_from_subfolders_without_class_ids_is_reported(cli, tiny_model, tmp_path):
    """cats/ and dogs/ calibrate (labels are not needed); the report says how the folder was read, broken link
    included, in report.md too (not only in the console and report.json)."""
    for folder in ("cats", "dogs"):
        for i in range(4):
            write_rgb(
                tmp_path / "calib" / folder / f"{folder}{i}.jpg",
                size=(48, 40),
                seed=i + (10 if folder == "dogs" else 0),
            )
    (tmp_path / "calib" / "dogs" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "pets-int8.onnx"
    result = cli(
        "quantize",
        tiny_model,
        "--calib",
        tmp_path / "calib",
        "--out",
        out,
        "--report-dir",
        tmp_path / "r",
        *SMALL,
    )
    assert result.exit_code == 0, all_output(result)
    (md,) = (tmp_path / "r").glob("*/report.md")
    text = md.read_text()
    assert "Folder notes:" in text and "not ImageNet class ids" in text
    assert "skipped 1 broken link(s) (e.g. dogs/gone.jpg)" in text


def test_size_line_units_and_direction():
    from quantize.console import size_text

    assert size_text(97_800_000, 25_600_000) == "97.8 MB FP32 → 25.6 MB INT8 (3.82× smaller)"
    # a tiny model: kB, and its Q/DQ nodes can outweigh what its weights saved
    assert size_text(18_500, 19_300) == "18.5 kB FP32 → 19.3 kB INT8 (1.04× larger)"


def test_an_error_is_the_only_line_on_a_piped_stderr(tiny_model, calib, tmp_path):
    """Piped (logs, CI), stderr holds the error line alone: no empty line left by an undrawn progress bar."""
    import subprocess
    import sys

    folder = tmp_path / "out.onnx"
    folder.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantize.cli",
            "quantize",
            str(tiny_model),
            "--calib",
            str(calib),
            "-o",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.splitlines() == [f"rq: error: output path is a folder: {folder}"], done.stderr
