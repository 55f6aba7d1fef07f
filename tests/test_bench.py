"""The benchmark engine on tiny ONNX models. Checks structure only: never which model is faster."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.errors import RqInputError
from calibration.progress import ProgressCallbacks
from quantize.measure.bench import BenchResult, bench_models
from quantize.measure.cpu import detect_cpu
from quantize.measure.stats import speed_ratio_interval


def _tiny_model(path, *, hw: int = 8, out_channels: int = 4, batch: int | str = "N", seed: int = 0):
    """input [batch,3,hw,hw] → Conv 3x3 → GlobalAveragePool → Flatten, opset 13."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((out_channels, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(out_channels, dtype=np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_channels])],
        initializer=[w, b],
    )
    # IR 8 keeps the file loadable by every onnxruntime rq supports (>= 1.20).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def two_models(tmp_path):
    return [
        _tiny_model(tmp_path / "a.onnx", seed=0),
        _tiny_model(tmp_path / "b.onnx", out_channels=8, seed=1),
    ]


def test_bench_structure_and_interleaving(two_models):
    messages: list[str] = []
    res = bench_models(
        two_models,
        batch_sizes=(1, 2),
        threads=1,
        runs=3,
        warmup=1,
        progress=ProgressCallbacks(on_note=messages.append),
    )
    assert isinstance(res, BenchResult)
    assert res.threads == 1 and res.runs == 3 and res.warmup == 1
    assert res.provider == "CPUExecutionProvider"
    assert res.onnxruntime_version
    assert res.batch_sizes == [1, 2]
    assert res.input_shape == ["N", 3, 8, 8]
    assert "describe" in res.cpu and "isa" in res.cpu
    assert messages == ["loading a.onnx in onnxruntime", "loading b.onnx in onnxruntime"] + [
        f"batch {b}: warmup (1 per model)" for b in (1, 2)
    ]

    assert len(res.rows) == 2 * 2
    assert {(r.model_index, r.batch) for r in res.rows} == {(0, 1), (1, 1), (0, 2), (1, 2)}
    for r in res.rows:
        assert r.median_ms > 0 and r.p90_ms > 0 and r.mean_ms > 0 and r.min_ms > 0
        assert r.images_per_s > 0 and r.ratio_to_first > 0
        assert r.min_ms <= r.median_ms <= r.p90_ms
        assert len(r.samples_ms) == 3
        assert r.images_per_s == pytest.approx(r.batch / (r.median_ms / 1000))
        assert r.median_ms == pytest.approx(float(np.median(r.samples_ms)))
    for b in (1, 2):
        assert res.row(0, b).ratio_to_first == 1.0
        assert res.row(1, b).ratio_to_first == pytest.approx(
            res.row(0, b).median_ms / res.row(1, b).median_ms
        )
    assert res.row(0, 1).name == "a.onnx"

    # Timed calls only, interleaved A B A B …, batch by batch.
    assert res.order == [(0, 1, "ort"), (1, 1, "ort")] * 3 + [(0, 2, "ort"), (1, 2, "ort")] * 3


def test_result_serializes_and_renders(two_models):
    res = bench_models(two_models, batch_sizes=(1,), threads=1, runs=2, warmup=0)
    d = json.loads(json.dumps(res.to_dict()))
    assert len(d["rows"]) == 2 and d["order"] == [[0, 1, "ort"], [1, 1, "ort"]] * 2

    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(res.render_table())
    text = console.export_text()
    assert "a.onnx" in text and "b.onnx" in text and "onnxruntime" in text and "CPUExecutionProvider" in text


def test_table_shows_no_vnni_note(two_models, monkeypatch):
    monkeypatch.setenv("RQ_CPU_FLAGS", "avx2")
    res = bench_models(two_models[:1], batch_sizes=(1,), threads=1, runs=1, warmup=0, cpu=detect_cpu())
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(res.render_table())
    assert "INT8 gains are smaller on CPUs without VNNI" in console.export_text()


def test_different_input_shape_is_rejected(tmp_path, two_models):
    other = _tiny_model(tmp_path / "big.onnx", hw=16)
    with pytest.raises(RqInputError) as exc:
        bench_models([two_models[0], other], batch_sizes=(1,), runs=1, warmup=0)
    msg = str(exc.value)
    assert "[N, 3, 8, 8]" in msg and "[N, 3, 16, 16]" in msg and "\n" not in msg


def test_non_onnx_file_is_rejected_on_one_line(tmp_path, two_models):
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf\n" * 5)
    with pytest.raises(RqInputError) as exc:
        bench_models([two_models[0], junk], batch_sizes=(1,), runs=1, warmup=0)
    msg = str(exc.value)
    assert msg.startswith(f"{junk} is not an ONNX model: ")
    assert "\n" not in msg


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(RqInputError, match=r"model not found: .*nope.onnx"):
        bench_models([tmp_path / "nope.onnx"], runs=1, warmup=0)


@pytest.mark.parametrize("batches", [(0,), (1, 0), (-2,)])
def test_batch_below_one_is_rejected(two_models, batches):
    with pytest.raises(RqInputError, match=r"^--batch must be ≥ 1$"):
        bench_models(two_models, batch_sizes=batches, runs=1, warmup=0)


def test_fixed_batch_dim_skips_other_batch_sizes(tmp_path):
    fixed = _tiny_model(tmp_path / "fixed.onnx", batch=1)
    dynamic = _tiny_model(tmp_path / "dyn.onnx")
    res = bench_models([dynamic, fixed], batch_sizes=(1, 2), threads=1, runs=2, warmup=0)
    assert res.batch_sizes == [1]
    assert {r.batch for r in res.rows} == {1}
    assert any("batch 2 skipped" in n and "fixed.onnx" in n for n in res.notes)
    with pytest.raises(RqInputError, match="no requested batch size can run"):
        bench_models([fixed], batch_sizes=(4,), runs=1, warmup=0)


def test_speedup_interval_pairs_the_rounds_of_the_run(two_models):
    res = bench_models(two_models, batch_sizes=(1,), threads=1, runs=20, warmup=1)
    first, second = res.row(0, 1), res.row(1, 1)
    assert first.ratio_interval is None  # model #1 against itself: exactly 1
    low, high = second.ratio_interval
    assert 0 < low <= high
    assert (low, high) == speed_ratio_interval(first.samples_ms, second.samples_ms)
    assert json.loads(json.dumps(res.to_dict()))["rows"][1]["ratio_interval"] == [low, high]
    # Too few rounds for a bootstrap: no interval rather than a made-up one.
    short = bench_models(two_models, batch_sizes=(1,), threads=1, runs=3, warmup=0)
    assert short.row(1, 1).ratio_interval is None


def test_the_recorded_session_config_is_read_back_from_the_sessions(two_models):
    res = bench_models(two_models, batch_sizes=(1,), threads=1, runs=1, warmup=0)
    assert res.session_config == {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    default = bench_models(two_models, batch_sizes=(1,), threads=1, runs=1, warmup=0, allow_spinning=True)
    assert default.session_config == {
        "session.intra_op.allow_spinning": "1",
        "session.force_spinning_stop": "unset (onnxruntime's default)",
    }
