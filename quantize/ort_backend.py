"""Stage 3, quantize (ONNX Runtime backend): turn a prepared FP32 model + calibration ranges into INT8.

The ranges come from `quantize.calibrate` and reach `quantize_static` through its calibration cache, so ORT
never recalibrates (and never holds activations in memory): the same ranges can quantize many recipes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data

from quantize.calibrate import ORT_METHODS, CalibrationRanges
from quantize.prepare import _quiet
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
    """How much of the model was quantized: candidate nodes (op types in the recipe) vs quantized ones."""

    quantized: int
    candidates: int
    total_nodes: int
    by_type: dict[str, list[int]]  # op type -> [quantized, candidates]

    def to_dict(self) -> dict:
        return {
            "quantized": self.quantized,
            "candidates": self.candidates,
            "total_nodes": self.total_nodes,
            "by_type": self.by_type,
        }

    def describe(self) -> str:
        kinds = ", ".join(f"{t} {q}/{c}" for t, (q, c) in sorted(self.by_type.items()))
        return f"{self.quantized}/{self.candidates} ({kinds}) of {self.total_nodes} nodes"


def count_quantized(fp32: onnx.ModelProto, int8: onnx.ModelProto, op_types: tuple[str, ...]) -> QuantizedOps:
    """Count quantized nodes by looking at the INT8 graph itself, not at what was asked for."""
    candidates = Counter(n.op_type for n in fp32.graph.node if n.op_type in op_types)
    produced_by = {out: node.op_type for node in int8.graph.node for out in node.output}
    initializers = {init.name for init in int8.graph.initializer}
    quantized: Counter[str] = Counter()
    for node in int8.graph.node:
        if node.op_type in op_types:
            # QDQ: the float op reads its activation (input 0) and its weight (input 1) through
            # DequantizeLinear. The activation alone is not enough: an excluded node whose input tensor is
            # shared with a quantized node also reads that tensor's DequantizeLinear, but keeps float weights.
            operands = [name for name in node.input[:2] if name]
            if operands and all(
                produced_by.get(name) == "DequantizeLinear" and name not in initializers for name in operands
            ):
                quantized[node.op_type] += 1
            continue
        for op_type in op_types:
            if node.op_type in QOPERATOR_FORMS.get(op_type, ()):
                quantized[op_type] += 1
    by_type = {t: [min(quantized[t], candidates[t]), candidates[t]] for t in candidates}
    return QuantizedOps(
        quantized=sum(q for q, _ in by_type.values()),
        candidates=sum(candidates.values()),
        total_nodes=len(fp32.graph.node),
        by_type=by_type,
    )


def quantize_with_ort(
    prepared_path: Path,
    ranges: CalibrationRanges,
    recipe: QuantRecipe,
    output_path: Path,
    workdir: Path,
) -> None:
    """Quantize `prepared_path` into `output_path` (a scratch path; the caller publishes it atomically)."""
    if recipe.reduce_range is None:
        raise ValueError("recipe.reduce_range must be resolved (True/False) before quantizing")
    cache = workdir / f"ranges-{recipe.calibration}.json"
    save_tensors_data(ranges.tensors, cache)
    with _quiet():
        quantize_static(
            str(prepared_path),
            str(output_path),
            calibration_data_reader=None,
            quant_format=FORMATS[recipe.format],
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QUANT_TYPES[recipe.activation_type],
            weight_type=QUANT_TYPES[recipe.weight_type],
            nodes_to_exclude=list(recipe.exclude_nodes),
            calibrate_method=ORT_METHODS[recipe.calibration],
            calibration_cache_path=str(cache),
            extra_options={
                # Asymmetric uint8 activations suit ReLU nets; weights stay symmetric (zero point 0), which
                # is what ORT's integer kernels are fastest with.
                "ActivationSymmetric": recipe.activation_type == "int8",
                "WeightSymmetric": True,
            },
        )
