"""Per-node quantization error (`quantize.graph.inspection.inspect_models`, `rq inspect`)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calibration import BatchStream, discover_dataset, select_samples
from calibration.errors import RqInputError
from quantize.cli import app
from quantize.graph.inspection import inspect_models, sqnr_db
from quantize.graph.prepare import load_model, prepare_model
from quantize.pipeline import quantize_model
from quantize.recipe import QuantRecipe
from tests.helpers.cli import ENV, all_output, assert_one_line_error
from tests.helpers.cpu import x86_cpu
from tests.helpers.sensitive import PER_TENSOR, colored_images, sensitive_model
from tests.helpers.tiny_models import SMALL_SPEC

SMALL = ["--resize", "36", "--crop", "32"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def _batches(folder: Path, n: int = 8):
    samples = select_samples(discover_dataset(folder), n, 0)
    with BatchStream(samples, SMALL_SPEC, batch_size=4, workers=2) as stream:
        return [b.images for b in stream]


def _quantized(model: Path, calib: Path, out: Path, recipe: QuantRecipe) -> Path:
    quantize_model(model, calib, output=out, recipe=recipe, spec=SMALL_SPEC, cpu=x86_cpu("avx2"), workers=2)
    return out


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_model, calib_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inspect-tiny")
    int8 = _quantized(tiny_model, calib_dir, d / "tiny-int8.onnx", QuantRecipe(samples=8, reduce_range=True))
    prepared = prepare_model(tiny_model, d).path
    return {"fp32": tiny_model, "prepared": prepared, "int8": int8}


@pytest.fixture(scope="module")
def sensitive_pair(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inspect-sensitive")
    model = sensitive_model(d / "sensitive.onnx")
    calib = d / "calib"
    colored_images(calib, 16, start=500)
    int8 = _quantized(model, calib, d / "sensitive-int8.onnx", PER_TENSOR)
    work = d / "prep"
    work.mkdir()
    return {"fp32": model, "prepared": prepare_model(model, work).path, "int8": int8, "calib": calib}


def test_one_row_per_conv_and_gemm(tiny_pair, calib_dir):
    nodes = inspect_models(tiny_pair["prepared"], tiny_pair["int8"], _batches(calib_dir))
    graph = load_model(tiny_pair["prepared"], load_weights=False).graph
    expected = {n.name for n in graph.node if n.op_type in ("Conv", "Gemm")}
    assert len(expected) == 3
    assert [n.node for n in nodes if n.node in expected] == [n.node for n in nodes]
    assert {n.node for n in nodes} == expected and len(nodes) == len(expected)
    for n in nodes:
        assert n.activation_sqnr_db is not None and math.isfinite(n.activation_sqnr_db)
        assert n.activation_sqnr_db > 10  # an ordinary model quantizes well
        assert 0.9 < n.activation_cosine <= 1.0 + 1e-9
        if n.op_type == "Conv":
            assert n.weight_sqnr_db is not None and math.isfinite(n.weight_sqnr_db) and n.weight_sqnr_db > 20
    # worst activation first
    sqnrs = [n.activation_sqnr_db for n in nodes]
    assert sqnrs == sorted(sqnrs)
    row = nodes[0].to_dict()
    assert set(row) == {
        "node",
        "op_type",
        "tensor",
        "weight_sqnr_db",
        "activation_sqnr_db",
        "activation_cosine",
    }
    json.dumps([n.to_dict() for n in nodes])  # plain numbers only


def test_sensitive_node_has_the_lowest_weight_sqnr(sensitive_pair):
    nodes = inspect_models(
        sensitive_pair["prepared"], sensitive_pair["int8"], _batches(sensitive_pair["calib"])
    )
    weights = {n.node: n.weight_sqnr_db for n in nodes if n.weight_sqnr_db is not None}
    assert {"conv_a", "conv_sensitive", "conv_c"} <= set(weights)
    assert min(weights, key=weights.get) == "conv_sensitive"
    by_node = {n.node: n for n in nodes}
    # its output collapses to the bias: nothing of the FP32 signal is left
    assert by_node["conv_sensitive"].activation_sqnr_db < 3
    assert by_node["conv_a"].activation_sqnr_db > 20


def test_sqnr_db_helper():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)
    assert sqnr_db(ref, np.zeros(2)) == pytest.approx(0.0)


def test_sqnr_db_of_identical_tensors_is_finite():
    """Identical tensors (a node left in FP32 that reads an FP32 input) must give a large *finite* SQNR,
    without a numpy overflow warning: JSON has no Infinity."""
    ref = np.array([3.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = sqnr_db(ref, ref)
    assert math.isfinite(value) and value > 300


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON (RFC 8259)")

    return json.loads(text, parse_constant=refuse)


def test_cli_inspect_node_left_in_fp32_gives_strict_json(tiny_model, calib_dir, tmp_path):
    """conv1 excluded: it reads the FP32 input, so its output equals FP32 exactly."""
    int8 = _quantized(
        tiny_model,
        calib_dir,
        tmp_path / "q.onnx",
        QuantRecipe(samples=8, reduce_range=True, exclude_nodes=("conv1",)),
    )
    reports = tmp_path / "r"
    result = invoke(
        "inspect",
        tiny_model,
        int8,
        "--calib",
        calib_dir,
        "--samples",
        "4",
        "--json",
        "--report-dir",
        reports,
        *SMALL,
    )
    assert result.exit_code == 0, all_output(result)
    data = _strict_json(result.stdout)
    conv1 = next(n for n in data["nodes"] if n["node"] == "conv1")
    assert conv1["weight_sqnr_db"] is None  # not quantized
    assert conv1["activation_sqnr_db"] > 100 and conv1["activation_cosine"] == pytest.approx(1.0)
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    _strict_json((run / "report.json").read_text())


def test_inspect_needs_a_qdq_model(tiny_pair, tmp_path, calib_dir, tiny_model):
    qop = _quantized(
        tiny_model,
        calib_dir,
        tmp_path / "qop.onnx",
        QuantRecipe(samples=8, reduce_range=True, format="qoperator"),
    )
    with pytest.raises(RqInputError, match="QDQ-format"):
        inspect_models(tiny_pair["prepared"], qop, _batches(calib_dir))


def test_inspect_without_images(tiny_pair):
    with pytest.raises(RqInputError, match="no images"):
        inspect_models(tiny_pair["prepared"], tiny_pair["int8"], [])


def test_cli_inspect_writes_the_per_node_report(tiny_pair, calib_dir, tmp_path):
    reports = tmp_path / "reports"
    result = invoke(
        "inspect",
        tiny_pair["fp32"],
        tiny_pair["int8"],
        "--calib",
        calib_dir,
        "--samples",
        "4",
        "--report-dir",
        reports,
        *SMALL,
    )
    text = all_output(result)
    assert result.exit_code == 0, text
    assert "Per-node error on 4 images" in text
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    page = (run / "report.html").read_text()
    assert "Per-node error" in page
    data = json.loads((run / "report.json").read_text())
    assert data["inspection"]["images"] == 4 and len(data["inspection"]["nodes"]) == 3


def _inspect_json(tiny_pair, calib, tmp_path) -> dict:
    result = invoke(
        "inspect", tiny_pair["fp32"], tiny_pair["int8"], "--calib", calib, "--samples", "4", "--json",
        "--report-dir", tmp_path / "r", *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, all_output(result)
    return json.loads(result.stdout)


def test_cli_inspect_replaces_an_unreadable_image(tiny_pair, calib_dir, tmp_path):
    """`--samples 4` compares on 4 images even when one of those drawn cannot be read."""
    import shutil

    from tests.helpers.calib_images import write_zero_byte

    calib = shutil.copytree(calib_dir, tmp_path / "calib")
    write_zero_byte(select_samples(discover_dataset(calib), 4, 0)[1].path)
    assert _inspect_json(tiny_pair, calib, tmp_path)["images"] == 4


def test_cli_inspect_json(tiny_pair, calib_dir, tmp_path):
    data = _inspect_json(tiny_pair, calib_dir, tmp_path)
    assert data["images"] == 4
    assert {n["op_type"] for n in data["nodes"]} == {"Conv", "Gemm"}


def test_cli_inspect_qoperator_is_one_line_exit_2(tiny_model, calib_dir, tmp_path):
    qop = _quantized(
        tiny_model,
        calib_dir,
        tmp_path / "qop.onnx",
        QuantRecipe(samples=8, reduce_range=True, format="qoperator"),
    )
    result = invoke(
        "inspect",
        tiny_model,
        qop,
        "--calib",
        calib_dir,
        "--samples",
        "4",
        "--report-dir",
        tmp_path / "r",
        *SMALL,
    )
    assert_one_line_error(result, "needs a QDQ-format model")
    assert not (tmp_path / "r").exists()


def test_cli_inspect_refuses_models_that_are_not_a_pair(tiny_pair, sensitive_pair, calib_dir, tmp_path):
    """Another network's INT8 file: one line, nothing written (not a table of unrelated nodes, nor ONNX
    Runtime's invalid-dimensions error)."""
    result = invoke(
        "inspect",
        sensitive_pair["fp32"],
        tiny_pair["int8"],
        "--calib",
        calib_dir,
        "--report-dir",
        tmp_path / "r",
    )
    assert_one_line_error(result, "not the same network")
    assert not (tmp_path / "r").exists()
    # Same inputs and outputs, but none of the FP32 graph's tensors in the INT8 one.
    import onnx

    renamed = onnx.load(str(tiny_pair["fp32"]))
    names = {t for n in renamed.graph.node for t in n.output} - {o.name for o in renamed.graph.output}
    for node in renamed.graph.node:
        node.output[:] = ["other_" + t if t in names else t for t in node.output]
        node.input[:] = ["other_" + t if t in names else t for t in node.input]
        node.name = "other_" + node.name
    other = tmp_path / "other.onnx"
    onnx.save(renamed, str(other))
    result = invoke("inspect", other, tiny_pair["int8"], "--calib", calib_dir, "--report-dir", tmp_path / "r")
    assert_one_line_error(result, "does not look made from this FP32 model")
    assert not (tmp_path / "r").exists()


def test_cli_inspect_refuses_an_int8_model_in_the_fp32_place(tiny_pair, calib_dir, tmp_path):
    result = invoke("inspect", tiny_pair["int8"], tiny_pair["int8"], "--calib", calib_dir, *SMALL)
    assert_one_line_error(result, "is already quantized")


def test_a_softmax_after_the_head_is_not_compared_with_the_int8_logits(tiny_pair, calib_dir, tmp_path):
    """The FP32 file ends in a Softmax writing `logits`, the INT8 one's Gemm writes `logits`: the same name,
    another quantity. The Gemm is left unpaired rather than shown as a −40 dB disaster; the convs still pair."""
    import onnx
    from onnx import helper

    model = onnx.load(str(tiny_pair["prepared"]))
    (output,) = model.graph.output
    head = next(n for n in model.graph.node if output.name in n.output)
    head.output[0] = "raw_" + output.name
    model.graph.node.append(
        helper.make_node("Softmax", [head.output[0]], [output.name], axis=1, name="softmax")
    )
    with_softmax = tmp_path / "with-softmax.onnx"
    onnx.save(model, str(with_softmax))
    nodes = {n.node: n for n in inspect_models(with_softmax, tiny_pair["int8"], _batches(calib_dir))}
    assert nodes[head.name].activation_sqnr_db is None
    convs = [n for n in nodes.values() if n.op_type == "Conv"]
    assert convs and all(n.activation_sqnr_db is not None and n.activation_sqnr_db > 10 for n in convs)


def test_cli_inspect_samples_below_one(tiny_pair, calib_dir, tmp_path):
    result = invoke(
        "inspect",
        tiny_pair["fp32"],
        tiny_pair["int8"],
        "--calib",
        calib_dir,
        "--samples",
        "0",
        "--report-dir",
        tmp_path / "r",
        *SMALL,
    )
    assert_one_line_error(result, "--samples must be")
