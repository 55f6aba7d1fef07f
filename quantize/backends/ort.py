"""Stage 3, quantize (ONNX Runtime backend): turn a prepared FP32 model + calibration ranges into INT8.

The ranges come from `quantize.calibrate` and reach `quantize_static` through its calibration cache, so ORT
never recalibrates (and never holds activations in memory): the same ranges can quantize many recipes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from quantize.calibrate import CalibrationRanges
from quantize.graph.openvino_form import AFFINE_REASON
from quantize.graph.placement import FOLDED_ACTIVATIONS, PLACEMENT_OP_TYPES, place, require_something
from quantize.graph.prepare import load_model
from quantize.measure.runtimes import quiet
from quantize.recipe import QuantRecipe

QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
# What each float op becomes in QOperator format.
QOPERATOR_FORMS = {
    "Conv": ("QLinearConv", "ConvInteger"),
    "Gemm": ("QGemm",),
    "MatMul": ("QLinearMatMul", "MatMulInteger"),
    "Add": ("QLinearAdd",),
    "Mul": ("QLinearMul",),
    "GlobalAveragePool": ("QLinearGlobalAveragePool",),
    "AveragePool": ("QLinearAveragePool",),
    "Concat": ("QLinearConcat",),
    "Sigmoid": ("QLinearSigmoid",),
    "LeakyRelu": ("QLinearLeakyRelu",),
}


@dataclass
class QuantizedOps:
    """How much of the model was quantized, read from the INT8 graph itself.

    Candidates are the nodes of the op types that could be quantized (the placement's types, or the recipe's
    `op_types` override). A Relu/Clip that ORT folded into the quantize range of the node before it counts as
    quantized, and is counted again under `fused`. Every candidate left in FP32 is listed with the reason.
    """

    quantized: int
    candidates: int
    total_nodes: int
    by_type: dict[str, list[int]]  # op type -> [quantized (fused included), candidates]
    fused: dict[str, int] = field(default_factory=dict)  # op type -> activations folded into a Q range
    fp32: dict[str, list[str]] = field(default_factory=dict)  # node name -> [op type, reason]

    def to_dict(self) -> dict:
        return {
            "quantized": self.quantized,
            "candidates": self.candidates,
            "total_nodes": self.total_nodes,
            "by_type": self.by_type,
            "fused": self.fused,
            "fp32": self.fp32,
        }

    def fp32_reasons(self) -> dict[str, int]:
        """How many candidates stayed FP32 for each reason."""
        return dict(Counter(reason for _t, reason in self.fp32.values()))

    def describe(self) -> str:
        kinds = ", ".join(
            f"{t} {q}/{c}" + (" fused" if self.fused.get(t) == q and q else "")
            for t, (q, c) in sorted(self.by_type.items())
        )
        text = f"{self.quantized}/{self.candidates} ({kinds}) of {self.total_nodes} nodes"
        reasons = self.fp32_reasons()
        if reasons:
            text += "; FP32: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        return text


def _node_quantized(
    node: onnx.NodeProto, produced_by: dict[str, str], constants: set[str], quantized_tensors: set[str]
) -> bool:
    """A QDQ node is quantized when the operands it computes on are read through DequantizeLinear (and, but
    for Conv/Gemm/MatMul, whose float output may feed FP32 nodes, its output goes to a QuantizeLinear)."""
    if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
        # The activation (input 0) and the weight (input 1): the activation alone is not enough, an excluded
        # node whose input tensor is shared with a quantized node also reads that tensor's DequantizeLinear.
        operands = [name for name in node.input[:2] if name]
    else:
        operands = [name for name in node.input if name] if node.op_type in ("Add", "Mul", "Concat") else []
        operands = operands or ([node.input[0]] if node.input and node.input[0] else [])
        if not node.output or node.output[0] not in quantized_tensors:
            return False  # e.g. a Flatten between a quantized pooling and an FP32 Gemm
    return bool(operands) and all(
        produced_by.get(name) == "DequantizeLinear" and name not in constants for name in operands
    )


def count_quantized(
    fp32: onnx.ModelProto,
    int8: onnx.ModelProto,
    recipe: QuantRecipe,
    *,
    tuning_fallback: tuple[str, ...] | list[str] = (),
) -> QuantizedOps:
    """Count quantized nodes by looking at the INT8 graph itself, not at what was asked for.

    `tuning_fallback` names the recipe's excluded nodes that tuning (not the user) fell back to FP32.
    """
    placement = place(fp32, recipe)
    candidate_types = set(PLACEMENT_OP_TYPES if placement.from_graph else placement.op_types)
    candidates = [n for n in fp32.graph.node if n.op_type in candidate_types]
    produced_by = {out: node.op_type for node in int8.graph.node for out in node.output}
    constants = {init.name for init in int8.graph.initializer}
    quantized_tensors = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input}
    int8_nodes = {node.name: node for node in int8.graph.node}
    qoperator = Counter()
    for node in int8.graph.node:
        for op_type in candidate_types:
            if node.op_type in QOPERATOR_FORMS.get(op_type, ()):
                qoperator[op_type] += 1
    # Quantized nodes another tool renamed (INC): matched by op type to the candidates not found by name.
    fp32_names = {n.name for n in fp32.graph.node}
    renamed = Counter(
        n.op_type
        for n in int8.graph.node
        if n.name not in fp32_names
        and n.op_type in candidate_types
        and _node_quantized(n, produced_by, constants, quantized_tensors)
    )
    by_type: dict[str, list[int]] = {}
    fused: Counter[str] = Counter()
    fp32_nodes: dict[str, list[str]] = {}
    tuned = set(tuning_fallback)
    user_excluded = set(recipe.exclude_nodes) - tuned
    for node in candidates:
        counts = by_type.setdefault(node.op_type, [0, 0])
        counts[1] += 1
        twin = int8_nodes.get(node.name)
        if twin is not None and twin.op_type == node.op_type:
            done = _node_quantized(twin, produced_by, constants, quantized_tensors)
        elif twin is None and node.op_type in FOLDED_ACTIVATIONS and node.name in placement.node_set():
            done = True  # folded into the quantize range of the node before it
            fused[node.op_type] += 1
        elif qoperator[node.op_type] > 0:  # QOperator format: the node became a QLinear*/…Integer op
            qoperator[node.op_type] -= 1
            done = True
        elif twin is None and renamed[node.op_type] > 0:
            renamed[node.op_type] -= 1
            done = True
        else:
            done = False
        if done:
            counts[0] += 1
            continue
        if node.name in tuned:
            reason = "fell back in tuning"
        elif node.name in user_excluded:
            reason = "excluded by the user"
        elif node.name in placement.fp32:
            reason = placement.fp32[node.name]
        elif twin is not None and twin.op_type == "Mul" and recipe.placement_runtime == "openvino":
            reason = AFFINE_REASON
        else:
            reason = "not converted by onnxruntime's quantizer"
        fp32_nodes[node.name] = [node.op_type, reason]
    return QuantizedOps(
        quantized=sum(q for q, _ in by_type.values()),
        candidates=len(candidates),
        total_nodes=len(fp32.graph.node),
        by_type=by_type,
        fused=dict(fused),
        fp32=fp32_nodes,
    )


def quantize_with_ort(
    prepared_path: Path,
    ranges: CalibrationRanges,
    recipe: QuantRecipe,
    output_path: Path,
    workdir: Path,
) -> None:
    """Quantize `prepared_path` into `output_path` (a scratch path; the caller publishes it atomically)."""
    # Imported here: onnxruntime-openvino (1.24) lacks it, and rq bench/eval run there (OrtBackend.require).
    from onnxruntime.quantization.calibrate import save_tensors_data

    if recipe.reduce_range is None:
        raise ValueError("recipe.reduce_range must be resolved (True/False) before quantizing")
    model = load_model(prepared_path, load_weights=False)
    placement = place(model, recipe)
    require_something(model, placement, recipe)
    cache = workdir / f"ranges-{recipe.calibration}.json"
    save_tensors_data(ranges.tensors, cache)
    with quiet():
        quantize_static(
            str(prepared_path),
            str(output_path),
            calibration_data_reader=None,
            quant_format=FORMATS[recipe.format],
            op_types_to_quantize=list(placement.op_types),
            # Placement from the graph names its nodes; an op-types override quantizes every node of them.
            nodes_to_quantize=list(placement.nodes) if placement.from_graph else None,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QUANT_TYPES[recipe.activation_type],
            weight_type=QUANT_TYPES[recipe.weight_type],
            nodes_to_exclude=list(recipe.exclude_nodes),
            # The method the cached ranges were computed with (mse/mean-minmax store min/max ranges).
            calibrate_method=ranges.tensors.calibration_method,
            calibration_cache_path=str(cache),
            extra_options={
                # Asymmetric uint8 activations suit ReLU nets; weights stay symmetric (zero point 0), which
                # is what ORT's integer kernels are fastest with.
                "ActivationSymmetric": recipe.activation_type == "int8",
                "WeightSymmetric": True,
            },
        )


#: The oldest onnxruntime whose quantizer rq's ort backend runs on (pyproject.toml's core dependency).
MIN_ONNXRUNTIME = (1, 32)


def _version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string: its first two numbers ("2.0rc1" → (2, 0))."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


class OrtBackend:
    """ONNX Runtime's static quantization, fed the ranges of rq's calibrator; bias correction afterwards.

    No tuner of its own: `--tune` runs rq's fallback tuner (quantize/tune.py) over `quantize`.
    """

    name = "ort"
    uses_rq_ranges = True
    has_tuner = False

    def require(self) -> None:
        # onnxruntime is a core dependency (>= 1.32), but a venv built for --runtime ort-openvino holds
        # onnxruntime-openvino instead (1.24 at most), whose quantizer lacks what rq uses.
        import onnxruntime

        from calibration.errors import RqInputError

        if _version_tuple(onnxruntime.__version__) < MIN_ONNXRUNTIME:
            raise RqInputError(
                f"rq quantize needs onnxruntime >= {'.'.join(map(str, MIN_ONNXRUNTIME))} for its quantizer; this "
                f"environment has onnxruntime {onnxruntime.__version__} (onnxruntime-openvino serves rq bench/eval "
                "--runtime ort-openvino only): quantize in a venv with `pip install rq-quant`"
            )

    def versions(self) -> dict[str, str]:
        return {}  # onnxruntime's version is in every cache key already

    def adapt(self, recipe: QuantRecipe) -> QuantRecipe:
        return recipe

    def quantize(
        self, prepared, calibration, recipe: QuantRecipe, spec, scratch: Path, workdir: Path
    ) -> None:
        from calibration.errors import RqInputError
        from quantize.exits import is_environment_error
        from quantize.pipeline import QuantizationFailed

        try:
            quantize_with_ort(prepared.path, calibration.ranges, recipe, scratch, workdir)
        except RqInputError:
            raise
        except Exception as exc:
            if is_environment_error(exc):
                raise  # a full disk under the quantizer is the machine's failure, not the quantizer's
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise QuantizationFailed(
                f"onnxruntime's quantizer failed: {type(exc).__name__}: {reason}"
            ) from None
        calibration.runtime_form = calibration.bias_correction = None
        if recipe.bias_correction and recipe.format == "qoperator":
            from quantize.bias_correction import BiasCorrectionReport

            calibration.bias_correction = BiasCorrectionReport(
                note="skipped: bias correction applies to QDQ models (this one is in QOperator format)"
            )
        correct = recipe.bias_correction and recipe.format == "qdq"
        if recipe.placement_runtime != "openvino" and not correct:
            return
        int8 = load_model(scratch)
        if recipe.placement_runtime == "openvino":
            # Before bias correction, so that the correction measures the final quantization.
            from quantize.graph.openvino_form import to_openvino_form

            calibration.runtime_form = to_openvino_form(int8)
        if correct:
            calibration.bias_correction = _correct_biases(prepared, calibration, recipe, spec, int8)
        onnx.save_model(int8, str(scratch))

    def tune(self, *args, **kwargs):
        raise NotImplementedError(
            "the ort backend has no tuner of its own (rq's fallback tuner runs instead)"
        )


def _correct_biases(prepared, calibration, recipe: QuantRecipe, spec, int8: onnx.ModelProto):
    """Fold INT8's mean output shift of each Conv/Gemm channel into `int8`'s biases, on the calibration images."""
    from quantize.bias_correction import correct_biases
    from quantize.pipeline import calibration_batches

    report = correct_biases(
        load_model(prepared.path),
        int8,
        prepared.signature.input_name,
        calibration_batches(prepared, calibration, spec, recipe.batch_size),
        cache=calibration.bias_statistics,
        give_bias=recipe.placement_runtime != "openvino",
    )
    return report
