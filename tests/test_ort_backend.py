"""Stage 3, quantize with ONNX Runtime: formats, per-channel, exclusions and the quantized-op count."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantize.backends.ort import count_quantized, quantize_with_ort
from quantize.calibrate import calibrate
from quantize.graph.prepare import prepare_model
from quantize.recipe import LEGACY_OP_TYPES, QuantRecipe
from tests.helpers.tiny_models import CLASSES, random_inputs

CALIB = random_inputs(32, seed=11)
TEST = random_inputs(16, seed=12)  # not the calibration inputs


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


class Setup:
    def __init__(self, model, workdir):
        self.workdir = workdir
        self.prepared = prepare_model(model, workdir)
        self.fp32 = onnx.load(str(self.prepared.path))
        self.input_name = self.prepared.signature.input_name
        recipe = QuantRecipe(calibration="minmax", reduce_range=False)
        batches = (CALIB[i : i + 8] for i in range(0, len(CALIB), 8))
        self.ranges = calibrate(self.prepared.path, self.input_name, batches, recipe, workdir)
        self.reference = run(self.prepared.path, TEST)

    def quantize(self, tmp_path, **changes):
        # These tests pin the op types (the override); placement from the graph: tests/test_placement.py.
        changes.setdefault("op_types", LEGACY_OP_TYPES)
        recipe = QuantRecipe(calibration="minmax", reduce_range=False).with_changes(**changes)
        out = tmp_path / f"{recipe.label()}.onnx"
        quantize_with_ort(self.prepared.path, self.ranges, recipe, out, self.workdir)
        int8 = onnx.load(str(out))
        return out, int8, count_quantized(self.fp32, int8, recipe)


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory) -> Setup:
    return Setup(tiny_model, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def v2(v2_model, tmp_path_factory) -> Setup:
    return Setup(v2_model, tmp_path_factory.mktemp("v2"))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("per_channel", [True, False], ids=["pc", "pt"])
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_quantize_formats(tiny, tmp_path, fmt, per_channel):
    out, int8, ops = tiny.quantize(tmp_path, format=fmt, per_channel=per_channel)
    onnx.checker.check_model(int8)
    logits = run(out, TEST)
    assert logits.shape == (len(TEST), CLASSES) and np.isfinite(logits).all()
    assert (logits.argmax(1) == tiny.reference.argmax(1)).mean() >= 0.8
    assert cosine(logits, tiny.reference).min() > 0.9
    assert not np.array_equal(logits, tiny.reference)  # really quantized, not a copy

    assert (ops.quantized, ops.candidates) == (3, 3)
    assert ops.by_type == {"Conv": [2, 2], "Gemm": [1, 1]}
    assert ops.total_nodes == len(tiny.fp32.graph.node)
    kinds = {n.op_type for n in int8.graph.node}
    if fmt == "qdq":
        assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= kinds
    else:
        assert {"QLinearConv", "QGemm"} <= kinds and "Conv" not in kinds
    if per_channel:
        conv_weight_scales = [
            i for i in int8.graph.initializer if "conv" in i.name and i.name.endswith("scale") and i.dims
        ]
        assert any(i.dims[0] > 1 for i in conv_weight_scales)


@pytest.mark.parametrize(("activation", "weight"), [("uint8", "int8"), ("uint8", "uint8"), ("int8", "int8")])
@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_every_type_pair_the_recipe_accepts_quantizes(tiny, tmp_path, fmt, activation, weight):
    out, int8, ops = tiny.quantize(
        tmp_path, format=fmt, activation_type=activation, weight_type=weight, reduce_range=True
    )
    onnx.checker.check_model(int8)
    assert ops.quantized == 3
    assert cosine(run(out, TEST), tiny.reference).min() > 0.9


def test_describe(tiny, tmp_path):
    _, _, ops = tiny.quantize(tmp_path)
    assert ops.describe() == "3/3 (Conv 2/2, Gemm 1/1) of 7 nodes"
    assert ops.to_dict()["by_type"] == {"Conv": [2, 2], "Gemm": [1, 1]}
    _, _, ops = tiny.quantize(tmp_path, exclude_nodes=("fc",))
    assert ops.describe() == "2/3 (Conv 2/2, Gemm 0/1) of 7 nodes; FP32: 1 excluded by the user"
    assert ops.to_dict()["fp32"] == {"fc": ["Gemm", "excluded by the user"]}


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("node", ["conv2", "fc"])
def test_exclude_nodes_stay_fp32(tiny, tmp_path, fmt, node):
    out, int8, ops = tiny.quantize(tmp_path, format=fmt, exclude_nodes=(node,))
    onnx.checker.check_model(int8)
    assert ops.quantized == ops.candidates - 1 == 2
    kept = [n for n in int8.graph.node if n.name == node]
    assert len(kept) == 1 and kept[0].op_type in ("Conv", "Gemm")
    # the float node still has float weights
    weights = {i.name: i for i in int8.graph.initializer}
    assert weights[kept[0].input[1]].data_type == onnx.TensorProto.FLOAT
    assert cosine(run(out, TEST), tiny.reference).min() > 0.9


def test_exclude_node_sharing_a_quantized_input(v2, tmp_path):
    """conv1 and conv_sc read the same tensor; with conv1 excluded, QDQ still feeds it through the shared
    DequantizeLinear, but its weights stay float: it must not be counted as quantized."""
    full = v2.quantize(tmp_path)[2]
    # 5 Convs + 3 BNs prepared as depthwise 1×1 Convs (the input BN stays float) + the Gemm
    assert (full.quantized, full.candidates) == (9, 9)
    for fmt in ("qdq", "qoperator"):
        out, _, ops = v2.quantize(tmp_path, format=fmt, exclude_nodes=("conv1",))
        assert ops.by_type["Conv"] == [7, 8], fmt
        assert ops.quantized == 8
        assert run(out, TEST).shape == (len(TEST), CLASSES)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_v2_shaped_model_quantizes_and_runs(v2, tmp_path, fmt):
    """Pre-activation BNs were prepared as depthwise 1×1 Convs; every Conv and the Gemm are quantized."""
    out, int8, ops = v2.quantize(tmp_path, format=fmt)
    onnx.checker.check_model(int8)
    assert ops.by_type == {"Conv": [8, 8], "Gemm": [1, 1]}
    # Only the input normalization stays a (float) BatchNormalization, in front of the first quantize.
    assert [n.input[0] for n in int8.graph.node if n.op_type == "BatchNormalization"] == ["data"]
    logits = run(out, TEST)
    assert cosine(logits, v2.reference).min() > 0.9


def test_reduce_range_must_be_resolved(tiny, tmp_path):
    with pytest.raises(ValueError, match="reduce_range"):
        quantize_with_ort(tiny.prepared.path, tiny.ranges, QuantRecipe(), tmp_path / "x.onnx", tiny.workdir)
    assert not (tmp_path / "x.onnx").exists()


def test_count_quantized_on_the_float_model(tiny):
    ops = count_quantized(tiny.fp32, tiny.fp32, QuantRecipe(op_types=LEGACY_OP_TYPES))
    assert (ops.quantized, ops.candidates) == (0, 3)
    assert "MatMul" not in ops.by_type  # only types present in the model


def test_the_backend_refuses_an_onnxruntime_too_old_for_its_quantizer(monkeypatch):
    """A venv built for --runtime ort-openvino holds onnxruntime-openvino 1.24 instead of onnxruntime: rq bench and
    eval run there, rq quantize stops before any work, in one line (tests/test_ort_openvino.py, CI's venv)."""
    from calibration.errors import RqInputError
    from quantize.backends.ort import OrtBackend, _version_tuple

    assert _version_tuple("1.32.0") == (1, 32) and _version_tuple("1.24.1") == (1, 24)
    assert _version_tuple("1.33.0.dev20261201") == (1, 33) and _version_tuple("2.0rc1") == (2, 0)
    OrtBackend().require()  # this venv's onnxruntime
    monkeypatch.setattr(ort, "__version__", "1.24.1")
    with pytest.raises(RqInputError, match=r"needs onnxruntime >= 1\.32 .* has onnxruntime 1\.24\.1"):
        OrtBackend().require()
