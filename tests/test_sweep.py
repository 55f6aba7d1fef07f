"""`rq sweep` / `quantize.sweep.run_sweep`: one report with FP32 and every recipe of a grid, the Pareto front,
and the per-recipe cache (a rerun, and a rerun after an interruption, quantize only what is missing).

Cache reuse is measured by counting calls of `quantize.sweep.quantize_prepared`, never by timing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import quantize.sweep as sweep_module
from quantize.cli import app
from quantize.measure.stats import pareto_front
from quantize.recipe import QuantRecipe
from quantize.report import validate_report
from quantize.report.data import sweep_report
from quantize.sweep import GRIDS, grid_recipes, run_sweep, variant_name
from tests.helpers.calib_images import make_class_folders, write_rgb
from tests.helpers.cli import ENV, all_output, assert_one_line_error
from tests.helpers.cpu import x86_cpu
from tests.helpers.onehot import wnid
from tests.helpers.sensitive import sensitive_model
from tests.helpers.tiny_models import SMALL_SPEC

SWEEP = ["--grid", "calibration", "--bench-batch", "1", "--bench-runs", "1", "--resize", "36", "--crop", "32"]
SWEEP += ["--samples", "8", "--workers", "2"]
BASE = QuantRecipe(samples=8, num_bins=128)  # few bins: entropy calibration stays fast


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sweep")
    model = sensitive_model(base / "tiny1000.onnx", n_sensitive=0)
    calib = base / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    val = base / "val"
    make_class_folders(val, {wnid(2): 3, wnid(3): 3}, size=(48, 40))
    return {"model": model, "calib": calib, "val": val}


@pytest.fixture(scope="module")
def first_sweep(inputs, tmp_path_factory) -> dict:
    reports = tmp_path_factory.mktemp("sweep-reports")
    result = invoke(
        "sweep",
        inputs["model"],
        "--calib",
        inputs["calib"],
        "--val",
        inputs["val"],
        "--json",
        *SWEEP,
        "--report-dir",
        reports,
    )
    assert result.exit_code == 0, all_output(result)
    return {"reports": reports, "data": json.loads(result.stdout)}


class CountingQuantize:
    """Wraps quantize.sweep.quantize_prepared; optionally raises KeyboardInterrupt on call `interrupt_at`."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at
        self.real = sweep_module.quantize_prepared

    def __call__(self, prepared, calibration, recipe, spec, output, workdir):
        self.calls.append(recipe.label())
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return self.real(prepared, calibration, recipe, spec, output, workdir)


def _run(inputs, report_dir: Path, **kwargs):
    return run_sweep(
        inputs["model"],
        inputs["calib"],
        inputs["val"],
        grid="calibration",
        base=BASE,
        spec=SMALL_SPEC,
        report_dir=report_dir,
        bench_batches=[],
        workers=2,
        cpu=x86_cpu("avx2"),
        **kwargs,
    )


def test_sweep_report_has_fp32_and_one_row_per_recipe(first_sweep):
    data = first_sweep["data"]
    validate_report(data)
    assert {"resize", "crop", "mean", "std"} <= set(data["preprocess"])  # every recipe saw these images
    names = [v["name"] for v in data["variants"]]
    recipes = grid_recipes("calibration", BASE, x86_cpu("avx2"))
    assert len(recipes) == 3 == len(GRIDS["calibration"]["calibration"])
    assert names == ["FP32"] + [variant_name(r) for r in recipes]
    assert [v["kind"] for v in data["variants"]] == ["fp32", "int8", "int8", "int8"]
    assert sorted(v["recipe"]["calibration"] for v in data["variants"][1:]) == [
        "entropy",
        "minmax",
        "percentile",
    ]
    for v in data["variants"]:
        assert v["accuracy"]["images"] == 6
        assert set(v["bench"]) == {"1"}
    for v in data["variants"][1:]:
        assert v["cached"] is False
        assert v["drop"]["n"] == 6
        # 7 candidates; the classifier head and the Flatten feeding it stay FP32
        assert (v["quantized_ops"]["quantized"], v["quantized_ops"]["candidates"]) == (5, 7)
        assert Path(v["path"]).is_file() and ".sweep-cache" in v["path"]
    assert data["variants"][0]["bench"]["1"]["ratio_to_fp32"] == 1.0
    assert any(v["pareto"] for v in data["variants"])
    # the report on disk is the same document
    (run,) = [p for p in first_sweep["reports"].iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert json.loads((run / "report.json").read_text())["variants"] == data["variants"]
    assert (run / "report.html").is_file() and (run / "report.md").is_file()


def test_pareto_marks_agree_with_pareto_front(first_sweep):
    variants = first_sweep["data"]["variants"]
    measured = [v for v in variants if v["accuracy"] and v["bench"]]
    assert measured == variants  # everything was validated and benchmarked
    batch = str(max(int(b) for b in measured[0]["bench"]))
    points = [(v["bench"][batch]["ratio_to_fp32"], v["accuracy"]["top1"]) for v in measured]
    front = set(pareto_front(points))
    assert front
    assert [v["pareto"] for v in measured] == [i in front for i in range(len(measured))]


def test_identical_rerun_reuses_the_cache(inputs, first_sweep, monkeypatch):
    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    result = invoke(
        "sweep",
        inputs["model"],
        "--calib",
        inputs["calib"],
        "--val",
        inputs["val"],
        "--json",
        *SWEEP,
        "--report-dir",
        first_sweep["reports"],
    )
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert counter.calls == []  # nothing was quantized again
    assert [v["cached"] for v in data["variants"][1:]] == [True, True, True]
    # the same predictions come back: same accuracy and drop for every variant
    for new, old in zip(data["variants"], first_sweep["data"]["variants"], strict=True):
        assert new["name"] == old["name"]
        assert new["accuracy"] == old["accuracy"]
        assert new["drop"] == old["drop"]
        assert new["sha256"] == old["sha256"]
    assert any("reused from the cache" in note for note in data["notes"])


def test_run_sweep_counts_quantizations(inputs, tmp_path, monkeypatch):
    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    first = _run(inputs, tmp_path)
    assert len(counter.calls) == 3 and [e.cached for e in first.entries] == [False] * 3
    second = _run(inputs, tmp_path)
    assert len(counter.calls) == 3  # no new call
    assert [e.cached for e in second.entries] == [True] * 3
    assert second.cache_dir == first.cache_dir
    for a, b in zip(first.entries, second.entries, strict=True):
        assert a.recipe == b.recipe and (a.predictions == b.predictions).all()
    report = sweep_report(second, ["rq", "sweep"], "calibration")
    validate_report(report)
    assert [v.get("cached") for v in report["variants"][1:]] == [True] * 3
    assert report["bench"] is None and all(v["bench"] is None for v in report["variants"])


def test_a_changed_input_starts_a_fresh_cache(inputs, tmp_path, monkeypatch):
    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    first = _run(inputs, tmp_path)
    other = _run(inputs, tmp_path, val_limit=4)  # another validation image list
    assert other.cache_dir != first.cache_dir
    assert len(counter.calls) == 6 and not any(e.cached for e in other.entries)


def test_images_replaced_under_the_same_names_start_a_fresh_cache(inputs, tmp_path, monkeypatch):
    """The cache key follows the images' state (size, time, inode), not only their names: a validation folder
    whose images were swapped between files (same names, so wrong labels now) must not reuse the old
    accuracies; the same untouched folder does."""
    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    copy = tmp_path / "val-copy"
    shutil.copytree(inputs["val"], copy)
    first = _run({**inputs, "val": copy}, tmp_path)
    same = _run({**inputs, "val": copy}, tmp_path)
    assert same.cache_dir == first.cache_dir and all(e.cached for e in same.entries)
    files = sorted(copy.rglob("*.JPEG"))
    a, b = files[0], files[-1]  # two classes: swapping their bytes mislabels both
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    swapped = _run({**inputs, "val": copy}, tmp_path)
    assert swapped.cache_dir != first.cache_dir and not any(e.cached for e in swapped.entries)


def test_interrupted_sweep_resumes_from_the_cache(inputs, tmp_path, monkeypatch):
    interrupting = CountingQuantize(interrupt_at=2)
    monkeypatch.setattr(sweep_module, "quantize_prepared", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs, tmp_path)
    assert len(interrupting.calls) == 2
    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    resumed = _run(inputs, tmp_path)
    assert [e.cached for e in resumed.entries] == [True, False, False]
    assert counter.calls == [interrupting.calls[1], resumed.entries[2].recipe.label()]
    # no half-written file of the interrupted recipe is left in the cache
    leftovers = [p.name for p in resumed.cache_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_interrupted_cli_sweep_exits_130(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "quantize_prepared", CountingQuantize(interrupt_at=1))
    result = invoke(
        "sweep",
        inputs["model"],
        "--calib",
        inputs["calib"],
        "--val",
        inputs["val"],
        *SWEEP,
        "--report-dir",
        tmp_path / "r",
    )
    assert result.exit_code == 130, all_output(result)
    assert "interrupted" in all_output(result)


def test_unknown_grid_is_exit_2(inputs, tmp_path):
    result = invoke(
        "sweep",
        inputs["model"],
        "--calib",
        inputs["calib"],
        "--val",
        inputs["val"],
        "--grid",
        "nonsense",
        "--report-dir",
        tmp_path / "r",
    )
    line = assert_one_line_error(result, "unknown grid 'nonsense'")
    assert "calibration" in line and "default" in line
    assert not (tmp_path / "r").exists()


def test_cached_rerun_report_still_describes_the_calibration(inputs, first_sweep):
    """A rerun served entirely from the cache must still say which calibration images the models came from."""
    result = invoke(
        "sweep",
        inputs["model"],
        "--calib",
        inputs["calib"],
        "--val",
        inputs["val"],
        "--json",
        *SWEEP,
        "--report-dir",
        first_sweep["reports"],
    )
    assert result.exit_code == 0, all_output(result)
    data = json.loads(result.stdout)
    assert all(v["cached"] for v in data["variants"][1:])
    assert data["calibration"] is not None
    for key in ("folder", "layout", "images_used", "skipped", "file_list_sha256"):
        assert data["calibration"][key] == first_sweep["data"]["calibration"][key]


def test_unreadable_validation_image_is_reported_fresh_and_cached(tmp_path):
    """A broken image in the validation folder is counted and named in the sweep's report, on the first run
    and on a rerun served from the cache (the FP32 pass, which finds the skip, is not run again)."""
    model = sensitive_model(tmp_path / "tiny1000.onnx", n_sensitive=0)
    calib, val = tmp_path / "calib", tmp_path / "val"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    make_class_folders(val, {wnid(2): 3, wnid(3): 3}, size=(48, 40))
    broken = val / wnid(2) / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    reports = tmp_path / "reports"
    args = ["sweep", model, "--calib", calib, "--val", val, "--json", *SWEEP, "--grid", "weights"]
    args += ["--report-dir", reports]
    seen = []
    for _run_number in (1, 2):
        result = invoke(*args)
        assert result.exit_code == 0, all_output(result)
        data = json.loads(result.stdout)
        validate_report(data)
        skipped = data["validation"]["skipped"]
        assert [Path(p).name for p, _reason in skipped] == ["broken.JPEG"], skipped
        assert data["validation"]["images"] == 6
        md = (reports / data["run_id"] / "report.md").read_text()
        assert "Skipped files (1)" in md and "broken.JPEG" in md
        seen.append([v.get("cached") for v in data["variants"][1:]])
    assert not any(seen[0]) and all(seen[1])  # the second run came from the cache


@pytest.fixture
def flat_val_with_labels(inputs, tmp_path) -> dict[str, Path]:
    """The module's model and calibration images; a flat validation folder labelled by a val.txt file."""
    val = tmp_path / "flat-val"
    for i in range(4):
        write_rgb(val / f"img_{i}.JPEG", size=(48, 40), seed=50 + i)
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"img_{i}.JPEG {i % 2}\n" for i in range(4)))
    return {"model": inputs["model"], "calib": inputs["calib"], "val": val, "val_labels": labels}


def test_a_changed_labels_file_misses_the_cache(flat_val_with_labels, tmp_path, monkeypatch):
    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    data = flat_val_with_labels
    first = _run(data, tmp_path / "r", val_labels=data["val_labels"])
    data["val_labels"].write_text("".join(f"img_{i}.JPEG {2 + i % 2}\n" for i in range(4)))  # same path
    second = _run(data, tmp_path / "r", val_labels=data["val_labels"])
    assert second.cache_dir != first.cache_dir
    assert not any(e.cached for e in second.entries) and len(counter.calls) == 6
    assert list(second.labels) == [2, 3, 2, 3] and list(first.labels) == [0, 1, 0, 1]


def test_another_onnxruntime_version_misses_the_cache(inputs, tmp_path, monkeypatch):
    import onnxruntime

    counter = CountingQuantize()
    monkeypatch.setattr(sweep_module, "quantize_prepared", counter)
    first = _run(inputs, tmp_path)
    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".post-test")
    second = _run(inputs, tmp_path)
    assert second.cache_dir != first.cache_dir
    assert not any(e.cached for e in second.entries) and len(counter.calls) == 6
