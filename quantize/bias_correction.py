"""Bias correction (as NNCF's FastBiasCorrection does it): fold INT8's mean output shift back into the bias.

Rounding the weights and clipping/rounding the input activation shift the mean of a layer's output channels;
the next layers see that shift as a systematic error. For every quantized Conv and Gemm of a QDQ model:

1. one FP32 pass over the calibration images collects the mean of the layer's input, position by position
   (`m`), and the mean of the same input after the INT8 model's quantize→dequantize of it (`m_q`);
2. because a convolution is linear, the mean output of the FP32 layer is `conv(m, W) + b` and that of the
   INT8 layer `conv(m_q, W_q) + b`; their difference, averaged over positions, is the shift of each output
   channel (positions are kept so zero padding at the borders is accounted for exactly);
3. the shift is subtracted from the bias: in a QDQ model the bias is an int32 initializer read through
   DequantizeLinear with scale input_scale·weight_scale, so `b_q -= round(shift / (s_x·s_w))`. A layer with
   no bias gets one (int32 + DequantizeLinear, same scales).

Each layer is corrected against FP32 inputs (not the INT8 model's own upstream errors), as FastBiasCorrection
does: corrections then do not compound, and one FP32 pass serves every layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantize.measure.runtimes import ort_session

logger = logging.getLogger(__name__)

CORRECTED_TYPES = ("Conv", "Gemm")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass
class BiasCorrectionReport:
    corrected: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # layers that had no bias and got one
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    max_shift: float = 0.0  # largest |shift| corrected, in the layer's output units
    images: int = 0
    note: str = ""  # why nothing was done, when nothing was

    def to_dict(self) -> dict:
        return {
            "corrected": len(self.corrected),
            "created": list(self.created),
            "skipped": dict(self.skipped),
            "max_shift": round(self.max_shift, 6),
            "images": self.images,
            "note": self.note,
        }

    def describe(self) -> str:
        if self.note:
            return self.note
        text = f"{len(self.corrected)} layer(s) corrected on {self.images} images"
        if self.created:
            text += f" ({len(self.created)} given a bias)"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text


@dataclass
class _Layer:
    node: onnx.NodeProto  # in the INT8 graph
    fp32_input: str  # the layer's input tensor in the FP32 graph
    weight: np.ndarray  # FP32 weight
    weight_q: np.ndarray  # dequantized INT8 weight
    x_scale: float
    x_zero: int
    x_range: tuple[int, int]


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def dequantize(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray, int]:
    """The float value, scale and axis of a DequantizeLinear node reading initializers."""
    values = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zero = (
        numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2]
        else np.zeros_like(scale)
    )
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale, scale, axis


def _find_layers(fp32: onnx.ModelProto, int8: onnx.ModelProto, report: BiasCorrectionReport) -> list[_Layer]:
    inits = _initializers(int8)
    fp32_inits = _initializers(fp32)
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    producer = {out: node for node in int8.graph.node for out in node.output}
    layers = []
    for node in int8.graph.node:
        if node.op_type not in CORRECTED_TYPES:
            continue
        twin = fp32_nodes.get(node.name)
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if twin is None or x_dq is None or w_dq is None:
            continue  # not quantized: nothing to correct
        if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if "transA" in attrs and attrs["transA"].i:
                report.skipped[node.name] = "Gemm with transposed input"
                continue
        if w_dq.input[0] not in inits or twin.input[1] not in fp32_inits:
            report.skipped[node.name] = "weight is not a constant"
            continue
        if not all(name in inits for name in x_dq.input[1:] if name):
            report.skipped[node.name] = "input scale is not a constant"
            continue
        weight_q, _scale, _axis = dequantize(w_dq, inits)
        x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]).reshape(-1)[0])
        zero = inits.get(x_dq.input[2]) if len(x_dq.input) > 2 and x_dq.input[2] else None
        x_zero = int(numpy_helper.to_array(zero).reshape(-1)[0]) if zero is not None else 0
        signed = zero is not None and zero.data_type == TensorProto.INT8
        layers.append(
            _Layer(
                node=node,
                fp32_input=twin.input[0],
                weight=numpy_helper.to_array(fp32_inits[twin.input[1]]).astype(np.float64),
                weight_q=weight_q,
                x_scale=x_scale,
                x_zero=x_zero,
                x_range=(-128, 127) if signed else (0, 255),
            )
        )
    return layers


def _mean_inputs(
    fp32: onnx.ModelProto, input_name: str, batches: Iterable[np.ndarray], layers: list[_Layer]
) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray], int]:
    """Per-position means of each layer's FP32 input and of its quantize→dequantize, over all images."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    names = sorted({layer.fp32_input for layer in layers})
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort_session(model.SerializeToString(), log_severity=None)
    sums: dict[str, np.ndarray] = {}
    q_sums: dict[int, np.ndarray] = {}
    images = 0
    for batch in batches:
        outputs = dict(zip(names, session.run(names, {input_name: batch}), strict=True))
        images += len(batch)
        for name, value in outputs.items():
            sums[name] = sums.get(name, 0) + value.sum(axis=0, dtype=np.float64)
        for i, layer in enumerate(layers):
            # quantize→dequantize as the INT8 model does, in place on a float32 copy
            q = outputs[layer.fp32_input] / np.float32(layer.x_scale)
            np.rint(q, out=q)
            np.clip(q, layer.x_range[0] - layer.x_zero, layer.x_range[1] - layer.x_zero, out=q)
            q_sums[i] = q_sums.get(i, 0) + q.sum(axis=0, dtype=np.float64) * layer.x_scale
    means = {name: value / images for name, value in sums.items()}
    return means, {i: value / images for i, value in q_sums.items()}, images


def _layer_output_mean(node: onnx.NodeProto, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-output-channel mean of `node` (no bias) applied to one input map `x` (no batch dimension)."""
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        w = weight.T if ("transB" in attrs and attrs["transB"].i) else weight
        return alpha * (x.reshape(-1) @ w)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["x", "w"], ["y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute}
            )
        ],
        "mean",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *x.shape]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    conv = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    conv.ir_version = 7
    session = ort_session(conv.SerializeToString(), log_severity=None)
    # ORT's CPU Conv is float32 only; the means are accumulated in float64 before and after.
    y = session.run(None, {"x": x[None].astype(np.float32), "w": weight.astype(np.float32)})[0]
    return y[0].reshape(y.shape[1], -1).astype(np.float64).mean(axis=1)


#: Why a layer without a bias is left alone when `give_bias=False` (the OpenVINO form).
NO_BIAS_REASON = "has no bias, and a new one would add a pass to OpenVINO's fused residual sum"


def _apply(
    int8: onnx.ModelProto, layer: _Layer, shift: np.ndarray, report: BiasCorrectionReport, give_bias: bool
) -> None:
    inits = _initializers(int8)
    producer = {out: node for node in int8.graph.node for out in node.output}
    node = layer.node
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None and not give_bias:
        report.skipped[node.name] = NO_BIAS_REASON
        return
    if bias is None:
        # Give the layer a bias: int32 through DequantizeLinear with scale s_x·s_w, as ORT quantizes biases.
        w_dq = producer[node.input[1]]
        w_scale = np.broadcast_to(
            numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float64).reshape(-1), shift.shape
        )
        b_scale = (layer.x_scale * w_scale).astype(np.float32)
        if np.any(b_scale <= 0):
            report.skipped[node.name] = "no bias, and a zero weight scale"
            return
        values = np.clip(np.rint(-shift / b_scale), INT32_MIN, INT32_MAX).astype(np.int32)
        base = f"{node.name}_rq_bias"
        int8.graph.initializer.extend(
            [
                numpy_helper.from_array(values, f"{base}_quantized"),
                numpy_helper.from_array(b_scale, f"{base}_scale"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{base}_quantized", f"{base}_scale"],
            [f"{base}"],
            name=f"{base}_DequantizeLinear",
            axis=0,
        )
        int8.graph.node.insert(0, dq)
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = base
        report.created.append(node.name)
        report.corrected.append(node.name)
        return
    dq = producer.get(bias)
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
        stored = inits[dq.input[0]]
        values = numpy_helper.to_array(stored).astype(np.int64)
        b_scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).reshape(-1)
        step = np.rint(shift / np.broadcast_to(b_scale, shift.shape)).astype(np.int64)
        new = np.clip(values - step, INT32_MIN, INT32_MAX).astype(numpy_helper.to_array(stored).dtype)
    elif bias in inits:
        stored = inits[bias]
        new = (numpy_helper.to_array(stored).astype(np.float64) - shift).astype(
            numpy_helper.to_array(stored).dtype
        )
    else:
        report.skipped[node.name] = "its bias is not a constant"
        return
    stored.CopyFrom(numpy_helper.from_array(new, stored.name))
    report.corrected.append(node.name)


def _stats_key(layer: _Layer) -> tuple:
    return (layer.fp32_input, layer.x_scale, layer.x_zero, layer.x_range)


def correct_biases(
    fp32: onnx.ModelProto,
    int8: onnx.ModelProto,
    input_name: str,
    batches: Iterable[np.ndarray],
    *,
    cache: dict | None = None,
    give_bias: bool = True,
) -> BiasCorrectionReport:
    """Correct, in place, the biases of `int8` (QDQ) quantized from `fp32`, on the images of `batches`.

    `give_bias=False` leaves a layer without a bias alone (NNCF does the same): OpenVINO fuses a bias-less
    convolution into the residual sum after it without the extra per-channel pass a bias costs there.

    `cache` (optional, kept by the caller between models quantized with the same ranges, as tuning does)
    holds the input means per (tensor, quantization parameters): when every layer is found there, the images
    are not read again.
    """
    report = BiasCorrectionReport()
    layers = _find_layers(fp32, int8, report)
    if not layers:
        report.note = "skipped: no quantized Conv/Gemm layer to correct"
        return report
    cache = cache if cache is not None else {}
    missing = [layer for layer in layers if _stats_key(layer) not in cache]
    if missing:
        means, q_means, images = _mean_inputs(fp32, input_name, batches, missing)
        for i, layer in enumerate(missing):
            cache[_stats_key(layer)] = (means[layer.fp32_input], q_means[i], images)
    for layer in layers:
        m, mq, report.images = cache[_stats_key(layer)]
        shift = _layer_output_mean(layer.node, mq, layer.weight_q) - _layer_output_mean(
            layer.node, m, layer.weight
        )
        if not np.all(np.isfinite(shift)):
            report.skipped[layer.node.name] = "non-finite shift"
            continue
        report.max_shift = max(report.max_shift, float(np.abs(shift).max()))
        _apply(int8, layer, shift, report, give_bias)
    logger.debug(
        "bias correction: %d layer(s) corrected on %d images (max shift %.4g), %d skipped",
        len(report.corrected),
        report.images,
        report.max_shift,
        len(report.skipped),
    )
    return report
