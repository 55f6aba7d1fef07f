"""The OpenVINO form of a QDQ model (recipe ``placement_runtime="openvino"``), applied after quantization.

ONNX Runtime and OpenVINO fuse different graph shapes into integer kernels. ORT's QDQ fusions want every
operator between a DequantizeLinear and a QuantizeLinear of one type (uint8 in, uint8 out), so rq's default
artifact runs a pre-activation BatchNormalization as a depthwise 1×1 QLinearConv and keeps asymmetric uint8
activations everywhere. OpenVINO's CPU plugin instead turns Q/DQ pairs into FakeQuantize and fuses
per-channel affines, ReLU and FakeQuantize into the convolution before them or into one int8 eltwise kernel
(docs/placement.md, "OpenVINO form"). Measured on the ResNet50-v2 topology, its per-layer profile then equals
NNCF's own INT8 model, node for node. Three changes, each only re-expressing what the quantized graph already
computes:

1. **Logits stay float.** A Q/DQ pair in front of a graph output only rounds the result (8-bit logits);
   it is removed.
2. **Per-channel affines as float Mul + Add.** A depthwise 1×1 Conv that rq's preparation made out of an
   unfoldable BatchNormalization becomes ``x · scale + shift`` between the same DequantizeLinear and
   QuantizeLinear, with the dequantized weight and bias (the per-channel int8 weight holds each channel's single
   value exactly; the int32 bias is within s_x·s_w/2 of the float one). OpenVINO fuses it with the ReLU and the
   quantize into one int8 kernel; a depthwise int8 convolution costs twice that.
3. **Signed activations int8 symmetric.** A tensor quantized with a non-zero zero point (one that holds
   negative values: a residual sum, a convolution output before the Add, a normalized image) is re-quantized
   to int8 with zero point 0 over the same range: ``scale = max(-low, high) / 127``. OpenVINO's convolutions
   fuse a symmetric residual sum without zero-point compensation. The int32 bias of a layer that reads such a
   tensor is re-quantized to the new input scale.

ORT still runs the result correctly, but more of it in float (a uint8-in/int8-out convolution and the float
affines are not fused there): this form is for OpenVINO, the default artifact for ORT.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.bias_correction import dequantize
from quantize.graph.rewrite import attribute, drop_unused_initializers, unique_name

#: Why a BatchNormalization affine of the OpenVINO form counts as FP32 in the quantized-ops table.
AFFINE_REASON = "float per-channel affine between int8 tensors (OpenVINO fuses it into the quantize)"

_INT_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class OpenVinoForm:
    """What :func:`to_openvino_form` changed (the model is modified in place)."""

    float_outputs: list[str] = field(default_factory=list)  # graph outputs no longer rounded to 8 bits
    affines: list[str] = field(default_factory=list)  # depthwise 1×1 Convs now Mul + Add
    symmetric: list[str] = field(default_factory=list)  # tensors now int8 with zero point 0
    biases: list[str] = field(default_factory=list)  # layers whose int32 bias was re-quantized

    def to_dict(self) -> dict:
        return {
            "float_outputs": self.float_outputs,
            "affines": self.affines,
            "symmetric": self.symmetric,
            "biases": self.biases,
        }

    def describe(self) -> str:
        return (
            f"OpenVINO form: {len(self.affines)} per-channel affine(s) as float Mul+Add, "
            f"{len(self.symmetric)} signed tensor(s) int8 symmetric, "
            f"{len(self.float_outputs)} output(s) float"
        )


class _Graph:
    """Lookup tables over a graph, rebuilt after each step."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.taken = set(self.inits) | set(self.producer) | {i.name for i in graph.input}
        self.taken |= {n.name for n in graph.node}

    def unique(self, base: str) -> str:
        return unique_name(base, self.taken)

    def constant(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def dequantized(self, name: str) -> np.ndarray | None:
        """The float value of a constant read through a DequantizeLinear (None if `name` is not one)."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or any(i and i not in self.inits for i in dq.input):
            return None
        return dequantize(dq, self.inits)[0].astype(np.float32)


def to_openvino_form(model: onnx.ModelProto) -> OpenVinoForm:
    """Rewrite a QDQ model (in place) into the form OpenVINO fuses best; see the module doc."""
    form = OpenVinoForm()
    _float_outputs(model, form)
    _affines_as_mul_add(model, form)
    _signed_symmetric(model, form)
    drop_unused_initializers(model)
    return form


def _float_outputs(model: onnx.ModelProto, form: OpenVinoForm) -> None:
    g = _Graph(model)
    for out in model.graph.output:
        dq = g.producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(g.readers[q.output[0]]) != 1:
            continue
        source = g.producer.get(q.input[0])
        if source is None or len(g.readers[q.input[0]]) != 1 or q.input[0] in g.outputs:
            continue
        source.output[list(source.output).index(q.input[0])] = out.name  # the float node writes the output
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
        form.float_outputs.append(out.name)


def _is_channel_affine(node: onnx.NodeProto, g: _Graph) -> np.ndarray | None:
    """The dequantized weight of a depthwise 1×1 Conv (group = channels, no stride or padding), else None."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    weight = g.dequantized(node.input[1])
    if weight is None or weight.ndim < 3 or weight.shape[1] != 1 or any(d != 1 for d in weight.shape[2:]):
        return None
    spatial = weight.ndim - 2
    if attribute(node, "group", 1) != weight.shape[0]:
        return None
    if any(s != 1 for s in attribute(node, "strides", [1] * spatial)) or any(
        attribute(node, "pads", [0] * 2 * spatial)
    ):
        return None
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return None
    x = g.producer.get(node.input[0])
    return weight if x is not None and x.op_type == "DequantizeLinear" else None


def _affines_as_mul_add(model: onnx.ModelProto, form: OpenVinoForm) -> None:
    g = _Graph(model)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weight = _is_channel_affine(node, g)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = g.dequantized(node.input[2]) if weight is not None and has_bias else None
        if weight is None or (has_bias and bias is None):
            nodes.append(node)
            continue
        channels, rank = weight.shape[0], weight.ndim
        shape = (1, channels, *[1] * (rank - 2))
        scale_name = g.unique(f"{node.name or node.output[0]}_scale")
        model.graph.initializer.append(numpy_helper.from_array(weight.reshape(shape), scale_name))
        shift = np.zeros(channels, np.float32) if bias is None else bias
        shift_name = g.unique(f"{node.name or node.output[0]}_shift")
        model.graph.initializer.append(
            numpy_helper.from_array(shift.reshape(shape).astype(np.float32), shift_name)
        )
        scaled = g.unique(f"{node.output[0]}_scaled")
        # The Mul keeps the Conv's name: the quantized-ops count finds it (and its reason) by name.
        nodes.append(helper.make_node("Mul", [node.input[0], scale_name], [scaled], name=node.name))
        nodes.append(
            helper.make_node(
                "Add", [scaled, shift_name], [node.output[0]], name=g.unique(f"{node.name}_shift")
            )
        )
        form.affines.append(node.name or node.output[0])
    if form.affines:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_dead_dequantize(model)


def _drop_dead_dequantize(model: onnx.ModelProto) -> None:
    """DequantizeLinear nodes of constants nothing reads any more (the replaced Convs' weights and biases)."""
    read = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in read]:
        model.graph.node.remove(node)


def _signed_symmetric(model: onnx.ModelProto, form: OpenVinoForm) -> None:
    g = _Graph(model)
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        if len(q.input) < 3 or not q.input[2]:
            continue
        scale, zero = g.constant(q.input[1]), g.constant(q.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or int(zero.ravel()[0]) == 0:
            continue
        if zero.dtype not in _INT_RANGES:
            continue
        dequantizers = g.readers[q.output[0]]
        if (
            not dequantizers
            or any(d.op_type != "DequantizeLinear" for d in dequantizers)
            or q.output[0] in g.outputs
        ):
            continue
        qmin, qmax = _INT_RANGES[zero.dtype]
        s, z = float(scale.ravel()[0]), int(zero.ravel()[0])
        low, high = (qmin - z) * s, (qmax - z) * s
        new_scale = max(-low, high) / 127.0
        tensor = q.input[0]
        scale_name, zero_name = g.unique(f"{tensor}_sym_scale"), g.unique(f"{tensor}_sym_zero_point")
        model.graph.initializer.append(numpy_helper.from_array(np.array(new_scale, np.float32), scale_name))
        model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero_name))
        for node in [q, *dequantizers]:
            node.input[1], node.input[2] = scale_name, zero_name
        form.symmetric.append(tensor)
        for dq in dequantizers:
            for layer in g.readers[dq.output[0]]:
                if layer.op_type in _WEIGHTED and layer.input[0] == dq.output[0]:
                    _requantize_bias(model, g, layer, np.float32(new_scale), form)


def _requantize_bias(model: onnx.ModelProto, g: _Graph, layer: onnx.NodeProto, x_scale, form) -> None:
    """Give `layer`'s int32 bias the scale x_scale · w_scale its integer kernel assumes."""
    if len(layer.input) < 3 or not layer.input[2]:
        return
    bias_dq, weight_dq = g.producer.get(layer.input[2]), g.producer.get(layer.input[1])
    if bias_dq is None or bias_dq.op_type != "DequantizeLinear" or weight_dq is None:
        return
    if weight_dq.op_type != "DequantizeLinear" or len(g.readers[bias_dq.output[0]]) != 1:
        return
    bias, w_scale = g.dequantized(layer.input[2]), g.constant(weight_dq.input[1])
    if bias is None or w_scale is None:
        return
    new_scale = (np.float32(x_scale) * w_scale.astype(np.float32)).reshape(-1).astype(np.float32)
    if new_scale.size == 1:
        new_scale = np.full(bias.shape[0], new_scale[0], np.float32)
    safe = np.where(new_scale == 0, 1.0, new_scale)
    q = np.clip(np.round(bias.astype(np.float64) / safe), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    name = layer.name or layer.output[0]
    q_name, s_name, z_name = (g.unique(f"{name}_bias_{k}") for k in ("quantized", "scale", "zero_point"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q.astype(np.int32), q_name),
            numpy_helper.from_array(new_scale, s_name),
            numpy_helper.from_array(np.zeros(bias.shape[0], np.int32), z_name),
        ]
    )
    del bias_dq.input[:]
    bias_dq.input.extend([q_name, s_name, z_name])
    for a in list(bias_dq.attribute):
        if a.name == "axis":
            bias_dq.attribute.remove(a)
    bias_dq.attribute.append(helper.make_attribute("axis", 0))
    form.biases.append(name)
