"""Fault injection: signals at every stage, full file systems, broken models, non-finite options.

Every case asserts the exit code of the contract (quantize/exits.py, README "Exit codes"), the one-line
message, and that the current directory, $TMPDIR and the output folder hold nothing beyond what the contract
allows. Signals are sent by the process to itself from inside the stage (tests/fault_driver.py), so the timing
is deterministic. Full file systems are a real tiny tmpfs where the test may mount one, else a write patched
to fail with ENOSPC. Tiny generated models only: the suite runs in well under two minutes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import quantize.files
import quantize.graph.prepare
import quantize.pipeline
from calibration.errors import RqInputError
from quantize.cli import app
from quantize.exits import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_QUANTIZATION_FAILED,
    EXIT_REPORT_FAILED,
    QuantizerError,
    classify,
    handle_signals,
    uninterruptible,
)
from quantize.sweep import runtime_tag
from tests.helpers.calib_images import WNIDS, make_class_folders
from tests.helpers.tiny_models import (
    conv_channel_mismatch,
    gemm_feature_mismatch,
    tiny_cnn,
    tiny_imagenet_cnn,
)

DRIVER = Path(__file__).with_name("fault_driver.py")
SMALL = ["--resize", "36", "--crop", "32", "--samples", "8", "--batch-size", "4", "--workers", "2"]
ENV = {"RQ_CPU_FLAGS": "avx2", "NO_COLOR": "1", "COLUMNS": "200"}


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-inputs")
    make_class_folders(root / "calib", {WNIDS[0]: 4, WNIDS[1]: 4}, size=(48, 40))
    make_class_folders(root / "val", {WNIDS[0]: 3, WNIDS[1]: 3}, size=(48, 40))
    return {
        "model": tiny_imagenet_cnn(root / "tiny.onnx"),
        "conv": conv_channel_mismatch(root / "conv-4-channels.onnx"),
        "gemm": gemm_feature_mismatch(root / "gemm-24-features.onnx"),
        "calib": root / "calib",
        "val": root / "val",
    }


@pytest.fixture()
def place(tmp_path, monkeypatch) -> dict[str, Path]:
    """An empty current directory, $TMPDIR and output folder, each watched by the test."""
    folders = {name: tmp_path / name for name in ("cwd", "tmp", "out")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.chdir(folders["cwd"])
    monkeypatch.setenv("TMPDIR", str(folders["tmp"]))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR in this process too
    return folders


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def rq_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rq:")]


def run_rq(args: list, place: dict[str, Path], stage: str | None = None, signals: str = "TERM"):
    """`rq ARGS` in a subprocess (its own signal handlers, its own stderr), optionally signalled at `stage`."""
    env = {**os.environ, **ENV, "TMPDIR": str(place["tmp"])}
    env.pop("RQ_DEBUG", None)
    env.pop("ORT_DISABLE_TELEMETRY", None)  # rq itself must keep ORT's telemetry file out of $TMPDIR
    head = (
        [sys.executable, str(DRIVER), stage, signals, "--"]
        if stage
        else [sys.executable, "-m", "quantize.cli"]
    )
    proc = subprocess.run(
        [*head, *map(str, args)],
        cwd=place["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        # A suite started under `nohup` hands SIGHUP down ignored, and one started as a background job (`cmd &`
        # in a script) SIGINT; rq rightly keeps an ignored signal ignored. The child gets the default
        # dispositions back, as in a terminal, so the signal cases test rq's handlers wherever the suite runs.
        preexec_fn=_default_signals,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _default_signals() -> None:
    for name in ("SIGHUP", "SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={**ENV, "RQ_DEBUG": None})
    text = result.output or ""
    with contextlib.suppress(ValueError):
        if result.stderr and result.stderr not in text:
            text += result.stderr
    return result.exit_code, text


def assert_one_line(text: str, label: str, *fragments: str) -> str:
    assert "Traceback" not in text, text
    assert "\x1b[" not in text, text  # no ANSI colour codes (ORT's log lines carry them)
    assert "[E:onnxruntime" not in text and "[W:onnxruntime" not in text, text
    lines = rq_lines(text)
    assert len(lines) == 1 and lines[0].startswith(f"rq: {label}:"), text
    for fragment in fragments:
        assert fragment in lines[0], text
    return lines[0]


def assert_clean(place: dict[str, Path], out_allowed: tuple[str, ...] = ()) -> None:
    """Nothing new in the CWD or $TMPDIR; in the output folder only what the contract allows."""
    assert listing(place["cwd"]) == []
    assert listing(place["tmp"]) == []
    assert listing(place["out"]) == sorted(out_allowed)


def quantize_args(inputs, place, model: str = "model", *extra) -> list:
    return [
        "quantize",
        inputs[model],
        "--calib",
        inputs["calib"],
        *SMALL,
        "--out",
        place["out"] / "o.onnx",
        "--report-dir",
        place["out"] / "reports",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------------------
# Signals at each stage (subprocess, real kill(2), real handlers)
# ---------------------------------------------------------------------------------------------------------

# stage -> what the output folder may hold afterwards ("model" = the published INT8 file)
STAGES = {
    "prepare": (),
    "calibrate": (),
    "quantize": (),
    "publish": (),
    "cleanup": ("model",),  # the model was published before the work folder's removal began
    "validate": ("model",),
    "bench": ("model",),
    "report": ("model", "report.json"),
}


def _allowed(place, kinds) -> tuple[str, ...]:
    allowed = []
    for kind in kinds:
        if kind == "model":
            allowed.append("o.onnx")
        else:
            reports = place["out"] / "reports"
            runs = [p.name for p in reports.iterdir()] if reports.is_dir() else []
            assert len(runs) == 1, runs
            allowed += ["reports", f"reports/{runs[0]}", f"reports/{runs[0]}/{kind}"]
    return tuple(allowed)


@pytest.mark.parametrize(
    ("stage", "signals", "code", "name"),
    [(stage, "TERM", 143, "SIGTERM") for stage in STAGES]
    + [
        ("calibrate", "HUP", 129, "SIGHUP"),
        ("prepare", "INT", EXIT_INTERRUPTED, None),
        # Ctrl-C during the final cleanup once left half a work folder: the removal now always completes
        ("cleanup", "INT", EXIT_INTERRUPTED, None),
        # a second signal while rq cleans up is ignored; the first decides the exit code
        ("cleanup", "TERM,INT", 143, "SIGTERM"),
    ],
)
def test_signal_at_each_stage_removes_work_folder_and_partial_files(
    inputs, place, stage, signals, code, name
):
    extra = ["--val", inputs["val"], "--bench", "--bench-batch", "1", "--bench-runs", "2"]
    rc, text = run_rq(quantize_args(inputs, place, "model", *extra), place, stage, signals)
    assert rc == code, text
    if name:
        assert_one_line(text, "terminated", f"{name} received", "the work folder was removed")
    else:
        assert_one_line(text, "interrupted", "no half-written file")
    assert_clean(place, _allowed(place, STAGES[stage]))


def test_sigterm_during_a_sweep(inputs, place):
    args = [
        "sweep",
        inputs["model"],
        "--calib",
        inputs["calib"],
        "--val",
        inputs["val"],
        "--samples",
        "8",
        "--resize",
        "36",
        "--crop",
        "32",
        "--workers",
        "2",
        "--bench-batch",
        "none",
        "--report-dir",
        place["out"] / "reports",
    ]
    rc, text = run_rq(args, place, "calibrate", "TERM")
    assert rc == 143, text
    assert_one_line(text, "terminated", "SIGTERM received")
    # completed sweep cache entries (the FP32 evaluation ran before the signal) stay for a resume; nothing else
    assert listing(place["cwd"]) == [] and listing(place["tmp"]) == []
    files = [p for p in place["out"].rglob("*") if p.is_file()]
    # FP32 predictions are cached per runtime and runtime version (quantize.sweep.runtime_tag)
    assert [p.name for p in files] == [f"fp32.{runtime_tag('ort')}.npz"], listing(place["out"])
    assert files[0].parent.parent.name == ".sweep-cache"


def test_without_a_signal_the_same_run_succeeds(inputs, place):
    """The control of the test above: the driver's wrappers alone change nothing."""
    extra = ["--val", inputs["val"], "--bench", "--bench-batch", "1", "--bench-runs", "2"]
    rc, text = run_rq(quantize_args(inputs, place, "model", *extra), place)
    assert rc == 0, text
    assert rq_lines(text) == []
    assert listing(place["cwd"]) == [] and listing(place["tmp"]) == []
    assert (place["out"] / "o.onnx").is_file()


def test_uninterruptible_block_defers_the_signal_to_its_end():
    # A suite run as a background job inherits SIGINT ignored (and rq keeps an ignored signal ignored): start
    # from Python's usual handler, as in a terminal, and put back what was there.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt), handle_signals(), uninterruptible():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished")  # the block ran to its end before the signal was raised
        assert done == ["finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_ignored_signal_stays_ignored(inputs, place):
    """`nohup rq …` must survive a hangup: rq does not replace a SIG_IGN disposition with its handler."""
    args = [str(a) for a in quantize_args(inputs, place)]
    code = (
        "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); sys.argv = ['fault_driver.py', "
        f"'calibrate', 'HUP', '--', *{args!r}]; sys.path.insert(0, {str(DRIVER.parent)!r}); "
        "import fault_driver; fault_driver.main(sys.argv[1:])"
    )
    env = {**os.environ, **ENV, "TMPDIR": str(place["tmp"])}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=place["cwd"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rq_lines(proc.stdout + proc.stderr) == []
    assert listing(place["tmp"]) == [] and listing(place["cwd"]) == []


# ---------------------------------------------------------------------------------------------------------
# Full file systems
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def full_tmpfs(tmp_path, request):
    """A 64 KiB tmpfs filled to the last byte (or to `request.param` free bytes), or skip where this test may
    not mount one (CI without root)."""
    free = getattr(request, "param", 0)
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        with open(mount / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize > free:
                fh.write(b"\0" * 4096)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_full_output_folder_tmpfs(inputs, place, full_tmpfs):
    args = quantize_args(inputs, place)
    args[args.index("--out") + 1] = full_tmpfs / "o.onnx"
    rc, text = run_rq(args, place)
    assert rc == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "no space left on device", str(full_tmpfs / "o.onnx"))
    assert listing(full_tmpfs) == ["filler"]
    assert_clean(place)


# Python's tempfile skips a $TMPDIR it cannot write a test file into: leave room for that, not for the model.
@pytest.mark.parametrize("full_tmpfs", [8192], indirect=True)
def test_full_tmpdir_tmpfs(inputs, place, full_tmpfs):
    place["tmp"] = full_tmpfs
    rc, text = run_rq(quantize_args(inputs, place), place)
    assert rc == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "no space left on device", f"{full_tmpfs}/rq-")
    assert listing(full_tmpfs) == ["filler"]
    assert listing(place["cwd"]) == [] and listing(place["out"]) == []


def test_full_report_folder_tmpfs_after_the_model_was_written(inputs, place, full_tmpfs):
    args = quantize_args(inputs, place)
    args[args.index("--report-dir") + 1] = full_tmpfs / "reports"
    rc, text = run_rq(args, place)
    assert rc == EXIT_REPORT_FAILED, text
    assert_one_line(
        text,
        "report failed",
        f"the INT8 model was written to {place['out'] / 'o.onnx'}",
        "no space left on device",
        str(full_tmpfs / "reports"),
    )
    assert listing(full_tmpfs) == ["filler"]  # no empty report folders left behind
    assert_clean(place, ("o.onnx",))


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_output_folder_patched_write(inputs, place, monkeypatch):
    real_save = quantize.graph.prepare.onnx.save_model

    def save_model(model, path, *args, **kwargs):
        if not Path(str(path)).name.startswith("."):  # the scratch copy in the work folder
            return real_save(model, path, *args, **kwargs)
        Path(path).write_bytes(model.SerializeToString()[:100])  # half-written, then the disk is full
        _enospc()

    monkeypatch.setattr(quantize.graph.prepare.onnx, "save_model", save_model)
    code, text = invoke(*quantize_args(inputs, place))
    assert code == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "no space left on device", str(place["out"] / "o.onnx"))
    assert_clean(place)


def test_full_tmpdir_patched_write(inputs, place, monkeypatch):
    monkeypatch.setattr(
        quantize.graph.prepare, "_save", _enospc
    )  # the first file rq writes in its work folder
    code, text = invoke(*quantize_args(inputs, place))
    assert code == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "no space left on device", f"{place['tmp']}/rq-")
    assert_clean(place)


def test_full_report_folder_patched_write(inputs, place, monkeypatch):
    # fsync is the last step of every report file's write (quantize.files.atomic_write_text)
    monkeypatch.setattr(quantize.files.os, "fsync", _enospc)
    code, text = invoke(*quantize_args(inputs, place))
    assert code == EXIT_REPORT_FAILED, text
    assert_one_line(
        text,
        "report failed",
        f"the INT8 model was written to {place['out'] / 'o.onnx'}",
        "no space left on device",
        "report.json",
    )
    assert_clean(place, ("o.onnx",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_made_read_only_mid_run(inputs, place, monkeypatch):
    real_quantize = quantize.backends.ort.quantize_with_ort

    def then_chmod(*args, **kwargs):
        result = real_quantize(*args, **kwargs)
        place["out"].chmod(0o500)  # after check_output_path, before the model is published
        return result

    monkeypatch.setattr(quantize.backends.ort, "quantize_with_ort", then_chmod)
    try:
        code, text = invoke(*quantize_args(inputs, place))
    finally:
        place["out"].chmod(0o700)
    assert code == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "permission denied", str(place["out"]))
    assert_clean(place)


def test_permission_lost_mid_run_names_the_path(inputs, place, monkeypatch):
    """check_output_path passed, then the folder's permissions changed under the running job."""

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == place["out"]:  # only the output beside --out
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / ".o.onnx.x.tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, text = invoke(*quantize_args(inputs, place))
    assert code == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "permission denied", str(place["out"]))
    assert_clean(place)


# ---------------------------------------------------------------------------------------------------------
# Models ONNX Runtime cannot load or run: bad input, ORT's reason on one plain line
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["quantize", "eval", "bench"])
def test_unrunnable_model_is_bad_input_with_orts_reason(inputs, place, command):
    if command == "quantize":
        args = quantize_args(inputs, place, "conv")
    elif command == "eval":
        args = ["eval", inputs["conv"], "--data", inputs["val"], "--resize", "36", "--crop", "32"]
    else:
        args = ["bench", inputs["conv"], "--batch", "1", "--runs", "1", "--warmup", "0"]
    rc, text = run_rq(args, place)
    assert rc == EXIT_BAD_INPUT, text
    assert_one_line(text, "error", "conv-4-channels.onnx", "Input channels C is not equal to kernel channels")
    assert "[ONNXRuntimeError]" not in text
    assert_clean(place)


def test_model_ort_cannot_load_is_bad_input(inputs, place):
    rc, text = run_rq(quantize_args(inputs, place, "gemm"), place)
    assert rc == EXIT_BAD_INPUT, text
    assert_one_line(text, "error", "onnxruntime cannot load gemm-24-features.onnx", "Dimension mismatch")
    assert_clean(place)


def test_symbolic_shape_inference_writes_nothing_into_the_cwd_and_runs_once(inputs, place, monkeypatch):
    """ORT's symbolic shape inference saves sym_shape_infer_temp.onnx + <uuid>.data into the CWD on failure."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    calls = []
    real = SymbolicShapeInference.infer_shapes

    def counted(*args, **kwargs):
        calls.append(os.getcwd())
        return real(*args, **kwargs)

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(counted))
    work = place["tmp"] / "rq-work"
    work.mkdir()
    upgraded = work / "upgraded.onnx"
    upgraded.write_bytes(inputs["gemm"].read_bytes())
    prepared = quantize.graph.prepare.PreparedModel(
        source=inputs["gemm"],
        path=work / "prepared.onnx",
        signature=None,
        original_opset=13,
        original_ir_version=8,
    )
    with contextlib.suppress(RqInputError):
        quantize.graph.prepare._run_quant_pre_process(upgraded, prepared)
    assert listing(place["cwd"]) == []
    assert len(calls) == 1, calls  # the fallback does not run it a second time
    assert Path(calls[0]).is_relative_to(work)  # it ran from inside rq's work folder


def test_empty_model_file_says_empty_file(inputs, place):
    empty = place["out"] / "empty.onnx"
    empty.touch()
    for args in (
        ["quantize", empty, "--calib", inputs["calib"], *SMALL, "--out", place["out"] / "o.onnx"],
        ["eval", empty, "--data", inputs["val"]],
        ["bench", empty],
    ):
        code, text = invoke(*args)
        assert code == EXIT_BAD_INPUT, text
        assert_one_line(text, "error", "empty.onnx is an empty file (0 bytes)")
    assert_clean(place, ("empty.onnx",))


# ---------------------------------------------------------------------------------------------------------
# A quantizer crash is not bad input (issue 10's bug 4)
# ---------------------------------------------------------------------------------------------------------


def test_quantizer_crash_has_its_own_exit_code(inputs, place, monkeypatch):
    def crash(*_args, **_kwargs):
        raise RuntimeError("boom in the quantizer")

    monkeypatch.setattr(quantize.backends.ort, "quantize_with_ort", crash)
    code, text = invoke(*quantize_args(inputs, place))
    assert code == EXIT_QUANTIZATION_FAILED, text
    assert_one_line(text, "quantization failed", "RuntimeError: boom in the quantizer", "nothing was written")
    assert_clean(place)


def test_full_disk_under_the_quantizer_is_an_environment_failure(inputs, place, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(quantize.backends.ort, "quantize_with_ort", full)
    code, text = invoke(*quantize_args(inputs, place))
    assert code == EXIT_ENVIRONMENT, text
    assert_one_line(text, "environment error", "no space left on device", f"{place['tmp']}/rq-")
    assert_clean(place)


def test_quantization_failed_is_not_an_input_error():
    assert issubclass(quantize.pipeline.QuantizationFailed, QuantizerError)
    assert not issubclass(quantize.pipeline.QuantizationFailed, RqInputError)
    assert classify(quantize.pipeline.QuantizationFailed("x")).code == EXIT_QUANTIZATION_FAILED


# ---------------------------------------------------------------------------------------------------------
# Non-finite floats, flag names, --workers, BOM, strict JSON: all rejected before the prepare stage
# ---------------------------------------------------------------------------------------------------------

FLOAT_OPTIONS = {
    "quantize": ["--percentile", "--max-drop", "--tune-fraction", "--mean", "--std"],
    "eval": ["--mean", "--std"],
    "sweep": ["--mean", "--std"],
    "inspect": ["--mean", "--std"],
}


def _command_args(command: str, inputs, place) -> list:
    if command == "quantize":
        return quantize_args(inputs, place, "model", "--val", inputs["val"])
    if command == "eval":
        return ["eval", inputs["model"], "--data", inputs["val"]]
    if command == "inspect":
        return ["inspect", inputs["model"], inputs["model"], "--calib", inputs["calib"]]
    return ["sweep", inputs["model"], "--calib", inputs["calib"], "--val", inputs["val"]]


@pytest.mark.parametrize(
    ("command", "option"), [(c, o) for c, options in FLOAT_OPTIONS.items() for o in options]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_options_are_rejected_up_front(inputs, place, command, option, value):
    if option in ("--mean", "--std"):
        value = f"0.5,{value},0.5"
    code, text = invoke(*_command_args(command, inputs, place), f"{option}={value}")
    assert code == EXIT_BAD_INPUT, text
    assert_one_line(text, "error", option, "finite")
    assert "prepare" not in text  # rejected before any work
    assert_clean(place)


def test_every_float_option_is_covered():
    """A float option added later must be added to FLOAT_OPTIONS (and checked for finiteness)."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        floats = {
            p.opts[0]
            for p in command.params
            if getattr(getattr(p, "type", None), "name", "") == "float" or p.name in ("mean", "std")
        }
        assert floats <= set(FLOAT_OPTIONS.get(name, [])), (name, floats)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_recipe_field_is_rejected(inputs, place, value):
    recipe = place["out"] / "recipe.json"
    recipe.write_text(f'{{"calibration": "percentile", "percentile": {value}}}')
    code, text = invoke(*quantize_args(inputs, place), "--recipe", recipe)
    assert code == EXIT_BAD_INPUT, text
    assert_one_line(text, "error", "recipe file", "percentile must be")
    assert_clean(place, ("recipe.json",))


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--bins", "5"], "--bins must be ≥ 128, not 5"),
        (["--samples", "0"], "--samples must be ≥ 1, not 0"),
        (["--batch-size", "0"], "--batch-size must be ≥ 1"),
        (["--percentile", "101"], "--percentile must be in (0, 100]"),
        (["--calibration", "minmax", "--bins", "256"], "--bins applies to entropy, percentile and mse"),
        (["--workers", "0"], "--workers must be ≥ 1"),
    ],
)
def test_messages_name_the_flag_the_user_typed(inputs, place, flags, fragment):
    args = quantize_args(inputs, place)
    for flag in ("--samples", "--batch-size", "--workers"):  # drop SMALL's value when the test sets it
        if flag in flags:
            i = args.index(flag)
            del args[i : i + 2]
    code, text = invoke(*args, *flags)
    assert code == EXIT_BAD_INPUT, text
    line = assert_one_line(text, "error", fragment)
    assert "num_bins" not in line and "batch size" not in line
    assert "prepare" not in text
    assert_clean(place)


def test_recipe_field_errors_still_name_the_recipe(inputs, place):
    recipe = place["out"] / "recipe.json"
    recipe.write_text('{"samples": 0}')
    code, text = invoke(
        *[a for a in quantize_args(inputs, place) if a not in ("--samples", "8")], "--recipe", recipe
    )
    assert code == EXIT_BAD_INPUT, text
    assert_one_line(text, "error", f"recipe file {recipe}: samples must be ≥ 1")


def test_workers_zero_is_rejected_before_the_prepare_in_eval_and_sweep(inputs, place):
    for command in ("eval", "sweep"):
        code, text = invoke(*_command_args(command, inputs, place), "--workers", "0")
        assert code == EXIT_BAD_INPUT, text
        assert_one_line(text, "error", "--workers must be ≥ 1")
    assert_clean(place)


def test_recipe_file_with_a_utf8_bom_is_accepted(inputs, place):
    recipe = place["out"] / "recipe.json"
    recipe.write_bytes("\ufeff".encode() + json.dumps({"calibration": "minmax", "samples": 8}).encode())
    code, text = invoke(*quantize_args(inputs, place), "--recipe", recipe, "--json")
    assert code == 0, text
    assert (place["out"] / "o.onnx").is_file()


def test_report_json_is_strict_json_even_with_non_finite_figures(tmp_path):
    """A NaN figure (e.g. INC's unmeasured baseline) is written as null, never as a bare NaN."""
    from quantize.graph.prepare import prepare_model
    from quantize.measure.cpu import detect_cpu
    from quantize.report import render_report, write_report
    from quantize.report.data import build_report, variant

    model = tiny_cnn(tmp_path / "m.onnx")
    work = tmp_path / "work"
    work.mkdir()
    data = build_report(
        command=["rq", "test"],
        model=model,
        cpu=detect_cpu(),
        advice=None,
        prepared=prepare_model(model, work),
        variants=[variant("FP32", "fp32", model)],
        label="strict",
    )
    data["tuning"] = {"fp32_top1_on_tune_images": float("nan"), "steps": [{"drop_pt": float("inf")}]}
    paths = write_report(data, tmp_path / "r")

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    parsed = json.loads(paths["json"].read_text(), parse_constant=reject)
    assert parsed["tuning"]["fp32_top1_on_tune_images"] is None
    assert parsed["tuning"]["steps"][0]["drop_pt"] is None
    render_report(tmp_path / "r")  # and it re-renders
